"""Unit tests of the FastFace and Moving Haar detectors: every rule as a table, validation, state."""

from __future__ import annotations

import copy
import json
import math
import pickle
import random
import subprocess
import sys

import pytest

from fastface_pl.scheduling.detectors import (
    DETECTOR_NAMES,
    FastFaceDetector,
    MovingHaarDetector,
    NonFiniteLossError,
    build_detector,
)


def run(detector, losses):
    """Feeds ``losses``; returns the factors returned at every step."""
    return [detector.update(loss) for loss in losses]


def decided(factors):
    """(1-based step, factor) of every factor other than 1.0."""
    return [(step, factor) for step, factor in enumerate(factors, start=1) if factor != 1.0]


def plateau_stream(length: int, seed: int) -> list[float]:
    """A noisy loss that falls in steps and then stays flat: it makes both detectors decide."""
    rng = random.Random(seed)
    level, out = 20.0, []
    for t in range(length):
        if t % 400 == 0:
            level *= 0.7
        out.append(level + rng.gauss(0.0, 0.05))
    return out


# --------------------------------------------------------------------------------------------------
# FastFace rules. With alpha = beta = 1 the signal is the raw difference D^E_t = L_{t-1} - L_t, so a
# step is stationary exactly when the loss fell by less than the threshold (0.5 here).
# --------------------------------------------------------------------------------------------------
RAW = dict(alpha=1.0, beta=1.0, threshold=0.5)

FASTFACE_TABLE = [
    # (id, kwargs, losses, expected decisions (1-based step, factor))
    ("first step never counts", dict(patience=0), [5.0], []),
    ("patience 0 decides every stationary step", dict(patience=0), [5.0] * 4, [(2, 0.5), (3, 0.5), (4, 0.5)]),
    ("P stationary steps: no decision", dict(patience=3), [5.0] * 4, []),
    ("P+1 stationary steps: decision", dict(patience=3), [5.0] * 5, [(5, 0.5)]),
    ("count restarts from 0 after a decision", dict(patience=2), [5.0] * 7, [(4, 0.5), (7, 0.5)]),
    ("count restarts: not one step early", dict(patience=2), [5.0] * 6, [(4, 0.5)]),
    ("falling step resets the count", dict(patience=2), [5.0, 5.0, 5.0, 4.0, 4.0, 4.0, 4.0], [(7, 0.5)]),
    ("falling by exactly the threshold is not stationary", dict(patience=0), [5.0, 4.5, 4.0], []),
    ("rising loss is stationary", dict(patience=1), [5.0, 6.0, 7.0], [(3, 0.5)]),
    ("cap: at most max_decays", dict(patience=0, max_decays=2), [5.0] * 6, [(2, 0.5), (3, 0.5)]),
    ("cap 0: never decides", dict(patience=0, max_decays=0), [5.0] * 6, []),
    ("no cap", dict(patience=0, max_decays=None), [5.0] * 12, [(s, 0.5) for s in range(2, 13)]),
    ("decay 4", dict(patience=1, decay=4.0), [5.0] * 3, [(3, 0.25)]),
]


@pytest.mark.parametrize("kwargs, losses, expected", [row[1:] for row in FASTFACE_TABLE],
                         ids=[row[0] for row in FASTFACE_TABLE])
def test_fastface_rules(kwargs, losses, expected):
    detector = FastFaceDetector(**RAW, **kwargs)
    assert decided(run(detector, losses)) == expected
    assert detector.num_reductions == len(expected)


def test_fastface_default_cap_is_eight_then_factor_one_forever():
    detector = FastFaceDetector(**RAW, patience=0)
    factors = run(detector, [5.0] * 30)
    assert detector.num_reductions == 8
    assert factors[1:9] == [0.5] * 8 and set(factors[9:]) == {1.0}
    assert detector.stationary_count == 30 - 1 - 8  # keeps counting after the cap


