"""The FastFace and Moving Haar LR schedulers: pure detectors, a Lightning callback, a plain-PyTorch scheduler,
the presets of ``conf/scheduler/`` and the replay of a logged loss curve (:mod:`~fastface_pl.scheduling.replay`).

Names are imported lazily (the detectors need neither torch nor Lightning).
"""

from __future__ import annotations

from fastface_pl._lazy import lazy_exports

_EXPORTS = {
    "Detector": "fastface_pl.scheduling.detectors",
    "FastFaceDetector": "fastface_pl.scheduling.detectors",
    "MovingHaarDetector": "fastface_pl.scheduling.detectors",
    "NonFiniteLossError": "fastface_pl.scheduling.detectors",
    "build_detector": "fastface_pl.scheduling.detectors",
    "AutoFastFaceDetector": "fastface_pl.scheduling.auto",
    "FastFaceLRCallback": "fastface_pl.scheduling.callback",
    "FastFaceLR": "fastface_pl.scheduling.lr_scheduler",
    "lr_callback": "fastface_pl.scheduling.presets",
    "torch_schedule": "fastface_pl.scheduling.presets",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
