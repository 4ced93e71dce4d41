"""The train and evaluate commands end to end, as a user runs them (subprocesses, CPU, a shortened demo)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from conftest import explain, run_python, run_train

pytestmark = pytest.mark.slow

# The demo, shortened: 24 identities x 8 images, batch 16 -> 12 optimizer steps per epoch.
SHORT_DEMO = [
    "data.synthetic.num_identities=24", "data.synthetic.images_per_identity=8", "data.synthetic.unseen_identities=6",
    "data.synthetic.num_val_pairs=40", "data.batch_size=16", "trainer.max_epochs=3", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=5",
    # decide often enough to see decisions in 36 steps: P = int(0.1 * 36) = 3
    "scheduler.threshold=0.5", "scheduler.patience_fraction=0.1",
]


def _train(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    result = run_train(run_dir, *overrides)
    if check:
        assert result.returncode == 0, explain(result)
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    return run_dir, _train(run_dir, *SHORT_DEMO)


def test_demo_writes_the_run_folder(demo_run):
    run_dir, result = demo_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not list((run_dir / "checkpoints").glob("last-v*.ckpt"))  # one last.ckpt, not versions of it
    assert len(list((run_dir / "checkpoints").glob("epoch*.ckpt"))) == 3  # one per epoch, all kept
    assert (run_dir / "config.yaml").read_text().count("fastface_pl.models.module.FaceRecognitionModule") == 1
    assert (run_dir / "schedule.png").stat().st_size > 10_000
    # TensorBoard events where tensorboard is installed (the run is a subprocess of this interpreter)
    assert (run_dir / "logs" / "tb").is_dir() == (importlib.util.find_spec("tensorboard") is not None)
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for key in ("fastface/loss", "fastface/smoothed_loss", "fastface/signal", "fastface/threshold",
                "fastface/stationary_count", "fastface/num_decisions", "fastface/lr", "train/loss"):
        assert key in columns, key
    lrs = [float(r["fastface/lr"]) for r in rows if r.get("fastface/lr")]
    assert lrs[0] == pytest.approx(0.1) and min(lrs) < 0.1  # the scheduler decided and the LR went down


def test_demo_reports_verification_accuracy_and_decisions(demo_run):
    run_dir, result = demo_run
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["global_step"] == 36
    accuracy = summary["verification"]["synthetic"]["accuracy"]
    assert 0.5 <= accuracy <= 1.0
    assert f"{100 * accuracy:.2f}%" in result.stdout  # the printed table
    decisions = summary["decisions"]
    assert decisions and all(factor == 0.5 for _, factor, _ in decisions)
    steps = [step for step, _, _ in decisions]
    assert steps == sorted(steps) and steps[0] >= 4  # more than P = 3 stationary steps first


def test_resume_makes_the_same_decisions(demo_run, tmp_path):
    """Resume from the mid-epoch checkpoint of step 30 (of 36): the same LR decisions as the uninterrupted run."""
    full = json.loads((demo_run[0] / "results.json").read_text())
    checkpoints = demo_run[0] / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step*.ckpt")) == ["step0000030.ckpt", "step0000035.ckpt"]
    resumed = tmp_path / "resumed"
    result = _train(resumed, *SHORT_DEMO, f"ckpt_path={checkpoints / 'step0000030.ckpt'}")
    assert "Restoring states from the checkpoint" in result.stdout + result.stderr
    again = json.loads((resumed / "results.json").read_text())
    assert again["global_step"] == 36
    assert again["decisions"] == full["decisions"]
    assert any(step > 30 for step, _, _ in full["decisions"])  # decisions were made after the resume point
    # the model, the data order and the detector resumed exactly: the same losses and signals after step 30
    def signals(run_dir):
        with open(run_dir / "logs" / "metrics.csv", newline="") as f:
            return {int(r["step"]): (r["fastface/loss"], r["fastface/signal"], r["fastface/lr"])
                    for r in csv.DictReader(f) if r.get("fastface/signal")}
    after_full = {k: v for k, v in signals(demo_run[0]).items() if k >= 30}
    after_resume = {k: v for k, v in signals(resumed).items() if k >= 30}
    assert len(after_full) >= 5 and after_resume == after_full


def test_paper_experiment_without_data_stops_with_a_clear_message(tmp_path):
    result = _train(tmp_path / "run", "+experiment=r100_ms1mv3", check=False)
    assert result.returncode == 2
    assert "data.root" in result.stderr and "FASTFACE_DATA_ROOT" in result.stderr
    assert "train.rec" in result.stderr and "<identity>/<image>.jpg" in result.stderr  # the accepted layouts
    assert "Traceback" not in result.stderr


def test_wrong_data_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-dataset"
    result = _train(tmp_path / "run", "+experiment=r100_ms1mv3", f"data.root={missing}", check=False)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_evaluate_command_prints_a_table(demo_run, tmp_path):
    ckpt = demo_run[0] / "checkpoints" / "last.ckpt"
    out = tmp_path / "results.json"
    result = run_python("-m", "fastface_pl.evaluate", str(ckpt), "--num-workers", "0", "--json", str(out), timeout=300)
    assert result.returncode == 0, explain(result)
    per_set = json.loads(out.read_text())
    assert "synthetic" in per_set and 0.5 <= per_set["synthetic"]["accuracy"] <= 1.0
    assert "synthetic" in result.stdout and "accuracy" in result.stdout and "VAL@FAR" in result.stdout
    assert {"val_at_far", "val_at_far_std", "far", "xnorm"} <= set(per_set["synthetic"])


def test_evaluate_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run_python("-m", "fastface_pl.evaluate", str(tmp_path / "none.ckpt"), timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_multirun_sweeps_the_threshold(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in SHORT_DEMO if not o.startswith(("scheduler.threshold", "trainer.max_epochs"))]
    result = run_train(None, "-m", f"hydra.sweep.dir={sweep}", *overrides, "trainer.max_epochs=1",
                       "validate_at_end=false", "plot=false", "scheduler.threshold=0.5,1e9")
    assert result.returncode == 0, explain(result)
    summaries = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert all(s["global_step"] == 12 for s in summaries)
    configs = [(sweep / str(i) / "config.yaml").read_text() for i in (0, 1)]
    assert "threshold: 0.5" in configs[0] and "threshold: 1000000000.0" in configs[1]
    assert len(summaries[1]["decisions"]) >= len(summaries[0]["decisions"])  # a larger λ never decides less


def test_missing_checkpoint_stops_before_training(tmp_path):
    missing = tmp_path / "none.ckpt"
    result = _train(tmp_path / "run", *SHORT_DEMO, f"ckpt_path={missing}", check=False)
    assert result.returncode == 2
    assert f"ckpt_path={missing} is not a file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was built or trained


def test_demo_trains_and_evaluates_with_the_f2c_pool(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, *SHORT_DEMO, "model.classifier=dcp")
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["global_step"] == 3 * 12
    assert 0.5 <= summary["verification"]["synthetic"]["accuracy"] <= 1.0
    config = (run_dir / "config.yaml").read_text()
    assert "classifier: dcp" in config and "identity_fraction: null" in config
    out = tmp_path / "results.json"
    result = run_python("-m", "fastface_pl.evaluate", str(run_dir / "checkpoints" / "last.ckpt"), "--num-workers", "0",
                        "--json", str(out), timeout=300)
    assert result.returncode == 0, explain(result)
    assert json.loads(out.read_text())["synthetic"]["accuracy"] == pytest.approx(
        summary["verification"]["synthetic"]["accuracy"])


def test_the_stop_preset_stops_the_run_saves_it_and_says_why(tmp_path):
    # A generous budget (12 epochs, 144 steps); the rule's settings come from 1 epoch: the run stops long before.
    run_dir = tmp_path / "run"
    overrides = [item for item in SHORT_DEMO if not item.startswith(("scheduler.", "trainer.max_epochs"))]
    result = _train(run_dir, *overrides, "scheduler=fastface_stop", "scheduler.horizon_epochs=1",
                    "scheduler.cooldown_fraction=0.5", "trainer.max_epochs=12")
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["status"] == "completed" and summary["stopped_at"] == summary["global_step"] < 144
    start = summary["decisions"][0][0]
    assert summary["stopped_at"] == start + -(-start // 2)  # c = 0.5: ⌈t_d / 2⌉ steps of cooldown
    assert "stopping after optimizer step" in result.stdout + result.stderr
    import torch

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == summary["stopped_at"]  # the checkpoint a user evaluates is the stopped run's