def test_fastface_consistent_seed_and_properties():
    detector = FastFaceDetector(alpha=0.1, beta=0.2, patience=5)
    assert detector.signal is None and detector.smoothed_loss is None and detector.steps_seen == 0
    detector.update(10.0)
    assert detector.signal is None and detector.smoothed_loss == 10.0
    detector.update(8.0)
    # D^E_1 = D_1 = alpha * (L_0 - L_1); L^E_1 = 0.1 * 8 + 0.9 * 10
    assert detector.signal == pytest.approx(0.1 * 2.0)
    assert detector.smoothed_loss == pytest.approx(9.8)
    detector.update(8.0)
    # D_2 = L^E_1 - L^E_2 = 0.1 * (9.8 - 8); D^E_2 = 0.2 * D_2 + 0.8 * D^E_1
    assert detector.signal == pytest.approx(0.2 * 0.18 + 0.8 * 0.2)
    assert detector.steps_seen == 3 and detector.patience == 5 and detector.threshold == 5e-5


# --------------------------------------------------------------------------------------------------
# Moving Haar rules. With window m = 2: a_t = (y_{t-1} + y_t)/2 and S_t = (a_{t-2} - a_{t-1})/2
# = (y_{t-3} - y_{t-1})/4; steps t >= 4 (1-based >= 5) count; patience 2m = 4. A drop of 10 at
# 1-based step k makes steps k+1 and k+2 non-stationary (threshold 0.5).
# --------------------------------------------------------------------------------------------------
def drop_at(length: int, k: int | None) -> list[float]:
    return [20.0 if k is None or step < k else 10.0 for step in range(1, length + 1)]


MOVING_HAAR_TABLE = [
    ("warm-up: first 2m steps never count", dict(), drop_at(8, None), []),
    ("decides on the (P+1)-th counted step", dict(), drop_at(9, None), [(9, 0.5)]),
    ("three halvings then restart x4", dict(), drop_at(29, None),
     [(9, 0.5), (14, 0.5), (19, 0.5), (24, 4.0), (29, 0.5)]),
    ("non-stationary step resets count and run", dict(), drop_at(27, 20),
     [(9, 0.5), (14, 0.5), (19, 0.5), (27, 0.5)]),
    ("warm-up steps do not reset", dict(), drop_at(9, 2), [(9, 0.5)]),
    ("first counted step can reset", dict(), drop_at(10, 3), [(10, 0.5)]),
    ("patience 0", dict(patience=0), drop_at(9, None), [(5, 0.5), (6, 0.5), (7, 0.5), (8, 4.0), (9, 0.5)]),
    ("restart factor decay**(R-1), decay 3", dict(patience=0, decay=3.0), drop_at(8, None),
     [(5, 1 / 3), (6, 1 / 3), (7, 1 / 3), (8, 9.0)]),
    ("restart after 2", dict(patience=0, restart_after=2), drop_at(8, None),
     [(5, 0.5), (6, 0.5), (7, 2.0), (8, 0.5)]),
    ("no restart", dict(patience=0, restart_after=None), drop_at(9, None), [(s, 0.5) for s in range(5, 10)]),
    ("cap on reductions, no restart after it", dict(patience=0, max_decays=3), drop_at(12, None),
     [(5, 0.5), (6, 0.5), (7, 0.5)]),
    ("cap 2", dict(patience=0, max_decays=2), drop_at(12, None), [(5, 0.5), (6, 0.5)]),
]


@pytest.mark.parametrize("kwargs, losses, expected", [row[1:] for row in MOVING_HAAR_TABLE],
                         ids=[row[0] for row in MOVING_HAAR_TABLE])
def test_moving_haar_rules(kwargs, losses, expected):
    detector = MovingHaarDetector(window=2, threshold=0.5, **kwargs)
    assert decided(run(detector, losses)) == expected
    assert detector.num_reductions == sum(factor < 1.0 for _, factor in expected)


def test_moving_haar_signal_values_window_2():
    detector = MovingHaarDetector(window=2, threshold=0.5)
    losses = [9.0, 7.0, 4.0, 3.0, 1.0, 1.0]
    signals, averages = [], []
    for loss in losses:
        detector.update(loss)
        signals.append(detector.signal)
        averages.append(detector.smoothed_loss)
    assert averages == [None, 8.0, 5.5, 3.5, 2.0, 1.0]
    # S_t = (y_{t-3} - y_{t-1}) / 4 for t >= 4
    assert signals[:4] == [None] * 4
    assert signals[4] == pytest.approx((7.0 - 3.0) / 4) and signals[5] == pytest.approx((4.0 - 1.0) / 4)


