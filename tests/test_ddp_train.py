"""The train command under DDP (``trainer=ddp``) on 2 CPU ranks (gloo), as a user runs it, then a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import command_env, explain, run_python, run_train, train_command

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
]

# 24 identities x 8 images over 2 ranks of batch 8: 12 optimizer steps per epoch, 40 verification pairs.
TINY_DDP = [
    "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
    "data.synthetic.num_identities=24", "data.synthetic.images_per_identity=8", "data.synthetic.unseen_identities=6",
    "data.synthetic.num_val_pairs=40", "data.batch_size=8", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=5",
    "scheduler.threshold=0.5", "scheduler.patience_fraction=0.1",
]
STEPS_PER_EPOCH = 12


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-epoch run started without hydra.run.dir (the folder name holds the random run id)."""
    cwd = tmp_path_factory.mktemp("ddp")
    result = run_train(None, *TINY_DDP, cwd=cwd, timeout=300)
    assert result.returncode == 0, explain(result)
    folders = [p.parent for p in cwd.glob("runs/*/*/config.yaml")]
    assert len(folders) == 1, folders
    return folders[0], result


def test_both_ranks_train_in_one_run_folder(ddp_run):
    run_dir, result = ddp_run
    root = run_dir.parents[1]
    # the rank started by Lightning used rank 0's folder: no second run folder, its log beside rank 0's
    assert [p for p in root.glob("*/*") if p.is_dir()] == [run_dir]
    assert (run_dir / "train.log").is_file() and (run_dir / "train_ddp_process_1.log").is_file()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in (run_dir / "train_ddp_process_1.log").read_text()
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 2 * STEPS_PER_EPOCH
    assert summary["decisions"] and all(factor == 0.5 for _, factor, _ in summary["decisions"])
    assert (run_dir / "schedule.png").is_file()
    assert result.stdout.count("Verification (10-fold accuracy") == 1  # the table is printed by rank 0 only
    assert result.stdout.count("Run folder:") == 1
    assert "already holds a run" not in result.stderr


def test_checkpoints_are_written_once_and_load(ddp_run):
    run_dir, _ = ddp_run
    checkpoints = run_dir / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["epoch00-step0000012.ckpt", "epoch01-step0000024.ckpt", "last.ckpt",
                     "step0000015.ckpt", "step0000020.ckpt"]  # no last-v1.ckpt, no temporary file left
    state = _load(checkpoints / "last.ckpt")
    assert state["global_step"] == 2 * STEPS_PER_EPOCH and state["epoch"] == 1
    assert state["hyper_parameters"]["num_classes"] == 24


def test_validation_covers_the_pairs_of_both_ranks(ddp_run, tmp_path):
    """One process evaluating last.ckpt on all 40 pairs finds the accuracy the 2 ranks reported together."""
    run_dir, _ = ddp_run
    out = tmp_path / "evaluated.json"
    result = run_python("-m", "fastface_pl.evaluate", str(run_dir / "checkpoints" / "last.ckpt"),
                        "--num-workers", "0", "--json", str(out), timeout=300)
    assert result.returncode == 0, explain(result)
    alone = json.loads(out.read_text())["synthetic"]
    together = json.loads((run_dir / "results.json").read_text())["verification"]["synthetic"]
    assert alone["accuracy"] == pytest.approx(together["accuracy"], abs=1e-6)
    assert alone["xnorm"] == pytest.approx(together["xnorm"], rel=1e-4)


