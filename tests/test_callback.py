"""FastFaceLRCallback in real Lightning runs (CPU): scripted losses, compared with a pure detector replay."""

from __future__ import annotations

import csv
import json
import math
import pickle
import random
import warnings
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from fastface_pl.scheduling.callback import FastFaceLRCallback
from fastface_pl.scheduling.detectors import FastFaceDetector, MovingHaarDetector, NonFiniteLossError, build_detector
from fastface_pl.scheduling.replay import replay
from fastface_pl.safety import DivergenceGuard, TrainingDiverged

LR0 = 0.1
FASTFACE = {"alpha": 0.5, "beta": 0.5, "threshold": 1e-3, "patience": 4}
MOVING_HAAR = {"window": 3, "threshold": 0.01, "patience": 4}
FASTFACE_NO_PATIENCE = {key: value for key, value in FASTFACE.items() if key != "patience"}

# Lightning's chatter about tiny dataloaders, non-resumable loaders and logging intervals is expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended.*"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided.*"),
]


def staircase_losses(n: int, seed: int = 0, drop: float = 0.1, fall: int = 12, flat: int = 18) -> list[float]:
    """Falls for ``fall`` steps, then flat (small noise) for ``flat`` steps, repeated: stationary stretches."""
    rng = random.Random(seed)
    out, level = [], 5.0
    while len(out) < n:
        for _ in range(fall):
            level -= drop
            out.append(level + rng.uniform(-0.002, 0.002))
        out.extend(level + rng.uniform(-0.002, 0.002) for _ in range(flat))
    return out[:n]


def detector_decisions(name: str, kwargs: dict, values: list[float]) -> list[tuple[int, float]]:
    """(1-based step, factor) of every factor other than 1.0 that a fresh detector returns for ``values``."""
    return replay(build_detector(name, **kwargs), values).decisions


class RecordingSGD(torch.optim.SGD):
    """SGD that reports the LR of its first group from inside ``step``: the LR the step really used (after any
    optimizer step pre-hook, e.g. the callback's scale under compose_with_step_schedulers)."""

    def __init__(self, params, lr, record) -> None:
        super().__init__(params, lr=lr)
        self.record = record

    def step(self, closure=None):
        self.record(self.param_groups[0]["lr"])
        return super().step(closure)


class ScriptedModule(LightningModule):
    """``training_step`` returns ``losses[total batch index]`` exactly, with a gradient on a parameter.

    Records the LR of every optimizer step (``lrs[s-1]`` is the LR used by optimizer step s).
    """

    def __init__(self, losses: list[float], batches_per_epoch: int = 20, scheduler: dict | None = None) -> None:
        super().__init__()
        self.losses = losses
        self.batches_per_epoch = batches_per_epoch
        self.scheduler = scheduler
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        value = self.losses[self.trainer.fit_loop.epoch_loop.total_batch_idx]
        # (w − w.detach()) is exactly 0 with gradient 1: the loss is the scripted value to the bit.
        return (self.weight - self.weight.detach()).sum() + value

    def record_lr(self, lr: float) -> None:
        self.lrs.append(lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(self.batches_per_epoch, 1)), batch_size=1)

    def configure_optimizers(self):
        optimizer = RecordingSGD(self.parameters(), lr=LR0, record=self.record_lr)
        if self.scheduler is None:
            return optimizer
        lr_scheduler = dict(self.scheduler, scheduler=self.scheduler["scheduler"](optimizer))
        return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}


def make_trainer(tmp_path: Path | None = None, **kwargs) -> Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return Trainer(**options)


def expected_lrs(decisions: list[tuple[int, float]], num_steps: int, delay_to_block: int = 1) -> list[float]:
    """LR of each optimizer step when a decision at step d is applied after step ceil(d/k)·k."""
    lrs, lr = [], LR0
    applied = sorted((math.ceil(d / delay_to_block) * delay_to_block, f) for d, f in decisions)
    for step in range(1, num_steps + 1):
        lrs.append(lr)
        for at, factor in applied:
            if at == step:
                lr *= factor
    return lrs


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [("fastface", FASTFACE), ("moving_haar", MOVING_HAAR)])
def test_decisions_equal_a_detector_replay(name, kwargs):
    losses = staircase_losses(100)
    callback = FastFaceLRCallback(name, detector_kwargs=kwargs, verbose=False)
    model = ScriptedModule(losses)
    make_trainer(max_steps=100, callbacks=[callback]).fit(model)

    expected = detector_decisions(name, kwargs, losses)
    assert len(expected) >= 3
    assert [(s, f) for s, f, _ in callback.decisions] == expected
    assert callback.detector.steps_seen == 100
    assert model.lrs == pytest.approx(expected_lrs(expected, 100), rel=1e-12)
    assert callback.decisions[-1][2] == pytest.approx(LR0 * math.prod(f for _, f in expected))
    if name == "moving_haar":  # the restart rule reaches the optimizer too
        assert any(f > 1 for _, f, _ in callback.decisions)


