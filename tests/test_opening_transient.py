"""The opening-transient guard (``wait_for_descent``, docs/scheduler.md): no decision before the loss has
started to fall, and the authors' MS1MV3 replay deciding exactly as without it."""

from __future__ import annotations

import pickle
import random

import pytest

from fastface_pl.scheduling.auto import PAPER_TOTAL_STEPS, AutoFastFaceDetector
from fastface_pl.scheduling.detectors import FastFaceDetector
from fastface_pl.scheduling.lr_scheduler import FastFaceLR
from fastface_pl.scheduling.replay import expand_loss_log, load_loss_log, replay

PAPER_DECISIONS = [94_269, 135_926, 156_069, 175_309, 185_426, 195_543]  # FastFace, paper defaults, packaged curve


@pytest.fixture(scope="module")
def ms1mv3_losses() -> list[float]:
    return expand_loss_log(load_loss_log())


def _margin_loss_curve(total: int, flat: int, seed: int = 0) -> list[float]:
    """A margin loss as it starts: flat (slightly rising) for ``flat`` steps, then falling, then a floor."""
    rng = random.Random(seed)
    losses = []
    for t in range(total):
        if t < flat:
            clean = 30.0 + 0.002 * t  # the margin keeps the loss up while the features are random
        else:
            clean = 12.0 + 18.0 * 0.5 ** ((t - flat) / (0.08 * total))
        losses.append(clean + rng.gauss(0.0, 0.1))
    return losses


@pytest.mark.parametrize("seed", range(5))
def test_the_guard_keeps_the_opening_plateau_undecided(seed):
    total, flat = 2000, 150  # the flat opening is longer than the patience (P = 100)
    losses = _margin_loss_curve(total, flat, seed)
    settings = dict(alpha=0.05, beta=0.05, threshold=0.222 * 30 / total, patience=int(0.05 * total))
    paper = replay(FastFaceDetector(**settings), losses)
    guarded_detector = FastFaceDetector(**settings, wait_for_descent=True)
    guarded = replay(guarded_detector, losses)
    assert paper.decisions and paper.decisions[0][0] <= flat  # the paper's rule decides in the opening
    assert guarded.decisions, "the guard must not switch the detector off"
    assert guarded.decisions[0][0] > flat + settings["patience"]  # only once the loss has fallen and stalled
    assert guarded_detector.descended


def test_the_auto_rule_waits_for_the_descent():
    total, flat = 2000, 150
    losses = _margin_loss_curve(total, flat)
    detector = AutoFastFaceDetector(total)
    result = replay(detector, losses)
    assert detector.detector.wait_for_descent
    assert result.decisions and result.decisions[0][0] > flat + detector.settings.patience


def test_a_loss_that_never_falls_gets_no_decision_under_the_guard():
    detector = FastFaceDetector(patience=1, wait_for_descent=True)
    assert [detector.update(3.0) for _ in range(10)] == [1.0] * 10
    assert detector.stationary_count == 0 and not detector.descended
    plain = FastFaceDetector(patience=1)
    assert [plain.update(3.0) for _ in range(4)] == [1.0, 1.0, 0.5, 1.0]  # the paper's rule, unchanged


def test_the_real_curve_decides_exactly_as_before(ms1mv3_losses):
    patience = int(0.05 * PAPER_TOTAL_STEPS)
    plain = replay(FastFaceDetector(patience=patience), ms1mv3_losses)
    guarded = replay(FastFaceDetector(patience=patience, wait_for_descent=True), ms1mv3_losses)
    auto = replay(AutoFastFaceDetector(PAPER_TOTAL_STEPS), ms1mv3_losses)
    assert [step for step, _ in plain.decisions] == PAPER_DECISIONS
    assert guarded.decisions == plain.decisions
    assert [step for step, _ in auto.decisions] == PAPER_DECISIONS


@pytest.mark.parametrize("cut", [5, 100, 160, 900])
def test_the_guard_resumes_exactly(cut):
    losses = _margin_loss_curve(2000, 150)
    settings = dict(alpha=0.05, beta=0.05, threshold=0.003, patience=100, wait_for_descent=True)
    whole = FastFaceDetector(**settings)
    expected = [whole.update(v) for v in losses]
    first = FastFaceDetector(**settings)
    head = [first.update(v) for v in losses[:cut]]
    second = FastFaceDetector(patience=1)  # settings come from the state
    second.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    assert second.wait_for_descent and second.descended == first.descended
    assert head + [second.update(v) for v in losses[cut:]] == expected


def test_the_guard_state_is_checked():
    detector = FastFaceDetector(patience=3, wait_for_descent=True)
    for value in (5.0, 4.0, 3.0):
        detector.update(value)
    state = detector.state_dict()
    state["descended"] = "yes"
    with pytest.raises(ValueError, match="descended"):
        FastFaceDetector(patience=3).load_state_dict(state)
    with pytest.raises(TypeError, match="wait_for_descent"):
        FastFaceDetector(patience=3, wait_for_descent=1)


def test_fastface_lr_applies_no_decay_in_the_opening():
    import torch

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = FastFaceLR(optimizer, FastFaceDetector(alpha=0.05, beta=0.05, threshold=0.003, patience=100,
                                                       wait_for_descent=True))
    for value in _margin_loss_curve(2000, 150)[:250]:
        scheduler.step(value)
    assert optimizer.param_groups[0]["lr"] == 0.1 and scheduler.decisions == []
