"""Check a composed training config against the signatures it will be given to, before anything is built.

Each config group with a ``_target_`` (``trainer``, ``model``, ``data``, ``scheduler``) is checked against the
target's parameters: unknown keys, and values whose type cannot match the annotation (``trainer.max_epochs=abc``
for ``Optional[int]``, ``trainer.precision=17`` for the Literal of precisions). Annotations that cannot be checked
(classes, callables, ``Any``) are accepted; the target's own checks still run when it is built. Pure logic: no
data, model or trainer is built here.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from typing import Any, Callable, Mapping, Optional

__all__ = ["check_arguments", "describe_type", "value_matches"]


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def value_matches(value: Any, tp: Any) -> Optional[bool]:
    """``True``/``False`` when ``value`` does/does not fit the annotation ``tp``; ``None`` when it cannot be told."""
    if tp is Any or tp is inspect.Parameter.empty:
        return None
    origin = _origin(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        results = [value_matches(value, arg) for arg in typing.get_args(tp)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(tp))
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    container = origin or tp
    if container in (list, tuple, set, collections.abc.Sequence, collections.abc.Iterable):
        return isinstance(value, (list, tuple)) or None
    if container in (dict, collections.abc.Mapping):
        return isinstance(value, dict) or None
    if isinstance(tp, type):
        return True if isinstance(value, tp) else None
    return None


def describe_type(tp: Any) -> str:
    """A short human name of an annotation: ``an integer or null``, ``one of '32-true', '16-mixed', …``."""
    origin = _origin(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        literals = [a for arg in typing.get_args(tp) if _origin(arg) is typing.Literal for a in typing.get_args(arg)]
        others = [describe_type(arg) for arg in typing.get_args(tp) if _origin(arg) is not typing.Literal]
        parts = ([f"one of {', '.join(repr(v) for v in literals)}"] if literals else []) + others
        return " or ".join(dict.fromkeys(parts))
    if origin is typing.Literal:
        return f"one of {', '.join(repr(v) for v in typing.get_args(tp))}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if tp in names:
        return names[tp]
    return getattr(tp, "__name__", str(tp))


def _signature(target: Callable) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    function = target.__init__ if inspect.isclass(target) else target
    parameters = dict(inspect.signature(function).parameters)
    parameters.pop("self", None)
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001  (an annotation that does not evaluate: check the names only)
        hints = {}
    return parameters, hints


def check_arguments(section: Mapping[str, Any], target: Callable, prefix: str) -> list[str]:
    """Problems of ``section`` (a resolved, plain mapping) as the keyword arguments of ``target``; ``[]`` if none.

    Keys starting with ``_`` (Hydra's ``_target_``, ``_convert_`` …) are skipped.
    """
    parameters, hints = _signature(target)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    name = getattr(target, "__name__", str(target))
    problems = []
    for key, value in section.items():
        if key.startswith("_"):
            continue
        if key not in parameters or parameters[key].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                             inspect.Parameter.VAR_KEYWORD):
            if not takes_kwargs:
                known = ", ".join(k for k, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
                problems.append(f"{prefix}.{key}: unknown key ({name} takes {known})")
            continue
        tp = hints.get(key, parameters[key].annotation)
        if value_matches(value, tp) is False:
            problems.append(f"{prefix}.{key}={value!r}: expected {describe_type(tp)}")
    return problems
