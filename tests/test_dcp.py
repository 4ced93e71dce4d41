"""F2C's Dynamic Class Pool: LRU maths against a plain-Python model, the loss, rollback, and the module's
classifier="dcp" (gallery EMA, checkpoints, exact mid-epoch resume, mixed precision)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from fastface_pl.data.datamodule import FaceDataModule
from fastface_pl.models.dcp import DynamicClassPool, default_pool_size, default_push_topk
from fastface_pl.models.margins import build_margin
from fastface_pl.models.module import FaceRecognitionModule

SYNTHETIC = {"num_identities": 12, "images_per_identity": 6, "image_size": 16, "num_val_pairs": 20, "seed": 0}


class PythonLRU:
    """Plain-Python model of the pool's bookkeeping: the batch's new identities, in ascending order, each take
    the least recently used entry (empty ones first, then the lowest entry index) not held by an identity of the
    same batch; then the images are written one at a time, each to its entry's next row (rows alternate); a
    batch's identities share one timestamp."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.owner: list[int | None] = [None] * size
        self.last = [-1] * size
        self.next_row = [0] * size
        self.filled = [0] * size
        self.rows: dict[tuple[int, int], tuple[int, int]] = {}  # (row, entry) -> (step, index of the feature)
        self.clock = 0

    def write(self, labels: list[int], feature_ids: list[int]) -> None:
        batch = set(labels)
        for label in sorted(batch - set(self.owner)):
            free = [e for e in range(self.size) if self.owner[e] not in batch]
            entry = min(free, key=lambda e: (self.last[e], e))
            self.owner[entry], self.next_row[entry], self.filled[entry] = label, 0, 0
        for label, feature in zip(labels, feature_ids):
            entry = self.owner.index(label)
            self.rows[(self.next_row[entry], entry)] = (self.clock, feature)
            self.next_row[entry] = 1 - self.next_row[entry]
            self.filled[entry] = min(2, self.filled[entry] + 1)
            self.last[entry] = self.clock
        self.clock += 1


def test_lru_matches_a_sequential_python_model():
    torch.manual_seed(0)
    pool = DynamicClassPool(4, num_classes=15, pool_size=7, margin="cosface")
    model = PythonLRU(7)
    for step in range(40):
        labels = torch.randint(0, 15, (5,))
        features = torch.randn(5, 4)
        pool.write(labels, features)
        model.write(labels.tolist(), list(range(5)))
        assert pool.entry_identity.tolist() == [-1 if o is None else o for o in model.owner]
        for label in range(15):
            expected = model.owner.index(label) if label in model.owner else -1
            assert pool.identity_entry[label].item() == expected
        assert pool.entry_next_row.tolist() == model.next_row
        assert pool.entry_rows_filled.tolist() == model.filled
        for (row, entry), (written_at, feature) in model.rows.items():
            if written_at == model.clock - 1:  # written in this step: compare the feature itself
                assert torch.allclose(pool.features[row, entry], F.normalize(features[feature], dim=0))


def test_lru_evicts_the_least_recently_used_identity():
    pool = DynamicClassPool(2, num_classes=10, pool_size=3)
    pool.write(torch.tensor([0, 1, 2]), torch.randn(3, 2))
    pool.write(torch.tensor([3]), torch.randn(1, 2))       # evicts 0: the oldest, lowest entry
    assert pool.lookup(torch.arange(4)).tolist() == [-1, 1, 2, 0]
    pool.write(torch.tensor([1]), torch.randn(1, 2))       # 1 becomes the most recent
    pool.write(torch.tensor([4]), torch.randn(1, 2))       # evicts 2 (used at step 0)
    assert pool.lookup(torch.tensor([1, 2, 3, 4])).tolist() == [1, -1, 0, 2]
    assert pool.entry_rows_filled.tolist() == [1, 2, 1]    # entry 1 was written twice (rows 0 and 1)


