"""FaceDataModule: layout detection, validation errors, batches, seeded shuffling, corrupt-sample counting."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from fastface_pl.data import DatasetError, FaceDataModule, RecordWriter, detect_layout, write_bin
from fastface_pl.data.datamodule import SeededRandomSampler
from fastface_pl.data.pack import pack_folder
from fastface_pl.data.recordio import pack_header
from conftest import write_image_folder

SMALL_SYNTHETIC = {"num_identities": 6, "images_per_identity": 4, "image_size": 16, "num_val_pairs": 10}


def jpeg(colour=(128, 64, 32), size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def make_pack(tmp_path: Path, bins=("lfw", "cfp_fp")) -> Path:
    folder = write_image_folder(tmp_path / "folder", [4] * 3, smooth=True)
    pack_folder(folder, tmp_path / "pack", progress=False)
    for name in bins:
        write_bin(tmp_path / "pack" / f"{name}.bin", [jpeg()] * 6, [True, False, True])
    return tmp_path / "pack"


def test_layout_detection(tmp_path):
    pack = make_pack(tmp_path)
    assert detect_layout("synthetic") == "synthetic"
    assert detect_layout(pack) == "record"
    assert detect_layout(pack / "train.rec") == "record"
    assert detect_layout(tmp_path / "folder") == "image_folder"


def test_missing_and_unrecognised_paths_say_what_is_accepted(tmp_path):
    with pytest.raises(DatasetError) as info:
        FaceDataModule(str(tmp_path / "nowhere")).setup("fit")
    assert "nowhere does not exist" in str(info.value) and "train.rec + train.idx" in str(info.value)
    odd = tmp_path / "odd"
    (odd / "sub").mkdir(parents=True)
    (odd / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError) as info:
        detect_layout(odd)
    message = str(info.value)
    assert "no recognised dataset layout" in message and "notes.txt" in message and "sub/" in message
    assert "'synthetic'" in message and "<root>/<identity>/<image>.jpg" in message
    (odd / "train.rec").write_bytes(b"")
    with pytest.raises(DatasetError, match="holds train.rec but no train.idx"):
        detect_layout(odd)


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        FaceDataModule("synthetic", batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be an int >= 0, got -1"):
        FaceDataModule("synthetic", num_workers=-1)
    with pytest.raises(ValueError, match=r"synthetic has unknown keys \['identities'\]"):
        FaceDataModule("synthetic", synthetic={"identities": 3})
    with pytest.raises(ValueError, match="val_sets must be a list"):
        FaceDataModule("synthetic", val_sets="lfw")


def test_num_classes_mismatch(tmp_path):
    pack = make_pack(tmp_path)
    assert FaceDataModule(str(pack), num_classes=3).num_classes == 3
    with pytest.raises(DatasetError, match=r"3 identity records but num_classes=5.*set num_classes to 3"):
        FaceDataModule(str(pack), num_classes=5).setup("fit")
    with pytest.raises(DatasetError, match=r"num_classes=4 was given but .*folder holds 3 identities"):
        FaceDataModule(str(tmp_path / "folder"), num_classes=4, val_sets=[]).setup("fit")
    with pytest.raises(DatasetError, match="holds 6 identities"):
        FaceDataModule("synthetic", num_classes=7, synthetic=SMALL_SYNTHETIC).setup("fit")


def test_label_out_of_range_is_caught_before_training(tmp_path):
    with RecordWriter(tmp_path / "train.rec") as writer:
        writer.write(0, pack_header((4.0, 6.0)))
        for key, label in ((1, 0.0), (2, 1.0), (3, 9.0)):
            writer.write(key, pack_header(label, id=key) + jpeg())
        writer.write(4, pack_header((1.0, 2.0)))
        writer.write(5, pack_header((2.0, 4.0)))
    dm = FaceDataModule(str(tmp_path), val_sets=[], batch_size=2)
    with pytest.raises(DatasetError) as info:
        dm.setup("fit")
    assert "key 3" in str(info.value) and "label 9 is outside [0, 2)" in str(info.value)


def test_missing_val_set_names_the_file(tmp_path):
    pack = make_pack(tmp_path, bins=("lfw",))
    dm = FaceDataModule(str(pack), val_sets=["lfw", "agedb_30"])
    with pytest.raises(DatasetError) as info:
        dm.setup("fit")
    assert "agedb_30.bin" in str(info.value) and "Available .bin files" in str(info.value) and "['lfw']" in str(
        info.value
    )
    assert FaceDataModule(str(pack), val_sets=[]).val_dataloader() == []


def test_record_train_and_val_batches(tmp_path):
    pack = make_pack(tmp_path)
    dm = FaceDataModule(str(pack), batch_size=4, num_workers=0, val_sets=["lfw", str(pack / "cfp_fp.bin")])
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.num_images == 12 and dm.val_set_names == ["lfw", "cfp_fp"]
    loader = dm.train_dataloader()
    assert loader.pin_memory is torch.cuda.is_available() and not loader.persistent_workers
    batches = list(loader)
    assert len(batches) == 3
    images, labels = batches[0]
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.2 and images.max() > 0.2
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    val = dm.val_dataloader()
    assert len(val) == 2
    a, b, issame = next(iter(val[0]))
    assert a.shape == b.shape == (3, 3, 16, 16) and issame.tolist() == [True, False, True]
    assert torch.allclose(a[0, 0], torch.full((16, 16), 128 / 127.5 - 1), atol=0.05)  # normalised, no flip


def test_synthetic_batches(tmp_path):
    dm = FaceDataModule("synthetic", batch_size=8, num_workers=0, synthetic=SMALL_SYNTHETIC)
    dm.setup("fit")
    assert dm.num_classes == 6 and dm.num_images == 24 and dm.val_set_names == ["synthetic"]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and labels.max() < 6
    (val,) = dm.val_dataloader()
    a, b, issame = next(iter(val))
    assert a.shape == (8, 3, 16, 16) and issame.dtype == torch.bool and issame.sum() == 4


def label_order(seed: int, epoch: int = 0) -> list[int]:
    dm = FaceDataModule("synthetic", batch_size=4, num_workers=0, seed=seed, flip=False, synthetic=SMALL_SYNTHETIC)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return torch.cat([labels for _, labels in loader]).tolist()


def test_seeded_shuffling_is_reproducible():
    first = label_order(seed=11)
    assert first == label_order(seed=11)
    assert first != label_order(seed=12)
    assert first != label_order(seed=11, epoch=1)  # a new order each epoch ...
    assert label_order(seed=11, epoch=1) == label_order(seed=11, epoch=1)  # ... also reproducible
    assert sorted(first) == sorted(label_order(seed=12))
    assert list(SeededRandomSampler(5, 0)) == list(SeededRandomSampler(5, 0))


def test_distributed_ranks_share_the_seeded_permutation():
    indices = []
    for rank in (0, 1):
        dm = FaceDataModule("synthetic", batch_size=4, num_workers=0, seed=5, synthetic=SMALL_SYNTHETIC)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0)
        sampler = dm.train_dataloader().sampler
        assert isinstance(sampler, DistributedSampler) and sampler.seed == 5
        indices.append([index for index, _ in sampler])  # (index, flip) pairs: flip is on by default
    assert len(indices[0]) == len(indices[1]) == 12
    assert sorted(indices[0] + indices[1]) == list(range(24))  # disjoint shards covering the data


def test_skip_corrupt_counts_across_workers(tmp_path):
    folder = write_image_folder(tmp_path / "faces", [4] * 2, smooth=True)
    (folder / "id01" / "002.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    strict = FaceDataModule(str(folder), batch_size=4, num_workers=0, val_sets=[])
    with pytest.raises(DatasetError, match=r"id01/002\.jpg: cannot decode image"):
        list(strict.train_dataloader())
    dm = FaceDataModule(str(folder), batch_size=4, num_workers=2, val_sets=[], skip_corrupt=True,
                        persistent_workers=False)
    loader = dm.train_dataloader()
    assert loader.num_workers == 2
    images = torch.cat([batch[0] for batch in loader])
    assert images.shape[0] == 8 and dm.num_skipped == 1  # counted in a worker, seen here


class TinyModule(pl.LightningModule):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3 * 16 * 16, num_classes)
        self.seen_val_sets: set[int] = set()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.net(images.flatten(1)), labels)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        images_a, images_b, issame = batch
        self.seen_val_sets.add(dataloader_idx)
        assert images_a.shape == images_b.shape and issame.dtype == torch.bool

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fits_with_a_lightning_trainer(tmp_path):
    pack = make_pack(tmp_path)
    dm = FaceDataModule(str(pack), batch_size=4, num_workers=0, val_sets=["lfw", "cfp_fp"])
    model = TinyModule(dm.num_classes)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and model.seen_val_sets == {0, 1}


def test_image_folder_finds_val_sets_beside_or_above(tmp_path):
    folder = write_image_folder(tmp_path / "webface", [2] * 2, smooth=True)
    write_bin(tmp_path / "lfw.bin", [jpeg()] * 4, [True, False])  # one level up, next to the folder
    dm = FaceDataModule(str(folder), batch_size=2, num_workers=0, val_sets=["lfw"])
    dm.setup("fit")
    (loader,) = dm.val_dataloader()
    assert len(loader.dataset) == 2 and dm.val_set_names == ["lfw"]
    with pytest.raises(DatasetError, match=r"cfp_fp\.bin or .*cfp_fp\.bin.*\['lfw'\]"):
        FaceDataModule(str(folder), val_sets=["cfp_fp"]).setup("fit")


def test_flips_are_drawn_per_position_from_the_seed():
    """The flip of each position depends on (seed, epoch, position) only: the same for any rank split."""
    whole = list(SeededRandomSampler(24, seed=3, flip=True))
    halves = [list(SeededRandomSampler(24, seed=3, flip=True, num_replicas=2, rank=r)) for r in (0, 1)]
    assert halves[0] == whole[0::2] and halves[1] == whole[1::2]
    flips = [f for _, f in whole]
    assert 0 < sum(flips) < 24  # both outcomes occur
    other_epoch = SeededRandomSampler(24, seed=3, flip=True)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != whole


def test_flipped_samples_are_mirror_images():
    dm = FaceDataModule("synthetic", batch_size=24, num_workers=0, seed=1, synthetic=SMALL_SYNTHETIC)
    plain = FaceDataModule("synthetic", batch_size=24, num_workers=0, seed=1, flip=False, synthetic=SMALL_SYNTHETIC)
    order = list(dm.train_dataloader().sampler)
    (images, labels), = list(dm.train_dataloader())
    (reference, reference_labels), = list(plain.train_dataloader())
    assert torch.equal(labels, reference_labels)  # the same order with and without flips
    for k, (_, flip) in enumerate(order):
        expected = reference[k].flip(-1) if flip else reference[k]
        assert torch.equal(images[k], expected)


def test_resume_mid_epoch_continues_the_same_order():
    """A checkpoint taken after 2 of 6 batches of epoch 1 resumes with batches 3..6 of that same epoch."""
    dm = FaceDataModule("synthetic", batch_size=4, num_workers=0, seed=9, synthetic=SMALL_SYNTHETIC)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    uninterrupted = [labels.tolist() for _, labels in loader]
    assert len(uninterrupted) == 6
    dm.trainer = _fitting_trainer(epoch=1, batches_done=2, last_batch=False)
    state = dm.state_dict()
    assert state["epoch"] == 1 and state["batches_done"] == 2 and state["epoch_finished"] is False

    resumed = FaceDataModule("synthetic", batch_size=4, num_workers=0, seed=9, synthetic=SMALL_SYNTHETIC)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    assert (loader.sampler.epoch, loader.sampler.start) == (1, 8)  # at the position before any set_epoch
    loader.sampler.set_epoch(1)  # Lightning's call for the same epoch keeps the position
    assert [labels.tolist() for _, labels in loader] == uninterrupted[2:]
    loader.sampler.set_epoch(1)  # the skip applies once: a later pass over epoch 1 is whole again
    assert len(list(loader)) == 6


def _fitting_trainer(epoch: int, batches_done: int, last_batch: bool) -> SimpleNamespace:
    """What FaceDataModule.state_dict reads of a Trainer inside ``fit`` (training or validating)."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=batches_done), is_last_batch=last_batch)
    return SimpleNamespace(state=SimpleNamespace(fn="fit"), current_epoch=epoch, world_size=1, global_rank=0,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


@pytest.mark.parametrize("state, position", [
    ({"epoch": 1, "batches_done": 2, "epoch_finished": False}, (1, 8)),  # mid-epoch
    ({"epoch": 1, "batches_done": 6, "epoch_finished": True}, (2, 0)),  # after the last batch / at the epoch end
    ({"epoch": 1, "batches_done": 3, "epoch_finished": True}, (2, 0)),  # an epoch cut by limit_train_batches
    ({"epoch": 1, "batches_done": 6}, (2, 0)),  # a checkpoint without the flag: a whole epoch is finished
    ({"epoch": 1, "batches_done": 5}, (1, 20)),
    ({"seed": 9, "num_skipped": 0}, (0, 0)),  # saved outside fit: no position
])
def test_a_resume_positions_the_sampler_before_the_loader_is_iterated(state, position):
    dm = FaceDataModule("synthetic", batch_size=4, num_workers=0, seed=9, synthetic=SMALL_SYNTHETIC)
    dm.load_state_dict(state)
    sampler = dm.train_dataloader().sampler
    assert (sampler.epoch, sampler.start) == position
    assert (dm.train_dataloader().sampler.start) == 0  # the resume position is used once


def test_workers_draw_the_resumed_epoch_when_set_epoch_comes_late():
    """A loader with workers draws its first indices when its iterator is created, before Lightning's set_epoch."""
    dm = FaceDataModule("synthetic", batch_size=4, num_workers=0, seed=9, synthetic=SMALL_SYNTHETIC)
    dm.trainer = _fitting_trainer(epoch=3, batches_done=1, last_batch=False)
    state = dm.state_dict()
    reference = dm.train_dataloader()
    reference.sampler.set_epoch(3)
    expected = [labels.tolist() for _, labels in reference][1:]

    resumed = FaceDataModule("synthetic", batch_size=4, num_workers=2, persistent_workers=False, seed=9,
                             synthetic=SMALL_SYNTHETIC)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    iterator = iter(loader)  # the workers get their first indices now
    loader.sampler.set_epoch(3)  # as Lightning's fit loop does, after creating the iterator
    assert [labels.tolist() for _, labels in iterator] == expected


@pytest.mark.parametrize("damage", ["magic", "jpeg"])
def test_corrupt_record_in_a_worker_keeps_its_type_and_location(tmp_path, damage):
    """DataLoader workers re-raise ``type(error)(message)``: the error classes must build from a message alone."""
    from fastface_pl.data import CorruptImageError, CorruptRecordError, RecordFile

    pack = make_pack(tmp_path, bins=())
    offset = RecordFile(pack / "train.rec").offset(5)
    with open(pack / "train.rec", "r+b") as handle:
        handle.seek(offset if damage == "magic" else offset + 8 + 24)
        handle.write(b"\x00\x11\x22\x33")
    dm = FaceDataModule(str(pack), batch_size=12, num_workers=1, persistent_workers=True, val_sets=[], flip=False)
    dm.train_dataset = dm._build_train_dataset()  # skip validate(): the damage must be met in the worker
    expected = CorruptRecordError if damage == "magic" else CorruptImageError
    with pytest.raises(expected) as info:
        list(dm.train_dataloader())
    assert "key 5 " in str(info.value) and f"byte offset {offset}" in str(info.value)
    assert "DataLoader worker" in str(info.value)


def test_indexed_flip_over_a_subset_applies_the_sampler_flips():
    """A wrapped dataset's ``__getitems__`` (Subset has one) must not receive the sampler's ``(index, flip)``."""
    from torch.utils.data import DataLoader, Subset

    from fastface_pl.data import SyntheticFaces
    from fastface_pl.data.datamodule import IndexedFlip

    faces = SyntheticFaces(4, 2, 16, seed=0)
    subset = Subset(faces, [6, 7, 0, 1])
    sampler = SeededRandomSampler(4, seed=0, flip=True)
    images, labels = next(iter(DataLoader(IndexedFlip(subset), batch_size=4, sampler=sampler)))
    for (index, flip), image, label in zip(list(iter(sampler)), images, labels):
        expected = faces[[6, 7, 0, 1][index]][0]
        assert torch.equal(image, expected.flip(-1) if flip else expected) and label == [3, 3, 0, 0][index]


def test_validation_shards_are_contiguous_and_cover_each_pair_once():
    """Under DDP each rank validates one contiguous block; concatenated in rank order they are the file order."""
    from fastface_pl.data.datamodule import ContiguousShardSampler

    for size, ranks in ((40, 2), (41, 3), (5, 4)):
        shards = [list(ContiguousShardSampler(size, ranks, r)) for r in range(ranks)]
        assert sum(shards, []) == list(range(size))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    dm = FaceDataModule("synthetic", batch_size=8, num_workers=0, synthetic=SMALL_SYNTHETIC)
    dm.setup("validate")
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    (loader,) = dm.val_dataloader()
    assert isinstance(loader.sampler, DistributedSampler)  # so Lightning keeps it instead of padding/interleaving
    n = len(dm.val_datasets[0])
    assert list(loader.sampler) == list(range(n // 2, n))


def test_found_class_count_is_recorded_in_the_hyperparameters():
    """num_classes=None takes the data's count and records it, so checkpoints and logged hparams carry it."""
    dm = FaceDataModule("synthetic", batch_size=8, num_workers=0, synthetic=SMALL_SYNTHETIC)
    assert dm.hparams_initial["num_classes"] is None
    dm.setup("fit")
    assert dm.hparams_initial["num_classes"] == dm.hparams["num_classes"] == dm.num_classes == 6
    assert dm.hparams_initial["batch_size"] == 8  # the other arguments are kept


def test_dataloader_workers_survive_a_terminal_ctrl_c():
    """A terminal's Ctrl+C reaches every process of the group, workers included. They must keep serving batches
    so that the main process can finish the step and save it (fastface_pl.safety.PreemptionCheckpoint), also when
    it arrives while they are still starting: SIGINT is sent at once after the workers are created (before their
    own start-up code ran, in most repetitions) and again after the first batch, 50 times over."""
    import signal

    dm = FaceDataModule("synthetic", batch_size=2, num_workers=2, persistent_workers=True, seed=1,
                        synthetic={"num_identities": 4, "images_per_identity": 4, "image_size": 8,
                                   "num_val_pairs": 4})
    for repetition in range(50):
        loader = dm.train_dataloader()
        iterator = iter(loader)  # the workers are started here
        workers = iterator._workers
        try:
            for worker in workers:
                os.kill(worker.pid, signal.SIGINT)
            next(iterator)
            for worker in workers:
                os.kill(worker.pid, signal.SIGINT)
            # each worker still has batches to make after the second signal, so both signals were delivered
            assert len(list(iterator)) == len(loader) - 1, f"repetition {repetition}"
            assert all(worker.is_alive() for worker in workers), f"repetition {repetition}"
        finally:
            iterator._shutdown_workers()


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_ctrl_c_while_workers_start_spares_them_and_still_reaches_the_main_process(monkeypatch, start_method):
    """SIGINT sent to the whole group at the moment the workers are started: the workers (forked or spawned)
    survive it, and the main process's own handler still receives it, once."""
    import signal

    from torch.utils.data import DataLoader, TensorDataset

    from fastface_pl.data.datamodule import WorkerSafeDataLoader, ignore_sigint_in_worker

    received = []
    start_workers = DataLoader._get_iterator

    def start_with_ctrl_c(loader):
        os.kill(os.getpid(), signal.SIGINT)  # the main process, while it starts the workers
        iterator = start_workers(loader)
        for worker in iterator._workers:
            os.kill(worker.pid, signal.SIGINT)
        return iterator

    monkeypatch.setattr(DataLoader, "_get_iterator", start_with_ctrl_c)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        loader = WorkerSafeDataLoader(TensorDataset(torch.arange(8)), batch_size=2, num_workers=1,
                                      worker_init_fn=ignore_sigint_in_worker, multiprocessing_context=start_method)
        iterator = iter(loader)
        assert received == [signal.SIGINT]
        assert len(list(iterator)) == 4 and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
