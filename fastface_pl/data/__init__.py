"""Face data without MXNet: RecordIO packs, image folders, synthetic identities, ``.bin`` verification sets.

``FaceDataModule`` is the entry point for training; the readers below are usable on their own (and do not
import Lightning: ``FaceDataModule`` and ``detect_layout`` are loaded on first use).
"""

from typing import Any

from fastface_pl.data import datasets
from fastface_pl.data.datasets import (
    FaceTransform,
    ImageFolderDataset,
    RecordDataset,
    SyntheticFaces,
    SyntheticPairs,
    decode_image,
)
from fastface_pl.data.errors import (
    CorruptImageError, CorruptRecordError, DatasetError, ImageTooLargeError, RecordKeyError,
)
from fastface_pl.data.recordio import (
    RecordFile,
    RecordHeader,
    RecordLayout,
    RecordWriter,
    pack_header,
    parse_layout,
    unpack_header,
)
from fastface_pl.data.bin_format import VerificationPairs, load_bin, write_bin

__all__ = [
    "CorruptImageError",
    "CorruptRecordError",
    "DatasetError",
    "ImageTooLargeError",
    "FaceDataModule",
    "FaceTransform",
    "ImageFolderDataset",
    "RecordDataset",
    "RecordFile",
    "RecordHeader",
    "RecordKeyError",
    "RecordLayout",
    "RecordWriter",
    "SyntheticFaces",
    "SyntheticPairs",
    "VerificationPairs",
    "datasets",
    "decode_image",
    "detect_layout",
    "load_bin",
    "pack_header",
    "parse_layout",
    "unpack_header",
    "write_bin",
]


def __getattr__(name: str) -> Any:
    if name in ("FaceDataModule", "detect_layout"):
        from fastface_pl.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'fastface_pl.data' has no attribute {name!r}")
