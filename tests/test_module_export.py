"""Exported backbones (TorchScript, ONNX) give the eager model's embeddings."""

from __future__ import annotations

import pytest
import torch

from fastface_pl.models.backbones import build_backbone
from fastface_pl.models.export import export_onnx, export_torchscript


@pytest.fixture(scope="module")
def trained_like_backbone():
    torch.manual_seed(0)
    backbone = build_backbone("tiny", embedding_size=24, input_size=32)
    backbone.train()
    with torch.no_grad():  # move BatchNorm running statistics away from their initial values
        for _ in range(3):
            backbone(torch.randn(8, 3, 32, 32) * 2 + 0.3)
    return backbone.eval()


def test_torchscript_matches_eager(tmp_path, trained_like_backbone):
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = trained_like_backbone(images)
    path = export_torchscript(trained_like_backbone, tmp_path / "tiny.pt", input_size=32)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, rtol=1e-4, atol=1e-5)
        assert loaded(images[:1]).shape == (1, 24)  # another batch size
    assert trained_like_backbone.training is False and next(trained_like_backbone.parameters()).requires_grad


def test_onnx_matches_eager(tmp_path, trained_like_backbone):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = trained_like_backbone(images).numpy()
    path = export_onnx(trained_like_backbone, tmp_path / "tiny.onnx", input_size=32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    (output,) = session.run(None, {"images": images.numpy()})
    assert output.shape == (3, 24)
    assert abs(output - expected).max() < 1e-4
    (single,) = session.run(None, {"images": images[:1].numpy()})  # dynamic batch dimension
    assert abs(single - expected[:1]).max() < 1e-4


def test_export_rejects_bad_arguments(tmp_path, trained_like_backbone):
    with pytest.raises(ValueError, match="input_size"):
        export_torchscript(trained_like_backbone, tmp_path / "x.pt", input_size=30)
    with pytest.raises(ValueError, match="nn.Module"):
        export_torchscript("r18", tmp_path / "x.pt", input_size=32)
