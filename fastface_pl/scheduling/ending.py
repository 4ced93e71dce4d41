"""How a loss-driven run ends: the paper's halvings, a cooldown to zero, or a cooldown and a stop.

Pure arithmetic (no torch), owned by :class:`~fastface_pl.scheduling.lr_scheduler.FastFaceLR`. The detector
finds the first stationary stretch at step t_d; in the two modes beyond the paper that decision starts an
anneal of the LR instead of a halving (docs/cooldown.md):

* ``"cooldown"``: the LR falls to zero over the rest of the budget, steps t_d + 1 … T. If the loss never goes
  stationary the cooldown starts at the latest point ⌊0.8·T⌋ (warmup-stable-decay, WSD).
* ``"stop"``: for a run whose length nobody knows. The cooldown lasts ⌈c·t_d⌉ steps (c =
  ``cooldown_fraction``), capped by the budget when there is one; the run stops when it ends.

The cooldown's shape: the LR of optimizer step t > t_d is the LR before it times 1 − √p ("1-sqrt", Hägele et
al. 2024) or 1 − p ("linear"), with p = (t − t_d) / (L + 1) for a cooldown of L steps: the first cooldown step
already anneals, the last one still learns, and none runs at exactly zero.

Example::

    >>> ending = RunEnding("cooldown", total_steps=100)
    >>> ending.begin_if_due(81), ending.start, ending.end
    (True, 80, 100)
    >>> round(ending.factor(90), 4)
    0.3099
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, get_args

from fastface_pl.errors import ConfigurationError
from fastface_pl.argument_checks import check_choice, check_int, check_real

__all__ = ["RunEnding", "cooldown_factor", "Mode", "CooldownShape", "MODES", "COOLDOWN_SHAPES",
           "DEFAULT_LATEST_START", "DEFAULT_STOP_COOLDOWN_FRACTION"]

Mode = Literal["halve", "cooldown", "stop"]
CooldownShape = Literal["1-sqrt", "linear"]
MODES = get_args(Mode)
COOLDOWN_SHAPES = get_args(CooldownShape)
#: The latest cooldown start, as a fraction of the budget: WSD's usual 20 % cooldown.
DEFAULT_LATEST_START = 0.8
#: c of the stop mode: the cooldown lasts c·t_d steps (chosen on the benchmark's selection seed, docs/cooldown.md).
DEFAULT_STOP_COOLDOWN_FRACTION = 1.0


def cooldown_factor(step: int, start: int, end: int, shape: str = "1-sqrt") -> float:
    """LR multiplier of optimizer step ``step`` (1-based) for a cooldown over steps ``start`` + 1 … ``end``.

    1 up to ``start``; then 1 − √p or 1 − p with p = (step − start) / (end − start + 1); held after ``end``.
    """
    if step <= start:
        return 1.0
    length = max(0, end - start)
    progress = min(step - start, length) / (length + 1)
    return 1.0 - math.sqrt(progress) if shape == "1-sqrt" else 1.0 - progress


class RunEnding:
    """When the cooldown starts, when it ends, and whether the run stops there.

    Args:
        mode: ``"halve"`` (the paper: decisions halve the LR, nothing here applies), ``"cooldown"`` or ``"stop"``.
        shape: ``"1-sqrt"`` or ``"linear"``.
        latest_start: the latest cooldown start as a fraction of the budget T (None: no latest point).
        cooldown_fraction: c of ``"stop"``: the cooldown lasts ⌈c·t_d⌉ steps.
        total_steps: T, the budget in optimizer steps (needed by ``"cooldown"``; optional for ``"stop"``).

    Raises:
        ValueError: naming the argument, for a value out of range or a cooldown without a budget.
    """

    def __init__(self, mode: str = "halve", shape: str = "1-sqrt", latest_start: float | None = DEFAULT_LATEST_START,
                 cooldown_fraction: float = DEFAULT_STOP_COOLDOWN_FRACTION, total_steps: int | None = None) -> None:
        settings = self.check_settings(mode, shape, latest_start, cooldown_fraction)
        self.mode, self.shape = settings["mode"], settings["shape"]
        self.latest_start, self.cooldown_fraction = settings["latest_start"], settings["cooldown_fraction"]
        self.total_steps = check_int("total_steps", total_steps, 1, allow_none=True, none_means="unknown")
        if self.mode == "cooldown" and self.total_steps is None:
            raise ConfigurationError(
                "mode='cooldown' anneals the LR to zero at the end of the budget, which is unknown: pass "
                "total_steps (Lightning: max_epochs or max_steps), or use mode='stop' for a run "
                "whose length nobody knows")
        self.start: int | None = None
        self.end: int | None = None
        self.reason: str | None = None

    @staticmethod
    def check_settings(mode: str = "halve", shape: str = "1-sqrt", latest_start: float | None = DEFAULT_LATEST_START,
                       cooldown_fraction: float = DEFAULT_STOP_COOLDOWN_FRACTION) -> dict[str, Any]:
        """The settings that do not depend on the budget, checked (ValueError naming the argument), as
        :attr:`settings` gives them."""
        return {"mode": check_choice("mode", mode, MODES),
                "shape": check_choice("cooldown_shape", shape, COOLDOWN_SHAPES),
                "latest_start": check_real("latest_cooldown_start", latest_start, 0.0, 1.0, low_open=False,
                                           allow_none=True),
                "cooldown_fraction": check_real("cooldown_fraction", cooldown_fraction, 0.0)}

    @property
    def started(self) -> bool:
        return self.start is not None

    @property
    def latest_start_step(self) -> int | None:
        """⌊latest_start·T⌋, or None without a budget or a latest point."""
        if self.mode == "halve" or self.latest_start is None or self.total_steps is None:
            return None
        return int(self.latest_start * self.total_steps)

    @property
    def stop_step(self) -> int | None:
        """The last optimizer step of a ``"stop"`` run, once its cooldown has started."""
        return self.end if self.mode == "stop" else None

    def begin(self, step: int, reason: str) -> None:
        """Starts the cooldown after optimizer step ``step`` (t_d)."""
        self.start, self.reason = int(step), reason
        self.end = self._end(self.start)

    def begin_if_due(self, next_step: int) -> bool:
        """Starts the cooldown at the latest point if optimizer step ``next_step`` lies beyond it."""
        latest = self.latest_start_step
        if self.started or latest is None or next_step <= latest:
            return False
        self.begin(latest, f"no stationary stretch by the latest point, {self.latest_start:g}·T")
        return True

    def _end(self, start: int) -> int:
        if self.mode == "cooldown":
            return max(start, self.total_steps)
        end = start + max(1, math.ceil(self.cooldown_fraction * start))
        return end if self.total_steps is None else max(start, min(end, self.total_steps))

    def factor(self, step: int) -> float:
        """The LR multiplier of optimizer step ``step`` (1.0 before the cooldown)."""
        if self.start is None:
            return 1.0
        return cooldown_factor(step, self.start, self.end, self.shape)

    def set_total_steps(self, total_steps: int | None) -> None:
        """A new budget (a resumed run that is longer or shorter): the end follows it."""
        self.total_steps = check_int("total_steps", total_steps, 1, allow_none=self.mode != "cooldown",
                                     none_means="unknown")
        if self.start is not None:
            self.end = self._end(self.start)

    @property
    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "shape": self.shape, "latest_start": self.latest_start,
                "cooldown_fraction": self.cooldown_fraction}

    def state_dict(self) -> dict[str, Any]:
        return {**self.settings, "total_steps": self.total_steps, "start": self.start, "end": self.end,
                "reason": self.reason}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; ValueError naming the key for a bad value."""
        if not isinstance(state, Mapping):
            raise ConfigurationError(f"state['ending'] must be a dict from RunEnding.state_dict(), got {state!r}")
        loaded = RunEnding(state.get("mode", "halve"), state.get("shape", "1-sqrt"),
                           state.get("latest_start"), state.get("cooldown_fraction", DEFAULT_STOP_COOLDOWN_FRACTION),
                           state.get("total_steps"))
        start = check_int("state['ending']['start']", state.get("start"), 0, allow_none=True, none_means="not started")
        end = check_int("state['ending']['end']", state.get("end"), 0, allow_none=True, none_means="not started")
        if (start is None) != (end is None) or (start is not None and end < start):
            raise ConfigurationError(f"state['ending'] has start={start!r}, end={end!r}: both None, or end >= start")
        reason = state.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise ConfigurationError(f"state['ending']['reason'] must be a string or None, got {reason!r}")
        self.__dict__.update(loaded.__dict__)
        self.start, self.end, self.reason = start, end, reason

    def __repr__(self) -> str:
        where = "not started" if self.start is None else f"steps {self.start + 1}..{self.end}"
        return f"RunEnding(mode={self.mode!r}, shape={self.shape!r}, {where})"
