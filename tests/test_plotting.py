"""Plots of a replay and of a run's metrics.csv are written, also with missing columns."""

from __future__ import annotations

import pytest

from fastface_pl.plotting import plot_run_metrics, plot_schedule, read_run_metrics
from fastface_pl.scheduling.detectors import FastFaceDetector, MovingHaarDetector
from fastface_pl.scheduling.replay import replay

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000


def stream():
    return [10.0 - 0.01 * t if t < 300 else 7.0 + 0.001 * (t % 7) for t in range(900)]


def test_plot_schedule_of_two_replays(tmp_path):
    results = [replay(FastFaceDetector(alpha=0.05, beta=0.05, threshold=1e-4, patience=50), stream(), record=True),
               replay(MovingHaarDetector(window=20, threshold=0.01), stream(), record=True)]
    assert all(result.decisions for result in results)
    path = plot_schedule(results, tmp_path / "sub" / "replay.png", initial_lr=0.02,
                         reference_lr=([1, 500, 900], [0.02, 0.01, 0.01]), title="test")
    assert path == tmp_path / "sub" / "replay.png"
    assert_png(path)


def test_plot_schedule_needs_a_recorded_replay(tmp_path):
    result = replay(FastFaceDetector(patience=3), stream())
    with pytest.raises(ValueError, match="record=True"):
        plot_schedule(result, tmp_path / "x.png")


def test_plot_schedule_from_columns_with_missing_panels(tmp_path):
    columns = {"loss": ([1, 2, 3], [3.0, 2.0, 1.0]), "lr": ([1, 2, 3], [0.1, 0.1, 0.05]), "decisions": [2]}
    assert_png(plot_schedule(columns, tmp_path / "columns.png"))


METRICS_CSV = """epoch,fastface/loss,fastface/lr,fastface/lr_scale,fastface/num_decisions,fastface/signal,\
fastface/smoothed_loss,fastface/stationary_count,fastface/threshold,step,val/accuracy
0,9.0,0.02,1.0,0,0.002,9.1,0,5e-05,49,
0,8.0,0.02,1.0,0,0.001,8.9,0,5e-05,99,
0,,,,,,,,,99,0.61
1,7.9,0.01,0.5,1,1e-05,8.0,0,5e-05,149,
1,7.9,0.01,0.5,1,2e-05,7.95,50,5e-05,199,
1,7.8,0.005,0.25,2,1e-05,7.9,0,5e-05,249,
"""


def test_plot_run_metrics_reads_the_fastface_columns(tmp_path):
    metrics = tmp_path / "version_0" / "metrics.csv"
    metrics.parent.mkdir()
    metrics.write_text(METRICS_CSV)
    columns = read_run_metrics(metrics)
    assert columns["loss"] == ([49.0, 99.0, 149.0, 199.0, 249.0], [9.0, 8.0, 7.9, 7.9, 7.8])
    assert columns["threshold"] == 5e-05
    assert columns["decisions"] == [149.0, 249.0]
    assert columns["lr"][1][-1] == 0.005
    assert_png(plot_run_metrics(metrics, tmp_path / "run.png"))


def test_plot_run_metrics_with_only_a_train_loss_column(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train_loss,lr-SGD\n0,9,5.0,0.1\n0,19,4.0,0.1\n0,29,3.5,0.05\n")
    columns = read_run_metrics(metrics)
    assert columns["loss"][1] == [5.0, 4.0, 3.5] and columns["lr"][1] == [0.1, 0.1, 0.05]
    assert columns["signal"] is None and columns["decisions"] == []
    assert_png(plot_run_metrics(metrics, tmp_path / "run.png"))


def test_plot_run_metrics_with_no_known_column_still_writes(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,val/accuracy\n0,9,0.5\n")
    out = plot_run_metrics(metrics, tmp_path / "empty.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_run_metrics_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="CSVLogger"):
        plot_run_metrics(tmp_path / "nope.csv", tmp_path / "x.png")