class RecordingDetector(FastFaceDetector):
    """A real FastFace detector that also records what it was fed."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fed: list[float] = []

    def update(self, loss: float) -> float:
        self.fed.append(loss)
        return super().update(loss)


def test_accumulation_feeds_micro_batch_means_including_the_short_last_window():
    batches_per_epoch, n_accumulate, epochs = 10, 3, 3  # windows of 3, 3, 3 and a short one of 1
    losses = [1.0 + 0.37 * ((i * 7) % 11) for i in range(batches_per_epoch * epochs)]
    detector = RecordingDetector(alpha=0.5, beta=0.5, threshold=1e-3, patience=2)
    callback = FastFaceLRCallback(detector, sync_every_n_steps=3, verbose=False)
    trainer = make_trainer(max_epochs=epochs, accumulate_grad_batches=n_accumulate, callbacks=[callback])
    trainer.fit(ScriptedModule(losses, batches_per_epoch=batches_per_epoch))

    expected = []
    for epoch in range(epochs):
        epoch_losses = losses[epoch * batches_per_epoch : (epoch + 1) * batches_per_epoch]
        for start in range(0, batches_per_epoch, n_accumulate):
            window = epoch_losses[start : start + n_accumulate]
            expected.append(sum(window) / len(window))
    assert trainer.global_step == 12 == len(expected)
    assert len(detector.fed) == trainer.global_step == callback.steps_observed
    assert detector.fed == pytest.approx(expected, rel=1e-6)
    assert detector.fed[3] == pytest.approx(losses[9])  # the short window: its one batch, not divided by 3


def test_block_reading_makes_the_same_decisions_at_most_k_minus_1_steps_late():
    losses = staircase_losses(150, seed=1)
    runs = {}
    for k in (1, 4):
        callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, sync_every_n_steps=k, verbose=False)
        model = ScriptedModule(losses, batches_per_epoch=37)  # blocks straddle epoch ends
        make_trainer(max_steps=150, callbacks=[callback]).fit(model)
        runs[k] = (callback, model)

    decided = detector_decisions("fastface", FASTFACE, losses)
    assert len(decided) >= 4
    assert any(d % 4 for d, _ in decided)  # some decision falls inside a block
    for k, (callback, model) in runs.items():
        assert [(s, f) for s, f, _ in callback.decisions] == decided
        assert callback.detector.num_reductions == len(decided)
        assert model.lrs == pytest.approx(expected_lrs(decided, 150, delay_to_block=k), rel=1e-12)
    # Late by at most k−1 steps: the LR of k = 4 catches up with k = 1 within 3 steps of each decision.
    lrs_1, lrs_4 = runs[1][1].lrs, runs[4][1].lrs
    for step, _ in decided:
        assert lrs_4[step + 3] == pytest.approx(lrs_1[step + 3])  # index step+3 is optimizer step step+4
    assert sum(a != b for a, b in zip(lrs_1, lrs_4)) <= 3 * len(decided)


def test_partial_block_is_flushed_at_train_end():
    losses = staircase_losses(50)
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, sync_every_n_steps=8, verbose=False)
    make_trainer(max_steps=50, callbacks=[callback]).fit(ScriptedModule(losses))
    assert callback.detector.steps_seen == 50  # 6 full blocks of 8 + the last 2 steps
    assert [(s, f) for s, f, _ in callback.decisions] == detector_decisions("fastface", FASTFACE, losses)


# ----------------------------------------------------------------------------------------------------------
class ResumableModule(ScriptedModule):
    """Records (optimizer step, LR) so a resumed run can be compared step by step."""

    def record_lr(self, lr: float) -> None:
        self.lrs.append((self.trainer.global_step + 1, lr))


def step_means(losses: list[float], batches_per_epoch: int, n_accumulate: int) -> list[float]:
    """Per-optimizer-step mean of the micro-batch losses, with the short last window of each epoch."""
    means = []
    for epoch_start in range(0, len(losses) - batches_per_epoch + 1, batches_per_epoch):
        for start in range(epoch_start, epoch_start + batches_per_epoch, n_accumulate):
            window = losses[start : min(start + n_accumulate, epoch_start + batches_per_epoch)]
            means.append(sum(window) / len(window))
    return means


@pytest.mark.parametrize("n_accumulate", [1, 2])
def test_resume_mid_epoch_and_mid_block_repeats_the_uninterrupted_run(tmp_path, n_accumulate):
    batches_per_epoch, total_steps = 25, 90
    # A staircase stretched by N: the step means keep its shape (falls, then stationary).
    n = 8 * batches_per_epoch * n_accumulate
    losses = staircase_losses(n, seed=2, fall=12 * n_accumulate, flat=18 * n_accumulate)
    kwargs = dict(detector="fastface", detector_kwargs=FASTFACE, sync_every_n_steps=4, verbose=False)

    def run(max_steps, ckpt_path=None, dirpath=None):
        callback = FastFaceLRCallback(**kwargs)
        model = ResumableModule(losses, batches_per_epoch=batches_per_epoch)
        checkpoints = [ModelCheckpoint(dirpath=dirpath, filename="{step}", every_n_train_steps=15, save_top_k=-1)]
        trainer = make_trainer(
            tmp_path, max_steps=max_steps, callbacks=[callback] + (checkpoints if dirpath else []),
            enable_checkpointing=bool(dirpath), accumulate_grad_batches=n_accumulate,
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return callback, model, trainer

    # A checkpoint reads the steps of its block early (one sync per save), so the uninterrupted run saves too.
    full, full_model, _ = run(total_steps, dirpath=tmp_path / "full")
    run(45, dirpath=tmp_path / "ckpt")
    # Mid-epoch (25 or 13 steps per epoch), mid-block: 30 % 4 = 2 steps not yet read are read before the save.
    ckpt = tmp_path / "ckpt" / "step=30.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"][full.state_key]
    assert state["scheduler"]["last_step"] == 30 and state["scheduler"]["detector"]["steps_seen"] == 30
    means = step_means(losses, batches_per_epoch, n_accumulate)

    resumed, resumed_model, trainer = run(total_steps, ckpt_path=ckpt)
    assert trainer.global_step == total_steps
    decided = detector_decisions("fastface", FASTFACE, means[:total_steps])
    assert any(d <= 30 for d, _ in decided) and any(d > 30 for d, _ in decided)
    assert resumed.decisions == full.decisions
    assert [(s, f) for s, f, _ in resumed.decisions] == decided
    assert resumed.detector.state_dict() == full.detector.state_dict()
    assert resumed.lr_scale == full.lr_scale
    assert resumed_model.lrs == [item for item in full_model.lrs if item[0] > 30]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(full.decisions[-1][2])


def test_state_dict_round_trip_and_tolerates_missing_keys():
    losses = staircase_losses(40)
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, sync_every_n_steps=3, verbose=False)
    make_trainer(max_steps=40, callbacks=[callback]).fit(ScriptedModule(losses))
    state = pickle.loads(pickle.dumps(callback.state_dict()))
    json.dumps(state)  # plain Python values only

    other = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, sync_every_n_steps=3, verbose=False)
    other.load_state_dict(state)
    assert other.decisions == callback.decisions and other.detector.steps_seen == 40  # visible at once
    assert other.state_dict()["scheduler"] == state["scheduler"]
    extended = losses + [losses[-1]]
    make_trainer(max_steps=1, callbacks=[other]).fit(ScriptedModule(extended[40:]))
    assert other.steps_observed == 41 and other.detector.steps_seen == 41
    assert [(s, f) for s, f, _ in other.decisions] == detector_decisions("fastface", FASTFACE, extended)
    assert other.decisions[: len(callback.decisions)] == callback.decisions

    partial = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, verbose=False)
    partial.load_state_dict({})  # a partial state: missing keys take their defaults
    make_trainer(max_steps=1, callbacks=[partial]).fit(ScriptedModule(losses))
    assert partial.steps_observed == 1 and partial.detector.steps_seen == 1 and partial.lr_scale == 1.0


def test_state_key_is_the_detector_type_and_name_not_the_settings():
    a = FastFaceLRCallback("fastface", detector_kwargs={"threshold": 1e-4}, patience=10)
    b = FastFaceLRCallback("fastface", detector_kwargs={"threshold": 2e-4, "alpha": 0.1}, patience_fraction=0.2)
    assert a.state_key == b.state_key  # a resume with changed settings finds its state
    c = FastFaceLRCallback("moving_haar", detector_kwargs={"window": 10})
    d = FastFaceLRCallback(FastFaceDetector(patience=3))
    e = FastFaceLRCallback("fastface", name="backbone")
    f = FastFaceLRCallback("fastface", name="head")
    assert len({x.state_key for x in (a, c, d, e, f)}) == 5


def test_nonfinite_losses_are_skipped_counted_and_reported_once():
    losses = staircase_losses(80)
    bad_steps = (5, 33, 34)
    for step in bad_steps:
        losses[step - 1] = float("nan") if step != 33 else float("inf")
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, sync_every_n_steps=4, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=80, callbacks=[callback]).fit(ScriptedModule(losses))
    reports = [w for w in caught if "non-finite" in str(w.message)]
    assert len(reports) == 1 and "skipped 3 optimizer step(s)" in str(reports[0].message)
    assert "first at step 5" in str(reports[0].message)
    assert callback.nonfinite_count == 3
    assert callback.detector.steps_seen == 77
    finite = [(step, v) for step, v in enumerate(losses, start=1) if math.isfinite(v)]
    replayed = detector_decisions("fastface", FASTFACE, [v for _, v in finite])
    assert replayed
    # Detector step i is optimizer step finite[i-1][0].
    assert [(s, f) for s, f, _ in callback.decisions] == [(finite[i - 1][0], f) for i, f in replayed]


def test_the_callback_has_no_nonfinite_policy_the_guard_stops_the_run():
    # One policy in Lightning: the callback skips non-finite losses; the DivergenceGuard stops a run on them.
    with pytest.raises(TypeError, match="on_nonfinite"):
        FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, on_nonfinite="raise")
    losses = staircase_losses(30)
    losses[11] = float("nan")
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, verbose=False)
    trainer = make_trainer(max_steps=30, callbacks=[callback, DivergenceGuard(max_nonfinite_steps=1,
                                                                              check_every_n_steps=1)])
    with pytest.raises(TrainingDiverged) as stopped:
        trainer.fit(ScriptedModule(losses))
    assert stopped.value.step == 12 and callback.nonfinite_count == 1


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "interval, make",
    [
        ("step", lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
        ("step", lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1.0)),
        ("epoch", lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),  # recomputes: undoes it too
    ],
)
def test_scheduler_that_would_undo_the_callback_is_refused_with_the_alternative(interval, make):
    scheduler = {"scheduler": make, "interval": interval}
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE)
    message = rf"owns the learning rate.*interval=\"{interval}\".*compose_with_step_schedulers=True"
    with pytest.raises(MisconfigurationException, match=message):
        make_trainer(max_steps=5, callbacks=[callback]).fit(ScriptedModule(staircase_losses(5), scheduler=scheduler))


def test_plateau_scheduler_is_left_alone():
    plateau = lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1000)  # noqa: E731
    scheduler = {"scheduler": plateau, "interval": "step", "monitor": "train_loss"}

    class Monitored(ScriptedModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    losses = staircase_losses(40)
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, verbose=False)
    make_trainer(max_steps=40, callbacks=[callback]).fit(Monitored(losses, scheduler=scheduler))
    assert [(s, f) for s, f, _ in callback.decisions] == detector_decisions("fastface", FASTFACE, losses)


def test_epoch_interval_multiplicative_scheduler_composes():
    losses = staircase_losses(60)
    step_lr = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    scheduler = {"scheduler": step_lr, "interval": "epoch"}
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, verbose=False)
    model = ScriptedModule(losses, batches_per_epoch=20, scheduler=scheduler)
    make_trainer(max_steps=60, callbacks=[callback]).fit(model)
    decided = detector_decisions("fastface", FASTFACE, losses)
    assert [(s, f) for s, f, _ in callback.decisions] == decided
    scale = expected_lrs(decided, 60)
    expected = [scale[i] * 0.5 ** (i // 20) for i in range(60)]
    assert model.lrs == pytest.approx(expected, rel=1e-12)


def test_compose_with_lambda_lr_multiplies_its_lr_by_the_cumulative_scale():
    losses = staircase_losses(70)
    warmup = lambda step: min(1.0, (step + 1) / 10)  # noqa: E731  linear warm-up over 10 steps
    scheduler = {"scheduler": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup), "interval": "step"}
    callback = FastFaceLRCallback(
        "fastface", detector_kwargs=FASTFACE, sync_every_n_steps=2, compose_with_step_schedulers=True, verbose=False
    )
    model = ScriptedModule(losses, scheduler=scheduler)
    make_trainer(max_steps=70, callbacks=[callback]).fit(model)
    decided = detector_decisions("fastface", FASTFACE, losses)
    assert [(s, f) for s, f, _ in callback.decisions] == decided and len(decided) >= 2
    scale = [lr / LR0 for lr in expected_lrs(decided, 70, delay_to_block=2)]
    assert model.lrs == pytest.approx([LR0 * warmup(i) * scale[i] for i in range(70)], rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_accumulate, expected_patience", [(1, 6), (2, 3)])
def test_patience_fraction_resolves_from_estimated_stepping_batches(n_accumulate, expected_patience):
    callback = FastFaceLRCallback("fastface", detector_kwargs={"alpha": 0.5, "beta": 0.5}, patience_fraction=0.1)
    assert callback.detector is None
    trainer = make_trainer(max_epochs=3, accumulate_grad_batches=n_accumulate, callbacks=[callback])
    trainer.fit(ScriptedModule(staircase_losses(60), batches_per_epoch=20))
    assert trainer.estimated_stepping_batches == 60 // n_accumulate
    assert callback.detector.patience == expected_patience


def test_default_patience_is_five_percent_of_the_run_for_fastface():
    callback = FastFaceLRCallback("fastface", verbose=False)
    make_trainer(max_steps=40, callbacks=[callback]).fit(ScriptedModule(staircase_losses(40)))
    assert callback.detector.patience == 2  # int(0.05 · 40)
    mh = FastFaceLRCallback("moving_haar", detector_kwargs={"window": 5})
    assert mh.detector.patience == 10  # 2·window, known at once


def test_signals_are_logged_to_csv_every_log_every_n_steps(tmp_path):
    losses = staircase_losses(40)
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, sync_every_n_steps=3, verbose=False)
    logger = CSVLogger(tmp_path, name="run", version=0)
    make_trainer(tmp_path, max_steps=40, logger=logger, log_every_n_steps=5, callbacks=[callback]).fit(
        ScriptedModule(losses)
    )
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("fastface/lr")]
    keys = {"fastface/loss", "fastface/smoothed_loss", "fastface/signal", "fastface/threshold",
            "fastface/stationary_count", "fastface/num_decisions", "fastface/lr_scale", "fastface/lr"}
    assert keys <= set(rows[0])
    assert [int(row["step"]) for row in rows] == [4, 9, 14, 19, 24, 29, 34, 39]  # optimizer steps 5, 10, ... 40
    assert [float(row["fastface/loss"]) for row in rows] == pytest.approx(losses[4::5], rel=1e-6)
    assert float(rows[-1]["fastface/num_decisions"]) == len(callback.decisions) > 0
    assert float(rows[-1]["fastface/lr"]) == pytest.approx(LR0 * callback.lr_scale)


def test_min_lr_floor():
    losses = staircase_losses(150)
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, min_lr=0.03, verbose=False)
    model = ScriptedModule(losses)
    make_trainer(max_steps=150, callbacks=[callback]).fit(model)
    assert len(callback.decisions) >= 3  # 0.1 → 0.05 → 0.03 (floored) → 0.03
    assert [lr for _, _, lr in callback.decisions[:3]] == pytest.approx([0.05, 0.03, 0.03])
    assert min(model.lrs) == pytest.approx(0.03)


def test_decision_is_reported_with_step_reason_and_lr(caplog):
    losses = staircase_losses(40)
    with caplog.at_level("INFO"):
        callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE)
        make_trainer(max_steps=40, callbacks=[callback]).fit(ScriptedModule(losses))
    step, _, lr = callback.decisions[0]
    assert f"optimizer step {step}: loss stationary for 5 steps: signal" in caplog.text
    assert f"-> {lr:.6g}" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        mh = FastFaceLRCallback("moving_haar", detector_kwargs=MOVING_HAAR)
        make_trainer(max_steps=40, callbacks=[mh]).fit(ScriptedModule(losses))
    step, factor, lr = next(d for d in mh.decisions if d[1] > 1)
    assert f"optimizer step {step}: restart ×4" in caplog.text and f"LR ×4 -> {lr:.6g}" in caplog.text


class TwoOptimizerModule(LightningModule):
    """Manual optimization with two optimizers (two param groups in the first)."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.losses = losses
        self.a = torch.nn.Parameter(torch.zeros(1))
        self.b = torch.nn.Parameter(torch.zeros(1))
        self.c = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        value = self.losses[self.trainer.fit_loop.epoch_loop.total_batch_idx]
        loss = sum((p - p.detach()).sum() for p in self.parameters()) + value
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        return loss

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(len(self.losses), 1)), batch_size=1)

    def configure_optimizers(self):
        first = torch.optim.SGD([{"params": [self.a], "lr": 0.1}, {"params": [self.b], "lr": 0.01}])
        second = torch.optim.Adam([self.c], lr=0.002)
        return first, second


