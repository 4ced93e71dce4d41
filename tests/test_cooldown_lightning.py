"""The cooldown and stop modes through a real Lightning Trainer (CPU): replays, block reads, stopping, budgets,
exact resume, DDP and the contract cases of the halving mode (docs/cooldown.md)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import test_callback
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from test_callback import FASTFACE, LR0, ScriptedModule, make_trainer, staircase_losses
from test_callback_ddp import RankLossModule, base_losses

from fastface_pl.scheduling.callback import FastFaceLRCallback
from fastface_pl.scheduling.detectors import FastFaceDetector, build_detector
from fastface_pl.scheduling.ending import cooldown_factor
from fastface_pl.scheduling.lr_scheduler import FastFaceLR

pytestmark = [
    *test_callback.pytestmark,
    pytest.mark.filterwarnings("ignore:.*max_epochs.*was not set.*"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory.*exists.*"),
]


def callback(**kwargs) -> FastFaceLRCallback:
    return FastFaceLRCallback(**{"detector": "fastface", "detector_kwargs": FASTFACE, "verbose": False, **kwargs})


def replay(losses: list[float], **kwargs) -> tuple[FastFaceLR, list[float]]:
    """FastFaceLR fed the same losses in a plain loop: its decisions and the LR of every step."""
    scheduler = FastFaceLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0),
                           FastFaceDetector(**FASTFACE), **kwargs)
    lrs = []
    for value in losses:
        lrs.append(scheduler.optimizers[0].param_groups[0]["lr"])
        scheduler.step(value)
        if scheduler.should_stop:
            break
    return scheduler, lrs


def flat_from(step: int, n: int) -> list[float]:
    """Falls 0.05 a step until ``step``, then flat with a small wobble: one stationary stretch."""
    return [max(10.0 - 0.05 * step, 10.0 - 0.05 * t) + 0.01 * math.sin(t) for t in range(n)]


# ---------------------------------------------------------------------------------------------------------- cooldown
@pytest.mark.parametrize("k", [1, 4])
def test_the_cooldown_equals_a_plain_loop_replay_and_moves_every_step(k):
    losses = staircase_losses(200, seed=2)
    cb = callback(mode="cooldown", sync_every_n_steps=k)
    model = ScriptedModule(losses, batches_per_epoch=37)  # blocks straddle epoch ends
    make_trainer(max_steps=200, callbacks=[cb]).fit(model)

    expected, lrs = replay(losses, total_steps=200, mode="cooldown")
    t_d = expected.ending.start
    assert [d[0] for d in cb.decisions] == [t_d] and cb.cooldown_start == t_d
    read = math.ceil(t_d / k) * k  # the block holding t_d is read after this step: up to k − 1 steps late
    assert model.lrs[:read] == pytest.approx([LR0] * read)
    assert model.lrs[read:] == pytest.approx(lrs[read:], rel=1e-12)  # then the anneal, one value per step
    assert len(set(model.lrs[read:])) == 200 - read


def test_without_a_stationary_stretch_the_cooldown_starts_at_the_latest_point_on_time():
    losses = [10.0 - 0.04 * t for t in range(100)]
    cb = callback(mode="cooldown", sync_every_n_steps=16)  # the latest point needs no read: exactly on time
    model = ScriptedModule(losses)
    make_trainer(max_steps=100, callbacks=[cb]).fit(model)
    assert cb.cooldown_start == 80 and cb.detector.num_reductions == 0
    assert model.lrs == pytest.approx([LR0 * cooldown_factor(t, 80, 100) for t in range(1, 101)], rel=1e-12)


def test_a_cooldown_without_a_budget_names_the_fix():
    trainer = make_trainer(max_epochs=-1, callbacks=[callback(mode="cooldown"), Timer(duration="00:00:00:30")])
    with pytest.raises(MisconfigurationException, match="max_steps"):
        trainer.fit(ScriptedModule(staircase_losses(100)))


def test_a_second_fit_with_a_larger_budget_moves_the_cooldowns_end_and_says_so(caplog):
    losses = staircase_losses(300, seed=2)
    cb = callback(mode="cooldown", verbose=True)
    trainer = make_trainer(max_steps=150, callbacks=[cb])
    model = ScriptedModule(losses, batches_per_epoch=300)
    trainer.fit(model)
    t_d = cb.cooldown_start
    assert t_d is not None and cb.scheduler.ending.end == 150
    trainer.fit_loop.epoch_loop.max_steps = 300
    with caplog.at_level(logging.INFO):
        trainer.fit(model)
    assert cb.cooldown_start == t_d and cb.scheduler.ending.end == 300
    assert "T = 300" in caplog.text
    assert model.lrs[150:] == pytest.approx([LR0 * cooldown_factor(t, t_d, 300) for t in range(151, 301)], rel=1e-9)


def test_gradient_accumulation_counts_the_cooldown_in_optimizer_steps():
    losses = staircase_losses(400, seed=5)
    cb = callback(mode="cooldown", sync_every_n_steps=1)
    model = ScriptedModule(losses, batches_per_epoch=40)
    trainer = make_trainer(max_epochs=10, accumulate_grad_batches=2, callbacks=[cb])
    trainer.fit(model)
    assert trainer.global_step == 200 and cb.scheduler.ending.end == 200
    assert len(model.lrs) == 200 and model.lrs[-1] < 0.2 * LR0


# ---------------------------------------------------------------------------------------------------------- stop
def test_the_stop_mode_stops_the_trainer_saves_the_checkpoint_and_says_why(tmp_path, caplog):
    losses = staircase_losses(2000, seed=3)
    cb = callback(mode="stop", cooldown_fraction=0.5, sync_every_n_steps=4, verbose=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(tmp_path, max_epochs=100, callbacks=[cb, checkpoint], enable_checkpointing=True)
    model = ScriptedModule(losses, batches_per_epoch=20)
    with caplog.at_level(logging.INFO):
        trainer.fit(model)

    expected, lrs = replay(losses, mode="stop", cooldown_fraction=0.5)
    t_d = expected.ending.start
    assert cb.stop_step == t_d + math.ceil(0.5 * t_d) == trainer.global_step < 2000
    assert trainer.global_step % 20  # mid-epoch: the epoch ended early, as EarlyStopping's stop does
    assert f"stopping after optimizer step {trainer.global_step}" in caplog.text and "loss stationary" in caplog.text
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == trainer.global_step
    assert saved["callbacks"][cb.state_key]["scheduler"]["ending"]["end"] == cb.stop_step
    read = math.ceil(t_d / 4) * 4
    assert model.lrs[read:] == pytest.approx(lrs[read:], rel=1e-12)


@pytest.mark.parametrize("epochs", [6, 24, -1])
def test_the_stop_mode_decides_the_same_whatever_the_budget(epochs):
    # The auto rule resolved for horizon_epochs (5 epochs of 20 batches, H = 100), not for max_epochs.
    losses = flat_from(40, 500)
    cb = FastFaceLRCallback("fastface", mode="stop", horizon_epochs=5, verbose=False)
    trainer = make_trainer(max_epochs=epochs, callbacks=[cb])
    trainer.fit(ScriptedModule(losses, batches_per_epoch=20))
    assert cb.detector.settings.total_steps == 100
    plain = FastFaceLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0), "fastface", mode="stop",
                       horizon_steps=100)  # no budget at all
    for value in losses:
        plain.step(value)
        if plain.should_stop:
            break
    assert (cb.cooldown_start, cb.stop_step, trainer.global_step) == (plain.ending.start, plain.ending.end,
                                                                       plain.last_step)
    assert plain.ending.start > 40 and plain.last_step < 120  # inside the shortest budget


def test_the_stop_mode_needs_a_horizon_for_settings_from_a_length():
    with pytest.raises(ValueError, match="horizon_epochs"):
        FastFaceLRCallback("fastface", mode="stop")
    with pytest.raises(ValueError, match="mode='stop' only"):
        FastFaceLRCallback("fastface", mode="cooldown", horizon_epochs=5)
    FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, mode="stop")  # P in steps: no horizon needed


def test_a_stop_run_resumed_mid_cooldown_ends_exactly_as_an_uninterrupted_one(tmp_path):
    losses = staircase_losses(2000, seed=3)

    def run(ckpt_path=None, every=None):
        cb = callback(mode="stop", sync_every_n_steps=4)
        callbacks = [cb] + ([ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=every,
                                             save_top_k=-1)] if every else [])
        trainer = make_trainer(tmp_path, max_epochs=100, callbacks=callbacks, enable_checkpointing=bool(every))
        model = ScriptedModule(losses, batches_per_epoch=20)
        trainer.fit(model, ckpt_path=ckpt_path)
        return cb, model, trainer

    whole, whole_model, whole_trainer = run(every=7)
    inside = [step for step in range(7, whole_trainer.global_step, 7) if step > whole.cooldown_start + 4]
    assert inside, "no checkpoint inside the cooldown"
    resumed, model, trainer = run(ckpt_path=tmp_path / f"step={inside[0]}.ckpt")
    assert trainer.global_step == whole_trainer.global_step == resumed.stop_step
    assert resumed.decisions == whole.decisions
    assert model.weight.item() == whole_model.weight.item()  # the weight moved by −LR every step: same LRs


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_under_ddp_every_rank_anneals_and_stops_at_the_same_step(tmp_path):
    cb = FastFaceLRCallback("fastface", detector_kwargs=_ddp_detector(), mode="stop", cooldown_fraction=0.5,
                            sync_every_n_steps=3, verbose=False)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=60, callbacks=[cb], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(RankLossModule(str(tmp_path)))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0]["lrs"] == records[1]["lrs"] and records[0]["decisions"] == records[1]["decisions"]

    detector = build_detector("fastface", **_ddp_detector())  # the rank mean decides
    for step, value in enumerate(base_losses(60), start=1):
        if detector.update(value) != 1.0:
            break
    stop = step + math.ceil(0.5 * step)
    assert records[0]["decisions"][0][0] == step and len(records[0]["lrs"]) == stop < 60
    assert len(set(records[0]["lrs"][-5:])) == 5  # annealing to the last step


def _ddp_detector() -> dict:
    from test_callback_ddp import DETECTOR

    return dict(DETECTOR)


# ---------------------------------------------------------------------------------------------------------- checks
def test_the_ending_state_is_checked_when_loaded():
    cb = callback(mode="stop")
    make_trainer(max_steps=120, callbacks=[cb]).fit(ScriptedModule(staircase_losses(120, seed=3)))
    state = cb.state_dict()
    state["scheduler"]["ending"]["end"] = -3
    with pytest.raises(ValueError, match="end"):
        callback(mode="stop").load_state_dict(state)
