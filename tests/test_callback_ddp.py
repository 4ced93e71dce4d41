"""FastFaceLRCallback under DDP: 2 CPU processes (ddp_spawn), rank-dependent losses, identical LR on both ranks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from fastface_pl.scheduling.callback import FastFaceLRCallback
from fastface_pl.scheduling.detectors import build_detector
from fastface_pl.scheduling.replay import replay

LR0 = 0.1
DETECTOR = {"alpha": 0.5, "beta": 0.5, "threshold": 1e-3, "patience": 4}
STEPS = 60


def base_losses(n: int) -> list[float]:
    """A staircase: falls 12 steps, flat 18 steps, repeated (the mean over ranks of the scripted losses)."""
    rng = random.Random(5)
    out, level = [], 5.0
    while len(out) < n:
        for _ in range(12):
            level -= 0.1
            out.append(level)
        out.extend(level + rng.uniform(-0.002, 0.002) for _ in range(18))
    return out[:n]


def rank_offsets(n: int) -> list[float]:
    """Rank 0 adds +offset, rank 1 −offset: the local streams differ a lot, their mean is the staircase."""
    rng = random.Random(11)
    return [rng.uniform(0.5, 1.5) for _ in range(n)]


class RankLossModule(LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.base, self.offsets = base_losses(STEPS), rank_offsets(STEPS)
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        step = self.trainer.global_step
        sign = 1.0 if self.global_rank == 0 else -1.0
        value = self.base[step] + sign * self.offsets[step]
        return (self.weight - self.weight.detach()).sum() + value

    def on_before_optimizer_step(self, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_end(self) -> None:
        callback = next(c for c in self.trainer.callbacks if isinstance(c, FastFaceLRCallback))
        record = {"lrs": self.lrs, "decisions": callback.decisions, "fed": callback.detector.steps_seen}
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(2 * STEPS, 1)), batch_size=1)  # STEPS batches per rank

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ddp_ranks_feed_the_rank_mean_and_apply_identical_lrs(tmp_path):
    k = 3
    callback = FastFaceLRCallback("fastface", detector_kwargs=DETECTOR, sync_every_n_steps=k, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=20, save_top_k=-1)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=STEPS, callbacks=[callback, checkpoint],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(RankLossModule(str(tmp_path)))

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0]["lrs"] == records[1]["lrs"]  # identical LR trajectories
    assert records[0]["decisions"] == records[1]["decisions"]
    assert records[0]["fed"] == records[1]["fed"] == STEPS

    decided = replay(build_detector("fastface", **DETECTOR), base_losses(STEPS)).decisions
    assert len(decided) >= 2
    assert [(s, f) for s, f, _ in records[0]["decisions"]] == decided
    # A rank-local stream would decide differently: the test can tell.
    local = [base + offset for base, offset in zip(base_losses(STEPS), rank_offsets(STEPS))]
    assert replay(build_detector("fastface", **DETECTOR), local).decisions != decided

    # Mid-block checkpoint (20 % 3 = 2 steps not yet read): every rank reads the block (the rank mean) before
    # Lightning collects the state; rank 0 writes it.
    state = torch.load(tmp_path / "ckpt" / "step=20.ckpt", weights_only=False)["callbacks"][callback.state_key]
    assert state["scheduler"]["last_step"] == 20 and state["scheduler"]["detector"]["steps_seen"] == 20
    replayed = build_detector("fastface", **DETECTOR)
    for value in base_losses(20):
        replayed.update(value)
    assert state["scheduler"]["detector"]["smoothed_loss"] == pytest.approx(replayed.smoothed_loss, rel=1e-6)