def test_every_param_group_of_every_optimizer_is_scaled_alike():
    losses = staircase_losses(60)
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, verbose=False)
    model = TwoOptimizerModule(losses)
    trainer = make_trainer(max_epochs=1, callbacks=[callback])
    trainer.fit(model)
    decided = detector_decisions("fastface", FASTFACE, losses)
    assert [(s, f) for s, f, _ in callback.decisions] == decided  # one update per batch, not per optimizer
    scale = math.prod(f for _, f in decided)
    lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
    assert lrs == pytest.approx([0.1 * scale, 0.01 * scale, 0.002 * scale])


class SilentModule(TwoOptimizerModule):
    """Manual optimization whose training_step returns nothing: the callback cannot see a loss."""

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)


def test_steps_without_a_loss_are_skipped_with_one_warning():
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, verbose=False)
    with pytest.warns(UserWarning, match="returned no loss at optimizer step 1.*Return the loss tensor") as caught:
        make_trainer(max_epochs=1, callbacks=[callback]).fit(SilentModule(staircase_losses(20)))
    assert sum("returned no loss" in str(w.message) for w in caught) == 1
    assert callback.steps_observed == 20 and callback.detector.steps_seen == 0


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(detector="adam"), "Unknown detector 'adam'"),
        (dict(patience=-1), "patience must be an int >= 0"),
        (dict(patience=2.5), "patience must be an int >= 0"),
        (dict(patience_fraction=0.0), r"patience_fraction must be a finite number in \(0, 1\]"),
        (dict(patience_fraction=1.5), r"patience_fraction must be a finite number in \(0, 1\]"),
        (dict(patience=10, patience_fraction=0.1), "either patience .* or patience_fraction"),
        (dict(detector_kwargs={"patience": 3}, patience=4), "patience is given twice"),
        (dict(min_lr=-1e-3), r"min_lr must be a finite number in \[0, inf\)"),
        (dict(sync_every_n_steps=0), "sync_every_n_steps must be an int >= 1"),
        (dict(verbose="yes"), "verbose must be True or False"),
        (dict(detector_kwargs={"alpha": 2.0}), "alpha must be"),
        (dict(detector="moving_haar", detector_kwargs={"window": 1}), "window must be an int >= 2"),
        (dict(detector=FastFaceDetector(patience=3), patience=5), "carries its own patience"),
        (dict(detector=MovingHaarDetector(window=4), patience_fraction=0.1), "carries its own patience"),
        (dict(detector=FastFaceDetector(patience=3), detector_kwargs={"alpha": 0.1}), "detector_kwargs only apply"),
    ],
)
def test_invalid_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastFaceLRCallback(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(detector=3.0), "detector must be 'fastface', 'moving_haar' or a detector instance"),
    (dict(detector_kwargs=[("alpha", 0.1)]), "detector_kwargs must be a dict"),
    (dict(name=3), "name must be a string"),
])
def test_arguments_of_the_wrong_type_raise_type_errors(kwargs, message):
    with pytest.raises(TypeError, match=message):
        FastFaceLRCallback(**kwargs)


