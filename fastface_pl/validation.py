"""Argument checks shared by the whole package (pure Python: no torch, no numpy, so the detectors can use them).

Each check returns the value in its plain Python type or raises ``ValueError`` naming the argument, what is
allowed and what was given. A ``bool`` is never accepted where a number is asked for.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

__all__ = ["check_int", "check_real", "check_bool", "check_choice"]


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None, *,
              allow_none: bool = False, none_means: str = "") -> int | None:
    """``value`` as an int in ``minimum..maximum`` (or None where ``allow_none``), else ValueError.

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
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, low: float | None = None, high: float | None = None, *,
               low_open: bool = True, high_open: bool = False, allow_none: bool = False) -> float | None:
    """``value`` as a finite float inside the interval (``low``, ``high``] (ends as told), else ValueError.

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
        raise ValueError(f"{name} must be a finite number in {interval}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False, else ValueError (a truthy string or int is a typo, not a flag)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else ValueError listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value
