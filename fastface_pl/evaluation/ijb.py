"""IJB-B / IJB-C 1:1 template verification, as InsightFace's ``arcface_torch/eval_ijbc.py`` computes it.

Input is InsightFace's IJB test suite: a folder ``IJBB`` or ``IJBC`` holding ``loose_crop/`` (the images) and
``meta/`` with ``<t>_name_5pts_score.txt`` (image, 5 landmarks, detector score), ``<t>_face_tid_mid.txt``
(image, template id, media id) and ``<t>_template_pair_label.txt`` (template, template, 1 = same person),
t = ``ijbb`` or ``ijbc``. The pipeline (``docs/evaluation.md``):

1. every crop aligned to 112 × 112 by the similarity transform of its landmarks onto the ArcFace template;
   the embeddings of the image and of its horizontal flip added;
2. each image feature kept unnormalised (its norm is a quality weight, "norm score") and multiplied by its
   detector score ("detector score");
3. the features of the images of one media (frames of one video) averaged, the media features of one
   template summed, the template feature L2-normalised; a pair's score the cosine of its two templates;
4. TAR at FAR 1e-6 … 1e-1 read from the ROC (scikit-learn's ``roc_curve``) at the point whose FPR is
   closest to the target, the largest TPR on ties.

Steps 2-4 are :func:`pair_scores` and :func:`tar_at_far`, vectorised (``index_add_`` pooling, template-grid
matrix products or batched dot products for the pairs) and run on the GPU when there is one; they take
features from anywhere. :func:`evaluate_ijb` runs the whole pipeline for a backbone and writes the table,
a JSON file, the scores and a ROC plot. Command line::

    python -m fastface_pl.evaluate model.ckpt --ijb /data/IJB_release/IJBC
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastface_pl.atomic import atomic_write, write_text_atomic
from fastface_pl.data.datasets import declared_size, pil_to_rgb, read_image_file
from fastface_pl.data.errors import DatasetError
from fastface_pl.errors import ConfigurationError
from fastface_pl.evaluation.alignment import arcface_template, similarity_transform, warp_affine

__all__ = ["IJB_FARS", "IJBMeta", "read_ijb_meta", "IJBImages", "extract_features", "pair_scores",
           "roc_curve", "tar_at_far", "evaluate_ijb", "format_ijb_table"]

IJB_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_TARGETS = ("ijbb", "ijbc")
#: Largest side of an IJB loose crop read (they are photos and video frames, larger than training crops); a larger
#: header is refused before decoding. Raise it with ``evaluate_ijb(max_image_side=...)``.
IJB_MAX_IMAGE_SIDE = 8192
_META_FILES = ("{t}_name_5pts_score.txt", "{t}_face_tid_mid.txt", "{t}_template_pair_label.txt")


# ---------------------------------------------------------------------------------------------- meta files
@dataclass
class IJBMeta:
    """The meta files of an IJB folder: one row per image, one per pair."""

    target: str  # "ijbb" or "ijbc"
    image_names: list[str]
    landmarks: np.ndarray  # float32[N, 5, 2], pixel coordinates in the loose crop
    faceness: np.ndarray  # float32[N], detector scores
    templates: np.ndarray  # int64[N]
    medias: np.ndarray  # int64[N]
    pairs: np.ndarray  # int64[P, 2], template ids
    labels: np.ndarray  # int64[P], 1 = same identity


def _target_of(meta_dir: Path) -> str:
    found = [t for t in _TARGETS if all((meta_dir / name.format(t=t)).is_file() for name in _META_FILES)]
    if len(found) != 1:
        expected = ", ".join(name.format(t="<t>") for name in _META_FILES)
        raise FileNotFoundError(
            f"{meta_dir} must hold the IJB meta files {expected} for exactly one t in ijbb | ijbc, found "
            f"{'both' if found else 'none'}; give the IJBB or IJBC folder of InsightFace's IJB test suite"
        )
    return found[0]


def _read_integers(path: Path, columns: int) -> np.ndarray:
    """A whitespace-separated integer table, parsed by numpy in one pass (15.7M IJB-C pairs in seconds); a
    malformed line is named by its number."""
    text = path.read_text().strip()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy warns, and stops, at a token it cannot parse
        try:
            values = np.fromstring(text, dtype=np.int64, sep=" ")  # text mode (not the deprecated binary one)
        except (DeprecationWarning, ValueError):
            values = None
    lines = text.count("\n") + 1 if text else 0
    if lines == 0:
        raise DatasetError(f"{path} is empty: expected {columns} integers on each line")
    if values is None or values.size != lines * columns:
        for number, line in enumerate(text.splitlines(), 1):  # the slow path, only to name the bad line
            fields = line.split()
            if len(fields) != columns or not all(f.lstrip("-").isdigit() for f in fields):
                raise DatasetError(f"{path}:{number}: expected {columns} integers, got {line!r}; is it the right "
                                   "file, unmodified?")
        raise DatasetError(f"{path} must hold {columns} integers on each of its {lines} lines")
    return values.reshape(-1, columns)


def _first_bad(mask: np.ndarray) -> int | None:
    """1-based line number of the first True of ``mask``, or None."""
    bad = np.flatnonzero(mask)
    return int(bad[0]) + 1 if bad.size else None


def _check_image_name(name: str, path: Path, number: int) -> None:
    from pathlib import PurePosixPath, PureWindowsPath

    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or ".." in PurePosixPath(name).parts
            or ".." in PureWindowsPath(name).parts):
        raise DatasetError(f"{path}:{number}: the image {name!r} is not a path inside loose_crop/ (an absolute "
                           "path or '..'): IJB meta files name images relative to loose_crop/")


def read_ijb_meta(root: str | Path) -> IJBMeta:
    """Reads and checks the meta files of an IJB folder (``root/meta``); the target (ijbb | ijbc) from their names.

    Every value is checked before any image is read, each error naming the file and line: image names stay
    inside ``loose_crop/``, landmarks are finite numbers, detector scores finite and >= 0, pair labels 0 or 1,
    and every template of a pair has images.

    Raises:
        FileNotFoundError: when ``root/meta`` or ``root/loose_crop`` or a meta file is missing.
        DatasetError: (a ``ValueError``) for malformed lines or values, or when the image lists of the two
            per-image files disagree.
    """
    root = Path(root)
    if not (root / "meta").is_dir() or not (root / "loose_crop").is_dir():
        raise FileNotFoundError(
            f"{root} is not an IJB folder: expected {root / 'meta'} and {root / 'loose_crop'} "
            "(InsightFace's IJB test suite layout, e.g. IJB_release/IJBC)"
        )
    target = _target_of(root / "meta")
    landmark_file, template_file, pair_file = (root / "meta" / name.format(t=target) for name in _META_FILES)

    names, landmarks, faceness = [], [], []
    for number, line in enumerate(landmark_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 12:
            raise DatasetError(f"{landmark_file}:{number}: expected 'image x1 y1 … x5 y5 score' (12 fields), "
                               f"got {line!r}")
        _check_image_name(fields[0], landmark_file, number)
        try:
            values = [float(v) for v in fields[1:12]]
        except ValueError:
            raise DatasetError(f"{landmark_file}:{number}: the landmarks and the score must be numbers, got "
                               f"{line!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise DatasetError(f"{landmark_file}:{number}: a landmark or the score is not finite: {line!r}")
        if values[10] < 0:
            raise DatasetError(f"{landmark_file}:{number}: the detector score {fields[11]} is negative; scores are "
                               "detection confidences >= 0 (a negative one would flip the sign of the features)")
        names.append(fields[0])
        landmarks.append(values[:10])
        faceness.append(values[10])

    template_names, template_media = [], []
    for number, line in enumerate(template_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise DatasetError(f"{template_file}:{number}: expected 'image template_id media_id', got {line!r}")
        try:
            template_media.append((int(fields[1]), int(fields[2])))
        except ValueError:
            raise DatasetError(f"{template_file}:{number}: template and media ids must be integers, got "
                               f"{line!r}") from None
        template_names.append(fields[0])
    if template_names != names:
        differ = next((i for i, (a, b) in enumerate(zip(names, template_names)) if a != b),
                      min(len(names), len(template_names)))
        raise DatasetError(
            f"{landmark_file.name} and {template_file.name} must list the same images in the same order "
            f"({len(names)} and {len(template_names)} lines; the first difference is at image {differ + 1}); the "
            "features are matched to templates by line"
        )
    pairs = _read_integers(pair_file, 3)
    number = _first_bad((pairs[:, 2] != 0) & (pairs[:, 2] != 1))
    if number is not None:
        raise DatasetError(f"{pair_file}:{number}: the pair label is {pairs[number - 1, 2]}, expected 1 (same "
                           "person) or 0")
    template_media_array = np.asarray(template_media, dtype=np.int64).reshape(-1, 2)
    known = np.unique(template_media_array[:, 0])
    number = _first_bad(~np.isin(pairs[:, :2], known).all(axis=1))
    if number is not None:
        raise DatasetError(f"{pair_file}:{number}: template {pairs[number - 1, 0]} or {pairs[number - 1, 1]} has no "
                           f"image in {template_file.name}")
    return IJBMeta(
        target=target,
        image_names=names,
        landmarks=np.asarray(landmarks, dtype=np.float32).reshape(-1, 5, 2),
        faceness=np.asarray(faceness, dtype=np.float32),
        templates=template_media_array[:, 0].copy(),
        medias=template_media_array[:, 1].copy(),
        pairs=pairs[:, :2].copy(),
        labels=pairs[:, 2].copy(),
    )


# ---------------------------------------------------------------------------------------------- images
class IJBImages(Dataset):
    """Loose crops aligned to ``image_size`` squares: item ``i`` is ``uint8[3, S, S]`` (RGB)."""

    def __init__(self, image_dir: str | Path, names: Sequence[str], landmarks: np.ndarray, image_size: int = 112,
                 max_image_side: int = IJB_MAX_IMAGE_SIDE):
        self.image_dir = Path(image_dir)
        self.max_image_side = int(max_image_side)
        self.names = list(names)
        self.landmarks = np.asarray(landmarks, dtype=np.float32)
        self.image_size = image_size
        self.template = arcface_template(image_size)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image, ImageOps

        path = self.image_dir / self.names[index]
        try:
            data = read_image_file(path, self.max_image_side)  # the file's size first: nothing huge is read
            declared_size(data, str(path), self.max_image_side)  # the header alone: a bomb is refused here
            with Image.open(io.BytesIO(data)) as image:
                # cv2.imread (the reference) applies the EXIF orientation and always gives 3 channels (8-bit:
                # a 16-bit image is scaled, as in training)
                pixels = pil_to_rgb(ImageOps.exif_transpose(image), str(path))
        except DatasetError:
            raise
        except (OSError, ValueError) as error:  # missing, unreadable or corrupt: a message, not a traceback
            raise DatasetError(f"cannot read IJB image {path}: {error}; check the IJB folder (loose_crop/) "
                               "or re-extract it") from error
        try:
            matrix = similarity_transform(self.landmarks[index], self.template)
        except ValueError as error:
            raise ValueError(f"{self.names[index]}: {error}") from error
        return warp_affine(pixels, matrix, self.image_size)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, dataset: Dataset, batch_size: int = 128, num_workers: int = 4,
                     device: str | torch.device | None = None, precision: str = "32-true",
                     progress: bool = True) -> np.ndarray:
    """Image features ``float32[N, D]``: the embedding of each aligned image plus that of its flip.

    The backbone runs in eval mode on ``device`` (the GPU when present) on batches of images and flips;
    decoding and alignment happen in ``num_workers`` DataLoader workers. ``precision`` is ``32-true``,
    ``16-mixed`` or ``bf16-mixed`` (autocast; the features are returned in float32).
    """
    from tqdm.auto import tqdm

    autocast_dtypes = {"32-true": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
    if precision not in autocast_dtypes:
        raise ConfigurationError(f"precision must be one of {', '.join(autocast_dtypes)}, got {precision!r}")
    device = torch.device(device) if device is not None else _default_device()
    was_training = backbone.training
    backbone.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    chunks = []
    try:
        for images in tqdm(loader, desc="IJB features", unit="batch", disable=not progress):
            images = images.to(device, non_blocking=True).float().div_(255).sub_(0.5).div_(0.5)
            both = torch.cat([images, images.flip(-1)])
            dtype = autocast_dtypes[precision]
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                embeddings = backbone(both).float()
            image_part, flip_part = embeddings.chunk(2)
            chunks.append((image_part + flip_part).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(chunks).numpy()


# ---------------------------------------------------------------------------------------------- scores
def _dense_index(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values of an id tensor and the index of each element into them."""
    low, high = int(ids.min()), int(ids.max())
    if high - low <= 8 * ids.numel() + (1 << 20):  # small range: count instead of sort
        unique, inverse = _used_index(ids - low, high - low + 1)
        return unique + low, inverse
    if ids.device.type == "cpu":  # numpy's unique is several times faster than torch's on the CPU
        unique, inverse = np.unique(ids.numpy(), return_inverse=True)
        return torch.from_numpy(unique), torch.from_numpy(inverse.reshape(-1).astype(np.int64))
    return torch.unique(ids, sorted=True, return_inverse=True)


