"""Callbacks that keep a long run trustworthy: a divergence guard, a pre-emption checkpoint, and under DDP the
ranks stopping together on a fault (:class:`DistributedFaults`, :func:`end_started_ranks`).

:class:`DivergenceGuard` stops a run whose loss stays non-finite, whatever the LR scheduler, and refuses to
save non-finite weights, so the newest checkpoint on disk is always a good one. :class:`PreemptionCheckpoint`
turns SIGTERM (Slurm, Kubernetes, ``docker stop``; received through Lightning's own handler) and a first
Ctrl+C into a resumable checkpoint of the current step. Both end the fit with an exception that
``fastface_pl.train`` turns into a message and an exit code (3, 128 + the signal: :mod:`fastface_pl.errors`).
See ``docs/fault_tolerance.md``.
"""

from __future__ import annotations

import logging
import math
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from fastface_pl.errors import DivergenceError, InterruptionError, SavedStateError
from fastface_pl.scheduling.loss_reader import StepLoss, StepLossConsumer, StepLossReader
from fastface_pl.scheduling.saved_state import loading
from fastface_pl.argument_checks import check_int

log = logging.getLogger(__name__)

__all__ = ["DivergenceGuard", "TrainingDiverged", "PreemptionCheckpoint", "TrainingInterrupted"]


class TrainingDiverged(DivergenceError, RuntimeError):
    """The training diverged: ``step`` is the first optimizer step of the failure, ``reason`` what was seen."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"training diverged at optimizer step {step}: {reason}")
        self.step = step
        self.reason = reason


class TrainingInterrupted(InterruptionError):
    """A signal stopped the run; ``checkpoint`` holds the state of ``step`` (``None`` if none could be saved)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        super().__init__(signum, f"{signal.Signals(signum).name} received at optimizer step {step}")
        self.step = step
        self.checkpoint = checkpoint


def _check_restored_state(trainer: Trainer, pl_module: LightningModule) -> None:
    """Raises ``CheckpointError`` naming ``trainer.ckpt_path`` when the restored weights or optimizer state
    hold a NaN or an infinity (one host sync at the start of a resumed fit; the names only on failure)."""
    parameters = dict(pl_module.named_parameters())
    names = {id(p): name for name, p in parameters.items()}
    named = [(f"weight {name}", p.detach()) for name, p in parameters.items()]
    for k, optimizer in enumerate(trainer.optimizers):
        for parameter, state in optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value) and value.is_floating_point():
                    named.append((f"optimizer {k} state {key!r} of {names.get(id(parameter), 'a parameter')}", value))
    if _all_finite([tensor for _, tensor in named]):
        return
    from fastface_pl.checkpoints import CheckpointError

    bad = [name for name, tensor in named if not bool(torch.isfinite(tensor).all())]
    raise CheckpointError(
        f"checkpoint {trainer.ckpt_path} holds non-finite values (NaN/inf) in {', '.join(bad[:3])}"
        f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}: the file is damaged, not the training diverging; "
        "resume from an earlier checkpoint")


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    floats = [t for t in tensors if t.is_floating_point() or t.is_complex()]
    if not floats:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())  # one host sync


