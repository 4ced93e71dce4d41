"""The file index of an image folder ``<root>/<identity>/<image>``: one walk, cached as JSON, kept up to date.

Walking a WebFace42M folder (2 million identity folders, 42 million files) takes minutes, so the list of
identities and of their images is cached: by default in ``<root>/.fastface_index.json``, else (``root`` not
writable) in ``$XDG_CACHE_HOME/fastface_pl/index-<hash of root>.json``.

At each start the cache is checked against the folder without listing it again:

* the top level of ``root``: its number of entries, and a modification time not newer than the cache
  (identity folders added, removed or renamed);
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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from fastface_pl.data.errors import reading, unreadable

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
INDEX_CACHE_NAME = ".fastface_index.json"
INDEX_FORMAT = "fastface_pl.image_folder_index"
INDEX_VERSION = 2  # 2 added the identity folders' modification times (version 1 caches are rebuilt)
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
        return sum(1 for e in entries if not e.name.startswith(INDEX_CACHE_NAME))


def identity_folders(root: Path) -> list[str]:
    """The sorted names of the identity folders of ``root`` (hidden entries and plain files left out)."""
    with reading("image folder", root), os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


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


def folder_mtimes(root: Path, names: Sequence[str], threads: int = 8) -> list[int]:
    """``st_mtime_ns`` of each ``root/name`` (:data:`UNKNOWN_MTIME` where it is gone).

    One ``stat`` per folder; threads hide the latency of network file systems for large folders.
    """
    def chunk(part: Sequence[str]) -> list[int]:
        return [_mtime(root / name) for name in part]

    if len(names) < 4096:
        return chunk(names)
    step = -(-len(names) // (4 * threads))
    with ThreadPoolExecutor(threads) as pool:
        return [t for part in pool.map(chunk, [names[i : i + step] for i in range(0, len(names), step)]) for t in part]


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
    """The images of an image folder, per identity (in sorted order), and what the cache compares."""

    identities: list[str]
    files: list[list[str]]
    folder_mtimes: list[int]
    root_entries: int


def _unchanged(recorded: Optional[tuple[int, list[str]]], mtime: int) -> bool:
    return recorded is not None and recorded[0] == mtime != UNKNOWN_MTIME


def _walk(
    root: Path, extensions: Sequence[str], names: Sequence[str], entries: int,
    old: dict[str, tuple[int, list[str]]], now: Sequence[int],
) -> tuple[FolderIndex, dict[str, list[str]]]:
    """Index ``names``, reusing ``old`` listings whose folder time is unchanged; also returns the new listings."""
    started = time.time_ns()
    files, mtimes, listed = [], [], {}
    for name, mtime in zip(names, now, strict=True):
        if _unchanged(old.get(name), mtime):
            files.append(old[name][1])
            mtimes.append(mtime)
            continue
        mtime = _mtime(root / name)  # before the listing: a change during it leaves this time stale
        listed[name] = list_images(root / name, extensions)
        files.append(listed[name])
        mtimes.append(mtime if mtime < started - RECENT_NS else UNKNOWN_MTIME)
    return FolderIndex(list(names), files, mtimes, entries), listed


def build_index(root: Path, extensions: Sequence[str]) -> FolderIndex:
    """Walk the whole folder."""
    entries = root_entries(root)
    names = identity_folders(root)
    return _walk(root, extensions, names, entries, {}, [UNKNOWN_MTIME] * len(names))[0]


def update_index(root: Path, extensions: Sequence[str], cached: FolderIndex, cache_mtime_ns: int) -> tuple[
        FolderIndex, Optional[str]]:
    """``cached`` brought up to date with the folder, and a description of what changed (None: nothing).

    Reads the top level only when it changed, ``stat`` s every identity folder, and lists only the folders whose
    time differs from the recorded one (or was recorded as unknown).
    """
    entries = root_entries(root)
    top_changed = entries != cached.root_entries or os.stat(root).st_mtime_ns > cache_mtime_ns
    names = identity_folders(root) if top_changed else cached.identities
    now = folder_mtimes(root, names)
    old = {name: (mtime, files) for name, mtime, files in zip(cached.identities, cached.folder_mtimes, cached.files)}
    if not top_changed and all(_unchanged(old[name], mtime) for name, mtime in zip(names, now)):
        return cached, None
    index, listed = _walk(root, extensions, names, entries, old, now)
    added = sorted(set(names) - set(old))
    removed = sorted(set(old) - set(names))
    changed = [name for name, files in listed.items() if name in old and old[name][1] != files]
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
    return [root / INDEX_CACHE_NAME, default_cache_dir() / f"index-{digest}.json"]


def _read_cache(path: Path, root: Path, extensions: Sequence[str]) -> Optional[tuple[FolderIndex, int]]:
    """The index cached at ``path`` for this folder and extensions, with the cache's time (None if unusable)."""
    try:
        cache_mtime = path.stat().st_mtime_ns
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict) or data.get("format") != INDEX_FORMAT
        or (data.get("root") != str(root.resolve()) and path.parent.resolve() != root.resolve())
        or data.get("extensions") != list(extensions)
    ):
        return None
    if data.get("version") != INDEX_VERSION:
        log.info("image-folder index %s has an older format: indexing %s again", path, root)
        return None
    index = FolderIndex(data["identities"], data["files"], data["folder_mtimes"], data["root_entries"])
    if not len(index.identities) == len(index.files) == len(index.folder_mtimes):
        return None
    return index, cache_mtime


def _write_cache(index: FolderIndex, root: Path, extensions: Sequence[str], places: list[Path]) -> Optional[Path]:
    data = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "root": str(root.resolve()), "extensions": list(extensions),
        "root_entries": index.root_entries, "identities": index.identities, "folder_mtimes": index.folder_mtimes,
        "files": index.files,
    }
    for target in places:
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(data, handle, separators=(",", ":"))
            os.replace(tmp, target)
            os.utime(target)  # newer than the rename's change to the folder's mtime
            return target
        except OSError as error:
            log.info("cannot write the image-folder index to %s (%s)", target, error)
            try:
                tmp.unlink()
            except OSError:
                pass
    return None


def load_index(
    root: Path, extensions: Sequence[str], index_cache: Optional[Path] = None, rebuild: bool = False
) -> tuple[FolderIndex, Optional[Path]]:
    """The folder's index, from the cache brought up to date or from a walk, and where it is cached now.

    Args:
        root: The image folder.
        extensions: Image suffixes (lower case, sorted: part of the cache's identity).
        index_cache: The cache file; None for ``<root>/.fastface_index.json``, else the user cache.
        rebuild: Ignore any cache and walk the whole folder.

    Raises:
        DatasetError: If ``root`` or an identity folder cannot be read.
    """
    places = _cache_places(root, index_cache)
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
        "indexed %s: %d identities, %d images in %.1f s; index cached at %s", root, len(index.identities),
        sum(len(f) for f in index.files), time.perf_counter() - started, written or "nowhere (no writable place)",
    )
    return index, written
