"""Faults injected into ``python -m fastface_pl.train`` as a user meets them (subprocesses, CPU, a tiny demo):
divergence, SIGTERM/SIGINT and the resume that follows, resumes from a run folder and in place, run-folder
collisions, bad checkpoints, a checkpoint of another model, config errors, an unwritable run folder."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import command_env, explain, run_train, train_command, write_image_folder

from fastface_pl.checkpoints import load_lightning_checkpoint
from fastface_pl.data.pack import pack_folder

pytestmark = pytest.mark.slow

# 24 identities x 8 images, batch 16: 12 optimizer steps per epoch
TINY = [
    "data.synthetic.num_identities=24", "data.synthetic.images_per_identity=8", "data.synthetic.unseen_identities=6",
    "data.synthetic.num_val_pairs=40", "data.batch_size=16", "trainer.max_epochs=1", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=5", "plot=false", "loggers=[csv]",
]
# one epoch of 48 steps, long enough to be interrupted in the middle
LONG = [o for o in TINY if not o.startswith("data.synthetic.num_identities")] + ["data.synthetic.num_identities=96"]


def _strict_json(path: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}: not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _losses(run_dir: Path) -> dict[int, str]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.parametrize("scheduler", [["scheduler=constant"],
                                       ["scheduler=fastface_demo", "divergence.max_nonfinite_steps=1"]])
def test_divergence_stops_with_exit_3_and_keeps_good_checkpoints(tmp_path, scheduler):
    run = tmp_path / "run"
    result = run_train(run, *TINY, "model.lr=1e6", *scheduler, "checkpoint_every_n_steps=2")
    assert result.returncode == 3, explain(result)
    assert "training diverged at optimizer step" in result.stderr and "Traceback" not in result.stderr
    assert "model.lr" in result.stderr and "trainer.precision=bf16-mixed" in result.stderr
    summary = _strict_json(run / "results.json")
    assert summary["status"] == "diverged" and summary["diverged_at_step"] >= 1
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert checkpoints and summary["last_good_checkpoint"] in map(str, checkpoints)
    for path in checkpoints:  # every checkpoint written holds finite weights
        state = load_lightning_checkpoint(path)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path


def _interrupt(run: Path, signum: int, *overrides: str, group: bool = False) -> subprocess.CompletedProcess:
    """Start a run, wait for its step-5 checkpoint (a progress marker, not a sleep), send ``signum``.

    With ``group`` the signal goes to the whole process group, as a terminal's Ctrl+C does (DataLoader
    workers included).
    """
    process = subprocess.Popen(train_command(run, *overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=command_env(), start_new_session=group)
    marker = run / "checkpoints" / "step0000005.ckpt"
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _completed_run(tmp_path_factory, name: str, *overrides: str) -> Path:
    run = tmp_path_factory.mktemp(name) / "run"
    result = run_train(run, *overrides, "validate_at_end=false")
    assert result.returncode == 0, explain(result)
    return run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return _completed_run(tmp_path_factory, "full", *LONG)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_the_step_and_the_printed_command_resumes_exactly(tmp_path, uninterrupted, signum,
                                                                               code):
    run = tmp_path / "run"
    result = _interrupt(run, signum, *LONG, "validate_at_end=false")
    assert result.returncode == code, explain(result)
    saved = sorted((run / "checkpoints").glob("interrupted-step*.ckpt"))
    assert len(saved) == 1, explain(result)
    step = int(saved[0].stem.split("step")[1])
    assert 5 <= step < 48 and load_lightning_checkpoint(saved[0])["global_step"] == step
    assert f"stopped by {signal.Signals(signum).name}" in result.stderr and str(saved[0]) in result.stderr
    summary = _strict_json(run / "results.json")
    assert summary["status"] == "interrupted" and summary["checkpoint"] == str(saved[0])
    if signum != signal.SIGTERM:
        return  # the same checkpoint and resume path as SIGTERM's (resumed below)
    # run the printed command (in a new run folder): it continues from that step, on the same batches
    command = shlex.split(result.stderr.split("Resume with:")[1].strip().splitlines()[0])
    assert command[:3] == ["python", "-m", "fastface_pl.train"] and command[-1] == f"ckpt_path={saved[0]}"
    resumed_dir = tmp_path / "resumed"
    resumed = run_train(resumed_dir, *command[3:])
    assert resumed.returncode == 0, explain(resumed)
    assert _strict_json(resumed_dir / "results.json")["global_step"] == 48
    after = _losses(resumed_dir)
    assert min(after) == step + 1 or min(after) == step  # logging starts where the checkpoint stood
    full = _losses(uninterrupted)
    assert {k: v for k, v in full.items() if k in after} == after and max(after) == max(full)


def test_ctrl_c_to_the_process_group_with_dataloader_workers_checkpoints_the_step(tmp_path):
    """A terminal's Ctrl+C reaches the DataLoader workers too: they must keep serving while the step is saved."""
    run = tmp_path / "run"
    result = _interrupt(run, signal.SIGINT, *LONG, "validate_at_end=false", "data.num_workers=2",
                        "data.persistent_workers=true", group=True)
    assert result.returncode == 130, explain(result)
    assert "exited unexpectedly" not in result.stderr
    saved = sorted((run / "checkpoints").glob("interrupted-step*.ckpt"))
    assert len(saved) == 1, explain(result)
    assert load_lightning_checkpoint(saved[0])["global_step"] >= 5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return _completed_run(tmp_path_factory, "tiny", *TINY)


