"""Export a trained backbone for deployment: TorchScript and ONNX.

Both exports take the backbone in eval mode (BatchNorm running statistics, no dropout), an input
``float[B, 3, input_size, input_size]`` normalised as ``(x / 255 - 0.5) / 0.5`` (RGB), and give the
*unnormalised* embedding ``float[B, D]`` (L2-normalise it before comparing faces). The batch dimension is
dynamic in both.

Example::

    from fastface_pl.models.export import export_onnx, export_torchscript
    model = FaceRecognitionModule.load_from_checkpoint("last.ckpt")
    export_torchscript(model.backbone, "r100.pt", input_size=112)   # torch.jit.load("r100.pt")
    export_onnx(model.backbone, "r100.onnx", input_size=112)        # needs the onnx and onnxscript packages
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["export_torchscript", "export_onnx"]


def _prepare(backbone: nn.Module, input_size: int) -> tuple[nn.Module, torch.Tensor]:
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 16 or input_size % 16:
        raise ValueError(f"input_size must be a positive multiple of 16, got {input_size!r}")
    model = copy.deepcopy(backbone).float().eval().to("cpu", memory_format=torch.contiguous_format)
    for param in model.parameters():
        param.requires_grad_(False)
    example = torch.zeros(2, 3, input_size, input_size)
    return model, example


def export_torchscript(backbone: nn.Module, path: str | os.PathLike, input_size: int = 112) -> Path:
    """Traces the backbone (eval mode, CPU, fp32) to a TorchScript file loadable with ``torch.jit.load``.

    Args:
        backbone: the network (e.g. ``module.backbone``); not modified (a copy is traced).
        path: output file (``.pt``).
        input_size: image height = width.

    Returns:
        The written path.
    """
    model, example = _prepare(backbone, input_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation notices
        traced = torch.jit.trace(model, example, check_trace=False)
        traced = torch.jit.freeze(traced)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
    return path


def export_onnx(backbone: nn.Module, path: str | os.PathLike, input_size: int = 112, opset_version: int = 18) -> Path:
    """Exports the backbone (eval mode, CPU, fp32) to ONNX with a dynamic batch dimension.

    Input ``images float[batch, 3, H, W]``, output ``embeddings float[batch, D]``. Uses
    ``torch.onnx.export(dynamo=True)``, which needs the ``onnx`` and ``onnxscript`` packages
    (``pip install 'fastface_pl[test]'`` installs them).

    Returns:
        The written path.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs the onnx and onnxscript packages ({error}); pip install onnx onnxscript, "
            "or use export_torchscript"
        ) from error
    model, example = _prepare(backbone, input_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes=({0: batch},),
            opset_version=opset_version,
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    return path
