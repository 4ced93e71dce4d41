"""Face data without MXNet: RecordIO packs, image folders, synthetic identities, ``.bin`` verification sets.

``FaceDataModule`` is the entry point for training; the readers below are usable on their own. Names are
imported lazily (``fastface_pl.data.FaceDataModule`` imports Lightning on first use, the readers do not).
"""

from __future__ import annotations

from fastface_pl._lazy import lazy_exports

_EXPORTS = {
    "FaceTransform": "fastface_pl.data.datasets",
    "ImageFolderDataset": "fastface_pl.data.datasets",
    "RecordDataset": "fastface_pl.data.datasets",
    "SyntheticFaces": "fastface_pl.data.datasets",
    "SyntheticPairs": "fastface_pl.data.datasets",
    "decode_image": "fastface_pl.data.datasets",
    "CorruptImageError": "fastface_pl.data.errors",
    "CorruptRecordError": "fastface_pl.data.errors",
    "DatasetError": "fastface_pl.data.errors",
    "RecordKeyError": "fastface_pl.data.errors",
    "RecordFile": "fastface_pl.data.recordio",
    "RecordHeader": "fastface_pl.data.recordio",
    "RecordLayout": "fastface_pl.data.recordio",
    "RecordWriter": "fastface_pl.data.recordio",
    "pack_header": "fastface_pl.data.recordio",
    "parse_layout": "fastface_pl.data.recordio",
    "unpack_header": "fastface_pl.data.recordio",
    "VerificationPairs": "fastface_pl.data.bin_format",
    "find_bin_files": "fastface_pl.data.bin_format",
    "load_bin": "fastface_pl.data.bin_format",
    "write_bin": "fastface_pl.data.bin_format",
    "FaceDataModule": "fastface_pl.data.datamodule",
    "detect_layout": "fastface_pl.data.datamodule",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
