"""MXNet/dmlc RecordIO (``.rec`` + ``.idx``) in pure Python: the format of InsightFace's training packs.

No MXNet needed (it no longer installs next to current numpy). The on-disk format, as written by dmlc-core's
``RecordIOWriter`` (``include/dmlc/recordio.h``, ``src/recordio.cc``):

* a record part is ``magic | lrec | data | zero padding to a multiple of 4 bytes``, with
  ``magic = 0xCED7230A`` (uint32 little-endian, bytes ``0A 23 D7 CE``) and ``lrec`` a uint32 holding the
  continuation flag in its top 3 bits (``cflag = lrec >> 29``) and the part length in the low 29 bits;
* ``cflag`` 0 is a whole record; 1, 2, 3 are the first, a middle and the last part of a record that the writer
  split where the payload contains the magic number at a 4-byte-aligned offset. The reader joins the parts and
  puts the 4 magic bytes back between them;
* the ``.idx`` is text, one ``key<TAB>byte offset`` line per record.

.. note::
   Two constants differ from what one finds in some write-ups: the magic is ``0xCED7230A`` (``0x3ED7230A`` is
   the magic of Google's unrelated protobuf ``recordio``), and the length field has 29 bits, not 30
   (``EncodeLRec(cflag, length) = cflag << 29 | length``; dmlc checks ``(kMagic >> 29) & 7 > 3`` so that an
   ``lrec`` can never equal the magic).

An image record's payload starts with a 24-byte header ``struct '<IfQQ'`` = (flag, label, id, id2); when
``flag > 0``, ``flag`` float32 labels follow it (and the scalar label is 0). The rest is the encoded image.
InsightFace packs put a header record at key 0 whose labels are ``(N + 1, N + 1 + C)``: images are keys
``1..N`` and keys ``N + 1 .. N + C`` hold one record per identity with labels ``(first image key, last + 1)``.
Packs made with plain ``im2rec`` have no header record and start at key 0 (:func:`parse_layout`).

Example::

    rec = RecordFile("faces_emore/train.rec")          # reads faces_emore/train.idx
    header, jpeg = unpack_header(rec.read(1))
    with RecordWriter("out/train.rec") as writer:       # writes out/train.idx
        writer.write(0, pack_header(7.0) + jpeg)
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from fastface_pl.data.errors import CorruptRecordError, DatasetError, RecordKeyError, reading

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC = struct.Struct("<II")
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
MAX_PAYLOAD_BYTES = (1 << _LENGTH_BITS) - 1
"""Largest payload dmlc accepts (it checks ``size < 2**29``)."""

CFLAG_WHOLE, CFLAG_FIRST, CFLAG_MIDDLE, CFLAG_LAST = 0, 1, 2, 3

HEADER_FORMAT = "<IfQQ"
HEADER_STRUCT = struct.Struct(HEADER_FORMAT)
HEADER_SIZE = HEADER_STRUCT.size  # 24

FLOAT32_EXACT_INTEGERS = 1 << 24
"""float32 holds every integer up to 2**24 = 16,777,216; the header record's counts are float32."""


# --------------------------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------------------------
def encode_lrec(cflag: int, length: int) -> int:
    """Pack a continuation flag (0..3) and a part length (< 2**29) into the ``lrec`` word."""
    if not 0 <= cflag <= 3:
        raise ValueError(f"cflag must be in 0..3, got {cflag}")
    if not 0 <= length <= _LENGTH_MASK:
        raise ValueError(f"length must be in 0..{_LENGTH_MASK}, got {length}")
    return (cflag << _LENGTH_BITS) | length


def decode_lrec(lrec: int) -> tuple[int, int]:
    """Split an ``lrec`` word into ``(cflag, length)``."""
    return (lrec >> _LENGTH_BITS) & 7, lrec & _LENGTH_MASK


