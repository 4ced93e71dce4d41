"""Pack an image folder (``<src>/<identity>/<image>.jpg``) into an InsightFace ``train.rec`` + ``train.idx``.

Usage::

    python -m fastface_pl.data.pack SRC_FOLDER DST_DIR [--quality 95] [--workers 4] [--reencode] [--skip-corrupt]
                                    [--overwrite]
    fastface-pack SRC_FOLDER DST_DIR            # the same, as an installed command

The result has the InsightFace layout: key 0 a header record with labels ``(N + 1, N + 1 + C)``, keys ``1..N``
the images sorted by identity (label = position of the identity folder in sorted order, as in
:class:`~fastface_pl.data.datasets.ImageFolderDataset`), keys ``N + 1 .. N + C`` one record per identity with
labels ``(first image key, last + 1)``, plus a ``property`` file ``C,H,W``. JPEG files are stored byte for byte
(no generation loss) after a decode check; other formats, or all images with ``--reencode``, are encoded as JPEG
at ``--quality``. Every image is decoded once: a broken one stops the packing with its path, or is skipped and
counted with ``--skip-corrupt``. An existing pack in ``DST_DIR`` is never replaced unless ``--overwrite`` is given,
and then as a whole: the new files are written under ``.partial`` names, a marker (:data:`REPLACE_MARKER`) written
last says they are complete, then they are renamed. A kill between the renames leaves the marker, and the next
``pack`` or the next reader of the folder (:func:`finish_interrupted_replace`) completes the renames, so the folder
never holds a mix of the old and the new pack. One ``pack`` at a time writes into a folder: a second one is
refused at once, naming the process that holds the folder (a lock the kernel releases when that process ends).
"""

from __future__ import annotations

import argparse
import io
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

from fastface_pl.atomic import NO_SPACE, DiskFullError, disk_full_error, fsync_folder, write_text_atomic
from fastface_pl.data.datasets import (
    DEFAULT_MAX_IMAGE_SIDE, IMAGE_EXTENSIONS, decode_image, read_image_file, scan_image_folder,
)
from fastface_pl.data.errors import CorruptImageError, DatasetError, reading, unreadable, writing
from fastface_pl.data.recordio import RecordWriter, pack_header
from fastface_pl.locks import folder_lock, remove_stale_temporaries
from fastface_pl.argument_checks import bound_workers, check_int

log = logging.getLogger(__name__)

PACK_FILES = ("train.rec", "train.idx", "property")
"""The files of a pack, replaced together."""
REPLACE_MARKER = ".fastface_pack_replace"
"""Written once every ``<name>.partial`` of a new pack is complete; removed once all are renamed."""
LOCK_NAME = ".fastface_pack.lock"


@dataclass(frozen=True)
class PackSummary:
    """What :func:`pack_folder` wrote."""

    rec_path: Path
    idx_path: Path
    num_images: int
    num_identities: int
    num_skipped: int
    image_size: Optional[tuple[int, int]]


def _prepare(job: tuple[str, int, bool, int]
             ) -> tuple[Optional[bytes], Optional[tuple[int, int]], Optional[str]]:
    """Read one file, check that it decodes, re-encode when needed: (jpeg bytes, (H, W), what went wrong)."""
    path, quality, reencode, max_side = job
    try:
        data = read_image_file(path, max_side)
        image = decode_image(data, path, max_side)
    except PermissionError as error:
        return None, None, str(unreadable("image", path, error))
    except (OSError, CorruptImageError) as error:
        return None, None, f"corrupt image {path}: {error}"
    size = (int(image.shape[1]), int(image.shape[2]))
    if reencode or not path.lower().endswith((".jpg", ".jpeg")):
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").save(buffer, format="JPEG", quality=quality)
        data = buffer.getvalue()
    return data, size, None


def _mapped(jobs: Sequence[tuple[str, int, bool, int]], workers: int) -> Iterator:
    if workers <= 0:
        yield from map(_prepare, jobs)
        return
    context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else None)
    with context.Pool(workers) as pool:
        yield from pool.imap(_prepare, jobs, chunksize=32)


