"""Every place a Lightning or PyTorch user puts the scheduler: it works exactly or refuses at once, naming the way
that works (docs/lightning.md, "Where the scheduler can go")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
import test_callback
from test_callback import FASTFACE, LR0, RecordingSGD, ScriptedModule, make_trainer, staircase_losses
from test_callback_ddp import base_losses, rank_offsets

from fastface_pl import FastFaceLR
from fastface_pl.scheduling.callback import FastFaceLRCallback
from fastface_pl.scheduling.detectors import FastFaceDetector
from fastface_pl.scheduling.lr_scheduler import LRChangedError
from fastface_pl.scheduling.replay import replay

pytestmark = test_callback.pytestmark  # Lightning's chatter about tiny loaders, resumes and logging intervals


def callback(**kwargs) -> FastFaceLRCallback:
    return FastFaceLRCallback("fastface", detector_kwargs=FASTFACE, verbose=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------- 1 SWA
def test_stochastic_weight_averaging_is_refused_before_training_naming_ema():
    module = ScriptedModule(staircase_losses(40))
    trainer = make_trainer(max_epochs=2, callbacks=[callback(), StochasticWeightAveraging(swa_lrs=0.02,
                                                                                          swa_epoch_start=1)])
    with pytest.raises(MisconfigurationException, match="StochasticWeightAveraging.*EMAWeightAveraging"):
        trainer.fit(module)
    assert module.lrs == []  # refused before any optimizer step


def test_ema_weight_averaging_leaves_the_lr_to_the_callback():
    module = ScriptedModule(staircase_losses(60))
    lr_callback = callback()
    make_trainer(max_steps=60, callbacks=[lr_callback, EMAWeightAveraging()]).fit(module)
    assert lr_callback.decisions
    assert module.lrs == pytest.approx(lrs_of(lr_callback.decisions, 60))  # the LR in use is the one reported


def lrs_of(decisions, steps: int) -> list[float]:
    """The LR of optimizer steps 1..steps that the decisions (step, factor, lr) imply: each from the next step."""
    factors = {step: factor for step, factor, _ in decisions}
    out, lr = [], LR0
    for step in range(1, steps + 1):
        out.append(lr)
        lr *= factors.get(step, 1.0)
    return out


# ---------------------------------------------------------------------------------------------------------- 3 named
def test_two_named_callbacks_with_a_logger_and_a_monitor_are_refused_before_training(tmp_path):
    module = ScriptedModule(staircase_losses(40))
    first, second = callback(name="backbone"), callback(name="head")
    trainer = make_trainer(tmp_path, max_steps=40, logger=CSVLogger(tmp_path, name="run", version=0),
                           callbacks=[first, second, EarlyStopping(monitor="fastface/num_decisions", mode="max")])
    with pytest.raises(MisconfigurationException, match="2 FastFaceLRCallbacks.*compound.*Keep one"):
        trainer.fit(module)
    assert module.lrs == [] and first.decisions == [] and second.decisions == []


# ---------------------------------------------------------------------------------------------------------- 4
class ReturnsFastFaceLR(ScriptedModule):
    """What a Lightning user writes for ReduceLROnPlateau, with FastFaceLR."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=LR0)
        scheduler = FastFaceLR(optimizer, FastFaceDetector(patience=2))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "monitor": "train_loss"}}


def test_configure_optimizers_returning_fastface_lr_is_refused_naming_the_callback():
    module = ReturnsFastFaceLR(staircase_losses(20))
    with pytest.raises(TypeError, match="configure_optimizers.*FastFaceLRCallback"):
        make_trainer(max_steps=20).fit(module)
    assert module.lrs == []