def test_repeated_identity_keeps_its_last_two_features():
    pool = DynamicClassPool(3, num_classes=5, pool_size=4)
    features = torch.eye(3)
    pool.write(torch.tensor([2, 2, 2]), features)
    entry = pool.lookup(torch.tensor([2])).item()
    assert torch.equal(pool.features[0, entry], features[2]) and torch.equal(pool.features[1, entry], features[1])
    assert pool.entry_next_row[entry].item() == 1


def test_rollback_restores_pool_and_lru_exactly():
    torch.manual_seed(1)
    pool = DynamicClassPool(4, num_classes=30, pool_size=6)
    pool.write(torch.tensor([1, 2, 3, 4, 5, 6]), torch.randn(6, 4))
    before = {k: v.clone() for k, v in pool.state_dict().items()}
    undo = pool.write(torch.tensor([7, 7, 2, 9, 10]), torch.randn(5, 4))  # evictions, a repeat, a present id
    assert not torch.equal(pool.identity_entry, before["identity_entry"])
    pool.restore(undo)
    for key, value in pool.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_gallery_batch_larger_than_the_pool_is_refused():
    pool = DynamicClassPool(4, num_classes=30, pool_size=3)
    with pytest.raises(ValueError, match="pool_size >= 4"):
        pool.write(torch.arange(4), torch.randn(4, 4))


def test_loss_of_present_and_absent_identities():
    torch.manual_seed(2)
    margin = build_margin("cosface", s=8.0, m=0.3)
    pool = DynamicClassPool(6, num_classes=20, pool_size=5, margin=margin, push_topk=2)
    gallery = torch.randn(4, 6)
    pool.write(torch.tensor([3, 8, 8, 11]), gallery)          # 8 fills both rows; 3 and 11 one row
    probe = torch.randn(3, 6, requires_grad=True)
    labels = torch.tensor([8, 3, 17])                          # 17 is absent
    loss, present = pool.loss(probe, pool.lookup(labels))

    p = F.normalize(probe, dim=1)
    occupied = pool.entry_identity >= 0
    rows = [pool.features[0], torch.where((pool.entry_rows_filled == 2).unsqueeze(1), pool.features[1],
                                          pool.features[0])]
    expected = 0.0
    for weight in rows:
        cos = p @ weight[occupied].t()
        entries = [pool.entry_identity[occupied].tolist().index(label) for label in (8, 3)]
        logits = cos[:2] * 8.0
        logits[torch.arange(2), entries] = (cos[torch.arange(2), entries] - 0.3) * 8.0
        expected = expected + F.cross_entropy(logits, torch.tensor(entries))
        expected = expected + cos[2].topk(2).values.clamp_min(0).mean()
    assert torch.allclose(loss, expected / 2, atol=1e-5)
    assert math.isclose(present.item(), 2 / 3, rel_tol=1e-6)
    loss.backward()
    assert probe.grad is not None and torch.isfinite(probe.grad).all()
    assert not pool.features.requires_grad