def pack_folder(
    src: Union[str, os.PathLike], dst: Union[str, os.PathLike], quality: int = 95, workers: int = 0,
    reencode: bool = False, skip_corrupt: bool = False, progress: bool = True,
    extensions: Iterable[str] = IMAGE_EXTENSIONS, overwrite: bool = False,
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
) -> PackSummary:
    """Pack ``src`` into ``dst/train.rec`` + ``dst/train.idx`` (InsightFace layout; see the module docstring).

    Args:
        src: Image folder ``<src>/<identity>/<image>``.
        dst: Output folder (created).
        quality: JPEG quality (1..100) for images that are (re-)encoded.
        workers: Processes reading and checking images (0: in this process).
        reencode: Re-encode JPEGs too (default: store them unchanged).
        skip_corrupt: Skip unreadable images (and count them) instead of stopping.
        progress: Show a progress bar.
        extensions: Image suffixes to pack.
        overwrite: Replace a pack already in ``dst`` (once the new one is complete); without it an existing
            ``train.rec`` or ``train.idx`` stops the packing before anything is read.
        max_image_side: An image whose header declares a larger side is refused before it is decoded (a
            decompression bomb): it stops the packing, or is skipped with ``skip_corrupt``.

    Raises:
        DatasetError: If ``dst`` already holds a pack and ``overwrite`` is False, ``src`` holds no images, a
            folder cannot be read or ``dst`` written, or an image is corrupt and ``skip_corrupt`` is False.
        FolderInUseError: If another process is packing into ``dst`` (the message names it).
    """
    check_int("quality", quality, 1, 100)
    workers = bound_workers("--workers", workers)
    check_int("max_image_side", max_image_side, 1)
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise DatasetError(
            f"the pack folder {dst} lies inside the source folder {src}: it would become an identity of the next "
            "pack of that folder; choose a destination outside it"
        )
    with writing("pack folder", dst):
        if dst.exists() and not dst.is_dir():
            raise DatasetError(f"the pack destination {dst} is a file, not a folder: choose a folder (it is created)")
        dst.mkdir(parents=True, exist_ok=True)
        with folder_lock(dst / LOCK_NAME, dst, "pack folder", "choose another destination"):
            return _pack_locked(src, dst, quality, workers, reencode, skip_corrupt, progress, extensions, overwrite,
                                max_image_side)


def _partial(name: str) -> str:
    return f"{name}.partial"


def finish_interrupted_replace(folder: Union[str, os.PathLike]) -> bool:
    """Complete a pack replacement that a kill interrupted between its renames; True when there was one.

    The marker is written only once every new file is complete, so renaming the ``.partial`` files still there
    gives the whole new pack. The renames are idempotent: two processes may do them at once.

    Raises:
        DatasetError: If the folder cannot be written to complete them.
    """
    folder = Path(folder)
    marker = folder / REPLACE_MARKER
    try:
        if not marker.is_file():
            return False
    except OSError:  # an unreadable folder: its readers say so, naming it
        return False
    try:
        for name in PACK_FILES:
            partial = folder / _partial(name)
            try:
                os.replace(partial, folder / name)
            except FileNotFoundError:
                pass  # renamed already (here, or by a process doing the same)
        fsync_folder(folder)
        marker.unlink(missing_ok=True)
        fsync_folder(folder)
    except OSError as error:
        raise DatasetError(
            f"{folder}: a pack replacement was interrupted (a new, complete pack waits under .partial names) and "
            f"cannot be completed here ({error}): make the folder writable and start again, or run the pack "
            "command with --overwrite once more"
        ) from None
    log.warning("%s: completed the replacement of the pack that an interrupted `pack --overwrite` had begun", folder)
    return True


def _pack_locked(
    src: Path, dst: Path, quality: int, workers: int, reencode: bool, skip_corrupt: bool, progress: bool,
    extensions: Iterable[str], overwrite: bool, max_image_side: int,
) -> PackSummary:
    finish_interrupted_replace(dst)
    for stale in remove_stale_temporaries(dst, tuple(_partial(name) for name in PACK_FILES)):
        log.info("removed %s, left by an interrupted pack", stale)
    rec_path, idx_path = dst / "train.rec", dst / "train.idx"
    existing = [p.name for p in (rec_path, idx_path) if p.exists()]
    if existing and not overwrite:
        raise DatasetError(
            f"{dst} already holds a pack ({', '.join(existing)}); pass --overwrite (overwrite=True) to replace it "
            "once the new pack is complete, or choose another destination"
        )
    with reading("source folder", src):
        if not src.is_dir():
            raise DatasetError(f"source folder {src} does not exist or is not a directory")
    identities, files = scan_image_folder(src, tuple(extensions))
    total = sum(len(f) for f in files)
    if total == 0:
        raise DatasetError(f"{src} holds no images in <identity>/<image> folders ({', '.join(extensions)})")
    return _write_pack(src, dst, identities, files, total, quality, workers, reencode, skip_corrupt, progress,
                       max_image_side)