def test_resume_with_the_same_world_size(ddp_run, tmp_path):
    run_dir, _ = ddp_run
    first = json.loads((run_dir / "results.json").read_text())
    resumed_dir = tmp_path / "resumed"
    result = run_train(resumed_dir, *TINY_DDP, "trainer.max_epochs=3",
                       f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", timeout=300)
    assert result.returncode == 0, explain(result)
    assert "Restoring states from the checkpoint" in result.stdout + result.stderr
    summary = json.loads((resumed_dir / "results.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 3 * STEPS_PER_EPOCH
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    # the decisions before the resume come back with the callback's state; the third epoch adds its own
    assert summary["decisions"][:len(first["decisions"])] == first["decisions"]
    assert any(step > 2 * STEPS_PER_EPOCH for step, _, _ in summary["decisions"])
    assert (resumed_dir / "checkpoints" / "epoch02-step0000036.ckpt").is_file()
    assert not list(resumed_dir.glob("config.*.yaml"))  # a fresh folder: nothing was renamed


def test_a_divergence_under_ddp_is_recorded_once_with_exit_3(tmp_path):
    run_dir = tmp_path / "diverged"
    result = run_train(run_dir, *TINY_DDP, "model.lr=1e6", "checkpoint_every_n_steps=2", timeout=300)
    assert result.returncode == 3, explain(result)
    assert result.stderr.count("fastface_pl.train: error: training diverged") == 1  # rank 0 says it, once
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["status"] == "diverged"
    assert Path(summary["last_good_checkpoint"]).is_file()


def terminated_run(run_dir: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, list[Path]]:
    """A long 2-rank run sent SIGTERM (to every rank) once its step-15 checkpoint exists; it must exit 143 with
    one interrupted-step checkpoint, which is returned with the finished process."""
    process = subprocess.Popen(train_command(run_dir, *TINY_DDP, *overrides, "trainer.max_epochs=50",
                                             "validate_at_end=false"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=command_env(),
                               start_new_session=True)
    marker = run_dir / "checkpoints" / "step0000015.ckpt"
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the ranks did not stop after SIGTERM\n{stderr[-3000:]}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 143, explain(result)
    saved = sorted((run_dir / "checkpoints").glob("interrupted-step*.ckpt"))
    assert len(saved) == 1, explain(result)
    return result, saved


def test_sigterm_to_all_ranks_saves_the_step_and_exits_143(tmp_path):
    """A scheduler's SIGTERM reaches every rank wherever it is (Lightning's own handler deadlocked here)."""
    run_dir = tmp_path / "terminated"
    result, saved = terminated_run(run_dir)
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["status"] == "interrupted" and summary["checkpoint"] == str(saved[0])
    assert "the state of the step reached is in" in result.stderr and str(saved[0]) in result.stderr
    assert result.stderr.count("stopped by SIGTERM") == 1


@pytest.mark.parametrize("name, value, expected", [
    (None, None, True), ("LOCAL_RANK", "0", True), ("LOCAL_RANK", "1", False), ("RANK", "3", False),
    ("NODE_RANK", "1", False), ("SLURM_PROCID", "0", True), ("SLURM_PROCID", "2", False),
])
def test_the_launching_rank_is_told_by_the_environment(monkeypatch, name, value, expected):
    from fastface_pl.runs import RANK_VARIABLES, is_launching_rank

    for variable in RANK_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    if name:
        monkeypatch.setenv(name, value)
    assert is_launching_rank() is expected


# A process whose watcher (Lightning's, as the ddp launcher starts it) sees a rank exit with code 3; the callback
# must stop the watch before it kills this process.
WATCHED = """
import subprocess, sys, time
from types import SimpleNamespace
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from fastface_pl.safety import DistributedFaults, end_started_ranks

rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3); raise SystemExit(3)"])
_ChildProcessObserver(main_pid=__import__("os").getpid(), child_processes=[rank], sleep_period=0.1).start()
if sys.argv[1] == "stop":
    DistributedFaults().on_exception(SimpleNamespace(is_global_zero=True), None, RuntimeError("fault"))
time.sleep(1.5)
end_started_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[rank]))), grace_s=1)
print("rank 0 outlived rank", rank.returncode)
"""


@pytest.mark.parametrize("stop", [True, False])
def test_rank_zero_outlives_a_rank_that_exited_after_a_fault(stop):
    result = run_python("-c", WATCHED, "stop" if stop else "watch", timeout=120)
    if stop:
        assert result.returncode == 0, explain(result)
        assert "rank 0 outlived rank 3" in result.stdout
    else:  # without the callback Lightning's watch kills the process: what DistributedFaults prevents
        assert result.returncode == -9, explain(result)


def test_a_rank_left_waiting_after_a_fault_is_ended():
    import sys
    from types import SimpleNamespace

    from fastface_pl.safety import end_started_ranks

    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    end_started_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[waiting, done]))),
                      grace_s=0.5)
    assert waiting.returncode == -9 and done.returncode == 0


