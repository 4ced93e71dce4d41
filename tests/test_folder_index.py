"""The cached index of an image folder follows the folder: images or identities added, removed or renamed
after it was built are found at the next start (one ``stat`` per identity folder), only those folders are
listed again, and a warning names them, instead of training failing later on a file that is gone."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from fastface_pl.data import CorruptImageError, ImageFolderDataset
from fastface_pl.data.folder_index import (
    IMAGE_EXTENSIONS, INDEX_CACHE_NAME, UNKNOWN_MTIME, FolderIndex, _read_cache, load_index, scan_image_folder,
)
from conftest import write_image_folder

LOGGER = "fastface_pl.data.folder_index"
EXTENSIONS = tuple(sorted(IMAGE_EXTENSIONS))  # as ImageFolderDataset passes them
HOUR_NS = 3600 * 10**9


def age(root: Path) -> None:
    """Date the folder and its identity folders an hour back: a dataset prepared a while ago."""
    for path in [*sorted(p for p in root.iterdir() if p.is_dir()), root]:
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - HOUR_NS))


def settle(cache: Path) -> None:
    """Date the cache an hour ahead: written long after the folder's last change (``age`` moves the folders'
    modification times only; their status-change times, which the check also reads, stay now)."""
    stat = cache.stat()
    os.utime(cache, ns=(stat.st_atime_ns, stat.st_mtime_ns + HOUR_NS))


def identity_folders_listed(calls: list[str], root: Path) -> list[str]:
    """The identity folders listed (the cache's own folder, listed for stale temporaries, is none)."""
    return sorted(Path(c).name for c in calls if Path(c).parent == root and not Path(c).name.startswith("."))


def test_an_unchanged_folder_is_read_from_the_cache_without_listing(tmp_path, listed, caplog):
    folder = write_image_folder(tmp_path / "faces", {"a": 2, "b": 3, "c": 1}, size=8)
    age(folder)
    first = ImageFolderDataset(folder)
    listed.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again = ImageFolderDataset(folder)
    assert identity_folders_listed(listed, folder) == [] and "read from" in caplog.text
    assert [again.path(i) for i in range(len(again))] == [first.path(i) for i in range(len(first))]


@pytest.mark.parametrize("edit", ["remove", "add", "rename"])
def test_images_changed_in_an_identity_folder_are_found(tmp_path, listed, caplog, edit):
    """The common case: an error names a broken image, the user deletes it, the next start must not fail."""
    folder = write_image_folder(tmp_path / "faces", {"a": 2, "b": 3, "c": 2}, size=8)
    age(folder)
    ImageFolderDataset(folder)
    if edit == "remove":
        (folder / "b" / "001.jpg").unlink()
    elif edit == "add":
        write_image_folder(folder, {"b": 4}, seed=1, size=8)  # writes 000..003.jpg: one new file, three replaced in place
    else:
        (folder / "b" / "001.jpg").rename(folder / "b" / "001_renamed.jpg")
    listed.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = ImageFolderDataset(folder)
    assert identity_folders_listed(listed, folder) == ["b"]  # the others are trusted from their stat
    assert "out of date" in caplog.text and "1 identity folder(s) with images added, removed or renamed (b)" in \
        caplog.text
    identities, files = scan_image_folder(folder)
    assert [dataset.path(i).relative_to(folder).as_posix() for i in range(len(dataset))] == [
        f"{name}/{f}" for name, names in zip(identities, files) for f in names]
    for i in range(len(dataset)):
        dataset[i]  # every listed file exists: no "No such file" later
    listed.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ImageFolderDataset(folder)  # the cache was rewritten: the next start is quiet (b's change is recent,
    assert "out of date" not in caplog.text  # so b alone is listed once more, to be sure of it)
    assert identity_folders_listed(listed, folder) in ([], ["b"])


def test_identity_folders_added_and_removed_are_found(tmp_path, listed, caplog):
    folder = write_image_folder(tmp_path / "faces", {"a": 1, "b": 1, "c": 1}, size=8)
    age(folder)
    ImageFolderDataset(folder)
    for image in (folder / "b").iterdir():
        image.unlink()
    (folder / "b").rmdir()
    write_image_folder(folder, {"d": 2, "aa": 1}, size=8)
    listed.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = ImageFolderDataset(folder)
    assert identity_folders_listed(listed, folder) == ["aa", "d"]
    assert "2 identity folder(s) added (aa, d)" in caplog.text and "1 identity folder(s) removed (b)" in caplog.text
    assert dataset.identities == ["a", "aa", "c", "d"] and [dataset.label(i) for i in range(len(dataset))] == [
        0, 1, 2, 3, 3]  # labels are the positions in sorted order, as after a fresh walk
    fresh = ImageFolderDataset(folder, rebuild_index=True)
    assert [fresh.path(i) for i in range(len(fresh))] == [dataset.path(i) for i in range(len(dataset))]


def test_a_folder_modified_just_before_the_walk_is_listed_again_once(tmp_path, listed, caplog):
    """A change in the same clock tick as the recorded time would keep that time: such a folder is not trusted."""
    folder = write_image_folder(tmp_path / "faces", {"a": 1, "b": 1}, size=8)
    age(folder)
    (folder / "b" / "new.jpg").write_bytes((folder / "b" / "000.jpg").read_bytes())  # b: modified just now
    ImageFolderDataset(folder)
    cached, _ = _read_cache(folder / INDEX_CACHE_NAME, folder, EXTENSIONS)
    recorded = dict(zip(cached.identities, cached.folder_mtimes.tolist()))
    assert recorded["b"] == UNKNOWN_MTIME and recorded["a"] == (folder / "a").stat().st_mtime_ns
    stat = (folder / "b").stat()
    os.utime(folder / "b", ns=(stat.st_atime_ns, stat.st_mtime_ns - HOUR_NS))  # time passes
    listed.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ImageFolderDataset(folder)
    assert identity_folders_listed(listed, folder) == ["b"] and "out of date" not in caplog.text  # same files
    listed.clear()
    ImageFolderDataset(folder)
    assert identity_folders_listed(listed, folder) == []  # now known


def test_a_cache_this_version_cannot_read_is_replaced(tmp_path):
    folder = write_image_folder(tmp_path / "faces", {"a": 2}, size=8)
    age(folder)
    (folder / "a" / "001.jpg").unlink()  # the cache below still lists it, and cannot tell
    (folder / INDEX_CACHE_NAME).parent.mkdir(exist_ok=True)
    (folder / INDEX_CACHE_NAME).write_text(json.dumps({
        "format": "fastface_pl.image_folder_index", "version": 2, "root": str(folder.resolve()),
        "extensions": [".jpeg", ".jpg", ".png"], "root_entries": 1, "identities": ["a"], "folder_mtimes": [0],
        "files": [["000.jpg", "001.jpg"]],
    }))
    assert len(ImageFolderDataset(folder)) == 1
    assert (folder / INDEX_CACHE_NAME).read_bytes().startswith(b"FFINDEX")


def test_a_file_gone_during_training_names_the_index(tmp_path):
    folder = write_image_folder(tmp_path / "faces", {"a": 2}, size=8)
    dataset = ImageFolderDataset(folder)
    (folder / "a" / "001.jpg").unlink()
    with pytest.raises(CorruptImageError, match=r"001\.jpg: no such file, yet the folder's index .* lists it"):
        dataset[1]


# ------------------------------------------------------------------ the binary cache
def test_the_cache_is_memory_mapped_and_round_trips_names_paths_and_labels(tmp_path):
    folder = write_image_folder(tmp_path / "faces", {"b": 2, "é-ü": 1, "a": 3, "empty": 0}, size=8)
    age(folder)
    built, path = load_index(folder, IMAGE_EXTENSIONS)
    cached, _ = _read_cache(path, folder, IMAGE_EXTENSIONS)
    assert isinstance(cached.paths, np.memmap) and isinstance(cached.labels, np.memmap)
    identities, files = scan_image_folder(folder)
    expected = FolderIndex.from_listing(identities, files, [0] * len(identities), 0)
    assert cached.identities == identities == ["a", "b", "empty", "é-ü"]
    assert cached.paths.tolist() == expected.paths.tolist()
    assert cached.labels.tolist() == [0, 0, 0, 1, 1, 3] and cached.counts.tolist() == [3, 2, 0, 1]
    assert [cached.files(i) for i in range(4)] == files
    dataset = ImageFolderDataset(folder)
    assert [dataset.path(i).relative_to(folder).as_posix() for i in range(len(dataset))] == [
        f"{n}/{f}" for n, names in zip(identities, files) for f in names]
    assert dataset.num_classes == 4 and dataset.identities == identities


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_cache_is_rebuilt(tmp_path, damage):
    folder = write_image_folder(tmp_path / "faces", {"a": 2, "b": 1}, size=8)
    age(folder)
    first = ImageFolderDataset(folder)
    cache = folder / INDEX_CACHE_NAME
    data = cache.read_bytes()
    cache.write_bytes({"truncated": data[: len(data) - 10], "garbage": b"\x00" * 50, "empty": b""}[damage])
    again = ImageFolderDataset(folder)
    assert [again.path(i) for i in range(len(again))] == [first.path(i) for i in range(len(first))]
    assert cache.read_bytes() == data or _read_cache(cache, folder, EXTENSIONS) is not None


def test_a_settled_top_level_is_not_listed_again(tmp_path, listed):
    """With the cache outside the folder (a read-only dataset), a root last changed well before the cache was
    written cannot have changed since unnoticed: its time would have moved. Its 2M entries are not listed."""
    folder = write_image_folder(tmp_path / "faces", {"a": 1, "b": 2}, size=8)
    age(folder)
    ImageFolderDataset(folder, index_cache=tmp_path / "cache" / "index.bin")
    settle(tmp_path / "cache" / "index.bin")
    listed.clear()
    ImageFolderDataset(folder, index_cache=tmp_path / "cache" / "index.bin")
    assert os.fspath(folder) not in listed
    ImageFolderDataset(folder)  # the cache in <root>: its folder was made just now, so the top level is counted
    listed.clear()
    again = ImageFolderDataset(folder)
    assert os.fspath(folder) in listed and len(again) == 3  # counted: a change in the same tick would hide


def test_writing_the_cache_in_the_folder_leaves_the_top_levels_time_alone(tmp_path, listed):
    """The cache lives in <root>/.fastface_cache/, made before the walk: rewriting it later does not move the
    top level's time, so the next start trusts that time and does not list the top level (2M entries at
    WebFace42M)."""
    folder = write_image_folder(tmp_path / "faces", {"a": 2, "b": 1}, size=8)
    ImageFolderDataset(folder)
    assert (folder / INDEX_CACHE_NAME).is_file()
    age(folder)  # the first walk took an hour, say; the cache folder was made before it
    (folder / "b" / "000.jpg").unlink()  # a change inside an identity folder: the cache is rewritten
    stat = (folder / "b").stat()
    os.utime(folder / "b", ns=(stat.st_atime_ns, stat.st_mtime_ns - HOUR_NS))
    root_time = folder.stat().st_mtime_ns
    assert len(ImageFolderDataset(folder)) == 2
    assert folder.stat().st_mtime_ns == root_time  # the rewrite went into the cache's own folder
    settle(folder / INDEX_CACHE_NAME)
    listed.clear()
    again = ImageFolderDataset(folder)
    assert os.fspath(folder) not in listed and identity_folders_listed(listed, folder) == [] and len(again) == 2


def test_a_link_that_cannot_be_followed_is_named_and_left_out(tmp_path, caplog):
    """A self-symlink (ELOOP) or a dangling link is named in a warning, not taken for an empty identity."""
    folder = write_image_folder(tmp_path / "faces", {"a": 2, "b": 1}, size=8)
    os.symlink("loop", folder / "loop")  # points to itself
    os.symlink(tmp_path / "gone", folder / "dangling")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = ImageFolderDataset(folder)
    assert len(dataset) == 3 and dataset.num_classes == 2
    assert "2 symbolic link(s) cannot be followed" in caplog.text and "dangling, loop" in caplog.text
