"""InsightFace verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin`` ...): read and write.

A ``.bin`` is a Python-2 pickle of ``(bins, issame)``: ``bins`` holds ``2 P`` encoded images (JPEG/PNG, as
Python-2 ``str``, i.e. bytes, or as uint8 numpy arrays of any shape, e.g. ``cv2.imencode``'s ``(n, 1)``) and
pair ``i`` is ``(bins[2i], bins[2i + 1])``; ``issame`` holds ``P`` booleans. Python 3 reads it with ``pickle.load(f, encoding="bytes")``.

.. note:: Unpickling can run code. :func:`load_bin` uses a restricted unpickler that only rebuilds the types a
   ``.bin`` contains (lists, tuples, bytes, bools, numpy arrays), so a tampered file fails instead of running.

Example::

    lfw = load_bin("faces_emore/lfw.bin")          # 6,000 pairs
    image_a, image_b, issame = lfw[0]              # float32 [3, 112, 112] in [-1, 1], and a bool
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from fastface_pl.data.datasets import DEFAULT_MAX_IMAGE_SIDE, FaceTransform, decode_image, max_image_side_for
from fastface_pl.data.errors import DatasetError, reading
from fastface_pl.argument_checks import check_int

PathLike = Union[str, "os.PathLike[str]"]

_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    ("__builtin__", "bytearray"), ("builtins", "bytearray"),
    ("__builtin__", "set"), ("builtins", "set"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    # arrays pickled with protocol 5 (Python 3.8+'s pickle.HIGHEST_PROTOCOL) are rebuilt from their buffer
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _Budget:
    """What the unpickler may still allocate: the file's size (plus 1 MiB) in all, for every array or buffer a
    global builds. A real ``.bin`` holds its images' bytes, so its objects never need more than the file; a
    tampered one that asks ``numpy.ndarray((2**50,), 'u1')`` of a 117-byte file is refused before allocating."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.left = path, size + (1 << 20)

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise DatasetError(
                f"{self.path} is not a verification .bin that fastface_pl accepts: it asks to allocate {nbytes:,} "
                f"bytes for {what}, more than the file itself could hold (its size bounds what it may build); the "
                "file was altered or is not an InsightFace .bin"
            )
        self.left -= nbytes


def _nbytes(shape: Any, dtype: Any, what: str, budget: _Budget) -> int:
    try:
        dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
        itemsize = np.dtype(dtype).itemsize
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{budget.path}: {what} with shape {shape!r} and dtype {dtype!r}: {error}") from None
    if any(d < 0 for d in dims):
        raise DatasetError(f"{budget.path}: {what} with a negative shape {dims}")
    total = itemsize
    for d in dims:
        total *= d
    return total


