"""IdentityPairSampler (F2C's dual loader): batch layout, identity index of every data layout, purity in
(seed, epoch, position), ranks, mid-epoch resume."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fastface_pl.data import DatasetError, FaceDataModule
from fastface_pl.data.datasets import ImageFolderDataset, RecordDataset, SyntheticFaces
from fastface_pl.data.pack import pack_folder
from fastface_pl.data import samplers as samplers_module
from fastface_pl.data.samplers import (
    IdentityIndex, IdentityPairSampler, SeededRandomSampler, identity_index, permute, record_identity_index,
)

from conftest import write_image_folder


def labels_of(dataset) -> list[int]:
    return [dataset[i][1] for i in range(len(dataset))]


@pytest.mark.parametrize("layout", ["synthetic", "image_folder", "record"])
def test_identity_index_of_every_layout(tmp_path, layout):
    counts = [3, 1, 4, 2]
    if layout == "synthetic":
        dataset, counts = SyntheticFaces(4, 3, 8, 0), [3, 3, 3, 3]
    else:
        folder = write_image_folder(tmp_path / "folder", counts, size=8)
        if layout == "image_folder":
            dataset = ImageFolderDataset(folder, index_cache=str(tmp_path / "index.json"))
        else:
            pack_folder(folder, tmp_path / "pack", progress=False)
            dataset = RecordDataset(tmp_path / "pack")
    index = identity_index(dataset)
    assert index.counts.tolist() == counts
    labels = labels_of(dataset)
    for identity in range(len(index)):
        members = index.indices[index.offsets[identity]:index.offsets[identity + 1]]
        assert all(labels[i] == identity for i in members)


def sampler(seed=3, epoch=0, rank=0, replicas=1, flip=False, batch=8, fraction=0.5):
    index = IdentityIndex(np.repeat(np.arange(10), [5, 1, 4, 4, 2, 6, 3, 3, 5, 7]))
    s = IdentityPairSampler(index, batch, fraction, seed=seed, flip=flip, num_replicas=replicas, rank=rank)
    s.set_epoch(epoch)
    return s, np.repeat(np.arange(10), [5, 1, 4, 4, 2, 6, 3, 3, 5, 7])


def test_batches_start_with_pairs_of_distinct_images_of_one_identity():
    s, labels = sampler()
    batches = s.epoch_batches(0)
    assert batches.shape == (40 // 8, 8) and s.num_pairs == 2 and s.num_instances == 4
    for batch in batches.tolist():
        for a, b in zip(batch[0:4:2], batch[1:4:2]):
            assert labels[a] == labels[b] and a != b and labels[a] != 1  # identity 1 has one image
    assert len(list(iter(s))) == len(s) == 40


def test_order_is_a_pure_function_of_seed_epoch_and_position():
    first, _ = sampler(seed=3, epoch=2, flip=True)
    again, _ = sampler(seed=3, epoch=2, flip=True)
    assert list(first) == list(again)
    other_epoch, _ = sampler(seed=3, epoch=3, flip=True)
    other_seed, _ = sampler(seed=4, epoch=2, flip=True)
    assert list(other_epoch) != list(first) and list(other_seed) != list(first)
    flips = [flip for _, flip in first]
    assert 0 < sum(flips) < len(flips)


def test_instances_cover_the_images_evenly_across_epochs():
    s, _ = sampler(batch=8, fraction=0.25)  # 1 pair + 6 instances per batch, 5 batches per epoch
    seen = np.concatenate([s.epoch_batches(e)[:, 2:].reshape(-1) for e in range(4)])
    counts = np.bincount(seen, minlength=40)
    assert counts.max() - counts.min() <= 1  # 120 instance draws over 40 images: 3 each


def test_ranks_take_different_batches_of_the_same_global_order():
    single, _ = sampler(batch=4, replicas=1)
    rank0, _ = sampler(batch=4, replicas=2, rank=0)
    rank1, _ = sampler(batch=4, replicas=2, rank=1)
    assert len(rank0) == len(rank1) == 20
    merged = np.stack([rank0.epoch_batches(0), rank1.epoch_batches(0)], axis=1).reshape(-1, 4)
    assert np.array_equal(merged, single.epoch_batches(0))
    flips = [list(s_.order(0)[1]) for s_ in (sampler(batch=4, replicas=2, rank=r, flip=True)[0] for r in (0, 1))]
    whole = sampler(batch=4, flip=True)[0].order(0)[1].reshape(-1, 4)
    assert np.array_equal(np.stack([np.reshape(f, (-1, 4)) for f in flips], axis=1).reshape(-1, 4), whole)


def test_set_position_resumes_mid_epoch_for_one_pass():
    s, _ = sampler(flip=True, epoch=1)
    whole = list(s)
    s.set_position(1, 16)
    s.set_epoch(1)  # Lightning calls set_epoch after creating the iterator: the same epoch keeps the position
    assert list(s) == whole[16:]
    assert list(s) == whole
    s.set_position(1, 16)
    s.set_epoch(2)  # a new epoch starts at its beginning
    assert list(s)[:16] != whole[16:32]
    with pytest.raises(ValueError, match="start must be in"):
        s.set_position(1, len(s) + 1)


def test_invalid_arguments():
    index = IdentityIndex(np.array([0, 1, 2]))
    with pytest.raises(DatasetError, match="at least two images"):
        IdentityPairSampler(index, 4)
    with pytest.raises(ValueError, match="even batch_size"):
        IdentityPairSampler(IdentityIndex(np.array([0, 0])), 3)


def test_datamodule_resume_mid_epoch_with_pairs():
    options = dict(batch_size=4, num_workers=0, seed=9, identity_fraction=0.5,
                   synthetic={"num_identities": 6, "images_per_identity": 4, "image_size": 16, "num_val_pairs": 10})
    dm = FaceDataModule("synthetic", **options)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, IdentityPairSampler)
    loader.sampler.set_epoch(1)
    uninterrupted = [labels.tolist() for _, labels in loader]
    assert len(uninterrupted) == 6 and all(b[0] == b[1] for b in uninterrupted)
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), current_epoch=1, fit_loop=SimpleNamespace(
        epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(processed=2),
                                                                  is_last_batch=False))))
    resumed = FaceDataModule("synthetic", **options)
    resumed.load_state_dict(dm.state_dict())
    loader = resumed.train_dataloader()
    loader.sampler.set_epoch(1)
    assert [labels.tolist() for _, labels in loader] == uninterrupted[2:]


@pytest.mark.slow
def test_datamodule_resume_mid_epoch_with_pairs_and_workers():
    """With workers the iterator draws its first batches when it is created, before Lightning's set_epoch: the
    pair sampler must already stand at the checkpoint's position then (as the plain sampler does)."""
    options = dict(batch_size=4, num_workers=2, persistent_workers=True, seed=9, identity_fraction=0.5,
                   synthetic={"num_identities": 6, "images_per_identity": 4, "image_size": 16, "num_val_pairs": 10})
    dm = FaceDataModule("synthetic", **options)
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), current_epoch=1, world_size=1, global_rank=0,
                                 fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                                     batch_progress=SimpleNamespace(current=SimpleNamespace(processed=2),
                                                                    is_last_batch=False))))
    uninterrupted = [labels.tolist() for _, labels in dm.train_dataloader()]  # epoch 1 from its start
    resumed = FaceDataModule("synthetic", **options)
    resumed.load_state_dict(dm.state_dict())
    loader = resumed.train_dataloader()
    iterator = iter(loader)  # Lightning's order: the iterator first (workers prefetch), then set_epoch
    loader.sampler.set_epoch(1)
    assert [labels.tolist() for _, labels in iterator] == uninterrupted[2:]