def _used_index(ids: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_dense_index` for ids in ``[0, size)``, by counting instead of sorting (O(n))."""
    used = torch.bincount(ids, minlength=size) > 0
    position = torch.cumsum(used.to(torch.int64), 0) - 1
    return used.nonzero().squeeze(1), position[ids]


def _template_features(features: torch.Tensor, templates: torch.Tensor,
                       medias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised template features (float64[T, D]) and the sorted template ids (int64[T]).

    Media sums are accumulated in the features' dtype (float32, as the reference averages medias), the
    media means and template sums in float64.
    """
    unique_templates, template_index = _dense_index(templates)
    # one group per (template, media): media ids are only compared within a template, as in the reference
    media_offset = medias - medias.min()
    _, media_index = _dense_index(template_index * (int(media_offset.max()) + 1) + media_offset)
    num_medias = int(media_index.max()) + 1
    media_sums = features.new_zeros(num_medias, features.shape[1])
    media_sums.index_add_(0, media_index, features)
    media_counts = torch.bincount(media_index, minlength=num_medias).to(torch.float64)
    media_template = torch.zeros(num_medias, dtype=torch.int64, device=features.device)
    media_template[media_index] = template_index  # every image of a media has the same template
    template_sums = torch.zeros(len(unique_templates), features.shape[1], dtype=torch.float64,
                                device=features.device)
    template_sums.index_add_(0, media_template, media_sums.double() / media_counts.unsqueeze(1))
    # as sklearn.preprocessing.normalize: a zero row stays zero
    norms = template_sums.norm(dim=1, keepdim=True)
    return template_sums / torch.where(norms == 0, torch.ones_like(norms), norms), unique_templates


def _template_rows(unique_templates: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row of each template id in ``unique_templates`` (sorted); -1 for ids with no image."""
    low, high = int(unique_templates[0]), int(unique_templates[-1])
    if high - low < max(1 << 24, 8 * unique_templates.numel()):  # a lookup table: one gather, no search
        table = torch.full((high - low + 1,), -1, dtype=torch.int64, device=ids.device)
        table[unique_templates - low] = torch.arange(unique_templates.numel(), device=ids.device)
        inside = (ids >= low) & (ids <= high)
        return torch.where(inside, table[(ids - low).clamp_(0, high - low)], torch.full_like(ids, -1))
    rows = torch.searchsorted(unique_templates, ids).clamp_(max=unique_templates.numel() - 1)
    return torch.where(unique_templates[rows] == ids, rows, torch.full_like(rows, -1))


def _cosines(template_features: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
             block_elements: int = 1 << 27, gather_elements: int = 1 << 24) -> torch.Tensor:
    """Dot products ``template_features[first[p]] · template_features[second[p]]`` for every pair p (float64).

    When the pairs fill a good part of the grid (templates in column 1) × (templates in column 2), as the
    IJB protocols do (enrolment × verification templates), the grid is computed by float32 matrix products
    in row blocks of at most ``block_elements`` entries and the pair scores gathered from it; otherwise the
    pairs are scored by batched float64 dot products (``gather_elements`` feature values at a time).
    """
    num_pairs, num_templates = first.numel(), template_features.shape[0]
    device = template_features.device
    rows, row_index = _used_index(first, num_templates)
    cols, col_index = _used_index(second, num_templates)
    if rows.numel() * cols.numel() <= 32 * num_pairs:
        left = template_features[rows].float()
        right_t = template_features[cols].float().T.contiguous()
        rows_per_block = max(1, block_elements // cols.numel())
        if rows_per_block >= rows.numel():  # the whole grid at once
            return (left @ right_t).view(-1)[row_index * cols.numel() + col_index].double()
        scores = torch.empty(num_pairs, dtype=torch.float64, device=device)
        order = torch.argsort(row_index)
        bounds = torch.searchsorted(row_index[order], torch.arange(0, rows.numel() + rows_per_block,
                                                                   rows_per_block, device=device)).tolist()
        for block, start in enumerate(range(0, rows.numel(), rows_per_block)):
            selected = order[bounds[block]:bounds[block + 1]]
            grid = left[start:start + rows_per_block] @ right_t
            scores[selected] = grid[row_index[selected] - start, col_index[selected]].double()
        return scores
    scores = torch.empty(num_pairs, dtype=torch.float64, device=device)
    gather_rows = max(1, gather_elements // template_features.shape[1])
    for start in range(0, num_pairs, gather_rows):
        stop = min(start + gather_rows, num_pairs)
        a = template_features[first[start:stop]]
        b = template_features[second[start:stop]]
        scores[start:stop] = torch.einsum("pd,pd->p", a, b)
    return scores


def pair_scores(features, faceness, templates, medias, pairs, norm_score: bool = True,
                detector_score: bool = True) -> np.ndarray:
    """Template-pair cosine scores from image features, as InsightFace's IJB 1:1 evaluation.

    Args:
        features: ``float[N, D]`` image features (embedding of the aligned image plus that of its flip).
        faceness: ``float[N]`` detector scores of the images.
        templates: ``int[N]`` template id of each image.
        medias: ``int[N]`` media id of each image (a photo, or a video whose frames are averaged).
        pairs: ``int[P, 2]`` template ids of the pairs to score.
        norm_score: keep each feature's norm as a quality weight (the reference's default); ``False``
            L2-normalises the image features first.
        detector_score: multiply each feature by its detector score (the reference's default).

    Returns:
        ``float64[P]`` cosine similarity of the two L2-normalised template features of each pair.

    Raises:
        ValueError: for inconsistent shapes or a pair naming a template that has no image.

    Numpy arrays or tensors are accepted; the work runs on the tensor's device, or on the GPU when
    ``features`` is not a tensor and one is present. The scores agree with the reference's to about 1e-7
    (it averages medias in float32; the template grid is multiplied in float32 here).
    """
    device = features.device if isinstance(features, torch.Tensor) else _default_device()

    def tensor(value, dtype):
        return torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value,
                               dtype=dtype, device=device)

    feats = tensor(features, torch.float32)
    weights = tensor(faceness, torch.float32).flatten()
    template_ids = tensor(templates, torch.int64).flatten()
    media_ids = tensor(medias, torch.int64).flatten()
    pair_ids = tensor(pairs, torch.int64)
    num_images = feats.shape[0] if feats.dim() == 2 else -1
    if feats.dim() != 2 or not (weights.numel() == template_ids.numel() == media_ids.numel() == num_images):
        raise ValueError(
            f"expected features [N, D] and faceness, templates, medias of length N, got {list(feats.shape)}, "
            f"{weights.numel()}, {template_ids.numel()}, {media_ids.numel()}"
        )
    if num_images == 0 or pair_ids.dim() != 2 or pair_ids.shape[1] != 2:
        raise ValueError(f"expected at least one image and pairs of shape [P, 2], got {list(pair_ids.shape)} pairs")
    # the reference's order of operations, in float32 as it: flip-summed feature, optional L2 norm, × detector score
    if not norm_score:
        feats = feats / feats.norm(dim=1, keepdim=True)
    if detector_score:
        feats = feats * weights.unsqueeze(1)
    template_features, unique_templates = _template_features(feats, template_ids, media_ids)
    positions = _template_rows(unique_templates, pair_ids.flatten())
    known = positions >= 0
    if not bool(known.all()):
        missing = pair_ids.flatten()[~known].unique()[:5].tolist()
        raise ValueError(
            f"{int((~known).sum())} pair entries name templates with no image (e.g. {missing}); the pair file "
            "and the template file must come from the same IJB release"
        )
    positions = positions.view(-1, 2)
    return _cosines(template_features, positions[:, 0], positions[:, 1]).cpu().numpy()


def _sort(values: torch.Tensor) -> torch.Tensor:
    """Sorted values (ascending); numpy's sort on the CPU, which skips the indices torch computes."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy()))
    return torch.sort(values).values


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC as ``sklearn.metrics.roc_curve(labels, scores)`` gives it (``drop_intermediate=True``).

    Returns ``(fpr, tpr, thresholds)`` as float64 arrays, starting at (0, 0) with threshold ``inf``: one
    point per distinct score (accept when score ≥ threshold), minus the points in the middle of straight
    runs (both count sequences with zero second difference), as scikit-learn drops them.
    """
    device = scores.device if isinstance(scores, torch.Tensor) else _default_device()
    score = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores,
                            dtype=torch.float64, device=device).flatten()
    label = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels,
                            device=device).flatten()
    if score.numel() != label.numel() or score.numel() == 0:
        raise ValueError(f"expected as many labels as scores (at least one), got {label.numel()} and {score.numel()}")
    if not bool(((label == 0) | (label == 1)).all()):
        raise ValueError("labels must be 0 (different identities) or 1 (same identity)")
    if not bool(torch.isfinite(score).all()):
        raise ValueError("scores must be finite")
    positive = label.bool()
    num_positive = int(positive.sum())
    if num_positive in (0, score.numel()):
        raise ValueError(f"the ROC needs genuine and impostor pairs, got {num_positive} genuine of {score.numel()}")
    # counts at every distinct score from sorted values alone (no argsort of all scores: a third of the time)
    descending = _sort(score).flip(0)
    genuine = _sort(score[positive])
    last = torch.cat([(descending[1:] != descending[:-1]).nonzero().squeeze(1),
                      torch.tensor([score.numel() - 1], device=device)])  # last position of each distinct score
    thresholds = descending[last]
    tps = num_positive - torch.searchsorted(genuine, thresholds, side="left")  # genuine scores >= threshold
    fps = last + 1 - tps
    if tps.numel() > 2:  # scikit-learn's drop_intermediate
        bends = (torch.diff(fps, n=2) != 0) | (torch.diff(tps, n=2) != 0)
        keep = torch.cat([bends.new_ones(1), bends, bends.new_ones(1)])
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    zero = tps.new_zeros(1)
    tps, fps = torch.cat([zero, tps]), torch.cat([zero, fps])
    thresholds = torch.cat([thresholds.new_full((1,), math.inf), thresholds])
    fpr = fps.double() / float(fps[-1])
    tpr = tps.double() / float(tps[-1])
    return fpr.cpu().numpy(), tpr.cpu().numpy(), thresholds.cpu().numpy()


def _tar_from_roc(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float]) -> dict[float, float]:
    result = {}
    for far in fars:
        distance = np.abs(fpr - far)
        closest = np.flatnonzero(distance == distance.min())
        result[far] = float(tpr[closest[-1]])  # ties: the point of largest TPR (ROC sorted by TPR)
    return result


def tar_at_far(scores, labels, fars: Sequence[float] = IJB_FARS) -> dict[float, float]:
    """TAR at each FAR by the rule of InsightFace's IJB evaluation.

    The ROC is :func:`roc_curve` (scikit-learn's); for each target FAR the TAR of the ROC point whose FPR
    is closest to it, the largest TPR among equally close points.

    Args:
        scores: ``float[P]`` pair scores (higher = more alike).
        labels: ``int[P]`` 1 for same-identity pairs, 0 otherwise.
        fars: target false accept rates.

    Returns:
        ``{far: tar}`` with TAR as a fraction (multiply by 100 for the published tables).
    """
    for far in fars:
        if isinstance(far, bool) or not isinstance(far, (int, float)) or not 0.0 <= far <= 1.0:
            raise ValueError(f"fars must be numbers in [0, 1], got {far!r}")
    fpr, tpr, _ = roc_curve(scores, labels)
    return _tar_from_roc(fpr, tpr, fars)


# ---------------------------------------------------------------------------------------------- pipeline
def format_ijb_table(name: str, tars: dict[float, float]) -> str:
    """The reference's table: one column per FAR, TAR in percent with two decimals."""
    header = f"{'':<24}" + "".join(f"{far:>9.0e}" for far in tars)
    row = f"{name:<24}" + "".join(f"{100 * tar:>9.2f}" for tar in tars.values())
    return f"{header}\n{row}"


def _plot_roc(fpr: np.ndarray, tpr: np.ndarray, label: str, path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if fpr.size > 20_000:  # enough points for the eye on a log axis; keep both ends
        keep = np.unique(np.concatenate([np.linspace(0, fpr.size - 1, 20_000).astype(np.int64),
                                         np.searchsorted(fpr, np.logspace(-7, 0, 2_000))]).clip(0, fpr.size - 1))
        fpr, tpr = fpr[keep], tpr[keep]
    figure, axis = plt.subplots(figsize=(6, 4.5))
    axis.plot(fpr, tpr, lw=1, label=label)
    axis.set(xscale="log", xlim=(1e-6, 0.1), ylim=(0.3, 1.0), xlabel="False Positive Rate",
             ylabel="True Positive Rate", title="ROC on IJB")
    axis.set_xticks(list(IJB_FARS))
    axis.grid(linestyle="--", linewidth=1)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)


def evaluate_ijb(backbone: torch.nn.Module, root: str | Path, output_dir: str | Path, name: str = "model",
                 image_size: int = 112, batch_size: int = 128, num_workers: int = 4,
                 device: str | torch.device | None = None, precision: str = "32-true", norm_score: bool = True,
                 detector_score: bool = True, fars: Sequence[float] = IJB_FARS,
                 progress: bool = True, max_image_side: int = IJB_MAX_IMAGE_SIDE) -> dict[str, Any]:
    """IJB-B or IJB-C 1:1 verification of ``backbone``; prints the table and writes its results.

    Writes ``<output_dir>/<name>_<target>.json`` (TAR per FAR, AUC, counts, options),
    ``<name>_<target>_roc.png`` and ``<name>_<target>_scores.npy`` (one score per pair, in file order).
    Existing result files are not overwritten: pass another ``output_dir`` or ``name``.

    Args:
        backbone: maps normalised RGB images ``float[B, 3, S, S]`` to embeddings ``float[B, D]``.
        root: the IJBB or IJBC folder (``loose_crop/``, ``meta/``).
        output_dir: folder for the result files (created).
        name: prefix of the result files and row label of the table.
        image_size: crop side S (112 for every published model; the template is scaled for others).
        batch_size, num_workers, device, precision: see :func:`extract_features`.
        norm_score, detector_score: see :func:`pair_scores` (both on, as the reference).
        fars: FARs of the table.
        max_image_side: a crop whose header declares a larger side is refused before decoding.

    Returns:
        the JSON content as a dict (``tar_at_far`` maps ``"1e-04"``-style keys to TAR fractions).
    """
    meta = read_ijb_meta(root)
    output_dir = Path(output_dir)
    stem = f"{name}_{meta.target}"
    paths = {kind: output_dir / f"{stem}{suffix}" for kind, suffix in
             (("json", ".json"), ("png", "_roc.png"), ("npy", "_scores.npy"))}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing:
        raise FileExistsError(f"IJB results already exist ({', '.join(existing)}): choose another output folder")
    output_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    dataset = IJBImages(Path(root) / "loose_crop", meta.image_names, meta.landmarks, image_size, max_image_side)
    features = extract_features(backbone, dataset, batch_size, num_workers, device, precision, progress)
    feature_seconds = time.perf_counter() - started
    feature_device = torch.device(device) if device is not None else _default_device()
    started = time.perf_counter()
    scores = pair_scores(torch.from_numpy(features).to(feature_device), meta.faceness, meta.templates,
                         meta.medias, meta.pairs, norm_score=norm_score, detector_score=detector_score)
    fpr, tpr, _ = roc_curve(scores, meta.labels)
    tars = _tar_from_roc(fpr, tpr, fars)
    score_seconds = time.perf_counter() - started

    label = f"{name}-{meta.target.upper()}"
    print(format_ijb_table(label, tars))
    auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
    result = {
        "target": meta.target,
        "tar_at_far": {f"{far:.0e}": tar for far, tar in tars.items()},
        "auc": auc,
        "num_images": len(meta.image_names),
        "num_templates": int(np.unique(meta.templates).size),
        "num_pairs": int(len(meta.labels)),
        "num_genuine_pairs": int(meta.labels.sum()),
        "norm_score": norm_score,
        "detector_score": detector_score,
        "flip": True,
        "image_size": image_size,
        "seconds": {"features": round(feature_seconds, 3), "scores_and_roc": round(score_seconds, 3)},
    }
    with atomic_write(paths["npy"], "wb", what="IJB scores") as handle:  # each written whole, or not at all
        np.save(handle, scores)
    with atomic_write(paths["png"], "wb", what="IJB ROC plot") as handle:
        _plot_roc(fpr, tpr, f"{label} (AUC = {100 * auc:.4f} %)", handle)
    write_text_atomic(paths["json"], json.dumps(result, indent=2), "IJB results")
    print(f"IJB results: {paths['json']}, {paths['png']}, {paths['npy']}")
    return result
