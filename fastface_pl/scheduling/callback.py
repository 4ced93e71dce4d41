"""The FastFace / Moving Haar learning-rate scheduler as a Lightning callback.

:class:`FastFaceLRCallback` is the thin Lightning layer over
:class:`~fastface_pl.scheduling.lr_scheduler.FastFaceLR`, which owns the LR (patience, factor, floor,
non-finite losses, decisions, LR scale). The step losses come from the fit's one
:class:`~fastface_pl.scheduling.loss_reader.StepLossReader` (no host–device synchronisation per step: one
read per block of ``k`` optimizer steps, one reduction across ranks). The callback adds the rest of what
a Lightning run needs (docs/lightning.md): the run length T in optimizer steps (P = int(τ·T)) whatever
limits the run, what a second fit, a reused callback and a resume continue, logging on Lightning's step
axis, monitorable ``fastface/*`` values, and a check that no other LR scheduler undoes its decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import StochasticWeightAveraging, Timer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from fastface_pl.errors import ConfigurationError, ConfigurationTypeError, UsageError
from fastface_pl.scheduling.auto import AutoFastFaceDetector
from fastface_pl.scheduling.detectors import Detector, DetectorName, build_detector, detector_class
from fastface_pl.scheduling.ending import (
    DEFAULT_LATEST_START,
    DEFAULT_STOP_COOLDOWN_FRACTION,
    CooldownShape,
    Mode,
    RunEnding,
)
from fastface_pl.scheduling.loss_reader import StepLoss, StepLossConsumer, StepLossReader
from fastface_pl.scheduling.lr_scheduler import (
    DEFAULT_PATIENCE_FRACTION,
    FastFaceLR,
    check_detector_arguments,
    read_state,
    uses_auto_settings,
)
from fastface_pl.scheduling.saved_state import check_state, loading, required
from fastface_pl.argument_checks import check_bool, check_int, check_real

__all__ = ["FastFaceLRCallback", "DEFAULT_PATIENCE_FRACTION", "TrainerSetupError"]

_STATE_VERSION = 1

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


class TrainerSetupError(UsageError, MisconfigurationException):
    """The Trainer the callback was put in cannot run it as set up (another owner of the LR, no optimizer, no run
    length ...); raised at fit start, before any step. A usage error (``fastface_pl.train`` exits 2)."""


@dataclass
class _FitState:
    """What the callback holds for one fit only (set at fit start and train start)."""

    composed: list[torch.optim.Optimizer] = field(default_factory=list)  # optimizers another scheduler sets
    monitored: bool = False  # a monitor reads fastface/* values: read the block at epoch end and before validation
    run_length_known: bool = True  # manual optimization: False until two optimizer steps show the pattern
    held: list[StepLoss] = field(default_factory=list)  # steps read before T is known
    lrs: dict[int, float] = field(default_factory=dict)  # the LR each step not yet read ran with
    next_lr: float = math.nan  # the LR the next optimizer step uses


class FastFaceLRCallback(StepLossConsumer):
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
            ranks, averaged across ranks) once every k optimizer steps, by the one reader this callback
            shares with a ``DivergenceGuard`` (the smaller k of the two). Decisions are the same as with
            k = 1 and take effect at most k−1 steps later (or at a checkpoint, which reads the block first).
        log_signals: Log ``fastface/*`` (loss, smoothed_loss, signal, threshold, stationary_count,
            num_decisions, lr_scale, and lr: the LR that step ran with) through ``trainer.loggers``
            every ``log_every_n_steps`` optimizer steps, at Lightning's own step (that of ``self.log``).
            The values of the last step read are also in ``trainer.callback_metrics``, so
            ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them.
        compose_with_step_schedulers: Let another LR scheduler set the LR (a step-interval warm-up such
            as ``LinearLR`` or ``LambdaLR``, ``OneCycleLR``, ``SequentialLR`` ...): its LR is left to it,
            and the callback's decisions are applied as a scale on top of it during each training batch
            (so a ``LearningRateMonitor`` placed after this callback logs the LR the step used).
        verbose: Report each decision (rank zero): the step, the reason and the new LR.
        name: Added to the checkpoint key (``state_key``), for instance to keep apart the states of two runs that
            share a checkpoint folder. One FastFaceLRCallback per Trainer: a second is refused at fit start.
        mode: What a decision does (docs/cooldown.md): ``"halve"`` (the paper: the LR is divided by δ),
            ``"cooldown"`` (the first decision, at step t_d, starts an anneal of the LR to zero over the rest of
            the run; with no decision by ``latest_cooldown_start``·T the anneal starts there, which is WSD) or
            ``"stop"`` (for a run whose length nobody knows: the anneal lasts ``cooldown_fraction``·t_d steps,
            then the callback stops the Trainer; its checkpoints are saved at that epoch end as at any other).
        cooldown_shape: ``"1-sqrt"`` (default) or ``"linear"``.
        latest_cooldown_start: The latest cooldown start, a fraction of T (None: none; ``"stop"`` without a
            budget has none).
        cooldown_fraction: c of ``"stop"``: the cooldown lasts ⌈c·t_d⌉ optimizer steps.
        horizon_epochs: ``"stop"`` with settings from a run length (τ, or the auto rule): the length, in
            epochs of this run's data, that they are resolved for. It replaces the budget, so the decisions are
            the same whatever ``max_epochs`` or ``max_steps`` say.
        horizon_steps: The same in optimizer steps (give one of the two).

    Raises:
        ConfigurationTypeError: (a ``TypeError``) a detector that is neither a name nor a detector instance, a
            ``name`` that is not a string.
        ConfigurationError: (a ``ValueError``) a setting out of range, or settings that do not go together (named).
        TrainerSetupError: (a ``MisconfigurationException``) at fit start, a Trainer it cannot work in: no
            optimizer, another FastFaceLRCallback, ``StochasticWeightAveraging``, a scheduler that would undo its
            decisions, a τ without a run length.

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
        (however many optimizers stepped), and ``training_step`` must return the loss. A second
        ``trainer.fit`` on the same Trainer, a resume and a loaded state continue the run; a fit of a new
        Trainer from step 0 starts afresh (docs/lightning.md, "Fit, refit, reuse"). Epoch-interval
        schedulers that multiply the current LR (``StepLR``, ``MultiStepLR``, ``ExponentialLR`` ...)
        compose with the callback as they are; with them ``fastface/lr_scale`` is the callback's share.
        Under ``ddp_spawn`` the training runs in spawned processes: the callback object of the
        launching process holds no decisions afterwards (read them from the checkpoint or the logs).
    """

    def __init__(
        self,
        detector: DetectorName | Detector = "fastface",
        detector_kwargs: Mapping[str, Any] | None = None,
        patience: int | None = None,
        patience_fraction: float | None = None,
        min_lr: float | None = None,
        sync_every_n_steps: int = 1,
        log_signals: bool = True,
        compose_with_step_schedulers: bool = False,
        verbose: bool = True,
        name: str | None = None,
        mode: Mode = "halve",
        cooldown_shape: CooldownShape = "1-sqrt",
        latest_cooldown_start: float | None = DEFAULT_LATEST_START,
        cooldown_fraction: float = DEFAULT_STOP_COOLDOWN_FRACTION,
        horizon_epochs: float | None = None,
        horizon_steps: int | None = None,
    ) -> None:
        super().__init__()
        # The ending's settings, checked now (a cooldown's budget is checked when training starts).
        self._ending = RunEnding.check_settings(mode, cooldown_shape, latest_cooldown_start, cooldown_fraction)
        self.horizon_epochs = check_real("horizon_epochs", horizon_epochs, 0.0, allow_none=True)
        self.horizon_steps = check_int("horizon_steps", horizon_steps, 1, allow_none=True, none_means="none")
        if (horizon_epochs is not None or horizon_steps is not None) and mode != "stop":
            raise ConfigurationError(f"horizon_epochs and horizon_steps apply to mode='stop' only, got mode={mode!r} "
                                     "(the other modes resolve the detector's settings for the run length)")
        if horizon_epochs is not None and horizon_steps is not None:
            raise ConfigurationError(
                f"give horizon_epochs or horizon_steps, not both; got horizon_epochs={horizon_epochs!r}, "
                f"horizon_steps={horizon_steps!r}")
        self._detector_name, self._detector_kwargs, self._patience_fraction = check_detector_arguments(
            detector, detector_kwargs, patience, patience_fraction)
        self._fraction_given = patience_fraction is not None
        if mode == "stop" and self._patience_fraction is not None and horizon_epochs is None and horizon_steps is None:
            raise ConfigurationError(
                "mode='stop' resolves the detector's settings (patience_fraction, or the auto rule) for a "
                "horizon that does not depend on the budget: pass horizon_epochs (for example 5, the "
                "paper's run length) or horizon_steps, or give the patience in steps (patience=...)")
        self.min_lr = check_real("min_lr", min_lr, 0.0, low_open=False, allow_none=True)
        self.sync_every_n_steps = check_int("sync_every_n_steps", sync_every_n_steps, 1)
        self.log_signals = check_bool("log_signals", log_signals)
        self.compose_with_step_schedulers = check_bool("compose_with_step_schedulers", compose_with_step_schedulers)
        self.verbose = check_bool("verbose", verbose)
        if name is not None and not isinstance(name, str):
            raise ConfigurationTypeError(f"name must be a string or None, got {type(name).__name__}")
        self.name = name
        # The detector as soon as its settings are known (an instance; a named one with P in steps).
        self._detector: Detector | None = detector if self._detector_name is None else None
        if self._detector is None and self._patience_fraction is None:
            self._detector = build_detector(self._detector_name, **self._detector_kwargs)
        # What a resumed run applies over the checkpoint's detector settings (P from τ is resolved separately).
        self._configured_settings = self._settings_to_apply(detector)

        self._initial_detector = None if self._detector is None else self._detector.state_dict()
        self._scheduler: FastFaceLR | None = None  # the owner of the LR, built when training starts
        self._loaded: dict[str, Any] | None = None  # a loaded state, until training starts from it
        self._restored = False  # Lightning restores the optimizers (their LR) with the state: fit(ckpt_path=...)
        self._reader: StepLossReader | None = None  # the fit's one reader of the step losses: the live step count
        self._fit = _FitState()  # what one fit holds (the reader, on the base class, too)

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
    def cooldown_start(self) -> int | None:
        """t_d: the optimizer step after which the cooldown began (``"cooldown"``, ``"stop"``), or None."""
        ending = self._ending_state()
        return ending.get("start")

    @property
    def stop_step(self) -> int | None:
        """``"stop"`` mode: the last optimizer step of the run, once its cooldown has begun."""
        ending = self._ending_state()
        return ending.get("end") if ending.get("mode") == "stop" else None

    @property
    def stop_reason(self) -> str | None:
        """``"stop"`` mode: why the run stops (or will stop), once the cooldown has begun."""
        return self._scheduler.stop_reason if self._scheduler is not None else None

    def _ending_state(self) -> dict[str, Any]:
        if self._scheduler is not None:
            return self._scheduler.ending.state_dict()
        return dict(self._scheduler_state().get("ending") or {})

    @property
    def steps_observed(self) -> int:
        """Optimizer steps observed so far (fed or not yet read): the reader's count during a fit, the scheduler's
        (``last_step``, handed over at each checkpoint and at the fit's end) otherwise."""
        if self._reader is not None:
            return self._reader.steps
        if self._scheduler is not None:
            return self._scheduler.last_step
        return int(self._scheduler_state().get("last_step", 0))

    @property
    def state_key(self) -> str:
        """The detector type plus ``name``: stable when settings change, so a resume always finds its state."""
        detector = self._detector_name or type(self._detector).__name__  # an instance stays this callback's
        return self._generate_state_key(detector=detector, **({"name": self.name} if self.name else {}))

    def _settings_to_apply(self, detector: Any) -> dict[str, Any]:
        if self._detector_name is None:
            return dict(detector.hyperparameters)
        if self._patience_fraction is None:
            return detector_class(self._detector_name).check_settings(**self._detector_kwargs)
        if uses_auto_settings(self._detector_name, self._detector_kwargs):  # α, β, λ, P from the run
            settings = AutoFastFaceDetector.check_settings(1, self._patience_fraction, **self._detector_kwargs)
            del settings["total_steps"]  # resolved for the run length
            return settings
        settings = detector_class(self._detector_name).check_settings(**{"patience": 0, **self._detector_kwargs})
        del settings["patience"]  # P = int(τ·T), resolved for the run length
        return settings

    def _scheduler_state(self) -> dict[str, Any]:
        return (self._loaded or {}).get("scheduler") or {}

    # ------------------------------------------------------------------ fit start
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.optimizers:
            raise TrainerSetupError("FastFaceLRCallback needs an optimizer, but configure_optimizers returned none")
        self._check_other_callbacks(trainer)
        composed = self._check_schedulers(trainer)
        self._reader = StepLossReader.attach(trainer, self, self.sync_every_n_steps)
        # An EarlyStopping / ModelCheckpoint that monitors a fastface/* value gets the block read at epoch end and
        # before validation too (otherwise blocks stay k steps long).
        self._fit = _FitState(composed=composed, monitored=any(
            str(getattr(callback, "monitor", None)).startswith("fastface/") for callback in trainer.callbacks))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restored = False  # Lightning restores a checkpoint after setup, before on_fit_start

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restored = True  # called before load_state_dict; Lightning restores the optimizers' LR too

    def _check_other_callbacks(self, trainer: Trainer) -> None:
        """Refuses callbacks that would set the LR beside this one (found before any of them acts)."""
        others = [c for c in trainer.callbacks if isinstance(c, FastFaceLRCallback) and c is not self]
        if others:
            names = ", ".join(repr(c.state_key) for c in [self, *others])
            raise TrainerSetupError(
                f"{len(others) + 1} FastFaceLRCallbacks are attached ({names}): each scales the LR of every parameter "
                "group of every optimizer, so their decisions would compound (name= only changes the checkpoint "
                "key). Keep one FastFaceLRCallback per Trainer.")
        swa = [c for c in trainer.callbacks if isinstance(c, StochasticWeightAveraging)]
        if swa:
            raise TrainerSetupError(
                "FastFaceLRCallback owns the learning rate, but StochasticWeightAveraging sets it too: from its "
                "swa_epoch_start its SWALR resets the LR to swa_lrs every epoch, undoing the callback's decisions "
                "while the callback keeps taking them. Use one of the two: for a weight average beside the callback, "
                "use lightning.pytorch.callbacks.EMAWeightAveraging (it leaves the LR alone); for a schedule that ends "
                "the run with an anneal, FastFaceLRCallback(mode='cooldown') (docs/cooldown.md).")

    def _check_schedulers(self, trainer: Trainer) -> list[torch.optim.Optimizer]:
        composed = []
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if config.reduce_on_plateau or (config.interval == "epoch" and _composes_as_is(scheduler)):
                continue
            if not self.compose_with_step_schedulers:
                raise TrainerSetupError(
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
        state, steps, rescale = self._state_to_continue(trainer)
        detector = self._scheduler.detector if self._scheduler is not None and state is not None else self._detector
        self._close_scheduler()
        mode = self._ending["mode"]
        horizon = self._horizon(trainer) if mode == "stop" else None
        total = self._budget(trainer) if detector is None or mode != "halve" else None
        self._scheduler = FastFaceLR(
            list(trainer.optimizers),
            detector if detector is not None else self._detector_name,
            self._detector_kwargs if detector is None else None,
            patience_fraction=self._patience_fraction if detector is None else None,
            total_steps=total, min_lr=self.min_lr, on_nonfinite="skip", compose=self._fit.composed,
            warn_nonfinite=False, mode=mode, cooldown_shape=self._ending["shape"],
            latest_cooldown_start=self._ending["latest_start"], cooldown_fraction=self._ending["cooldown_fraction"],
            # the reader reduced the losses across ranks; _check_schedulers decided what may set the LR beside it
            horizon_steps=horizon, sync_ranks=False, check_lr_changes=False,
        )
        min_lrs = self._scheduler.min_lrs
        if state:
            self._scheduler.load_state_dict(state)
        # This callback's floor wins over a checkpoint's (and is announced when it differs). Non-finite losses are
        # always skipped here: stopping a run on them is the DivergenceGuard's job.
        changes = {"min_lr": (self._scheduler.min_lrs, min_lrs)} if self._scheduler.min_lrs != min_lrs else {}
        self._scheduler.on_nonfinite, self._scheduler.min_lrs = "skip", min_lrs
        if state:
            changes.update(self._reconcile_ending(horizon, total))
        if rescale:  # a second fit, or a loaded state: the optimizers start from their base LR
            self._scheduler.rescale()
        self._loaded, self._restored = None, False
        self._reader.start(trainer, pl_module, steps)
        self._fit.held, self._fit.lrs = [], {}
        # Settings changed since the checkpoint, and P for this run length: with automatic optimization T is
        # known now; with manual optimization once two optimizer steps show how often the optimizers step.
        fraction = self._patience_fraction if self._detector_name is not None else None
        self._fit.run_length_known = pl_module.automatic_optimization or (fraction is None and mode == "halve")
        needs_total = (fraction is not None and mode != "stop") or mode == "cooldown"
        self._reconcile_settings(trainer, changes,
                                 total=self._budget(trainer) if needs_total and self._fit.run_length_known else total)
        self._scheduler.advance(self.steps_observed + 1)
        self._fit.next_lr = self._scheduler.lr_in_effect()

    def _horizon(self, trainer: Trainer) -> int | None:
        """H of the stop mode: ``horizon_steps``, or ``horizon_epochs`` times this run's optimizer steps per epoch."""
        if self.horizon_epochs is None:
            return self.horizon_steps
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches < 1:
            raise TrainerSetupError(
                "FastFaceLRCallback: horizon_epochs needs the number of batches per epoch, but the training data has "
                "no length (an iterable dataset); give horizon_steps instead")
        per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
        return max(1, round(self.horizon_epochs * per_epoch))

    def _budget(self, trainer: Trainer) -> int | None:
        """T when the run has one; in ``"stop"`` mode an unknown T is allowed (None)."""
        try:
            return self._run_length(trainer)
        except MisconfigurationException:
            if self._ending["mode"] == "stop":
                return None
            raise

    def _reconcile_ending(self, horizon: int | None, total: int | None) -> dict[str, tuple[Any, Any]]:
        """This callback's ending settings over a restored state; the cooldown continues if the mode is the same."""
        scheduler = self._scheduler
        saved = scheduler.ending.settings
        changes = {f"ending {key}": (saved[key], value) for key, value in self._ending.items() if saved[key] != value}
        if changes:
            ending = RunEnding(**self._ending, total_steps=total if total is not None else scheduler.total_steps)
            if saved["mode"] == self._ending["mode"] and scheduler.ending.started:
                ending.begin(scheduler.ending.start, scheduler.ending.reason)
            else:
                scheduler.scale_before_cooldown = None
            scheduler.ending = ending
        if scheduler.horizon_steps != horizon:
            changes["horizon_steps"] = (scheduler.horizon_steps, horizon)
            scheduler.horizon_steps = horizon
            if horizon is not None:
                changes.update(scheduler.reconfigure(**scheduler.run_length_settings(total)))
        return changes

    def _state_to_continue(self, trainer: Trainer) -> tuple[dict[str, Any] | None, int | None, bool]:
        """(scheduler state, optimizer steps so far or None for the global step, whether the optimizers need the LR
        scale applied).

        A loaded state is continued (its LR is in the optimizers only when Lightning restored them); so is the
        state of an earlier fit on this Trainer (a second ``fit``: Lightning built the optimizers again). A fit
        that starts at global step 0 without a loaded state is a new run: an earlier fit's state is dropped.
        """
        if self._loaded is not None and self._loaded.get("scheduler") is not None:
            state = self._loaded["scheduler"]
            return state, int(state["last_step"]), not self._restored
        if self._scheduler is None:
            if trainer.global_step > 0:  # no trained state of this callback: fresh, numbered on from the run
                rank_zero_info(
                    f"FastFaceLRCallback: the run is at global step {trainer.global_step} but holds no trained state "
                    f"of this callback ({self.state_key!r}): it starts fresh (no decisions, LR scale 1 over the LR the "
                    f"optimizers hold) and numbers its optimizer steps from {trainer.global_step + 1}.")
            return None, None, False
        if trainer.global_step > 0:
            return self._scheduler.state_dict(), self._scheduler.last_step, True
        rank_zero_info(
            "FastFaceLRCallback: a new run starts at global step 0; the state of the earlier fit "
            f"({self._scheduler.last_step} "
            f"optimizer steps, {len(self._scheduler.decisions)} decisions, LR scale {self._scheduler.lr_scale:g}) "
            "is dropped. To continue it, fit the same Trainer again or load its state_dict() first.")
        if self._initial_detector is not None:  # a detector known at construction: back to how it was given
            self._detector.load_state_dict(self._initial_detector)
        self._scheduler.close()
        self._scheduler = None
        return None, None, False

    def _run_length(self, trainer: Trainer, rates: tuple[float, float] | None = None) -> int:
        """T: the optimizer steps of the whole run, whatever limits it (max_steps, max_epochs, both).

        With automatic optimization Lightning's ``estimated_stepping_batches`` counts them. With manual
        optimization ``global_step`` counts ``optimizer.step()`` calls and an optimizer may skip batches:
        ``rates`` = (global steps per optimizer step, optimizer steps per batch), as seen in this fit.
        """
        if trainer.lightning_module.automatic_optimization:
            total = trainer.estimated_stepping_batches
        else:
            per_global, per_batch = rates or (1.0, 1.0)
            by_steps = trainer.max_steps / per_global if trainer.max_steps != -1 else math.inf
            epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
            by_epochs = trainer.num_training_batches * epochs * per_batch
            total = min(by_steps, by_epochs)
        if not math.isfinite(total) or total < 1:
            raise TrainerSetupError(self._no_run_length(trainer))
        return max(1, round(total))

    def _no_run_length(self, trainer: Trainer) -> str:
        tau = self._patience_fraction
        asked = (f"patience_fraction={tau}" if self._fraction_given else
                 f"the default patience of {self._detector_name!r} (a fraction τ = {tau} of the run)")
        if any(isinstance(callback, Timer) for callback in trainer.callbacks) and trainer.max_steps == -1:
            why = "it is limited by max_time only, which gives no number of steps"
        elif trainer.max_epochs == -1 and trainer.max_steps == -1:
            why = "max_epochs=-1 without max_steps"
        else:
            why = "the training data has no length (an iterable dataset) and max_steps is not set"
        return (f"FastFaceLRCallback: {asked} needs the run length T in optimizer steps, but this run has none: "
                f"{why}. Set Trainer(max_steps=...) (max_time may stay: the first limit reached ends the run), "
                "or give the patience in steps (patience=...).")

    def _reconcile_settings(self, trainer: Trainer, changes: dict[str, tuple[Any, Any]], total: int | None) -> None:
        """Applies this callback's detector settings over a restored state and resolves P for this run."""
        scheduler = self._scheduler
        changes = {**scheduler.reconfigure(**self._configured_settings), **changes}
        scheduler.patience_fraction = self._patience_fraction if self._detector_name is not None else None
        if total is not None:  # P (a fraction τ), the auto rule's T, the cooldown's end
            self._set_total_steps(total)
        if changes and scheduler.detector.steps_seen > 0:
            listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
            rank_zero_info(f"FastFaceLRCallback: resumed with changed settings ({listed}); the detector "
                           "continues from its saved state with the new values.")

    def _set_total_steps(self, total: int) -> None:
        scheduler = self._scheduler
        previous_total, previous_end = scheduler.total_steps, scheduler.ending.end
        recomputed = scheduler.set_total_steps(total)
        if scheduler.ending.end != previous_end and previous_end is not None:
            rank_zero_info(
                f"FastFaceLRCallback: this run is T = {total} optimizer steps (it was {previous_total}); the cooldown "
                f"that began after step {scheduler.ending.start} now ends at step {scheduler.ending.end} (was "
                f"{previous_end}).")
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

    def _close_scheduler(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()

    def _end_fit(self, trainer: Trainer) -> None:
        self._close_scheduler()  # the optimizer step hooks of compose_with_step_schedulers
        self._hand_over_count()  # after an exception too
        super()._end_fit(trainer)

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        count = len(self._scheduler.decisions)
        self._scheduler.advance(self.steps_observed + 1)  # the cooldown's LR for this step (host arithmetic)
        if len(self._scheduler.decisions) > count and self.verbose:  # the latest point
            self._report(*self._scheduler.decisions[-1][:2])
        if self._fit.composed:
            self._scheduler.scale_composed()  # the LR in effect, for anything that reads it during the batch

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._reader.on_train_batch_end(trainer, outputs)  # list appends; a read once per k optimizer steps
        if self._fit.composed:
            self._scheduler.unscale_composed()
        self._fit.next_lr = self._scheduler.lr_in_effect()
        stop = self._scheduler.ending.stop_step
        if stop is not None and self.steps_observed >= stop and not trainer.should_stop:
            trainer.should_stop = True  # every rank: the same reduced losses give the same decision
            rank_zero_info(f"FastFaceLRCallback: stopping after optimizer step {self.steps_observed}: "
                           f"{self._scheduler.stop_reason}. Checkpoints are saved at this epoch end as usual.")

    def on_optimizer_step(self, trainer: Trainer, step: int) -> None:
        """Called by the reader as optimizer step ``step`` completes: the LR it ran with, for the logs."""
        self._fit.lrs[step] = self._fit.next_lr

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit.monitored:
            self._flush()  # before EarlyStopping / ModelCheckpoint read the fastface/* values (they run last)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit.monitored and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._flush()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(final=True)
        if self.nonfinite_count:
            rank_zero_warn(
                f"FastFaceLRCallback skipped {self.nonfinite_count} optimizer step(s) with a non-finite training "
                f"loss (first at step {self._scheduler.first_nonfinite_step}); the detector never saw them. A "
                "DivergenceGuard(max_nonfinite_steps=1) stops a run at the first one (divergence.max_nonfinite_steps=1 "
                "in fastface_pl.train).")

    def _flush(self, final: bool = False, for_checkpoint: bool = False) -> None:
        """Reads every completed step; ``final`` also feeds steps held for the run length (manual optimization)."""
        if self._reader is None:
            return
        self._reader.flush(for_checkpoint=for_checkpoint)
        if final and self._fit.held:
            self.receive_losses(self._reader._trainer(), [], final=True)
        if final:  # every step is fed
            self._hand_over_count()

    def _hand_over_count(self) -> None:
        """The reader's count of this fit goes to its keeper, the scheduler (steps without a loss included)."""
        if self._reader is not None and self._reader.started and self._scheduler is not None:
            self._scheduler.last_step = self._reader.steps

    # ------------------------------------------------------------------ the steps read
    def receive_losses(self, trainer: Trainer, steps: list[StepLoss], final: bool = False) -> None:
        """Feeds a block of step losses (from the reader) to :class:`FastFaceLR`; logs and reports."""
        if not self._fit.run_length_known:  # manual optimization: T once two optimizer steps show the pattern
            self._fit.held += steps
            rates = self._reader.run_rates(trainer)
            if rates is None and not final:
                return
            self._fit.run_length_known = True
            mode = self._ending["mode"]
            if (self._scheduler.patience_fraction is not None and mode != "stop") or mode == "cooldown":
                self._set_total_steps(self._run_length(trainer, rates))
            elif mode == "stop" and self._budget(trainer) is not None:
                self._set_total_steps(self._run_length(trainer, rates))
            steps, self._fit.held = self._fit.held, []
        log_every = trainer.log_every_n_steps if self.log_signals else 0
        to_log: list[tuple[int, dict[str, float]]] = []
        metrics: dict[str, float] = {}
        decisions = self._scheduler.decisions
        for item in steps:
            count = len(decisions)
            self._scheduler.step(item.value, step=item.step)
            if len(decisions) > count and self.verbose:
                self._report(*decisions[-1][:2])
            metrics = self._signals(item.value, self._fit.lrs.pop(item.step, math.nan))
            if log_every > 0 and item.step % log_every == 0:
                to_log.append((item.log_step, metrics))
        # The last step's values, for EarlyStopping / ModelCheckpoint(monitor="fastface/..."): host floats, no sync.
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
        if to_log and trainer.is_global_zero:
            for log_step, values in to_log:
                for logger in trainer.loggers:
                    logger.log_metrics(values, step=log_step)  # Lightning's own step axis (self.log, LR monitor)

    def _report(self, step: int, factor: float) -> None:
        detector, ending = self._scheduler.detector, self._scheduler.ending
        if ending.started and step == ending.start:
            stop = f"; the run stops after step {ending.end}" if ending.stop_step is not None else ""
            rank_zero_info(f"FastFaceLRCallback: optimizer step {step}: {ending.reason}; the LR anneals to zero "
                           f"({ending.shape}) over steps {ending.start + 1}..{ending.end}{stop}")
            return
        if factor > 1.0:
            reason = f"restart ×{factor:g} (still stationary after {detector.patience} more steps)"
        elif detector.signal is None:
            reason = "loss stationary"
        else:
            reason = (f"loss stationary for {detector.patience + 1} steps: signal {detector.signal:.4g} < "
                      f"threshold {detector.threshold:.4g}")
        new_lr = self._scheduler.lr_in_effect()
        rank_zero_info(f"FastFaceLRCallback: optimizer step {step}: {reason}; LR ×{factor:g} -> {new_lr:.6g} "
                       f"(from step {self.steps_observed + 1})")

    def _signals(self, value: float, lr_used: float) -> dict[str, float]:
        detector = self._scheduler.detector
        metrics = {"fastface/loss": value} if math.isfinite(value) else {}
        for key in ("smoothed_loss", "signal", "threshold", "stationary_count"):
            item = getattr(detector, key)
            if item is not None:
                metrics[f"fastface/{key}"] = float(item)
        metrics["fastface/num_decisions"] = float(len(self._scheduler.decisions))
        metrics["fastface/lr_scale"] = self._scheduler.lr_scale
        if math.isfinite(lr_used):
            metrics["fastface/lr"] = lr_used
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        # Every completed step is read first (the reader's flush: one synchronisation per checkpoint, before
        # Lightning collects any callback's state), so the state holds no unread losses.
        self._flush(final=True, for_checkpoint=True)
        if self._scheduler is None:  # not trained yet in this process: what was loaded, or a fresh state
            if self._loaded is not None:
                return dict(self._loaded)
            return {"version": _STATE_VERSION, "scheduler": None}
        return {"version": _STATE_VERSION, "scheduler": self._scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Takes a state at once (``decisions``, ``detector`` ... show it); training continues from it.

        Raises:
            SchedulerStateError: naming the key, for a state of another version or detector, or with bad values.
        """
        state = dict(check_state(state_dict, "FastFaceLRCallback", _STATE_VERSION))
        with loading("FastFaceLRCallback"):
            scheduler_state = state.get("scheduler")
            if scheduler_state is not None and not isinstance(scheduler_state, Mapping):
                raise ConfigurationError(f"state['scheduler'] must be a dict or None, got {scheduler_state!r}")
            if scheduler_state is not None:
                detector = self._detector_for(required(scheduler_state, "detector"))
                read_state(scheduler_state, detector)  # checks every value; the detector takes its state
                self._detector = detector
        if self._scheduler is not None:
            self._close_scheduler()
            self._scheduler = None
        self._loaded = state

    def _detector_for(self, detector_state: Mapping[str, Any]) -> Detector:
        """A detector of this callback's kind, to load ``detector_state`` into."""
        if self._detector_name is None:
            return self._detector if self._detector is not None else self._scheduler.detector
        auto = uses_auto_settings(self._detector_name, self._detector_kwargs)
        expected = AutoFastFaceDetector if auto else detector_class(self._detector_name)
        if not isinstance(detector_state, Mapping) or detector_state.get("type") != expected.__name__:
            found = detector_state.get("type") if isinstance(detector_state, Mapping) else detector_state
            raise ConfigurationError(
                f"the checkpoint's FastFaceLRCallback state['scheduler']['detector'] holds a {found!r} "
                f"detector, this callback runs {self._detector_name!r} ({expected.__name__}); resume "
                "with the same detector or start afresh")
        if auto:
            return AutoFastFaceDetector(1, self._patience_fraction, **self._detector_kwargs)
        return build_detector(self._detector_name, **{"patience": 0, **self._detector_kwargs})
