"""FastFace settings for any run length: α, β, λ and P from T and the first losses of the run.

The paper's values (α = β = 1e-3, λ = 5e-5, τ = 0.05) were tuned for one kind of run: about 200,000
optimizer steps of an ArcFace loss at scale s = 64 that starts near 45.5. This module rescales them to
another run length T and loss scale; the derivation is in ``docs/auto_settings.md``. In short:

* **threshold** λ is a slope (loss units per step). The paper's λ·T / L₀ = 0.22: a stretch is
  stationary when, at its current rate, the loss would fall by less than 22 % of its starting level
  over a whole run. So λ = 0.22 · L₀ / T, with L₀ the median of the first losses;
* **smoothing** 1/α = 1/β: the paper averages over T/202 steps. A short run has fewer steps per unit
  of progress, so its per-step noise weighs more: the window is also made long enough that the noise
  of the detector signal (about σ·a^1.5 / 2 for α = β = a and per-step noise σ) stays below λ/3,
  and never longer than half the patience;
* **patience** P = int(τ·T) with the paper's τ = 0.05.

Everything here is pure Python (no torch): :func:`fastface_auto_settings` computes the settings from T
and a list of losses; :class:`AutoFastFaceDetector` is a detector that collects the first losses of a
run, resolves the settings, and then behaves exactly like a :class:`FastFaceDetector` built with them
from step 1 (it replays the collected losses, which cannot have led to a decision yet).

Example::

    >>> settings = fastface_auto_settings(202_320, [45.55] * 2000)
    >>> round(settings.alpha, 6), round(settings.threshold, 7), settings.patience
    (0.001, 5e-05, 10116)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from fastface_pl.errors import ConfigurationError
from fastface_pl.scheduling.detectors import (
    PAPER_ALPHA,
    PAPER_PATIENCE_FRACTION,
    PAPER_THRESHOLD,
    FastFaceDetector,
    NonFiniteLossError,
    as_finite_loss,
)
from fastface_pl.scheduling.saved_state import check_state, loading
from fastface_pl.argument_checks import check_int, check_real

__all__ = ["FastFaceSettings", "AutoFastFaceDetector", "fastface_auto_settings", "calibration_steps",
           "PAPER_TOTAL_STEPS", "PAPER_LOSS_SCALE", "patience_steps"]

#: The paper's MS1MV3 / ResNet100 run: T (5 epochs at batch 128) and the median loss of its first 1 % of steps
#: (ArcFace s = 64, m = 0.5; from the packaged log).
PAPER_TOTAL_STEPS = 202_320
PAPER_LOSS_SCALE = 45.55
STATE_VERSION = 1

#: λ·T / L₀ of the paper's run: the share of its starting loss a stationary stretch would still shed over T steps.
THRESHOLD_RUN_FRACTION = PAPER_THRESHOLD * PAPER_TOTAL_STEPS / PAPER_LOSS_SCALE
#: The paper's smoothing window 1/α as a fraction of the run (1,000 of 202,320 steps).
WINDOW_RUN_FRACTION = 1.0 / (PAPER_ALPHA * PAPER_TOTAL_STEPS)
#: The detector signal's noise is kept below λ / NOISE_MARGIN.
NOISE_MARGIN = 3.0
#: The calibration window: this fraction of the run, at least MIN_CALIBRATION steps (never more than P).
CALIBRATION_FRACTION = 0.01
MIN_CALIBRATION = 50


@dataclass(frozen=True)
class FastFaceSettings:
    """The resolved FastFace settings and what they were derived from.

    Attributes:
        alpha, beta, threshold, patience: α, β, λ and P for :class:`FastFaceDetector`.
        total_steps: T, the run length they are for.
        patience_fraction: τ (P = int(τ·T)).
        loss_scale: L₀, the median of the calibration losses.
        noise: σ, the per-step loss noise estimated from them (0 when they hold no noise, e.g. logged means).
        calibration_steps: how many losses were used.
        noise_limited: whether the smoothing window was lengthened for the noise (beyond T/202 steps).
    """

    alpha: float
    beta: float
    threshold: float
    patience: int
    total_steps: int
    patience_fraction: float
    loss_scale: float
    noise: float
    calibration_steps: int
    noise_limited: bool

    def detector_kwargs(self) -> dict[str, Any]:
        """The arguments of :class:`FastFaceDetector` (without ``decay`` and ``max_decays``)."""
        return {"alpha": self.alpha, "beta": self.beta, "threshold": self.threshold, "patience": self.patience}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def patience_steps(total_steps: int, patience_fraction: float) -> int:
    """P = int(τ·T), at least 1: the one rule for the patience of a run of T optimizer steps."""
    return max(1, int(patience_fraction * total_steps))


_patience = patience_steps


def calibration_steps(total_steps: int, patience_fraction: float = PAPER_PATIENCE_FRACTION) -> int:
    """How many first losses the auto rule reads: 1 % of T, at least 50, never more than P = int(τ·T).

    Never more than P, so no decision can fall inside the calibration window.
    """
    total_steps = check_int("total_steps", total_steps, 1)
    patience_fraction = check_real("patience_fraction", patience_fraction, 0.0, 1.0)
    wanted = max(MIN_CALIBRATION, round(CALIBRATION_FRACTION * total_steps))
    return max(1, min(wanted, _patience(total_steps, patience_fraction)))


def estimate_noise(losses: Sequence[float]) -> float:
    """Per-step noise σ of a loss stream, from its first differences (robust to the trend and to spikes).

    A difference of two steps carries √2·σ of white noise. The differences are centred on their median
    (the trend), winsorised at 3 robust standard deviations (1.4826 · MAD), and their root mean square / √2
    is returned.
    """
    if len(losses) < 3:
        return 0.0
    differences = [b - a for a, b in zip(losses, losses[1:])]
    centre = statistics.median(differences)
    limit = 3.0 * 1.4826 * statistics.median(abs(d - centre) for d in differences)
    clipped = [max(-limit, min(limit, d - centre)) for d in differences]
    return math.sqrt(statistics.fmean(d * d for d in clipped) / 2.0)


def fastface_auto_settings(total_steps: int, early_losses: Sequence[float],
                           patience_fraction: float = PAPER_PATIENCE_FRACTION) -> FastFaceSettings:
    """FastFace's α, β, λ and P for a run of ``total_steps`` optimizer steps.

    Args:
        total_steps: T, the optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
        early_losses: the training losses of the first steps, one per optimizer step (at least 3; the rule
            reads :func:`calibration_steps` of them when used through :class:`AutoFastFaceDetector`).
        patience_fraction: τ; P = int(τ·T).

    Returns:
        The settings (:class:`FastFaceSettings`).

    Raises:
        ValueError: T or τ out of range, fewer than 3 losses, a non-finite loss, or a loss level ≤ 0 (the rule
            scales λ by the loss level; pass α, β and λ yourself for a loss that is not positive).
    """
    total_steps = check_int("total_steps", total_steps, 1)
    patience_fraction = check_real("patience_fraction", patience_fraction, 0.0, 1.0)
    losses = [float(v) for v in early_losses]
    if len(losses) < 3:
        raise ConfigurationError(
            f"early_losses needs at least 3 losses of the first optimizer steps, got {len(losses)}")
    if not all(math.isfinite(v) for v in losses):
        raise ConfigurationError("early_losses holds a NaN or infinite loss; feed only finite losses (skip the others)")
    loss_scale = statistics.median(losses)
    if not loss_scale > 0.0:
        raise ConfigurationError(
            f"the loss level of the first steps is {loss_scale:g} (median), but the auto rule scales the threshold λ "
            "by a positive loss level; pass alpha, beta and threshold explicitly (detector_kwargs) for this loss"
        )
    patience = _patience(total_steps, patience_fraction)
    threshold = THRESHOLD_RUN_FRACTION * loss_scale / total_steps

    rate = min(1.0, 1.0 / (WINDOW_RUN_FRACTION * total_steps))  # the paper's window, relative to T
    noise = estimate_noise(losses)
    noise_limited = False
    if noise > 0.0:
        # std of the signal for white noise σ and α = β = a is about σ·a^1.5/2: keep it below λ / NOISE_MARGIN
        quiet_rate = (2.0 * threshold / (NOISE_MARGIN * noise)) ** (2.0 / 3.0)
        if quiet_rate < rate:
            rate, noise_limited = quiet_rate, True
    rate = max(rate, min(1.0, 2.0 / patience))  # the window (1/a) never longer than half the patience
    return FastFaceSettings(alpha=rate, beta=rate, threshold=threshold, patience=patience, total_steps=total_steps,
                            patience_fraction=patience_fraction, loss_scale=loss_scale, noise=noise,
                            calibration_steps=len(losses), noise_limited=noise_limited)


class AutoFastFaceDetector:
    """A FastFace detector whose α, β, λ and P come from :func:`fastface_auto_settings`.

    It stores the first :func:`calibration_steps` losses, resolves the settings from them, builds a
    :class:`FastFaceDetector` (with the opening-transient guard, ``wait_for_descent``) and replays them into it; from then on it forwards every update. The
    decisions are those of that detector fed from step 1 (none can fall in the calibration window, which
    is never longer than P). Before the settings are resolved, ``threshold``, ``signal`` … are None.

    Args:
        total_steps: T, the optimizer steps of the run.
        patience_fraction: τ.
        decay: δ.
        max_decays: K (None: unlimited).

    Raises:
        TypeError: a setting that is not a number.
        ValueError: a setting out of its range (``total_steps`` < 1, τ outside (0, 1] ...), named.

    Example::

        >>> detector = AutoFastFaceDetector(total_steps=1000)
        >>> factors = [detector.update(max(6.0, 10.0 - 0.05 * t)) for t in range(200)]  # flat from step 81
        >>> detector.settings.patience, factors.index(0.5) + 1
        (50, 153)
    """

    def __init__(self, total_steps: int, patience_fraction: float = PAPER_PATIENCE_FRACTION, decay: float = 2.0,
                 max_decays: int | None = 8) -> None:
        settings = self.check_settings(total_steps, patience_fraction, decay, max_decays)
        self.total_steps, self.patience_fraction = settings["total_steps"], settings["patience_fraction"]
        self.decay, self.max_decays = settings["decay"], settings["max_decays"]
        self.calibration_steps = calibration_steps(self.total_steps, self.patience_fraction)
        self._calibration: list[float] = []  # the first losses; kept, so a new T can re-resolve the settings
        self.settings: FastFaceSettings | None = None
        self.detector: FastFaceDetector | None = None

    @staticmethod
    def check_settings(total_steps: int, patience_fraction: float = PAPER_PATIENCE_FRACTION, decay: float = 2.0,
                       max_decays: int | None = 8) -> dict[str, Any]:
        """The constructor arguments, checked (TypeError, ValueError), without building a detector."""
        return {"total_steps": check_int("total_steps", total_steps, 1),
                "patience_fraction": check_real("patience_fraction", patience_fraction, 0.0, 1.0),
                "decay": check_real("decay", decay, 1.0),
                "max_decays": check_int("max_decays", max_decays, 0, allow_none=True, none_means="unlimited")}

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments (the resolved α, β, λ, P are in :attr:`settings`)."""
        return {"total_steps": self.total_steps, "patience_fraction": self.patience_fraction, "decay": self.decay,
                "max_decays": self.max_decays}

    def update(self, loss: float) -> float:
        """Feeds one optimizer step's loss; returns the LR factor (1.0, or 1/δ on a decision)."""
        if self.detector is not None:
            return self.detector.update(loss)
        try:
            loss = as_finite_loss(loss)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"{error} (step {len(self._calibration) + 1})") from None
        self._calibration.append(loss)
        if len(self._calibration) < max(3, self.calibration_steps):
            return 1.0
        self._resolve()
        return math.prod(self.detector.update(value) for value in self._calibration)  # 1.0 unless P < 3

    def _resolve(self) -> None:
        self.settings = fastface_auto_settings(self.total_steps, self._calibration, self.patience_fraction)
        self.detector = FastFaceDetector(**self.settings.detector_kwargs(), decay=self.decay,
                                         max_decays=self.max_decays, wait_for_descent=True)

    def __getattr__(self, name: str) -> Any:
        # threshold, signal, smoothed_loss, stationary_count, num_reductions … of the resolved detector
        if name.startswith("_") or name in ("detector", "settings"):
            raise AttributeError(name)
        detector = self.__dict__.get("detector")
        if detector is not None:
            return getattr(detector, name)
        if name in ("num_reductions", "stationary_count"):
            return 0
        if name == "steps_seen":
            return len(self.__dict__.get("_calibration", ()))
        if name in ("threshold", "signal", "smoothed_loss", "alpha", "beta", "patience"):
            return None
        raise AttributeError(name)

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, the calibration losses and, once resolved, the settings and the detector's state."""
        return {
            "type": type(self).__name__, "version": STATE_VERSION, **self.hyperparameters,
            "calibration": list(self._calibration),
            "settings": None if self.settings is None else self.settings.as_dict(),
            "detector": None if self.detector is None else self.detector.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict`. A state whose ``total_steps`` (or τ) was changed re-resolves the
        settings for the new run length from the saved calibration losses and continues the detector's
        stream under them."""
        owner = type(self).__name__
        check_state(state, owner, STATE_VERSION, type_name=owner)
        with loading(owner):
            self.__init__(*(state.get(key, value) for key, value in self.hyperparameters.items()))
            self._calibration = [float(v) for v in state.get("calibration", [])]
            if state.get("detector") is None:
                return
            self._resolve()
            inner = dict(state["detector"])
            inner.update(self.settings.detector_kwargs())  # the same values, or those of a new run length
            self.detector.load_state_dict(inner)

    def __repr__(self) -> str:
        inner = repr(self.detector) if self.detector is not None else \
            f"calibrating: {len(self._calibration)}/{self.calibration_steps} losses"
        return f"{type(self).__name__}(total_steps={self.total_steps}) [{inner}]"
