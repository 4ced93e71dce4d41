"""F2C's dual data loader as one sampler: each batch joins identity pairs and random instances.

:class:`IdentityPairSampler` lays out every batch of ``B`` images as ``P`` identity pairs followed by ``B − 2P``
random images: ``[a₁, b₁, a₂, b₂, …, a_P, b_P, x₁, x₂, …]`` (a_i, b_i two different images of one identity).
Even positions form view A and odd positions view B, so each view holds one image of every sampled identity
and half of the instances; the F2C step (``docs/f2c.md``) makes each view probe once and gallery once.

The order is a pure function of ``(seed, epoch, position)``, as for
:class:`~fastface_pl.data.datamodule.SeededRandomSampler`: identities come from an endless stream of seeded
permutations of the identities with two or more images, instances from an endless stream of seeded
permutations of all images (cycle ``k`` uses the permutation drawn from ``seed`` and ``k``), and an epoch is
the stretch of both streams its batches cover. So every image and identity is visited evenly across epochs,
ranks take interleaved batches, and a resumed run skips exactly what it had trained on.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from fastface_pl.data.errors import DatasetError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_IDENTITY_FRACTION", "IdentityIndex", "IdentityPairSampler", "identity_index"]

DEFAULT_IDENTITY_FRACTION = 0.5
_PAIR_SALT, _INSTANCE_SALT, _PICK_SALT, _FLIP_SALT = 0x51ED27, 0x1A2B3C, 0x7F4A7C15, 0x9E3779B9


class IdentityIndex:
    """The images of each identity: ``indices[offsets[c]:offsets[c + 1]]`` are the dataset indices of ``c``."""

    def __init__(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or (labels.size and labels.min() < 0):
            raise ValueError("labels must be a 1-D array of non-negative identities")
        self.indices = np.argsort(labels, kind="stable").astype(np.int64)
        counts = np.bincount(labels, minlength=int(labels.max()) + 1 if labels.size else 0)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def identity_index(dataset: Dataset) -> IdentityIndex:
    """The identity → images index of a training set, read without decoding an image.

    Synthetic faces and image folders know their labels; a record pack with identity records gives each
    identity's key range (one small record per identity); a pack without them is scanned once (one header
    read per image, logged).

    Raises:
        DatasetError: for a dataset whose labels cannot be read without decoding its images.
    """
    from fastface_pl.data.datasets import ImageFolderDataset, RecordDataset, SyntheticFaces
    from fastface_pl.data.recordio import read_identity_range

    if isinstance(dataset, SyntheticFaces):
        labels = np.repeat(np.arange(dataset.num_identities), dataset.images_per_identity)
    elif isinstance(dataset, ImageFolderDataset):
        labels = np.asarray(dataset._labels)
    elif isinstance(dataset, RecordDataset):
        layout, records = dataset.layout, dataset.record_file
        keys = np.asarray(layout.image_keys, dtype=np.int64)
        if layout.has_header_record and len(layout.identity_keys):
            labels = np.full(len(keys), -1, dtype=np.int64)
            for identity, key in enumerate(layout.identity_keys):
                start, stop = read_identity_range(records, key)
                labels[np.searchsorted(keys, start):np.searchsorted(keys, stop)] = identity
            if (labels < 0).any():
                first = int(keys[np.argmax(labels < 0)])
                raise DatasetError(f"{records.rec_path}: image key {first} belongs to no identity record; "
                                   "repack the data (python -m fastface_pl.data.pack)")
        else:
            log.info("%s has no identity records: reading %d record headers for the identity pairs",
                     records.rec_path, len(keys))
            labels = np.array([records.read_label(int(k)) for k in keys], dtype=np.int64)
    else:
        labels = getattr(dataset, "labels", None)
        if labels is None:
            raise DatasetError(
                f"cannot read the labels of {type(dataset).__name__} without decoding its images; identity pairs "
                "(classifier=dcp) need SyntheticFaces, ImageFolderDataset, RecordDataset or a `labels` array"
            )
    return IdentityIndex(np.asarray(labels))


def _permutation(size: int, seed: int, cycle: int, salt: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + cycle * 7_919 + salt) % (2**63 - 1))
    return torch.randperm(size, generator=generator)


def _stream(positions: torch.Tensor, size: int, seed: int, salt: int) -> torch.Tensor:
    """Element ``positions`` of the endless stream of seeded permutations of ``range(size)``."""
    cycles = torch.div(positions, size, rounding_mode="floor")
    out = torch.empty_like(positions)
    for cycle in torch.unique(cycles).tolist():
        where = cycles == cycle
        out[where] = _permutation(size, seed, int(cycle), salt)[positions[where] % size]
    return out


class PositionedSampler(DistributedSampler):
    """A sampler whose order is a pure function of ``(seed, epoch)``, started at a position for one pass.

    Lightning creates the loader's iterator (and worker processes draw their first indices) before it calls
    ``set_epoch``, so a resume sets the position first (:meth:`set_position`) and ``set_epoch`` keeps it for
    that same epoch. Subclasses set ``num_samples`` (per rank) and read the start with :meth:`_take_start`.
    """

    epoch: int = 0
    start: int = 0
    num_samples: int

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Make the next pass yield this rank's order of ``epoch`` from position ``start`` on (a resume)."""
        if not 0 <= int(start) <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}] (samples per rank), got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer before each epoch: a new epoch starts at position 0; the current one keeps it."""
        if int(epoch) != self.epoch:
            self.epoch, self.start = int(epoch), 0

    def _take_start(self) -> int:
        """The start of this pass; the next pass over the same epoch is whole."""
        start, self.start = self.start, 0
        return start


class IdentityPairSampler(PositionedSampler):
    """Batches of identity pairs + random instances, fixed by ``(seed, epoch, position)``, resumable mid-epoch.

    Yields ``(index, flip)`` items (see :class:`~fastface_pl.data.datamodule.IndexedFlip`) in batch order; use it
    with ``DataLoader(batch_size=batch_size)``. An epoch is ``⌊N / (B · R)⌋`` batches per rank (at least one),
    as many as the plain sampler gives with ``drop_last``; rank ``r`` takes batches ``r, r + R, …``.

    Args:
        index: The identity → images index (:func:`identity_index`).
        batch_size: Images per batch ``B`` (even).
        identity_fraction: Share of each batch in identity pairs: ``P = round(fraction · B / 2)`` pairs (≥ 1).
        seed: Seed of the order and the flips.
        flip: Draw a horizontal flip per position (probability 0.5).
        num_replicas: Number of ranks ``R``.
        rank: This rank.
    """

    def __init__(self, index: IdentityIndex, batch_size: int, identity_fraction: float = DEFAULT_IDENTITY_FRACTION,
                 seed: int = 0, flip: bool = False, num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"identity pairs need an even batch_size >= 2, got {batch_size}")
        if not 0.0 < identity_fraction <= 1.0:
            raise ValueError(f"identity_fraction must be in (0, 1], got {identity_fraction!r}")
        counts = index.counts
        self.pair_identities = torch.from_numpy(np.flatnonzero(counts >= 2))
        if not len(self.pair_identities):
            raise DatasetError("identity pairs need identities with at least two images; every identity has one")
        self.offsets = torch.from_numpy(index.offsets)
        self.image_of = torch.from_numpy(index.indices)
        self.num_images = int(len(index.indices))
        self.batch_size = int(batch_size)
        self.num_pairs = max(1, int(round(identity_fraction * batch_size / 2)))
        self.num_instances = self.batch_size - 2 * self.num_pairs
        self.seed, self.flip = int(seed), bool(flip)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.batches_per_epoch = max(1, self.num_images // (self.batch_size * self.num_replicas))
        self.num_samples = self.batches_per_epoch * self.batch_size
        self.total_size = self.num_samples * self.num_replicas
        self.epoch, self.start = 0, 0


    def epoch_batches(self, epoch: int) -> torch.Tensor:
        """Dataset indices ``long[batches_per_epoch, B]`` of this rank's batches in ``epoch``."""
        steps, world = self.batches_per_epoch, self.num_replicas
        slots = epoch * steps * world + torch.arange(steps) * world + self.rank  # global batch numbers
        pair_pos = slots.unsqueeze(1) * self.num_pairs + torch.arange(self.num_pairs)
        identities = self.pair_identities[_stream(pair_pos.reshape(-1), len(self.pair_identities), self.seed,
                                                  _PAIR_SALT)].reshape(pair_pos.shape)
        start, count = self.offsets[identities], self.offsets[identities + 1] - self.offsets[identities]
        picks = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + _PICK_SALT)
        draws = torch.rand(world * steps, self.num_pairs, 2, generator=picks)[slots - epoch * steps * world]
        first = (draws[..., 0] * count).long().clamp_max(count - 1)
        second = (first + 1 + (draws[..., 1] * (count - 1)).long().clamp_max(count - 2)) % count
        pairs = torch.stack([self.image_of[start + first], self.image_of[start + second]], dim=2)
        instance_pos = slots.unsqueeze(1) * self.num_instances + torch.arange(self.num_instances)
        instances = _stream(instance_pos.reshape(-1), self.num_images, self.seed,
                            _INSTANCE_SALT).reshape(instance_pos.shape)
        return torch.cat([pairs.reshape(steps, -1), instances], dim=1)

    def __iter__(self) -> Iterator[Any]:
        skip = self._take_start()
        indices = self.epoch_batches(self.epoch).reshape(-1).tolist()
        if not self.flip:
            return iter(indices[skip:])
        coins = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + _FLIP_SALT)
        flips = (torch.rand(self.total_size, generator=coins) < 0.5)
        flips = flips.reshape(self.batches_per_epoch, self.num_replicas, self.batch_size)[:, self.rank].reshape(-1)
        return iter(list(zip(indices, flips.tolist()))[skip:])

    def __len__(self) -> int:
        return self.num_samples