def test_infinite_run_length_needs_patience_in_steps():
    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield torch.zeros(1)

    class EndlessModule(ScriptedModule):
        def train_dataloader(self):
            return DataLoader(Endless(), batch_size=1)

    callback = FastFaceLRCallback("fastface", patience_fraction=0.05)
    with pytest.raises(MisconfigurationException, match=r"iterable dataset\) and max_steps is not set"):
        make_trainer(max_epochs=1, callbacks=[callback]).fit(EndlessModule(staircase_losses(5)))


# ----------------------------------------------------------------------------------------------------------
# The LR in ordinary Lightning setups: schedulers beside the callback, manual optimization, resumes, logging.
def sequential_warmup_cosine(optimizer):
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[1])


@pytest.mark.parametrize("make, culprit", [
    (sequential_warmup_cosine, r"SequentialLR\(LinearLR, CosineAnnealingLR\)"),
    (lambda opt: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, 2)]),
     r"ChainedScheduler\(StepLR, CosineAnnealingWarmRestarts\)"),
])
def test_epoch_interval_wrapper_that_recomputes_the_lr_is_refused(make, culprit):
    scheduler = {"scheduler": make, "interval": "epoch"}
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE)
    with pytest.raises(MisconfigurationException, match=rf"owns the learning rate, but a {culprit}.*LinearLR"):
        make_trainer(max_steps=5, callbacks=[callback]).fit(ScriptedModule(staircase_losses(5), scheduler=scheduler))