# ---------------------------------------------------------------------------------------------------------- 5 plain
def plain_loop(compose: bool, steps: int = 12) -> tuple[list[float], FastFaceLR]:
    """A LambdaLR warm-up stepped beside FastFaceLR; returns the LR each optimizer step used (read inside it)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    used: list[float] = []
    optimizer = RecordingSGD([weight], lr=LR0, record=used.append)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    scheduler = FastFaceLR(optimizer, FastFaceDetector(alpha=0.5, beta=0.5, threshold=1e-3, patience=1),
                           compose=compose)
    for _ in range(steps):
        weight.grad = torch.ones(1)
        optimizer.step()
        warmup.step()
        scheduler.step(3.0)
    return used, scheduler


def test_a_warmup_stepped_beside_without_compose_is_caught_at_the_next_step():
    with pytest.raises(LRChangedError, match=r"parameter group 0 .*compose=True"):
        plain_loop(compose=False)


def test_a_warmup_stepped_beside_with_compose_is_scaled_exactly():
    used, scheduler = plain_loop(compose=True)
    assert scheduler.decisions and scheduler.lr_scale < 1.0
    warm = [LR0 * min(1.0, (s + 1) / 4) for s in range(12)]
    scale, scales = 1.0, []
    decided = {step: factor for step, factor, _ in scheduler.decisions}
    for step in range(1, 13):
        scales.append(scale)
        scale *= decided.get(step, 1.0)
    assert used == pytest.approx([w * s for w, s in zip(warm, scales)])


@pytest.mark.parametrize("wrap", [
    lambda optimizer, inner: torch.optim.lr_scheduler.ChainedScheduler(inner),
    lambda optimizer, inner: torch.optim.lr_scheduler.SequentialLR(optimizer, inner, milestones=[3]),
])
def test_chained_and_sequential_schedulers_are_refused_naming_compose(wrap):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0)
    inner = [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), FastFaceLR(optimizer, "fastface",
                                                                                      patience=2)]
    with pytest.raises(TypeError, match="ChainedScheduler or SequentialLR.*compose=True"):
        wrap(optimizer, inner)


def test_a_step_without_the_loss_is_refused_with_the_same_guidance():
    scheduler = FastFaceLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0), "fastface", patience=2)
    with pytest.raises(TypeError, match="FastFaceLRCallback"):
        scheduler.step(None)
    with pytest.raises(TypeError, match="FastFaceLRCallback"):  # not an AttributeError: torch's hasattr checks
        hasattr(scheduler, "optimizer")                          # would show their own message instead
    assert len(scheduler.optimizers) == 1


@pytest.mark.parametrize("check", [True, False])
def test_a_multiplicative_scheduler_beside_is_caught_unless_the_change_is_wanted(check):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0)
    epochs = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scheduler = FastFaceLR(optimizer, FastFaceDetector(alpha=0.5, beta=0.5, threshold=1e-3, patience=1),
                           check_lr_changes=check)

    def run() -> None:
        for _ in range(6):
            optimizer.step()
            epochs.step()
            scheduler.step(3.0)

    if check:
        with pytest.raises(LRChangedError, match="multiplicative one .*compounds.*check_lr_changes=False"):
            run()
    else:
        run()  # the user's choice: both multiply the LR
        factors = math.prod(factor for _, factor, _ in scheduler.decisions)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(LR0 * 0.5**3 * factors)


# ---------------------------------------------------------------------------------------------------------- 6 fp16
class Overflowing(ScriptedModule):
    """Every 4th optimizer step's gradient is infinite (the loss stays finite): the GradScaler skips the step."""

    def __init__(self, losses):
        super().__init__(losses)
        self.weight.register_hook(lambda grad: grad * math.inf if self.trainer.global_step % 4 == 1 else grad)


def test_steps_the_fp16_grad_scaler_skips_are_counted_and_fed_like_the_reference_loop():
    module = Overflowing(staircase_losses(32))
    lr_callback = callback()
    scaler = torch.amp.GradScaler("cpu")
    trainer = make_trainer(max_steps=32, callbacks=[lr_callback],
                           plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module)
    assert scaler.get_scale() < 2.0**16  # the scaler did find overflows and backed off
    assert len(module.lrs) < trainer.global_step == 32  # the optimizer's step ran on fewer (lrs: one per run)
    # Counted and fed, as Lightning's global step and arcface_torch's iteration count do (docs/lightning.md)
    assert lr_callback.steps_observed == 32 and lr_callback.detector.steps_seen == 32


# ---------------------------------------------------------------------------------------------------------- 7 resume
def test_a_resume_from_a_checkpoint_without_the_callback_is_numbered_from_the_global_step(tmp_path, caplog):
    losses = staircase_losses(80)
    first = make_trainer(tmp_path, max_steps=30, enable_checkpointing=True)
    first.fit(ScriptedModule(losses))
    first.save_checkpoint(tmp_path / "plain.ckpt")
    lr_callback = callback()
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, max_steps=80, callbacks=[lr_callback]).fit(ScriptedModule(losses),
                                                                          ckpt_path=tmp_path / "plain.ckpt")
    assert "holds no trained state of this callback" in caplog.text and "from 31" in caplog.text
    assert lr_callback.steps_observed == 80 and lr_callback.detector.steps_seen == 50
    assert lr_callback.decisions and min(step for step, _, _ in lr_callback.decisions) > 30
    # the decisions are those of the detector on steps 31..80, numbered by the run's optimizer steps
    replayed = replay(FastFaceDetector(**FASTFACE), losses[30:])
    assert [step for step, _, _ in lr_callback.decisions] == [30 + step for step, _ in replayed.decisions]


