"""The callback's contract in everyday Lightning setups.

Refit, reuse, manual optimization (two optimizers, accumulation), loss shapes, monitors, a composed scheduler
next to LearningRateMonitor, run limits, P = 0, resumed settings, the guard's saved streak, the one reader of
the step losses, and validation of loaded state.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
import test_callback
from test_callback import (
    FASTFACE, FASTFACE_NO_PATIENCE, LR0, ScriptedModule, detector_decisions, make_trainer, staircase_losses,
)
from torch.utils.data import DataLoader, TensorDataset

from fastface_pl.errors import SavedStateError
from fastface_pl.safety import DivergenceGuard
from fastface_pl.scheduling.auto import AutoFastFaceDetector
from fastface_pl.scheduling.callback import FastFaceLRCallback
from fastface_pl.scheduling.detectors import NonFiniteLossError
from fastface_pl.scheduling.lr_scheduler import FastFaceLR

pytestmark = [
    *test_callback.pytestmark,  # Lightning's chatter about tiny loaders and logging intervals, and:
    pytest.mark.filterwarnings("ignore:.*max_epochs.*was not set.*"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory.*exists.*"),
]


def callback(**kwargs) -> FastFaceLRCallback:
    return FastFaceLRCallback(**{"detector": "fastface", "detector_kwargs": FASTFACE, "verbose": False, **kwargs})


def csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------------------- 1, 2
def test_1_a_second_fit_on_the_same_trainer_continues_the_lr_and_the_decisions():
    # configure_optimizers gives the base LR again: the callback re-applies its lr_scale, not just keeps it.
    losses = staircase_losses(80)
    whole_cb, whole = callback(sync_every_n_steps=4), ScriptedModule(losses)
    make_trainer(max_epochs=4, callbacks=[whole_cb]).fit(whole)

    cb, model = callback(sync_every_n_steps=4), ScriptedModule(losses)
    trainer = make_trainer(max_epochs=2, callbacks=[cb])
    trainer.fit(model)
    assert any(s <= 40 for s, _, _ in cb.decisions)  # decided in the first fit
    trainer.fit_loop.max_epochs = 4  # continue training
    trainer.fit(model)
    assert trainer.global_step == 80 and cb.steps_observed == 80
    assert any(s > 40 for s, _, _ in cb.decisions)
    assert cb.decisions == whole_cb.decisions
    assert model.lrs == pytest.approx(whole.lrs, rel=1e-12)


def test_2_the_same_callback_on_a_new_trainer_starts_a_new_run_and_says_so(caplog):
    # The detector state does not carry over (steps numbered from the first run's end would cut early).
    first, second = staircase_losses(60, seed=3), staircase_losses(60, seed=4)
    cb = callback()
    make_trainer(max_steps=60, callbacks=[cb]).fit(ScriptedModule(first))
    assert cb.decisions
    model = ScriptedModule(second)
    with caplog.at_level("INFO"):
        make_trainer(max_steps=60, callbacks=[cb]).fit(model)
    assert "the state of the earlier fit (60 optimizer steps" in caplog.text
    assert cb.steps_observed == 60 and cb.detector.steps_seen == 60
    assert [(s, f) for s, f, _ in cb.decisions] == detector_decisions("fastface", FASTFACE, second)
    assert model.lrs[0] == LR0


def test_2_a_loaded_state_continues_on_new_optimizers_from_its_lr():
    # The new optimizers take the loaded LR, not their base LR (which lr_scale would contradict).
    losses = staircase_losses(50)
    cb = callback()
    make_trainer(max_steps=40, callbacks=[cb]).fit(ScriptedModule(losses))
    assert cb.lr_scale < 1.0
    other = callback()
    other.load_state_dict(cb.state_dict())
    model = ScriptedModule(losses[40:])
    make_trainer(max_steps=5, callbacks=[other]).fit(model)
    assert model.lrs[0] == pytest.approx(LR0 * cb.lr_scale) == pytest.approx(cb.decisions[-1][2])
    assert other.steps_observed == 45


# ---------------------------------------------------------------------------------------------------------- 3, 4
class ManualModule(LightningModule):
    """Manual optimization: optimizer ``a`` steps every ``a_every``-th batch, ``b`` (if any) every ``b_every``-th
    (counting from ``b_offset``). ``training_step`` returns the scripted loss and logs it with ``self.log``."""

    def __init__(self, losses, a_every=1, b_every=None, b_offset=0, batches=40) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.losses, self.a_every, self.batches = losses, a_every, batches
        self.b_every, self.b_offset = b_every, b_offset
        self.a = torch.nn.Parameter(torch.zeros(1))
        self.b = torch.nn.Parameter(torch.zeros(1))
        self.lrs = []

    def training_step(self, batch, batch_idx):
        index = self.trainer.fit_loop.epoch_loop.total_batch_idx
        loss = sum((p - p.detach()).sum() for p in self.parameters()) + self.losses[index]
        self.manual_backward(loss)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        if (index + 1) % self.a_every == 0:
            self.lrs.append(optimizers[0].param_groups[0]["lr"])
            optimizers[0].step()
            optimizers[0].zero_grad()
        if self.b_every is not None and (index + self.b_offset) % self.b_every == 0:
            optimizers[1].step()
            optimizers[1].zero_grad()
        return loss

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(self.batches, 1)), batch_size=1)

    def configure_optimizers(self):
        a = torch.optim.SGD([self.a], lr=LR0)
        return a if self.b_every is None else [a, torch.optim.SGD([self.b], lr=LR0)]


@pytest.mark.parametrize("module_kwargs, limits", [
    (dict(b_every=1), dict(max_epochs=-1, max_steps=160)),  # two optimizers every batch: old T = 40
    (dict(b_every=1), dict(max_epochs=2)),
    (dict(b_every=2, b_offset=0), dict(max_epochs=-1, max_steps=120)),  # b on even batches: old T = 60 ... 40
    (dict(b_every=2, b_offset=1), dict(max_epochs=-1, max_steps=120)),  # b on odd batches: old T = 120 ... 40
    (dict(b_every=2, b_offset=1), dict(max_epochs=2)),
])
def test_3_manual_optimization_run_length_is_the_optimizer_steps_whatever_limits_the_run(module_kwargs, limits):
    cb = callback(detector_kwargs=FASTFACE_NO_PATIENCE, patience_fraction=0.1)
    trainer = make_trainer(callbacks=[cb], **limits)
    trainer.fit(ManualModule(staircase_losses(80), **module_kwargs))
    assert cb.steps_observed == 80
    assert cb.scheduler.total_steps == 80 and cb.detector.patience == 8


@pytest.mark.parametrize("limits", [dict(max_epochs=2), dict(max_epochs=-1, max_steps=40)])
def test_4_manual_accumulation_counts_optimizer_steps_and_logs_on_lightnings_axis(tmp_path, limits):
    # One optimizer stepping every 2nd batch: T = 40 optimizer steps (not 80 batches) under either limit, and
    # fastface/* logged on Lightning's axis (0..79, where its own metrics are), not at steps 0..39.
    cb = callback(detector_kwargs=FASTFACE_NO_PATIENCE, patience_fraction=0.1, sync_every_n_steps=4)
    logger = CSVLogger(tmp_path, name="run", version=0)
    model = ManualModule(staircase_losses(80), a_every=2)
    trainer = make_trainer(tmp_path, callbacks=[cb, LearningRateMonitor(logging_interval="step")], logger=logger,
                           log_every_n_steps=1, **limits)
    trainer.fit(model)
    assert trainer.global_step == 40 == cb.steps_observed
    assert cb.scheduler.total_steps == 40 and cb.detector.patience == 4
    rows = csv_rows(logger)
    ours = {int(row["step"]): float(row["fastface/lr"]) for row in rows if row.get("fastface/lr")}
    monitor = {int(row["step"]): float(row["lr-SGD"]) for row in rows if row.get("lr-SGD")}
    assert sorted(ours) == list(range(1, 80, 2))  # the batches that stepped, on Lightning's axis
    assert all(ours[step] == pytest.approx(monitor[step]) for step in ours)
    assert [ours[step] for step in sorted(ours)] == pytest.approx(model.lrs)


# ---------------------------------------------------------------------------------------------------------- 5
class ShapeOneModule(ScriptedModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx).reshape(1)


@pytest.mark.parametrize("k, n_accumulate", [(4, 1), (1, 2), (3, 2)])
def test_5_a_loss_of_shape_one_is_read_like_a_scalar(k, n_accumulate):
    # A [1] loss in the block read with k > 1 or accumulation, not a TypeError (can't multiply sequence by non-int).
    losses = staircase_losses(120)
    cb = callback(sync_every_n_steps=k)
    make_trainer(max_steps=60, accumulate_grad_batches=n_accumulate, callbacks=[cb]).fit(ShapeOneModule(losses))
    means = [sum(losses[i : i + n_accumulate]) / n_accumulate for i in range(0, 60 * n_accumulate, n_accumulate)]
    assert cb.detector.steps_seen == 60
    assert [(s, f) for s, f, _ in cb.decisions] == detector_decisions("fastface", FASTFACE, means)


# ---------------------------------------------------------------------------------------------------------- 6
def test_6_fastface_values_can_be_monitored(tmp_path):
    # EarlyStopping(monitor="fastface/lr") works and ModelCheckpoint(monitor=...num_decisions) saves checkpoints.
    losses = staircase_losses(100)
    cb = callback(sync_every_n_steps=8)  # blocks do not end at the epoch ends (20 steps)
    stopper = EarlyStopping(monitor="fastface/lr", mode="max", patience=1, check_on_train_epoch_end=True)
    saver = ModelCheckpoint(dirpath=tmp_path, monitor="fastface/num_decisions", mode="max", save_top_k=1,
                            filename="{epoch}")
    trainer = make_trainer(tmp_path, max_epochs=5, callbacks=[stopper, saver, cb], enable_checkpointing=True)
    trainer.fit(ScriptedModule(losses))
    assert saver.best_model_path and Path(saver.best_model_path).exists()
    decided_by_epoch_end = [d for d in detector_decisions("fastface", FASTFACE, losses[: trainer.global_step])]
    assert float(saver.best_model_score) == len(decided_by_epoch_end) == len(cb.decisions)
    # The LR fell at the first decision (epoch 2): EarlyStopping saw it fall and stopped at epoch 3's end.
    assert trainer.current_epoch < 5 and stopper.stopped_epoch > 0


# ---------------------------------------------------------------------------------------------------------- 7
def test_7_learning_rate_monitor_logs_the_lr_a_composed_step_used(tmp_path):
    # The monitor logs the LR applied after a decision, not the inner scheduler's own LR (which differs).
    losses = staircase_losses(80)
    scheduler = {"scheduler": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.01 * s)),
                 "interval": "step"}
    model = ScriptedModule(losses, scheduler=scheduler)
    cb = callback(compose_with_step_schedulers=True, sync_every_n_steps=4)
    logger = CSVLogger(tmp_path, name="run", version=0)
    make_trainer(tmp_path, max_steps=80, logger=logger, log_every_n_steps=1,
                 callbacks=[cb, LearningRateMonitor(logging_interval="step")]).fit(model)
    assert cb.decisions
    logged = {int(row["step"]): float(row["lr-RecordingSGD"]) for row in csv_rows(logger)
              if row.get("lr-RecordingSGD")}
    assert sorted(logged) == list(range(80))
    assert [logged[step] for step in range(80)] == pytest.approx(model.lrs, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------- 8, 9
def test_8_a_run_limited_by_max_time_only_is_named_and_the_default_patience_is_not_quoted_as_given():
    cb = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE_NO_PATIENCE)
    with pytest.raises(MisconfigurationException) as info:
        make_trainer(max_time={"minutes": 5}, callbacks=[cb]).fit(ScriptedModule(staircase_losses(20)))
    message = str(info.value)
    assert "max_time" in message and "max_steps=" in message
    assert "patience_fraction=0.05" not in message and "default patience" in message


def test_9_a_patience_fraction_below_one_step_gives_p_1_and_says_so():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0)
    with pytest.warns(UserWarning, match="less than one step; the patience is P = 1"):
        scheduler = FastFaceLR(optimizer, "fastface", FASTFACE_NO_PATIENCE, patience_fraction=0.01, total_steps=50)
    assert scheduler.detector.patience == 1
    cb = callback(detector_kwargs=FASTFACE_NO_PATIENCE, patience_fraction=0.01)
    with pytest.warns(UserWarning, match="less than one step"):
        make_trainer(max_steps=50, callbacks=[cb]).fit(ScriptedModule(staircase_losses(50)))
    assert cb.detector.patience == 1


# ---------------------------------------------------------------------------------------------------------- 10
def test_10_a_resume_applies_this_callbacks_min_lr_and_says_so(tmp_path, caplog):
    losses = staircase_losses(60)
    first = callback()
    trainer = make_trainer(tmp_path, max_steps=30, callbacks=[first], enable_checkpointing=True)
    trainer.fit(ScriptedModule(losses))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    assert first.lr_scale < 1.0

    second = callback(min_lr=0.04)
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, max_steps=60, callbacks=[second]).fit(ScriptedModule(losses),
                                                                     ckpt_path=tmp_path / "half.ckpt")
    assert "min_lr None -> [0.04]" in caplog.text
    assert second.scheduler.on_nonfinite == "skip" and second.scheduler.min_lrs == [0.04]
    assert min(lr for _, _, lr in second.decisions) >= 0.04


# ---------------------------------------------------------------------------------------------------------- 11
class NaNSteps(ScriptedModule):
    def __init__(self, losses, nan_steps) -> None:
        super().__init__(losses)
        self.nan_steps = set(nan_steps)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        # NaN with gradient 1 on the weight: the weights stay finite (the guard checks them on a bad block)
        return (self.weight - self.weight.detach()).sum() + math.nan if self.global_step + 1 in self.nan_steps else loss


def test_11_the_guard_saves_the_streak_of_every_step_before_the_checkpoint(tmp_path):
    # Lightning collects the guard's state before its on_save_checkpoint: the pending losses are read by then.
    guard = DivergenceGuard(max_nonfinite_steps=20, check_every_n_steps=8)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=12, save_top_k=-1)
    make_trainer(tmp_path, max_steps=16, callbacks=[guard, saver], enable_checkpointing=True).fit(
        NaNSteps(staircase_losses(20), nan_steps=range(9, 13)))
    state = torch.load(tmp_path / "step=12.ckpt", weights_only=False)["callbacks"]["DivergenceGuard"]
    assert state["streak"] == 4 and state["streak_start"] == 9


def test_11_the_guard_counts_optimizer_steps_under_accumulation():
    # It counts optimizer steps, not batches (3 non-finite batches, 1.5 optimizer steps, do not stop the run).
    guard = DivergenceGuard(max_nonfinite_steps=3, check_every_n_steps=1)
    trainer = make_trainer(max_steps=20, accumulate_grad_batches=2, callbacks=[guard])
    with pytest.raises(Exception, match="3 consecutive non-finite") as info:
        trainer.fit(NaNSteps(staircase_losses(40), nan_steps=range(5, 21)))
    assert info.value.step == 5 and trainer.global_step == 7


def test_one_block_read_per_k_optimizer_steps_for_the_callback_and_the_guard(host_reads):
    # One shared block read, not one per reader (each reading itself, the guard per 4 batches: 10 + 20 reads).
    cb = callback(sync_every_n_steps=4)
    guard = DivergenceGuard(check_every_n_steps=4)
    make_trainer(max_steps=40, accumulate_grad_batches=2, callbacks=[cb, guard]).fit(
        ScriptedModule(staircase_losses(80)))
    assert host_reads == [8] * 10  # 4 steps of 2 micro-batches, once per block
    assert cb.detector.steps_seen == 40


# ---------------------------------------------------------------------------------------------------------- 12
def test_12_the_auto_detector_raises_the_non_finite_loss_error():
    with pytest.raises(NonFiniteLossError, match="step 1"):
        AutoFastFaceDetector(total_steps=100).update(math.nan)


# ---------------------------------------------------------------------------------------------------------- state
def trained_state() -> dict:
    cb = callback()
    make_trainer(max_steps=30, callbacks=[cb]).fit(ScriptedModule(staircase_losses(30)))
    return cb.state_dict()


@pytest.mark.parametrize("edit, key", [
    (lambda s: s["scheduler"]["detector"].update(smoothed_loss=math.nan), "smoothed_loss"),
    (lambda s: s["scheduler"].update(last_step=-3), "state['last_step']"),
    (lambda s: s["scheduler"].update(num_nonfinite=-1), "state['num_nonfinite']"),
    (lambda s: s["scheduler"].update(lr_scale="half"), "state['lr_scale']"),
    (lambda s: s["scheduler"].update(decisions=[[1, 0.5]]), "state['decisions']"),
    (lambda s: s["scheduler"].update(on_nonfinite="ignore"), "state['on_nonfinite']"),
    (lambda s: s.update(scheduler=[1, 2]), "state['scheduler']"),
    (lambda s: s.update(version=7), "state['version']"),
])
def test_a_tampered_callback_state_is_refused_naming_the_key(edit, key):
    state = trained_state()
    edit(state)
    with pytest.raises(SavedStateError, match=key.replace("[", r"\[").replace("]", r"\]")):
        callback().load_state_dict(state)


@pytest.mark.parametrize("state, key", [
    ({"streak": -1}, "streak"), ({"streak": 2, "streak_start": None}, "streak_start"),
    ({"streak": "2", "streak_start": 3}, "streak"),
])
def test_a_tampered_guard_state_is_refused_naming_the_key(state, key):
    with pytest.raises(SavedStateError, match=f"DivergenceGuard state\\['{key}'\\]"):  # one type for every state
        DivergenceGuard().load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------- one policy
def test_the_guard_at_streak_one_stops_at_the_block_read_naming_the_step():
    # The one non-finite policy of a Lightning run: DivergenceGuard(max_nonfinite_steps=1) stops the run at the
    # block read that holds the first non-finite step (the callback itself only skips it).
    losses = staircase_losses(40)
    losses[13] = math.nan
    guarded = ScriptedModule(losses)
    trainer = make_trainer(max_steps=40, callbacks=[callback(sync_every_n_steps=4),
                                                    DivergenceGuard(max_nonfinite_steps=1, check_every_n_steps=4)])
    with pytest.raises(Exception, match="optimizer step 14: 1 consecutive non-finite") as guard:
        trainer.fit(guarded)
    assert type(guard.value).__name__ == "TrainingDiverged"
    assert trainer.global_step == 16  # the block of steps 13-16
