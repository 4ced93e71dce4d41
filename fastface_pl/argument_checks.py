"""Argument checks shared by the whole package (pure Python: no torch, no numpy, so the detectors can use them).

Each check returns the value in its plain Python type or raises :class:`~fastface_pl.errors.ConfigurationError`
(a ``ValueError``; exit 2 in the train command) naming the argument, what is allowed and what was given. A
``bool`` is never accepted where a number is asked for.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from typing import Any, Iterable

from fastface_pl.errors import ConfigurationError

__all__ = ["bound_workers", "check_int", "check_real", "check_bool", "check_choice", "usable_cpus"]

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a job scheduler's share, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def bound_workers(name: str, workers: Any) -> int:
    """``workers`` (checked, >= 0) bounded by :func:`usable_cpus`, saying so when it lowers it: each worker is a
    process holding its own memory, and more of them than CPUs add memory, not speed."""
    workers = check_int(name, workers, 0)
    cpus = usable_cpus()
    if workers > cpus:
        log.warning("%s=%d but this process may use only %d CPU(s): starting %d worker processes (more would add "
                    "memory, not speed)", name, workers, cpus, cpus)
        return cpus
    return workers


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None, *,
              allow_none: bool = False, none_means: str = "") -> int | None:
    """``value`` as an int in ``minimum..maximum`` (or None where ``allow_none``), else ConfigurationError.

    Example::

        >>> check_int("workers", 2, 0)
        2
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum or (
            maximum is not None and value > maximum):
        allowed = f"an int >= {minimum}" if maximum is None else f"an int in {minimum}..{maximum}"
        if allow_none:
            allowed += f" or None ({none_means})" if none_means else " or None"
        raise ConfigurationError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, low: float | None = None, high: float | None = None, *,
               low_open: bool = True, high_open: bool = False, allow_none: bool = False) -> float | None:
    """``value`` as a finite float inside the interval (``low``, ``high``] (ends as told), else ConfigurationError.

    Example::

        >>> check_real("alpha", 0.5, 0.0, 1.0)
        0.5
    """
    if value is None and allow_none:
        return None
    interval = (("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", "
                + ("inf" if high is None else f"{high:g}") + (")" if high_open or high is None else "]"))
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ConfigurationError(f"{name} must be a finite number in {interval}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False, else ConfigurationError (a truthy string or int is a typo, not a flag)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else ConfigurationError listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value