def test_chained_multiplicative_schedulers_compose_as_they_are():
    chained = lambda opt: torch.optim.lr_scheduler.ChainedScheduler(  # noqa: E731
        [torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)])
    losses = staircase_losses(60)
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, verbose=False)
    model = ScriptedModule(losses, scheduler={"scheduler": chained, "interval": "epoch"})
    make_trainer(max_steps=60, callbacks=[callback]).fit(model)
    scale = expected_lrs(detector_decisions("fastface", FASTFACE, losses), 60)
    assert model.lrs == pytest.approx([scale[i] * 0.45 ** (i // 20) for i in range(60)], rel=1e-12)


def test_composed_sequential_lr_keeps_the_decisions_at_its_milestone():
    # An epoch-interval SequentialLR resets the LR to its base value at its milestone: composed, the decisions stay.
    losses = staircase_losses(100)
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, compose_with_step_schedulers=True,
                                  verbose=False)
    model = ScriptedModule(losses, batches_per_epoch=20,
                           scheduler={"scheduler": sequential_warmup_cosine, "interval": "epoch"})
    make_trainer(max_steps=100, callbacks=[callback]).fit(model)
    decided = detector_decisions("fastface", FASTFACE, losses)
    assert len(decided) >= 3
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0)
    sequential, own = sequential_warmup_cosine(reference), []
    for epoch in range(5):
        own += [reference.param_groups[0]["lr"]] * 20
        reference.step()
        sequential.step()
    scale = [lr / LR0 for lr in expected_lrs(decided, 100)]
    assert model.lrs == pytest.approx([o * s for o, s in zip(own, scale)], rel=1e-12)


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10),
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=25, gamma=0.5),
])
def test_compose_with_a_multiplicative_step_scheduler_does_not_compound_the_scale(make):
    # The cumulative scale is applied once, not again at every step after the first decision (0.05, 0.025, ...).
    losses = staircase_losses(90)
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, sync_every_n_steps=2,
                                  compose_with_step_schedulers=True, verbose=False)
    model = ScriptedModule(losses, scheduler={"scheduler": make, "interval": "step"})
    make_trainer(max_steps=90, callbacks=[callback]).fit(model)
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0)
    scheduler, own = make(reference), []
    for _ in range(90):
        own.append(reference.param_groups[0]["lr"])
        reference.step()
        scheduler.step()
    decided = detector_decisions("fastface", FASTFACE, losses)
    assert len(decided) >= 2
    scale = [lr / LR0 for lr in expected_lrs(decided, 90, delay_to_block=2)]
    assert model.lrs == pytest.approx([o * s for o, s in zip(own, scale)], rel=1e-12)
    # The optimizer keeps the scheduler's own LR between steps (what a checkpoint stores).
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"])


