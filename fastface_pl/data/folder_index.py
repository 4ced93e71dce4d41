"""The file index of an image folder ``<root>/<identity>/<image>``: one walk, cached in a binary file, kept up to date.

Walking a WebFace42M folder (2 million identity folders, 42 million files) takes minutes, so the list of
identities and of their images is cached: by default in ``<root>/.fastface_cache/image_index.bin``, else
(``root`` not writable) in ``$XDG_CACHE_HOME/fastface_pl/index-<hash of root>.bin``. The cache lives in a folder of
its own, made before the first walk, so that writing it never touches the top level's time: a later start then
trusts that time and does not list the top level's 2 million entries again. The file holds a short JSON header and
raw arrays (identity names, their folders' times, image counts, each image's ``identity/file`` path and label),
which a start maps into memory (``np.memmap``) instead of parsing: reading the cache costs the same whatever the
number of files, and the pages are shared by every process on the machine.

At each start the cache is checked against the folder without listing it again:

* the top level of ``root``: trusted when its modification and status-change times are older than the cache
  (no identity folder added, removed or renamed since; ``tar x`` and ``rsync -a`` set the modification time back,
  never the status-change time), else listed again;
* every identity folder's modification time, one ``stat`` each. A folder's modification time changes whenever
  a file in it is added, removed or renamed, which is all the index records (new *contents* under the same
  name need no new index).

Only the folders that differ are listed again, the cache is rewritten, and a warning names them. A folder's
time is read *before* it is listed, so a change during the listing leaves a stale time, never a stale listing;
and a folder modified less than :data:`RECENT_NS` before the walk began is recorded as unknown (listed again at
the next start), because a second change within the file system's clock tick would keep the same time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from fastface_pl.atomic import atomic_write
from fastface_pl.data.errors import reading, unreadable
from fastface_pl.locks import remove_stale_temporaries

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CACHE_FOLDER_NAME = ".fastface_cache"
INDEX_CACHE_NAME = f"{CACHE_FOLDER_NAME}/image_index.bin"
"""The cache's path relative to the image folder."""
_OWN_PREFIX = ".fastface_"  # top-level entries of ours: not identities, not counted
INDEX_FORMAT = "fastface_pl.image_folder_index"
INDEX_VERSION = 3  # of the header and array layout below: a cache of another version is rebuilt
_MAGIC = b"FFINDEX\n"
_ALIGN = 64
RECENT_NS = 2_000_000_000
"""A folder modified this shortly before the walk began is listed again at the next start (clock granularity)."""
UNKNOWN_MTIME = -1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fastface_pl`` (``~/.cache/fastface_pl``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastface_pl"


def root_entries(root: Path) -> int:
    """Number of top-level entries of ``root``, not counting our own cache files."""
    with reading("image folder", root), os.scandir(root) as entries:
        return sum(1 for e in entries if not e.name.startswith(_OWN_PREFIX))


def identity_folders(root: Path) -> list[str]:
    """The sorted names of the identity folders of ``root`` (hidden entries and plain files left out).

    A symbolic link that cannot be followed (it points to itself, round a loop or nowhere) is left out with a
    warning naming it, as it is neither an identity nor a file."""
    names, unfollowable = [], []
    with reading("image folder", root), os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_folder = entry.is_dir()
            except OSError:  # ELOOP: a link to itself or round a loop
                is_folder = False
                unfollowable.append(entry.name)
            else:
                if not is_folder and entry.is_symlink() and not os.path.exists(entry.path):
                    unfollowable.append(entry.name)
            if is_folder:
                names.append(entry.name)
    if unfollowable:
        log.warning("%s: %d symbolic link(s) cannot be followed (pointing to themselves, round a loop or nowhere) "
                    "and are not identities: %s; remove or fix them", root, len(unfollowable),
                    ", ".join(sorted(unfollowable)[:5]))
    return sorted(names)


def list_images(folder: Path, extensions: Sequence[str]) -> list[str]:
    """The sorted names of the images in one identity folder (hidden files left out)."""
    wanted = tuple(e.lower() for e in extensions)
    with reading("identity folder", folder), os.scandir(folder) as entries:
        return sorted(
            e.name for e in entries if not e.name.startswith(".") and e.name.lower().endswith(wanted) and e.is_file()
        )


def _mtime(folder: Path) -> int:
    try:
        return os.stat(folder).st_mtime_ns
    except FileNotFoundError:
        return UNKNOWN_MTIME
    except PermissionError as error:
        raise unreadable("identity folder", folder, error) from None


def folder_mtimes(root: Path, names: Sequence[Any], threads: int = 8) -> np.ndarray:
    """``st_mtime_ns`` of each ``root/name`` (:data:`UNKNOWN_MTIME` where it is gone), ``int64``.

    One ``stat`` per folder, relative to an open ``root`` where the system allows it (no path to build). The
    first :data:`_PROBE` run in this thread; when they were slow (more than :data:`_SLOW_STAT_S` each: a network
    file system), the rest run in ``threads`` threads to overlap their latency; on a local disk threads would
    only add work. ``names`` are ``str`` or file-system ``bytes``.
    """
    fd = os.open(root, os.O_RDONLY) if os.stat in os.supports_dir_fd else None
    stat = os.stat

    def one(name: Any) -> int:
        try:
            return os.stat(name, dir_fd=fd).st_mtime_ns if fd is not None else os.stat(root / os.fsdecode(name)).st_mtime_ns
        except FileNotFoundError:
            return UNKNOWN_MTIME
        except PermissionError as error:
            raise unreadable("identity folder", root / os.fsdecode(name), error) from None

    def chunk(part: Sequence[Any]) -> list[int]:
        if fd is None:
            return [one(name) for name in part]
        try:  # the common case in one comprehension: a Python call per folder costs a fifth of the check
            return [stat(name, dir_fd=fd).st_mtime_ns for name in part]
        except OSError:  # a folder gone or unreadable: again, one by one, to tell which
            return [one(name) for name in part]

    try:
        started = time.perf_counter()
        out = chunk(names[:_PROBE])
        rest = names[_PROBE:]
        if len(rest) and (time.perf_counter() - started) / max(1, len(out)) > _SLOW_STAT_S:
            step = -(-len(rest) // (4 * threads))
            with ThreadPoolExecutor(threads) as pool:
                for part in pool.map(chunk, [rest[i : i + step] for i in range(0, len(rest), step)]):
                    out.extend(part)
        else:
            out.extend(chunk(rest))
        return np.array(out, dtype=np.int64)
    finally:
        if fd is not None:
            os.close(fd)


_PROBE = 2048
_SLOW_STAT_S = 20e-6


def scan_image_folder(
    root: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, mtimes: Optional[list[int]] = None
) -> tuple[list[str], list[list[str]]]:
    """Walk ``<root>/<identity>/<image>``: sorted identity folders and, per identity, its sorted image names.

    Hidden entries (names starting with ``.``) are ignored, as are files directly under ``root``.

    Args:
        root: The image folder.
        extensions: Image suffixes to list (case-insensitive).
        mtimes: If given, receives each identity folder's ``st_mtime_ns``, read before the folder is listed.

    Raises:
        DatasetError: If ``root`` or an identity folder cannot be read (the message names it and the fix).
    """
    root = Path(root)
    identities = identity_folders(root)
    files = []
    for name in identities:
        if mtimes is not None:
            mtimes.append(_mtime(root / name))
        files.append(list_images(root / name, extensions))
    return identities, files


@dataclass
class FolderIndex:
    """The images of an image folder, per identity (in sorted order), and what the cache compares.

    Arrays, memory-mapped when read from the cache: ``names`` (the identity folders, file-system bytes, sorted),
    ``folder_mtimes`` (``int64``, :data:`UNKNOWN_MTIME` where not trusted), ``counts`` (images per identity),
    ``paths`` (each image's ``identity/file``, grouped by identity in order) and ``labels`` (``int32``, the
    position of each image's identity).
    """

    names: np.ndarray
    folder_mtimes: np.ndarray
    counts: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    root_entries: int
    _identities: Optional[list[str]] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_listing(cls, identities: Sequence[str], files: Sequence[Sequence[str]], mtimes: Sequence[int],
                     root_entries: int) -> "FolderIndex":
        """The index of identity folders ``identities`` holding ``files`` (names of images, sorted)."""
        counts = np.array([len(names) for names in files], dtype=np.int64)
        return cls(
            names=_bytes_array([os.fsencode(name) for name in identities]),
            folder_mtimes=np.asarray(mtimes, dtype=np.int64), counts=counts,
            paths=_bytes_array([os.fsencode(os.path.join(name, f))
                                for name, names in zip(identities, files, strict=True) for f in names]),
            labels=np.repeat(np.arange(len(identities), dtype=np.int32), counts), root_entries=int(root_entries),
        )

    @property
    def identities(self) -> list[str]:
        """The identity folder names, sorted (decoded once, when first asked for)."""
        if self._identities is None:
            self._identities = [os.fsdecode(name) for name in self.names.tolist()]
        return self._identities

    def files(self, identity: int) -> list[str]:
        """The image names of the identity at position ``identity``."""
        offsets = self.offsets
        prefix = len(self.names[identity]) + 1
        return [os.fsdecode(p[prefix:]) for p in self.paths[offsets[identity]:offsets[identity + 1]].tolist()]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)


def _bytes_array(items: Sequence[bytes]) -> np.ndarray:
    return np.array(items, dtype=np.bytes_) if len(items) else np.zeros(0, dtype="S1")


def _walk(
    root: Path, extensions: Sequence[str], names: Sequence[str], entries: int, old: Optional[FolderIndex],
    now: np.ndarray,
) -> tuple[FolderIndex, dict[str, list[str]], dict[str, list[str]]]:
    """Index ``names``, reusing ``old``'s listings whose folder time is unchanged. Also returns the folders listed
    again, and the old listings of those (for the warning)."""
    started = time.time_ns()
    position = {} if old is None else {name: i for i, name in enumerate(old.identities)}
    old_offsets = None if old is None else old.offsets
    segments, counts, mtimes, listed, before = [], [], [], {}, {}
    for name, mtime in zip(names, now.tolist(), strict=True):
        j = position.get(name)
        if j is not None and old.folder_mtimes[j] == mtime != UNKNOWN_MTIME:
            segments.append(old.paths[old_offsets[j]:old_offsets[j + 1]])
            counts.append(int(old.counts[j]))
            mtimes.append(mtime)
            continue
        mtime = _mtime(root / name)  # before the listing: a change during it leaves this time stale
        listed[name] = list_images(root / name, extensions)
        if j is not None:
            before[name] = old.files(j)
        segments.append(_bytes_array([os.fsencode(os.path.join(name, f)) for f in listed[name]]))
        counts.append(len(listed[name]))
        mtimes.append(mtime if mtime < started - RECENT_NS else UNKNOWN_MTIME)
    counts_array = np.array(counts, dtype=np.int64)
    paths = np.concatenate(segments) if segments else _bytes_array([])
    index = FolderIndex(_bytes_array([os.fsencode(n) for n in names]), np.array(mtimes, dtype=np.int64),
                        counts_array, paths, np.repeat(np.arange(len(names), dtype=np.int32), counts_array), entries)
    index._identities = list(names)
    return index, listed, before


def build_index(root: Path, extensions: Sequence[str]) -> FolderIndex:
    """Walk the whole folder."""
    entries = root_entries(root)
    names = identity_folders(root)
    return _walk(root, extensions, names, entries, None, np.full(len(names), UNKNOWN_MTIME, dtype=np.int64))[0]


def update_index(root: Path, extensions: Sequence[str], cached: FolderIndex, cache_mtime_ns: int) -> tuple[
        FolderIndex, Optional[str]]:
    """``cached`` brought up to date with the folder, and a description of what changed (None: nothing).

    Reads the top level only when it changed, ``stat`` s every identity folder, and lists only the folders whose
    time differs from the recorded one (or was recorded as unknown). An unchanged folder costs one array
    comparison after the ``stat`` s: no name is decoded, nothing is listed.
    """
    # A change of the top level after the cache was written sets the root's status-change time (ctime) to at
    # least the cache's time: unlike the modification time, no `tar x` or `rsync -a` can set it back. Only a top
    # level settled before the cache was written is trusted without listing it.
    info = os.stat(root)
    settled = max(info.st_mtime_ns, info.st_ctime_ns) < cache_mtime_ns - RECENT_NS
    top_changed = not settled
    if settled:
        entries = cached.root_entries
        now = folder_mtimes(root, cached.names.tolist())
        recorded = np.asarray(cached.folder_mtimes)
        if np.array_equal(now, recorded) and not (recorded == UNKNOWN_MTIME).any():
            return cached, None
        names = cached.identities
        top_changed = bool((now == UNKNOWN_MTIME).any())  # a folder is gone: list the top level after all
    if top_changed:
        entries = root_entries(root)
        names = identity_folders(root)
        now = folder_mtimes(root, names)
        recorded = np.asarray(cached.folder_mtimes)
        if (entries == cached.root_entries and names == cached.identities and np.array_equal(now, recorded)
                and not (recorded == UNKNOWN_MTIME).any()):
            return cached, None
    index, listed, before = _walk(root, extensions, names, entries, cached, now)
    old_names = set(cached.identities)
    added = sorted(set(names) - old_names)
    removed = sorted(old_names - set(names))
    changed = [name for name, files in listed.items() if name in before and before[name] != files]
    if not (added or removed or changed):
        return index, None  # only folders with unknown times were listed again, and they hold the same files
    parts = []
    for names_, what in ((added, "added"), (removed, "removed"), (changed, "with images added, removed or renamed")):
        if names_:
            shown = ", ".join(names_[:5]) + (", ..." if len(names_) > 5 else "")
            parts.append(f"{len(names_)} identity folder(s) {what} ({shown})")
    return index, "; ".join(parts)


def _cache_places(root: Path, index_cache: Optional[Path]) -> list[Path]:
    if index_cache is not None:
        return [index_cache]
    digest = hashlib.sha1(str(root.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return [root / INDEX_CACHE_NAME, default_cache_dir() / f"index-{digest}.bin"]


_ARRAYS = ("names", "folder_mtimes", "counts", "paths", "labels")


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is the folder's own cache place (then the folder may have moved with it)."""
    return path.resolve() == (root / INDEX_CACHE_NAME).resolve()


def _data_start(header_length: int) -> int:
    """Where the arrays begin: after the magic, the header's length and the header, aligned."""
    return -(-(len(_MAGIC) + 8 + header_length) // _ALIGN) * _ALIGN


def _read_cache(path: Path, root: Path, extensions: Sequence[str]) -> Optional[tuple[FolderIndex, int]]:
    """The index cached at ``path`` for this folder and extensions, with the cache's time (None if unusable).

    Reads the header and maps the arrays: constant time whatever the number of files.
    """
    try:
        cache_mtime = path.stat().st_mtime_ns
        size = path.stat().st_size
        with open(path, "rb") as handle:
            magic = handle.read(len(_MAGIC))
            if magic != _MAGIC:
                return None
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length).decode("utf-8"))
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None
    if (
        not isinstance(header, dict) or header.get("format") != INDEX_FORMAT
        or (header.get("root") != str(root.resolve()) and not _inside(path, root))
        or header.get("extensions") != list(extensions)
    ):
        return None
    if header.get("version") != INDEX_VERSION:
        log.info("image-folder index %s has another format version: indexing %s again", path, root)
        return None
    arrays = {}
    try:
        for name in _ARRAYS:
            offset, dtype, shape = header["arrays"][name]
            offset += _data_start(length)
            count = int(np.prod(shape))
            if offset + count * np.dtype(dtype).itemsize > size:
                return None  # truncated
            arrays[name] = (np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape)) if count
                            else np.zeros(shape, dtype=dtype))
        index = FolderIndex(**arrays, root_entries=int(header["root_entries"]))
    except (KeyError, TypeError, ValueError, OSError):
        return None
    if not len(index.names) == len(index.folder_mtimes) == len(index.counts) or \
            len(index.paths) != len(index.labels) or int(index.counts.sum()) != len(index.paths):
        return None
    return index, cache_mtime


