"""How a training run ends when it does not complete: one classification of every fault (docs/fault_tolerance.md).

:func:`classify_fault` maps an exception to an :class:`Outcome`: the status that ``results.json`` records, the
exit code, the message for the user and the checkpoint to resume from. ``train.py`` uses it on every path, so a
fault is worded, coded and recorded in one place:

- ``usage``, exit 2: a :class:`UsageError`, bad data (``DatasetError``) or checkpoint (``CheckpointError``), an
  argument check raised by fastface_pl's own code, a permission denied;
- ``diverged``, exit 3: the divergence guard (``scheduler.on_nonfinite=raise`` is the guard at the first
  non-finite step);
- ``disk_full``, exit 2: a save failed for lack of space (the files written before it are whole);
- ``interrupted``, exit 128 + the signal: SIGTERM (143) or Ctrl+C (130), with the checkpoint of the step reached.

Any other exception is a crash: not classified, its traceback is shown (exit 1).
"""

from __future__ import annotations

import shlex
import signal
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.utilities.exceptions import SIGTERMException

from fastface_pl.atomic import DiskFullError
from fastface_pl.checkpoints import CheckpointError, checkpoint_candidates, describe_load_error
from fastface_pl.data.errors import DatasetError
from fastface_pl.safety import EXIT_DIVERGED, TrainingDiverged, TrainingInterrupted
from fastface_pl.scheduling.detectors import NonFiniteLossError

__all__ = ["EXIT_USAGE", "Outcome", "UsageError", "classify_fault", "reason_of", "resume_command"]

EXIT_USAGE = 2
_PACKAGE = Path(__file__).resolve().parent


class UsageError(Exception):
    """A problem in the command line or the data that the user must fix; reported without a traceback."""


@dataclass(frozen=True)
class Outcome:
    """What a fault means: ``status`` (``usage``, ``diverged``, ``interrupted``), the process ``exit_code``, the
    ``message`` for the user, the ``checkpoint`` to resume from (or None) and the ``record`` for results.json."""

    status: str
    exit_code: int
    message: str
    checkpoint: Optional[Path] = None
    record: dict[str, Any] = field(default_factory=dict)


def reason_of(error: BaseException) -> str:
    """The message of an error without the worker's traceback that a DataLoader worker's error carries."""
    message = str(error).rstrip()
    if "Original Traceback" in message:  # raised in a DataLoader worker: keep the reason only
        message = message.splitlines()[-1]
    return message


