"""The cooldown and stop modes: the pure ending, FastFaceLR in a plain loop (docs/cooldown.md)."""

from __future__ import annotations

import math

import pytest
import torch
from test_callback import staircase_losses

from fastface_pl.scheduling.detectors import FastFaceDetector
from fastface_pl.scheduling.ending import RunEnding, cooldown_factor
from fastface_pl.scheduling.lr_scheduler import FastFaceLR
from fastface_pl.scheduling.replay import replay

LR0 = 0.1
DETECTOR = {"alpha": 0.5, "beta": 0.5, "threshold": 1e-3, "patience": 4}


def sgd(lr: float = LR0) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def falling(n: int) -> list[float]:
    """A loss that never stops falling fast: no stationary stretch for any detector here."""
    return [10.0 - 0.05 * t for t in range(n)]


def lrs_of(scheduler: FastFaceLR, losses: list[float]) -> list[float]:
    """The LR of each optimizer step 1..n (read before the step, as the optimizer uses it)."""
    out = []
    for value in losses:
        out.append(scheduler.optimizers[0].param_groups[0]["lr"])
        scheduler.step(value)
    return out


# ---------------------------------------------------------------------------------------------------------- shape
@pytest.mark.parametrize("shape, rule", [("1-sqrt", lambda p: 1 - math.sqrt(p)), ("linear", lambda p: 1 - p)])
def test_cooldown_factor_is_its_definition(shape, rule):
    start, end = 10, 30
    values = [cooldown_factor(t, start, end, shape) for t in range(1, 40)]
    assert values[:start] == [1.0] * start
    for t in range(start + 1, end + 1):
        assert values[t - 1] == pytest.approx(rule((t - start) / (end - start + 1)), abs=1e-15)
    assert all(a > b for a, b in zip(values[start - 1:end - 1], values[start:end]))  # falls every cooldown step
    assert values[end - 1] > 0 and values[end:] == [values[end - 1]] * (39 - end)  # never zero; held after the end


def test_the_1_minus_sqrt_cooldown_spends_longer_low_than_linear():
    sqrt = [cooldown_factor(t, 0, 100, "1-sqrt") for t in range(1, 101)]
    linear = [cooldown_factor(t, 0, 100, "linear") for t in range(1, 101)]
    assert sum(sqrt) < sum(linear)


# ---------------------------------------------------------------------------------------------------------- ending
def test_a_cooldown_needs_a_budget_and_says_what_to_do():
    with pytest.raises(ValueError, match="total_steps.*mode='stop'"):
        RunEnding("cooldown")
    with pytest.raises(ValueError, match="total_steps.*mode='stop'"):
        FastFaceLR(sgd(), FastFaceDetector(**DETECTOR), mode="cooldown")


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "anneal"}, "mode must be one of"), ({"shape": "cosine"}, "cooldown_shape must be one of"),
    ({"latest_start": 1.5}, "latest_cooldown_start"), ({"cooldown_fraction": 0}, "cooldown_fraction"),
])
def test_bad_ending_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunEnding(**{"mode": "stop", **kwargs})


def test_the_stop_cooldown_lasts_c_times_t_d_and_the_budget_caps_it():
    ending = RunEnding("stop", cooldown_fraction=0.5)
    ending.begin(101, "loss stationary")
    assert (ending.start, ending.end, ending.stop_step) == (101, 152, 152)  # ⌈0.5·101⌉ = 51 steps
    capped = RunEnding("stop", cooldown_fraction=0.5, total_steps=130)
    capped.begin(101, "loss stationary")
    assert capped.end == 130
    capped.set_total_steps(1000)  # a resumed run with a larger budget: the end follows
    assert capped.end == 152


def test_the_latest_point_is_wsd():
    ending = RunEnding("cooldown", total_steps=1000)
    assert not ending.begin_if_due(800)  # steps 1..800 run at the full LR
    assert ending.begin_if_due(801) and (ending.start, ending.end) == (800, 1000)
    assert "latest point" in ending.reason
    assert RunEnding("stop").latest_start_step is None  # no budget, no latest point


@pytest.mark.parametrize("edit, match", [
    ({"start": -1}, "start"), ({"start": 5, "end": None}, "both None"), ({"start": 9, "end": 3}, "end >= start"),
    ({"mode": "sideways"}, "mode"), ({"reason": 3}, "reason"),
])
def test_a_tampered_ending_state_is_refused_naming_the_key(edit, match):
    ending = RunEnding("stop", total_steps=100)
    ending.begin(40, "loss stationary")
    with pytest.raises(ValueError, match=match):
        RunEnding().load_state_dict({**ending.state_dict(), **edit})