@pytest.mark.parametrize("limits", [dict(max_epochs=1), dict(max_epochs=5, max_steps=120)])
def test_patience_fraction_counts_the_steps_the_detector_sees_under_manual_optimization(limits):
    # Two optimizers step per batch: global_step advances by 2, the detector sees one value per batch (60 here).
    # P = 0.1 · 60 under both limits, not int(0.1 · estimated_stepping_batches) (12 with max_steps=120).
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE_NO_PATIENCE, patience_fraction=0.1,
                                  verbose=False)
    trainer = make_trainer(callbacks=[callback], **limits)
    trainer.fit(TwoOptimizerModule(staircase_losses(60)))
    assert trainer.global_step == 120 and callback.steps_observed == 60
    assert callback.detector.patience == 6


def test_state_loaded_into_a_run_that_is_already_done_is_kept(tmp_path):
    # fit(ckpt_path=...) at max_steps never reaches on_train_start: state_dict() still writes the loaded detector.
    losses = staircase_losses(40)
    first = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, verbose=False)
    trainer = make_trainer(tmp_path, max_steps=40, callbacks=[first], enable_checkpointing=True)
    trainer.fit(ScriptedModule(losses))
    ckpt = tmp_path / "done.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first.decisions

    second = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, verbose=False)
    trainer = make_trainer(tmp_path, max_steps=40, callbacks=[second], enable_checkpointing=True)
    trainer.fit(ScriptedModule(losses), ckpt_path=ckpt)
    assert second.decisions == first.decisions and second.detector.steps_seen == 40
    trainer.save_checkpoint(tmp_path / "again.ckpt")
    state = torch.load(tmp_path / "again.ckpt", weights_only=False)["callbacks"][second.state_key]
    assert state["scheduler"]["last_step"] == 40 and state["scheduler"]["detector"]["steps_seen"] == 40
    assert [tuple(d) for d in state["scheduler"]["decisions"]] == first.decisions


