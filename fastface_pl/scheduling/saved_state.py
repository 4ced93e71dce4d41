"""The checks of a saved scheduler state, for the detectors, :class:`FastFaceLR` and the Lightning callback.

Every state these load goes through :func:`check_state` (a dict, of the right type and a version this code
reads) and is read inside :func:`loading`, so whatever is wrong with it surfaces as one error type,
:class:`SchedulerStateError`, naming the owner and the key. Pure Python: the detectors use it too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from fastface_pl.errors import SavedStateError

__all__ = ["SchedulerStateError", "check_state", "loading", "required"]


class SchedulerStateError(SavedStateError):
    """A saved scheduler state that cannot be loaded: another type or version, a missing key or a bad value."""


def check_state(state: Any, owner: str, version: int, type_name: str | None = None) -> Mapping[str, Any]:
    """Returns ``state`` when it is a mapping saved by ``owner`` at a version from 1 to ``version``.

    Args:
        state: what was saved.
        owner: who reads it, for the message (``"FastFaceLR"``, ``"FastFaceDetector"`` ...).
        version: the newest state version ``owner`` reads; a state without one is taken as this version.
        type_name: the ``state["type"]`` it must hold (detectors save their class name), or None.

    Raises:
        SchedulerStateError: naming what is wrong.
    """
    if not isinstance(state, Mapping):
        raise SchedulerStateError(f"{owner} state must be a dict from {owner}.state_dict(), got {type(state).__name__}")
    if type_name is not None and state.get("type") != type_name:
        found = state.get("type")
        raise SchedulerStateError(
            f"state was saved by {found!r}, cannot load it into {type_name}; build a {found} instead or pass a "
            f"state from {type_name}.state_dict()")
    found_version = state.get("version", version)
    if isinstance(found_version, bool) or not isinstance(found_version, int) or not 1 <= found_version <= version:
        raise SchedulerStateError(f"{owner} state['version'] is {found_version!r}; this fastface_pl reads versions "
                                  f"1..{version} (a newer state needs a newer fastface_pl)")
    return state


def required(state: Mapping[str, Any], key: str) -> Any:
    """``state[key]``, or a SchedulerStateError naming the key."""
    if key not in state:
        raise SchedulerStateError(f"state has no {key!r}: pass a dict from state_dict()")
    return state[key]


@contextmanager
def loading(owner: str, error_type: type[SavedStateError] = SchedulerStateError) -> Iterator[None]:
    """Raises what goes wrong while ``owner`` reads a state (a ValueError or TypeError) as ``error_type``."""
    try:
        yield
    except SavedStateError:
        raise
    except (ValueError, TypeError) as error:
        raise error_type(f"{owner}: {error}") from error
