"""The FastFace auto rule (fastface_pl/scheduling/auto.py): on the real MS1MV3 curve and on synthetic ones."""

from __future__ import annotations

import math
import pickle
import random

import pytest
import torch

from fastface_pl.scheduling.auto import (
    PAPER_TOTAL_STEPS,
    AutoFastFaceDetector,
    calibration_steps,
    estimate_noise,
    fastface_auto_settings,
)
from fastface_pl.scheduling.detectors import FastFaceDetector, NonFiniteLossError
from fastface_pl.scheduling.lr_scheduler import FastFaceLR
from fastface_pl.scheduling.replay import expand_loss_log, load_loss_log, replay

PAPER_DECISIONS = [94_269, 135_926, 156_069, 175_309, 185_426, 195_543]  # FastFace, paper defaults, packaged curve


@pytest.fixture(scope="module")
def ms1mv3_losses() -> list[float]:
    return expand_loss_log(load_loss_log())


def test_real_curve_settings_match_paper_defaults(ms1mv3_losses):
    window = calibration_steps(PAPER_TOTAL_STEPS)
    assert window == 2023  # 1 % of T
    settings = fastface_auto_settings(PAPER_TOTAL_STEPS, ms1mv3_losses[:window])
    assert settings.patience == 10_116  # int(0.05 · T), the paper's
    assert settings.alpha == pytest.approx(1e-3, rel=1e-9) and settings.beta == settings.alpha
    assert settings.threshold == pytest.approx(5e-5, rel=0.01)
    assert not settings.noise_limited  # logged 10-step means carry no per-step noise (σ estimate 0)


def test_real_curve_decisions_close_to_paper(ms1mv3_losses):
    auto = replay(AutoFastFaceDetector(PAPER_TOTAL_STEPS), ms1mv3_losses)
    paper = replay(FastFaceDetector(patience=int(0.05 * PAPER_TOTAL_STEPS)), ms1mv3_losses)
    assert [step for step, _ in paper.decisions] == PAPER_DECISIONS
    steps = [step for step, _ in auto.decisions]
    assert len(steps) == len(PAPER_DECISIONS)
    for found, expected in zip(steps, PAPER_DECISIONS):
        assert abs(found - expected) <= 0.001 * PAPER_TOTAL_STEPS, (steps, PAPER_DECISIONS)


def _synthetic_curve(total: int, level: float, noise: float, plateau_at: float, seed: int = 0) -> list[float]:
    """A loss that falls like 1/(1 + t/τ) until ``plateau_at``·T, then stays flat, with white noise."""
    rng = random.Random(seed)
    knee = int(plateau_at * total)
    clean = [level * (0.3 + 0.7 / (1 + min(t, knee) / (0.05 * total))) for t in range(total)]
    return [value + rng.gauss(0.0, noise) for value in clean]


def test_synthetic_curve_decides_on_the_plateau_not_before():
    total = 4000
    losses = _synthetic_curve(total, level=20.0, noise=0.5, plateau_at=0.5)
    detector = AutoFastFaceDetector(total)
    result = replay(detector, losses)
    settings = detector.settings
    assert settings.noise == pytest.approx(0.5, rel=0.5)  # estimated from 50 losses
    assert settings.noise_limited  # a short noisy run needs a longer window than T/202
    assert 1 / settings.alpha <= settings.patience / 2
    first = result.decisions[0][0]
    assert 0.5 * total < first < 0.5 * total + 3 * settings.patience  # once the plateau starts, within ~3·P


def test_paper_values_decide_nothing_in_a_short_run_but_auto_does():
    """The reason for the rule: α = 1e-3 and λ = 5e-5 do not fit a 4,000-step run with a loss near 20."""
    total = 4000
    losses = _synthetic_curve(total, level=20.0, noise=0.5, plateau_at=0.4)
    paper = replay(FastFaceDetector(patience=int(0.05 * total)), losses)
    auto = replay(AutoFastFaceDetector(total), losses)
    assert len(auto.decisions) >= 1
    assert paper.decisions == [] or paper.decisions[0][0] < 0.4 * total  # none, or a false early one


