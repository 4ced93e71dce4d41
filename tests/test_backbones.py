"""Backbones: IResNet parameter counts (docs/models.md), shapes, input sizes, knobs, MobileFaceNet, tiny runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastface_pl.models.backbones import BACKBONES, IResNet, MobileFaceNet, build_backbone, count_parameters

# docs/models.md, in millions; they count every parameter (with the frozen BatchNorm1d weight: 512 of them,
# which does not change the rounding at two decimals; the test checks both).
PUBLISHED_MILLIONS = {"r18": 24.03, "r34": 34.14, "r50": 43.59, "r100": 65.16, "r200": 118.83}


@pytest.mark.parametrize("name", list(PUBLISHED_MILLIONS))
def test_iresnet_parameter_counts_match_reference(name):
    with torch.device("meta"):  # no memory, no init cost (r200 has 119M parameters)
        model = build_backbone(name)
    total = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    expected = PUBLISHED_MILLIONS[name] * 1e6
    assert abs(total - expected) / expected < 1e-3
    assert abs(trainable - expected) / expected < 1e-3
    assert total - trainable == 512  # exactly the frozen BatchNorm1d weight
    assert round(total / 1e6, 2) == PUBLISHED_MILLIONS[name]
    assert model.fc.in_features == 512 * 7 * 7 == 25_088
    assert count_parameters(model.fc) == 25_088 * 512 + 512  # the 12.85M of §3


def test_iresnet_structure_follows_reference():
    model = build_backbone("r50")
    assert model.depths == (3, 4, 14, 3) and model.widths == (64, 128, 256, 512)
    assert model.conv1.in_channels == 3 and model.conv1.out_channels == 64 and model.conv1.bias is None
    assert model.conv1.stride == (1, 1) and model.bn1.eps == 1e-5 and isinstance(model.prelu, nn.PReLU)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        first = stage[0]
        assert first.conv2.stride == (2, 2) and first.conv1.stride == (1, 1)
        conv, bn = first.downsample
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(bn, nn.BatchNorm2d)
        assert all(block.downsample is None for block in stage[1:])
    block = model.layer2[1]
    assert [type(m) for m in block.children()][:6] == [nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d, nn.PReLU,
                                                       nn.Conv2d, nn.BatchNorm2d]
    assert model.bn2.num_features == 512
    assert not model.features.weight.requires_grad and model.features.bias.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))


def test_block_has_no_activation_after_addition():
    from fastface_pl.models.backbones import IBasicBlock

    block = IBasicBlock(4, 4).eval()
    x = -torch.ones(1, 4, 5, 5) * 10  # strongly negative input: any ReLU/PReLU after the add would change it
    with torch.no_grad():
        block.bn3.weight.zero_()  # the residual branch now adds exactly 0
        assert torch.equal(block(x), x)  # a PReLU after the addition would give 0.25·x


def test_r18_forward_shape_and_gflops():
    model = build_backbone("r18").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(torch.randn(1, 3, 112, 112))
    assert out.shape == (1, 512)
    assert counter.get_total_flops() / 2e9 == pytest.approx(2.6, rel=0.02)  # multiply-adds, as in §3


def test_mobilefacenet_size_and_cost():
    model = build_backbone("mbf").eval()
    assert isinstance(model, MobileFaceNet)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert counter.get_total_flops() / 2 / 2 / 1e9 == pytest.approx(0.45, rel=0.05)  # per image
    assert 1.5e6 < count_parameters(model) < 2.5e6
    small = build_backbone("mbf", embedding_size=128, input_size=32, scale=1)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 128)


@pytest.mark.parametrize("input_size", [32, 64, 112, 128])
def test_input_size_sets_head_linear(input_size):
    model = build_backbone("tiny", embedding_size=24, input_size=input_size)
    assert model.fc.in_features == 64 * (input_size // 16) ** 2
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, input_size, input_size)).shape == (2, 24)


def test_width_and_depth_knobs():
    model = build_backbone("r18", width_multiplier=0.25, input_size=32, embedding_size=64)
    assert model.widths == (16, 32, 64, 128) and model.fc.in_features == 128 * 4
    custom = build_backbone("r50", widths=(8, 8, 16, 16), depths=(1, 2, 1, 1), input_size=32)
    assert custom.widths == (8, 8, 16, 16) and [len(s) for s in (custom.layer1, custom.layer2, custom.layer3,
                                                                   custom.layer4)] == [1, 2, 1, 1]
    assert build_backbone("r18_tiny").widths == (16, 32, 64, 128)


def test_tiny_backbone_trains_on_cpu_quickly():
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=16, input_size=32)
    target = torch.randn(16, 16)
    images = torch.randn(16, 3, 32, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = (model(images) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert model.features.weight.grad is None  # frozen BN weight never gets a gradient
    assert torch.equal(model.features.weight, torch.ones(16))


def test_wrong_input_shape_is_explained():
    model = build_backbone("tiny", input_size=32)
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(1, 3, 112, 112))


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("r1000", {}, "valid names: r18, r34, r50, r100, r200, mbf"),
        ("r18", {"input_size": 100}, "multiple of 16"),
        ("r18", {"width_multiplier": 0}, "width_multiplier"),
        ("r18", {"depths": (1, 2, 3)}, "depths"),
        ("r18", {"dropout": 1.0}, "dropout"),
        ("tiny", {"colour": True}, "invalid arguments for backbone 'tiny'"),
        ("mbf", {"embedding_size": 0}, "embedding_size"),
    ],
)
def test_invalid_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(name, **kwargs)


def test_registry_names():
    assert {"r18", "r34", "r50", "r100", "r200", "mbf", "tiny", "r18_tiny"} <= set(BACKBONES)
    assert isinstance(build_backbone("tiny"), IResNet)


def test_iresnet_head_runs_in_fp32_under_autocast():
    # arcface_torch computes the head Linear and BatchNorm1d in fp32 even in fp16 training; the body stays low.
    torch.manual_seed(0)
    net = build_backbone("tiny", embedding_size=16, input_size=16).eval()
    dtypes = {}
    net.layer4.register_forward_hook(lambda m, i, o: dtypes.__setitem__("body", o.dtype))
    net.fc.register_forward_hook(lambda m, i, o: dtypes.__setitem__("fc", o.dtype))
    images = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = net(images)
    assert dtypes == {"body": torch.bfloat16, "fc": torch.float32}
    assert embeddings.dtype == torch.float32


def test_mobilefacenet_head_runs_in_fp32_under_autocast():
    net = build_backbone("mbf", embedding_size=16, input_size=32).eval()
    dtypes = {}
    net.body.register_forward_hook(lambda m, i, o: dtypes.__setitem__("body", o.dtype))
    net.fc.register_forward_hook(lambda m, i, o: dtypes.__setitem__("fc", o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = net(torch.randn(2, 3, 32, 32))
    assert dtypes == {"body": torch.bfloat16, "fc": torch.float32}
    assert embeddings.dtype == torch.float32