class _BinUnpickler(pickle.Unpickler):
    def __init__(self, handle: Any, path: Path, size: int) -> None:
        super().__init__(handle, encoding="bytes")
        self.budget = _Budget(path, size)
        budget = self.budget

        def ndarray(shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> np.ndarray:
            budget.take(_nbytes(shape, dtype, "numpy.ndarray", budget), "a numpy array")
            return np.ndarray(shape, dtype, *args, **kwargs)

        self._ndarray = ndarray  # numpy.ndarray, called with the budget checked (and given to _reconstruct)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"a verification .bin may not reference {module}.{name}")
        found = super().find_class(module, name)
        budget = self.budget
        if name == "ndarray":
            return self._ndarray
        if name == "_reconstruct":
            def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
                budget.take(_nbytes(shape, dtype, "a numpy array", budget), "a numpy array")
                return found(np.ndarray if subtype is self._ndarray else subtype, shape, dtype)
            return reconstruct
        if name == "bytearray":
            def make_bytearray(*args: Any) -> bytearray:
                if args and isinstance(args[0], (int, np.integer)):
                    budget.take(int(args[0]), "a bytearray")
                return found(*args)
            return make_bytearray
        if name == "dtype":
            def make_dtype(*args: Any, **kwargs: Any) -> np.dtype:
                made = found(*args, **kwargs)
                budget.take(made.itemsize, "a numpy dtype")  # a void dtype of 2**40 bytes would do it
                return made
            return make_dtype
        return found


def _as_bytes(item: Any, path: Path, position: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:  # any shape: cv2.imencode gives (n, 1)
        return item.tobytes()
    if isinstance(item, str):  # a Python-2 str read with encoding="latin1" would land here
        return item.encode("latin1")
    raise DatasetError(
        f"{path}: bins[{position}] is a {type(item).__name__}, expected encoded image bytes (or a uint8 array "
        "of them)"
    )


class VerificationPairs(Dataset):
    """Pairs of a verification set: ``(image_a, image_b, issame)``, decoded lazily.

    Args:
        encoded: ``2 P`` encoded images.
        issame: ``P`` booleans.
        name: Name of the set (e.g. ``"lfw"``), for messages.
        image_size: Resize to this side when the images differ (None keeps the stored size).
        transform: Applied to each ``uint8 [3, H, W]`` image (default: normalisation, no flip).
        max_image_side: Refuse an image whose header declares a larger side, before decoding it.
    """

    def __init__(
        self, encoded: Sequence[bytes], issame: Sequence[bool], name: str = "pairs", image_size: Optional[int] = None,
        transform: Optional[Callable[[torch.Tensor], Any]] = None, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
    ) -> None:
        if len(encoded) != 2 * len(issame):
            raise DatasetError(f"{name}: {len(encoded)} images for {len(issame)} pairs, expected {2 * len(issame)}")
        self.encoded = list(encoded)
        self.issame = [bool(x) for x in issame]
        self.name = name
        self.max_image_side = int(max_image_side)
        self.transform = transform if transform is not None else FaceTransform(image_size=image_size)

    def __len__(self) -> int:
        return len(self.issame)

    def __getitem__(self, index: int) -> tuple[Any, Any, bool]:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range for {self.name} ({len(self)} pairs)")
        first = decode_image(self.encoded[2 * index], f"{self.name} image {2 * index}", self.max_image_side)
        second = decode_image(self.encoded[2 * index + 1], f"{self.name} image {2 * index + 1}", self.max_image_side)
        return self.transform(first), self.transform(second), self.issame[index]

    def __repr__(self) -> str:
        return f"VerificationPairs({self.name!r}, {len(self)} pairs, {sum(self.issame)} genuine)"


def load_bin(
    path: PathLike, image_size: Optional[int] = None, transform: Optional[Callable[[torch.Tensor], Any]] = None,
    max_image_side: Optional[int] = None,
) -> VerificationPairs:
    """Read an InsightFace verification ``.bin``.

    Args:
        path: The ``.bin`` file.
        image_size: Resize images to this side if they differ (InsightFace's loader does the same).
        transform: Replaces the default normalisation (receives ``uint8 [3, H, W]``).
        max_image_side: Refuse an image whose header declares a larger side (default: 1024, or 8 x
            ``image_size``), before decoding it.

    Raises:
        DatasetError: If the file is missing or unreadable, is not a ``(bins, issame)`` pickle with
            ``len(bins) == 2 P``, or asks to allocate more than its own size (a tampered file).
    """
    path = Path(path)
    try:
        with reading("verification set", path):
            if not path.is_file():
                raise DatasetError(f"verification set {path} does not exist")
            # read whole (the pairs keep every byte anyway): pickle's length fields then cannot make a read
            # allocate more than the file holds
            data = path.read_bytes()
        content = _BinUnpickler(io.BytesIO(data), path, len(data)).load()
    except DatasetError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, MemoryError, OverflowError) as error:
        raise DatasetError(f"{path} is not an InsightFace verification .bin (a pickle of (bins, issame)): "
                           f"{error}") from None
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise DatasetError(f"{path}: expected a pickled (bins, issame) pair, got {type(content).__name__}")
    bins, issame = content
    issame = [bool(x) for x in (issame.tolist() if isinstance(issame, np.ndarray) else issame)]
    if len(bins) != 2 * len(issame):
        raise DatasetError(f"{path}: {len(bins)} images for {len(issame)} pairs, expected {2 * len(issame)}")
    if not issame:
        raise DatasetError(f"{path} holds no pairs: nothing to verify (an empty or cut-down .bin); remove it from "
                           "the verification sets or replace it")
    if all(issame) or not any(issame):
        warnings.warn(
            f"{path}: all {len(issame)} pairs are {'genuine' if all(issame) else 'impostor'} pairs, so the accuracy "
            "says nothing (one threshold classifies them all) and VAL@FAR is undefined (reported as NaN); a "
            "verification set needs both kinds", UserWarning, stacklevel=2,
        )
    encoded = [_as_bytes(item, path, i) for i, item in enumerate(bins)]
    pairs = VerificationPairs(encoded, issame, name=path.stem, image_size=image_size, transform=transform,
                              max_image_side=max_image_side or max_image_side_for(image_size))
    pairs.source = path
    return pairs


MIN_PAIRS = 10
"""The fewest pairs the 10-fold verification protocol can split."""


def check_enough_pairs(sets: Sequence[Any], fix: str) -> None:
    """Refuse, before any inference, the verification sets too small for the 10-fold protocol, naming each.

    Raises:
        DatasetError: If a set holds fewer than :data:`MIN_PAIRS` pairs.
    """
    small = [f"{getattr(s, 'source', None) or getattr(s, 'name', None) or type(s).__name__} ({len(s)} pairs)"
             for s in sets if len(s) < MIN_PAIRS]
    if small:
        raise DatasetError(f"verification set(s) with fewer than the {MIN_PAIRS} pairs the {MIN_PAIRS}-fold protocol "
                           f"needs: {', '.join(small)}; {fix}")


def _encode(image: Any, quality: int, position: int) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    from PIL import Image

    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            f"images_or_encoded[{position}] must be encoded bytes or a uint8 RGB image (HxWx3 or 3xHxW), got "
            f"dtype {array.dtype} and shape {array.shape}"
        )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), "RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_bin(
    path: PathLike, images_or_encoded: Sequence[Any], issame: Sequence[bool], quality: int = 95
) -> Path:
    """Write a verification ``.bin`` that InsightFace's loader (and :func:`load_bin`) reads.

    Args:
        path: Output file.
        images_or_encoded: ``2 P`` images: encoded bytes (stored as they are) or ``uint8`` RGB arrays/tensors
            (``H x W x 3`` or ``3 x H x W``, JPEG-encoded at ``quality``). Pair ``i`` is items ``2i`` and ``2i + 1``.
        issame: ``P`` booleans.
        quality: JPEG quality for arrays, 1..100.

    Returns:
        The path written. The pickle uses protocol 2, which Python 2 and 3 both read.
    """
    check_int("quality", quality, 1, 100)
    issame = [bool(x) for x in issame]
    if len(images_or_encoded) != 2 * len(issame):
        raise ValueError(
            f"images_or_encoded must hold 2 * len(issame) = {2 * len(issame)} images, got {len(images_or_encoded)}"
        )
    bins = [_encode(image, quality, i) for i, image in enumerate(images_or_encoded)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from fastface_pl.atomic import atomic_write

    with atomic_write(path, "wb", what="verification set") as handle:
        pickle.dump((bins, issame), handle, protocol=2)
    return path


def find_bin_files(names: Sequence[str], places: Sequence[Path], fix: str) -> list[Path]:
    """The file of each verification set: ``lfw`` is the first ``<place>/lfw.bin`` found, a path to an existing
    ``.bin`` is itself. Raises DatasetError listing the sets not found, the ``.bin`` files that are there, and
    ``fix`` (what the user should change)."""
    paths, missing = [], []
    for name in map(str, names):
        file_name = name if name.endswith(".bin") else f"{name}.bin"
        with reading("verification set", name):
            candidates = [Path(name)] if name.endswith(".bin") and Path(name).is_file() else \
                [place / file_name for place in places]
            found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            missing.append(" or ".join(str(c) for c in candidates))
        paths.append(found)
    if missing:
        available = sorted({p.stem for place in places if place.is_dir() for p in place.glob("*.bin")
                            if not p.name.startswith(".")})  # not a hidden file (the image-folder index cache)
        raise DatasetError(f"verification set(s) not found: {'; '.join(missing)}. Available .bin files in "
                           f"{' and '.join(str(p) for p in places)}: {available or 'none'}. {fix}")
    return paths  # type: ignore[return-value]


__all__ = ["VerificationPairs", "find_bin_files", "load_bin", "write_bin"]
