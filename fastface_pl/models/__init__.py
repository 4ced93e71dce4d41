"""Backbones, margin heads, classification layers, the LightningModule and export helpers.

Names are imported lazily (``fastface_pl.models.FaceRecognitionModule`` imports Lightning on first use).
"""

from __future__ import annotations

from fastface_pl._lazy import lazy_exports

_MODULES = {
    "fastface_pl.models.backbones": ("IResNet", "MobileFaceNet", "build_backbone", "BACKBONES"),
    "fastface_pl.models.margins": ("MarginHead", "ArcFace", "ArcFaceExact", "CosFace", "CombinedMargin",
                                   "build_margin"),
    "fastface_pl.models.classifiers": ("ClassificationLayer", "FullClassifier", "SampledClassifier",
                                       "margin_cross_entropy"),
    "fastface_pl.models.sharded": ("ShardedClassifier",),
    "fastface_pl.models.dcp": ("DynamicClassPool", "DCPClassifier"),
    "fastface_pl.models.optim": ("RowSparseSGD",),
    "fastface_pl.models.module": ("FaceRecognitionModule", "CLASSIFIERS"),
    "fastface_pl.models.export": ("export_torchscript", "export_onnx"),
}

__all__ = sorted(name for names in _MODULES.values() for name in names)


__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
