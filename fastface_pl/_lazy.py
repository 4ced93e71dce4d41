"""Lazy public names for packages whose modules import heavy libraries (torch, Lightning) only on first use."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(
    package: str, modules: Mapping[str, tuple[str, ...]], eager: tuple[str, ...] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``modules`` maps each module to the public names it defines;
    ``eager`` names the package's own attributes that ``dir()`` should list too.

    Example (a package's ``__init__.py``)::

        __getattr__, __dir__ = lazy_exports(__name__, {"fastface_pl.data.recordio": ("RecordFile",)})
    """
    exports = {name: module for module, names in modules.items() for name in names}
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
