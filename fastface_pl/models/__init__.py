"""Backbones, margin heads, classification layers, the LightningModule and export helpers.

Names are imported lazily (``fastface_pl.models.FaceRecognitionModule`` imports Lightning on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IResNet": "fastface_pl.models.backbones",
    "MobileFaceNet": "fastface_pl.models.backbones",
    "build_backbone": "fastface_pl.models.backbones",
    "BACKBONES": "fastface_pl.models.backbones",
    "MarginHead": "fastface_pl.models.margins",
    "ArcFace": "fastface_pl.models.margins",
    "ArcFaceExact": "fastface_pl.models.margins",
    "CosFace": "fastface_pl.models.margins",
    "CombinedMargin": "fastface_pl.models.margins",
    "build_margin": "fastface_pl.models.margins",
    "FullClassifier": "fastface_pl.models.classifiers",
    "SampledClassifier": "fastface_pl.models.classifiers",
    "margin_cross_entropy": "fastface_pl.models.classifiers",
    "build_classifier": "fastface_pl.models.classifiers",
    "RowSparseSGD": "fastface_pl.models.optim",
    "FaceRecognitionModule": "fastface_pl.models.module",
    "export_torchscript": "fastface_pl.models.export",
    "export_onnx": "fastface_pl.models.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastface_pl.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