def test_moving_haar_odd_window_uses_floor_half():
    # m = 3, h = 1: S_t = (a_{t-3} - a_{t-2} - a_{t-1}) / 3, so a constant loss c gives S = -c/3.
    detector = MovingHaarDetector(window=3)
    factors = run(detector, [6.0] * 13)
    assert detector.signal == pytest.approx(-2.0)
    assert detector.patience == 6
    assert decided(factors) == [(13, 0.5)]  # counts from step 7, (P+1)-th counted step is 13


def test_moving_haar_default_patience_is_twice_window():
    assert MovingHaarDetector(window=4000).patience == 8000
    assert MovingHaarDetector(window=10, patience=3).patience == 3


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
INVALID = [
    (FastFaceDetector, dict(alpha=0.0, patience=1), "alpha", "(0, 1]"),
    (FastFaceDetector, dict(alpha=1.5, patience=1), "alpha", "(0, 1]"),
    (FastFaceDetector, dict(alpha=math.nan, patience=1), "alpha", "(0, 1]"),
    (FastFaceDetector, dict(beta=-0.1, patience=1), "beta", "(0, 1]"),
    (FastFaceDetector, dict(beta="0.1", patience=1), "beta", "(0, 1]"),
    (FastFaceDetector, dict(threshold=math.inf, patience=1), "threshold", "finite"),
    (FastFaceDetector, dict(patience=-1), "patience", ">= 0"),
    (FastFaceDetector, dict(patience=1.5), "patience", ">= 0"),
    (FastFaceDetector, dict(patience=True), "patience", ">= 0"),
    (FastFaceDetector, dict(patience=1, decay=1.0), "decay", "(1, inf)"),
    (FastFaceDetector, dict(patience=1, decay=0.5), "decay", "(1, inf)"),
    (FastFaceDetector, dict(patience=1, decay=math.inf), "decay", "(1, inf)"),
    (FastFaceDetector, dict(patience=1, max_decays=-1), "max_decays", ">= 0"),
    (MovingHaarDetector, dict(window=1), "window", ">= 2"),
    (MovingHaarDetector, dict(window=2.0), "window", ">= 2"),
    (MovingHaarDetector, dict(window=4, threshold=math.nan), "threshold", "finite"),
    (MovingHaarDetector, dict(window=4, patience=-3), "patience", "2*window"),
    (MovingHaarDetector, dict(window=4, decay=1.0), "decay", "(1, inf)"),
    (MovingHaarDetector, dict(window=4, restart_after=0), "restart_after", ">= 1"),
    (MovingHaarDetector, dict(window=4, max_decays=-2), "max_decays", ">= 0"),
]


@pytest.mark.parametrize("cls, kwargs, argument, allowed", INVALID)
def test_invalid_arguments_name_argument_value_and_range(cls, kwargs, argument, allowed):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert message.startswith(argument)
    assert allowed in message
    assert repr(kwargs[argument]) in message


def test_fastface_patience_is_required():
    with pytest.raises(TypeError, match="patience"):
        FastFaceDetector()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("make", [lambda: FastFaceDetector(patience=3), lambda: MovingHaarDetector(window=3)])
def test_nonfinite_loss_raises_and_leaves_state_untouched(make, bad):
    detector = make()
    run(detector, plateau_stream(20, seed=1))
    before = detector.state_dict()
    with pytest.raises(NonFiniteLossError, match="finite"):
        detector.update(bad)
    assert detector.state_dict() == before


def test_non_numeric_loss_is_a_type_error():
    with pytest.raises(TypeError, match="real number"):
        FastFaceDetector(patience=1).update(object())


def test_loss_accepts_int_and_float_subclasses():
    detector = FastFaceDetector(**RAW, patience=0)
    assert run(detector, [5, 5]) == [1.0, 0.5]


def test_build_detector():
    assert isinstance(build_detector("fastface", patience=3), FastFaceDetector)
    detector = build_detector("moving_haar", window=8, threshold=0.1)
    assert isinstance(detector, MovingHaarDetector) and detector.window == 8 and detector.threshold == 0.1
    with pytest.raises(ValueError) as info:
        build_detector("cosine")
    assert "'cosine'" in str(info.value)
    assert all(repr(name) in str(info.value) for name in DETECTOR_NAMES)