def test_resume_from_a_run_folder_names_the_changed_settings(tmp_path, tiny_run):
    first = tiny_run
    result = run_train(tmp_path / "second", *TINY, f"ckpt_path={first}", "trainer.max_epochs=2", "model.lr=0.05",
                    "model.margin_kwargs.m=0.3")
    assert result.returncode == 0, explain(result)
    log = result.stdout + result.stderr
    assert "resuming from" in log and str(first / "checkpoints") in log
    assert "model.lr: checkpoint 0.1, config 0.05 -> the checkpoint's value is used" in log
    assert "model.margin_kwargs.m: checkpoint 0.35, config 0.3 -> the config's value is used" in log
    assert _strict_json(tmp_path / "second" / "results.json")["global_step"] == 24


def test_ckpt_path_last_resumes_in_place_and_keeps_the_earlier_files(tmp_path):
    run = tmp_path / "run"
    fresh = run_train(run, *TINY, "ckpt_path=last")  # nothing there yet: a fresh start (a requeued job's first start)
    assert fresh.returncode == 0, explain(fresh)
    assert "no checkpoint in" in fresh.stdout + fresh.stderr
    again = run_train(run, *TINY)  # the same folder without a resume: refused, nothing overwritten
    assert again.returncode == 2 and "already holds a run" in again.stderr and "ckpt_path=last" in again.stderr
    resumed = run_train(run, *TINY, "ckpt_path=last", "trainer.max_epochs=2")
    assert resumed.returncode == 0, explain(resumed)
    assert _strict_json(run / "results.json")["global_step"] == 24
    assert _strict_json(run / "results.1.json")["global_step"] == 12  # the first start's files, renamed
    assert (run / "config.1.yaml").is_file() and (run / "logs" / "metrics.1.csv").is_file()


