"""Training orders: the seeded shuffle and F2C's dual data loader, computed per position, never per epoch.

Both samplers' orders are pure functions of ``(seed, epoch, position)``, and both compute them in chunks of
:data:`CHUNK` positions as the loader consumes them, with numpy: an epoch starts in constant time and memory
whatever the dataset's size (a WebFace42M epoch of 42M positions costs one chunk at its start, not a 336 MB
permutation and a list of 42M Python tuples), and a resume at position ``p`` starts computing at ``p``.

The random draws are counter-based: a permutation of
``range(n)`` is a keyed 4-round Feistel network on the smallest even-bit domain ``2^b ≥ n`` with cycle walking
(an element mapped outside ``range(n)`` is mapped again until it falls inside: a bijection of ``range(n)``), and
a coin or a pick is the splitmix64 hash of ``(key, position)``. The keys come from the seed, the epoch (or the
stream's cycle) and a salt per use.

:class:`SeededRandomSampler` shuffles the dataset once per epoch. :class:`IdentityPairSampler` lays out every
batch of ``B`` images as ``P`` identity pairs followed by ``B − 2P`` random images:
``[a₁, b₁, a₂, b₂, …, a_P, b_P, x₁, x₂, …]`` (a_i, b_i two different images of one identity). Even positions form
view A and odd positions view B, so each view holds one image of every sampled identity and half of the
instances; the F2C step (``docs/f2c.md``) makes each view probe once and gallery once. Identities come from an
endless stream of permutations of the identities with two or more images, instances from an endless stream of
permutations of all images (cycle ``k`` uses the permutation keyed by ``seed`` and ``k``), and an epoch is the
stretch of both streams its batches cover. So every image and identity is visited evenly across epochs, ranks
take interleaved batches, and a resumed run skips exactly what it had trained on.

.. note::
   Unlike orders drawn with ``torch.randperm`` per epoch, these are computed per position in chunks: a run
   resumed with the same version repeats its epoch's order exactly, one resumed from a checkpoint of a version
   that drew its orders otherwise does not (the order is as uniform, but different).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from torch.utils.data import Dataset, DistributedSampler

from fastface_pl.atomic import atomic_write
from fastface_pl.data.errors import DatasetError
from fastface_pl.errors import ConfigurationError

log = logging.getLogger(__name__)

__all__ = [
    "CHUNK", "DEFAULT_IDENTITY_FRACTION", "IdentityIndex", "IdentityPairSampler", "PositionedSampler",
    "SeededRandomSampler", "identity_index", "permute",
]

DEFAULT_IDENTITY_FRACTION = 0.5
CHUNK = 1 << 16
"""Positions computed at a time while a loader iterates (about 1.5 MB of temporaries)."""
_ORDER_SALT, _FLIP_SALT = 0x2545F491, 0x9E3779B9
_PAIR_SALT, _INSTANCE_SALT, _PICK_SALT = 0x51ED27, 0x1A2B3C, 0x7F4A7C15
_MASK64 = (1 << 64) - 1
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on ``uint64`` values (wrapping arithmetic): a well-spread hash (a new array)."""
    with np.errstate(over="ignore"):  # the wrap-around is the point
        x = x ^ (x >> np.uint64(30))
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def _key(*parts: int) -> int:
    """A 64-bit key from integers (seed, epoch or cycle, salt, ...)."""
    value = 0
    for part in parts:
        value = int(_mix(np.array([(value * 0x100000001B3 + int(part) + 0x9E3779B97F4A7C15) & _MASK64],
                                  dtype=np.uint64))[0])
    return value


def _keys(seed: int, cycles: np.ndarray, salt: int) -> np.ndarray:
    """``_key(seed, cycle, salt)`` for an array of cycles (uint64), vectorised."""
    base = np.uint64(_key(seed, salt))
    return _mix(base ^ _mix(cycles.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))


def hashed(positions: np.ndarray, key: np.ndarray | int) -> np.ndarray:
    """The ``uint64`` hash of each position under ``key`` (a scalar or one key per position)."""
    return _mix(positions.astype(np.uint64) ^ np.asarray(key, dtype=np.uint64))