def test_loss_under_autocast_is_fp32():
    pool = DynamicClassPool(8, num_classes=10, pool_size=4)
    pool.write(torch.tensor([0, 1]), torch.randn(2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe = torch.nn.Linear(8, 8)(torch.randn(3, 8))
        loss, _ = pool.loss(probe, pool.lookup(torch.tensor([0, 1, 5])))
    assert probe.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_default_sizes():
    assert default_pool_size(2_000_000, 0.01) == 20_000
    assert default_pool_size(300, 0.01, minimum=32) == 32
    assert default_push_topk(7409) == 3 and default_push_topk(100_000) == 10 and default_push_topk(2) == 2


def test_checkpoint_with_another_pool_size_loads():
    source = DynamicClassPool(4, num_classes=10, pool_size=6)
    source.write(torch.tensor([1, 2]), torch.randn(2, 4))
    target = DynamicClassPool(4, num_classes=10, pool_size=3)
    target.load_state_dict(source.state_dict())
    assert target.pool_size == 6 and target.lookup(torch.tensor([1, 2])).tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------- the module
def make_dcp_module(**kwargs) -> FaceRecognitionModule:
    options = dict(num_classes=SYNTHETIC["num_identities"], backbone="tiny", backbone_kwargs={"input_size": 16},
                   embedding_size=16, margin="cosface", margin_kwargs={"s": 16.0, "m": 0.2}, classifier="dcp",
                   lr=0.05, classifier_kwargs={"momentum": 0.9})
    options.update(kwargs)
    return FaceRecognitionModule(**options)


def make_datamodule(**kwargs) -> FaceDataModule:
    return FaceDataModule("synthetic", batch_size=8, num_workers=0, seed=5, synthetic=SYNTHETIC, **kwargs)


def quiet_trainer(**kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, limit_val_batches=0, deterministic=True)
    options.update(kwargs)
    return pl.Trainer(**options)


def test_module_builds_gallery_pool_and_one_param_group():
    module = make_dcp_module()
    keys = module.state_dict().keys()
    assert any(k.startswith("classifier.gallery_backbone.") for k in keys)
    assert {"classifier.features", "classifier.identity_entry", "classifier.entry_last_used"} <= set(keys)
    assert all(not p.requires_grad for p in module.classifier.gallery_backbone.parameters())
    optimizer = module.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["backbone"]
    assert module.needs_identity_pairs


def test_fit_with_pairs_updates_gallery_as_an_ema(tmp_path):
    pl.seed_everything(0)
    module = make_dcp_module()
    probe_before = [p.detach().clone() for p in module.backbone.parameters()]
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=make_datamodule())
    # one step: gallery = 0.9 · initial + 0.1 · probe before the step (= initial): unchanged, probe moved
    changed = False
    for g, p0, p1 in zip(module.classifier.gallery_backbone.parameters(), probe_before, module.backbone.parameters()):
        assert torch.allclose(g, p0, atol=1e-7)
        changed |= not torch.equal(p0, p1)
    assert changed
    assert module.classifier.pool_size == 4  # raised from ceil(1 % of 12) to one gallery view (8 / 2)
    assert module.hparams.classifier_kwargs["pool_size"] == 4
    assert module.classifier.occupancy().item() > 0
    assert trainer.train_dataloader.sampler.num_pairs == 2  # identity_fraction auto: 0.5 of 8 images


def test_embed_uses_the_probe_backbone():
    module = make_dcp_module().eval()
    with torch.no_grad():
        next(module.classifier.gallery_backbone.parameters()).add_(1.0)
        images = torch.randn(2, 3, 16, 16)
        assert torch.allclose(module.embed(images), F.normalize(module.backbone(images), dim=1))


def test_explicit_pool_size_too_small_is_a_clear_error(tmp_path):
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="pool_size=2 is smaller than one step's gallery view"):
        trainer.fit(make_dcp_module(classifier_kwargs={"momentum": 0.9, "pool_size": 2}), datamodule=make_datamodule())


def test_pairs_switched_off_is_a_clear_error(tmp_path):
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="identity_fraction=0"):
        trainer.fit(make_dcp_module(), datamodule=make_datamodule(identity_fraction=0.0))


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_mixed_precision_step_is_finite(tmp_path, precision):
    pl.seed_everything(0)
    module = make_dcp_module()
    trainer = quiet_trainer(max_steps=3, precision=precision, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=make_datamodule())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert module.classifier.features.dtype == torch.float32


def test_resume_mid_epoch_repeats_the_uninterrupted_run(tmp_path):
    """9 batches per epoch; a checkpoint after step 13 (mid-epoch 1) resumes to the same weights, gallery,
    pool and LRU as a run of 22 steps without interruption."""

    def run(max_steps, ckpt_path=None, dirpath=None):
        pl.seed_everything(11)
        module = make_dcp_module()
        callbacks = [ModelCheckpoint(dirpath=dirpath, filename="{step}", every_n_train_steps=13, save_top_k=-1)] \
            if dirpath else []
        trainer = quiet_trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(dirpath),
                                default_root_dir=tmp_path)
        trainer.fit(module, datamodule=make_datamodule(), ckpt_path=ckpt_path)
        return module

    full = run(22, dirpath=tmp_path / "ckpt")
    resumed = run(22, ckpt_path=tmp_path / "ckpt" / "step=13.ckpt")
    expected, got = full.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed.classifier.clock.item() == 22


