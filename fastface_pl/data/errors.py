"""Exceptions raised by the fastface_pl data readers.

Every error says what is wrong and where: the file, and for record files the key and the byte offset,
so a corrupt sample in a 5-million-image pack can be found (and cut out) without guessing.
"""

from __future__ import annotations

from typing import Optional


class DatasetError(ValueError):
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


class RecordKeyError(DatasetError, KeyError):
    """A key is not in the ``.idx`` of a record file (both a ``DatasetError`` and a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""