def test_resume_with_a_changed_setting_continues_the_detector_under_the_new_value(tmp_path, caplog):
    # The state key holds no setting, so the detector continues instead of silently restarting from scratch.
    losses = staircase_losses(60)
    first = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, verbose=False)
    trainer = make_trainer(tmp_path, max_steps=30, callbacks=[first], enable_checkpointing=True)
    trainer.fit(ScriptedModule(losses))
    trainer.save_checkpoint(tmp_path / "half.ckpt")

    changed = dict(FASTFACE, threshold=2e-3)
    second = FastFaceLRCallback("fastface", detector_kwargs=changed, verbose=False)
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, max_steps=60, callbacks=[second]).fit(ScriptedModule(losses),
                                                                     ckpt_path=tmp_path / "half.ckpt")
    assert "threshold 0.001 -> 0.002" in caplog.text
    assert second.detector.steps_seen == 60 and second.detector.threshold == 2e-3
    expected = build_detector("fastface", **FASTFACE)
    before = replay(expected, losses[:30]).decisions
    expected.load_state_dict(dict(expected.state_dict(), threshold=2e-3))
    assert [(s, f) for s, f, _ in second.decisions] == before + replay(expected, losses[30:60]).decisions


def test_resume_with_a_longer_run_recomputes_the_patience_and_says_so(tmp_path, caplog):
    losses = staircase_losses(120)
    kwargs = dict(detector="fastface", detector_kwargs=FASTFACE_NO_PATIENCE, patience_fraction=0.1, verbose=False)
    first = FastFaceLRCallback(**kwargs)
    trainer = make_trainer(tmp_path, max_steps=40, callbacks=[first], enable_checkpointing=True)
    trainer.fit(ScriptedModule(losses))
    assert first.detector.patience == 4
    trainer.save_checkpoint(tmp_path / "short.ckpt")

    second = FastFaceLRCallback(**kwargs)
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, max_steps=120, callbacks=[second]).fit(ScriptedModule(losses),
                                                                      ckpt_path=tmp_path / "short.ckpt")
    assert second.detector.patience == 12 and second.detector.steps_seen == 120
    assert "this run is T = 120 optimizer steps" in caplog.text
    assert "is now 12 (the checkpoint had T = 40, P = 4)" in caplog.text