# ------------------------------------------------------------------ non-finite gallery features, EMA per step
def test_a_non_finite_gallery_feature_is_never_written():
    """A NaN gallery feature would make every later loss NaN (present and absent probes alike): the write is
    refused, pool and LRU stay as they were, and the refusal is counted."""
    torch.manual_seed(0)
    pool = DynamicClassPool(8, num_classes=20, pool_size=6, margin="cosface")
    pool.write(torch.tensor([0, 1, 2]), torch.randn(3, 8))
    before = {k: v.clone() for k, v in pool.state_dict().items() if k != "skipped_writes"}
    bad = torch.randn(4, 8)
    bad[2, 5] = float("nan")
    pool.write(torch.tensor([3, 4, 1, 5]), bad)
    loss, _ = pool.loss(torch.randn(4, 8), pool.lookup(torch.tensor([0, 1, 7, 8])))  # present and absent probes
    assert torch.isfinite(loss)
    assert all(torch.equal(pool.state_dict()[k], v) for k, v in before.items())
    assert int(pool.skipped_writes) == 1
    pool.write(torch.tensor([3]), torch.full((1, 8), float("inf")))
    assert int(pool.skipped_writes) == 2
    pool.write(torch.tensor([3]), torch.randn(1, 8))  # a finite write goes through again
    assert int(pool.skipped_writes) == 2 and pool.lookup(torch.tensor([3])).item() >= 0


def test_a_refused_write_is_undone_exactly_by_its_undo_record():
    torch.manual_seed(1)
    pool = DynamicClassPool(4, num_classes=10, pool_size=3, margin="cosface")
    pool.write(torch.tensor([0, 1]), torch.randn(2, 4))
    snapshot = {k: v.clone() for k, v in pool.state_dict().items()}
    undo = pool.write(torch.tensor([2, 3]), torch.tensor([[1.0, 0, 0, 0], [float("nan"), 0, 0, 0]]))
    pool.restore(undo)
    for key, value in snapshot.items():
        expected = value + 1 if key == "skipped_writes" else value
        assert torch.equal(pool.state_dict()[key], expected), key


class _RecordWindowStarts(pl.Callback):
    """The probe backbone's parameters at the first micro-batch of each accumulation window."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate, self.probes = accumulate, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx % self.accumulate == 0:
            self.probes.append([p.detach().clone() for p in module.backbone.parameters()])


@pytest.mark.parametrize("accumulate", [1, 3])
def test_gallery_ema_follows_optimizer_steps_under_accumulation(tmp_path, accumulate):
    """gallery ← m · gallery + (1 − m) · probe once per optimizer step, replayed by hand from the probe weights at
    each window's start: with accumulation, one update per micro-batch would give m^N per optimizer step."""
    pl.seed_everything(0)
    module = make_dcp_module(classifier_kwargs={"momentum": 0.5}, lr=0.5)
    gallery = [p.detach().clone() for p in module.classifier.gallery_backbone.parameters()]
    record = _RecordWindowStarts(accumulate)
    trainer = quiet_trainer(max_steps=3, accumulate_grad_batches=accumulate, enable_checkpointing=False,
                            default_root_dir=tmp_path, callbacks=[record])
    trainer.fit(module, datamodule=make_datamodule())
    assert len(record.probes) == 3
    for probe in record.probes:
        gallery = [0.5 * g + 0.5 * p for g, p in zip(gallery, probe)]
    for expected, actual in zip(gallery, module.classifier.gallery_backbone.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
