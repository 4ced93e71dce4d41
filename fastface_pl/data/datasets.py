"""Training datasets: InsightFace record files, image folders and synthetic identities.

Every dataset yields ``(image, label)`` with ``image`` the output of its ``transform`` applied to a
``uint8`` RGB tensor ``[3, H, W]`` (default: :class:`FaceTransform`, i.e. ``(x / 255 - 0.5) / 0.5`` as float32)
and ``label`` an ``int`` in ``[0, num_classes)``.

.. note:: Colour order. InsightFace packed its ``.rec`` files with OpenCV: ``cv2.imread`` gives BGR arrays and
   ``cv2.imencode`` expects BGR, so the JPEGs it wrote are ordinary JPEGs (YCbCr inside) whose colours are
   right. Any standard decoder, PIL or ``torchvision.io``, therefore returns true RGB, and arcface_torch
   (``mx.image.imdecode``, RGB by default) trains on RGB too. No channel swap is needed or done here. Checked
   with OpenCV 4.14: ``cv2.imencode`` of a BGR array holding pure red decodes here to (R, G, B) = (254, 0, 0),
   while ``cv2.imdecode`` gives it back as BGR; ``tests/test_datasets.py`` repeats the check where OpenCV is
   installed. The one exception is a pack written by a script that handed an RGB array to ``cv2.imencode``:
   its faces look blue-tinted in any image viewer, and decoding gives BGR.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from fastface_pl.data.errors import (
    CorruptImageError, CorruptRecordError, DatasetError, ImageTooLargeError, reading, unreadable,
)
# IMAGE_EXTENSIONS, INDEX_CACHE_NAME and scan_image_folder lived here: still importable from this module
from fastface_pl.data.folder_index import (  # noqa: F401
    IMAGE_EXTENSIONS, INDEX_CACHE_NAME, load_index, scan_image_folder,
)
from fastface_pl.data.recordio import (
    RecordFile,
    RecordLayout,
    label_to_int,
    parse_layout,
    read_identity_range,
    unpack_header,
)
from fastface_pl.errors import ConfigurationError
from fastface_pl.argument_checks import check_int

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------------------------
# Decoding and transforms
# --------------------------------------------------------------------------------------------------------------
#: Largest side, in pixels, an image header may declare before decoding is refused (a decompression bomb: a few
#: hundred bytes can declare 20000 x 20000 pixels). Face crops are 112 px; :func:`max_image_side_for` widens it for
#: a larger configured size. Raise it with ``data.max_image_side`` (training), ``--max-image-side`` (packing) or
#: the ``max_image_side`` argument of the readers. See docs/fault_tolerance.md ("Size limits").
DEFAULT_MAX_IMAGE_SIDE = 1024


def max_image_side_for(image_size: Optional[int]) -> int:
    """The default limit for images resized to ``image_size``: 1024, or 8 x ``image_size`` when that is larger."""
    return max(DEFAULT_MAX_IMAGE_SIDE, 8 * int(image_size or 0))


def max_file_bytes(max_side: int) -> int:
    """The largest image file read for images of at most ``max_side`` pixels per side: 8 bytes a pixel (16-bit
    RGBA, uncompressed) and 1 MiB for metadata. A file above it is refused before it is read."""
    return 8 * int(max_side) ** 2 + (1 << 20)


def read_image_file(path: PathLike, max_side: int = DEFAULT_MAX_IMAGE_SIDE) -> bytes:
    """The bytes of an image file, refused before they are read when the file is larger than an image of at most
    ``max_side`` pixels per side can be (:func:`max_file_bytes`), or is not a regular file (a device, a FIFO).

    Raises:
        ImageTooLargeError: If the file is too large.
        CorruptImageError: If it is not a regular file.
        OSError: If it cannot be opened (missing, permission denied).
    """
    limit = max_file_bytes(max_side)
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CorruptImageError(f"{path}: not a regular file (a device, a pipe or a socket), not an image; "
                                    "remove it from the data", source=str(path))
        data = handle.read(limit + 1) if info.st_size <= limit else b""
    if info.st_size > limit or len(data) > limit:
        size = max(info.st_size, len(data))
        raise ImageTooLargeError(
            f"{path}: refused before reading: the file has {size} bytes, more than an image of at most {max_side} "
            f"pixels per side can hold ({limit} bytes). Remove or shrink it; if it is a real image, raise the limit "
            "(data.max_image_side, data.pack --max-image-side)", source=str(path),
        )
    return data


_PIL_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def pil_to_rgb(image: Any, source: str) -> np.ndarray:
    """A PIL image of any mode as ``uint8`` RGB ``[H, W, 3]``: 16-bit and 32-bit integer grey (``I;16``, ``I``:
    the range of a 16-bit PNG, 0..65535) scaled to 0..255, every 8-bit mode converted by PIL.

    Raises:
        CorruptImageError: For floating-point pixels (mode ``F``), which have no agreed 8-bit range, or integer
            pixels outside 0..65535.
    """
    if image.mode in _PIL_SIXTEEN_BIT:
        grey = np.asarray(image).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise CorruptImageError(f"{source}: integer pixels ({image.mode}) outside 0..65535; convert the image "
                                    "to 8-bit RGB", source=source)
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise CorruptImageError(f"{source}: floating-point pixels (mode F) have no agreed 8-bit range; convert the "
                                "image to 8-bit RGB (e.g. PNG or JPEG) first", source=source)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A decoded ``uint16`` image (a 16-bit PNG) scaled to ``uint8`` (0..65535 to 0..255, rounded)."""
    if image.dtype == torch.uint8:
        return image
    return ((image.to(torch.int64) * 255 + 32767) // 65535).to(torch.uint8)


def _short(error: BaseException) -> str:
    """An image library's error without its source path or a ``BytesIO`` repr: what the user can act on."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text)
    return re.sub(r"(\w+, )?/\S+:\d+,?\s*", "", text).strip()


def declared_size(raw: bytes, source: str, max_side: int) -> tuple[int, int]:
    """``(width, height)`` from the image's header alone (PIL reads no pixels), refused above ``max_side``.

    Raises:
        ImageTooLargeError: If a side exceeds ``max_side``.
        CorruptImageError: If no image format is recognised in the header.
    """
    import warnings

    from PIL import Image

    fast = _jpeg_or_png_size(raw)
    if fast is not None:
        width, height = fast
        if max(width, height) > max_side:
            raise _too_large(source, f"its header declares {width} x {height} pixels", max_side)
        return width, height
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:  # parses the header only
                width, height = image.size
    except Image.DecompressionBombError:  # PIL's own limit (179 Mpixels), far above ours, refused it first
        width, height = _size_past_pil_limit(raw)
        raise _too_large(source, f"its header declares {width} x {height} pixels", max_side) from None
    except Exception as error:  # PIL raises UnidentifiedImageError, SyntaxError, ... depending on the damage
        raise CorruptImageError(f"{source}: cannot decode image ({len(raw)} bytes): {_short(error)}",
                                source=source) from None
    if max(width, height) > max_side:
        raise _too_large(source, f"its header declares {width} x {height} pixels", max_side)
    return width, height


_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0..SOF15 (not DHT, JPG, DAC)


def _jpeg_or_png_size(raw: bytes) -> Optional[tuple[int, int]]:
    """``(width, height)`` from a JPEG's frame header or a PNG's IHDR in a few microseconds (the formats of
    every face dataset); None for anything else or anything unusual, which PIL then reads."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR" and len(raw) >= 24:
        return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    if raw[:2] != b"\xff\xd8":
        return None
    position, end = 2, len(raw)
    while position + 4 <= end:
        if raw[position] != 0xFF:
            return None
        marker = raw[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_FRAMES:
            if position + 9 > end:
                return None
            height = int.from_bytes(raw[position + 5:position + 7], "big")
            return int.from_bytes(raw[position + 7:position + 9], "big"), height
        if marker == 0xDA or 0xD0 <= marker <= 0xD9 or marker == 0x01:  # scan data before a frame: unusual
            return None
        position += 2 + int.from_bytes(raw[position + 2:position + 4], "big")
    return None


def _size_past_pil_limit(raw: bytes) -> tuple[int, int]:
    """The declared size of an image PIL's ``Image.open`` refused as too large: its format plugin reads the header
    without that check (as ``Image.open`` does before it)."""
    from PIL import Image

    Image.init()
    for format_id in Image.ID:
        factory, accept = Image.OPEN[format_id]
        if accept is not None and not accept(raw[:16]):
            continue
        try:
            return factory(io.BytesIO(raw), None).size
        except Exception:  # noqa: BLE001 - another plugin may accept it
            continue
    return 0, 0  # pragma: no cover - Image.open recognised it a moment ago


def _too_large(source: str, what: str, max_side: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{source}: refused before decoding: {what}, above the limit of {max_side} pixels per side (a "
        "decompression bomb, or not a face crop). If it is a real image, raise the limit (data.max_image_side, "
        "data.pack --max-image-side)", source=source,
    )


def decode_image(data: Union[bytes, bytearray, memoryview, np.ndarray], source: str = "<bytes>",
                 max_side: int = DEFAULT_MAX_IMAGE_SIDE) -> torch.Tensor:
    """Decode a JPEG/PNG (or any format PIL reads) to a ``uint8`` RGB tensor ``[3, H, W]``.

    Every bit depth comes out in the same 0..255 range: a 16-bit PNG is scaled, not clipped (:func:`pil_to_rgb`).
    The EXIF orientation is not applied: the pixels are used as stored, as aligned face crops are.

    The size declared in the header is checked first (:func:`declared_size`), so a decompression bomb is refused
    before any pixel memory is allocated. Uses ``torchvision.io.decode_image`` (libjpeg-turbo), falling back to
    PIL for formats it does not read. Truncated or broken images raise instead of coming back grey.

    Args:
        data: The encoded image.
        source: Where the bytes came from, for the error message (a path, or ``file.rec key K (offset O)``).
        max_side: Largest width or height accepted (:data:`DEFAULT_MAX_IMAGE_SIDE`).

    Raises:
        ImageTooLargeError: If the header declares a side above ``max_side``.
        CorruptImageError: If the bytes are not a decodable image.
    """
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    raw = bytes(data) if not isinstance(data, (bytes, bytearray)) else data
    if len(raw) == 0:
        raise CorruptImageError(f"{source}: empty image data", source=source)
    declared = declared_size(raw, source, max_side)
    try:
        image = tv_decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as tv_error:
        first_error = _short(tv_error)
    else:
        if (image.shape[2], image.shape[1]) == declared:
            return _to_uint8(image)
        first_error = f"decoded {image.shape[2]} x {image.shape[1]}, the header declares {declared[0]} x {declared[1]}"
    try:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as pil_image:
            array = pil_to_rgb(pil_image, source)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    except CorruptImageError:
        raise
    except Exception as pil_error:  # PIL raises OSError, SyntaxError, ValueError ... depending on the damage
        raise CorruptImageError(
            f"{source}: cannot decode image ({len(raw)} bytes): {first_error}; PIL: {_short(pil_error)}",
            source=source,
        ) from None


def normalize(image: torch.Tensor) -> torch.Tensor:
    """``uint8`` image(s) to float32 ``(x / 255 - 0.5) / 0.5``, i.e. values in ``[-1, 1]``."""
    return image.to(torch.float32).div_(127.5).sub_(1.0)


class FaceTransform:
    """The paper's pipeline: optional random horizontal flip, optional extra steps, then normalisation.

    Args:
        flip: Flip horizontally with probability 0.5 (the FastFace paper's only augmentation).
        extra: Any callable (e.g. a ``torchvision.transforms.v2.Compose``) applied to the ``uint8 [3, H, W]``
            tensor after the flip and before normalisation, for more augmentation.
        image_size: Resize to ``image_size x image_size`` (bilinear, antialiased) when the input differs;
            None keeps the decoded size.

    The flip draws from torch's global RNG, which the DataLoader seeds per worker (deterministic when the
    loader has a seeded ``generator``).
    """

    def __init__(
        self, flip: bool = False, extra: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        image_size: Optional[int] = None,
    ) -> None:
        if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
            raise ConfigurationError(f"image_size must be a positive int or None, got {image_size!r}")
        if extra is not None and not callable(extra):
            raise ConfigurationError(f"extra must be callable (e.g. a torchvision transform) or None, got {extra!r}")
        self.flip = bool(flip)
        self.extra = extra
        self.image_size = int(image_size) if image_size is not None else None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.flip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        if self.extra is not None:
            image = self.extra(image)
        if self.image_size is not None and tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            resized = torch.nn.functional.interpolate(
                image.unsqueeze(0).to(torch.float32), size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False, antialias=True,
            )[0]
            return resized.div_(127.5).sub_(1.0) if image.dtype == torch.uint8 else resized
        return normalize(image) if image.dtype == torch.uint8 else image.to(torch.float32)

    def __repr__(self) -> str:
        return f"FaceTransform(flip={self.flip}, extra={self.extra!r}, image_size={self.image_size})"


# --------------------------------------------------------------------------------------------------------------
# Corrupt-sample handling shared by the file-backed datasets
# --------------------------------------------------------------------------------------------------------------
class _SkipCounter:
    """Counts skipped samples across DataLoader workers (one shared-memory slot per worker, no races)."""

    SLOTS = 257

    def __init__(self) -> None:
        self.counts = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()

    def add(self) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self.SLOTS - 1)
        self.counts[slot] += 1

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def reset(self) -> None:
        self.counts.zero_()


class _FileDataset(Dataset):
    """Base for datasets whose samples can be corrupt: ``skip_corrupt`` replaces them and counts."""

    max_consecutive_corrupt = 32

    def __init__(self, transform: Optional[Callable[[torch.Tensor], Any]], skip_corrupt: bool,
                 max_image_side: Optional[int] = None) -> None:
        self.transform = transform if transform is not None else FaceTransform()
        self.skip_corrupt = bool(skip_corrupt)
        self.max_image_side = (check_int("max_image_side", max_image_side, 1) if max_image_side is not None
                               else DEFAULT_MAX_IMAGE_SIDE)
        self._skipped = _SkipCounter()
        self._size: Optional[tuple[int, ...]] = None  # the stored size of the images seen (no resize configured)

    @property
    def num_skipped(self) -> int:
        """Corrupt samples skipped so far, over all DataLoader workers (``skip_corrupt=True`` only)."""
        return self._skipped.total

    def _load(self, index: int) -> tuple[torch.Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {n} images")
        index %= n
        for attempt in range(self.max_consecutive_corrupt):
            try:
                image, label = self._load((index + attempt) % n)
                break
            except (CorruptImageError, CorruptRecordError) as error:
                if not self.skip_corrupt:
                    error.args = (f"{error}; to skip and count such samples instead, set data.skip_corrupt=true",)
                    raise
                last_error = error
                self._skipped.add()
                log.warning("skipping corrupt sample (%d skipped so far in this process): %s",
                            self._skipped.total, error)
        else:
            raise DatasetError(
                f"{self.max_consecutive_corrupt} consecutive corrupt samples from index {index} on in "
                f"{self!r}: the data is badly damaged (or unreadable); the last one: {last_error}"
            )
        self._check_size(image, (index + attempt) % n)
        return self.transform(image), label

    def _source(self, index: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_size(self, image: torch.Tensor, index: int) -> None:
        """Images kept at their stored size (no ``image_size``) must all have one size, or a batch cannot be
        stacked: the first that differs is named, with the fix."""
        transform = self.transform
        if not isinstance(transform, FaceTransform) or transform.image_size is not None or transform.extra is not None:
            return
        size = tuple(image.shape[-2:])
        if self._size is None:
            self._size = size
        elif size != self._size:
            raise DatasetError(
                f"{self._source(index)}: the image is {size[1]} x {size[0]} pixels, other images of {self!r} are "
                f"{self._size[1]} x {self._size[0]}; images of several sizes cannot be batched. Set data.image_size "
                "(e.g. 112) to resize them all, or re-pack the data at one size"
            )


# --------------------------------------------------------------------------------------------------------------
# Record files
# --------------------------------------------------------------------------------------------------------------
def _resolve_rec(path: PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "train.rec"
    if path.suffix != ".rec":
        raise DatasetError(f"{path}: expected a .rec file or a folder holding train.rec and train.idx")
    return path


def _spread(count: int, sample_size: int) -> list[int]:
    """Sorted positions in ``[0, count)``: the first, the last and up to ``sample_size`` evenly spaced between."""
    return sorted({0, count - 1, *np.linspace(0, count - 1, min(sample_size, count)).astype(int)})


class RecordDataset(_FileDataset):
    """Images and labels of an InsightFace ``train.rec``/``train.idx`` pack (or an im2rec pack, no header).

    Args:
        path: A folder holding ``train.rec`` + ``train.idx``, or a ``.rec`` file (``.idx`` beside it).
        transform: Applied to each ``uint8 [3, H, W]`` RGB tensor (default: :class:`FaceTransform`, no flip).
        skip_corrupt: Replace corrupt records/images by the next good sample and count them
            (:attr:`num_skipped`) instead of raising.
        num_classes: Number of classes, if known. Needed only for packs without a header record (else the
            labels are scanned once, reading each record's header: slow for millions of images).
        max_image_side: Refuse an image whose header declares a larger side, before decoding it
            (default :data:`DEFAULT_MAX_IMAGE_SIDE`).

    Raises:
        DatasetError: On missing files, an inconsistent pack, or (at read time) a label outside
            ``[0, num_classes)``.
    """

    def __init__(
        self, path: PathLike, transform: Optional[Callable[[torch.Tensor], Any]] = None, skip_corrupt: bool = False,
        num_classes: Optional[int] = None, max_image_side: Optional[int] = None,
    ) -> None:
        super().__init__(transform, skip_corrupt, max_image_side)
        from fastface_pl.data.pack import finish_interrupted_replace

        rec_path = _resolve_rec(path)
        finish_interrupted_replace(rec_path.parent)  # a kill between a pack's renames: the new pack, whole
        self.record_file = RecordFile(rec_path)
        self.layout: RecordLayout = parse_layout(self.record_file)
        self._num_classes = self.layout.num_identities if self.layout.has_header_record else num_classes
        if num_classes is not None and self._num_classes != num_classes:
            raise DatasetError(
                f"{self.record_file.rec_path} has {self._num_classes} identity records but num_classes="
                f"{num_classes} was given; set num_classes to {self._num_classes} (or null to take it from the data)"
            )

    def __len__(self) -> int:
        return self.layout.num_images

    @property
    def num_classes(self) -> int:
        """Identities: the number of identity records, else ``max label + 1`` over all records (scanned once)."""
        if self._num_classes is None:
            log.info("%s has no header record: scanning %d record headers for the number of classes",
                     self.record_file.rec_path, len(self))
            self._num_classes = 1 + max(self.record_file.read_label(k) for k in self.layout.image_keys)
        return int(self._num_classes)

    def _where(self, key: int) -> str:
        return f"{self.record_file.rec_path} key {key} (byte offset {self.record_file.offset(key)})"

    def _source(self, index: int) -> str:
        return self._where(self.layout.image_keys[index])

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        key = self.layout.image_keys[index]
        payload = self.record_file.read(key)
        where = self._where(key)
        try:
            header, encoded = unpack_header(payload)
        except ValueError as error:
            raise CorruptRecordError(f"{where}: {error}", path=str(self.record_file.rec_path), key=key,
                                     offset=self.record_file.offset(key)) from None
        label = label_to_int(header, where)
        if self._num_classes is not None and label >= self._num_classes:
            raise DatasetError(
                f"{where}: label {label} is outside [0, {self._num_classes}); the pack's identity records "
                "or the configured num_classes do not match its labels"
            )
        return decode_image(encoded, where, self.max_image_side), label

    def validate(self, sample_size: int = 256) -> None:
        """Cheap consistency checks: identity records and the labels of an evenly spaced sample of images.

        Reads at most ``sample_size`` image headers and ``sample_size`` identity records, never all images.

        Raises:
            DatasetError: If an identity record's key range or a sampled label is out of range.
        """
        layout, rec = self.layout, self.record_file
        if layout.num_images == 0:
            raise DatasetError(f"{rec.rec_path} holds no image records")
        if layout.has_header_record and len(layout.identity_keys):
            ids = layout.identity_keys
            picks = _spread(len(ids), sample_size)
            first_image, end_image = layout.image_keys[0], layout.image_keys[-1] + 1
            for i in picks:
                start, stop = read_identity_range(rec, ids[i])
                if not first_image <= start <= stop <= end_image:
                    raise DatasetError(
                        f"{rec.rec_path} identity record key {ids[i]} (byte offset {rec.offset(ids[i])}) covers image "
                        f"keys [{start}, {stop}) outside the image keys [{first_image}, {end_image})"
                    )
        num_classes = self.num_classes
        keys = layout.image_keys
        picks = _spread(len(keys), sample_size)
        for i in picks:
            label = rec.read_label(keys[i])
            if not 0 <= label < num_classes:
                raise DatasetError(
                    f"{self._where(keys[i])}: label {label} is outside [0, {num_classes}) "
                    f"({'identity records' if layout.has_header_record else 'num_classes'} = {num_classes})"
                )

    def __repr__(self) -> str:
        return f"RecordDataset({str(self.record_file.rec_path)!r}, {len(self)} images)"


# --------------------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------------------
_SEP = os.sep.encode()
_NOT_NAMES = (b"", b".", b"..")
class ImageFolderDataset(_FileDataset):
    """Images stored as ``<root>/<identity>/<image>.jpg|.png`` (WebFace42M and most custom sets).

    Labels are the positions of the identity folders in sorted order. The file index is cached, because walking
    millions of files takes minutes: by default in ``<root>/.fastface_cache/image_index.bin``, or, when ``root`` is not
    writable, in ``$XDG_CACHE_HOME/fastface_pl/`` (``~/.cache/fastface_pl/``); a log message says where. At each
    start the cache is checked against the folder at one ``stat`` per identity folder, and the folders where
    images were added, removed or renamed since are listed again, with a warning naming them
    (:mod:`fastface_pl.data.folder_index`).

    Args:
        root: The dataset folder.
        transform: Applied to each ``uint8 [3, H, W]`` RGB tensor (default: :class:`FaceTransform`, no flip).
        skip_corrupt: Replace unreadable images by the next good one and count them instead of raising.
        index_cache: Where to keep the index (a file path); None for the default places.
        extensions: Image file suffixes to index (case-insensitive).
        rebuild_index: Ignore an existing cache and walk the folder again.
        max_image_side: Refuse an image whose header declares a larger side, before decoding it
            (default :data:`DEFAULT_MAX_IMAGE_SIDE`).

    Raises:
        DatasetError: If ``root`` is not a folder, cannot be read, or holds no identity folder with images.
    """

    def __init__(
        self, root: PathLike, transform: Optional[Callable[[torch.Tensor], Any]] = None, skip_corrupt: bool = False,
        index_cache: Optional[PathLike] = None, extensions: Sequence[str] = IMAGE_EXTENSIONS,
        rebuild_index: bool = False, max_image_side: Optional[int] = None,
    ) -> None:
        super().__init__(transform, skip_corrupt, max_image_side)
        self.root = Path(root)
        with reading("image folder", self.root):
            if not self.root.is_dir():
                raise DatasetError(f"image folder {self.root} does not exist or is not a directory")
        self.extensions = tuple(sorted(e.lower() for e in extensions))
        self.index_cache: Optional[Path] = Path(index_cache) if index_cache is not None else None
        index, self.index_path = load_index(self.root, self.extensions, self.index_cache, rebuild_index)
        empty = np.flatnonzero(np.asarray(index.counts) == 0)
        if not len(index.counts) or len(empty) == len(index.counts):
            raise DatasetError(
                f"{self.root} holds no identity folder with images ({', '.join(self.extensions)}); expected "
                "<root>/<identity>/<image>.jpg"
            )
        if len(empty):
            log.warning("%s: %d identity folders hold no images (e.g. %s); they keep their labels",
                        self.root, len(empty), os.fsdecode(bytes(index.names[empty[0]])))
        self._index = index
        # Arrays mapped from the index cache (no per-file Python object): constant-time start, fork-friendly.
        self._labels = index.labels
        self._paths = index.paths

    @property
    def identities(self) -> list[str]:
        """The identity folder names in label order."""
        return self._index.identities

    # -- samples ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._paths.size)

    @property
    def num_classes(self) -> int:
        return len(self._index.names)

    def path(self, index: int) -> Path:
        """The file of sample ``index``: ``<root>/<its identity>/<name>``, checked, as the index comes from a file
        that may have been received with the data.

        Raises:
            DatasetError: If the index lists a path that is not a file name inside its identity's folder.
        """
        relative = bytes(self._paths[index])
        identity = bytes(self._index.names[int(self._labels[index])])
        name = relative[len(identity) + 1:]
        if (not relative.startswith(identity + _SEP) or identity in _NOT_NAMES or name in _NOT_NAMES
                or any(c in part for part in (identity, name) for c in (_SEP, b"/", b"\0"))):
            raise DatasetError(
                f"the image-folder index {self.index_path or '(not cached)'} lists {relative!r} for the identity "
                f"{identity!r}: not a file inside {self.root}. The index was not written for this folder (it may "
                "have come with the data): delete it and start again, the folder is indexed anew"
            )
        return self.root / os.fsdecode(relative)

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def _source(self, index: int) -> str:
        return str(self.path(index))

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.path(index)
        try:
            data = read_image_file(path, self.max_image_side)
        except FileNotFoundError:
            raise CorruptImageError(
                f"{path}: no such file, yet the folder's index {self.index_path or '(not cached)'} lists it: the "
                "folder changed while training ran. Restart to index it again.", source=str(path),
            ) from None
        except PermissionError as error:
            raise CorruptImageError(str(unreadable("image", path, error)), source=str(path)) from None
        except OSError as error:
            raise CorruptImageError(f"{path}: cannot read: {error}", source=str(path)) from None
        return decode_image(data, str(path), self.max_image_side), int(self._labels[index])

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {self.num_classes} identities)"


# --------------------------------------------------------------------------------------------------------------
# Synthetic identities
# --------------------------------------------------------------------------------------------------------------
def _mix(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps), stable across runs and platforms."""
    state = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for value in values:
        state = (state ^ (int(value) & mask)) & mask
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        state = z ^ (z >> 31)
    return state >> 1


class SyntheticFaceGenerator:
    """Renders face-like images of synthetic identities, deterministically from ``(seed, identity, sample)``.

    An identity is a smooth random prototype: low-frequency colour patterns (random 4x4 and 8x8 grids upsampled
    bicubically) plus a per-identity colour. A sample is the prototype shifted by a few pixels, with a random
    brightness/contrast change and pixel noise, so images of one identity resemble each other far more than
    images of two identities, yet a network still has to learn invariances.

    Args:
        image_size: Side of the square images (e.g. 112, or 32 for demos).
        seed: Seed of the whole population.
        noise: Standard deviation of the pixel noise, in grey levels.
    """

    def __init__(self, image_size: int = 112, seed: int = 0, noise: float = 8.0) -> None:
        check_int("image_size", image_size, 8)
        if not noise >= 0:
            raise ConfigurationError(f"noise must be >= 0, got {noise!r}")
        self.image_size = image_size
        self.seed = int(seed)
        self.noise = float(noise)
        self.max_shift = max(1, image_size // 16)
        side = image_size + 2 * self.max_shift
        self._cache: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self._cache_size = max(1, self.cache_bytes // (3 * side * side * 4))

    cache_bytes = 64 << 20
    """Memory for recently used prototypes (per process)."""

    def prototype(self, identity: int) -> torch.Tensor:
        """The identity's float32 ``[3, S + 2m, S + 2m]`` canvas (grey levels, ``m`` = max shift)."""
        cached = self._cache.get(identity)
        if cached is not None:
            self._cache.move_to_end(identity)
            return cached
        generator = torch.Generator().manual_seed(_mix(self.seed, 1, identity))
        side = self.image_size + 2 * self.max_shift
        coarse = torch.randn(1, 3, 4, 4, generator=generator)
        fine = torch.randn(1, 3, 8, 8, generator=generator)
        colour = 0.6 * torch.randn(1, 3, 1, 1, generator=generator)
        up = lambda grid: torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic",  # noqa: E731
                                                          align_corners=False)
        pattern = up(coarse) + 0.5 * up(fine) + colour
        canvas = (127.5 + 45.0 * pattern)[0]
        self._cache[identity] = canvas
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return canvas

    def render(self, identity: int, sample: int) -> torch.Tensor:
        """Image ``sample`` of ``identity`` as ``uint8 [3, S, S]`` RGB."""
        generator = torch.Generator().manual_seed(_mix(self.seed, 2, identity, sample))
        canvas = self.prototype(identity)
        shift = torch.randint(0, 2 * self.max_shift + 1, (2,), generator=generator).tolist()
        size = self.image_size
        image = canvas[:, shift[0] : shift[0] + size, shift[1] : shift[1] + size]
        contrast = 1.0 + 0.1 * torch.randn((), generator=generator).clamp(-2, 2)
        brightness = 12.0 * torch.randn((), generator=generator).clamp(-2, 2)
        image = (image - 127.5) * contrast + 127.5 + brightness
        image = image + self.noise * torch.randn(image.shape, generator=generator)
        return image.clamp_(0, 255).add_(0.5).to(torch.uint8)  # round half up (torch.round is slow on CPU here)


class SyntheticFaces(Dataset):
    """Seeded synthetic identities generated on the fly (no files): the demo's and the tests' training set.

    Index ``i`` is image ``i % images_per_identity`` of identity ``i // images_per_identity``; the same
    ``(seed, index)`` always gives the same pixels.

    Args:
        num_identities: Number of classes.
        images_per_identity: Training images per identity.
        image_size: Side of the square images (e.g. 112, or 32 for demos).
        seed: Seed of the population (identities and their images).
        transform: Applied to each ``uint8 [3, S, S]`` tensor (default: :class:`FaceTransform`, no flip).
        noise: Pixel noise in grey levels (see :class:`SyntheticFaceGenerator`).

    Example::

        faces = SyntheticFaces(num_identities=10, images_per_identity=8, image_size=32, seed=0)
        image, label = faces[17]   # float32 [3, 32, 32] in [-1, 1], label 2
    """

    def __init__(
        self, num_identities: int = 100, images_per_identity: int = 20, image_size: int = 112, seed: int = 0,
        transform: Optional[Callable[[torch.Tensor], Any]] = None, noise: float = 8.0,
    ) -> None:
        self.num_identities = check_int("num_identities", num_identities, 1)
        self.images_per_identity = check_int("images_per_identity", images_per_identity, 1)
        self.generator = SyntheticFaceGenerator(image_size, seed, noise)
        self.transform = transform if transform is not None else FaceTransform()

    @property
    def num_classes(self) -> int:
        return self.num_identities

    @property
    def num_skipped(self) -> int:
        """Always 0 (nothing to corrupt); present for symmetry with the file datasets."""
        return 0

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for SyntheticFaces of {n} images")
        identity, sample = divmod(index % n, self.images_per_identity)
        return self.transform(self.generator.render(identity, sample)), identity


class SyntheticPairs(Dataset):
    """Verification pairs of synthetic faces, half genuine: ``(image_a, image_b, issame)``.

    Pairs alternate genuine / impostor (so every fold of the 10-fold protocol holds both). Images are held out
    from training: their sample indices start at ``images_per_identity``. Identities come from the training
    identities ``0 .. num_identities - 1`` and, if ``unseen_identities > 0``, from as many new ones.

    Args:
        num_pairs: Number of pairs (even numbers give exactly half genuine).
        num_identities: Training identities of the matching :class:`SyntheticFaces`.
        images_per_identity: Training images per identity (held-out samples start after them).
        image_size: Side of the images.
        seed: Seed of the population: use the training set's seed for pairs of the same identities.
        unseen_identities: Extra identities never seen in training, mixed into the pairs.
        transform: Applied to each ``uint8`` image (default: :class:`FaceTransform`, no flip).
        noise: Pixel noise in grey levels.
    """

    def __init__(
        self, num_pairs: int = 200, num_identities: int = 100, images_per_identity: int = 20, image_size: int = 112,
        seed: int = 0, unseen_identities: int = 0, transform: Optional[Callable[[torch.Tensor], Any]] = None,
        noise: float = 8.0,
    ) -> None:
        self.num_pairs = check_int("num_pairs", num_pairs, 1)
        self.num_identities = check_int("num_identities", num_identities, 1)
        self.images_per_identity = check_int("images_per_identity", images_per_identity, 1)
        check_int("unseen_identities", unseen_identities, 0)
        if num_identities + unseen_identities < 2:
            raise ConfigurationError("impostor pairs need at least 2 identities in num_identities + unseen_identities")
        self.unseen_identities = unseen_identities
        self.generator = SyntheticFaceGenerator(image_size, seed, noise)
        self.transform = transform if transform is not None else FaceTransform()
        self._seed = int(seed)

    def __len__(self) -> int:
        return self.num_pairs

    def pair(self, index: int) -> tuple[tuple[int, int], tuple[int, int], bool]:
        """``((identity_a, sample_a), (identity_b, sample_b), issame)`` of pair ``index``."""
        generator = torch.Generator().manual_seed(_mix(self._seed, 3, index))
        population = self.num_identities + self.unseen_identities
        issame = index % 2 == 0
        identity_a = int(torch.randint(0, population, (), generator=generator))
        if issame:
            identity_b = identity_a
        else:
            identity_b = int(torch.randint(0, population - 1, (), generator=generator))
            identity_b += identity_b >= identity_a
        held_out = self.images_per_identity
        sample_a = held_out + 2 * index
        sample_b = held_out + 2 * index + 1
        return (identity_a, sample_a), (identity_b, sample_b), issame

    def __getitem__(self, index: int) -> tuple[Any, Any, bool]:
        if not 0 <= index < self.num_pairs:
            raise IndexError(f"index {index} out of range for SyntheticPairs of {self.num_pairs} pairs")
        (ia, sa), (ib, sb), issame = self.pair(index)
        render = self.generator.render
        return self.transform(render(ia, sa)), self.transform(render(ib, sb)), issame


__all__ = [
    "IMAGE_EXTENSIONS",
    "FaceTransform",
    "ImageFolderDataset",
    "RecordDataset",
    "SyntheticFaceGenerator",
    "SyntheticFaces",
    "SyntheticPairs",
    "DEFAULT_MAX_IMAGE_SIDE",
    "declared_size",
    "decode_image",
    "max_file_bytes",
    "max_image_side_for",
    "pil_to_rgb",
    "read_image_file",
    "normalize",
    "scan_image_folder",
]
