"""The O(1) detectors equal their direct definitions (docs/scheduler.md) on random and real streams."""

from __future__ import annotations

import math
import random

import pytest

from fastface_pl.scheduling.detectors import FastFaceDetector, MovingHaarDetector
from fastface_pl.scheduling.replay import expand_loss_log, load_loss_log, replay


@pytest.fixture(scope="module")
def real_stream() -> list[float]:
    return expand_loss_log(load_loss_log())


def random_stream(length: int, seed: int) -> list[float]:
    """Exponential decay with plateaus, noise and a few spikes, like a face-recognition loss."""
    rng = random.Random(seed)
    out = []
    for t in range(length):
        level = 3.0 + 40.0 * math.exp(-t / (length / 6)) + (2.0 if (t // 700) % 3 == 0 else 0.0)
        out.append(level + rng.gauss(0.0, 0.5) + (8.0 if rng.random() < 0.002 else 0.0))
    return out


# --------------------------------------------------------------------------------------------------
# FastFace: the two-stage definition EMA_alpha -> Haar difference -> EMA_beta
# --------------------------------------------------------------------------------------------------
def two_stage_signals(losses, alpha, beta):
    """(L^E_t, D^E_t) per step from the definition: L^E_0 = L_0, D_t = L^E_{t-1} - L^E_t, D^E_1 = D_1."""
    smoothed, signal, out = None, None, []
    for t, loss in enumerate(losses):
        if t == 0:
            smoothed = loss
            out.append((smoothed, None))
            continue
        previous = smoothed
        smoothed = alpha * loss + (1 - alpha) * smoothed
        difference = previous - smoothed
        signal = difference if t == 1 else beta * difference + (1 - beta) * signal
        out.append((smoothed, signal))
    return out


def two_stage_decisions(signals, threshold, patience, max_decays):
    count, decisions = 0, []
    for step, (_, signal) in enumerate(signals, start=1):
        if signal is None:
            continue
        if signal < threshold:
            count += 1
            if count > patience and len(decisions) < max_decays:
                decisions.append(step)
                count = 0
        else:
            count = 0
    return decisions


@pytest.mark.parametrize("alpha, beta", [(1e-3, 1e-3), (0.01, 0.05), (0.3, 0.7), (1.0, 1.0), (0.5, 1e-3)])
@pytest.mark.parametrize("stream", ["random", "real"])
def test_fastface_recurrence_equals_two_stage_definition(alpha, beta, stream, real_stream):
    losses = random_stream(30_000, seed=11) if stream == "random" else real_stream[:60_000]
    reference = two_stage_signals(losses, alpha, beta)
    scale = max(abs(s) for _, s in reference[1:])
    detector = FastFaceDetector(alpha=alpha, beta=beta, patience=100)
    worst = 0.0
    for loss, (smoothed, signal) in zip(losses, reference):
        detector.update(loss)
        assert detector.smoothed_loss == pytest.approx(smoothed, rel=1e-12)
        if signal is None:
            assert detector.signal is None
        else:
            worst = max(worst, abs(detector.signal - signal))
    # The paper's recurrence has a double pole at 1 - alpha: rounding grows like 1/alpha, still ~1e-10.
    assert worst <= 1e-9 * scale


def test_fastface_recurrence_makes_the_two_stage_decisions_on_the_real_curve(real_stream):
    patience = int(0.05 * 202_320)
    decided = replay(FastFaceDetector(patience=patience), real_stream).decisions
    reference = two_stage_decisions(two_stage_signals(real_stream, 1e-3, 1e-3), 5e-5, patience, 8)
    assert [step for step, _ in decided] == reference
    assert reference[0] == 94_269


# --------------------------------------------------------------------------------------------------
# Moving Haar: the direct O(window) formula
# --------------------------------------------------------------------------------------------------
def direct_average(losses, t, m):
    """a_t = mean(y_{t-m+1} ... y_t)."""
    return math.fsum(losses[t - m + 1:t + 1]) / m


def direct_signal(averages, t, m):
    """S_t = (sum a_{t-m} .. a_{t-m+h-1} - sum a_{t-m+h} .. a_{t-1}) / m, h = floor(m/2)."""
    h = m // 2
    return (math.fsum(averages[t - m:t - m + h]) - math.fsum(averages[t - m + h:t])) / m


def direct_moving_haar(losses, m, threshold, patience, decay=2.0, restart_after=3):
    """Signals and decisions of the Moving Haar rule, O(m) per step, written from docs/scheduler.md."""
    averages = [direct_average(losses, t, m) if t >= m - 1 else None for t in range(len(losses))]
    signals, decisions, count, run = [], [], 0, 0
    for t in range(len(losses)):
        if t < 2 * m:
            signals.append(None)
            continue
        signal = direct_signal(averages, t, m)
        signals.append(signal)
        if signal < threshold:
            count += 1
            if count > patience:
                if restart_after is not None and run >= restart_after:
                    decisions.append((t + 1, decay ** (run - 1)))
                    run = 0
                else:
                    decisions.append((t + 1, 1 / decay))
                    run += 1
                count = 0
        else:
            count, run = 0, 0
    return averages, signals, decisions


def close(a, b, scale):
    return abs(a - b) <= 1e-9 * max(abs(b), scale)


@pytest.mark.parametrize("window", [2, 3, 4, 5, 8, 11, 64, 101])
def test_moving_haar_running_sums_equal_direct_formula(window):
    losses = random_stream(max(30 * window, 3000), seed=window)
    averages, signals, decisions = direct_moving_haar(losses, window, threshold=0.01, patience=window)
    detector = MovingHaarDetector(window=window, threshold=0.01, patience=window)
    decided = []
    for t, loss in enumerate(losses):
        factor = detector.update(loss)
        if factor != 1.0:
            decided.append((t + 1, factor))
        if averages[t] is None:
            assert detector.smoothed_loss is None
        else:
            assert detector.smoothed_loss == pytest.approx(averages[t], rel=1e-12)
        if signals[t] is None:
            assert detector.signal is None
        else:
            assert close(detector.signal, signals[t], scale=1e-3), (t, detector.signal, signals[t])
    assert decided == decisions
    assert len(decisions) >= 2


def test_moving_haar_equals_direct_formula_on_a_slice_of_the_real_curve(real_stream):
    m = 500
    losses = real_stream[40_000:40_000 + 12 * m]
    averages, signals, decisions = direct_moving_haar(losses, m, threshold=0.06, patience=2 * m)
    detector = MovingHaarDetector(window=m)
    decided = []
    for t, loss in enumerate(losses):
        factor = detector.update(loss)
        if factor != 1.0:
            decided.append((t + 1, factor))
        if signals[t] is not None:
            assert close(detector.signal, signals[t], scale=1e-3), t
    assert decided == decisions


def test_moving_haar_running_sums_do_not_drift_over_the_whole_real_curve(real_stream):
    m, h = 4000, 2000
    # The log has 4 decimals: integer prefix sums give every window sum exactly, in O(1).
    scaled = [round(loss * 10_000) for loss in real_stream]
    assert all(abs(k / 10_000 - loss) < 1e-9 for k, loss in zip(scaled[::97], real_stream[::97]))
    prefix = [0]
    for k in scaled:
        prefix.append(prefix[-1] + k)

    def average(j):  # a_j, exactly rounded
        return (prefix[j + 1] - prefix[j - m + 1]) / (m * 10_000)

    detector = MovingHaarDetector(window=m)
    checked = 0
    for t, loss in enumerate(real_stream):
        detector.update(loss)
        if t >= 2 * m and t % 2999 == 0:
            expected = (math.fsum(average(j) for j in range(t - m, t - m + h))
                        - math.fsum(average(j) for j in range(t - m + h, t))) / m
            assert close(detector.signal, expected, scale=1e-3), (t, detector.signal, expected)
            assert detector.smoothed_loss == pytest.approx(average(t), rel=1e-12)
            checked += 1
    assert checked >= 60
