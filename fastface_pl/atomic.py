"""Files written whole or not at all: a temporary name in the same folder, fsync, then a rename.

A rename within one file system replaces the final name in one step, so a reader, a resume or a crash sees the
previous file or the complete new one, never a truncated file under the final name. A write that fails (a full
disk, a quota) removes the temporary file and raises :class:`DiskFullError` naming the path and the free space
(docs/fault_tolerance.md, "Disk full").

Example::

    with atomic_write("runs/x/results.json", "w") as handle:
        json.dump(summary, handle)
    write_bytes_atomic("runs/x/scores.npy", data)
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Mapping
from typing import IO, Any, Iterator, Union

from fastface_pl.errors import DiskFullError

__all__ = ["DiskFullError", "atomic_write", "disk_full_error", "finite_or_none", "fsync_folder", "replace_atomic",
           "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]

PathLike = Union[str, "os.PathLike[str]"]

#: OS errors that mean "no room left": a full file system, or the user's quota.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _free(path: Path) -> str:
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1024
    return str(free)  # pragma: no cover


def disk_full_error(path: PathLike, error: OSError, what: str = "file") -> DiskFullError:
    """The :class:`DiskFullError` for ``error`` (ENOSPC or EDQUOT) raised while writing ``path``."""
    path = Path(path)
    reason = "the disk quota is exceeded" if error.errno == errno.EDQUOT else "no space left on the device"
    full = DiskFullError(
        error.errno, f"cannot write the {what} {path}: {reason} ({_free(path.parent)} free in {path.parent}); the "
        "previous file under that name, if any, is unchanged. Free some space (or choose another folder) and run "
        "again",
    )
    full.filename = os.fspath(path)
    return full


def _no_space(error: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error in ``error`` or behind it (a writer such as ``torch.save`` may raise its own error
    while closing a file whose write failed), else None."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, DiskFullError):
            return None
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def fsync_folder(folder: PathLike) -> None:
    """Make a rename inside ``folder`` durable (ignored where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_write(path: PathLike, mode: str = "wb", what: str = "file", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit flush, fsync and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was; an ENOSPC or EDQUOT error
    becomes a :class:`DiskFullError`.
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        no_space = _no_space(error)
        if no_space is not None:
            raise disk_full_error(path, no_space, what) from None
        raise
    fsync_folder(path.parent)


def replace_atomic(tmp: PathLike, path: PathLike, what: str = "file") -> None:
    """fsync ``tmp`` (written by someone else), rename it to ``path`` and make the rename durable."""
    try:
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        no_space = _no_space(error)
        if no_space is not None:
            raise disk_full_error(path, no_space, what) from None
        raise
    fsync_folder(Path(path).parent)


def write_bytes_atomic(path: PathLike, data: bytes, what: str = "file") -> None:
    """``Path(path).write_bytes(data)``, atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb", what) as handle:
        handle.write(data)


def write_text_atomic(path: PathLike, text: str, what: str = "file", encoding: str = "utf-8") -> None:
    """``Path(path).write_text(text)``, atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", what, encoding=encoding) as handle:
        handle.write(text)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, for strict JSON (``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json_atomic(path: PathLike, value: Any, what: str = "file") -> None:
    """``value`` as strict JSON (a non-finite number written as ``null``), indented, atomically."""
    write_text_atomic(path, json.dumps(finite_or_none(value), indent=2, allow_nan=False), what)
