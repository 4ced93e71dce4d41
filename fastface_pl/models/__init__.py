"""Backbones, margin heads, classification layers, the LightningModule and export helpers.

Names are imported lazily (``fastface_pl.models.FaceRecognitionModule`` imports Lightning on first use).
"""

from __future__ import annotations

from fastface_pl._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