class FailsOnce(ScriptedModule):
    """Raises at one global step, once."""

    def __init__(self, losses, fail_at: int):
        super().__init__(losses)
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.fail_at:
            self.fail_at = -1
            raise RuntimeError("a fault in the middle of a block")
        return super().training_step(batch, batch_idx)


def test_a_refit_after_an_exception_mid_block_numbers_on_from_the_steps_trained():
    losses = staircase_losses(60)
    lr_callback = callback(sync_every_n_steps=8)
    module = FailsOnce(losses, fail_at=13)
    trainer = make_trainer(max_steps=40, callbacks=[lr_callback])
    with pytest.raises(RuntimeError, match="a fault"):
        trainer.fit(module)
    assert trainer.global_step == 13 and lr_callback.steps_observed == 13  # 5 steps trained but never read
    trainer.fit(module)  # the same Trainer again: the run continues
    assert trainer.global_step == 40 and lr_callback.steps_observed == 40


# ---------------------------------------------------------------------------------------------------------- 2 ranks
STEPS = 60


def _fabric_loop(fabric, out_dir: str) -> None:
    """Each rank trains a small model set up by Fabric and feeds its own loss to FastFaceLR (rank 0: +offset,
    rank 1: -offset), as a float, as a tensor, and with the averaging turned off."""
    base, offsets = base_losses(STEPS), rank_offsets(STEPS)
    sign = 1.0 if fabric.global_rank == 0 else -1.0
    results = {}
    for name, sync, as_tensor in (("float", None, False), ("tensor", None, True), ("off", False, False)):
        torch.manual_seed(0)
        module = torch.nn.Linear(2, 1)
        model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=LR0))
        scheduler = FastFaceLR(optimizer, FastFaceDetector(alpha=0.5, beta=0.5, threshold=1e-3, patience=4),
                               sync_ranks=sync)
        lrs = []
        for step in range(STEPS):
            fabric.backward(model(torch.ones(4, 2)).mean())  # a constant gradient: the weights follow the LRs
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            optimizer.zero_grad()
            value = base[step] + sign * offsets[step]
            scheduler.step(torch.tensor(value, dtype=torch.float64) if as_tensor else value)
        results[name] = {"decisions": [[s, f] for s, f, _ in scheduler.decisions], "lrs": lrs,
                         "weights": [p.detach().flatten().tolist() for p in model.parameters()]}
    Path(out_dir, f"rank{fabric.global_rank}.json").write_text(json.dumps(results))


def test_fabric_with_two_gloo_ranks_takes_the_same_decisions_on_every_rank(tmp_path):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")  # 2 processes, gloo
    fabric.launch(_fabric_loop, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    base, offsets = base_losses(STEPS), rank_offsets(STEPS)
    mean = [((b + o) + (b - o)) / 2 for b, o in zip(base, offsets)]  # what the all-reduce gives
    expected = [[s, f] for s, f in replay(FastFaceDetector(alpha=0.5, beta=0.5, threshold=1e-3, patience=4),
                                          mean).decisions]
    assert expected
    for name in ("float", "tensor"):
        assert ranks[0][name] == ranks[1][name]  # the same decisions, LRs and weights on both ranks
        assert ranks[0][name]["decisions"] == expected  # those of the mean loss across ranks
    assert ranks[0]["off"]["decisions"] != ranks[1]["off"]["decisions"]  # unsynchronised, the ranks drift apart
    assert ranks[0]["off"]["weights"] != ranks[1]["off"]["weights"]  # and so do their weights


# ---------------------------------------------------------------------------------------------------------- exit codes
def test_every_refusal_here_is_a_usage_error_by_type(tmp_path):
    from fastface_pl.faults import classify_fault
    from fastface_pl.scheduling.callback import TrainerSetupError

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0)
    refusals = [TrainerSetupError("another owner of the LR"), LRChangedError("changed")]
    for make in (lambda: FastFaceLR(optimizer, "fastface", mode="cooldown"),  # a cooldown without a budget
                 lambda: FastFaceLR(optimizer, "fastface", patience=2).step(None),
                 lambda: FastFaceLRCallback("fastface", horizon_steps=10)):  # a horizon outside mode="stop"
        with pytest.raises(Exception) as raised:
            make()
        refusals.append(raised.value)
    for error in refusals:
        outcome = classify_fault(error, tmp_path)
        assert outcome is not None and outcome.exit_code == 2, error
    assert classify_fault(ValueError("too many values to unpack"), tmp_path) is None  # a bug: exit 1