def test_threshold_scales_with_loss_level_and_run_length():
    losses = _synthetic_curve(3000, level=10.0, noise=0.1, plateau_at=0.5)[:30]
    base = fastface_auto_settings(3000, losses)
    scaled = fastface_auto_settings(3000, [4.0 * v for v in losses])
    assert scaled.threshold == pytest.approx(4.0 * base.threshold)
    assert scaled.alpha == pytest.approx(base.alpha)  # noise and threshold scale together: same window
    longer = fastface_auto_settings(30_000, losses)
    assert longer.threshold == pytest.approx(base.threshold / 10)
    assert longer.patience == 1500 and base.patience == 150


def test_decisions_are_invariant_to_the_loss_units():
    """λ follows the loss level, so the same run in other units (×7) decides on the same steps."""
    total = 3000
    losses = _synthetic_curve(total, level=5.0, noise=0.2, plateau_at=0.5, seed=3)
    one = replay(AutoFastFaceDetector(total), losses).decisions
    seven = replay(AutoFastFaceDetector(total), [7.0 * v for v in losses]).decisions
    assert one and [s for s, _ in one] == [s for s, _ in seven]


def test_auto_detector_equals_a_fastface_detector_fed_from_step_one():
    total = 2000
    losses = _synthetic_curve(total, level=8.0, noise=0.3, plateau_at=0.3, seed=1)
    auto = AutoFastFaceDetector(total)
    assert auto.threshold is None and auto.steps_seen == 0 and auto.num_reductions == 0
    auto_result = replay(auto, losses)
    plain = FastFaceDetector(**auto.settings.detector_kwargs(), decay=2.0, max_decays=8)
    assert replay(plain, losses).decisions == auto_result.decisions
    assert auto.signal == plain.signal and auto.stationary_count == plain.stationary_count


@pytest.mark.parametrize("cut", [10, 500])  # during the calibration window, and after it
def test_auto_detector_resumes_exactly(cut):
    total = 2000
    losses = _synthetic_curve(total, level=8.0, noise=0.3, plateau_at=0.3, seed=2)
    whole = replay(AutoFastFaceDetector(total), losses).decisions
    first = AutoFastFaceDetector(total)
    replay(first, losses[:cut])
    second = AutoFastFaceDetector(total)
    second.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    assert whole and replay(second, losses[cut:]).decisions == [d for d in whole if d[0] > cut]


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="at least 3 losses"):
        fastface_auto_settings(1000, [1.0, 2.0])
    with pytest.raises(ValueError, match="pass alpha, beta and threshold explicitly"):
        fastface_auto_settings(1000, [-1.0, -2.0, -1.5])
    with pytest.raises(ValueError, match="NaN or infinite"):
        fastface_auto_settings(1000, [1.0, math.nan, 1.0])
    with pytest.raises(ValueError, match="total_steps"):
        fastface_auto_settings(0, [1.0, 1.0, 1.0])
    with pytest.raises(NonFiniteLossError, match="finite"):
        AutoFastFaceDetector(100).update(math.inf)
    with pytest.raises(ValueError, match="AutoFastFaceDetector.state_dict"):
        AutoFastFaceDetector(100).load_state_dict(FastFaceDetector(patience=3).state_dict())


def test_noise_estimate_ignores_the_trend():
    rng = random.Random(5)
    trend = [100.0 - 0.05 * t + rng.gauss(0.0, 1.0) for t in range(4000)]
    assert estimate_noise(trend) == pytest.approx(1.0, rel=0.05)
    spiky = list(trend)
    spiky[100:4000:100] = [v + 50.0 for v in spiky[100:4000:100]]  # rare loss spikes barely move it
    assert estimate_noise(spiky) == pytest.approx(1.0, rel=0.1)
    from_50 = [estimate_noise(_synthetic_curve(4000, 20.0, 0.5, 0.5, seed=s)[:50]) for s in range(20)]
    assert sum(from_50) / 20 == pytest.approx(0.5, rel=0.1)  # unbiased from a calibration window
    assert estimate_noise([3.0] * 50) == 0.0


