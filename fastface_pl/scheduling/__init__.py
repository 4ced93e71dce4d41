"""The FastFace and Moving Haar LR schedulers: pure detectors, a Lightning callback, a plain-PyTorch scheduler,
the factories of the Hydra configs ``conf/scheduler/``, the checks of a saved state and the replay of a logged
loss curve (:mod:`~fastface_pl.scheduling.replay`).

Names are imported lazily (the detectors need neither torch nor Lightning).
"""

from __future__ import annotations

from fastface_pl._lazy import lazy_exports

_MODULES = {
    "fastface_pl.scheduling.detectors": ("Detector", "FastFaceDetector", "MovingHaarDetector",
                                         "NonFiniteLossError", "build_detector"),
    "fastface_pl.scheduling.auto": ("AutoFastFaceDetector",),
    "fastface_pl.scheduling.callback": ("FastFaceLRCallback",),
    "fastface_pl.scheduling.lr_scheduler": ("FastFaceLR",),
    "fastface_pl.scheduling.hydra_factories": ("lr_callback", "torch_schedule"),
    "fastface_pl.scheduling.saved_state": ("SchedulerStateError",),
}

__all__ = sorted(name for names in _MODULES.values() for name in names)


__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
