"""Callbacks that keep a long run trustworthy: a divergence guard and a pre-emption checkpoint.

:class:`DivergenceGuard` stops a run whose loss stays non-finite, whatever the LR scheduler, and refuses to
save non-finite weights, so the newest checkpoint on disk is always a good one. :class:`PreemptionCheckpoint`
turns SIGTERM (Slurm, Kubernetes, ``docker stop``; received through Lightning's own handler) and a first
Ctrl+C into a resumable checkpoint of the current step. Both end the fit with an exception that
``fastface_pl.train`` turns into a message and an exit code (:data:`EXIT_DIVERGED`, 128 + the signal).
See ``docs/fault_tolerance.md``.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from fastface_pl.validation import check_positive_int

__all__ = ["DivergenceGuard", "TrainingDiverged", "PreemptionCheckpoint", "TrainingInterrupted", "EXIT_DIVERGED",
           "finite_or_none"]

EXIT_DIVERGED = 3  # the exit code of a run stopped by the divergence guard (2: a usage error, 1: a crash)


class TrainingDiverged(RuntimeError):
    """The training diverged: ``step`` is the first optimizer step of the failure, ``reason`` what was seen."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"training diverged at optimizer step {step}: {reason}")
        self.step = step
        self.reason = reason


class TrainingInterrupted(Exception):
    """A signal stopped the run; ``checkpoint`` holds the state of ``step`` (``None`` if none could be saved)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        super().__init__(f"{signal.Signals(signum).name} received at optimizer step {step}")
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint


def _loss_of(outputs: Any) -> Optional[torch.Tensor]:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss if isinstance(loss, torch.Tensor) else None


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    floats = [t for t in tensors if t.is_floating_point() or t.is_complex()]
    if not floats:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())  # one host sync


class DivergenceGuard(Callback):
    """Stop training after ``max_nonfinite_steps`` consecutive non-finite losses, or at once on non-finite weights.

    The losses stay on the device and are read in blocks of ``check_every_n_steps`` batches (one host sync per
    block, none per step). A block that holds a non-finite loss also checks the weights (one more sync, only
    then). Every checkpoint save checks the weights first and is refused (nothing written, the newest good
    checkpoint kept) when any is non-finite. Isolated non-finite steps (an fp16 overflow that the gradient
    scaler skips) are not a divergence: only a run of them is.

    Raises:
        TrainingDiverged: from the batch-end or checkpoint hook; the fit ends through Lightning's exception path.
    """

    def __init__(self, max_nonfinite_steps: int = 20, check_every_n_steps: int = 16) -> None:
        self.max_nonfinite_steps = check_positive_int("DivergenceGuard max_nonfinite_steps", max_nonfinite_steps)
        self.check_every_n_steps = check_positive_int("DivergenceGuard check_every_n_steps", check_every_n_steps)
        self._pending: list[torch.Tensor] = []
        self._pending_steps: list[int] = []
        self._streak = 0
        self._streak_start: Optional[int] = None
        self._module: Optional[LightningModule] = None
        self._trainer: Optional[Trainer] = None

    @property
    def state_key(self) -> str:
        return "DivergenceGuard"

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss_of(outputs)
        if loss is None:
            return
        self._module, self._trainer = pl_module, trainer
        self._pending.append(loss.detach().float().reshape(()))
        self._pending_steps.append(int(trainer.global_step))
        if len(self._pending) >= self.check_every_n_steps:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        flags = torch.isfinite(torch.stack(self._pending)).float()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:  # every rank decides alike (a bad loss on any rank)
            flags = trainer.strategy.reduce(flags, reduce_op="mean")
        finite = [f == 1.0 for f in flags.tolist()]  # the one host sync of the block
        steps, self._pending, self._pending_steps = self._pending_steps, [], []
        for ok, step in zip(finite, steps):
            if ok:
                self._streak, self._streak_start = 0, None
                continue
            self._streak += 1
            self._streak_start = step if self._streak_start is None else self._streak_start
            if self._streak >= self.max_nonfinite_steps:
                raise TrainingDiverged(self._streak_start,
                                       f"{self._streak} consecutive non-finite training losses (NaN/inf)")
        if not all(finite) and self._module is not None:
            first_bad = steps[finite.index(False)]
            if not _all_finite([p.detach() for p in self._module.parameters()]):
                raise TrainingDiverged(first_bad, "the training loss became non-finite (NaN/inf) and so did "
                                                  "the model's weights")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint of non-finite weights: raising here aborts the save before any file."""
        self._module, self._trainer = pl_module, trainer
        not_written = f"the checkpoint of step {trainer.global_step} was not written"
        try:
            self._flush()
        except TrainingDiverged as err:
            raise TrainingDiverged(err.step, f"{err.reason}; {not_written}") from None
        tensors = [t for t in checkpoint.get("state_dict", {}).values() if isinstance(t, torch.Tensor)]
        if not _all_finite(tensors):
            step = self._streak_start if self._streak_start is not None else int(trainer.global_step)
            raise TrainingDiverged(step, f"the model's weights are non-finite (NaN/inf); {not_written}")

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self._streak, "streak_start": self._streak_start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._streak = int(state_dict.get("streak", 0))
        self._streak_start = state_dict.get("streak_start")


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


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, for strict JSON (``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
