"""An interrupted run resumed from any checkpoint ends with the same weights as an uninterrupted one, whatever
``num_workers`` and ``persistent_workers`` say: real files (an image folder of JPEGs, a record pack), a real
``Trainer`` with the checkpoints ``python -m fastface_pl.train`` writes (mid-epoch step checkpoints, the last
batch of an epoch, epoch-end checkpoints after validation), a tiny linear model so each fit takes seconds.

A DataLoader with workers draws the indices of its first batches as soon as its iterator is created, and
Lightning creates the iterator of a resumed epoch before it calls ``set_epoch``: these tests fail when the
sampler does not already know the epoch and position of the resume at that moment.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fastface_pl.data import FaceDataModule, write_bin
from fastface_pl.data.pack import pack_folder
from conftest import write_face_folder

pytestmark = pytest.mark.slow

SIZE = 16
IDENTITIES = 5
PER_IDENTITY = 6  # 30 images, batch 4, drop_last: 7 batches (steps) per epoch
BATCH = 4
EPOCHS = 2
STEPS_PER_EPOCH = IDENTITIES * PER_IDENTITY // BATCH


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """``faces/<id>/<n>.jpg`` (``lfw.bin`` one level up) and the same images packed into ``pack/train.rec``."""
    base = tmp_path_factory.mktemp("resume_workers")
    faces = base / "webface" / "faces"
    generator = write_face_folder(faces, IDENTITIES, PER_IDENTITY, size=SIZE, seed=5, noise=6.0)
    pairs = [generator.render(k % IDENTITIES, 50 + k) for k in range(8)]
    write_bin(faces.parent / "lfw.bin", pairs, [True, False, True, False])
    pack_folder(faces, base / "pack", progress=False)
    write_bin(base / "pack" / "lfw.bin", pairs, [True, False, True, False])
    return {"image_folder": faces, "record": base / "pack"}


class TinyFaceModel(pl.LightningModule):
    """A linear classifier with momentum SGD: its weights depend on every batch and on their order."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3 * SIZE * SIZE, num_classes)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.net(images.flatten(1)), labels)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        images_a, images_b, _ = batch
        self.log("val_similarity", torch.cosine_similarity(self.net(images_a.flatten(1)),
                                                           self.net(images_b.flatten(1))).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _fit(root: Path, run_dir: Path, workers: int, persistent: bool, ckpt_path: Path | None = None,
         validate: bool = True) -> TinyFaceModel:
    pl.seed_everything(0, verbose=False)
    dm = FaceDataModule(str(root), batch_size=BATCH, num_workers=workers, persistent_workers=persistent,
                        val_sets=["lfw"] if validate else [], seed=17)
    model = TinyFaceModel(dm.num_classes)
    checkpoints = [  # as train.py: one per epoch end (after validation, if any), and every few steps
        ModelCheckpoint(dirpath=run_dir, filename="epoch{epoch:02d}", auto_insert_metric_name=False, save_top_k=-1),
        ModelCheckpoint(dirpath=run_dir, filename="step{step:03d}", auto_insert_metric_name=False,
                        every_n_train_steps=1, save_top_k=-1),
    ]
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, callbacks=checkpoints,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=run_dir)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH, f"the run ended after {trainer.global_step} steps"
    return model


def _largest_difference(model: TinyFaceModel, reference: TinyFaceModel) -> float:
    return max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(),
                                                          reference.state_dict().values(), strict=True))


# where a run can be interrupted: mid-epoch, the last batch of an epoch, an epoch end (after validation)
RESUME_POINTS = {
    "mid_epoch": f"step{STEPS_PER_EPOCH + 3:03d}.ckpt",
    "last_batch": f"step{STEPS_PER_EPOCH:03d}.ckpt",
    "epoch_end": "epoch00.ckpt",
}


@pytest.mark.parametrize("layout", ["image_folder", "record"])
@pytest.mark.parametrize("persistent", [False, True], ids=["transient_workers", "persistent_workers"])
def test_resume_with_workers_ends_with_the_uninterrupted_weights(data, tmp_path, layout, persistent, recwarn):
    reference = _fit(data[layout], tmp_path / "full", workers=2, persistent=persistent)
    differences = {}
    for point, name in RESUME_POINTS.items():
        checkpoint = tmp_path / "full" / name
        assert checkpoint.is_file(), sorted(p.name for p in (tmp_path / "full").iterdir())
        resumed = _fit(data[layout], tmp_path / point, workers=2, persistent=persistent, ckpt_path=checkpoint)
        differences[f"{point} ({name})"] = _largest_difference(resumed, reference)
    assert all(d <= 1e-6 for d in differences.values()), f"largest weight difference to the uninterrupted run, " \
        f"per resume point: {differences}"
    # the loader declares itself resumable, so Lightning does not warn that a mid-epoch resume is unreliable
    assert not [w for w in recwarn if "dataloader is not resumable" in str(w.message)]


def test_resume_without_validation(data, tmp_path):
    """Without validation the epoch checkpoint is written in ``on_train_epoch_end``, not after validation."""
    reference = _fit(data["record"], tmp_path / "full", workers=2, persistent=True, validate=False)
    for point in ("last_batch", "epoch_end"):
        resumed = _fit(data["record"], tmp_path / point, workers=2, persistent=True, validate=False,
                       ckpt_path=tmp_path / "full" / RESUME_POINTS[point])
        assert _largest_difference(resumed, reference) <= 1e-6, point


def test_worker_count_does_not_change_the_run(data, tmp_path):
    """The order and flips depend on (seed, epoch, position) only: 0 and 2 workers train the same weights."""
    without = _fit(data["record"], tmp_path / "w0", workers=0, persistent=False)
    with_workers = _fit(data["record"], tmp_path / "w2", workers=2, persistent=True)
    assert _largest_difference(with_workers, without) <= 1e-6