def test_logged_lr_is_the_lr_each_step_ran_with(tmp_path):
    # With k > 1 a decision's new LR is not logged for the steps of its block that still ran with the old one.
    losses = staircase_losses(80)
    callback = FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, sync_every_n_steps=8, verbose=False)
    logger = CSVLogger(tmp_path, name="run", version=0)
    model = ScriptedModule(losses)
    make_trainer(tmp_path, max_steps=80, logger=logger, log_every_n_steps=1, callbacks=[callback]).fit(model)
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        logged = {int(row["step"]) + 1: float(row["fastface/lr"]) for row in csv.DictReader(handle)
                  if row.get("fastface/lr")}
    assert sorted(logged) == list(range(1, 81))
    assert any(s % 8 for s, _, _ in callback.decisions)  # some decision inside a block
    assert [logged[step] for step in range(1, 81)] == model.lrs


def test_a_nonfinite_loss_raises_the_same_error_from_the_detector_and_the_plain_loop_scheduler():
    from fastface_pl.scheduling.lr_scheduler import FastFaceLR

    with pytest.raises(NonFiniteLossError):
        FastFaceDetector(patience=1).update(math.nan)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0)
    with pytest.raises(NonFiniteLossError):
        FastFaceLR(optimizer, FastFaceDetector(patience=1), on_nonfinite="raise").step(math.inf)
