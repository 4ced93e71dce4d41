"""How a training run ends when it does not complete: one classification of every fault, and the train command's
only exit (docs/fault_tolerance.md).

:func:`classify_fault` maps an exception to an :class:`Outcome`: the status that ``results.json`` records, the
exit code, the message for the user and the checkpoint to resume from. The exception's type decides
(:mod:`fastface_pl.errors`):

- ``usage``, exit 2: a :class:`~fastface_pl.errors.UsageError` (a config value, a path, bad data or checkpoint,
  a folder another run holds); besides, a permission denied, a checkpoint whose weights do not fit the model
  (torch's ``Error(s) in loading state_dict``) and a ``ValueError`` of a class that Lightning or torch define;
- ``diverged``, exit 3: a :class:`~fastface_pl.errors.DivergenceError` (the divergence guard, a non-finite loss
  raised by an LR callback);
- ``disk_full``, exit 2: a save failed for lack of space (the files written before it are whole);
- ``interrupted``, exit 128 + the signal: SIGTERM (143) or Ctrl+C (130), with the checkpoint of the step reached.

Any other exception is a crash, a plain ``ValueError`` raised by fastface_pl's own code included: not classified,
its traceback is shown (exit 1). :func:`fail` and :func:`exit_for` are the only places the train command exits.
"""

from __future__ import annotations

import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

from lightning.pytorch.utilities.exceptions import SIGTERMException

from fastface_pl.checkpoints import checkpoint_candidates, describe_load_error
from fastface_pl.errors import DiskFullError, DivergenceError, InterruptionError, UsageError
from fastface_pl.safety import TrainingDiverged

__all__ = ["Outcome", "classify_fault", "exit_for", "fail", "reason_of", "resume_command"]

_UNCLASSIFIED = object()


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

    An error is classified once: the outcome is kept on it, and a second call returns that one (``train.py``
    classifies a fault of ``trainer.fit``, where the step is known, before it exits).

    Args:
        error: what the run raised.
        run_dir: the run folder, where the newest checkpoint is looked for.
        overrides: the command line's overrides, for the resume command in the message.
        step: the optimizer step reached (names the step of a non-finite loss raised by the LR callback).
    """
    outcome = getattr(error, "_fastface_outcome", _UNCLASSIFIED)
    if outcome is _UNCLASSIFIED:
        outcome = _classify(error, run_dir, overrides, step)
        try:
            error._fastface_outcome = outcome  # type: ignore[union-attr]
        except AttributeError:  # pragma: no cover - an exception type with __slots__: classified again if asked
            pass
    return outcome  # type: ignore[return-value]


def _classify(error: BaseException, run_dir: Path, overrides: Sequence[str], step: Optional[int]) -> Optional[Outcome]:
    if isinstance(error, DivergenceError):
        if not isinstance(error, TrainingDiverged):  # a non-finite loss raised by an LR callback: the step reached
            error = TrainingDiverged(int(step or 0), str(error))
        return _diverged(error, run_dir, overrides)
    if isinstance(error, DiskFullError):  # a save failed for lack of space: the files written before are whole
        newest = _newest(run_dir)
        message = f"{error}\nThe newest whole checkpoint is {newest}." if newest else str(error)
        record = {"status": error.status, "reason": str(error), "checkpoint": str(newest) if newest else None}
        return Outcome(error.status, error.exit_code, message, newest, record)
    interrupted = _signal_of(error)
    if interrupted is not None:
        return _interrupted(error, interrupted, run_dir, overrides)
    message = _usage_message(error)
    if message is None:
        return None
    return Outcome(UsageError.status, UsageError.exit_code, message)


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
    return Outcome(error.status, error.exit_code, message, newest, record)


def _signal_of(error: BaseException) -> Optional[int]:
    """The signal that stopped the run, or None when ``error`` is not an interruption."""
    if isinstance(error, InterruptionError):
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
    return Outcome(InterruptionError.status, 128 + int(signum), message, Path(checkpoint) if checkpoint else None, record)


def _usage_message(error: BaseException) -> Optional[str]:
    """The message of an error about the user's configuration, data or checkpoint, else None (a crash)."""
    if isinstance(error, UsageError):
        return reason_of(error)  # the message says what to fix (a DataLoader worker's traceback left out)
    if isinstance(error, PermissionError):
        return (f"permission denied: {error.filename or error}: fix its permissions, or point the config elsewhere "
                "(data.root=..., hydra.run.dir=...)")
    if not isinstance(error, (ValueError, RuntimeError)):
        return None
    message = str(error).rstrip()
    if "Error(s) in loading state_dict" in message or "size mismatch" in message:  # a checkpoint of another model
        return (f"the checkpoint does not fit the model this config builds ({describe_load_error(error)}): resume "
                "with the model settings it was trained with (see config.yaml in its run folder)")
    if type(error).__module__.startswith(("lightning", "torch")) and isinstance(error, ValueError):
        return message  # Lightning and torch check the arguments the config passed them
    return None


def fail(message: Optional[str], code: int, label: str = "error: ") -> NoReturn:
    """Print ``fastface_pl.train: <label><message>`` (when there is a message) and exit with ``code``."""
    if message:
        print(f"fastface_pl.train: {label}{message.rstrip()}", file=sys.stderr)
    sys.exit(code)


def exit_for(outcome: Outcome, rank: Optional[int] = None) -> NoReturn:
    """End the train command as ``outcome`` says. ``rank``: the DDP rank of a process other than the launching one,
    which says nothing of a divergence or a signal (every rank stops together on those: rank 0 says it)."""
    label = "" if outcome.status == InterruptionError.status else "error: "
    if rank is not None:
        if outcome.status in (DivergenceError.status, InterruptionError.status):
            fail(None, outcome.exit_code)
        label = f"[rank {rank}] {label}"
    fail(outcome.message, outcome.exit_code, label=label)