def permute(values: np.ndarray, size: int, key: np.ndarray | int) -> np.ndarray:
    """Where ``values`` (in ``range(size)``) go under the keyed permutation of ``range(size)`` (int64).

    A 4-round Feistel network on ``2^b ≥ size`` (``b`` even), cycle-walked into ``range(size)``: a bijection, the
    same for any chunking of the values. ``key`` is a scalar or one key per value.
    """
    bits = max(2, int(size - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = np.asarray(key, dtype=np.uint64)
    round_keys = [_mix(keys + np.uint64(0x632BE59BD9B4E019 * (r + 1) & _MASK64)) for r in range(4)]

    def rounds(x: np.ndarray, round_keys: list[np.ndarray]) -> np.ndarray:
        left, right = x >> half, x & mask
        for round_key in round_keys:
            mixed = _mix(right ^ round_key)
            mixed &= mask
            left ^= mixed
            left, right = right, left
        left <<= half
        left |= right
        return left

    out = rounds(values.astype(np.uint64), round_keys)
    todo = np.flatnonzero(out >= np.uint64(size))
    while len(todo):  # cycle walking: about one element in three needs it once, few need it more often
        keys_todo = [k if k.ndim == 0 else k[todo] for k in round_keys]
        walked = rounds(out[todo], keys_todo)
        out[todo] = walked
        todo = todo[walked >= np.uint64(size)]
    return out.astype(np.int64)


def _stream(positions: np.ndarray, size: int, seed: int, salt: int) -> np.ndarray:
    """Element ``positions`` of the endless stream of seeded permutations of ``range(size)`` (cycle k keyed by k)."""
    cycles = positions // size
    return permute(positions % size, size, _keys(seed, cycles, salt))


# --------------------------------------------------------------------------------------------------------------
# The identity index
# --------------------------------------------------------------------------------------------------------------
class IdentityIndex:
    """The images of each identity: ``indices[offsets[c]:offsets[c + 1]]`` are the dataset indices of ``c``."""

    def __init__(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or (labels.size and labels.min() < 0):
            raise ValueError("labels must be a 1-D array of non-negative identities")
        counts = np.bincount(labels, minlength=int(labels.max()) + 1 if labels.size else 0)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # Image folders and record packs list each identity's images together: then the index is the identity.
        grouped = labels.size < 2 or bool((labels[1:] >= labels[:-1]).all())
        self._set(None if grouped else np.argsort(labels, kind="stable"), offsets)

    def _set(self, indices: Optional[np.ndarray], offsets: np.ndarray) -> None:
        self.offsets = np.asarray(offsets, dtype=np.int64)
        size = int(self.offsets[-1]) if len(self.offsets) else 0
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self._size = size

    @classmethod
    def from_arrays(cls, offsets: np.ndarray, indices: Optional[np.ndarray] = None) -> "IdentityIndex":
        """An index from its offsets and (None: images grouped by identity, in order) its indices."""
        index = cls.__new__(cls)
        index._set(indices, offsets)
        return index

    @property
    def indices(self) -> np.ndarray:
        """Dataset indices grouped by identity (``arange`` when the dataset is grouped already)."""
        return np.arange(self._size, dtype=np.int64) if self._indices is None else self._indices

    def images(self, positions: np.ndarray) -> np.ndarray:
        """``indices[positions]`` without building ``indices`` for a grouped dataset."""
        return positions.astype(np.int64) if self._indices is None else self._indices[positions]

    @property
    def num_images(self) -> int:
        return self._size

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


IDENTITY_CACHE_SUFFIX = ".fastface_identities.npz"
IDENTITY_CACHE_VERSION = 1


def _pack_stamp(paths: list[Path]) -> np.ndarray:
    """``[size, mtime_ns]`` of each file: what a cached identity index is checked against."""
    return np.array([[p.stat().st_size, p.stat().st_mtime_ns] for p in paths], dtype=np.int64)


def _identity_cache_places(rec_path: Path) -> list[Path]:
    """Beside the pack, else (a read-only folder) in the user cache."""
    from fastface_pl.data.folder_index import default_cache_dir

    digest = hashlib.sha1(str(rec_path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return [rec_path.with_name(rec_path.name + IDENTITY_CACHE_SUFFIX),
            default_cache_dir() / f"identities-{digest}.npz"]


def _read_identity_cache(path: Path, stamp: np.ndarray, num_images: int) -> Optional[IdentityIndex]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if (int(data["version"]) != IDENTITY_CACHE_VERSION or not np.array_equal(data["stamp"], stamp)
                    or int(data["offsets"][-1]) != num_images):
                return None
            indices = data["indices"] if "indices" in data.files else None
            return IdentityIndex.from_arrays(data["offsets"], indices)
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _write_identity_cache(index: IdentityIndex, stamp: np.ndarray, places: list[Path]) -> Optional[Path]:
    arrays = {"version": np.array(IDENTITY_CACHE_VERSION), "stamp": stamp, "offsets": index.offsets}
    if index._indices is not None:
        arrays["indices"] = index._indices
    for target in places:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(target, "wb", "identity-index cache") as handle:
                np.savez(handle, **arrays)
            return target
        except OSError as error:  # a full disk too (DiskFullError): try the next place, or go without a cache
            log.info("cannot cache the identity index at %s (%s)", target, error)
    return None


def _record_labels(dataset: Any) -> np.ndarray:
    """Each image's identity in a record pack: from its identity records, or from every image's header."""
    from fastface_pl.data.recordio import read_identity_range

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
        return labels
    log.info("%s has no identity records: reading %d record headers for the identity pairs",
             records.rec_path, len(keys))
    return np.array([records.read_label(int(k)) for k in keys], dtype=np.int64)


def record_identity_index(dataset: Any, cache: bool = True) -> tuple[IdentityIndex, Optional[Path]]:
    """A record pack's identity index, built once and cached beside the pack (``<name>.rec`` +
    :data:`IDENTITY_CACHE_SUFFIX`; in the user cache when that folder is read-only).

    The cache is used when it records the current size and modification time of the ``.rec`` and the ``.idx``;
    otherwise the index is built again (one small record per identity, or one header per image) and rewritten.
    Returns the index and where it is cached (None: nowhere writable, or ``cache=False``).
    """
    records = dataset.record_file
    stamp = _pack_stamp([Path(records.rec_path), Path(records.idx_path)])
    places = _identity_cache_places(Path(records.rec_path)) if cache else []
    for path in places:
        index = _read_identity_cache(path, stamp, len(dataset))
        if index is not None:
            log.info("identity index of %s read from %s", records.rec_path, path)
            return index, path
    started = time.perf_counter()
    index = IdentityIndex(_record_labels(dataset))
    written = _write_identity_cache(index, stamp, places) if places else None
    log.info("identity index of %s built in %.1f s (%d identities); cached at %s", records.rec_path,
             time.perf_counter() - started, len(index), written or "nowhere")
    return index, written


def identity_index(dataset: Dataset) -> IdentityIndex:
    """The identity → images index of a training set, read without decoding an image.

    Synthetic faces and image folders know their labels; a record pack with identity records gives each
    identity's key range (one small record per identity); a pack without them is scanned once (one header
    read per image, logged). A record pack's index is cached beside it (:func:`record_identity_index`).

    Raises:
        DatasetError: for a dataset whose labels cannot be read without decoding its images.
    """
    from fastface_pl.data.datasets import ImageFolderDataset, RecordDataset, SyntheticFaces

    if isinstance(dataset, SyntheticFaces):
        counts = np.full(dataset.num_identities, dataset.images_per_identity, dtype=np.int64)
        return IdentityIndex.from_arrays(np.concatenate([[0], np.cumsum(counts)]))
    if isinstance(dataset, ImageFolderDataset):  # its index lists each identity's images together
        return IdentityIndex.from_arrays(np.concatenate([[0], np.cumsum(dataset._index.counts)]))
    if isinstance(dataset, RecordDataset):
        return record_identity_index(dataset)[0]
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise DatasetError(
            f"cannot read the labels of {type(dataset).__name__} without decoding its images; identity pairs "
            "(classifier=dcp) need SyntheticFaces, ImageFolderDataset, RecordDataset or a `labels` array"
        )
    return IdentityIndex(np.asarray(labels))


# --------------------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------------------
class PositionedSampler(DistributedSampler):
    """A sampler whose order is a pure function of ``(seed, epoch)``, started at a position for one pass.

    Lightning creates the loader's iterator (and worker processes draw their first indices) before it calls
    ``set_epoch``, so a resume sets the position first (:meth:`set_position`) and ``set_epoch`` keeps it for
    that same epoch. Subclasses set ``num_samples`` (per rank) and :meth:`order`; iterating yields
    :meth:`order` chunk by chunk (:data:`CHUNK` positions), as ints, or ``(index, flip)`` items with flips.
    """

    epoch: int = 0
    start: int = 0
    num_samples: int
    flip: bool = False

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

    def order(self, epoch: int, begin: int = 0, end: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """This rank's positions ``[begin, end)`` of ``epoch``: dataset indices ``int64`` and flips ``bool``
        (None when ``flip`` is off)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        return self._items(self.epoch, self._take_start())  # the position is read now, not at the first item

    def _items(self, epoch: int, start: int) -> Iterator[Any]:
        for begin in range(start, self.num_samples, CHUNK):
            indices, flips = self.order(epoch, begin, min(begin + CHUNK, self.num_samples))
            if flips is None:
                yield from indices.tolist()
            else:
                yield from zip(indices.tolist(), flips.tolist())

    def __len__(self) -> int:
        return self.num_samples

    def _flips(self, epoch: int, positions: np.ndarray) -> Optional[np.ndarray]:
        """One coin per global position of ``epoch`` (the same for any split into ranks)."""
        if not self.flip:
            return None
        return (hashed(positions, _key(self.seed, epoch, _FLIP_SALT)) >> np.uint64(63)).astype(bool)


class SeededRandomSampler(PositionedSampler):
    """A shuffled order fixed by ``(seed, epoch)`` for one or many ranks, with per-sample flips, resumable mid-epoch.

    Every epoch is one permutation of the dataset keyed by ``(seed, epoch)`` (padded by wrapping around to a
    multiple of ``num_replicas``; rank ``r`` takes positions ``r, r + R, ...``), and, when ``flip`` is on, one coin
    per position. It yields ``(index, flip)`` pairs, which :class:`~fastface_pl.data.datamodule.IndexedFlip` turns
    into samples. So the images and their flips depend only on the seed, the epoch and the position: not on the
    global RNG, the worker count or a restart. A subclass of ``DistributedSampler``, so Lightning keeps it under
    DDP instead of wrapping it.

    The sampler holds a *position* ``(epoch, start)``: the next pass yields this rank's order of ``epoch`` from
    position ``start`` on, then later passes start at 0 again. :meth:`__iter__` reads the position when it is
    called, which for a DataLoader with workers is when its iterator is created (the workers are handed the first
    indices at once): a resume must therefore set the position (:meth:`set_position`) before the loader is
    iterated, not in ``set_epoch``, which Lightning calls after creating the iterator of a resumed epoch.

    Args:
        num_samples: Dataset size.
        seed: Seed of the order and the flips.
        flip: Draw a horizontal flip for each position (probability 0.5).
        num_replicas: Number of ranks.
        rank: This rank.
        epoch: The epoch of the first pass.
        start: Samples of this rank's order of ``epoch`` to leave out in the first pass (a mid-epoch resume).
    """

    def __init__(
        self, num_samples: int, seed: int, flip: bool = False, num_replicas: int = 1, rank: int = 0,
        epoch: int = 0, start: int = 0,
    ) -> None:
        self.num_samples_total = int(num_samples)
        self.seed = int(seed)
        self.flip = bool(flip)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.num_samples = -(-self.num_samples_total // self.num_replicas)  # per rank (ceil)
        self.total_size = self.num_samples * self.num_replicas
        self.epoch, self.start = 0, 0
        self.set_position(epoch, start)

    def order(self, epoch: int, begin: int = 0, end: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        end = self.num_samples if end is None else end
        positions = np.arange(begin, end, dtype=np.int64) * self.num_replicas + self.rank  # global positions
        indices = permute(positions % self.num_samples_total, self.num_samples_total,
                          _key(self.seed, epoch, _ORDER_SALT))
        return indices, self._flips(epoch, positions)


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
            raise ConfigurationError(f"identity pairs need an even batch_size >= 2, got {batch_size}")
        if not 0.0 < identity_fraction <= 1.0:
            raise ConfigurationError(f"identity_fraction must be in (0, 1], got {identity_fraction!r}")
        counts = index.counts
        self.pair_identities = np.flatnonzero(counts >= 2)
        if not len(self.pair_identities):
            raise DatasetError("identity pairs need identities with at least two images; every identity has one")
        self.index = index
        self.offsets = index.offsets
        self.num_images = index.num_images
        self.batch_size = int(batch_size)
        self.num_pairs = max(1, int(round(identity_fraction * batch_size / 2)))
        self.num_instances = self.batch_size - 2 * self.num_pairs
        self.seed, self.flip = int(seed), bool(flip)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.batches_per_epoch = max(1, self.num_images // (self.batch_size * self.num_replicas))
        self.num_samples = self.batches_per_epoch * self.batch_size
        self.total_size = self.num_samples * self.num_replicas
        self.epoch, self.start = 0, 0

    def epoch_batches(self, epoch: int, first: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Dataset indices ``int64[stop − first, B]`` of this rank's batches ``first .. stop − 1`` in ``epoch``."""
        stop = self.batches_per_epoch if stop is None else stop
        world = self.num_replicas
        local = np.arange(first, stop, dtype=np.int64)
        slots = epoch * self.batches_per_epoch * world + local * world + self.rank  # global batch numbers
        pair_pos = slots[:, None] * self.num_pairs + np.arange(self.num_pairs)
        identities = self.pair_identities[_stream(pair_pos.reshape(-1), len(self.pair_identities), self.seed,
                                                  _PAIR_SALT)].reshape(pair_pos.shape)
        start = self.offsets[identities]
        count = (self.offsets[identities + 1] - start).astype(np.uint64)
        draw = pair_pos.astype(np.uint64)
        first_pick = hashed(draw, _key(self.seed, _PICK_SALT, 0)) % count
        second_pick = (first_pick + np.uint64(1) + hashed(draw, _key(self.seed, _PICK_SALT, 1)) % (count - np.uint64(1))
                       ) % count
        pairs = np.stack([self.index.images(start + first_pick.astype(np.int64)),
                          self.index.images(start + second_pick.astype(np.int64))], axis=2)
        instance_pos = slots[:, None] * self.num_instances + np.arange(self.num_instances)
        instances = _stream(instance_pos.reshape(-1), self.num_images, self.seed,
                            _INSTANCE_SALT).reshape(instance_pos.shape)
        return np.concatenate([pairs.reshape(len(local), -1), instances], axis=1)

    def order(self, epoch: int, begin: int = 0, end: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        end = self.num_samples if end is None else end
        first, stop = begin // self.batch_size, -(-end // self.batch_size)
        skip = begin - first * self.batch_size
        indices = self.epoch_batches(epoch, first, stop).reshape(-1)[skip:skip + end - begin]
        if not self.flip:
            return indices, None
        local = np.arange(begin, end, dtype=np.int64)
        batch, column = local // self.batch_size, local % self.batch_size
        positions = (batch * self.num_replicas + self.rank) * self.batch_size + column  # global positions
        return indices, self._flips(epoch, positions)
