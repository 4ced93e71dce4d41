"""Exceptions raised by the fastface_pl data readers.

Every error says what is wrong and where: the file, and for record files the key and the byte offset,
so a corrupt sample in a 5-million-image pack can be found (and cut out) without guessing.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

from fastface_pl.errors import UsageError


class DatasetError(UsageError, ValueError):
    """The data at a configured path is missing, unrecognised or inconsistent (a ``ValueError``)."""


class CorruptRecordError(DatasetError):
    """A RecordIO record cannot be read: bad magic number, truncated file, bad continuation flags.

    Attributes:
        path: The ``.rec`` file.
        key: The record key (from the ``.idx``), or ``None`` when reading without an index.
        offset: Byte offset in the ``.rec`` where the problem was found.

    The keyword arguments are optional because a DataLoader worker re-raises an error in the main process as
    ``type(error)(message)``; the message alone then carries the file, key and offset (``None`` attributes).
    """

    def __init__(
        self, message: str, *, path: Optional[str] = None, key: Optional[int] = None, offset: Optional[int] = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.key = key
        self.offset = offset


class CorruptImageError(DatasetError):
    """An encoded image (JPEG/PNG) could not be decoded.

    Attributes:
        source: Where the bytes came from: a file path, or ``"<file.rec> key K (byte offset O)"`` (``None`` when
            re-raised from a DataLoader worker, which passes the message only; the message names the source).
    """

    def __init__(self, message: str, *, source: Optional[str] = None) -> None:
        super().__init__(message)
        self.source = source


class ImageTooLargeError(CorruptImageError):
    """An image whose header declares more pixels than the configured limit: refused before it is decoded."""


class RecordKeyError(DatasetError, KeyError):
    """A key is not in the ``.idx`` of a record file (both a ``DatasetError`` and a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def unreadable(what: str, path: "os.PathLike[str] | str", error: OSError) -> DatasetError:
    """The error for data the training process may not read: names the path and the fix.

    Args:
        what: What the path is, for the message (``"data root"``, ``"identity folder"``, ``"record file"`` ...).
        path: The path that was being read; the message also names the error's own path when that is another
            one (a file inside a data root, say).
        error: The ``PermissionError`` (or other ``OSError``) that was raised.
    """
    return DatasetError(
        f"cannot read the {what} {path}: {_reason(error, path)}. Give the user running training read access to it (files need "
        f"r, folders r and x, and every folder above it x), e.g. `chmod -R a+rX {path}` as its owner, or copy "
        "the data to a place this user can read"
    )


def _reason(error: OSError, path: "os.PathLike[str] | str") -> str:
    """The OS error's reason, with the file it names when that is another one than ``path`` (a file inside it)."""
    reason = error.strerror or str(error)
    if error.filename is not None and os.fspath(error.filename) != os.fspath(path):
        reason += f" ({error.filename})"
    return reason


@contextmanager
def reading(what: str, path: "os.PathLike[str] | str") -> Iterator[None]:
    """Turn a ``PermissionError`` raised inside into a :class:`DatasetError` from :func:`unreadable`."""
    try:
        yield
    except PermissionError as error:
        raise unreadable(what, path, error) from None


@contextmanager
def writing(what: str, path: "os.PathLike[str] | str") -> Iterator[None]:
    """Turn a ``PermissionError`` raised inside into a :class:`DatasetError` naming the path and the fix."""
    try:
        yield
    except PermissionError as error:
        raise DatasetError(
            f"cannot write the {what} {path}: {_reason(error, path)}. Choose a place the user running this may write to, or "
            f"give it write access (e.g. `chmod u+w {path}` as its owner)"
        ) from None