def test_repr_shows_arguments_and_progress():
    detector = MovingHaarDetector(window=5, restart_after=None)
    run(detector, [1.0] * 3)
    text = repr(detector)
    assert "MovingHaarDetector(window=5" in text and "restart_after=None" in text and "steps_seen=3" in text
    assert "patience=10116" in repr(FastFaceDetector(patience=10116))


def test_detectors_do_not_import_torch_or_numpy():
    code = ("import sys; import fastface_pl.scheduling.detectors; "
            "bad = [m for m in ('torch', 'lightning', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# State: resume mid-stream behaves exactly like an uninterrupted run
# --------------------------------------------------------------------------------------------------
def trajectory(detector, losses):
    return [(detector.update(loss), detector.signal, detector.smoothed_loss, detector.stationary_count)
            for loss in losses]


FACTORIES = {
    "fastface": (lambda: FastFaceDetector(alpha=0.05, beta=0.05, threshold=1e-3, patience=60),
                 lambda: FastFaceDetector(patience=1)),
    "moving_haar": (lambda: MovingHaarDetector(window=25, threshold=0.01, patience=40),
                    lambda: MovingHaarDetector(window=25)),
}


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("cut", [0, 1, 2, 24, 49, 50, 51, 777, 1500])
@pytest.mark.parametrize("transport", ["json", "pickle_state", "pickle_detector", "deepcopy"])
def test_resume_mid_stream_continues_exactly(name, cut, transport):
    make, make_other = FACTORIES[name]
    losses = plateau_stream(3000, seed=7)
    reference = make()
    expected = trajectory(reference, losses)
    factors = [factor for factor, *_ in expected]
    assert len(decided(factors)) >= 4  # the stream exercises decisions, the cap / the restarts
    assert reference.num_reductions == 8 if name == "fastface" else 4.0 in factors

    first = make()
    trajectory(first, losses[:cut])
    if transport == "json":
        resumed = make_other()  # other hyperparameters: the state restores them
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    elif transport == "pickle_state":
        resumed = make_other()
        resumed.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    elif transport == "pickle_detector":
        resumed = pickle.loads(pickle.dumps(first))
    else:
        resumed = copy.deepcopy(first)
    assert trajectory(resumed, losses[cut:]) == expected[cut:]
    assert resumed.state_dict() == reference.state_dict()


def test_moving_haar_restart_survives_resume():
    detector = MovingHaarDetector(window=2, threshold=0.5, patience=0)
    run(detector, [20.0] * 7)  # three halvings, r = 3
    assert detector.run_decays == 3
    resumed = MovingHaarDetector(window=2)
    resumed.load_state_dict(detector.state_dict())
    assert resumed.update(20.0) == 4.0 and resumed.run_decays == 0


def test_load_state_rejects_other_detector_type_and_newer_version():
    fast_state = FastFaceDetector(patience=3).state_dict()
    with pytest.raises(ValueError, match="FastFaceDetector.*MovingHaarDetector"):
        MovingHaarDetector(window=4).load_state_dict(fast_state)
    with pytest.raises(ValueError, match="version"):
        FastFaceDetector(patience=3).load_state_dict({**fast_state, "version": 99})
    bad = MovingHaarDetector(window=4).state_dict()
    bad["losses"] = bad["losses"][:-1]
    with pytest.raises(ValueError, match="corrupt"):
        MovingHaarDetector(window=4).load_state_dict(bad)


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("key", ["steps_seen", "num_reductions", "patience", "smoothed_loss"])
def test_load_state_names_a_missing_key(name, key):
    make, _ = FACTORIES[name]
    first = make()
    run(first, plateau_stream(200, seed=3))
    state = first.state_dict()
    del state[key]
    with pytest.raises(ValueError, match=repr(key)):
        make().load_state_dict(state)


def test_a_detector_keeps_no_decisions_or_lr_scale():
    detector = FastFaceDetector(**RAW, patience=0)
    assert decided(run(detector, [5.0, 5.0])) == [(2, 0.5)]
    assert not hasattr(detector, "decisions") and not hasattr(detector, "lr_scale")
    assert not {"decisions", "lr_scale"} & set(detector.state_dict())
    with pytest.raises(AttributeError):
        detector.patience = 3


def test_docstring_examples_run():
    import doctest

    from fastface_pl.scheduling import detectors

    outcome = doctest.testmod(detectors, raise_on_error=False, verbose=False)
    assert outcome.attempted >= 4 and outcome.failed == 0
