"""fastface_pl: fast face-recognition training on one GPU with PyTorch Lightning.

The FastFace and Moving Haar learning-rate schedulers (pure Python detectors, a Lightning callback and a
plain-PyTorch scheduler), IResNet/MobileFaceNet backbones with ArcFace/CosFace margins, and InsightFace
data readers that need no MXNet.

Public names are imported lazily, so ``from fastface_pl import FastFaceDetector`` does not import torch.
Docstrings name documents as ``docs/<name>.md``: they ship inside the package, as ``fastface_pl/docs/<name>.md``.
"""

from __future__ import annotations

from fastface_pl._lazy import lazy_exports

__version__ = "0.1.0"

_MODULES = {
    "fastface_pl.scheduling.detectors": ("FastFaceDetector", "MovingHaarDetector", "build_detector",
                                         "NonFiniteLossError"),
    "fastface_pl.scheduling.callback": ("FastFaceLRCallback",),
    "fastface_pl.scheduling.lr_scheduler": ("FastFaceLR", "LRChangedError"),
    "fastface_pl.models.module": ("FaceRecognitionModule",),
    "fastface_pl.models.backbones": ("build_backbone",),
    "fastface_pl.data.datamodule": ("FaceDataModule",),
    "fastface_pl.evaluation.verification": ("VerificationMetric",),
}

__all__ = sorted(name for names in _MODULES.values() for name in names) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _MODULES, eager=("__version__",))
