"""The FastFace / Moving Haar learning-rate scheduler as a Lightning callback.

:class:`FastFaceLRCallback` is the thin Lightning layer over
:class:`~fastface_pl.scheduling.lr_scheduler.FastFaceLR`, which owns the LR (patience, factor, floor,
non-finite losses, decisions, state). The callback adds what a Lightning run needs (docs/lightning.md):
one value per *optimizer* step under gradient accumulation, no host–device synchronisation per step
(the step losses are read in blocks of ``k`` steps), one reduction across data-parallel ranks per block,
logging of the LR in effect, checkpoints that resume exactly, a check that no other LR scheduler undoes
its decisions, and the run length T (P = int(τ·T), recomputed when a resumed run is longer or shorter).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from fastface_pl.scheduling.auto import AutoFastFaceDetector
from fastface_pl.scheduling.detectors import Detector, build_detector, detector_class
from fastface_pl.scheduling.lr_scheduler import (
    DEFAULT_PATIENCE_FRACTION,
    NONFINITE_POLICIES,
    FastFaceLR,
    check_detector_arguments,
    uses_auto_settings,
)
from fastface_pl.validation import check_bool, check_choice, check_int, check_real

__all__ = ["FastFaceLRCallback", "DEFAULT_PATIENCE_FRACTION"]

_STATE_VERSION = 2

# Schedulers that only ever multiply the current LR when Lightning steps them: at epoch interval they
# compose with the callback's decisions as they are. Exact types: a subclass may recompute.
_lr = torch.optim.lr_scheduler
_MULTIPLICATIVE = (_lr.StepLR, _lr.MultiStepLR, _lr.ExponentialLR, _lr.MultiplicativeLR, _lr.ConstantLR,
                   _lr.LinearLR, _lr.PolynomialLR)


def _inner_schedulers(scheduler: Any) -> list[Any]:
    """The schedulers a wrapper (SequentialLR, ChainedScheduler or any other) holds, found among its attributes."""
    found = []
    for value in vars(scheduler).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        found += [item for item in items if isinstance(item, _lr.LRScheduler) and item is not scheduler]
    return found


def _describe(scheduler: Any) -> str:
    inner = _inner_schedulers(scheduler)
    return type(scheduler).__name__ + (f"({', '.join(_describe(s) for s in inner)})" if inner else "")


def _composes_as_is(scheduler: Any) -> bool:
    """Whether an epoch-interval scheduler only multiplies the current LR (wrappers looked through)."""
    if type(scheduler) in _MULTIPLICATIVE:
        return True
    if type(scheduler) is _lr.ChainedScheduler:  # steps each inner one in turn: multiplicative if they all are
        return all(_composes_as_is(inner) for inner in _inner_schedulers(scheduler))
    return False  # SequentialLR resets its inner schedulers at milestones; any other may recompute


class FastFaceLRCallback(Callback):
    """Schedule the learning rate from the training loss with the FastFace or Moving Haar detector.

    Every optimizer step the mean training loss of that step is fed to a detector; when the detector
    finds the loss stationary for more than ``patience`` steps it returns a factor (1/δ, or the
    Moving Haar restart factor δ^(R−1)) and the LR of every parameter group of every optimizer is
    multiplied by it. The callback owns the LR: it refuses an LR scheduler that would undo its decisions
    unless ``compose_with_step_schedulers=True``.

    Args:
        detector: ``"fastface"``, ``"moving_haar"`` (docs/scheduler.md), or a detector instance
            (:class:`~fastface_pl.scheduling.detectors.Detector`), which then carries its own patience.
        detector_kwargs: Keyword arguments of the named detector (α, β, λ, δ, K, or m, θ, R ...).
        patience: P, the patience in optimizer steps (a decision on the (P+1)-th consecutive
            stationary step).
        patience_fraction: τ, the patience as a fraction of the run's optimizer steps T: P = int(τ·T),
            resolved when training starts and again when a resumed run has another length. Default for
            ``"fastface"`` when no patience is given: 0.05. For ``"moving_haar"`` the detector's default,
            2·window, applies.
        min_lr: Floor of the LR: a decay never takes a parameter group below it (groups already below
            it are left alone). ``None``: no floor.
        sync_every_n_steps: k. The step losses stay on the device and are read (and, with several
            ranks, averaged across ranks) once every k optimizer steps. Decisions are the same as with
            k = 1 and take effect at most k−1 steps later.
        on_nonfinite: ``"skip"`` non-finite losses (they are counted and reported once at the end of
            training; the detector never sees them) or ``"raise"``
            :class:`~fastface_pl.scheduling.detectors.NonFiniteLossError` naming the step.
        log_signals: Log ``fastface/*`` (loss, smoothed_loss, signal, threshold, stationary_count,
            num_decisions, lr_scale, and lr: the LR that step ran with) through ``trainer.loggers``
            every ``log_every_n_steps``.
        compose_with_step_schedulers: Let another LR scheduler set the LR (a step-interval warm-up such
            as ``LinearLR`` or ``LambdaLR``, ``OneCycleLR``, ``SequentialLR`` ...): its LR is left to it,
            and the callback's decisions are applied as a scale on top of it while each optimizer steps.
        verbose: Report each decision (rank zero): the step, the reason and the new LR.
        name: Tells two callbacks of the same detector type apart in checkpoints (``state_key``).

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
        N batches. With manual optimization a step is a batch on which ``trainer.global_step`` advanced
        (however many optimizers stepped), and ``training_step`` must return the loss. Epoch-interval
        schedulers that multiply the current LR (``StepLR``, ``MultiStepLR``, ``ExponentialLR`` ...)
        compose with the callback as they are; with them ``fastface/lr_scale`` is the callback's share.
        Under ``ddp_spawn`` the training runs in spawned processes: the callback object of the
        launching process holds no decisions afterwards (read them from the checkpoint or the logs).
    """

    def __init__(
        self,
        detector: str | Detector = "fastface",
        detector_kwargs: Mapping[str, Any] | None = None,
        patience: int | None = None,
        patience_fraction: float | None = None,
        min_lr: float | None = None,
        sync_every_n_steps: int = 1,
        on_nonfinite: str = "skip",
        log_signals: bool = True,
        compose_with_step_schedulers: bool = False,
        verbose: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self._detector_name, self._detector_kwargs, self._patience_fraction = check_detector_arguments(
            detector, detector_kwargs, patience, patience_fraction)
        self.min_lr = check_real("min_lr", min_lr, 0.0, low_open=False, allow_none=True)
        self.sync_every_n_steps = check_int("sync_every_n_steps", sync_every_n_steps, 1)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        self.log_signals = check_bool("log_signals", log_signals)
        self.compose_with_step_schedulers = check_bool("compose_with_step_schedulers", compose_with_step_schedulers)
        self.verbose = check_bool("verbose", verbose)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string or None, got {type(name).__name__}")
        self.name = name
        # The detector as soon as its settings are known (an instance; a named one with P in steps).
        self._detector: Detector | None = detector if self._detector_name is None else None
        if self._detector is None and self._patience_fraction is None:
            self._detector = build_detector(self._detector_name, **self._detector_kwargs)
        # What a resumed run applies over the checkpoint's detector settings (P from τ is resolved separately).
        self._configured_settings = self._settings_to_apply(detector)
        self._state_key = self._generate_state_key(
            detector=self._detector_name or type(detector).__name__, **({"name": name} if name else {}))

        self._scheduler: FastFaceLR | None = None  # the owner of the LR, built when training starts
        self._loaded: dict[str, Any] | None = None  # a loaded state, until the scheduler takes it over
        self._settings_reconciled = True
        # Run state (all of it goes into checkpoints).
        self._steps = 0  # optimizer steps observed (1-based index of the last one)
        self._missing_loss_count = 0
        # Micro-batch losses not yet read, as Lightning hands them over (0-d tensors, on the device): first
        # those of the completed steps in ``_pending_steps``, then the ``_window_count`` of the current step.
        self._micro_losses: list[torch.Tensor] = []
        self._pending_steps: list[tuple[int, int, float, float]] = []  # (step, micro-batches, multiplier, lr)
        self._window_count = 0
        self._unread_values: list[float] = []
        # Transient.
        self._last_global_step = 0
        self._loss_divisor = 1
        self._next_lr = math.nan  # the LR the next optimizer step uses
        self._composed: list[torch.optim.Optimizer] = []

    # ------------------------------------------------------------------ properties
    @property
    def detector(self) -> Detector | None:
        """The detector (``None`` until training starts when the patience is a fraction τ and no state is loaded)."""
        return self._scheduler.detector if self._scheduler is not None else self._detector

    @property
    def scheduler(self) -> FastFaceLR | None:
        """The :class:`FastFaceLR` that owns the LR (built when training starts)."""
        return self._scheduler

    @property
    def decisions(self) -> list[tuple[int, float, float]]:
        """Decisions so far: ``(optimizer_step, factor, new_lr)`` with the LR of the first param group."""
        if self._scheduler is not None:
            return list(self._scheduler.decisions)
        return [(int(s), float(f), float(lr)) for s, f, lr in self._scheduler_state().get("decisions", [])]

    @property
    def lr_scale(self) -> float:
        """Product of all factors applied so far (the callback's share of the LR)."""
        if self._scheduler is not None:
            return self._scheduler.lr_scale
        return float(self._scheduler_state().get("lr_scale", 1.0))

    @property
    def nonfinite_count(self) -> int:
        """Number of optimizer steps whose loss was NaN or infinite (not fed to the detector)."""
        if self._scheduler is not None:
            return self._scheduler.num_nonfinite
        return int(self._scheduler_state().get("num_nonfinite", 0))

    @property
    def steps_observed(self) -> int:
        """Optimizer steps observed so far (fed or not yet read)."""
        return self._steps

    @property
    def state_key(self) -> str:
        """The detector type plus ``name``: stable when settings change, so a resume always finds its state."""
        return self._state_key

    def _settings_to_apply(self, detector: Any) -> dict[str, Any]:
        if self._detector_name is None:
            return dict(detector.hyperparameters)
        if self._patience_fraction is None:
            return build_detector(self._detector_name, **self._detector_kwargs).hyperparameters
        if uses_auto_settings(self._detector_name, self._detector_kwargs):  # α, β, λ, P from the run
            settings = AutoFastFaceDetector(1, self._patience_fraction, **self._detector_kwargs).hyperparameters
            del settings["total_steps"]  # resolved for the run length
            return settings
        settings = build_detector(self._detector_name, **{"patience": 0, **self._detector_kwargs}).hyperparameters
        del settings["patience"]  # P = int(τ·T), resolved for the run length
        return settings

    def _scheduler_state(self) -> dict[str, Any]:
        return (self._loaded or {}).get("scheduler") or {}

    # ------------------------------------------------------------------ fit start
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.optimizers:
            raise MisconfigurationException("FastFaceLRCallback needs an optimizer, but configure_optimizers "
                                            "returned none")
        self._composed = self._check_schedulers(trainer)

    def _check_schedulers(self, trainer: Trainer) -> list[torch.optim.Optimizer]:
        composed = []
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if config.reduce_on_plateau or (config.interval == "epoch" and _composes_as_is(scheduler)):
                continue
            if not self.compose_with_step_schedulers:
                raise MisconfigurationException(
                    f'FastFaceLRCallback owns the learning rate, but a {_describe(scheduler)} is configured with '
                    f'interval="{config.interval}": it would undo the callback\'s decisions (a step-interval '
                    "scheduler such as a LinearLR or LambdaLR warm-up sets the LR every step; SequentialLR, "
                    "OneCycleLR, CosineAnnealingWarmRestarts and the like recompute it from their base values). "
                    "Remove it, step a multiplicative one (StepLR, MultiStepLR, ExponentialLR) with "
                    'interval="epoch", or pass FastFaceLRCallback(compose_with_step_schedulers=True): the '
                    "scheduler then sets the LR and the callback's decisions scale it while the optimizer steps."
                )
            if all(scheduler.optimizer is not other for other in composed):
                composed.append(scheduler.optimizer)
        return composed

    # ------------------------------------------------------------------ train start (after any restore)
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The state to continue from: a loaded checkpoint's, else that of an earlier fit of this callback.
        if self._loaded is not None:
            state = self._loaded.get("scheduler")
        else:
            state = self._scheduler.state_dict() if self._scheduler is not None else None
        detector = self._scheduler.detector if self._scheduler is not None else self._detector
        self._close_scheduler()
        total = self._run_length(trainer, global_steps_per_step=1) if detector is None else None
        self._scheduler = FastFaceLR(
            list(trainer.optimizers),
            detector if detector is not None else self._detector_name,
            self._detector_kwargs if detector is None else None,
            patience_fraction=self._patience_fraction if detector is None else None,
            total_steps=total, min_lr=self.min_lr, on_nonfinite=self.on_nonfinite, compose=self._composed,
            warn_nonfinite=False,
        )
        if state:
            self._scheduler.load_state_dict(state)
        self._loaded = None
        if self._unread_values:  # losses restored from a checkpoint, not yet fed: onto the module's device
            self._micro_losses = list(torch.tensor(self._unread_values, dtype=torch.float32,
                                                   device=pl_module.device).unbind(0))
        self._unread_values = []
        # Settings that changed since the checkpoint and P for this run length: with automatic optimization T is
        # known now; with manual optimization once the first step shows how many optimizer.step() calls it made.
        self._settings_reconciled = False
        if pl_module.automatic_optimization:
            self._reconcile_settings(trainer, global_steps_per_step=1)
        self._last_global_step = trainer.global_step
        self._loss_divisor = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        self._next_lr = self._scheduler.lr_in_effect()

    def _run_length(self, trainer: Trainer, global_steps_per_step: int) -> int:
        """T: the optimizer steps (in the callback's sense) of the whole run, for P = int(τ·T).

        ``trainer.estimated_stepping_batches`` counts ``global_step``, which advances once per
        ``optimizer.step()`` call: with manual optimization and n optimizers stepping per batch, n times
        per callback step.
        """
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise MisconfigurationException(
                f"patience_fraction={self._patience_fraction} needs the run length, but "
                f"trainer.estimated_stepping_batches is {total} (unknown: an iterable dataset without "
                "max_steps, or max_epochs=-1); set Trainer(max_steps=...) or give patience in steps")
        if global_steps_per_step == 1:
            return int(total)
        by_steps = math.ceil(trainer.max_steps / global_steps_per_step) if trainer.max_steps != -1 else math.inf
        batches = trainer.num_training_batches
        by_epochs = batches * max(trainer.max_epochs or 1, 1) if math.isfinite(batches) else math.inf
        return max(int(min(by_steps, by_epochs)), 1)

    def _reconcile_settings(self, trainer: Trainer, global_steps_per_step: int) -> None:
        """Applies this callback's detector settings over a restored state and resolves P for this run."""
        self._settings_reconciled = True
        scheduler = self._scheduler
        changes = scheduler.reconfigure(**self._configured_settings)
        scheduler.patience_fraction = self._patience_fraction if self._detector_name is not None else None
        if scheduler.patience_fraction is not None:
            previous_total = scheduler.total_steps
            total = self._run_length(trainer, global_steps_per_step)
            recomputed = scheduler.set_total_steps(total)
            if "total_steps" in recomputed and scheduler.detector.steps_seen > 0:
                rank_zero_info(
                    f"FastFaceLRCallback: this run is T = {total} optimizer steps (the checkpoint had "
                    f"{recomputed['total_steps'][0]}); the auto settings are resolved again for it.")
            elif recomputed and scheduler.detector.steps_seen > 0:
                old, new = recomputed["patience"]
                was = f"T = {previous_total}, P = {old}" if previous_total is not None else f"P = {old}"
                rank_zero_info(
                    f"FastFaceLRCallback: this run is T = {total} optimizer steps, so the patience P = int(τ·T) "
                    f"with τ = {scheduler.patience_fraction} is now {new} (the checkpoint had {was}).")
        if changes and scheduler.detector.steps_seen > 0:
            listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
            rank_zero_info(f"FastFaceLRCallback: resumed with changed detector settings ({listed}); the detector "
                           "continues from its saved state with the new values.")

    def _close_scheduler(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close_scheduler()  # the optimizer step hooks of compose_with_step_schedulers

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close_scheduler()

    # ------------------------------------------------------------------ per batch
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The hot path: list appends per batch, no device work, no synchronisation. Lightning hands over a
        # detached 0-d loss (a fresh tensor in automatic optimization, not modified afterwards).
        loss = outputs.get("loss") if type(outputs) is dict or isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._micro_losses.append(loss)
            self._window_count += 1
        global_step = trainer.global_step
        if global_step == self._last_global_step:
            return  # accumulating: the optimizer did not step on this batch
        if not self._settings_reconciled:
            self._reconcile_settings(trainer, global_steps_per_step=global_step - self._last_global_step)
        self._last_global_step = global_step
        self._steps += 1
        if self._window_count == 0:
            self._missing_loss_count += 1
            if self._missing_loss_count == 1:
                rank_zero_warn(
                    f"FastFaceLRCallback: training_step returned no loss at optimizer step {self._steps}; such steps "
                    "are skipped. Return the loss tensor (or a dict with a 'loss' key) from training_step.")
        else:
            # Lightning divides every micro-batch loss by accumulate_grad_batches N, also in the short last
            # window of an epoch: the step's value is sum(micro losses) · N / (micro-batches in the window).
            self._pending_steps.append(
                (self._steps, self._window_count, self._loss_divisor / self._window_count, self._next_lr))
            self._window_count = 0
        if len(self._pending_steps) >= self.sync_every_n_steps:
            self._read_block(trainer)
        if self.log_signals:
            self._next_lr = self._scheduler.lr_in_effect()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending_steps:
            self._read_block(trainer)
        if self.nonfinite_count:
            rank_zero_warn(
                f"FastFaceLRCallback skipped {self.nonfinite_count} optimizer step(s) with a non-finite training "
                f"loss (first at step {self._scheduler.first_nonfinite_step}); the detector never saw them. Pass "
                "on_nonfinite='raise' to stop at the first one.")

    # ------------------------------------------------------------------ block reading
    def _read_block(self, trainer: Trainer) -> None:
        pending, self._pending_steps = self._pending_steps, []
        num_read = len(self._micro_losses) - self._window_count
        tensors, self._micro_losses = self._micro_losses[:num_read], self._micro_losses[num_read:]
        micro = self._read_values(trainer, tensors)
        log_every = trainer.log_every_n_steps if self.log_signals else 0
        to_log: list[tuple[int, dict[str, float]]] = []
        start = 0
        for step, count, multiplier, lr_used in pending:
            chunk = micro[start : start + count]
            start += count
            value = (chunk[0] if count == 1 else sum(chunk)) * multiplier
            factor = self._scheduler.step(value, step=step)
            if factor != 1.0 and self.verbose:
                self._report(step, factor)
            if log_every > 0 and step % log_every == 0:
                to_log.append((step, self._signals(value, lr_used)))
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

    def _report(self, step: int, factor: float) -> None:
        detector = self._scheduler.detector
        if factor > 1.0:
            reason = f"restart ×{factor:g} (still stationary after {detector.patience} more steps)"
        elif detector.signal is None:
            reason = "loss stationary"
        else:
            reason = (f"loss stationary for {detector.patience + 1} steps: signal {detector.signal:.4g} < "
                      f"threshold {detector.threshold:.4g}")
        new_lr = self._scheduler.lr_in_effect()
        rank_zero_info(f"FastFaceLRCallback: optimizer step {step}: {reason}; LR ×{factor:g} -> {new_lr:.6g} "
                       f"(from step {self._steps + 1})")

    def _signals(self, value: float, lr_used: float) -> dict[str, float]:
        detector = self._scheduler.detector
        metrics = {"fastface/loss": value} if math.isfinite(value) else {}
        for key in ("smoothed_loss", "signal", "threshold", "stationary_count", "num_decisions"):
            item = getattr(detector, key)
            if item is not None:
                metrics[f"fastface/{key}"] = float(item)
        metrics["fastface/lr_scale"] = self._scheduler.lr_scale
        metrics["fastface/lr"] = lr_used
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._scheduler is None:  # not trained yet in this process: what was loaded, or a fresh state
            if self._loaded is not None:
                return dict(self._loaded)
            return {"version": _STATE_VERSION, "detector_name": self._detector_name, "scheduler": None,
                    "steps": self._steps, "missing_loss_count": self._missing_loss_count}
        # Reading the unread losses here costs one synchronisation per checkpoint, not per step.
        with torch.no_grad():
            unread = torch.stack(self._micro_losses).float().tolist() if self._micro_losses else []
        return {
            "version": _STATE_VERSION,
            "detector_name": self._detector_name,
            "scheduler": self._scheduler.state_dict(),
            "steps": self._steps,
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
        """Takes a state at once (``decisions``, ``detector`` ... show it); training continues from it."""
        state = _upgrade_state(dict(state_dict))
        if self._scheduler is not None:
            self._close_scheduler()
            self._scheduler = None
        self._loaded = state
        detector_state = (state.get("scheduler") or {}).get("detector")
        if detector_state is not None:
            if self._detector_name is not None:
                if detector_state.get("type") != detector_class(self._detector_name).__name__:
                    raise ValueError(
                        f"the checkpoint's FastFaceLRCallback state holds a {detector_state.get('type')!r} detector, "
                        f"this callback runs {self._detector_name!r}; resume with the same detector or start afresh")
                self._detector = build_detector(self._detector_name, **{"patience": 0, **self._detector_kwargs})
            self._detector.load_state_dict(detector_state)
        self._steps = int(state.get("steps", 0))
        self._missing_loss_count = int(state.get("missing_loss_count", 0))
        pending = [_pending_entry(entry) for entry in state.get("pending_steps", [])]
        pending_values = [float(v) for v in state.get("pending_values", [])]
        accum_values = [float(v) for v in state.get("accum_values", [])]
        if sum(count for _, count, _, _ in pending) != len(pending_values):
            pending, pending_values = [], []  # inconsistent (hand-edited) state: drop the unread steps
        self._pending_steps = pending
        self._window_count = len(accum_values)
        self._micro_losses = []
        self._unread_values = pending_values + accum_values  # onto the device when training starts


def _pending_entry(entry: Any) -> tuple[int, int, float, float]:
    step, count, multiplier, *lr = entry
    return int(step), int(count), float(multiplier), float(lr[0]) if lr else math.nan


def _upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A version-1 state (detector, decisions, lr_scale ... at the top) in the layout of version 2."""
    if state.get("version", 1) >= 2 or "scheduler" in state:
        return state
    scheduler = {
        "detector": state.get("detector"),
        "last_step": state.get("steps", 0),
        "num_nonfinite": state.get("nonfinite_count", 0),
        "first_nonfinite_step": state.get("first_nonfinite_step"),
        "decisions": state.get("decisions", []),
        "lr_scale": state.get("lr_scale", 1.0),
    }
    state["scheduler"] = scheduler if scheduler["detector"] is not None else None
    state["version"] = _STATE_VERSION
    return state