def test_the_ddp_preset_composes_validates_and_is_listed():
    from hydra import compose, initialize_config_module

    from fastface_pl.config_check import check_group_choices, validate_config
    from fastface_pl.errors import UsageError

    with initialize_config_module(config_module="fastface_pl.conf", version_base="1.3"):
        cfg = compose("train", overrides=["trainer=ddp", "trainer.accelerator=cpu"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2
    assert cfg.trainer.use_distributed_sampler is False  # the data module shards itself
    assert cfg.trainer.max_epochs == 16  # the rest comes from trainer/default.yaml
    validate_config(cfg)
    check_group_choices(["trainer=ddp"])
    with pytest.raises(UsageError, match=r"(?s)Available options in 'trainer':.*\tddp\n"):
        check_group_choices(["trainer=dpp"])


def test_a_sweep_under_ddp_keeps_each_job_in_one_folder(tmp_path):
    """Lightning starts rank 1 with the sweep's command line: it runs the same jobs, in rank 0's sweep folder."""
    result = run_train(None, "-m", *TINY_DDP, "trainer.max_epochs=1", "validate_at_end=false", "plot=false",
                       "seed=1,2", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, explain(result)
    sweeps = list(tmp_path.glob("runs/multirun/*/*"))
    assert len(sweeps) == 1, sweeps  # no second sweep folder drawn by rank 1 (another time, another id)
    for job in ("0", "1"):
        assert (sweeps[0] / job / "train_ddp_process_1.log").is_file()
        summary = json.loads((sweeps[0] / job / "results.json").read_text())
        assert summary["status"] == "completed" and summary["global_step"] == STEPS_PER_EPOCH


# ------------------------------------------------------------------ classifier=sharded
@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sharded") / "run"
    result = run_train(run_dir, *TINY_DDP, "classifier=sharded", timeout=300)
    assert result.returncode == 0, explain(result)
    return run_dir


def _load(path: Path) -> dict:
    """A checkpoint read as the project reads it: weights-only, with its allow-list."""
    import torch

    from fastface_pl.checkpoints import SAFE_GLOBALS

    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def test_the_sharded_layer_trains_on_two_ranks_and_saves_the_whole_layer(sharded_run, tmp_path):
    summary = json.loads((sharded_run / "results.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 2 * STEPS_PER_EPOCH
    assert summary["decisions"]  # one decision stream for both ranks (the loss is the global loss)
    state = _load(sharded_run / "checkpoints" / "last.ckpt")
    assert state["sharded_classifier"] == {"world_size": 2, "num_classes": 24}
    assert tuple(state["state_dict"]["classifier.weight"].shape) == (24, 128)
    groups = state["optimizer_states"][0]["param_groups"]
    index = next(g for g in groups if g["name"] == "classifier")["params"][0]
    assert tuple(state["optimizer_states"][0]["state"][index]["momentum_buffer"].shape) == (24, 128)
    out = tmp_path / "evaluated.json"  # one process evaluates it (the backbone alone)
    result = run_python("-m", "fastface_pl.evaluate", str(sharded_run / "checkpoints" / "last.ckpt"),
                        "--num-workers", "0", "--json", str(out), timeout=300)
    assert result.returncode == 0, explain(result)
    together = summary["verification"]["synthetic"]["accuracy"]
    assert json.loads(out.read_text())["synthetic"]["accuracy"] == pytest.approx(together, abs=1e-6)


def test_a_sharded_run_resumes_on_two_ranks_and_on_one(sharded_run, tmp_path):
    last = sharded_run / "checkpoints" / "last.ckpt"
    for name, devices in (("two", ["trainer.devices=2"]), ("one", ["trainer=default", "trainer.devices=1"])):
        run_dir = tmp_path / name
        arguments = [a for a in TINY_DDP if not a.startswith(("trainer=", "trainer.devices"))] + devices
        result = run_train(run_dir, *arguments, "classifier=sharded", "trainer.max_epochs=3", f"ckpt_path={last}",
                           timeout=300)
        assert result.returncode == 0, explain(result)
        summary = json.loads((run_dir / "results.json").read_text())
        assert summary["status"] == "completed" and summary["resumed_from"] == str(last)
    # one process trains 24 steps in the third epoch (batch 8, no second rank), two ranks 12
    assert json.loads((tmp_path / "two" / "results.json").read_text())["global_step"] == 3 * STEPS_PER_EPOCH
    assert "split again over 1" in (tmp_path / "one" / "train.log").read_text()


def test_sigterm_under_the_sharded_layer_saves_the_whole_layer(tmp_path):
    """The checkpoint of a pre-empted run gathers every rank's rows (a collective, on the fault path)."""
    _, saved = terminated_run(tmp_path / "terminated", "classifier=sharded")
    assert tuple(_load(saved[0])["state_dict"]["classifier.weight"].shape) == (24, 128)
