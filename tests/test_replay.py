"""The real MS1MV3/ResNet100 curve: both detectors reproduce the check figures of docs/scheduler.md."""

from __future__ import annotations

import math

import pytest

from fastface_pl.scheduling.detectors import FastFaceDetector, MovingHaarDetector
from fastface_pl.scheduling.replay import (
    LogRow,
    decision_log_row,
    expand_loss_log,
    load_loss_log,
    logged_lr_changes,
    main,
    replay,
)

TOTAL_STEPS = 202_320
# (log row, new LR) of the twelve logged LR changes (data README), and the factor each implies.
LOGGED_CHANGES = [
    (54280, 0.01, 0.5), (72870, 0.005, 0.5), (94820, 0.0025, 0.5), (113110, 0.00125, 0.5),
    (135870, 0.000625, 0.5), (143870, 0.0003125, 0.5), (151870, 0.00015625, 0.5), (159870, 0.000625, 4.0),
    (175830, 0.0003125, 0.5), (183830, 0.00015625, 0.5), (191830, 0.000078125, 0.5), (199830, 0.0003125, 4.0),
]


@pytest.fixture(scope="module")
def rows() -> list[LogRow]:
    return load_loss_log()


@pytest.fixture(scope="module")
def stream(rows) -> list[float]:
    return expand_loss_log(rows)


def test_packaged_log_loads_and_expands(rows, stream):
    assert len(rows) == 20_231
    assert rows[0] == LogRow(20, 46.5333, 0.02, 0)
    assert rows[-1].step == TOTAL_STEPS and rows[-1].epoch == 4
    assert len(stream) == TOTAL_STEPS
    assert stream[:20] == [46.5333] * 20  # the first row covers steps 1..20
    assert stream[20:30] == [rows[1].loss] * 10 and stream[30] == rows[2].loss
    assert stream[-1] == rows[-1].loss


def test_logged_lr_changes_are_the_twelve_of_the_readme(rows):
    changes = logged_lr_changes(rows)
    assert [row for row, _, _ in changes] == [row for row, _, _ in LOGGED_CHANGES]
    for (_, before, after), (_, new_lr, factor) in zip(changes, LOGGED_CHANGES):
        # the CSV keeps 6 decimals of the LR
        assert after == pytest.approx(new_lr, abs=6e-7)
        assert after / before == pytest.approx(factor, rel=0.01)


def test_moving_haar_reproduces_the_logged_lr_changes(rows, stream):
    detector = MovingHaarDetector(window=4000, threshold=0.06, decay=2.0, restart_after=3)
    assert detector.patience == 8000
    result = replay(detector, stream)
    assert len(result.decisions) == 12
    replayed_rows = [decision_log_row(step) for step, _ in result.decisions]
    expected_rows = [row for row, _, _ in LOGGED_CHANGES]
    expected_rows[4] -= 10  # the fifth lands one log row (10 steps) early: 135860 instead of 135870
    assert replayed_rows == expected_rows
    assert sum(r == row for r, (row, _, _) in zip(replayed_rows, LOGGED_CHANGES)) == 11
    assert [factor for _, factor in result.decisions] == [factor for _, _, factor in LOGGED_CHANGES]
    # products of powers of two are exact: the replayed LRs equal the logged ones exactly
    assert result.lrs(rows[0].lr) == [new_lr for _, new_lr, _ in LOGGED_CHANGES]
    assert result.lr_scale * 0.02 == 0.0003125


def test_fastface_defaults_first_decide_on_step_94269(stream):
    patience = int(0.05 * TOTAL_STEPS)
    assert patience == 10_116
    detector = FastFaceDetector(patience=patience)
    assert (detector.alpha, detector.beta, detector.threshold, detector.decay, detector.max_decays) == (
        1e-3, 1e-3, 5e-5, 2.0, 8)
    result = replay(detector, stream)
    assert result.decisions[0] == (94_269, 0.5)
    assert decision_log_row(94_269) == 94_270  # the halved LR is used from step 94,270 on


def test_replay_record_keeps_per_step_arrays():
    losses = [5.0] * 50
    result = replay(FastFaceDetector(alpha=1.0, beta=1.0, threshold=0.5, patience=9), losses, record=True)
    assert result.recorded and result.steps == 50
    assert len(result.signal) == len(result.smoothed_loss) == len(result.lr_scale_trace) == 50
    assert math.isnan(result.signal[0]) and result.signal[1] == 0.0
    assert result.decisions == [(11, 0.5), (21, 0.5), (31, 0.5), (41, 0.5)]
    assert result.lr_scale_trace[9] == 1.0 and result.lr_scale_trace[10] == 0.5 and result.lr_scale_trace[-1] == 0.0625
    assert result.stationary_count[10] == 0 and result.stationary_count[9] == 9
    assert not replay(FastFaceDetector(patience=1), losses).recorded


def test_replay_of_a_resumed_detector_reports_only_new_decisions():
    detector = FastFaceDetector(alpha=1.0, beta=1.0, threshold=0.5, patience=0)
    replay(detector, [5.0] * 3)
    result = replay(detector, [5.0] * 2)
    assert result.decisions == [(4, 0.5), (5, 0.5)] and result.lr_scale == 0.25


@pytest.mark.parametrize("step, row", [(1, 10), (8, 10), (9, 10), (10, 20), (54272, 54280), (135859, 135860)])
def test_decision_log_row(step, row):
    assert decision_log_row(step) == row


def test_load_loss_log_from_a_file_and_its_errors(tmp_path):
    good = tmp_path / "log.csv"
    good.write_text("# a comment\nstep,loss,lr,epoch\n20,5.0,0.1,0\n30,4.0,0.05,0\n")
    rows = load_loss_log(good)
    assert rows == [LogRow(20, 5.0, 0.1, 0), LogRow(30, 4.0, 0.05, 0)]
    assert expand_loss_log(rows) == [5.0] * 20 + [4.0] * 10
    assert logged_lr_changes(rows) == [(30, 0.1, 0.05)]

    missing = tmp_path / "missing.csv"
    missing.write_text("step,loss\n20,5.0\n")
    with pytest.raises(ValueError, match=r"missing column.*'epoch'.*'lr'"):
        load_loss_log(missing)
    unordered = tmp_path / "unordered.csv"
    unordered.write_text("step,loss,lr,epoch\n20,5.0,0.1,0\n20,4.0,0.1,0\n")
    with pytest.raises(ValueError, match="steps must increase"):
        load_loss_log(unordered)
    broken = tmp_path / "broken.csv"
    broken.write_text("step,loss,lr,epoch\n20,five,0.1,0\n")
    with pytest.raises(ValueError, match="row 2 does not parse"):
        load_loss_log(broken)


def test_cli_prints_decisions_next_to_the_logged_changes(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    moving_haar = out[out.index("Moving Haar ("):]
    assert moving_haar.count(" exact") == 11 and moving_haar.count("-1 row") == 1
    assert "94269" in out[:out.index("Moving Haar (")]


def test_load_loss_log_rejects_a_non_finite_loss(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,loss,lr,epoch\n20,46.5,0.02,0\n30,nan,0.02,0\n")
    with pytest.raises(ValueError, match=r"row 3 \(step 30\) has a non-finite loss"):
        load_loss_log(path)


@pytest.mark.parametrize("argv, message", [
    (["--total-steps", "-5"], "--total-steps must be a positive"),
    (["--total-steps", "0"], "--total-steps must be a positive"),
    (["--window", "1"], "--window must be an integer >= 2"),
])
def test_replay_cli_rejects_bad_arguments(argv, message, capsys):
    from fastface_pl.scheduling.replay import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
