"""Stationarity detectors that drive the FastFace and Moving Haar learning-rate schedules.

Both detectors are pure arithmetic: they import neither torch nor Lightning (nor numpy), so they can
be read, tested and reused in any training loop. Feed them one training loss per *optimizer* step;
``update`` returns the factor by which to multiply the learning rate (LR) from the next step on.

The exact method is specified in ``docs/scheduler.md`` of the project (FastFace, arXiv 2404.11118):

* :class:`FastFaceDetector`: loss EMA (α) → Haar difference → EMA (β), computed with the paper's
  O(1) recurrence; stationary while the signal D^E_t is below λ; decays the LR by δ after more than
  P consecutive stationary steps, at most K times.
* :class:`MovingHaarDetector`: the first version of the method (MHLR): a moving average over m
  losses, a Haar signal over the last m averages, threshold θ, patience 2m, and a restart that
  raises the LR by δ^(R−1) after R decays within one unbroken stationary run.

Example::

    >>> from fastface_pl.scheduling.detectors import build_detector
    >>> detector = build_detector("fastface", patience=2)
    >>> lr = 0.02
    >>> for loss in [5.0, 5.0, 5.0, 5.0, 5.0]:
    ...     lr *= detector.update(loss)
    >>> detector.num_reductions, lr
    (1, 0.01)

A detector keeps only what detection needs. The decisions, the LR scale and the optimizer-step numbering
belong to whoever applies the factors (:class:`~fastface_pl.scheduling.lr_scheduler.FastFaceLR`, or
:func:`~fastface_pl.scheduling.replay.replay` for a logged curve).
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Literal, Mapping, Protocol, get_args, runtime_checkable

from fastface_pl.errors import ConfigurationError, ConfigurationTypeError, DivergenceError
from fastface_pl.scheduling.saved_state import SchedulerStateError, check_state, loading, required
from fastface_pl.argument_checks import check_int, check_real

__all__ = ["Detector", "FastFaceDetector", "MovingHaarDetector", "NonFiniteLossError", "build_detector",
           "detector_class", "detector_name", "DETECTOR_NAMES", "PAPER_ALPHA", "PAPER_THRESHOLD",
           "PAPER_PATIENCE_FRACTION"]

STATE_VERSION = 1

#: The FastFace paper's settings (docs/scheduler.md): α = β, λ, and τ (P = int(τ·T)).
PAPER_ALPHA = 1e-3
PAPER_THRESHOLD = 5e-5
PAPER_PATIENCE_FRACTION = 0.05


class NonFiniteLossError(DivergenceError, FloatingPointError):
    """A NaN or infinite training loss reached a detector or :class:`FastFaceLR` (set to raise).

    The one exception type for this condition at every entry point: the run diverged.
    """


@runtime_checkable
class Detector(Protocol):
    """What :class:`~fastface_pl.scheduling.lr_scheduler.FastFaceLR` and the callback need from a detector.

    ``update`` takes the loss of one optimizer step and returns the factor for the LR from the next step
    on (1.0 when nothing is decided). The read-only signals are logged; ``hyperparameters`` are the
    constructor arguments, which ``state_dict`` also holds, so that ``load_state_dict`` of a state with
    some of them replaced continues the stream under the new settings.
    """

    def update(self, loss: float) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    @property
    def hyperparameters(self) -> dict[str, Any]: ...

    @property
    def threshold(self) -> float: ...

    @property
    def patience(self) -> int: ...

    @property
    def steps_seen(self) -> int: ...

    @property
    def smoothed_loss(self) -> float | None: ...

    @property
    def signal(self) -> float | None: ...

    @property
    def stationary_count(self) -> int: ...



def as_finite_loss(loss: Any) -> float:
    """``loss`` as a finite float: TypeError when it is no number, NonFiniteLossError when NaN or infinite."""
    if type(loss) is not float:
        try:
            loss = float(loss)
        except (TypeError, ValueError) as error:
            raise ConfigurationTypeError(
                f"loss must be a real number (a Python float, int or 0-d array/tensor), got {loss!r}; "
                "convert it with float(...) first"
            ) from error
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss must be finite, got {loss!r}; the detector state is unchanged. Filter non-finite losses "
            "before calling update() (FastFaceLR and FastFaceLRCallback skip them by default)."
        )
    return loss


def _finite_state_value(state: Mapping[str, Any], key: str, allow_none: bool = False) -> float | None:
    """``state[key]`` as a finite float (or None when ``allow_none``); SchedulerStateError otherwise."""
    value = required(state, key)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SchedulerStateError(f"state[{key!r}] must be a finite number here, got {value!r}; the state is corrupt")
    return float(value)


# --------------------------------------------------------------------------------------------------
# What both detectors share: common state, read-only properties, state plumbing, pickling and repr
# --------------------------------------------------------------------------------------------------
class _StationarityDetector:
    """Common state (losses seen, stationary count, reductions made), read-only views and state plumbing.

    A subclass lists its constructor arguments in ``_HYPERPARAMETERS`` (each readable as a property),
    and implements ``_checked`` (the checked settings), ``_reset_state`` (calling this one), ``update``,
    ``_state_body`` and ``_load_state_body`` (its own running state).
    """

    _HYPERPARAMETERS: tuple[str, ...] = ()
    _steps: int
    _count: int
    _reductions: int

    @classmethod
    def check_settings(cls, **kwargs: Any) -> dict[str, Any]:
        """The hyperparameters ``cls(**kwargs)`` would have (defaults filled in), checked, without building one.

        Raises:
            TypeError: an unknown or missing argument, or a value of the wrong type.
            ValueError: a value out of range.
        """
        bound = inspect.signature(cls.__init__).bind(None, **kwargs)
        bound.apply_defaults()
        return cls._checked(**{name: bound.arguments[name] for name in cls._HYPERPARAMETERS})

    @staticmethod
    def _checked(**settings: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _configure(self, **settings: Any) -> None:
        for name, value in self._checked(**settings).items():
            setattr(self, f"_{name}", value)

    def _reset_state(self) -> None:
        self._steps = 0
        self._smoothed: float | None = None
        self._signal: float | None = None
        self._count = 0
        self._reductions = 0

    # Read-only views; the subclass docstrings say what the symbols stand for (λ/θ, L^E_t/a_t, D^E_t/S_t).
    @property
    def threshold(self) -> float:
        """λ (FastFace) or θ (Moving Haar): a step whose signal is below it is stationary."""
        return self._threshold

    @property
    def patience(self) -> int:
        """P: consecutive stationary steps tolerated before a decision."""
        return self._patience

    @property
    def decay(self) -> float:
        """δ: a decision that decays the LR multiplies it by 1/δ."""
        return self._decay

    @property
    def max_decays(self) -> int | None:
        """The most LR reductions ever made (None: unlimited)."""
        return self._max_decays

    @property
    def steps_seen(self) -> int:
        """Number of losses fed so far (the detector's own t; non-finite losses never reach it)."""
        return self._steps

    @property
    def smoothed_loss(self) -> float | None:
        """FastFace: L^E_t, the loss EMA. Moving Haar: a_t, the mean of the last m losses. None before."""
        return self._smoothed

    @property
    def signal(self) -> float | None:
        """FastFace: D^E_t, the smoothed Haar difference. Moving Haar: S_t, the Haar signal. None before."""
        return self._signal

    @property
    def stationary_count(self) -> int:
        """Consecutive stationary steps since the last reset or decision."""
        return self._count

    @property
    def num_reductions(self) -> int:
        """LR reductions (factors 1/δ) returned so far: what ``max_decays`` caps."""
        return self._reductions

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments, by name (patience resolved)."""
        return {name: getattr(self, name) for name in self._HYPERPARAMETERS}

    # ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as plain Python values (JSON- and pickle-able), hyperparameters included.

        Moving Haar stores its ring buffers and running sums as they are, so a resumed detector
        continues bit for bit like an uninterrupted one.
        """
        state: dict[str, Any] = {"type": type(self).__name__, "version": STATE_VERSION}
        state.update(self.hyperparameters)
        state["steps_seen"] = self._steps
        state["stationary_count"] = self._count
        state["num_reductions"] = self._reductions
        state.update(self._state_body())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict`, hyperparameters included, so the stream continues exactly.

        Raises:
            SchedulerStateError: the state comes from another detector type or a newer version, lacks a key, or
                holds an invalid value (for Moving Haar: buffers that do not match its window).
        """
        owner = type(self).__name__
        check_state(state, owner, STATE_VERSION, type_name=owner)
        with loading(owner):
            self._configure(**{name: required(state, name) for name in self._HYPERPARAMETERS})
            self._reset_state()
            self._steps = check_int("state['steps_seen']", required(state, "steps_seen"), 0)
            self._count = check_int("state['stationary_count']", required(state, "stationary_count"), 0)
            self._reductions = check_int("state['num_reductions']", required(state, "num_reductions"), 0)
            self._load_state_body(state)

    def __getstate__(self) -> dict[str, Any]:
        return self.state_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in self.hyperparameters.items())
        return (f"{type(self).__name__}({arguments}) [steps_seen={self._steps}, "
                f"stationary_count={self._count}, num_reductions={self._reductions}]")


# --------------------------------------------------------------------------------------------------
# FastFace (O(1) time and memory)
# --------------------------------------------------------------------------------------------------
class FastFaceDetector(_StationarityDetector):
    """FastFace stationarity detector: the paper's O(1) recurrence, decays the LR on stationary loss.

    Per optimizer step t (0-based) with loss L_t:

    * loss EMA L^E_t = α·L_t + (1−α)·L^E_{t−1}, L^E_0 = L_0 (``smoothed_loss``);
    * signal D^E_t = (2−α−β)·D^E_{t−1} − (1−α)(1−β)·D^E_{t−2} + α·β·(L_{t−1} − L_t) for t ≥ 2, seeded
      with D^E_0 = D^E_1 = α·(L_0 − L_1) (``signal``; equals EMA_β of the Haar difference of the loss
      EMA exactly). It is positive while the loss falls;
    * step t ≥ 1 is stationary when D^E_t < λ. After more than ``patience`` (P) consecutive stationary
      steps (on the (P+1)-th) the detector returns 1/δ and restarts the count from 0; a non-stationary
      step resets the count. At most ``max_decays`` (K) decisions are made.
    * with ``wait_for_descent`` (the opening-transient guard, docs/scheduler.md): no step counts as
      stationary until the loss EMA has fallen below its highest value so far by λ·P, what a loss
      falling at the threshold slope sheds in one patience. A margin loss that sits flat, or rises, in
      its first steps has not *stopped* falling; it has not started. Off by default (the paper's rule);
      the auto rule turns it on.

    Args:
        alpha: α, smoothing of the loss EMA, in (0, 1].
        beta: β, smoothing of the Haar difference, in (0, 1].
        threshold: λ, in loss units per step (5e-5 suits ArcFace/CosFace with scale s = 64).
        patience: P, consecutive stationary steps tolerated; the paper uses P = int(τ·T) with τ = 0.05
            and T the run's total optimizer steps.
        decay: δ > 1; a decision multiplies the LR by 1/δ.
        max_decays: K, the most decisions ever made (None: unlimited).
        wait_for_descent: count stationary steps only once the signal has reached λ (see above).

    Raises:
        TypeError: a setting that is not a number (or a flag that is not a bool).
        ValueError: a setting out of its range, named with the range.

    Example::

        >>> detector = FastFaceDetector(patience=1)
        >>> [detector.update(loss) for loss in (3.0, 3.0, 3.0, 3.0)]
        [1.0, 1.0, 0.5, 1.0]

    .. note::
        ``patience`` counts optimizer steps, not epochs, and the first decision comes on the
        (P+1)-th stationary step. After ``max_decays`` decisions the count keeps growing while the
        loss is stationary but nothing more is decided.
    """

    _HYPERPARAMETERS = ("alpha", "beta", "threshold", "patience", "decay", "max_decays", "wait_for_descent")

    def __init__(self, alpha: float = PAPER_ALPHA, beta: float = PAPER_ALPHA, threshold: float = PAPER_THRESHOLD, *,
                 patience: int, decay: float = 2.0, max_decays: int | None = 8,
                 wait_for_descent: bool = False) -> None:
        self._configure(alpha=alpha, beta=beta, threshold=threshold, patience=patience, decay=decay,
                        max_decays=max_decays, wait_for_descent=wait_for_descent)
        self._reset_state()

    @staticmethod
    def _checked(alpha, beta, threshold, patience, decay, max_decays, wait_for_descent) -> dict[str, Any]:
        if not isinstance(wait_for_descent, bool):
            raise ConfigurationTypeError(f"wait_for_descent must be True or False, got {wait_for_descent!r}")
        return {"alpha": check_real("alpha", alpha, 0.0, 1.0), "beta": check_real("beta", beta, 0.0, 1.0),
                "threshold": check_real("threshold", threshold), "patience": check_int("patience", patience, 0),
                "decay": check_real("decay", decay, 1.0),
                "max_decays": check_int("max_decays", max_decays, 0, allow_none=True, none_means="unlimited"),
                "wait_for_descent": wait_for_descent}

    def _reset_state(self) -> None:
        super()._reset_state()
        self._last_loss: float | None = None  # L_{t-1}
        self._signal_prev: float | None = None  # D^E_{t-2}
        self._descended = False  # the loss EMA has fallen by λ·P below its peak (wait_for_descent)
        self._peak = -math.inf  # the highest loss EMA so far, while waiting for the descent

    # ---------------------------------------------------------------------------------------------
    def update(self, loss: float) -> float:
        """Feeds the loss of one optimizer step.

        Args:
            loss: the finite training loss L_t of this step.

        Returns:
            The factor for the LR from the next step on: 1.0, or 1/δ on a decision.

        Raises:
            NonFiniteLossError: ``loss`` is NaN or infinite (the state is left unchanged).
            TypeError: ``loss`` is not a number.
        """
        if type(loss) is not float or not math.isfinite(loss):  # the common case skips a call
            loss = as_finite_loss(loss)
        self._steps += 1
        alpha, beta = self._alpha, self._beta
        if self._steps == 1:
            self._smoothed = self._last_loss = loss
            return 1.0
        if self._steps == 2:  # consistent seed: D^E_0 = D^E_1 = α·(L_0 − L_1)
            signal = previous = alpha * (self._last_loss - loss)
        else:
            previous = self._signal
            signal = ((2.0 - alpha - beta) * previous - (1.0 - alpha) * (1.0 - beta) * self._signal_prev
                      + alpha * beta * (self._last_loss - loss))
        self._signal_prev, self._signal = previous, signal
        self._last_loss = loss
        self._smoothed = alpha * loss + (1.0 - alpha) * self._smoothed
        if self._wait_for_descent and not self._descended:
            # the opening transient: no step counts until the loss EMA has fallen below its highest value
            # by λ·P, what a loss falling at the threshold slope sheds over one patience
            self._peak = max(self._peak, self._smoothed)
            if self._peak - self._smoothed < self._threshold * max(1, self._patience):
                return 1.0
            self._descended = True
        if signal >= self._threshold:
            self._count = 0
            return 1.0
        self._count += 1
        if self._count <= self._patience:
            return 1.0
        return self._decide()

    def _decide(self) -> float:
        """The factor of a decision due now: 1/δ, or 1.0 once ``max_decays`` reductions are made."""
        if self._max_decays is not None and self._reductions >= self._max_decays:
            return 1.0  # the count keeps growing while the loss is stationary
        self._count = 0
        self._reductions += 1
        return 1.0 / self._decay

    @property
    def alpha(self) -> float:
        """α, smoothing of the loss EMA."""
        return self._alpha

    @property
    def beta(self) -> float:
        """β, smoothing of the Haar difference."""
        return self._beta

    @property
    def wait_for_descent(self) -> bool:
        """Whether stationary steps count only once the loss EMA has fallen by λ·P below its peak (the guard)."""
        return self._wait_for_descent

    @property
    def descended(self) -> bool:
        """Whether the loss EMA has fallen by λ·P below its peak (only tracked with ``wait_for_descent``)."""
        return self._descended

    # ---------------------------------------------------------------------------------------------
    def _state_body(self) -> dict[str, Any]:
        return {
            "smoothed_loss": self._smoothed,
            "last_loss": self._last_loss,
            "signal": self._signal,
            "signal_prev": self._signal_prev,
            "descended": self._descended,
            "peak": None if self._peak == -math.inf else self._peak,
        }

    def _load_state_body(self, state: Mapping[str, Any]) -> None:
        if self._steps >= 1:
            self._smoothed = _finite_state_value(state, "smoothed_loss")
            self._last_loss = _finite_state_value(state, "last_loss")
        if self._steps >= 2:
            self._signal = _finite_state_value(state, "signal")
            self._signal_prev = _finite_state_value(state, "signal_prev")
        descended = required(state, "descended")
        if not isinstance(descended, bool):
            raise ConfigurationError(f"state['descended'] must be True or False, got {descended!r}")
        self._descended = descended
        peak = _finite_state_value(state, "peak", allow_none=True)
        self._peak = -math.inf if peak is None else peak


# --------------------------------------------------------------------------------------------------
# Moving Haar (MHLR): O(1) time per step, O(window) memory
# --------------------------------------------------------------------------------------------------
class MovingHaarDetector(_StationarityDetector):
    """Moving Haar stationarity detector (MHLR, the first version of FastFace), with restarts.

    Per optimizer step t (0-based) with loss y_t and window m, h = floor(m/2):

    * moving average a_t = mean(y_{t−m+1} … y_t) for t ≥ m−1 (``smoothed_loss``);
    * for t ≥ 2m, the Haar signal over the m averages *before* step t (``signal``)
      S_t = (Σ a_{t−m} … a_{t−m+h−1} − Σ a_{t−m+h} … a_{t−1}) / m (older half minus newer half);
      steps t < 2m neither count nor reset;
    * stationary when S_t < θ. A non-stationary step resets the count and the run counter r. On the
      (P+1)-th consecutive stationary step the detector decides and restarts the count from 0: if
      r ≥ R it returns δ^(r−1) (a restart, ×4 for δ = 2, R = 3) and sets r = 0, else 1/δ and r += 1.

    Running sums over two ring buffers make each update O(1); they are recomputed exactly
    (``math.fsum``) once per window, so rounding does not drift over long runs.

    Args:
        window: m, the number of losses averaged and of averages in the Haar kernel (≥ 2).
        threshold: θ, in loss units (0.06 in the published runs, with ArcFace s = 64).
        patience: P, consecutive stationary steps tolerated (None: 2·m).
        decay: δ > 1.
        restart_after: R, decays within one stationary run before the restart ×δ^(R−1)
            (None: never restart).
        max_decays: the most LR *reductions* (1/δ decisions) ever made (None: unlimited); once
            reached, no further decision (restart included) is made.

    Raises:
        TypeError: a setting that is not a number.
        ValueError: a setting out of its range, named with the range.

    Example::

        >>> detector = MovingHaarDetector(window=2, patience=0)
        >>> [detector.update(loss) for loss in (3.0, 3.0, 3.0, 3.0, 3.0)]
        [1.0, 1.0, 1.0, 1.0, 0.5]

    .. note::
        S_t uses the averages up to a_{t−1}, not the loss of step t itself (as in the published
        runs). With an odd window the newer half holds one average more than the older one.
    """

    _HYPERPARAMETERS = ("window", "threshold", "patience", "decay", "restart_after", "max_decays")

    def __init__(self, window: int, threshold: float = 0.06, patience: int | None = None,
                 decay: float = 2.0, restart_after: int | None = 3, max_decays: int | None = None) -> None:
        self._configure(window=window, threshold=threshold, patience=patience, decay=decay,
                        restart_after=restart_after, max_decays=max_decays)
        self._reset_state()

    @staticmethod
    def _checked(window, threshold, patience, decay, restart_after, max_decays) -> dict[str, Any]:
        window = check_int("window", window, 2)
        patience = check_int("patience", patience, 0, allow_none=True, none_means="2*window")
        return {"window": window, "threshold": check_real("threshold", threshold),
                "patience": 2 * window if patience is None else patience, "decay": check_real("decay", decay, 1.0),
                "restart_after": check_int("restart_after", restart_after, 1, allow_none=True,
                                           none_means="never restart"),
                "max_decays": check_int("max_decays", max_decays, 0, allow_none=True, none_means="unlimited")}

    def _configure(self, **settings: Any) -> None:
        super()._configure(**settings)
        self._half = self._window // 2

    def _reset_state(self) -> None:
        super()._reset_state()
        m = self._window
        self._losses = [0.0] * m
        self._loss_pos = 0
        self._loss_sum = 0.0
        self._averages = [0.0] * m
        self._avg_pos = 0
        self._num_averages = 0
        self._sum_old = 0.0
        self._sum_new = 0.0
        self._run = 0

    # ---------------------------------------------------------------------------------------------
    def update(self, loss: float) -> float:
        """Feeds the loss of one optimizer step.

        Args:
            loss: the finite training loss y_t of this step.

        Returns:
            The factor for the LR from the next step on: 1.0, 1/δ, or δ^(r−1) on a restart.

        Raises:
            NonFiniteLossError: ``loss`` is NaN or infinite (the state is left unchanged).
            TypeError: ``loss`` is not a number.
        """
        if type(loss) is not float or not math.isfinite(loss):  # the common case skips a call
            loss = as_finite_loss(loss)
        t = self._steps  # 0-based index of this loss
        self._steps += 1
        m = self._window
        # S_t from the averages a_{t−m} … a_{t−1}, before y_t enters.
        signal = (self._sum_old - self._sum_new) / m if t >= 2 * m else None
        if signal is not None:
            self._signal = signal

        # y_t enters the loss window; a_t enters the average window.
        losses, pos = self._losses, self._loss_pos
        self._loss_sum += loss - losses[pos]
        losses[pos] = loss
        pos = (pos + 1) % m
        self._loss_pos = pos
        if pos == 0:
            self._loss_sum = math.fsum(losses)  # exact refresh once per window: no drift
        if t >= m - 1:  # a_t enters the ring of the last m averages; the two Haar half-sums follow it
            average = self._smoothed = self._loss_sum / m
            averages, pos = self._averages, self._avg_pos
            if self._num_averages == m:
                # a_{t−m} leaves the older half; a_{t−m+h} moves from the newer half to the older one.
                oldest, moving = averages[pos], averages[(pos + self._half) % m]
                self._sum_old += moving - oldest
                self._sum_new += average - moving
            else:
                self._num_averages += 1
            averages[pos] = average
            pos = (pos + 1) % m
            self._avg_pos = pos
            if pos == 0:
                self._refresh_haar_sums(0)  # exact sums once per window (and when the ring first fills)

        if signal is None:  # the first 2·m steps neither count nor reset
            return 1.0
        if signal >= self._threshold:
            self._count = 0
            self._run = 0
            return 1.0
        self._count += 1
        if self._count <= self._patience:
            return 1.0
        return self._decide()

    def _refresh_haar_sums(self, oldest_pos: int) -> None:
        ordered = self._averages[oldest_pos:] + self._averages[:oldest_pos]
        self._sum_old = math.fsum(ordered[:self._half])
        self._sum_new = math.fsum(ordered[self._half:])

    def _decide(self) -> float:
        """The factor of a decision due now: 1/δ, a restart's δ^(r−1), or 1.0 once ``max_decays`` reductions
        are made."""
        if self._max_decays is not None and self._reductions >= self._max_decays:
            return 1.0  # no reduction left: no decision at all, restart included
        if self._restart_after is not None and self._run >= self._restart_after:
            factor = self._decay ** (self._run - 1)
            self._run = 0
        else:
            factor = 1.0 / self._decay
            self._run += 1
            self._reductions += 1
        self._count = 0
        return factor

    @property
    def window(self) -> int:
        """m: losses per moving average and averages per Haar kernel."""
        return self._window

    @property
    def restart_after(self) -> int | None:
        """R: decays within one stationary run before the restart (None: never)."""
        return self._restart_after

    @property
    def run_decays(self) -> int:
        """r: decays in the current unbroken stationary run since the last restart."""
        return self._run

    # ---------------------------------------------------------------------------------------------
    def _state_body(self) -> dict[str, Any]:
        return {
            "losses": list(self._losses),
            "loss_pos": self._loss_pos,
            "loss_sum": self._loss_sum,
            "averages": list(self._averages),
            "average_pos": self._avg_pos,
            "num_averages": self._num_averages,
            "sum_old": self._sum_old,
            "sum_new": self._sum_new,
            "smoothed_loss": self._smoothed,
            "signal": self._signal,
            "run_decays": self._run,
        }

    def _load_state_body(self, state: Mapping[str, Any]) -> None:
        m = self._window
        losses = [float(x) for x in required(state, "losses")]
        averages = [float(x) for x in required(state, "averages")]
        if len(losses) != m or len(averages) != m:
            raise ConfigurationError(f"state buffers hold {len(losses)} losses and {len(averages)} averages, "
                                     f"expected {m} each (window={m}); the state is corrupt")
        if not all(math.isfinite(x) for x in losses + averages):
            raise ConfigurationError("state buffers contain non-finite values; the state is corrupt")
        self._losses = losses
        self._averages = averages
        self._loss_pos = check_int("state['loss_pos']", required(state, "loss_pos"), 0) % m
        self._avg_pos = check_int("state['average_pos']", required(state, "average_pos"), 0) % m
        self._num_averages = min(check_int("state['num_averages']", required(state, "num_averages"), 0), m)
        self._loss_sum = _finite_state_value(state, "loss_sum")
        self._sum_old = _finite_state_value(state, "sum_old")
        self._sum_new = _finite_state_value(state, "sum_new")
        self._smoothed = _finite_state_value(state, "smoothed_loss", allow_none=True)
        self._signal = _finite_state_value(state, "signal", allow_none=True)
        self._run = check_int("state['run_decays']", required(state, "run_decays"), 0)


DetectorName = Literal["fastface", "moving_haar"]
DETECTOR_NAMES = get_args(DetectorName)
_DETECTORS = dict(zip(DETECTOR_NAMES, (FastFaceDetector, MovingHaarDetector)))


def detector_name(name: str) -> str:
    """The name of :data:`DETECTOR_NAMES` that ``name`` spells (``-`` and case are forgiven); ValueError if none."""
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in _DETECTORS:
        raise ConfigurationError(f"Unknown detector {name!r}. Only {', '.join(repr(n) for n in DETECTOR_NAMES)} "
                                 "are supported.")
    return key


def detector_class(name: str) -> type:
    """The detector class of a name (``"fastface"``, ``"moving_haar"``; ``-`` and case are forgiven)."""
    return _DETECTORS[detector_name(name)]


def build_detector(name: str, **kwargs: Any) -> Detector:
    """Builds a detector by name.

    Args:
        name: ``"fastface"`` (:class:`FastFaceDetector`) or ``"moving_haar"`` (:class:`MovingHaarDetector`).
        **kwargs: the detector's arguments.

    Example::

        >>> build_detector("moving_haar", window=4000)
        MovingHaarDetector(window=4000, threshold=0.06, patience=8000, decay=2.0, restart_after=3, max_decays=None) [steps_seen=0, stationary_count=0, num_reductions=0]
    """
    return detector_class(name)(**kwargs)
