"""The FastFace / Moving Haar learning-rate scheduler as a Lightning callback.

:class:`FastFaceLRCallback` is a thin shell around a detector of
:mod:`fastface_pl.scheduling.detectors` (docs/scheduler.md). It takes care of what a real training
loop adds (docs/lightning.md): one value per *optimizer* step under gradient accumulation, no host–device
synchronisation per step (the step losses are read in blocks of ``k`` steps), one reduction across
data-parallel ranks per block, non-finite losses, checkpoints that resume exactly, and logging.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from fastface_pl.scheduling.detectors import DETECTOR_NAMES, build_detector

__all__ = ["FastFaceLRCallback"]

NONFINITE_POLICIES = ("skip", "raise")
DEFAULT_PATIENCE_FRACTION = 0.05  # τ of the FastFace paper (docs/scheduler.md)

# Schedulers that recompute the LR from their base values when stepped (instead of multiplying the
# current LR): stepped at any interval they overwrite the callback's changes.
_RECOMPUTING_SCHEDULERS = (
    torch.optim.lr_scheduler.LambdaLR,
    torch.optim.lr_scheduler.OneCycleLR,
    torch.optim.lr_scheduler.CyclicLR,
    torch.optim.lr_scheduler.CosineAnnealingWarmRestarts,
)
_STATE_VERSION = 1


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_detector(obj: Any) -> bool:
    return all(callable(getattr(obj, name, None)) for name in ("update", "state_dict", "load_state_dict"))


class FastFaceLRCallback(Callback):
    """Schedule the learning rate from the training loss with the FastFace or Moving Haar detector.

    Every optimizer step the mean training loss of that step is fed to a detector; when the detector
    finds the loss stationary for more than ``patience`` steps it returns a factor (1/δ, or the
    Moving Haar restart factor δ^(R−1)) and the callback multiplies the LR of every parameter group of
    every optimizer by it. The callback owns the LR: it refuses a step-interval LR scheduler unless
    ``compose_with_step_schedulers=True``.

    Args:
        detector: ``"fastface"`` (docs/scheduler.md), ``"moving_haar"`` (docs/scheduler.md), or a detector instance
            (anything with ``update(loss) -> factor``, ``state_dict()`` and ``load_state_dict()``), which
            then carries its own patience.
        detector_kwargs: Keyword arguments of the named detector (α, β, λ, δ, K, or m, θ, R ...).
        patience: P, the patience in optimizer steps (a decision on the (P+1)-th consecutive
            stationary step).
        patience_fraction: τ, the patience as a fraction of the run's optimizer steps
            (``trainer.estimated_stepping_batches``), resolved when training starts: P = int(τ·T).
            Default for ``"fastface"`` when no patience is given: 0.05. For ``"moving_haar"`` the
            detector's default, 2·window, applies.
        min_lr: Floor of the LR: a decay never takes a parameter group below it (groups already below
            it are left alone). ``None``: no floor.
        sync_every_n_steps: k. The step losses stay on the device and are read (and, with several
            ranks, averaged across ranks) once every k optimizer steps. Decisions are the same as with
            k = 1 and take effect at most k−1 steps later.
        on_nonfinite: ``"skip"`` non-finite losses (they are counted and reported once at the end of
            training; the detector never sees them) or ``"raise"`` a ``FloatingPointError`` naming the
            step.
        log_signals: Log ``fastface/*`` (loss, smoothed_loss, signal, threshold, stationary_count,
            num_decisions, lr_scale, lr) through ``trainer.loggers`` every ``log_every_n_steps``.
        compose_with_step_schedulers: Allow LR schedulers that recompute the LR from their base values
            (every step-interval scheduler is taken to be one, e.g. ``LambdaLR``, ``OneCycleLR``; also
            epoch-interval ``LambdaLR``, ``OneCycleLR``, ``CyclicLR``, ``CosineAnnealingWarmRestarts``):
            after each optimizer step the callback sets the LR to the scheduler's LR times its own
            cumulative scale. Wrong for schedulers that multiply the current LR (``StepLR``,
            ``ExponentialLR`` ... at step interval): they would apply the scale twice.
        verbose: Report each decision (rank zero): the step, the reason and the new LR.

    Example::

        from lightning.pytorch import Trainer
        from fastface_pl import FastFaceLRCallback

        callback = FastFaceLRCallback("fastface", detector_kwargs={"threshold": 5e-5}, patience_fraction=0.05,
                                      sync_every_n_steps=16)
        trainer = Trainer(max_epochs=5, callbacks=[callback])
        trainer.fit(model, datamodule=datamodule)
        print(callback.decisions)  # [(optimizer_step, factor, new_lr), ...]

    .. note::
        Patience counts *optimizer* steps, not batches: with ``accumulate_grad_batches=N`` one step is
        N batches, and τ is a fraction of ``trainer.estimated_stepping_batches``. With manual
        optimization a step is a batch on which ``trainer.global_step`` advanced (once per batch, however
        many optimizers stepped), and ``training_step`` must return the loss. Epoch-interval
        schedulers that multiply the current LR (``StepLR``, ``MultiStepLR``, ``ExponentialLR``) compose
        with the callback as they are; with them the logged ``fastface/lr_scale`` is the callback's
        share of the LR.
    """

    def __init__(
        self,
        detector: Any = "fastface",
        detector_kwargs: dict[str, Any] | None = None,
        patience: int | None = None,
        patience_fraction: float | None = None,
        min_lr: float | None = None,
        sync_every_n_steps: int = 1,
        on_nonfinite: str = "skip",
        log_signals: bool = True,
        compose_with_step_schedulers: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if detector_kwargs is not None and not isinstance(detector_kwargs, Mapping):
            raise ValueError(f"detector_kwargs must be a dict or None; got {type(detector_kwargs).__name__}")
        detector_kwargs = dict(detector_kwargs or {})
        if patience is not None and patience_fraction is not None:
            raise ValueError(
                f"give either patience (optimizer steps) or patience_fraction (τ), not both; "
                f"got patience={patience}, patience_fraction={patience_fraction}"
            )
        if patience is not None and (not _is_int(patience) or patience < 0):
            raise ValueError(f"patience must be an integer >= 0 (optimizer steps) or None; got {patience!r}")
        if patience_fraction is not None and (not _is_real(patience_fraction) or not 0.0 < patience_fraction <= 1.0):
            raise ValueError(f"patience_fraction (τ) must be in (0, 1] or None; got {patience_fraction!r}")
        if min_lr is not None and (not _is_real(min_lr) or not 0.0 <= min_lr < math.inf):
            raise ValueError(f"min_lr must be a finite number >= 0 or None; got {min_lr!r}")
        if not _is_int(sync_every_n_steps) or sync_every_n_steps < 1:
            raise ValueError(f"sync_every_n_steps (k) must be an integer >= 1; got {sync_every_n_steps!r}")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}; got {on_nonfinite!r}")
        for name, value in (
            ("log_signals", log_signals),
            ("compose_with_step_schedulers", compose_with_step_schedulers),
            ("verbose", verbose),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False; got {value!r}")

        self._detector: Any = None
        if isinstance(detector, str):
            if detector not in DETECTOR_NAMES:
                raise ValueError(
                    f"detector must be one of {', '.join(DETECTOR_NAMES)} or a detector instance; got {detector!r}"
                )
            if "patience" in detector_kwargs and (patience is not None or patience_fraction is not None):
                raise ValueError(
                    "patience is given twice: in detector_kwargs and as patience/patience_fraction; keep one"
                )
            if patience is not None:
                detector_kwargs["patience"] = int(patience)
            if detector == "fastface" and "patience" not in detector_kwargs and patience_fraction is None:
                patience_fraction = DEFAULT_PATIENCE_FRACTION
            if patience_fraction is None:
                # Fully specified: build now, so bad detector arguments fail here.
                self._detector = build_detector(detector, **detector_kwargs)
            else:
                # Patience is resolved at fit start; check the other arguments now with a probe.
                build_detector(detector, **detector_kwargs, patience=0)
            self._detector_name = detector
        elif _is_detector(detector):
            if detector_kwargs:
                raise ValueError("detector_kwargs only apply to a detector given by name; got a detector instance")
            if patience is not None or patience_fraction is not None:
                raise ValueError(
                    "a detector instance carries its own patience; do not pass patience or patience_fraction with "
                    f"it (got patience={patience}, patience_fraction={patience_fraction})"
                )
            self._detector = detector
            self._detector_name = type(detector).__name__
        else:
            raise ValueError(
                f"detector must be one of {', '.join(DETECTOR_NAMES)} or an object with update(), state_dict() and "
                f"load_state_dict(); got {type(detector).__name__}"
            )

        self._detector_kwargs = detector_kwargs
        self._patience_fraction = None if patience_fraction is None else float(patience_fraction)
        self.min_lr = None if min_lr is None else float(min_lr)
        self.sync_every_n_steps = sync_every_n_steps
        self.on_nonfinite = on_nonfinite
        self.log_signals = log_signals
        self.compose_with_step_schedulers = compose_with_step_schedulers
        self.verbose = verbose
        self._state_key = self._make_state_key()

        # Run state (all of it goes into checkpoints).
        self._steps = 0  # optimizer steps observed (1-based index of the last one)
        self._decisions: list[tuple[int, float, float]] = []
        self._lr_scale = 1.0
        self._nonfinite_count = 0
        self._first_nonfinite_step: int | None = None
        self._missing_loss_count = 0
        # Micro-batch losses not yet read, as Lightning hands them over (0-d tensors, on the device): first
        # those of the completed steps in ``_pending_steps``, then the ``_window_count`` of the current step.
        self._micro_losses: list[torch.Tensor] = []
        self._pending_steps: list[tuple[int, int, float]] = []  # (optimizer step, micro-batches, multiplier)
        self._window_count = 0
        # Transient.
        self._loaded_state: dict[str, Any] | None = None
        self._last_global_step = 0
        self._loss_divisor = 1
        self._composed: list[tuple[torch.optim.Optimizer, Any]] = []

    # ------------------------------------------------------------------ properties
    @property
    def detector(self) -> Any:
        """The detector (``None`` until training starts when the patience is a fraction τ)."""
        return self._detector

    @property
    def decisions(self) -> list[tuple[int, float, float]]:
        """Decisions so far: ``(optimizer_step, factor, new_lr)`` with the LR of the first param group."""
        return list(self._decisions)

    @property
    def lr_scale(self) -> float:
        """Product of all factors applied so far (the callback's share of the LR)."""
        return self._lr_scale

    @property
    def nonfinite_count(self) -> int:
        """Number of optimizer steps whose loss was NaN or infinite (not fed to the detector)."""
        return self._nonfinite_count

    @property
    def steps_observed(self) -> int:
        """Optimizer steps observed so far (fed or not yet read)."""
        return self._steps

    @property
    def state_key(self) -> str:
        # Lightning reads this for every hook call (profiler names): computed once, in __init__.
        return self._state_key

    def _make_state_key(self) -> str:
        if self._detector_name in DETECTOR_NAMES:
            identity: dict[str, Any] = {"detector_kwargs": sorted(self._detector_kwargs.items())}
        else:  # an instance: its class and the settings that tell two apart
            identity = {key: getattr(self._detector, key, None) for key in ("patience", "threshold", "window")}
        return self._generate_state_key(
            detector=self._detector_name, patience_fraction=self._patience_fraction, **identity
        )

    # ------------------------------------------------------------------ fit start
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.optimizers:
            raise MisconfigurationException(
                "FastFaceLRCallback needs an optimizer, but configure_optimizers returned none"
            )
        self._check_schedulers(trainer)

    def _check_schedulers(self, trainer: Trainer) -> None:
        self._composed = []
        for config in trainer.lr_scheduler_configs:
            if config.reduce_on_plateau:
                continue
            scheduler = config.scheduler
            if config.interval != "step" and not isinstance(scheduler, _RECOMPUTING_SCHEDULERS):
                continue  # epoch-interval and multiplicative: composes with the callback as it is
            if not self.compose_with_step_schedulers:
                raise MisconfigurationException(
                    f"FastFaceLRCallback owns the learning rate, but a {type(scheduler).__name__} is configured with "
                    f'interval="{config.interval}". Lightning steps it before the callback sees the loss, and a '
                    "scheduler that recomputes the LR from its base values (LambdaLR, OneCycleLR, ...) would undo "
                    "every decision of the callback. Remove the scheduler, step a multiplicative one (StepLR, "
                    'MultiStepLR, ExponentialLR) with interval="epoch", or, if it recomputes the LR from its base '
                    "values, pass FastFaceLRCallback(compose_with_step_schedulers=True): the callback then sets "
                    "the LR to the scheduler's LR times its own cumulative scale after every optimizer step."
                )
            self._composed.append((scheduler.optimizer, scheduler))

    # ------------------------------------------------------------------ train start (after any restore)
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaded, self._loaded_state = self._loaded_state, None
        if self._detector is None:
            patience = loaded.get("patience") if loaded else None
            if patience is None:
                total = trainer.estimated_stepping_batches
                if not math.isfinite(total) or total < 1:
                    raise MisconfigurationException(
                        f"patience_fraction={self._patience_fraction} needs the run length, but "
                        f"trainer.estimated_stepping_batches is {total} (unknown: an iterable dataset without "
                        "max_steps, or max_epochs=-1); set Trainer(max_steps=...) or give patience in steps"
                    )
                patience = int(self._patience_fraction * total)
            self._detector = build_detector(self._detector_name, **self._detector_kwargs, patience=patience)
        if loaded:
            self._restore(loaded, device=pl_module.device)
        self._last_global_step = trainer.global_step
        self._loss_divisor = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        if self._composed:
            self._apply_composed()

    # ------------------------------------------------------------------ per batch
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The hot path: two list appends per batch, no device work, no synchronisation. Lightning hands over
        # a detached 0-d loss (a fresh tensor in automatic optimization, not modified afterwards).
        loss = outputs.get("loss") if type(outputs) is dict or isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._micro_losses.append(loss)
            self._window_count += 1
        global_step = trainer.global_step  # a chain of properties: read it once
        if global_step == self._last_global_step:
            return  # accumulating: the optimizer did not step on this batch
        self._last_global_step = global_step
        self._steps += 1
        if self._window_count == 0:
            self._missing_loss_count += 1
            if self._missing_loss_count == 1:
                rank_zero_warn(
                    f"FastFaceLRCallback: training_step returned no loss at optimizer step {self._steps}; such steps "
                    "are skipped. Return the loss tensor (or a dict with a 'loss' key) from training_step."
                )
        else:
            # Lightning divides every micro-batch loss by accumulate_grad_batches N, also in the short last
            # window of an epoch: the step's value is sum(micro losses) · N / (micro-batches in the window).
            self._pending_steps.append((self._steps, self._window_count, self._loss_divisor / self._window_count))
            self._window_count = 0
        if self._composed:
            self._apply_composed()
        if len(self._pending_steps) >= self.sync_every_n_steps:
            self._read_block(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending_steps:
            self._read_block(trainer)
        if self._nonfinite_count:
            rank_zero_warn(
                f"FastFaceLRCallback skipped {self._nonfinite_count} optimizer step(s) with a non-finite training "
                f"loss (first at step {self._first_nonfinite_step}); the detector never saw them. Pass "
                "on_nonfinite='raise' to stop at the first one."
            )

    # ------------------------------------------------------------------ block reading
    def _read_block(self, trainer: Trainer) -> None:
        pending, self._pending_steps = self._pending_steps, []
        num_read = len(self._micro_losses) - self._window_count
        tensors, self._micro_losses = self._micro_losses[:num_read], self._micro_losses[num_read:]
        micro = self._read_values(trainer, tensors)
        log_every = trainer.log_every_n_steps if self.log_signals else 0
        to_log: list[tuple[int, dict[str, float]]] = []
        start = 0
        for step, count, multiplier in pending:
            chunk = micro[start : start + count]
            start += count
            value = (chunk[0] if count == 1 else sum(chunk)) * multiplier
            if not math.isfinite(value):
                if self.on_nonfinite == "raise":
                    raise FloatingPointError(
                        f"FastFaceLRCallback: the training loss at optimizer step {step} is {value}. Fix the "
                        "divergence (lower LR, gradient clipping) or pass on_nonfinite='skip' to skip such steps."
                    )
                self._nonfinite_count += 1
                if self._first_nonfinite_step is None:
                    self._first_nonfinite_step = step
            else:
                factor = self._detector.update(value)
                if factor != 1.0:
                    self._decide(trainer, step, factor)
            if log_every > 0 and step % log_every == 0:
                to_log.append((step, self._signals(trainer, value)))
        if to_log and trainer.is_global_zero:
            for step, metrics in to_log:
                for logger in trainer.loggers:
                    # Lightning logs optimizer step s (1-based) under step s-1 (batches that stepped before it).
                    logger.log_metrics(metrics, step=step - 1)

    @staticmethod
    def _read_values(trainer: Trainer, tensors: list[torch.Tensor]) -> list[float]:
        """Stack, average across ranks (one reduction), read to the host (one transfer)."""
        if not tensors:
            return []
        if len(tensors) == 1 and trainer.world_size == 1:
            return [tensors[0].item()]  # k = 1: the synchronisation of every step
        with torch.no_grad():
            block = torch.stack(tensors).float()  # a new tensor: strategy.reduce works in place on it
            if trainer.world_size > 1:
                block = trainer.strategy.reduce(block, reduce_op="mean")
            return block.tolist()  # the one device->host synchronisation of the block

    def _decide(self, trainer: Trainer, step: int, factor: float) -> None:
        self._lr_scale *= factor
        if self._composed:
            self._apply_composed()
        composed = {id(optimizer) for optimizer, _ in self._composed}
        for optimizer in trainer.optimizers:
            if id(optimizer) in composed:
                continue
            for group in optimizer.param_groups:
                group["lr"] = self._floor(group["lr"] * factor, group["lr"])
        new_lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self._decisions.append((step, float(factor), new_lr))
        if self.verbose:
            rank_zero_info(
                f"FastFaceLRCallback: optimizer step {step}: {self._reason(factor)}; "
                f"LR ×{factor:g} -> {new_lr:.6g} (from step {self._steps + 1})"
            )

    def _reason(self, factor: float) -> str:
        detector = self._detector
        patience = getattr(detector, "patience", None)
        if factor > 1.0:
            return f"restart ×{factor:g} (still stationary after {patience} more steps)"
        signal, threshold = getattr(detector, "signal", None), getattr(detector, "threshold", None)
        if signal is None or threshold is None or patience is None:
            return "loss stationary"
        return f"loss stationary for {patience + 1} steps: signal {signal:.4g} < threshold {threshold:.4g}"

    def _floor(self, new_lr: float, old_lr: float) -> float:
        if self.min_lr is None or new_lr >= old_lr:
            return new_lr
        return max(new_lr, min(old_lr, self.min_lr))

    def _apply_composed(self) -> None:
        for optimizer, scheduler in self._composed:
            for group, scheduled_lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = self._floor(scheduled_lr * self._lr_scale, scheduled_lr)

    def _signals(self, trainer: Trainer, value: float) -> dict[str, float]:
        detector = self._detector
        metrics: dict[str, float] = {}
        if math.isfinite(value):
            metrics["fastface/loss"] = value
        for key in ("smoothed_loss", "signal", "threshold", "stationary_count", "num_decisions"):
            item = getattr(detector, key, None)
            if item is not None:
                metrics[f"fastface/{key}"] = float(item)
        metrics["fastface/lr_scale"] = self._lr_scale
        metrics["fastface/lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        # Reading the unread losses here costs one synchronisation per checkpoint, not per step.
        with torch.no_grad():
            unread = torch.stack(self._micro_losses).float().tolist() if self._micro_losses else []
        return {
            "version": _STATE_VERSION,
            "detector_name": self._detector_name,
            "detector": None if self._detector is None else self._detector.state_dict(),
            "patience": None if self._detector is None else getattr(self._detector, "patience", None),
            "steps": self._steps,
            "decisions": [list(d) for d in self._decisions],
            "lr_scale": self._lr_scale,
            "nonfinite_count": self._nonfinite_count,
            "first_nonfinite_step": self._first_nonfinite_step,
            "missing_loss_count": self._missing_loss_count,
            # Not yet fed: the micro-batch losses of the pending steps, then those of the step in progress.
            "pending_steps": [list(p) for p in self._pending_steps],
            "pending_values": unread[: len(unread) - self._window_count],
            "accum_values": unread[len(unread) - self._window_count :],
        }

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # With several ranks each holds its own unread losses, and only rank 0's checkpoint is written: store
        # their mean across ranks instead, computed as the block read would. After a resume every rank holds
        # that mean, and reducing it again gives it back. This is a collective: Lightning saves on every rank;
        # skip it when the run is failing (an exception may have reached only some ranks).
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if (
            state is None
            or trainer.world_size <= 1
            or trainer.state.status != TrainerStatus.RUNNING
            or not torch.distributed.is_available()
            or not torch.distributed.is_initialized()
            or not self._micro_losses
        ):
            return
        reduced = self._read_values(trainer, list(self._micro_losses))
        split = len(reduced) - self._window_count
        state["pending_values"], state["accum_values"] = reduced[:split], reduced[split:]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_train_start, after the trainer has restored everything (the order differs by strategy).
        self._loaded_state = dict(state_dict)

    def _restore(self, state: dict[str, Any], device: torch.device) -> None:
        if state.get("detector") is not None:
            self._detector.load_state_dict(state["detector"])
        self._steps = int(state.get("steps", 0))
        self._decisions = [(int(s), float(f), float(lr)) for s, f, lr in state.get("decisions", [])]
        self._lr_scale = float(state.get("lr_scale", 1.0))
        self._nonfinite_count = int(state.get("nonfinite_count", 0))
        self._first_nonfinite_step = state.get("first_nonfinite_step")
        self._missing_loss_count = int(state.get("missing_loss_count", 0))
        pending = [(int(step), int(count), float(mult)) for step, count, mult in state.get("pending_steps", [])]
        pending_values = [float(v) for v in state.get("pending_values", [])]
        accum_values = [float(v) for v in state.get("accum_values", [])]
        if sum(count for _, count, _ in pending) != len(pending_values):
            pending, pending_values = [], []  # inconsistent (hand-edited) state: drop the unread steps
        self._pending_steps = pending
        self._window_count = len(accum_values)
        values = pending_values + accum_values
        self._micro_losses = list(torch.tensor(values, dtype=torch.float32, device=device).unbind(0)) if values else []