def test_two_runs_started_together_get_two_folders(tmp_path):
    overrides = [*TINY, "validate_at_end=false"]
    processes = [subprocess.Popen(train_command(None, *overrides), cwd=tmp_path, env=command_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    folders = sorted(p.parent for p in tmp_path.glob("runs/*/*/results.json"))
    assert len(folders) == 2 and all((f / "config.yaml").is_file() for f in folders)
    assert len({_strict_json(f / "results.json")["run_dir"] for f in folders}) == 2


@pytest.mark.parametrize("kind", ["crafted"])  # every kind of bad file: test_checkpoints.py, test_evaluate.py
def test_a_bad_checkpoint_is_one_message_and_exit_2(tmp_path, kind):
    from test_checkpoints import bad_files

    path, phrase = bad_files(tmp_path)[kind]
    result = run_train(tmp_path / "run", *TINY, f"ckpt_path={path}")
    assert result.returncode == 2, explain(result)
    assert phrase in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_of_another_model_size_is_a_message(tmp_path, tiny_run):
    result = run_train(tmp_path / "other", *TINY, f"ckpt_path={tiny_run / 'checkpoints' / 'last.ckpt'}",
                    "model.embedding_size=64")
    assert result.returncode == 2, explain(result)
    assert "model.embedding_size: checkpoint 128, config 64" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_config_value_stops_before_the_data_is_built(tmp_path):
    result = run_train(tmp_path / "run", *TINY, "trainer.max_epochs=abc")
    assert result.returncode == 2, explain(result)
    assert "trainer.max_epochs='abc': expected an integer or null" in result.stderr
    assert "Traceback" not in result.stderr and "FaceDataModule" not in result.stdout + result.stderr


@pytest.mark.parametrize("overrides, said", [
    (("model.lr=-0.1",), "model: lr must be a finite number in (0, inf), got -0.1"),
    (("data.batch_size=0",), "data: batch_size must be an int >= 1, got 0"),
    (("trainer.max_epochs=0",), "trainer.max_epochs=0: expected an int >= 1"),
    (("scheduler=fastfac",), "Could not find 'scheduler/fastfac'"),
    (("+experiment=r100_ms1mv4",), "Could not find 'experiment/r100_ms1mv4'"),
    (("-m", "scheduler=fastface,fastfac"), "Could not find 'scheduler/fastfac'"),
    (("+scheduler.thresold=1e-3",), "thresold"),
    (("scheduler.thresold=1e-3",), "Could not override 'scheduler.thresold'"),  # Hydra's own message
])
def test_a_config_error_exits_2_before_any_data_is_read(tmp_path, overrides, said):
    """README: a usage error exits 2. The data root does not exist: a check that ran after reading the data would
    name it instead."""
    result = run_train(tmp_path / "run", "data=insightface", f"data.root={tmp_path / 'nowhere'}", *overrides)
    assert result.returncode == 2, explain(result)
    assert said in result.stderr and "nowhere" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "results.json").exists()
    if "Could not find 'scheduler" in said:  # the group's options, as Hydra lists them
        assert "Available options in 'scheduler':" in result.stderr and "fastface_auto" in result.stderr


def test_an_unusable_run_folder_is_a_message(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    result = run_train(tmp_path / "a_file" / "run", *TINY)
    assert result.returncode == 2, explain(result)
    assert "is a file, not a folder" in result.stderr and "Traceback" not in result.stderr


def test_a_diverged_job_of_a_sweep_lets_the_others_run_and_exits_3(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        train_command(None, "-m", f"hydra.sweep.dir={sweep}", *TINY, "validate_at_end=false", "scheduler=constant",
                      "model.lr=1e6,0.1"), capture_output=True, text=True, env=command_env(), timeout=600)
    assert result.returncode == 3, explain(result)
    assert _strict_json(sweep / "0" / "results.json")["status"] == "diverged"
    assert _strict_json(sweep / "1" / "results.json")["status"] == "completed"
    assert f"1 run(s) of the sweep diverged: {sweep / '0'}" in result.stderr


def test_a_dcp_resume_says_the_checkpoints_pool_size_is_kept(caplog):
    """The F2C pool is restored with the size it was saved with, whatever the config says (no false 'config wins')."""
    from types import SimpleNamespace

    from fastface_pl.resume import compare_with_checkpoint

    saved = {"hyper_parameters": {"classifier": "dcp", "classifier_kwargs": {"pool_size": 32, "pool_fraction": 0.01},
                                  "lr": 0.1}, "datamodule_hyper_parameters": {"batch_size": 16}}
    module = SimpleNamespace(hparams={"classifier": "dcp", "classifier_kwargs": {"pool_size": None,
                                                                                 "pool_fraction": 0.02}, "lr": 0.1})
    with caplog.at_level("WARNING", logger="fastface_pl.train"):
        compare_with_checkpoint(saved, module, SimpleNamespace(hparams={"batch_size": 16}))
    assert "model.classifier_kwargs.pool_size: checkpoint 32, config None -> the checkpoint's pool size is kept" in caplog.text
    assert "model.classifier_kwargs.pool_fraction: checkpoint 0.01, config 0.02 -> the checkpoint's pool size is kept" in caplog.text
    assert "config's value is used" not in caplog.text


def _tampered(tmp_path: Path, source: Path, change) -> Path:
    checkpoint = torch.load(source, weights_only=True)
    change(checkpoint)
    path = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, path)
    return path


def _set_data_state(key, value):
    def change(checkpoint):
        assert "FaceDataModule" in checkpoint, sorted(checkpoint)
        checkpoint["FaceDataModule"][key] = value
    return change


def _set_guard_streak(checkpoint):
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("DivergenceGuard")]
    checkpoint["callbacks"][key]["streak"] = "x"