def resume_command(overrides: Sequence[str], checkpoint: Path) -> str:
    """The command line that resumes this run from ``checkpoint`` (its overrides, ``ckpt_path`` replaced)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("ckpt_path=", "hydra.run.dir="))]
    return shlex.join(["python", "-m", "fastface_pl.train", *kept, f"ckpt_path={checkpoint}"])


def classify_fault(error: BaseException, run_dir: Path, overrides: Sequence[str] = (), *,
                   step: Optional[int] = None) -> Optional[Outcome]:
    """The :class:`Outcome` of ``error`` raised by a run in ``run_dir``; ``None`` for a crash (not classified).

    Args:
        error: what the run raised.
        run_dir: the run folder, where the newest checkpoint is looked for.
        overrides: the command line's overrides, for the resume command in the message.
        step: the optimizer step reached (names the step of a non-finite loss raised by the LR callback).
    """
    if isinstance(error, NonFiniteLossError):  # an LR callback built outside train.py with on_nonfinite="raise"
        error = TrainingDiverged(int(step or 0), str(error))
    if isinstance(error, TrainingDiverged):
        return _diverged(error, run_dir, overrides)
    if isinstance(error, DiskFullError):  # a save failed for lack of space: the files written before are whole
        newest = _newest(run_dir)
        message = f"{error}\nThe newest whole checkpoint is {newest}." if newest else str(error)
        record = {"status": "disk_full", "reason": str(error), "checkpoint": str(newest) if newest else None}
        return Outcome("disk_full", EXIT_USAGE, message, newest, record)
    interrupted = _signal_of(error)
    if interrupted is not None:
        return _interrupted(error, interrupted, run_dir, overrides)
    message = _usage_message(error)
    if message is None:
        return None
    return Outcome("usage", EXIT_USAGE, message)


def _newest(run_dir: Path) -> Optional[Path]:
    candidates = checkpoint_candidates(run_dir)
    return candidates[0] if candidates else None


def _diverged(error: TrainingDiverged, run_dir: Path, overrides: Sequence[str]) -> Outcome:
    newest = _newest(run_dir)
    keep = (f"The newest checkpoint, {newest}, holds finite weights (checkpoints of non-finite weights are never "
            "written); to resume from it, change model.lr (or trainer.precision) in:\n  "
            f"{resume_command(overrides, newest)}") if newest else "No checkpoint was written before it."
    message = (f"{error}.\nTry a lower learning rate (model.lr=...), bf16 instead of fp16 "
               f"(trainer.precision=bf16-mixed), or gradient clipping (model.clip_grad_norm=...).\n{keep}\n"
               f"results.json in {run_dir} records it.")
    record = {"status": "diverged", "diverged_at_step": error.step, "reason": error.reason,
              "last_good_checkpoint": str(newest) if newest else None}
    return Outcome("diverged", EXIT_DIVERGED, message, newest, record)


def _signal_of(error: BaseException) -> Optional[int]:
    """The signal that stopped the run, or None when ``error`` is not an interruption."""
    if isinstance(error, TrainingInterrupted):
        return error.signum
    if isinstance(error, SIGTERMException):
        return signal.SIGTERM
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    # a second Ctrl+C: Lightning's KeyboardInterrupt path ignores SIGINT from then on and exits 1
    if isinstance(error, SystemExit) and error.code == 1 and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        return signal.SIGINT
    return None


def _interrupted(error: BaseException, signum: int, run_dir: Path, overrides: Sequence[str]) -> Outcome:
    checkpoint = getattr(error, "checkpoint", None)
    where = "the state of the step reached is in"
    if checkpoint is None:
        checkpoint = _newest(run_dir)
        where = "the step in flight was not saved; the newest checkpoint is"
    name = signal.Signals(signum).name
    if checkpoint is None:
        message = f"stopped by {name}; no checkpoint had been written yet"
    else:
        message = f"stopped by {name}; {where}\n  {checkpoint}\nResume with:\n  {resume_command(overrides, checkpoint)}"
    record = {"status": "interrupted", "signal": name, "checkpoint": str(checkpoint) if checkpoint else None}
    return Outcome("interrupted", 128 + int(signum), message, Path(checkpoint) if checkpoint else None, record)


def _raised_here(error: BaseException) -> bool:
    """Whether ``error`` is of a fastface_pl type, or was raised by fastface_pl's own code (its argument checks)."""
    if type(error).__module__.startswith("fastface_pl"):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def _usage_message(error: BaseException) -> Optional[str]:
    """The message of an error about the user's configuration, data or checkpoint, else None (a crash)."""
    if isinstance(error, UsageError):
        return str(error)
    if isinstance(error, PermissionError):
        return (f"permission denied: {error.filename or error}: fix its permissions, or point the config elsewhere "
                "(data.root=..., hydra.run.dir=...)")
    if not isinstance(error, (ValueError, RuntimeError)):
        return None
    message = str(error).rstrip()
    if isinstance(error, (DatasetError, CheckpointError)) or (isinstance(error, ValueError) and _raised_here(error)):
        return reason_of(error)  # DatasetError and argument checks: the message says what to fix
    if "Error(s) in loading state_dict" in message or "size mismatch" in message:  # a checkpoint of another model
        return (f"the checkpoint does not fit the model this config builds ({describe_load_error(error)}): resume "
                "with the model settings it was trained with (see config.yaml in its run folder)")
    if type(error).__module__.startswith(("lightning", "torch")) and isinstance(error, ValueError):
        return message  # Lightning and torch check the arguments the config passed them
    return None
