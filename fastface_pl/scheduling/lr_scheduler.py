"""FastFaceLR: the one owner of the learning rate for the FastFace / Moving Haar schedules.

It works like ``torch.optim.lr_scheduler.ReduceLROnPlateau``, but is stepped once per *optimizer*
step with that step's training loss::

    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    scheduler = FastFaceLR(optimizer, "fastface", total_steps=total_steps)   # α, β, λ, P from the run (docs/auto_settings.md)
    for images, labels in loader:
        loss = criterion(model(images), labels)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        scheduler.step(loss.detach())   # reads the loss to the host: a CPU-GPU sync point

To avoid the sync on every step, collect the losses on the device and call ``step`` for each value
of a block read with one ``.tolist()`` (the decisions are the same, applied up to a block later);
:class:`~fastface_pl.scheduling.callback.FastFaceLRCallback` does exactly that under Lightning.

Everything the three entry points share lives here: the detector's settings (patience P from τ and
the run length T, in :meth:`FastFaceLR.run_length_settings`), a factor applied to every parameter
group with the ``min_lr`` floor, the non-finite-loss policy, the decisions and the state.
See docs/scheduler.md for the method and docs/lightning.md for the callback.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch

from fastface_pl.errors import ConfigurationError, ConfigurationTypeError, UsageError
from fastface_pl.scheduling.auto import AutoFastFaceDetector, patience_steps
from fastface_pl.scheduling.detectors import (
    PAPER_PATIENCE_FRACTION,
    Detector,
    DetectorName,
    NonFiniteLossError,
    build_detector,
    detector_class,
    detector_name,
)
from fastface_pl.scheduling.ending import (
    DEFAULT_LATEST_START,
    DEFAULT_STOP_COOLDOWN_FRACTION,
    CooldownShape,
    Mode,
    RunEnding,
)
from fastface_pl.scheduling.saved_state import check_state, loading, required
from fastface_pl.argument_checks import check_bool, check_choice, check_int, check_real

__all__ = ["FastFaceLR", "DEFAULT_PATIENCE_FRACTION", "LRChangedError", "NONFINITE_POLICIES", "SteppedWithoutLossError"]

DEFAULT_PATIENCE_FRACTION = PAPER_PATIENCE_FRACTION  # τ when a "fastface" detector is given no patience
_STATE_VERSION = 1
NonFinitePolicy = Literal["skip", "raise"]
NONFINITE_POLICIES = get_args(NonFinitePolicy)
#: Giving any of these to "fastface" selects explicit settings; without them the auto rule resolves them.
EXPLICIT_FASTFACE_SETTINGS = ("alpha", "beta", "threshold", "patience")


def uses_auto_settings(name: str | None, kwargs: Mapping[str, Any]) -> bool:
    """Whether a named detector gets α, β, λ and P from the auto rule (docs/auto_settings.md): ``"fastface"``
    given none of them (the other arguments, δ and K, may be given)."""
    return name == "fastface" and not any(key in kwargs for key in EXPLICIT_FASTFACE_SETTINGS)


def check_detector_arguments(detector: Any, detector_kwargs: Mapping[str, Any] | None, patience: Any,
                             patience_fraction: Any) -> tuple[str | None, dict[str, Any], float | None]:
    """Checks how a detector is asked for; returns (name or None for an instance, kwargs, τ or None).

    A named detector gets ``patience`` (steps) or ``patience_fraction`` (τ, resolved once the run
    length is known; default 0.05 for ``"fastface"``, whose patience has no default). A detector
    instance carries its own settings. Raises TypeError for wrong types, ValueError for bad values.
    """
    if detector_kwargs is not None and not isinstance(detector_kwargs, Mapping):
        raise ConfigurationTypeError(f"detector_kwargs must be a dict or None, got {type(detector_kwargs).__name__}")
    kwargs = dict(detector_kwargs or {})
    if patience is not None and patience_fraction is not None:
        raise ConfigurationError(f"give either patience (optimizer steps) or patience_fraction (τ), not both; "
                                 f"got patience={patience!r}, patience_fraction={patience_fraction!r}")
    check_int("patience", patience, 0, allow_none=True, none_means="see patience_fraction")
    check_real("patience_fraction", patience_fraction, 0.0, 1.0, allow_none=True)
    if isinstance(detector, str):
        name = detector_name(detector)
        if "patience" in kwargs and (patience is not None or patience_fraction is not None):
            raise ConfigurationError(
                "patience is given twice: in detector_kwargs and as patience/patience_fraction; keep one")
        if patience is not None:
            kwargs["patience"] = int(patience)
        if name == "fastface" and "patience" not in kwargs and patience_fraction is None:
            patience_fraction = DEFAULT_PATIENCE_FRACTION
        detector_class(name).check_settings(**{"patience": 0, **kwargs})  # bad arguments fail now, not hours later
        return name, kwargs, None if patience_fraction is None else float(patience_fraction)
    if not isinstance(detector, Detector):
        raise ConfigurationTypeError(
            f"detector must be 'fastface', 'moving_haar' or a detector instance (update, state_dict, "
            f"load_state_dict and the signals of fastface_pl.scheduling.detectors.Detector), "
            f"got {type(detector).__name__}")
    if kwargs:
        raise ConfigurationError("detector_kwargs only apply to a detector given by name; got a detector instance")
    if patience is not None or patience_fraction is not None:
        raise ConfigurationError(
            "a detector instance carries its own patience; do not pass patience or patience_fraction "
            f"with it (got patience={patience!r}, patience_fraction={patience_fraction!r})")
    return None, kwargs, None


class FastFaceLR:
    """Scales the LR of every parameter group by the detector's factor after each optimizer step.

    Args:
        optimizer: the optimizer, or several: every parameter group of each gets the same factor.
        detector: ``"fastface"``, ``"moving_haar"`` or a detector instance (which carries its own settings).
        detector_kwargs: the named detector's arguments (α, β, λ, δ, K, or m, θ, R ...).
        patience: P in optimizer steps (a named detector only).
        patience_fraction: τ: P = int(τ·T) with T = ``total_steps`` (default 0.05 for ``"fastface"``).
        total_steps: T, the optimizer steps of the whole run; needed when the patience is a fraction.
        min_lr: floor for the LR: one float or one per parameter group (all optimizers, in order); None:
            no floor. A decay never takes a group below it (a group already below is left alone); a
            Moving Haar restart (factor > 1) is never capped.
        on_nonfinite: ``"skip"``: a NaN/inf loss is not fed to the detector, counted in ``num_nonfinite``
            (one warning, unless ``warn_nonfinite=False``); ``"raise"``: NonFiniteLossError.
        compose: optimizers whose LR another scheduler sets (True: all). Their group LRs are left to that
            scheduler; the decisions are applied as a scale on top of it while the optimizer steps
            (optimizer step hooks), so any scheduler composes exactly. Call :meth:`close` to remove them.
        warn_nonfinite: warn at the first skipped non-finite loss.
        mode: what a decision does (docs/cooldown.md). ``"halve"``: the paper, the LR is multiplied by the
            detector's factor at each decision. ``"cooldown"``: the first decision (at step t_d) starts an anneal of
            the LR to zero over the rest of the budget T (``total_steps`` needed); without one the cooldown starts
            at ``latest_cooldown_start``·T (WSD). ``"stop"``: the cooldown lasts ``cooldown_fraction``·t_d steps
            and then :attr:`should_stop` turns True; the detector's settings come from ``horizon_steps``, not
            from the budget, which may be unknown.
        cooldown_shape: ``"1-sqrt"`` (default) or ``"linear"``.
        latest_cooldown_start: the latest cooldown start as a fraction of T (None: none).
        cooldown_fraction: c of ``"stop"``: the cooldown lasts ⌈c·t_d⌉ steps.
        horizon_steps: ``"stop"`` only: the run length the detector's settings are resolved for (P = int(τ·H), or
            the auto rule's T), so that they do not depend on the budget.
        sync_ranks: average the loss across ranks before it is fed, so that every rank takes the same decisions
            (one all-reduce per step, on the device of the first parameter). ``None`` (default): when
            ``torch.distributed`` is initialized with several ranks (Fabric, a DDP loop); ``False``: the caller
            feeds values that are already the same on every rank (the Lightning callback does).
        check_lr_changes: raise :class:`LRChangedError` when a group's LR is no longer the one this scheduler left
            (another scheduler stepped beside it without ``compose``, or code set it); ``False``: do not check.

    Raises:
        TypeError: an optimizer that is not a ``torch.optim.Optimizer``, a detector of another type.
        ValueError: a setting out of range (named), or settings that do not go together.

    Example::

        >>> import torch
        >>> from fastface_pl.scheduling.detectors import FastFaceDetector
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
        >>> scheduler = FastFaceLR(optimizer, FastFaceDetector(patience=1))
        >>> for loss in (3.0, 3.0, 3.0):
        ...     _ = scheduler.step(loss)
        >>> scheduler.get_last_lr()
        [0.01]

    .. note::
        Call ``step(loss)`` once per optimizer step (not per epoch), after ``optimizer.step()``;
        the new LR applies from the next optimizer step. Code that steps schedulers for you (Lightning's
        ``configure_optimizers``, ``ChainedScheduler``, ``SequentialLR``) cannot pass the loss: FastFaceLR refuses
        it and names the alternative (``FastFaceLRCallback``; ``compose=True`` beside a warm-up you step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
                 detector: Detector | DetectorName = "fastface", detector_kwargs: Mapping[str, Any] | None = None, *,
                 patience: int | None = None, patience_fraction: float | None = None,
                 total_steps: int | None = None, min_lr: float | Sequence[float] | None = None,
                 on_nonfinite: NonFinitePolicy = "skip", compose: bool | Sequence[torch.optim.Optimizer] = False,
                 warn_nonfinite: bool = True, mode: Mode = "halve", cooldown_shape: CooldownShape = "1-sqrt",
                 latest_cooldown_start: float | None = DEFAULT_LATEST_START,
                 cooldown_fraction: float = DEFAULT_STOP_COOLDOWN_FRACTION,
                 horizon_steps: int | None = None, sync_ranks: bool | None = None,
                 check_lr_changes: bool = True) -> None:
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        for item in optimizers:
            if not isinstance(item, torch.optim.Optimizer):
                raise ConfigurationTypeError(f"optimizer must be a torch.optim.Optimizer (or a list of them), "
                                             f"got {type(item).__name__}")
        if not optimizers:
            raise ConfigurationError("optimizer: got an empty list; pass the optimizer(s) whose LR FastFaceLR owns")
        self.optimizers = optimizers
        name, kwargs, fraction = check_detector_arguments(detector, detector_kwargs, patience, patience_fraction)
        self.patience_fraction = fraction
        self.total_steps = check_int("total_steps", total_steps, 1, allow_none=True, none_means="unknown")
        self.ending = RunEnding(mode, cooldown_shape, latest_cooldown_start, cooldown_fraction, self.total_steps)
        self.horizon_steps = check_int("horizon_steps", horizon_steps, 1, allow_none=True, none_means="none")
        if self.horizon_steps is not None and mode != "stop":
            raise ConfigurationError(
                f"horizon_steps applies to mode='stop' only (mode={mode!r} resolves the detector's "
                "settings for total_steps)")
        self.auto_settings = uses_auto_settings(name, kwargs)
        if name is None:
            self.detector: Detector = detector
        elif self.auto_settings:
            self.detector = AutoFastFaceDetector(**self.run_length_settings(self.total_steps),
                                                 patience_fraction=fraction, **kwargs)
        else:
            self.detector = build_detector(name, **kwargs, **self.run_length_settings(self.total_steps))
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        self.warn_nonfinite = warn_nonfinite
        self.min_lrs = self._resolve_min_lr(min_lr, len(self._groups()))
        self.last_step = 0
        self.num_nonfinite = 0
        self.first_nonfinite_step: int | None = None
        self.lr_scale = 1.0
        self.scale_before_cooldown: float | None = None  # lr_scale when the cooldown began
        self.decisions: list[tuple[int, float, float]] = []
        composed = optimizers if compose is True else list(compose or [])
        if any(all(item is not other for other in optimizers) for item in composed):
            raise ConfigurationError("compose: every optimizer listed must be one of those FastFaceLR owns")
        self._own_lrs: dict[int, list[Any]] = {}
        self._hook_depth: dict[int, int] = {}
        self._composed = [(item, self._hook(item)) for item in composed]
        self._first_composed = any(item is optimizers[0] for item in composed)
        self.sync_ranks = None if sync_ranks is None else check_bool("sync_ranks", sync_ranks)
        self._sync: bool | None = self.sync_ranks  # resolved at the first step when None
        self.check_lr_changes = check_bool("check_lr_changes", check_lr_changes)
        self._lrs_left: list[float] | None = None  # the LRs of the owned groups after the last step (None: unseen)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """Refused with a ``TypeError`` that says what to use: code that reads ``scheduler.optimizer`` (Lightning's
        ``configure_optimizers``, ``ChainedScheduler``, ``SequentialLR``) steps schedulers for you, without the loss.
        Not an ``AttributeError``: those check it with ``hasattr``, which would hide the message behind their own.
        The optimizers are :attr:`optimizers`."""
        raise SteppedWithoutLossError(_STEPPED_FOR_YOU)

    # ------------------------------------------------------------------ settings from the run length
    def run_length_settings(self, total_steps: int | None) -> dict[str, Any]:
        """The detector settings that follow from the run length T: P = int(τ·T) when τ is set, or T itself
        for the auto rule (which derives α, β, λ and P from it and the first losses; docs/auto_settings.md).

        The one place where a run length turns into detector hyperparameters (at construction, and
        again through :meth:`set_total_steps` when a resumed run is longer or shorter).
        """
        if self.patience_fraction is None:
            return {}
        if self.ending.mode == "stop":
            total_steps = self.horizon_steps
            if total_steps is None:
                raise ConfigurationError(
                    "mode='stop' resolves the detector's settings for a horizon that does not depend on "
                    "the budget: pass horizon_steps (for example the optimizer steps of a few epochs) or "
                    "give the patience in steps and the detector's settings explicitly")
        elif total_steps is None:
            raise ConfigurationError(
                f"patience_fraction={self.patience_fraction} needs the run length: pass total_steps "
                "(the optimizer steps of the whole run) or give patience in steps")
        if getattr(self, "auto_settings", False):
            return {"total_steps": int(total_steps)}
        if self.patience_fraction * total_steps < 1:
            warnings.warn(f"patience_fraction={self.patience_fraction} of a run of T = {total_steps} optimizer steps "
                          "is less than one step; the patience is P = 1 (as the auto rule's)", UserWarning,
                          stacklevel=3)
        return {"patience": patience_steps(int(total_steps), self.patience_fraction)}

    def set_total_steps(self, total_steps: int) -> dict[str, tuple[Any, Any]]:
        """Re-resolves the run-length settings for a new T; returns ``{name: (old, new)}`` of what changed.

        In ``"stop"`` mode the detector's settings stay (they follow ``horizon_steps``); the cooldown's end follows T.
        """
        self.total_steps = check_int("total_steps", total_steps, 1)
        self.ending.set_total_steps(self.total_steps)
        if self.ending.mode == "stop":
            return {}
        return self.reconfigure(**self.run_length_settings(total_steps))

    def reconfigure(self, **hyperparameters: Any) -> dict[str, tuple[Any, Any]]:
        """Changes detector settings in place, keeping its running state; returns ``{name: (old, new)}``."""
        current = self.detector.hyperparameters
        unknown = sorted(set(hyperparameters) - set(current))
        if unknown:
            raise ConfigurationError(f"{type(self.detector).__name__} has no setting {', '.join(unknown)}; "
                                     f"it has {', '.join(current)}")
        changes = {key: (current[key], value) for key, value in hyperparameters.items() if current[key] != value}
        if changes:
            state = self.detector.state_dict()
            state.update({key: new for key, (_, new) in changes.items()})
            self.detector.load_state_dict(state)
        return changes

    # ------------------------------------------------------------------ stepping
    def step(self, loss: float | torch.Tensor, step: int | None = None) -> float:
        """Feeds the loss of one optimizer step and rescales the LR if the detector decides.

        Args:
            loss: a float or a one-element tensor (read with ``.item()``: a CPU-GPU sync point).
            step: the 1-based optimizer step this loss belongs to (default: the step after the last one);
                the callback passes it because steps without a loss are never fed.

        Returns:
            The factor applied to the LR of the next step (1.0 when nothing changed).

        Raises:
            TypeError: no loss (code that steps schedulers for you; see the class note), or not a number.
            LRChangedError: the LR was changed behind this scheduler's back (``check_lr_changes``).
            NonFiniteLossError: a NaN/inf loss with ``on_nonfinite="raise"``.
        """
        if loss is None:
            raise SteppedWithoutLossError(_STEPPED_FOR_YOU)
        if self._across_ranks():
            loss = self._mean_across_ranks(loss)
        elif type(loss) is not float:  # the callback passes floats: it skips these checks
            loss = self._as_float(loss)
        if self.check_lr_changes:
            self._check_lrs_left()
        self.last_step = self.last_step + 1 if step is None else int(step)
        try:
            return self._feed(loss)
        finally:
            if self.check_lr_changes:
                self._lrs_left = self._owned_lrs()

    def _feed(self, loss: float) -> float:
        if not math.isfinite(loss):
            self._skip_nonfinite(loss)
        elif not self.ending.started:  # once the cooldown runs, the detector's work is done
            factor = self.detector.update(loss)
            if factor != 1.0 and self.ending.mode == "halve":
                self._apply(factor)
                return factor
            if factor < 1.0:
                self.ending.begin(self.last_step, "loss stationary")
        return self.advance(self.last_step + 1)

    def advance(self, next_step: int) -> float:
        """Sets the LR of optimizer step ``next_step`` from the cooldown (``"cooldown"`` and ``"stop"`` modes).

        :meth:`step` calls it; the callback also calls it before each batch, so the cooldown moves every step
        while the losses are read in blocks. Host arithmetic only. Returns the factor applied (1.0: none).
        """
        ending = self.ending
        if ending.mode == "halve":
            return 1.0
        ending.begin_if_due(next_step)
        if not ending.started:
            return 1.0
        first = self.scale_before_cooldown is None
        if first:
            self.scale_before_cooldown = self.lr_scale
        target = self.scale_before_cooldown * ending.factor(next_step)
        if target == self.lr_scale and not first:
            return 1.0
        factor = target / self.lr_scale
        self._apply(factor, record=False)
        self.lr_scale = target
        if first:
            self.decisions.append((ending.start, float(factor), self.lr_in_effect()))
        return factor

    @property
    def should_stop(self) -> bool:
        """``"stop"`` mode: the cooldown has ended with the last step fed; end the training loop."""
        stop = self.ending.stop_step
        return stop is not None and self.last_step >= stop

    @property
    def stop_reason(self) -> str | None:
        """Why the run stops (``"stop"`` mode), once the cooldown has started: the steps and their cause."""
        ending = self.ending
        if ending.stop_step is None:
            return None
        return (f"the cooldown that began after optimizer step {ending.start} ({ending.reason}) ends at step "
                f"{ending.end} ({ending.end - ending.start} steps, {ending.shape} to zero)")

    # ------------------------------------------------------------------ several ranks, other LR writers
    def _across_ranks(self) -> bool:
        if self._sync is None:
            self._sync = (torch.distributed.is_available() and torch.distributed.is_initialized()
                          and torch.distributed.get_world_size() > 1)
        return self._sync

    def _mean_across_ranks(self, loss: Any) -> float:
        """The loss averaged over the ranks (a NaN on one rank reaches all): one all-reduce and one host read, on
        the device of the first parameter (where the process group's backend works). Every rank must call it."""
        device = next((p.device for g in self.optimizers[0].param_groups for p in g["params"]), torch.device("cpu"))
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                self._as_float(loss)  # the error for a tensor of several elements
            value = loss.detach().reshape(1).to(device=device, dtype=torch.float64, copy=True)
        else:
            value = torch.tensor([self._as_float(loss)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(value)
        return value.item() / torch.distributed.get_world_size()

    def _owned_lrs(self) -> list[float]:
        composed = {id(optimizer) for optimizer, _ in self._composed}
        return [float(group["lr"]) for optimizer, group in self._groups() if id(optimizer) not in composed]

    def _check_lrs_left(self) -> None:
        if self._lrs_left is None:
            return
        for index, (now, left) in enumerate(zip(self._owned_lrs(), self._lrs_left)):
            if now != left:
                raise LRChangedError(
                    f"FastFaceLR: the LR of parameter group {index} is {now:g}, but after optimizer step "
                    f"{self.last_step} FastFaceLR left it at {left:g}: something else set it (another LR scheduler "
                    "stepped beside this one, or your code). A scheduler that sets the LR from its own base values "
                    "(a LambdaLR or LinearLR warm-up, OneCycleLR, cosine) undoes each decision; a multiplicative one "
                    "(StepLR, ExponentialLR, ReduceLROnPlateau) compounds with them, and the LR no longer follows "
                    "the decisions alone. Pass FastFaceLR(..., compose=True) to let the other scheduler set the LR and "
                    "FastFaceLR scale it by its decisions, exactly; stop stepping the other one; or, when the change "
                    "is wanted, pass check_lr_changes=False.")

    @staticmethod
    def _as_float(loss: Any) -> float:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ConfigurationError(
                    f"loss must be a scalar (one element), got a tensor of shape {tuple(loss.shape)}; "
                    "pass the mean loss of the optimizer step")
            return loss.item()
        try:
            return float(loss)
        except (TypeError, ValueError) as error:
            raise ConfigurationTypeError(f"loss must be a real number or a one-element tensor, got {loss!r}") from error

    def _skip_nonfinite(self, loss: float) -> float:
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(f"the training loss at optimizer step {self.last_step} is {loss}. Fix the "
                                     "divergence (lower LR, gradient clipping) or pass on_nonfinite='skip' to skip "
                                     "such steps")
        self.num_nonfinite += 1
        if self.first_nonfinite_step is None:
            self.first_nonfinite_step = self.last_step
            if self.warn_nonfinite:
                warnings.warn(f"FastFaceLR: non-finite loss {loss} at optimizer step {self.last_step} skipped (not "
                              "fed to the detector); further ones are counted in num_nonfinite silently.",
                              RuntimeWarning, stacklevel=3)
        return 1.0

    def _apply(self, factor: float, record: bool = True) -> None:
        self.lr_scale *= factor
        composed = {id(optimizer) for optimizer, _ in self._composed}
        for (optimizer, group), floor in zip(self._groups(), self._floors()):
            if id(optimizer) not in composed:
                _set_lr(group, self._floored(float(group["lr"]) * factor, float(group["lr"]), floor))
        if record:
            self.decisions.append((self.last_step, float(factor), self.lr_in_effect()))

    @staticmethod
    def _floored(new_lr: float, old_lr: float, floor: float | None) -> float:
        """A decay never goes below the floor, and never raises a group that is already below it."""
        if floor is None or new_lr >= old_lr:
            return new_lr
        return max(new_lr, min(old_lr, floor))

    # ------------------------------------------------------------------ composing with another scheduler
    def _hook(self, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return (optimizer.register_step_pre_hook(self._scale_before_step),
                optimizer.register_step_post_hook(self._restore_after_step))

    def _scale_before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # torch runs the hooks again for a subclass whose step() calls super().step(): scale once, outermost.
        depth = self._hook_depth.get(id(optimizer), 0)
        self._hook_depth[id(optimizer)] = depth + 1
        if not depth:
            self._scale(optimizer)

    def _restore_after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        depth = self._hook_depth.get(id(optimizer), 1) - 1
        self._hook_depth[id(optimizer)] = depth
        if not depth:
            self._unscale(optimizer)

    def _scale(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._own_lrs:  # already scaled (since scale_composed)
            return
        groups = optimizer.param_groups
        self._own_lrs[id(optimizer)] = [group["lr"] for group in groups]
        floors = dict(zip(map(id, (g for _, g in self._groups())), self._floors()))
        for group in groups:
            own = float(group["lr"])
            _set_lr(group, self._floored(own * self.lr_scale, own, floors[id(group)]))

    def _unscale(self, optimizer: torch.optim.Optimizer) -> None:
        for group, own in zip(optimizer.param_groups, self._own_lrs.pop(id(optimizer), [])):
            _set_lr(group, float(own))

    def scale_composed(self) -> None:
        """Puts the LR in effect into the composed optimizers' groups now, until their next step ends (or
        :meth:`unscale_composed`): what an LR monitor reads before the step is then the LR the step uses."""
        for optimizer, _ in self._composed:
            self._scale(optimizer)

    def unscale_composed(self) -> None:
        """Gives the composed optimizers' groups back the other scheduler's LR."""
        for optimizer, _ in self._composed:
            self._unscale(optimizer)

    def rescale(self) -> None:
        """Applies ``lr_scale`` to optimizers that start from their base LR (built again by a second fit, or
        new ones given a loaded state): the groups then hold the LR the decisions so far had left them."""
        composed = {id(optimizer) for optimizer, _ in self._composed}
        for (optimizer, group), floor in zip(self._groups(), self._floors()):
            if id(optimizer) not in composed:
                lr = float(group["lr"])
                _set_lr(group, self._floored(lr * self.lr_scale, lr, floor))

    def close(self) -> None:
        """Removes the optimizer step hooks of ``compose`` (the optimizers keep the other scheduler's LR)."""
        self.unscale_composed()
        for _, handles in self._composed:
            for handle in handles:
                handle.remove()
        self._composed = []
        self._first_composed = False

    # ------------------------------------------------------------------ reading
    def lrs_in_effect(self) -> list[float]:
        """The LR every parameter group uses at its next step (with ``compose``: the other scheduler's LR
        times the scale, floored)."""
        composed = {id(optimizer) for optimizer, _ in self._composed}
        out = []
        for (optimizer, group), floor in zip(self._groups(), self._floors()):
            lr = float(group["lr"])
            out.append(self._floored(lr * self.lr_scale, lr, floor) if id(optimizer) in composed else lr)
        return out

    def lr_in_effect(self) -> float:
        """The LR the first parameter group of the first optimizer uses at its next step (cheap: one group)."""
        group = self.optimizers[0].param_groups[0]
        lr = float(group["lr"])
        if self._first_composed:
            return self._floored(lr * self.lr_scale, lr, None if self.min_lrs is None else self.min_lrs[0])
        return lr

    def get_last_lr(self) -> list[float]:
        """The LR of every parameter group after the last step (as ReduceLROnPlateau)."""
        return self.lrs_in_effect()

    def _groups(self) -> list[tuple[torch.optim.Optimizer, dict[str, Any]]]:
        return [(optimizer, group) for optimizer in self.optimizers for group in optimizer.param_groups]

    def _floors(self) -> list[float | None]:
        return self.min_lrs if self.min_lrs is not None else [None] * len(self._groups())

    @staticmethod
    def _resolve_min_lr(min_lr: Any, num_groups: int) -> list[float] | None:
        if min_lr is None:
            return None
        values = list(min_lr) if isinstance(min_lr, (list, tuple)) else [min_lr] * num_groups
        if len(values) != num_groups:
            raise ConfigurationError(f"min_lr must be one float or {num_groups} (one per parameter group), "
                                     f"got {len(values)} values")
        return [check_real("min_lr", value, 0.0, low_open=False) for value in values]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Scheduler and detector state as plain Python values (the LRs themselves live in the optimizers)."""
        return {
            "version": _STATE_VERSION,
            "detector": self.detector.state_dict(),
            "patience_fraction": self.patience_fraction,
            "total_steps": self.total_steps,
            "min_lrs": self.min_lrs,
            "on_nonfinite": self.on_nonfinite,
            "last_step": self.last_step,
            "num_nonfinite": self.num_nonfinite,
            "first_nonfinite_step": self.first_nonfinite_step,
            "lr_scale": self.lr_scale,
            "decisions": [list(d) for d in self.decisions],
            "ending": self.ending.state_dict(),
            "scale_before_cooldown": self.scale_before_cooldown,
            "horizon_steps": self.horizon_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` (the detector with its settings); load the optimizers' state too.

        Raises:
            SchedulerStateError: naming the key, for a state of another version or detector, or a bad value.
        """
        for name, value in read_state(state, self.detector).items():
            setattr(self, name, value)
        self._lrs_left = None  # the optimizers' state is loaded beside this one: their LR is taken as it is

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(detector={self.detector!r}, {self.ending!r}, min_lrs={self.min_lrs}, "
                f"on_nonfinite={self.on_nonfinite!r}, last_step={self.last_step})")


def read_state(state: Mapping[str, Any], detector: Detector) -> dict[str, Any]:
    """Checks a :meth:`FastFaceLR.state_dict` and loads its detector state into ``detector``; returns the other
    values by attribute name. Needs no optimizer: the callback checks a loaded state with it.

    Raises:
        SchedulerStateError: naming the key, for a state of another version or detector, or a bad value.
    """
    check_state(state, "FastFaceLR", _STATE_VERSION)
    with loading("FastFaceLR"):
        detector_state = required(state, "detector")
        total = check_int("state['total_steps']", required(state, "total_steps"), 1, allow_none=True,
                          none_means="unknown")
        min_lrs = required(state, "min_lrs")
        if min_lrs is not None:
            if not isinstance(min_lrs, (list, tuple)):
                raise ConfigurationError(f"state['min_lrs'] must be a list of floats or None, got {min_lrs!r}")
            min_lrs = [check_real("state['min_lrs']", value, 0.0, low_open=False) for value in min_lrs]
        try:
            decisions = [(int(s), float(f), float(lr)) for s, f, lr in required(state, "decisions")]
        except (TypeError, ValueError):
            raise ConfigurationError("state['decisions'] must be a list of [step, factor, lr] triples, got "
                                     f"{state.get('decisions')!r}") from None
        ending = RunEnding()
        ending.load_state_dict(required(state, "ending"))
        values = {
            "patience_fraction": check_real("state['patience_fraction']", required(state, "patience_fraction"), 0.0,
                                            1.0, allow_none=True),
            "total_steps": total,
            "min_lrs": min_lrs,
            "on_nonfinite": check_choice("state['on_nonfinite']", required(state, "on_nonfinite"), NONFINITE_POLICIES),
            "last_step": check_int("state['last_step']", required(state, "last_step"), 0),
            "num_nonfinite": check_int("state['num_nonfinite']", required(state, "num_nonfinite"), 0),
            "first_nonfinite_step": check_int("state['first_nonfinite_step']", state.get("first_nonfinite_step"), 1,
                                              allow_none=True, none_means="none yet"),
            "decisions": decisions,
            "lr_scale": check_real("state['lr_scale']", required(state, "lr_scale"), 0.0),
            "ending": ending,
            "scale_before_cooldown": check_real("state['scale_before_cooldown']", state.get("scale_before_cooldown"),
                                                0.0, allow_none=True),
            "horizon_steps": check_int("state['horizon_steps']", state.get("horizon_steps"), 1, allow_none=True,
                                       none_means="none"),
        }
        detector.load_state_dict(detector_state)
    return values


class LRChangedError(UsageError, RuntimeError):
    """The LR of a group FastFaceLR owns was changed by something else (see ``check_lr_changes``)."""


class SteppedWithoutLossError(ConfigurationTypeError):
    """FastFaceLR handed to code that steps schedulers without the loss (a ``TypeError``)."""


_STEPPED_FOR_YOU = (
    "FastFaceLR is stepped with the loss of each optimizer step (scheduler.step(loss)), so it cannot be handed to "
    "code that steps schedulers for you without the loss. In Lightning, do not return it from configure_optimizers "
    "(automatic optimization steps it without the loss; under manual optimization too, Lightning refuses a scheduler "
    "that has no optimizer attribute): add fastface_pl.FastFaceLRCallback to the Trainer's callbacks (it reads the "
    "loss in blocks, with no host sync per step, and composes with a warm-up scheduler). In a plain loop, do not "
    "wrap it in ChainedScheduler or SequentialLR: step the other scheduler yourself and build "
    "FastFaceLR(..., compose=True).")


def _set_lr(group: dict[str, Any], value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value