@pytest.mark.parametrize("change", [_set_data_state("batches_done", -3), _set_data_state("batches_done", 1e6),
                                    _set_data_state("epoch", "zero"), _set_guard_streak],
                         ids=["batches_done=-3", "batches_done=1e6", "epoch=zero", "guard_streak=x"])
def test_a_checkpoint_with_a_tampered_state_is_one_message_naming_it(tmp_path, tiny_run, change):
    """A component that rejects its saved state stops the resume with one message naming the
    file (not a Hydra traceback ending in a bare ValueError), exit 2."""
    path = _tampered(tmp_path, tiny_run / "checkpoints" / "last.ckpt", change)
    result = run_train(tmp_path / "resumed", *TINY, f"ckpt_path={path}", "trainer.max_epochs=2")
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    assert f"checkpoint {path} holds a state this run cannot restore" in result.stderr, explain(result)


def _nan_in_optimizer_state(checkpoint):
    state = checkpoint["optimizer_states"][0]["state"]
    buffers = [entry["momentum_buffer"] for entry in state.values() if entry.get("momentum_buffer") is not None]
    assert buffers, "the demo's SGD keeps momentum buffers"
    buffers[0].view(-1)[0] = float("nan")


def test_nan_in_a_checkpoints_optimizer_state_is_a_damaged_file_not_a_divergence(tmp_path, tiny_run):
    """A damaged file, not reported as a divergence with "try a lower learning rate": exit 2, naming the state."""
    path = _tampered(tmp_path, tiny_run / "checkpoints" / "last.ckpt", _nan_in_optimizer_state)
    result = run_train(tmp_path / "resumed", *TINY, f"ckpt_path={path}", "trainer.max_epochs=2")
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr and "lower learning rate" not in result.stderr, explain(result)
    assert f"checkpoint {path} holds non-finite values (NaN/inf) in optimizer 0 state 'momentum_buffer'" \
        in result.stderr, explain(result)


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_exits_2(tmp_path):
    """On a real small file system (a tmpfs that fits one checkpoint of the demo, not two):
    the failed save names the path and the free space, exit 2; every checkpoint left loads; no temporary file
    is left; results.json says disk_full."""
    import shutil as _shutil

    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = _shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mount_point)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN); "
                    "tests/test_hostile_input.py simulates ENOSPC instead")
    try:
        run = mount_point / "run"
        result = run_train(run, *TINY, "validate_at_end=false")
        assert result.returncode == 2, explain(result)
        assert "Traceback" not in result.stderr, explain(result)
        assert "no space left on the device" in result.stderr and " free in " in result.stderr, explain(result)
        checkpoints = sorted((run / "checkpoints").iterdir())
        assert checkpoints and all(p.suffix == ".ckpt" for p in checkpoints), checkpoints  # no temporary file
        for path in checkpoints:
            load_lightning_checkpoint(path)  # complete, each of them
        assert _strict_json(run / "results.json")["status"] == "disk_full"
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_112_pixel_pack_with_the_32_pixel_demo_model_is_one_message(tmp_path):
    """A real 112-pixel record pack and the demo model (input 32): the message alone, exit 2."""
    faces = write_image_folder(tmp_path / "faces", [3] * 6, size=112, smooth=True)
    pack_folder(faces, tmp_path / "pack", progress=False)
    result = run_train(tmp_path / "run", "data=insightface", f"data.root={tmp_path / 'pack'}", "data.val_sets=[]",
                       "data.batch_size=8", "data.num_workers=0", "trainer.max_epochs=1")
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    assert "expected images of shape [B, 3, 32, 32], got [8, 3, 112, 112]" in result.stderr, explain(result)