# ------------------------------------------------------------------ chunked orders
@pytest.mark.parametrize("size", [1, 2, 3, 5, 16, 17, 1000, 65_537])
def test_permute_is_a_bijection_for_any_size_and_chunking(size):
    values = np.arange(size)
    whole = permute(values, size, key=12345)
    assert sorted(whole.tolist()) == list(range(size))
    parts = np.concatenate([permute(values[i:i + 7], size, key=12345) for i in range(0, size, 7)])
    assert np.array_equal(parts, whole)
    if size > 16:
        assert not np.array_equal(whole, permute(values, size, key=54321))
        assert not np.array_equal(whole, values)


@pytest.mark.parametrize("kind", ["plain", "pairs"])
def test_chunked_iteration_equals_the_whole_epoch_order(monkeypatch, kind):
    """Iterating computes the order CHUNK positions at a time: any chunk size and any start give the same items
    as the order of the whole epoch computed at once."""
    def make():
        if kind == "plain":
            return SeededRandomSampler(103, seed=4, flip=True, num_replicas=3, rank=1)
        return sampler(seed=4, flip=True, batch=6, replicas=2, rank=1)[0]

    whole_indices, whole_flips = make().order(2)
    whole = list(zip(whole_indices.tolist(), whole_flips.tolist()))
    for chunk in (1, 5, 6, 7, 1 << 16):
        monkeypatch.setattr(samplers_module, "CHUNK", chunk)
        for start in (0, 1, 5, 13):
            s = make()
            s.set_position(2, start)
            assert list(s) == whole[start:], (chunk, start)