def _write_cache(index: FolderIndex, root: Path, extensions: Sequence[str], places: list[Path]) -> Optional[Path]:
    arrays = {name: np.ascontiguousarray(getattr(index, name)) for name in _ARRAYS}
    layout, offset = {}, 0
    for name, array in arrays.items():
        layout[name] = [offset, array.dtype.str, list(array.shape)]
        offset += -(-array.nbytes // _ALIGN) * _ALIGN
    header = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "root": str(root.resolve()), "extensions": list(extensions),
        "root_entries": index.root_entries, "arrays": layout,  # offsets from the data start
    }
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    start = _data_start(len(text))
    for target in places:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(target, "wb", "image-folder index cache") as handle:
                handle.write(_MAGIC + struct.pack("<Q", len(text)) + text)
                for name, array in arrays.items():
                    handle.seek(start + layout[name][0])
                    handle.write(array.reshape(-1).view(np.uint8))
                handle.truncate(start + layout[_ARRAYS[-1]][0] + arrays[_ARRAYS[-1]].nbytes)
            os.utime(target)  # newer than the rename's change to the folder's mtime
            return target
        except OSError as error:  # a full disk too (DiskFullError): try the next place, or go without a cache
            log.info("cannot write the image-folder index to %s (%s)", target, error)
    return None


