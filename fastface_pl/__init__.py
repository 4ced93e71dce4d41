"""fastface_pl: fast face-recognition training on one GPU with PyTorch Lightning.

The FastFace and Moving Haar learning-rate schedulers (pure Python detectors, a Lightning callback and a
plain-PyTorch scheduler), IResNet/MobileFaceNet backbones with ArcFace/CosFace margins, and InsightFace
data readers that need no MXNet.

Public names are imported lazily, so ``from fastface_pl import FastFaceDetector`` does not import torch.
"""

from __future__ import annotations

from fastface_pl._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "FastFaceDetector": "fastface_pl.scheduling.detectors",
    "MovingHaarDetector": "fastface_pl.scheduling.detectors",
    "build_detector": "fastface_pl.scheduling.detectors",
    "NonFiniteLossError": "fastface_pl.scheduling.detectors",
    "FastFaceLRCallback": "fastface_pl.scheduling.callback",
    "FastFaceLR": "fastface_pl.scheduling.lr_scheduler",
    "FaceRecognitionModule": "fastface_pl.models.module",
    "build_backbone": "fastface_pl.models.backbones",
    "FaceDataModule": "fastface_pl.data.datamodule",
    "VerificationMetric": "fastface_pl.evaluation.verification",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, eager=("__version__",))
