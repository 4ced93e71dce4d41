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
    >>> detector.decisions, lr
    ([(4, 0.5)], 0.01)
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Union

__all__ = ["FastFaceDetector", "MovingHaarDetector", "build_detector", "Detector", "DETECTOR_NAMES"]

STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Argument checks (shared)
# --------------------------------------------------------------------------------------------------
def _check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = True, high_open: bool = False, allowed: str) -> float:
    """Returns ``value`` as a finite float inside the given interval, else raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a real number in {allowed}, got {value!r}")
    number = float(value)
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ValueError(f"`{name}` must be a finite number in {allowed}, got {value!r}")
    return number


def _check_int(name: str, value: Any, *, minimum: int, allow_none: bool = False,
               none_means: str = "") -> int | None:
    """Returns ``value`` as an int ≥ ``minimum`` (or None where allowed), else raises ValueError."""
    if value is None and allow_none:
        return None
    allowed = f"an integer >= {minimum}" + (f" or None ({none_means})" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return int(value)


def _as_loss(loss: Any) -> float:
    """Converts a loss to float (slow path: anything that is not already a Python float)."""
    try:
        return float(loss)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`loss` must be a real number (a Python float, int or 0-d array/tensor), got {loss!r}; "
            "convert it with float(...) first"
        ) from error


def _nonfinite_error(loss: float, steps_seen: int) -> ValueError:
    return ValueError(
        f"`loss` must be finite, got {loss!r} at step {steps_seen + 1}; the detector state is unchanged. "
        "Filter non-finite losses before calling update() (FastFaceLR and FastFaceLRCallback skip them)."
    )


def _check_state_header(state: dict, expected_type: str) -> int:
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict from {expected_type}.state_dict(), got {type(state).__name__}")
    found = state.get("type")
    if found != expected_type:
        raise ValueError(
            f"state was saved by detector type {found!r}, cannot load it into {expected_type}; "
            f"build a {found} instead (build_detector) or pass a state from {expected_type}.state_dict()"
        )
    version = state.get("version", 1)
    if not isinstance(version, int) or version < 1 or version > STATE_VERSION:
        raise ValueError(
            f"state version {version!r} is not supported (this fastface_pl reads versions 1..{STATE_VERSION}); "
            "upgrade fastface_pl to load it"
        )
    return version


def _read_only(attribute: str, doc: str) -> Any:
    """A read-only property that returns ``self.<attribute>`` (a C-level getter, no Python frame)."""
    return property(operator.attrgetter(attribute), doc=doc)


def _decisions_from_state(value: Any) -> list[tuple[int, float]]:
    return [(int(step), float(factor)) for step, factor in (value or [])]


# --------------------------------------------------------------------------------------------------
# What both detectors share: read-only properties, state plumbing, pickling and repr
# --------------------------------------------------------------------------------------------------
class _StationarityDetector:
    """What both detectors share: common state, read-only properties, state_dict, pickling, repr.

    A subclass sets ``_HYPERPARAMETERS`` (its constructor arguments in order, each with a same-named
    property) and implements ``_configure`` (validation), ``_reset_state`` (calling this one),
    ``update``, ``_state_body`` and ``_load_state_body`` (its own state: steps_seen, stationary_count,
    decisions and lr_scale are saved and loaded here, before it). Its docstring says what
    ``threshold``, ``smoothed_loss`` and ``signal`` stand for there.
    """

    __slots__ = ("_threshold", "_patience", "_decay", "_max_decays", "_decay_factor",
                 "_steps", "_smoothed", "_signal", "_count", "_decisions", "_scale")

    _HYPERPARAMETERS: tuple[str, ...] = ()

    def _reset_state(self) -> None:
        self._steps = 0
        self._smoothed: float | None = None
        self._signal: float | None = None
        self._count = 0
        self._decisions: list[tuple[int, float]] = []
        self._scale = 1.0

    # ---------------------------------------------------------------------------------------------
    # Read-only views of the state; see the subclass docstrings for the symbols (λ/θ, L^E_t/a_t, D^E_t/S_t).
    threshold = _read_only("_threshold", "λ (FastFace) or θ (Moving Haar): a step with signal below it is "
                                         "stationary.")
    patience = _read_only("_patience", "P: consecutive stationary steps tolerated before a decision "
                                       "(Moving Haar: 2·m by default).")
    decay = _read_only("_decay", "δ: a decision that decays the LR multiplies it by 1/δ.")
    max_decays = _read_only("_max_decays", "The most LR reductions (1/δ decisions) ever made (None: unlimited); "
                                           "K for FastFace, whose decisions are all reductions.")
    steps_seen = _read_only("_steps", "Number of losses fed so far.")
    smoothed_loss = _read_only("_smoothed", "FastFace: L^E_t, the loss EMA (None before the first update). "
                                            "Moving Haar: a_t, the moving average of the last m losses "
                                            "(None before m losses).")
    signal = _read_only("_signal", "FastFace: D^E_t, the smoothed Haar difference (None before the second "
                                   "update). Moving Haar: S_t, the latest Haar signal (None during the first "
                                   "2·m steps).")
    stationary_count = _read_only("_count", "Consecutive stationary steps since the last reset or decision.")
    lr_scale = _read_only("_scale", "Product of all factors returned so far (the LR relative to its starting "
                                    "value).")

    @property
    def num_decisions(self) -> int:
        """Number of decisions made so far (decays, and for Moving Haar restarts)."""
        return len(self._decisions)

    @property
    def decisions(self) -> list[tuple[int, float]]:
        """(1-based step of the deciding update, factor) for every decision so far (a copy)."""
        return list(self._decisions)

    # ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as plain Python values (JSON- and pickle-able).

        Moving Haar stores its ring buffers and running sums as they are, so a resumed detector
        continues bit for bit like an uninterrupted one.
        """
        state: dict[str, Any] = {"type": type(self).__name__, "version": STATE_VERSION}
        for name in self._HYPERPARAMETERS:
            state[name] = getattr(self, name)
        state["steps_seen"] = self._steps
        state["stationary_count"] = self._count
        state.update(self._state_body())
        state["decisions"] = [list(d) for d in self._decisions]
        state["lr_scale"] = self._scale
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict`, hyperparameters included, so the stream continues exactly.

        Raises:
            ValueError: the state comes from another detector type or a newer version, or holds an
                invalid value (for Moving Haar: buffers that do not match its window).
        """
        _check_state_header(state, type(self).__name__)
        self._configure(*(state.get(name, getattr(self, name)) for name in self._HYPERPARAMETERS))
        self._reset_state()
        self._steps = _check_int("steps_seen", state.get("steps_seen", 0), minimum=0)
        self._count = _check_int("stationary_count", state.get("stationary_count", 0), minimum=0)
        self._decisions = _decisions_from_state(state.get("decisions"))
        self._scale = float(state.get("lr_scale", math.prod(f for _, f in self._decisions)))
        self._load_state_body(state)

    def __getstate__(self) -> dict[str, Any]:
        return self.state_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._configure(*(state[name] for name in self._HYPERPARAMETERS))
        self.load_state_dict(state)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._HYPERPARAMETERS)
        return (f"{type(self).__name__}({arguments}) [steps_seen={self._steps}, "
                f"stationary_count={self._count}, num_decisions={len(self._decisions)}]")


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

    Args:
        alpha: α, smoothing of the loss EMA, in (0, 1].
        beta: β, smoothing of the Haar difference, in (0, 1].
        threshold: λ, in loss units per step (5e-5 suits ArcFace/CosFace with scale s = 64).
        patience: P, consecutive stationary steps tolerated; the paper uses P = int(τ·T) with τ = 0.05
            and T the run's total optimizer steps.
        decay: δ > 1; a decision multiplies the LR by 1/δ.
        max_decays: K, the most decisions ever made (None: unlimited).

    Example::

        >>> detector = FastFaceDetector(patience=1)
        >>> [detector.update(loss) for loss in (3.0, 3.0, 3.0, 3.0)]
        [1.0, 1.0, 0.5, 1.0]

    .. note::
        ``patience`` counts optimizer steps, not epochs, and the first decision comes on the
        (P+1)-th stationary step. After ``max_decays`` decisions the count keeps growing while the
        loss is stationary but nothing more is decided.
    """

    __slots__ = ("_alpha", "_beta", "_one_minus_alpha", "_c1", "_c2", "_alpha_beta", "_decisions_left",
                 "_last_loss", "_signal_prev")

    _HYPERPARAMETERS = ("alpha", "beta", "threshold", "patience", "decay", "max_decays")

    def __init__(self, alpha: float = 1e-3, beta: float = 1e-3, threshold: float = 5e-5, *,
                 patience: int, decay: float = 2.0, max_decays: int | None = 8) -> None:
        self._configure(alpha, beta, threshold, patience, decay, max_decays)
        self._reset_state()

    def _configure(self, alpha, beta, threshold, patience, decay, max_decays) -> None:
        self._alpha = _check_real("alpha", alpha, low=0.0, high=1.0, allowed="(0, 1]")
        self._beta = _check_real("beta", beta, low=0.0, high=1.0, allowed="(0, 1]")
        self._threshold = _check_real("threshold", threshold, allowed="(-inf, inf) (finite)")
        self._patience = _check_int("patience", patience, minimum=0)
        self._decay = _check_real("decay", decay, low=1.0, allowed="(1, inf) (finite)")
        self._max_decays = _check_int("max_decays", max_decays, minimum=0, allow_none=True,
                                      none_means="unlimited")
        a, b = self._alpha, self._beta
        self._one_minus_alpha = 1.0 - a
        self._c1 = 2.0 - a - b
        self._c2 = (1.0 - a) * (1.0 - b)
        self._alpha_beta = a * b
        self._decay_factor = 1.0 / self._decay

    def _reset_state(self) -> None:
        super()._reset_state()
        self._last_loss: float | None = None
        self._signal_prev: float | None = None
        self._decisions_left = -1 if self._max_decays is None else self._max_decays

    # ---------------------------------------------------------------------------------------------
    def update(self, loss: float) -> float:
        """Feeds the loss of one optimizer step.

        Args:
            loss: the finite training loss L_t of this step.

        Returns:
            The factor for the LR from the next step on: 1.0, or 1/δ on a decision.

        Raises:
            ValueError: ``loss`` is NaN or infinite (the state is left unchanged).
        """
        if loss.__class__ is not float:
            loss = _as_loss(loss)
        if loss - loss != 0.0:  # NaN or ±inf
            raise _nonfinite_error(loss, self._steps)
        steps = self._steps + 1
        self._steps = steps
        if steps > 2:
            previous = self._signal
            signal = (self._c1 * previous - self._c2 * self._signal_prev
                      + self._alpha_beta * (self._last_loss - loss))
            self._signal_prev = previous
        elif steps == 2:  # consistent seed: D^E_0 = D^E_1 = α·(L_0 − L_1)
            signal = self._alpha * (self._last_loss - loss)
            self._signal_prev = signal
        else:
            self._smoothed = self._last_loss = loss
            return 1.0
        self._signal = signal
        self._last_loss = loss
        self._smoothed = self._alpha * loss + self._one_minus_alpha * self._smoothed
        if signal < self._threshold:
            count = self._count + 1
            if count > self._patience and self._decisions_left:
                self._count = 0
                self._decisions_left -= 1
                factor = self._decay_factor
                self._scale *= factor
                self._decisions.append((steps, factor))
                return factor
            self._count = count
        else:
            self._count = 0
        return 1.0

    # ---------------------------------------------------------------------------------------------
    alpha = _read_only("_alpha", "α, smoothing of the loss EMA.")
    beta = _read_only("_beta", "β, smoothing of the Haar difference.")

    # ---------------------------------------------------------------------------------------------
    def _state_body(self) -> dict[str, Any]:
        return {
            "smoothed_loss": self._smoothed,
            "last_loss": self._last_loss,
            "signal": self._signal,
            "signal_prev": self._signal_prev,
        }

    def _load_state_body(self, state: dict[str, Any]) -> None:
        steps = self._steps
        needed = ("smoothed_loss", "last_loss") if steps >= 1 else ()
        needed += ("signal", "signal_prev") if steps >= 2 else ()
        for key in needed:
            if not isinstance(state.get(key), numbers.Real) or not math.isfinite(state[key]):
                raise ValueError(f"state[{key!r}] must be a finite number after {steps} steps, "
                                 f"got {state.get(key)!r}")
        self._smoothed = None if steps < 1 else float(state["smoothed_loss"])
        self._last_loss = None if steps < 1 else float(state["last_loss"])
        self._signal = None if steps < 2 else float(state["signal"])
        self._signal_prev = None if steps < 2 else float(state["signal_prev"])
        if self._max_decays is not None:
            self._decisions_left = max(self._max_decays - len(self._decisions), 0)


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

    Example::

        >>> detector = MovingHaarDetector(window=2, patience=0)
        >>> [detector.update(loss) for loss in (3.0, 3.0, 3.0, 3.0, 3.0)]
        [1.0, 1.0, 1.0, 1.0, 0.5]

    .. note::
        S_t uses the averages up to a_{t−1}, not the loss of step t itself (as in the published
        runs). With an odd window the newer half holds one average more than the older one.
    """

    __slots__ = ("_window", "_half", "_restart_after", "_start", "_losses", "_loss_pos", "_loss_sum",
                 "_averages", "_avg_pos", "_num_averages", "_sum_old", "_sum_new", "_run", "_reductions")

    _HYPERPARAMETERS = ("window", "threshold", "patience", "decay", "restart_after", "max_decays")

    def __init__(self, window: int, threshold: float = 0.06, patience: int | None = None,
                 decay: float = 2.0, restart_after: int | None = 3, max_decays: int | None = None) -> None:
        self._configure(window, threshold, patience, decay, restart_after, max_decays)
        self._reset_state()

    def _configure(self, window, threshold, patience, decay, restart_after, max_decays) -> None:
        self._window = _check_int("window", window, minimum=2)
        self._half = self._window // 2
        self._start = 2 * self._window
        self._threshold = _check_real("threshold", threshold, allowed="(-inf, inf) (finite)")
        self._patience = _check_int("patience", patience, minimum=0, allow_none=True, none_means="2*window")
        if self._patience is None:
            self._patience = 2 * self._window
        self._decay = _check_real("decay", decay, low=1.0, allowed="(1, inf) (finite)")
        self._decay_factor = 1.0 / self._decay
        self._restart_after = _check_int("restart_after", restart_after, minimum=1, allow_none=True,
                                         none_means="never restart")
        self._max_decays = _check_int("max_decays", max_decays, minimum=0, allow_none=True,
                                      none_means="unlimited")

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
        self._reductions = 0

    # ---------------------------------------------------------------------------------------------
    def update(self, loss: float) -> float:
        """Feeds the loss of one optimizer step.

        Args:
            loss: the finite training loss y_t of this step.

        Returns:
            The factor for the LR from the next step on: 1.0, 1/δ, or δ^(r−1) on a restart.

        Raises:
            ValueError: ``loss`` is NaN or infinite (the state is left unchanged).
        """
        t = self._steps
        if loss.__class__ is not float:
            loss = _as_loss(loss)
        if loss - loss != 0.0:  # NaN or ±inf
            raise _nonfinite_error(loss, t)
        self._steps = t + 1
        # S_t from the averages a_{t−m} … a_{t−1}, before y_t enters.
        if t >= self._start:
            signal = self._signal = (self._sum_old - self._sum_new) / self._window
        else:
            signal = None

        # y_t enters the loss window; a_t enters the average window.
        losses = self._losses
        pos = self._loss_pos
        total = self._loss_sum + (loss - losses[pos])
        losses[pos] = loss
        pos += 1
        if pos == self._window:
            pos = 0
            total = math.fsum(losses)  # exact refresh once per window: no drift
        self._loss_pos = pos
        self._loss_sum = total
        if t >= self._window - 1:
            self._push_average(total / self._window)

        if signal is None:
            return 1.0
        if signal < self._threshold:
            count = self._count + 1
            if count > self._patience:
                return self._decide(count)
            self._count = count
            return 1.0
        self._count = 0
        self._run = 0
        return 1.0

    def _push_average(self, average: float) -> None:
        self._smoothed = average
        averages = self._averages
        m = self._window
        pos = self._avg_pos
        if self._num_averages < m:
            averages[pos] = average
            self._num_averages += 1
            if self._num_averages == m:
                self._refresh_haar_sums(0)
            self._avg_pos = pos + 1 if pos + 1 < m else 0
            return
        # a_{t−m} leaves the older half, a_{t−m+h} moves from the newer to the older half.
        oldest = averages[pos]
        middle = pos + self._half
        if middle >= m:
            middle -= m
        moving = averages[middle]
        averages[pos] = average
        pos += 1
        if pos == m:
            self._avg_pos = 0
            self._refresh_haar_sums(0)
        else:
            self._avg_pos = pos
            self._sum_old += moving - oldest
            self._sum_new += average - moving

    def _refresh_haar_sums(self, oldest_pos: int) -> None:
        ordered = self._averages[oldest_pos:] + self._averages[:oldest_pos]
        self._sum_old = math.fsum(ordered[:self._half])
        self._sum_new = math.fsum(ordered[self._half:])

    def _decide(self, count: int) -> float:
        if self._max_decays is not None and self._reductions >= self._max_decays:
            self._count = count  # no reduction left: no decision at all, restart included
            return 1.0
        restart_after = self._restart_after
        if restart_after is not None and self._run >= restart_after:
            factor = self._decay ** (self._run - 1)
            self._run = 0
        else:
            factor = self._decay_factor
            self._run += 1
            self._reductions += 1
        self._count = 0
        self._scale *= factor
        self._decisions.append((self._steps, factor))
        return factor

    # ---------------------------------------------------------------------------------------------
    window = _read_only("_window", "m: losses per moving average and averages per Haar kernel.")
    restart_after = _read_only("_restart_after", "R: decays within one stationary run before the restart "
                                                 "(None: never).")
    run_decays = _read_only("_run", "r: decays in the current unbroken stationary run since the last restart.")

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
            "num_reductions": self._reductions,
        }

    def _load_state_body(self, state: dict[str, Any]) -> None:
        m = self._window
        losses = [float(x) for x in state.get("losses", self._losses)]
        averages = [float(x) for x in state.get("averages", self._averages)]
        if len(losses) != m or len(averages) != m:
            raise ValueError(f"state buffers hold {len(losses)} losses and {len(averages)} averages, "
                             f"expected {m} each (window={m}); the state is corrupt")
        if not all(math.isfinite(x) for x in losses + averages):
            raise ValueError("state buffers contain non-finite values; the state is corrupt")
        self._losses = losses
        self._averages = averages
        self._loss_pos = _check_int("loss_pos", state.get("loss_pos", 0), minimum=0) % m
        self._avg_pos = _check_int("average_pos", state.get("average_pos", 0), minimum=0) % m
        self._num_averages = min(_check_int("num_averages", state.get("num_averages", 0), minimum=0), m)
        self._loss_sum = float(state.get("loss_sum", math.fsum(losses)))
        self._sum_old = float(state.get("sum_old", 0.0))
        self._sum_new = float(state.get("sum_new", 0.0))
        if "sum_old" not in state and self._num_averages == m:
            self._refresh_haar_sums(self._avg_pos)
        smoothed, signal = state.get("smoothed_loss"), state.get("signal")
        self._smoothed = None if smoothed is None else float(smoothed)
        self._signal = None if signal is None else float(signal)
        self._run = _check_int("run_decays", state.get("run_decays", 0), minimum=0)
        self._reductions = int(state.get("num_reductions", sum(f < 1.0 for _, f in self._decisions)))


Detector = Union[FastFaceDetector, MovingHaarDetector]

_DETECTORS = {"fastface": FastFaceDetector, "moving_haar": MovingHaarDetector}
DETECTOR_NAMES = tuple(_DETECTORS)


def build_detector(name: str, **kwargs: Any) -> Detector:
    """Builds a detector by name.

    Args:
        name: ``"fastface"`` (:class:`FastFaceDetector`) or ``"moving_haar"`` (:class:`MovingHaarDetector`).
        **kwargs: the detector's arguments.

    Example::

        >>> build_detector("moving_haar", window=4000)
        MovingHaarDetector(window=4000, threshold=0.06, patience=8000, decay=2.0, restart_after=3, max_decays=None) [steps_seen=0, stationary_count=0, num_decisions=0]
    """
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in _DETECTORS:
        raise ValueError(f"Unknown detector {name!r}. Only {', '.join(repr(n) for n in DETECTOR_NAMES)} "
                         "are supported.")
    return _DETECTORS[key](**kwargs)
