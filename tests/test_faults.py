"""classify_fault: every fault a run can end with -> status, exit code, message, checkpoint (docs/fault_tolerance.md)."""

from __future__ import annotations

import os
import signal

import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fastface_pl import faults
from fastface_pl.checkpoints import CheckpointError, SavedStateError
from fastface_pl.data.errors import CorruptImageError, DatasetError, RecordKeyError
from fastface_pl.errors import (ConfigurationError, ConfigurationTypeError, DiskFullError, FastFaceError,
                                UsageError)
from fastface_pl.faults import Outcome, classify_fault, exit_for, reason_of
from fastface_pl.locks import FolderInUseError
from fastface_pl.safety import TrainingDiverged, TrainingInterrupted
from fastface_pl.scheduling.detectors import NonFiniteLossError
from fastface_pl.scheduling.saved_state import SchedulerStateError
from fastface_pl.argument_checks import check_real


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with two checkpoints, step5.ckpt the newer."""
    (tmp_path / "checkpoints").mkdir()
    for age, name in ((100, "step3.ckpt"), (0, "step5.ckpt")):
        path = tmp_path / "checkpoints" / name
        path.write_bytes(b"")
        os.utime(path, (1e9 - age, 1e9 - age))
    return tmp_path


def test_a_divergence_is_exit_3_with_the_newest_checkpoint_and_its_resume_command(run_dir):
    outcome = classify_fault(TrainingDiverged(7, "20 non-finite losses"), run_dir, ["model.lr=1e6", "ckpt_path=x"])
    assert (outcome.status, outcome.exit_code) == ("diverged", 3)
    newest = run_dir / "checkpoints" / "step5.ckpt"
    assert outcome.checkpoint == newest
    assert outcome.record == {"status": "diverged", "diverged_at_step": 7, "reason": "20 non-finite losses",
                              "last_good_checkpoint": str(newest)}
    assert f"python -m fastface_pl.train model.lr=1e6 ckpt_path={newest}" in outcome.message


def test_a_non_finite_loss_raised_by_the_lr_callback_is_a_divergence_at_the_step_reached(run_dir):
    outcome = classify_fault(NonFiniteLossError("loss nan at step 12"), run_dir, step=12)
    assert (outcome.status, outcome.exit_code, outcome.record["diverged_at_step"]) == ("diverged", 3, 12)


@pytest.mark.parametrize("error, code, saved", [
    (TrainingInterrupted(signal.SIGTERM, 9, None), 143, "step5.ckpt"),  # nothing saved: the newest one
    (TrainingInterrupted(signal.SIGINT, 9, "interrupted-step0000009.ckpt"), 130, "interrupted-step0000009.ckpt"),
    (SIGTERMException(), 143, "step5.ckpt"),
    (KeyboardInterrupt(), 130, "step5.ckpt"),
])
def test_an_interruption_is_128_plus_the_signal_with_the_checkpoint_to_resume(run_dir, error, code, saved):
    outcome = classify_fault(error, run_dir)
    assert (outcome.status, outcome.exit_code, outcome.checkpoint.name) == ("interrupted", code, saved)
    assert outcome.record["signal"] == signal.Signals(code - 128).name and "Resume with:" in outcome.message


def test_an_interruption_before_any_checkpoint_says_so(tmp_path):
    outcome = classify_fault(SIGTERMException(), tmp_path)
    assert outcome.checkpoint is None and "no checkpoint had been written yet" in outcome.message


@pytest.fixture
def bad_lr():
    try:
        check_real("lr", -0.1, 0.0)
    except ValueError as err:
        return err


@pytest.mark.parametrize("make, message", [
    (lambda: UsageError("no dataset given"), "no dataset given"),
    (lambda: DatasetError("data root /x does not exist"), "data root /x does not exist"),
    (lambda: CheckpointError("x.ckpt is empty"), "x.ckpt is empty"),
    (lambda: PermissionError(13, "Permission denied", "/data/x"), "permission denied: /data/x"),
    (lambda: RuntimeError('Error(s) in loading state_dict: size mismatch for "fc.weight"'),
     "the checkpoint does not fit the model"),
    (lambda: DatasetError("Caught DatasetError in DataLoader worker.\nOriginal Traceback:\n  ...\n"
                          "DatasetError: key 3: corrupt image"), "DatasetError: key 3: corrupt image"),
])
def test_a_usage_error_is_exit_2_with_one_message(tmp_path, make, message):
    outcome = classify_fault(make(), tmp_path)
    assert (outcome.status, outcome.exit_code, outcome.record) == ("usage", 2, {})
    assert outcome.message.startswith(message) and "Original Traceback" not in outcome.message


def test_an_argument_check_is_a_usage_error_by_its_type_and_a_plain_value_error_of_the_package_a_crash(tmp_path,
                                                                                                      bad_lr):
    assert isinstance(bad_lr, ConfigurationError) and isinstance(bad_lr, ValueError)
    assert classify_fault(bad_lr, tmp_path).message == "lr must be a finite number in (0, inf), got -0.1"
    try:  # a bug in the package's own code: its traceback ends in a fastface_pl file, yet it is no usage error
        exec(compile("first, second = (1, 2, 3)", faults.__file__, "exec"))
    except ValueError as err:
        bug = err
    assert classify_fault(bug, tmp_path) is None
    assert classify_fault(ValueError("math domain error"), tmp_path) is None  # raised by Python: a crash
    assert classify_fault(ZeroDivisionError(), tmp_path) is None


@pytest.mark.parametrize("error_type, status, exit_code", [
    (UsageError, "usage", 2), (ConfigurationError, "usage", 2), (ConfigurationTypeError, "usage", 2),
    (DatasetError, "usage", 2), (CorruptImageError, "usage", 2), (RecordKeyError, "usage", 2),
    (CheckpointError, "usage", 2), (SavedStateError, "usage", 2), (SchedulerStateError, "usage", 2),
    (FolderInUseError, "usage", 2), (DiskFullError, "disk_full", 2), (TrainingDiverged, "diverged", 3),
    (NonFiniteLossError, "diverged", 3), (TrainingInterrupted, "interrupted", None),
])
def test_every_exception_of_the_package_has_a_category_that_gives_its_exit_code(error_type, status, exit_code):
    assert issubclass(error_type, FastFaceError) and error_type.status == status
    if exit_code is not None:
        assert error_type.exit_code == exit_code
    assert TrainingInterrupted(signal.SIGTERM, 3, None).exit_code == 143


def test_a_fault_is_classified_once(run_dir):
    error = NonFiniteLossError("loss nan")
    first = classify_fault(error, run_dir, step=12)
    assert classify_fault(error, run_dir) is first and first.record["diverged_at_step"] == 12


def test_reason_of_keeps_a_plain_message():
    assert reason_of(ValueError("batch_size must be an int >= 1, got 0\n")) == "batch_size must be an int >= 1, got 0"


@pytest.mark.parametrize("outcome, rank, code, said", [
    (Outcome("usage", 2, "no dataset given"), None, 2, "fastface_pl.train: error: no dataset given"),
    (Outcome("usage", 2, "no dataset given"), 1, 2, "fastface_pl.train: [rank 1] error: no dataset given"),
    (Outcome("interrupted", 143, "stopped by SIGTERM"), None, 143, "fastface_pl.train: stopped by SIGTERM"),
    (Outcome("diverged", 3, "training diverged"), 1, 3, ""),  # every rank stops together: rank 0 says it
    (Outcome("interrupted", 130, "stopped by SIGINT"), 1, 130, ""),
])
def test_the_command_exits_with_the_outcomes_code_and_one_message(capsys, outcome, rank, code, said):
    with pytest.raises(SystemExit) as stop:
        exit_for(outcome, rank=rank)
    assert stop.value.code == code and capsys.readouterr().err.strip() == said