def load_index(
    root: Path, extensions: Sequence[str], index_cache: Optional[Path] = None, rebuild: bool = False
) -> tuple[FolderIndex, Optional[Path]]:
    """The folder's index, from the cache brought up to date or from a walk, and where it is cached now.

    Args:
        root: The image folder.
        extensions: Image suffixes (lower case, sorted: part of the cache's identity).
        index_cache: The cache file; None for ``<root>/.fastface_cache/image_index.bin``, else the user cache.
        rebuild: Ignore any cache and walk the whole folder.

    Raises:
        DatasetError: If ``root`` or an identity folder cannot be read.
    """
    places = _cache_places(root, index_cache)
    if index_cache is None:  # before any walk, so that the top level's time moves now and never at a cache write
        try:
            (root / CACHE_FOLDER_NAME).mkdir(exist_ok=True)
        except OSError:
            pass  # a read-only folder: the user cache takes the index
    for place in places:  # what a killed start left while writing the cache
        remove_stale_temporaries(place.parent, unlocked=True, of=(place.name,))
    started = time.perf_counter()
    for path in [] if rebuild else places:
        cached = _read_cache(path, root, extensions)
        if cached is None:
            continue
        index, change = update_index(root, extensions, *cached)
        if index is cached[0]:
            log.info("image-folder index of %s read from %s", root, path)
            return index, path
        if change is not None:
            log.warning("image-folder index %s was out of date: %s since it was built; listed those folders again",
                        path, change)
        return index, _write_cache(index, root, extensions, places[places.index(path):]) or path
    index = build_index(root, extensions)
    written = _write_cache(index, root, extensions, places)
    log.info(
        "indexed %s: %d identities, %d images in %.1f s; index cached at %s", root, len(index.names),
        len(index.paths), time.perf_counter() - started, written or "nowhere (no writable place)",
    )
    return index, written