def _write_pack(
    src: Path, dst: Path, identities: list[str], files: list[list[str]], total: int, quality: int, workers: int,
    reencode: bool, skip_corrupt: bool, progress: bool, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
) -> PackSummary:
    rec_path, idx_path = dst / "train.rec", dst / "train.idx"
    partials = [dst / _partial(name) for name in PACK_FILES]
    tmp_rec, tmp_idx, tmp_property = partials
    jobs = [
        (str(src / name / f), quality, reencode, max_image_side)
        for name, names in zip(identities, files, strict=True) for f in names
    ]
    labels = [label for label, names in enumerate(files) for _ in names]

    from tqdm.auto import tqdm

    skipped = 0
    image_size: Optional[tuple[int, int]] = None
    ranges: list[list[int]] = [[0, 0] for _ in identities]
    key = 1
    try:
        with RecordWriter(tmp_rec, tmp_idx) as writer:
            writer.write(0, pack_header((0.0, 0.0)))  # placeholder: the counts are known at the end
            bar = tqdm(total=total, unit="img", desc=f"packing {src.name}", disable=not progress)
            for (path, *_), label, (data, size, error) in zip(jobs, labels, _mapped(jobs, workers), strict=True):
                bar.update(1)
                if data is None:
                    if not skip_corrupt:
                        bar.close()
                        raise DatasetError(f"{error} (use --skip-corrupt to skip and count such images)")
                    skipped += 1
                    log.warning("skipping %s", error)
                    continue
                image_size = image_size or size
                if ranges[label][1] == 0:
                    ranges[label][0] = key
                ranges[label][1] = key + 1
                writer.write(key, pack_header(float(label), id=key) + data)
                key += 1
            bar.close()
            num_images = key - 1
            first_identity_key = key
            for label, (start, stop) in enumerate(ranges):
                if stop == 0:  # identity with no (good) image: an empty range at the current position
                    start = stop = ranges[label - 1][1] if label else 1
                    ranges[label] = [start, stop]
                writer.write(key, pack_header((float(start), float(stop)), id=key))
                key += 1
            writer.overwrite(0, pack_header((float(first_identity_key), float(key))))
        if num_images == 0:
            raise DatasetError(f"every image in {src} was corrupt; nothing packed")
        tmp_property.write_text(f"{len(identities)},{image_size[0]},{image_size[1]}\n")
        for partial in partials:
            with open(partial, "rb+") as handle:
                os.fsync(handle.fileno())
        # the commit point: from here on the new pack is whole, and a kill is completed by the next start
        write_text_atomic(dst / REPLACE_MARKER, "the .partial files are a complete pack: rename them\n",
                          "pack replacement marker")
    except BaseException as error:
        for partial in partials:  # no half-written pack left behind
            partial.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in NO_SPACE and not isinstance(error, DiskFullError):
            raise disk_full_error(rec_path, error, "pack") from None
        raise
    finish_interrupted_replace(dst)
    return PackSummary(rec_path, idx_path, num_images, len(identities), skipped, image_size)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m fastface_pl.data.pack``)."""
    parser = argparse.ArgumentParser(
        prog="python -m fastface_pl.data.pack",
        description="Pack an image folder <src>/<identity>/<image>.jpg into an InsightFace train.rec + train.idx.",
    )
    parser.add_argument("src", help="image folder: one sub-folder per identity")
    parser.add_argument("dst", help="output folder for train.rec, train.idx and property")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images (default 95)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that read and check images (default: min(8, CPUs); 0: none)")
    parser.add_argument("--reencode", action="store_true", help="re-encode JPEGs too (default: copy them as-is)")
    parser.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-image-side", type=int, default=DEFAULT_MAX_IMAGE_SIDE,
                        help="refuse images whose header declares a larger side, before decoding them (default "
                             f"{DEFAULT_MAX_IMAGE_SIDE}; face crops are about 112)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a pack already in DST (once the new one is complete); default: refuse")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = pack_folder(args.src, args.dst, quality=args.quality, workers=args.workers, reencode=args.reencode,
                              skip_corrupt=args.skip_corrupt, progress=not args.no_progress,
                              overwrite=args.overwrite, max_image_side=args.max_image_side)
    except (DatasetError, ValueError) as error:  # FolderInUseError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"packed {summary.num_images} images of {summary.num_identities} identities into {summary.rec_path} "
        f"(+ {summary.idx_path.name}); skipped {summary.num_skipped} corrupt images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