class DivergenceGuard(StepLossConsumer):
    """Stop training after ``max_nonfinite_steps`` consecutive non-finite losses, or at once on non-finite weights.

    The losses of the optimizer steps come from the fit's one
    :class:`~fastface_pl.scheduling.loss_reader.StepLossReader`, shared with ``FastFaceLRCallback``: they stay
    on the device and are read in blocks of ``check_every_n_steps`` optimizer steps (or the callback's smaller
    ``sync_every_n_steps``), one host sync per block for both. A block that holds a non-finite loss also checks
    the weights (one more sync, only then). Every checkpoint save reads the steps not yet read and checks the
    weights first, and is refused (nothing written, the newest good checkpoint kept) when any is non-finite.
    Isolated non-finite steps (an fp16 overflow that the gradient scaler skips) are not a divergence: only a
    run of them is. ``max_nonfinite_steps=1`` stops at the first one.

    Raises:
        TrainingDiverged: from the batch-end or checkpoint hook; the fit ends through Lightning's exception path.
    """

    def __init__(self, max_nonfinite_steps: int = 20, check_every_n_steps: int = 16) -> None:
        self.max_nonfinite_steps = check_int("DivergenceGuard max_nonfinite_steps", max_nonfinite_steps, 1)
        self.check_every_n_steps = check_int("DivergenceGuard check_every_n_steps", check_every_n_steps, 1)
        self._reader: Optional[StepLossReader] = None
        self._streak = 0
        self._streak_start: Optional[int] = None

    @property
    def state_key(self) -> str:
        return "DivergenceGuard"

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reader = StepLossReader.attach(trainer, self, self.check_every_n_steps)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reader.start(trainer, pl_module)  # numbered by the LR callback's count, or the global step
        if trainer.ckpt_path:  # a resume: a checkpoint holding NaN/inf is refused, not trained into a "divergence"
            _check_restored_state(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._reader.on_train_batch_end(trainer, outputs)

    def receive_losses(self, trainer: Trainer, steps: list[StepLoss]) -> None:
        """Counts the consecutive non-finite optimizer steps of a block read by the reader."""
        not_written = f"; the checkpoint of step {trainer.global_step} was not written" \
            if self._reader is not None and self._reader.for_checkpoint else ""
        first_bad = None
        for item in steps:
            if math.isfinite(item.value):
                self._streak, self._streak_start = 0, None
                continue
            first_bad = item.step if first_bad is None else first_bad
            self._streak += 1
            self._streak_start = item.step if self._streak_start is None else self._streak_start
            if self._streak >= self.max_nonfinite_steps:
                raise TrainingDiverged(self._streak_start, f"{self._streak} consecutive non-finite training losses "
                                                           f"(NaN/inf){not_written}")
        if first_bad is not None and not _all_finite([p.detach() for p in trainer.lightning_module.parameters()]):
            raise TrainingDiverged(first_bad, "the training loss became non-finite (NaN/inf) and so did the model's "
                                              f"weights{not_written}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._reader is not None:
            self._reader.flush()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint of non-finite weights: raising here aborts the save before any file."""
        tensors = [t for t in checkpoint.get("state_dict", {}).values() if isinstance(t, torch.Tensor)]
        if not _all_finite(tensors):
            step = self._streak_start if self._streak_start is not None else int(trainer.global_step)
            raise TrainingDiverged(step, "the model's weights are non-finite (NaN/inf); the checkpoint of step "
                                         f"{trainer.global_step} was not written")

    def state_dict(self) -> dict[str, Any]:
        # Lightning collects callback state before on_save_checkpoint: the steps not yet read are read here.
        if self._reader is not None:
            self._reader.flush(for_checkpoint=True)
        return {"streak": self._streak, "streak_start": self._streak_start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`.

        Raises:
            SavedStateError: naming the key, for a bad value.
        """
        with loading("DivergenceGuard", SavedStateError):
            if not isinstance(state_dict, Mapping):
                raise ValueError(f"DivergenceGuard state must be a dict, got {type(state_dict).__name__}")
            streak = check_int("DivergenceGuard state['streak']", state_dict.get("streak", 0), 0)
            start = check_int("DivergenceGuard state['streak_start']", state_dict.get("streak_start"), 0,
                              allow_none=True, none_means="no streak")
            if (start is None) != (streak == 0):
                raise ValueError(f"DivergenceGuard state['streak_start'] is {start!r} with state['streak'] = "
                                 f"{streak}: a streak has a start step and no streak has none")
        self._streak, self._streak_start = streak, start


class PreemptionCheckpoint(Callback):
    """On SIGTERM or a first Ctrl+C, save a resumable checkpoint of the current step and stop the fit.

    SIGTERM is received by Lightning's own handler (``trainer.received_sigterm``, which also serves Slurm's
    auto-requeue); a first SIGINT is caught here so that the step in flight completes (a second one stops at
    once, without a checkpoint). The checkpoint is written at the end of the optimizer step, where Lightning's
    ``ModelCheckpoint`` writes its step checkpoints, so a resume from it is exact. A signal that arrives during
    validation is acted on when Lightning stops it.

    Raises:
        TrainingInterrupted: after the checkpoint is written (``fastface_pl.train`` exits 128 + signal number).
    """

    def __init__(self, dirpath: str | Path, filename: str = "interrupted-step{step:07d}") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.signum: Optional[int] = None
        self.checkpoint: Optional[Path] = None
        self._previous_sigint: Any = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.signum = signal.SIGINT
        signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)  # a second ^C: at once
        print("\nInterrupted: saving a checkpoint at the end of this step (Ctrl+C again to stop without it)",
              flush=True)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.signum, self.checkpoint = None, None
        # Under DDP, Ctrl+C is left to Lightning (one rank alone cannot save a checkpoint). DataLoader workers
        # ignore SIGINT (fastface_pl.data.datamodule.ignore_sigint_in_worker), so a terminal's Ctrl+C, which
        # reaches the whole process group, does not kill them while this process finishes the step.
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)

    def _restore(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _save(self, trainer: Trainer) -> Path:
        path = self.dirpath / (self.filename.format(step=int(trainer.global_step)) + ".ckpt")
        trainer.save_checkpoint(path)
        self.checkpoint = path
        rank_zero_info(f"Saved the state of optimizer step {trainer.global_step} to {path}")
        return path

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.world_size > 1:
            # Under DDP one rank may see SIGTERM a moment before the others; saving here would leave the ranks
            # in different collectives. Lightning broadcasts rank 0's flag at the start of the next step and
            # raises SIGTERMException on every rank together; on_exception saves the checkpoint then.
            return
        if self.signum is None and trainer.received_sigterm:
            self.signum = signal.SIGTERM
        if self.signum is None:
            return
        self._restore()
        path = self._save(trainer)
        raise TrainingInterrupted(self.signum, int(trainer.global_step), path)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()
        # Lightning stopped on SIGTERM outside a training batch (e.g. in validation): save the step reached
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if isinstance(exception, SIGTERMException) and self.checkpoint is None and fitting:
            self.signum = signal.SIGTERM
            try:
                self._save(trainer)
            except Exception as err:  # noqa: BLE001  (the exit path must not fail; the message says why)
                rank_zero_info(f"Could not save a checkpoint after SIGTERM: {err}")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()


class DistributedFaults(Callback):
    """Under DDP, a SIGTERM that ends all ranks together, and rank 0 alive to record a fault.

    Lightning's SIGTERM handler broadcasts from inside the handler, wherever each rank happens to be (in a
    backward's all-reduce, in a loss reduce): the ranks then wait in different collectives for ever. Here the
    handler only sets the flag (and, on rank 0, passes the signal to the ranks it started, as Lightning does);
    Lightning broadcasts rank 0's flag at the start of the next step and stops every rank together.

    Lightning's ``ddp`` launcher also watches the ranks it started (every 5 s) and kills rank 0 as soon as one has
    exited with an error. A fault that reaches every rank (a divergence, SIGTERM) ends the other ranks first, so
    rank 0 could be killed before it writes results.json, prints the message and exits with the fault's code.
    Once the fault has reached rank 0, the watch is stopped; :func:`end_started_ranks` ends them instead.
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size < 2 or threading.current_thread() is not threading.main_thread():
            return
        connector = trainer._signal_connector  # Lightning restores the previous handler at teardown

        def on_sigterm(signum: int, frame: Any) -> None:
            if not connector.received_sigterm and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)
            connector.received_sigterm = True

        signal.signal(signal.SIGTERM, on_sigterm)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero:
            return
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

        for thread in threading.enumerate():
            if isinstance(thread, _ChildProcessObserver):
                thread._child_processes = []  # nothing left to watch: the thread ends at its next check


def end_started_ranks(trainer: Trainer, grace_s: float = 5.0) -> None:
    """After a fault on rank 0: wait ``grace_s`` for the ranks that Lightning started to exit, then kill the rest
    (a rank waiting for rank 0 in a collective would wait forever)."""
    procs = [p for p in getattr(trainer.strategy.launcher, "procs", None) or [] if p.poll() is None]
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("rank process %d did not end after the fault: killed", proc.pid)
            proc.kill()
            proc.wait()
