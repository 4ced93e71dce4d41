"""Flat-argument builders of the LR schedules, for Hydra configs (``conf/scheduler/*.yaml``).

Each function names every knob of one schedule, so a config can list them and a sweep can override
them (``-m scheduler.threshold=2e-5,5e-5``). The FastFace and Moving Haar builders return a
:class:`~fastface_pl.scheduling.callback.FastFaceLRCallback`; :func:`torch_schedule` returns the
``lr_schedule`` dictionary that :class:`~fastface_pl.models.module.FaceRecognitionModule` turns into
a ``torch.optim.lr_scheduler`` (the usual alternatives, for comparison).
"""

from __future__ import annotations

from typing import Any, Sequence

TORCH_SCHEDULES = ("polynomial", "step", "constant")


def fastface_callback(
    alpha: float = 1e-3,
    beta: float = 1e-3,
    threshold: float = 5e-5,
    patience_fraction: float | None = 0.05,
    patience: int | None = None,
    decay: float = 2.0,
    max_decays: int | None = 8,
    min_lr: float | None = None,
    sync_every_n_steps: int = 16,
    on_nonfinite: str = "skip",
):
    """The FastFace callback (docs/scheduler.md) from flat arguments; ``patience`` overrides ``patience_fraction``."""
    from fastface_pl.scheduling.callback import FastFaceLRCallback

    return FastFaceLRCallback(
        detector="fastface",
        detector_kwargs=dict(alpha=alpha, beta=beta, threshold=threshold, decay=decay, max_decays=max_decays),
        patience=patience,
        patience_fraction=None if patience is not None else patience_fraction,
        min_lr=min_lr,
        sync_every_n_steps=sync_every_n_steps,
        on_nonfinite=on_nonfinite,
    )



def fastface_auto_callback(
    patience_fraction: float = 0.05,
    decay: float = 2.0,
    max_decays: int | None = 8,
    min_lr: float | None = None,
    sync_every_n_steps: int = 16,
    on_nonfinite: str = "skip",
):
    """The FastFace callback with α, β, λ and P resolved from the run (docs/auto_settings.md)."""
    from fastface_pl.scheduling.callback import FastFaceLRCallback

    return FastFaceLRCallback(
        detector="fastface",
        detector_kwargs=dict(decay=decay, max_decays=max_decays),  # no α, β, λ, P: the auto rule sets them
        patience_fraction=patience_fraction,
        min_lr=min_lr,
        sync_every_n_steps=sync_every_n_steps,
        on_nonfinite=on_nonfinite,
    )

def moving_haar_callback(
    window: int = 4000,
    threshold: float = 0.06,
    patience: int | None = None,
    patience_fraction: float | None = None,
    decay: float = 2.0,
    restart_after: int | None = 3,
    max_decays: int | None = None,
    min_lr: float | None = None,
    sync_every_n_steps: int = 16,
    on_nonfinite: str = "skip",
):
    """The Moving Haar (MHLR) callback (docs/scheduler.md); patience defaults to 2·window."""
    from fastface_pl.scheduling.callback import FastFaceLRCallback

    return FastFaceLRCallback(
        detector="moving_haar",
        detector_kwargs=dict(
            window=window, threshold=threshold, decay=decay, restart_after=restart_after, max_decays=max_decays
        ),
        patience=patience,
        patience_fraction=patience_fraction,
        min_lr=min_lr,
        sync_every_n_steps=sync_every_n_steps,
        on_nonfinite=on_nonfinite,
    )


def torch_schedule(
    name: str,
    power: float | None = None,
    warmup_fraction: float = 0.0,
    milestones: Sequence[int] | None = None,
    gamma: float | None = None,
) -> dict[str, Any] | None:
    """A fixed schedule for comparison: ``polynomial`` (arcface_torch), ``step`` (epoch milestones) or ``constant``.

    Returns the ``lr_schedule`` argument of :class:`FaceRecognitionModule` (``None`` for constant).
    """
    if name not in TORCH_SCHEDULES:
        raise ValueError(f"scheduler name must be one of {', '.join(TORCH_SCHEDULES)}; got {name!r}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1); got {warmup_fraction}")
    if name == "constant":
        return None
    if name == "polynomial":
        if power is None or power <= 0:
            raise ValueError(f"polynomial schedule: power must be > 0; got {power}")
        return {"name": "polynomial", "power": float(power), "warmup_fraction": float(warmup_fraction)}
    if not milestones or gamma is None or not 0.0 < gamma < 1.0:
        raise ValueError(
            f"step schedule: needs milestones (epochs, e.g. [10, 16]) and 0 < gamma < 1; got {milestones}, {gamma}"
        )
    return {"name": "step", "milestones": [int(m) for m in milestones], "gamma": float(gamma)}
