"""arcface_torch's MobileFaceNet weights load as they are into ``mbf`` and give the same embeddings.

The fixture below is arcface_torch's ``backbones/mobilefacenet.py`` (``get_mbf(fp16, num_features)``) re-typed
as a minimal module: the same module tree, so the same state-dict keys and shapes, and the same forward.
"""

from __future__ import annotations

import torch
from torch import nn

from fastface_pl.models import build_backbone


class ConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, groups=groups, stride=stride, padding=padding,
                                              bias=False), nn.BatchNorm2d(out_c), nn.PReLU(out_c))

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c))

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    def __init__(self, in_c, out_c, residual=False, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBlock(in_c, groups), ConvBlock(groups, groups, kernel, stride, padding, groups),
                                    LinearBlock(groups, out_c))

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, c, num_block, groups, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, embedding_size):
        super().__init__()
        self.layers = nn.Sequential(LinearBlock(512, 512, groups=512, kernel=(7, 7)), nn.Flatten(),
                                    nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.layers(x)


class ArcfaceTorchMobileFaceNet(nn.Module):
    """get_mbf(fp16=False, num_features=512): blocks (1, 4, 6, 2), scale 2."""

    def __init__(self, num_features=512, scale=2):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(3, 64 * scale, kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
            ConvBlock(64 * scale, 64 * scale, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64),
            DepthWise(64 * scale, 64 * scale, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
            Residual(64 * scale, num_block=4, groups=128),
            DepthWise(64 * scale, 128 * scale, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
            Residual(128 * scale, num_block=6, groups=256),
            DepthWise(128 * scale, 128 * scale, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
            Residual(128 * scale, num_block=2, groups=256),
        )
        self.conv_sep = ConvBlock(128 * scale, 512)
        self.features = GDC(num_features)

    def forward(self, x):
        return self.features(self.conv_sep(self.layers(x)))


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BN statistic random, so a misplaced tensor changes the output."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            noise = torch.rand(value.shape, generator=generator)
            state[key] = noise + 0.5 if key.endswith("running_var") else (noise - 0.5) * 0.2 + (
                1.0 if key.endswith(".weight") and value.dim() == 1 else 0.0)
    model.load_state_dict(state)
    return model


def test_mbf_state_dict_keys_and_shapes_are_arcface_torch_s():
    ours, theirs = build_backbone("mbf").state_dict(), ArcfaceTorchMobileFaceNet().state_dict()
    assert len(theirs) == 333
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_arcface_torch_mbf_weights_load_strictly_and_give_the_same_embeddings():
    theirs = randomised(ArcfaceTorchMobileFaceNet(), seed=0).eval()
    ours = build_backbone("mbf")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(images)
        assert torch.equal(ours(images), expected)
    assert expected.abs().mean() > 1e-2  # not a degenerate all-zero comparison


def test_fastface_mbf_weights_load_into_arcface_torch():
    ours = randomised(build_backbone("mbf"), seed=2).eval()
    theirs = ArcfaceTorchMobileFaceNet()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(theirs(images), ours(images))