def test_fastface_lr_drives_the_optimizer_with_the_auto_detector():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = FastFaceLR(optimizer, AutoFastFaceDetector(400))
    for t in range(100):  # falls by 0.025 a step to 2.0 at step 41, then flat; P = 20
        scheduler.step(torch.tensor(max(2.0, 3.0 - 0.025 * t)))
    assert scheduler.decisions[0][:2] == (67, 0.5)  # 20 stationary steps after the signal sinks below λ
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** len(scheduler.decisions))


def test_auto_detector_resolves_again_for_a_new_run_length():
    """A resumed run that is longer gets the settings of its new T, from the saved calibration losses."""
    losses = _synthetic_curve(2000, level=8.0, noise=0.3, plateau_at=0.3, seed=4)
    first = AutoFastFaceDetector(2000)
    replay(first, losses[:500])
    state = first.state_dict()
    state["total_steps"] = 4000
    resumed = AutoFastFaceDetector(2000)
    resumed.load_state_dict(state)
    expected = fastface_auto_settings(4000, losses[: first.calibration_steps])
    assert resumed.total_steps == 4000 and resumed.settings == expected
    assert resumed.patience == 200 and resumed.threshold == pytest.approx(first.threshold / 2)
    assert resumed.steps_seen == 500 and resumed.signal == first.signal  # the stream continues


def test_callback_without_settings_uses_the_auto_rule():
    """FastFaceLRCallback("fastface") with no α, β, λ or P: the rule's settings, decisions as a plain detector's."""
    from test_callback import ScriptedModule, make_trainer

    from fastface_pl.scheduling.callback import FastFaceLRCallback

    total = 240
    losses = _synthetic_curve(total, level=6.0, noise=0.05, plateau_at=0.4, seed=6)
    callback = FastFaceLRCallback("fastface", sync_every_n_steps=4, verbose=False)
    module = ScriptedModule(losses, batches_per_epoch=40)
    make_trainer(max_epochs=6, callbacks=[callback]).fit(module)
    detector = callback.detector
    losses = torch.tensor(losses, dtype=torch.float32).tolist()  # what the callback reads from the fp32 losses
    assert isinstance(detector, AutoFastFaceDetector) and detector.total_steps == total
    assert detector.settings == fastface_auto_settings(total, losses[: detector.calibration_steps])
    plain = FastFaceDetector(**detector.settings.detector_kwargs())
    expected = replay(plain, losses).decisions
    assert expected and [(step, factor) for step, factor, _ in callback.decisions] == expected


def test_explicit_settings_and_presets_keep_the_paper_rule():
    from fastface_pl.scheduling.callback import FastFaceLRCallback
    from fastface_pl.scheduling.lr_scheduler import uses_auto_settings
    from fastface_pl.scheduling.hydra_factories import lr_callback

    assert uses_auto_settings("fastface", {}) and uses_auto_settings("fastface", {"decay": 3.0})
    assert not uses_auto_settings("fastface", {"threshold": 5e-5}) and not uses_auto_settings("moving_haar", {})
    assert lr_callback("fastface", decay=2.0, max_decays=8)._detector_kwargs == {"decay": 2.0, "max_decays": 8}
    assert lr_callback("fastface", threshold=5e-5)._detector_kwargs["threshold"] == 5e-5  # explicit stays explicit
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert isinstance(FastFaceLR(optimizer, "fastface", patience=10).detector, FastFaceDetector)
    assert isinstance(FastFaceLR(optimizer, "fastface", total_steps=100).detector, AutoFastFaceDetector)
    explicit = FastFaceLRCallback("fastface", detector_kwargs={"alpha": 0.01}, patience=10).detector
    assert type(explicit) is FastFaceDetector and explicit.alpha == 0.01


def test_repr_while_calibrating_and_after():
    detector = AutoFastFaceDetector(1000)
    detector.update(3.0)
    assert "calibrating: 1/" in repr(detector)  # FastFaceLR's repr includes it: it must not fail mid-calibration
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert "AutoFastFaceDetector" in repr(FastFaceLR(optimizer, detector))
    for step in range(200):
        detector.update(3.0 - 1e-3 * step)
    assert "FastFaceDetector" in repr(detector) and "calibrating" not in repr(detector)