def frame_record(payload: bytes) -> bytes:
    """Frame one payload exactly as dmlc's ``RecordIOWriter::WriteRecord`` does.

    Wherever the payload holds the magic number at a 4-byte-aligned offset (checked below the payload's
    length rounded down to a multiple of 4), the record is split there and those 4 bytes are dropped; the
    reader puts them back. The padding after the last part brings the whole record to a multiple of 4 bytes.

    Args:
        payload: The record content (at most ``MAX_PAYLOAD_BYTES``).

    Returns:
        The bytes to append to the ``.rec`` file.
    """
    payload = bytes(payload)
    size = len(payload)
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload must be at most {MAX_PAYLOAD_BYTES} bytes (dmlc's limit), got {size}")
    lower_align = size & ~3
    pieces: list[bytes] = []
    start = 0
    pos = payload.find(MAGIC_BYTES)
    while 0 <= pos and pos + 4 <= lower_align:
        if pos % 4 == 0:
            cflag = CFLAG_FIRST if start == 0 else CFLAG_MIDDLE
            pieces += [MAGIC_BYTES, struct.pack("<I", encode_lrec(cflag, pos - start)), payload[start:pos]]
            start = pos + 4
            pos = payload.find(MAGIC_BYTES, start)
        else:
            pos = payload.find(MAGIC_BYTES, pos + 1)
    cflag = CFLAG_LAST if start else CFLAG_WHOLE
    pieces += [MAGIC_BYTES, struct.pack("<I", encode_lrec(cflag, size - start)), payload[start:]]
    pieces.append(b"\0" * (-size % 4))
    return b"".join(pieces)


# --------------------------------------------------------------------------------------------------------------
# The 24-byte image header
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordHeader:
    """The ``<IfQQ`` header of an image record.

    Attributes:
        flag: Number of float32 labels that follow the header (0: the scalar ``label`` is the label).
        label: The scalar label when ``flag == 0``, else the tuple of ``flag`` labels.
        id: First id field (InsightFace stores the record key; im2rec the image index).
        id2: Second id field (usually 0).
    """

    flag: int
    label: Union[float, tuple[float, ...]]
    id: int = 0
    id2: int = 0

    @property
    def labels(self) -> tuple[float, ...]:
        """All labels as a tuple (one element for a scalar label)."""
        return self.label if isinstance(self.label, tuple) else (self.label,)


def pack_header(label: Union[float, Sequence[float], np.ndarray], id: int = 0, id2: int = 0) -> bytes:
    """Build the header bytes of a record (prepend them to the encoded image).

    Args:
        label: A number (``flag = 0``) or a sequence of numbers stored as ``flag`` float32 values after the
            24-byte struct, whose own label is then 0 (MXNet's ``recordio.pack`` convention).
        id: First id field.
        id2: Second id field.

    Returns:
        ``24 + 4 * flag`` bytes.
    """
    if np.ndim(label) == 0:
        return HEADER_STRUCT.pack(0, float(label), int(id), int(id2))
    labels = np.asarray(label, dtype="<f4").ravel()
    return HEADER_STRUCT.pack(labels.size, 0.0, int(id), int(id2)) + labels.tobytes()


def unpack_header(payload: bytes) -> tuple[RecordHeader, bytes]:
    """Split a record payload into its header and the rest (the encoded image, possibly empty).

    Raises:
        ValueError: If the payload is shorter than the header (and its declared labels).
    """
    if len(payload) < HEADER_SIZE:
        raise ValueError(f"record payload has {len(payload)} bytes, fewer than the {HEADER_SIZE}-byte header")
    flag, label, id_, id2 = HEADER_STRUCT.unpack_from(payload)
    if flag == 0:
        return RecordHeader(0, float(label), id_, id2), bytes(payload[HEADER_SIZE:])
    end = HEADER_SIZE + 4 * flag
    if len(payload) < end:
        raise ValueError(
            f"record header declares {flag} float32 labels ({4 * flag} bytes) but only "
            f"{len(payload) - HEADER_SIZE} bytes follow the {HEADER_SIZE}-byte header"
        )
    labels = tuple(float(v) for v in np.frombuffer(payload, dtype="<f4", count=flag, offset=HEADER_SIZE))
    return RecordHeader(flag, labels, id_, id2), bytes(payload[end:])


def label_to_int(header: RecordHeader, where: str) -> int:
    """The class label of an image record as an int (first label when ``flag > 0``, as arcface_torch does).

    Raises:
        DatasetError: If the label is negative or not a whole number.
    """
    value = header.labels[0] if header.labels else 0.0
    if not (value >= 0 and float(value).is_integer()):
        raise DatasetError(f"{where}: label {value!r} is not a non-negative whole number")
    return int(value)


# --------------------------------------------------------------------------------------------------------------
# The .idx file
# --------------------------------------------------------------------------------------------------------------
def _read_index(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key<TAB>offset`` lines into (keys, offsets) int64 arrays sorted by key."""
    raw = idx_path.read_bytes()
    stripped = raw.strip()
    expected_lines = (stripped.count(b"\n") + 1) if stripped else 0
    numbers: Optional[np.ndarray] = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            numbers = np.fromstring(stripped, dtype=np.int64, sep=" ") if stripped else np.zeros(0, np.int64)
    except (ValueError, DeprecationWarning):
        numbers = None
    if numbers is None or numbers.size != 2 * expected_lines:
        # Slow path: find the offending line and say which it is.
        for lineno, line in enumerate(stripped.split(b"\n"), start=1):
            fields = line.split()
            if len(fields) != 2 or not all(f.lstrip(b"-").isdigit() for f in fields):
                raise DatasetError(
                    f"{idx_path}: line {lineno} is {line[:80]!r}, expected 'key<TAB>byte offset' "
                    "(two integers); the .idx is corrupt or not a RecordIO index"
                )
        raise DatasetError(f"{idx_path}: could not parse the index")  # pragma: no cover - defensive
    table = numbers.reshape(-1, 2)
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    limits = (np.iinfo(np.int64).max, np.iinfo(np.int64).min)  # numpy saturates a number beyond int64 to these
    saturated = np.flatnonzero(np.isin(table, limits).any(axis=1))
    if saturated.size:
        line = int(saturated[0]) + 1
        text = stripped.split(b"\n")[line - 1][:80]
        raise DatasetError(f"{idx_path}: line {line} holds a key or offset beyond the 64-bit range ({text!r}); "
                           "the .idx is corrupt")
    if keys.size and (keys.min() < 0 or offsets.min() < 0):
        bad = int(np.flatnonzero((keys < 0) | (offsets < 0))[0])
        raise DatasetError(f"{idx_path}: line {bad + 1} has a negative key or offset ({keys[bad]}, {offsets[bad]})")
    if keys.size > 1 and not np.all(keys[1:] > keys[:-1]):
        order = np.argsort(keys, kind="stable")
        keys, offsets = keys[order], offsets[order]
        dup = np.flatnonzero(keys[1:] == keys[:-1])
        if dup.size:
            raise DatasetError(f"{idx_path}: key {int(keys[dup[0]])} appears more than once")
    if offsets.size > 1:
        by_offset = np.argsort(offsets, kind="stable")
        same = np.flatnonzero(offsets[by_offset][1:] == offsets[by_offset][:-1])
        if same.size:
            first, second = sorted((int(keys[by_offset[same[0]]]), int(keys[by_offset[same[0] + 1]])))
            raise DatasetError(f"{idx_path}: keys {first} and {second} point at the same byte offset "
                               f"{int(offsets[by_offset[same[0]]])}, so one record would be read twice; the .idx "
                               "is corrupt (rebuild it, or re-pack the data)")
    return keys, offsets


# --------------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------------
class RecordFile:
    """Random access to the records of a ``.rec`` file through its ``.idx``.

    The file is opened lazily, once per process: a DataLoader worker that inherits the object (fork) or
    receives it pickled (spawn) opens its own handle on first use, so workers never share a file position.
    Reads use ``os.pread`` where available (one system call per record in the usual case).

    Args:
        rec_path: The ``.rec`` file.
        idx_path: Its index; default: the same path with the suffix ``.idx`` (``train.rec`` -> ``train.idx``).

    Raises:
        DatasetError: If a file is missing, the index is malformed, or an offset lies beyond the end of the
            ``.rec`` (the index belongs to another file, or the ``.rec`` is truncated).

    Example::

        rec = RecordFile("faces_emore/train.rec")
        len(rec), rec.keys()[:3], len(rec.read(1))
    """

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        with reading("record file", self.rec_path):
            if not self.rec_path.is_file():
                raise DatasetError(f"record file {self.rec_path} does not exist (or is not a file)")
            os.close(os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0)))  # readable? (say it now)
            self.file_size = self.rec_path.stat().st_size
        with reading("index file", self.idx_path):
            if not self.idx_path.is_file():
                raise DatasetError(
                    f"index file {self.idx_path} for {self.rec_path} does not exist; a .rec needs its .idx "
                    "('key<TAB>byte offset' per line, written by the packer)"
                )
            keys, offsets = _read_index(self.idx_path)
        if offsets.size:
            beyond = np.flatnonzero(offsets + 8 > self.file_size)
            if beyond.size:
                i = int(beyond[0])
                raise CorruptRecordError(
                    f"{self.idx_path}: key {int(keys[i])} points at byte offset {int(offsets[i])}, beyond the end "
                    f"of {self.rec_path} ({self.file_size} bytes): the .rec is truncated or the .idx belongs to "
                    "another file",
                    path=str(self.rec_path),
                    key=int(keys[i]),
                    offset=int(offsets[i]),
                )
        self._offsets = offsets
        contiguous = keys.size == 0 or int(keys[-1]) - int(keys[0]) + 1 == keys.size
        self._first_key = int(keys[0]) if keys.size else 0
        self._keys: Optional[np.ndarray] = None if contiguous else keys
        # Where each record ends (the next record's offset, or EOF): the size of the single read per record.
        if offsets.size > 1 and np.all(offsets[1:] > offsets[:-1]):
            self._ends: Optional[np.ndarray] = None
        else:
            order = np.argsort(offsets, kind="stable")
            ends = np.empty_like(offsets)
            ends[order] = np.append(offsets[order][1:], self.file_size)
            self._ends = ends
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None

    # -- keys ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._offsets.size)

    def keys(self) -> Sequence[int]:
        """The keys in ascending order (a ``range`` when they are contiguous, the usual case)."""
        if self._keys is None:
            return range(self._first_key, self._first_key + len(self))
        return [int(k) for k in self._keys]

    def _position(self, key: int) -> int:
        if self._keys is None:
            pos = int(key) - self._first_key
            if 0 <= pos < len(self):
                return pos
        else:
            pos = int(np.searchsorted(self._keys, key))
            if pos < len(self) and int(self._keys[pos]) == key:
                return pos
        raise RecordKeyError(
            f"key {key} is not in {self.idx_path} ({len(self)} records, keys {self._key_range_text()})"
        )

    def _key_range_text(self) -> str:
        if not len(self):
            return "none"
        last = self._first_key + len(self) - 1 if self._keys is None else int(self._keys[-1])
        first = self._first_key if self._keys is None else int(self._keys[0])
        return f"{first}..{last}" + ("" if self._keys is None else " with gaps")

    def __contains__(self, key: object) -> bool:
        try:
            self._position(int(key))  # type: ignore[arg-type]
        except (RecordKeyError, TypeError, ValueError):
            return False
        return True

    def offset(self, key: int) -> int:
        """Byte offset of a record in the ``.rec`` (from the ``.idx``)."""
        return int(self._offsets[self._position(key)])

    # -- file handle --------------------------------------------------------------------------------------------
    def _handle(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            if self._fd is not None:  # inherited through fork: drop this process's copy, open our own
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            with reading("record file", self.rec_path):
                self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = pid
        return self._fd

    def _pread(self, size: int, offset: int) -> bytes:
        fd = self._handle()
        if hasattr(os, "pread"):
            return os.pread(fd, size, offset)
        os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
        return os.read(fd, size)  # pragma: no cover

    def close(self) -> None:
        """Close this process's handle (it reopens on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None
        self._pid = None

    def __enter__(self) -> "RecordFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"RecordFile({str(self.rec_path)!r}, {len(self)} records)"

    # -- reading ------------------------------------------------------------------------------------------------
    def read(self, key: int) -> bytes:
        """The whole payload of the record ``key``, continuation parts joined.

        Raises:
            RecordKeyError: If ``key`` is not in the index.
            CorruptRecordError: On a bad magic number, a bad continuation-flag sequence or a truncated file;
                the message names the file, the key and the byte offset.
        """
        pos = self._position(key)
        start = int(self._offsets[pos])
        end = int(self._ends[pos]) if self._ends is not None else (
            int(self._offsets[pos + 1]) if pos + 1 < len(self) else self.file_size
        )
        return self._read_at(start, max(end - start, 8), key)

    def read_head(self, key: int, size: int) -> bytes:
        """The first ``size`` bytes of a record's payload (fewer if it is shorter): headers without images."""
        pos = self._position(key)
        start = int(self._offsets[pos])
        buf = self._pread(8 + size, start)
        if len(buf) >= 8:
            magic, lrec = _LREC.unpack_from(buf)
            cflag, length = decode_lrec(lrec)
            if magic == MAGIC and cflag == CFLAG_WHOLE and len(buf) >= 8 + min(size, length):
                return buf[8 : 8 + min(size, length)]
        return self.read(key)[:size]  # split record, or an error to report in full

    def _corrupt(self, key: Optional[int], offset: int, problem: str) -> CorruptRecordError:
        where = f"key {key}" if key is not None else "record"
        return CorruptRecordError(
            f"{self.rec_path}: {where} at byte offset {offset}: {problem}", path=str(self.rec_path), key=key,
            offset=offset,
        )

    def _read_at(self, start: int, hint: int, key: Optional[int]) -> bytes:
        buf = self._pread(hint, start)
        base = start  # file offset of buf[0]
        pos = 0  # parse position in buf
        parts: list[bytes] = []
        expect_continuation = False

        def ensure(n: int) -> bool:
            nonlocal buf
            missing = pos + n - len(buf)
            if missing > 0:
                buf += self._pread(missing, base + len(buf))
            return len(buf) >= pos + n

        while True:
            part_offset = base + pos
            if not ensure(8):
                raise self._corrupt(
                    key, part_offset,
                    f"truncated file: a part header needs 8 bytes but {self.rec_path} ends at byte {self.file_size}",
                )
            magic, lrec = _LREC.unpack_from(buf, pos)
            if magic != MAGIC:
                raise self._corrupt(
                    key, part_offset,
                    f"bad magic number 0x{magic:08X} (expected 0x{MAGIC:08X}): the file is corrupt or the .idx "
                    "does not belong to this .rec",
                )
            cflag, length = decode_lrec(lrec)
            if cflag > CFLAG_LAST:
                raise self._corrupt(key, part_offset, f"invalid continuation flag {cflag} (allowed 0..3)")
            if expect_continuation and cflag not in (CFLAG_MIDDLE, CFLAG_LAST):
                raise self._corrupt(
                    key, part_offset,
                    f"bad cflag sequence: a record part with cflag {cflag} follows a first/middle part "
                    "(expected 2 or 3)",
                )
            if not expect_continuation and cflag not in (CFLAG_WHOLE, CFLAG_FIRST):
                raise self._corrupt(
                    key, part_offset,
                    f"bad cflag sequence: the record starts with cflag {cflag} (a middle/last part; expected 0 or "
                    "1): the .idx offset points inside a split record",
                )
            padded = (length + 3) & ~3
            pos += 8
            if not ensure(length):
                raise self._corrupt(
                    key, part_offset,
                    f"truncated record: the part declares {length} bytes but {self.rec_path} ends at byte "
                    f"{self.file_size}",
                )
            parts.append(bytes(buf[pos : pos + length]))
            pos += padded
            if cflag in (CFLAG_WHOLE, CFLAG_LAST):
                break
            expect_continuation = True
        return parts[0] if len(parts) == 1 else MAGIC_BYTES.join(parts)

    def read_header(self, key: int) -> RecordHeader:
        """The 24-byte header (and array labels) of a record without reading its image."""
        head = self.read_head(key, HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            raise self._corrupt(key, self.offset(key), f"payload of {len(head)} bytes is shorter than the header")
        flag = HEADER_STRUCT.unpack_from(head)[0]
        if flag:
            head = self.read_head(key, HEADER_SIZE + 4 * min(int(flag), 1 << 20))
        try:
            return unpack_header(head)[0]
        except ValueError as err:
            raise self._corrupt(key, self.offset(key), str(err)) from None

    def read_label(self, key: int) -> int:
        """The integer class label of an image record (first label when the header holds several)."""
        return label_to_int(self.read_header(key), f"{self.rec_path} key {key} (byte offset {self.offset(key)})")


# --------------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------------
class RecordWriter:
    """Append records to a new ``.rec`` and its ``.idx`` (``key<TAB>offset`` lines), in dmlc's framing.

    Args:
        rec_path: The ``.rec`` to create (overwritten if present).
        idx_path: Its index; default: the same path with the suffix ``.idx``.

    Example::

        with RecordWriter("out/train.rec") as writer:
            writer.write(0, pack_header(3.0) + jpeg_bytes)
    """

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if self.rec_path.resolve() == self.idx_path.resolve():
            raise ValueError(f"rec_path and idx_path must differ, both are {self.rec_path}")
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n")
        self._positions: dict[int, tuple[int, int]] = {}  # key -> (offset, framed size)
        self._tell = 0

    def write(self, key: int, payload: bytes) -> int:
        """Append one record; returns its byte offset.

        Raises:
            ValueError: If ``key`` is negative or already written, or the payload is too large.
        """
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
            raise ValueError(f"key must be a non-negative int, got {key!r}")
        key = int(key)
        if key in self._positions:
            raise ValueError(f"key {key} was already written to {self.rec_path}")
        framed = frame_record(payload)
        offset = self._tell
        self._rec.write(framed)
        self._idx.write(f"{key}\t{offset}\n")
        self._positions[key] = (offset, len(framed))
        self._tell += len(framed)
        return offset

    def overwrite(self, key: int, payload: bytes) -> None:
        """Replace a written record in place; the new framing must have exactly the old size.

        Used to write a header record first and fill in its counts at the end.
        """
        if key not in self._positions:
            raise ValueError(f"key {key} has not been written to {self.rec_path}")
        offset, size = self._positions[key]
        framed = frame_record(payload)
        if len(framed) != size:
            raise ValueError(f"the new record for key {key} frames to {len(framed)} bytes, the old one to {size}")
        self._rec.seek(offset)
        self._rec.write(framed)
        self._rec.seek(self._tell)

    def __len__(self) -> int:
        return len(self._positions)

    def close(self) -> None:
        """Flush and close both files."""
        for handle in (self._rec, self._idx):
            if not handle.closed:
                handle.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# InsightFace layout
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordLayout:
    """Where images and identity records sit in a pack.

    Attributes:
        has_header_record: True for the InsightFace layout (key 0 holds the counts).
        image_keys: Keys of the image records, ascending.
        identity_keys: Keys of the identity records (empty without a header record).
        header_labels: The header record's float32 labels ``(N + 1, N + 1 + C)``, or None.
    """

    has_header_record: bool
    image_keys: Sequence[int]
    identity_keys: Sequence[int]
    header_labels: Optional[tuple[float, ...]] = None

    @property
    def num_images(self) -> int:
        return len(self.image_keys)

    @property
    def num_identities(self) -> Optional[int]:
        """Number of identity records (from the ``.idx``), or None for packs without a header record."""
        return len(self.identity_keys) if self.has_header_record else None


def _is_identity_record(record_file: RecordFile, key: int) -> bool:
    """True for a label-only record with 2 labels and no image (header or identity record)."""
    payload = record_file.read_head(key, HEADER_SIZE + 9)
    if len(payload) != HEADER_SIZE + 8:
        return False
    return HEADER_STRUCT.unpack_from(payload)[0] == 2


def parse_layout(record_file: RecordFile) -> RecordLayout:
    """Find the image and identity keys of a pack.

    With a header record (key 0, two labels, no image) the images are keys ``1 .. N`` and the identity records
    follow. The header's float32 counts are exact only up to 2**24; above that (and whenever they disagree with
    the file) the boundary is located from the ``.idx`` and the records themselves, and the number of identities
    is the number of index keys after the last image. Without a header record every key is an image.

    Raises:
        DatasetError: If the pack is empty or the header record contradicts the file beyond float32 rounding.
    """
    keys = record_file.keys()
    if not len(keys):
        raise DatasetError(f"{record_file.idx_path} lists no records: the pack is empty")
    first = keys[0]
    if first != 0 or not _is_identity_record(record_file, 0):
        return RecordLayout(False, keys, range(0), None)
    header = record_file.read_header(0)
    labels = header.labels
    if not all(np.isfinite(labels)):
        raise DatasetError(
            f"{record_file.rec_path}: the header record (key 0) holds the counts {labels}, which are not finite "
            "numbers; the pack is corrupt (re-pack the data, or rebuild its header record)"
        )
    last_key = keys[-1]
    estimate = int(round(labels[0]))
    exact = abs(labels[0]) < FLOAT32_EXACT_INTEGERS

    def is_boundary(candidate: int) -> bool:
        """Keys below ``candidate`` are images, ``candidate`` starts the identity records (or is past the end)."""
        if candidate < 1 or candidate > last_key + 1:
            return False
        if candidate - 1 >= 1 and (candidate - 1 not in record_file or _is_identity_record(record_file, candidate - 1)):
            return False
        return candidate == last_key + 1 or (candidate in record_file and _is_identity_record(record_file, candidate))

    boundary: Optional[int] = estimate if is_boundary(estimate) else None
    if boundary is None:
        window = 8 if exact else max(8, int(abs(labels[0])) >> 22)
        # only keys the .idx holds can be the boundary: the header's count cannot make the search any longer
        low, high = max(1, estimate - window), min(last_key + 1, estimate + window)
        for candidate in _nearest_first(estimate, low, high):
            if is_boundary(candidate):
                boundary = candidate
                break
    if boundary is None:
        raise DatasetError(
            f"{record_file.rec_path}: the header record (key 0) says images are keys 1..{estimate - 1}, but no "
            f"image/identity boundary was found near key {estimate}; the pack is inconsistent"
        )
    if boundary != estimate:
        log.warning(
            "%s: header record says %s images but the .idx and records put the first identity record at key %d; "
            "using the .idx (float32 counts are inexact above 2**24)", record_file.rec_path, labels[0] - 1, boundary,
        )
    if isinstance(keys, range):
        image_keys: Sequence[int] = range(1, boundary)
        identity_keys: Sequence[int] = range(boundary, last_key + 1)
    else:
        image_keys = [k for k in keys if 1 <= k < boundary]
        identity_keys = [k for k in keys if k >= boundary]
        if len(image_keys) != boundary - 1:
            raise DatasetError(
                f"{record_file.idx_path}: image keys 1..{boundary - 1} are expected but "
                f"{boundary - 1 - len(image_keys)} of them are missing from the index"
            )
    if len(labels) > 1:
        declared = labels[1] - labels[0]
        tolerance = 0 if abs(labels[1]) < FLOAT32_EXACT_INTEGERS else 8
        if abs(declared - len(identity_keys)) > tolerance:
            log.warning(
                "%s: header record declares %d identities but the .idx has %d identity records; using the .idx",
                record_file.rec_path, int(declared), len(identity_keys),
            )
    return RecordLayout(True, image_keys, identity_keys, labels)


def _nearest_first(centre: int, low: int, high: int) -> Iterator[int]:
    """The integers of ``[low, high]`` by distance from ``centre`` (the nearer first; below before above)."""
    if low > high:
        return
    distance = max(0, low - centre, centre - high)
    while centre - distance >= low or centre + distance <= high:
        for candidate in ((centre,) if distance == 0 else (centre - distance, centre + distance)):
            if low <= candidate <= high:
                yield candidate
        distance += 1


def read_identity_range(record_file: RecordFile, key: int) -> tuple[int, int]:
    """``(first image key, last + 1)`` of an identity record."""
    header = record_file.read_header(key)
    where = f"{record_file.rec_path} key {key} (byte offset {record_file.offset(key)})"
    if header.flag != 2:
        raise DatasetError(f"{where} is not an identity record (header flag {header.flag}, expected 2 labels)")
    if not all(np.isfinite(header.labels)):
        raise DatasetError(f"{where}: the identity record's image range {header.labels} is not finite; the pack is "
                           "corrupt (re-pack the data)")
    return int(round(header.labels[0])), int(round(header.labels[1]))