# ---------------------------------------------------------------------------------------------------------- FastFaceLR
def test_cooldown_mode_anneals_from_the_first_decision_to_zero_at_t():
    losses = staircase_losses(200, seed=2)
    t_d = replay(FastFaceDetector(**DETECTOR), losses).decisions[0][0]  # the halving mode's first decision
    scheduler = FastFaceLR(sgd(), FastFaceDetector(**DETECTOR), total_steps=200, mode="cooldown")
    lrs = lrs_of(scheduler, losses)
    assert scheduler.ending.start == t_d < 0.8 * 200
    assert lrs == pytest.approx([LR0 * cooldown_factor(t, t_d, 200, "1-sqrt") for t in range(1, 201)], rel=1e-12)
    assert len(scheduler.decisions) == 1 and scheduler.decisions[0][0] == t_d
    assert scheduler.detector.steps_seen == t_d  # the detector's work ends at t_d
    assert lrs[-1] < 0.2 * LR0 and not scheduler.should_stop  # the budget, not the scheduler, ends this run


def test_cooldown_mode_without_a_stationary_stretch_is_wsd():
    scheduler = FastFaceLR(sgd(), FastFaceDetector(**DETECTOR), total_steps=100, mode="cooldown",
                           cooldown_shape="linear")
    lrs = lrs_of(scheduler, falling(100))
    assert scheduler.detector.num_reductions == 0 and scheduler.ending.start == 80
    assert lrs == pytest.approx([LR0 * cooldown_factor(t, 80, 100, "linear") for t in range(1, 101)], rel=1e-12)


def test_stop_mode_says_when_and_why():
    losses = staircase_losses(400, seed=3)
    scheduler = FastFaceLR(sgd(), FastFaceDetector(**DETECTOR), mode="stop", cooldown_fraction=1.0)
    steps = 0
    for value in losses:
        scheduler.step(value)
        steps += 1
        if scheduler.should_stop:
            break
    t_d = scheduler.ending.start
    assert steps == 2 * t_d and scheduler.stop_reason.startswith(f"the cooldown that began after optimizer step {t_d}")
    assert f"ends at step {2 * t_d}" in scheduler.stop_reason


@pytest.mark.parametrize("budget", [None, 600, 2400])
def test_stop_mode_decides_the_same_whatever_the_budget(budget):
    # The auto rule's α, β, λ and P come from horizon_steps: the budget only caps the cooldown.
    losses = [max(3.0, 10.0 - 0.05 * t) + 0.01 * math.sin(t) for t in range(600)]
    scheduler = FastFaceLR(sgd(), "fastface", total_steps=budget, mode="stop", horizon_steps=300)
    for value in losses:
        scheduler.step(value)
        if scheduler.should_stop:
            break
    assert scheduler.detector.settings.total_steps == 300
    # The loss is flat from step 140; P = int(0.05·300) = 15: the same t_d = 160 and stop 2·160 for every budget.
    assert (scheduler.ending.start, scheduler.ending.end, scheduler.last_step) == (160, 320, 320)


def test_stop_mode_with_the_auto_rule_needs_a_horizon():
    with pytest.raises(ValueError, match="horizon_steps"):
        FastFaceLR(sgd(), "fastface", total_steps=1000, mode="stop")
    with pytest.raises(ValueError, match="mode='stop' only"):
        FastFaceLR(sgd(), "fastface", total_steps=1000, mode="cooldown", horizon_steps=10)


def test_a_resumed_cooldown_continues_the_same_lrs():
    losses = staircase_losses(200, seed=4)
    whole = FastFaceLR(sgd(), FastFaceDetector(**DETECTOR), total_steps=200, mode="cooldown")
    expected = lrs_of(whole, losses)
    first = FastFaceLR(sgd(), FastFaceDetector(**DETECTOR), total_steps=200, mode="cooldown")
    lrs = lrs_of(first, losses[:120])
    assert first.ending.started  # interrupted inside the cooldown
    optimizer = sgd()
    optimizer.load_state_dict(first.optimizers[0].state_dict())
    resumed = FastFaceLR(optimizer, FastFaceDetector(**DETECTOR), total_steps=200, mode="cooldown")
    resumed.load_state_dict(first.state_dict())
    lrs += lrs_of(resumed, losses[120:])
    assert lrs == expected
    assert resumed.decisions == whole.decisions and resumed.ending.state_dict() == whole.ending.state_dict()


def test_halve_mode_is_the_paper_and_ignores_the_ending():
    losses = staircase_losses(200, seed=2)
    scheduler = FastFaceLR(sgd(), FastFaceDetector(**DETECTOR), total_steps=200)
    lrs = lrs_of(scheduler, losses)
    reference = replay(FastFaceDetector(**DETECTOR), losses)
    assert [(s, f) for s, f, _ in scheduler.decisions] == reference.decisions
    assert lrs[-1] == pytest.approx(LR0 * reference.lr_scale) and not scheduler.ending.started
