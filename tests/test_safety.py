"""The divergence guard (blocks of k steps, consecutive non-finite losses, non-finite weights never saved) and the
pre-emption checkpoint, in-process with a tiny model on the CPU."""

from __future__ import annotations

import json
import math
import os
import signal

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from fastface_pl.atomic import finite_or_none
from fastface_pl.checkpoints import load_lightning_checkpoint
from fastface_pl.safety import (
    DivergenceGuard, PreemptionCheckpoint, TrainingDiverged, TrainingInterrupted,
)


class Scripted(pl.LightningModule):
    """A linear model whose loss is made non-finite at chosen steps; ``nan_weights_at`` poisons the weights."""

    def __init__(self, inf_loss_steps=(), nan_weights_at=None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.inf_loss_steps = set(inf_loss_steps)
        self.nan_weights_at = nan_weights_at

    def training_step(self, batch, batch_idx):
        step = self.global_step + 1  # the optimizer step this batch makes
        loss = self.layer(batch[0]).pow(2).mean()
        if step in self.inf_loss_steps:  # non-finite loss with zero gradients: the weights stay finite
            loss = loss * 0.0 + float("inf")
        if self.nan_weights_at is not None and step >= self.nan_weights_at:
            with torch.no_grad():
                self.layer.weight.fill_(float("nan"))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(module, tmp_path, callbacks, steps=30):
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=2)
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=any(
                             isinstance(c, ModelCheckpoint) for c in callbacks), accelerator="cpu")
    trainer.fit(module, data)
    return trainer


def test_consecutive_nonfinite_losses_stop_the_run_at_the_block_end(tmp_path):
    guard = DivergenceGuard(max_nonfinite_steps=3, check_every_n_steps=4)
    with pytest.raises(TrainingDiverged) as info:
        _fit(Scripted(inf_loss_steps=range(6, 31)), tmp_path, [guard])
    assert info.value.step == 6 and "3 consecutive non-finite" in info.value.reason
    # read in blocks of 4 batches: the third bad loss (step 8) is seen when the block of steps 5-8 is read


def test_isolated_nonfinite_losses_are_not_a_divergence(tmp_path):
    guard = DivergenceGuard(max_nonfinite_steps=3, check_every_n_steps=4)
    trainer = _fit(Scripted(inf_loss_steps={3, 4, 9, 15, 16}), tmp_path, [guard])
    assert trainer.global_step == 30  # runs of at most two bad steps (an fp16 overflow the scaler skips)


def test_losses_are_read_once_per_block(tmp_path, host_reads):
    _fit(Scripted(), tmp_path, [DivergenceGuard(max_nonfinite_steps=5, check_every_n_steps=8)], steps=24)
    assert host_reads == [8, 8, 8]  # one host read of 8 losses per block, none per step


def test_nonfinite_weights_are_never_saved(tmp_path):
    checkpoints = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=checkpoints, filename="step{step:03d}", every_n_train_steps=2, save_top_k=-1,
                            save_last=True, auto_insert_metric_name=False)
    guard = DivergenceGuard(max_nonfinite_steps=100, check_every_n_steps=16)
    with pytest.raises(TrainingDiverged) as info:
        _fit(Scripted(nan_weights_at=5), tmp_path, [guard, saver])
    assert "weights" in info.value.reason and "the checkpoint of step 6 was not written" in info.value.reason
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step002.ckpt", "step004.ckpt"]
    last = load_lightning_checkpoint(checkpoints / "last.ckpt")
    assert last["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_guard_arguments_are_checked():
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        DivergenceGuard(max_nonfinite_steps=0)
    with pytest.raises(ValueError, match="check_every_n_steps"):
        DivergenceGuard(check_every_n_steps=1.5)


class SignalAt(pl.Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_current_step_and_stops(tmp_path, signum):
    previous = signal.getsignal(signal.SIGINT)
    preempt = PreemptionCheckpoint(tmp_path / "ckpt")
    with pytest.raises(TrainingInterrupted) as info:
        _fit(Scripted(), tmp_path, [SignalAt(7, signum), preempt])
    assert info.value.signum == signum and info.value.step == 8  # the step in flight completed
    assert info.value.checkpoint == tmp_path / "ckpt" / "interrupted-step0000008.ckpt"
    checkpoint = load_lightning_checkpoint(info.value.checkpoint)
    assert checkpoint["global_step"] == 8
    assert signal.getsignal(signal.SIGINT) == previous  # the handler is put back


def test_finite_or_none_gives_strict_json():
    summary = {"loss": float("nan"), "sets": {"lfw": {"accuracy": float("inf"), "xnorm": 1.5}}, "steps": [1, -math.inf]}
    text = json.dumps(finite_or_none(summary), allow_nan=False)
    assert json.loads(text) == {"loss": None, "sets": {"lfw": {"accuracy": None, "xnorm": 1.5}}, "steps": [1, None]}


def test_ddp_ranks_leave_sigterm_to_lightnings_collective_stop():
    """Under DDP a rank that alone saw SIGTERM must not start a checkpoint save (a collective) by itself."""
    from types import SimpleNamespace

    callback = PreemptionCheckpoint("unused")
    trainer = SimpleNamespace(world_size=2, received_sigterm=True, global_step=7)
    callback.on_train_batch_end(trainer, None, None, None, 0)  # would call trainer.save_checkpoint and raise
    assert callback.checkpoint is None
