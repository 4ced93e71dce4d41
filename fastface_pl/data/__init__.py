"""Face data without MXNet: RecordIO packs, image folders, synthetic identities, ``.bin`` verification sets.

``FaceDataModule`` is the entry point for training; the readers below are usable on their own. Names are
imported lazily (``fastface_pl.data.FaceDataModule`` imports Lightning on first use, the readers do not).
"""

from __future__ import annotations

from fastface_pl._lazy import lazy_exports

_MODULES = {
    "fastface_pl.data.datasets": ("FaceTransform", "ImageFolderDataset", "RecordDataset", "SyntheticFaces",
                                  "SyntheticPairs", "decode_image"),
    "fastface_pl.data.errors": ("CorruptImageError", "CorruptRecordError", "DatasetError", "ImageTooLargeError",
                                "RecordKeyError"),
    "fastface_pl.data.recordio": ("RecordFile", "RecordHeader", "RecordLayout", "RecordWriter", "pack_header",
                                  "parse_layout", "unpack_header"),
    "fastface_pl.data.bin_format": ("VerificationPairs", "find_bin_files", "load_bin", "write_bin"),
    "fastface_pl.data.datamodule": ("FaceDataModule", "detect_layout"),
}

__all__ = sorted(name for names in _MODULES.values() for name in names)


__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
