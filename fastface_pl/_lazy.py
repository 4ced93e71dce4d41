"""Lazy public names for packages whose modules import heavy libraries (torch, Lightning) only on first use."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(
    package: str, exports: Mapping[str, str], eager: tuple[str, ...] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the module defining it;
    ``eager`` names the package's own attributes that ``dir()`` should list too."""
    names = sorted([*exports, *eager])

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)  # resolved once
        return value

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__
