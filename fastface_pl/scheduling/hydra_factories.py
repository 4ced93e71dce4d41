"""Factories for the Hydra configs ``conf/scheduler/*.yaml``: LR schedules from flat arguments a sweep overrides.

:func:`lr_callback` builds :class:`~fastface_pl.scheduling.callback.FastFaceLRCallback` with the detector's
settings as flat keys (``-m scheduler.threshold=2e-5,5e-5``); :func:`torch_schedule` returns the ``lr_schedule``
dictionary that :class:`~fastface_pl.models.module.FaceRecognitionModule` turns into a ``torch.optim.lr_scheduler``
(the usual fixed schedules, for comparison).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence, get_args

from fastface_pl.scheduling.detectors import DetectorName
from fastface_pl.scheduling.ending import DEFAULT_LATEST_START, DEFAULT_STOP_COOLDOWN_FRACTION, CooldownShape, Mode

TorchScheduleName = Literal["polynomial", "step", "constant"]
TORCH_SCHEDULES = get_args(TorchScheduleName)


def lr_callback(detector: DetectorName = "fastface", *, patience: int | None = None,
                patience_fraction: float | None = None, min_lr: float | None = None, sync_every_n_steps: int = 16,
                mode: Mode = "halve", cooldown_shape: CooldownShape = "1-sqrt",
                latest_cooldown_start: float | None = DEFAULT_LATEST_START,
                cooldown_fraction: float = DEFAULT_STOP_COOLDOWN_FRACTION, horizon_epochs: float | None = None,
                horizon_steps: int | None = None, **detector_kwargs: Any):
    """``FastFaceLRCallback(detector, detector_kwargs, ...)`` with the detector's arguments given flat.

    Args:
        detector: ``"fastface"`` or ``"moving_haar"`` (docs/scheduler.md).
        patience: P in optimizer steps; give it or ``patience_fraction`` (τ), not both.
        patience_fraction: τ: P = int(τ·T). Neither given: 0.05 for ``fastface``, 2·window for ``moving_haar``.
        min_lr, sync_every_n_steps: as :class:`FastFaceLRCallback`.
        mode, cooldown_shape, latest_cooldown_start, cooldown_fraction, horizon_epochs, horizon_steps: what a
            decision does, as :class:`FastFaceLRCallback` (docs/cooldown.md).
        **detector_kwargs: the detector's own arguments (``alpha``, ``beta``, ``threshold``, ``decay``,
            ``max_decays`` / ``window``, ``threshold``, ``decay``, ``restart_after``, ``max_decays``). A
            ``fastface`` detector given none of ``alpha``, ``beta``, ``threshold``, ``patience`` resolves them
            from the run (docs/auto_settings.md).
    """
    from fastface_pl.scheduling.callback import FastFaceLRCallback

    return FastFaceLRCallback(detector=detector, detector_kwargs=detector_kwargs, patience=patience,
                              patience_fraction=patience_fraction, min_lr=min_lr,
                              sync_every_n_steps=sync_every_n_steps, mode=mode,
                              cooldown_shape=cooldown_shape, latest_cooldown_start=latest_cooldown_start,
                              cooldown_fraction=cooldown_fraction, horizon_epochs=horizon_epochs,
                              horizon_steps=horizon_steps)


def torch_schedule(
    name: TorchScheduleName,
    power: float | None = None,
    warmup_fraction: float = 0.0,
    milestones: Sequence[int] | None = None,
    gamma: float | None = None,
) -> dict[str, Any] | None:
    """A fixed schedule for comparison: ``polynomial`` (arcface_torch), ``step`` (epoch milestones) or ``constant``.

    Returns the ``lr_schedule`` argument of :class:`FaceRecognitionModule` (``None`` for constant), checked by
    the module's own rule.
    """
    from fastface_pl.models.module import check_lr_schedule
    from fastface_pl.argument_checks import check_choice

    check_choice("scheduler name", name, TORCH_SCHEDULES)
    if name == "constant":
        return None
    if name == "polynomial":
        return check_lr_schedule({"name": name, "power": power, "warmup_fraction": warmup_fraction})
    return check_lr_schedule({"name": name, "milestones": milestones, "gamma": gamma})