def test_plain_epoch_is_a_permutation_padded_by_wrapping():
    ranks = [SeededRandomSampler(10, seed=1, num_replicas=4, rank=r) for r in range(4)]
    orders = np.stack([s.order(0)[0] for s in ranks], axis=1).reshape(-1)  # global positions 0..11
    assert sorted(orders[:10].tolist()) == list(range(10))
    assert np.array_equal(orders[10:], orders[:2])  # padding repeats the start, as DistributedSampler does


def test_identity_index_of_grouped_labels_needs_no_sort():
    labels = np.repeat(np.arange(4), [2, 3, 1, 2])
    index = IdentityIndex(labels)
    assert index._indices is None and index.indices.tolist() == list(range(8))
    shuffled = IdentityIndex(np.array([1, 0, 1, 2, 0]))
    assert shuffled.indices.tolist() == [1, 4, 0, 2, 3] and shuffled.offsets.tolist() == [0, 2, 4, 5]


def test_record_identity_index_is_cached_beside_the_pack_and_rebuilt_when_the_pack_changes(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "folder", [3, 1, 4, 2], size=8)
    pack_folder(folder, tmp_path / "pack", progress=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    dataset = RecordDataset(tmp_path / "pack")
    built, where = record_identity_index(dataset)
    assert where == Path(str(dataset.record_file.rec_path) + samplers_module.IDENTITY_CACHE_SUFFIX)
    assert where.is_file() and not list(where.parent.glob("*.tmp*"))
    calls = []
    monkeypatch.setattr(samplers_module, "_record_labels", lambda d: calls.append(d) or np.zeros(len(d), int))
    cached, again = record_identity_index(RecordDataset(tmp_path / "pack"))
    assert again == where and not calls  # read from the cache, nothing scanned
    assert np.array_equal(cached.offsets, built.offsets) and np.array_equal(cached.indices, built.indices)
    idx = Path(dataset.record_file.idx_path)
    stat = idx.stat()
    import os
    os.utime(idx, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # the pack changed
    record_identity_index(RecordDataset(tmp_path / "pack"))
    assert len(calls) == 1


def test_record_identity_index_goes_to_the_user_cache_when_the_pack_folder_is_read_only(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "folder", [2, 2], size=8)
    pack_folder(folder, tmp_path / "pack", progress=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    dataset = RecordDataset(tmp_path / "pack")
    beside = Path(str(dataset.record_file.rec_path) + samplers_module.IDENTITY_CACHE_SUFFIX)
    real_replace = os.replace

    def refuse_beside(src, dst):
        if Path(dst) == beside:
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_beside)  # the rename of the atomic write
    index, where = record_identity_index(dataset)
    assert where is not None and where.parent == tmp_path / "user_cache" / "fastface_pl"
    assert not beside.exists() and not list(beside.parent.glob("*.tmp*"))
    assert index.counts.tolist() == [2, 2]
