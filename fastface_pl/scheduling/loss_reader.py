"""The one reader of the training loss per optimizer step, shared by every callback that needs it.

:class:`~fastface_pl.scheduling.callback.FastFaceLRCallback` and :class:`~fastface_pl.safety.DivergenceGuard`
both need the loss of each optimizer step, and neither may synchronise the host with the device per step.
One :class:`StepLossReader` per fit keeps the micro-batch losses on the device, groups them into optimizer
steps, and reads a block of ``k`` steps with one stack, one reduction across ranks and one transfer (k: the
smallest block any consumer asked for; blocks end at steps k, 2k, 3k ...). Each consumer's
``receive_losses(trainer, steps)`` gets the block as :class:`StepLoss` items (and its optional
``on_optimizer_step(trainer, step)`` is called as each step completes). The
reader is flushed before a checkpoint's callback state is collected (by the first consumer's
``state_dict``), at epoch and training end, so what a checkpoint stores has seen every completed step.

An *optimizer step* is a batch on which ``trainer.global_step`` advanced: with automatic optimization the
end of an accumulation window, with manual optimization a batch that called ``optimizer.step()`` at least
once. Its value is the mean of the micro-batch losses of the step (Lightning hands over each divided by
``accumulate_grad_batches``, also in an epoch's short last window). See docs/lightning.md.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["StepLoss", "StepLossReader"]


class StepLoss(NamedTuple):
    """One optimizer step: its 1-based number, its loss (mean across ranks), and Lightning's logging step."""

    step: int
    value: float
    log_step: int


_READERS: "weakref.WeakKeyDictionary[Trainer, StepLossReader]" = weakref.WeakKeyDictionary()


def _batch_index(trainer: Trainer) -> int:
    return trainer.fit_loop.epoch_loop.batch_progress.total.ready


class StepLossReader:
    """Groups the step losses of one fit and hands them to its consumers, one device read per block."""

    def __init__(self) -> None:
        self.consumers: list[Any] = []
        self._sizes: list[int] = []  # the block size each consumer asked for
        self.every_n_steps = 1
        self.steps = 0  # optimizer steps so far (the 1-based number of the last one), across resumes: the live count
        self._micro: list[torch.Tensor] = []  # unread losses: those of the pending steps, then the window's
        self._window = 0  # losses of the step in progress
        self._pending: list[tuple[int, int, float, int]] = []  # (step, losses, multiplier, log step)
        self._trainer: Any = None
        self._started = False
        self._last_global_step = 0
        self._divisor = 1
        self._batch = -1  # index of the last batch taken in, so that a second consumer's call is a no-op
        self._batch_step: int | None = None
        self._missing_warned = False
        self.for_checkpoint = False  # a flush before a checkpoint's state is collected is under way
        # Counts of this fit, for a run length in optimizer steps under manual optimization.
        self.start_counts = (0, 0, 0)  # (batch index, global step, steps) when training started

    @property
    def started(self) -> bool:
        """Whether training started in this fit (the count is live from then on)."""
        return self._started

    # ------------------------------------------------------------------ one reader per fit
    @staticmethod
    def attach(trainer: Trainer, consumer: Any, every_n_steps: int) -> StepLossReader:
        """The reader of this fit (made by the first consumer at fit start), with ``consumer`` added."""
        reader = _READERS.get(trainer)
        if reader is None or reader._started or consumer in reader.consumers:  # a new fit
            reader = _READERS[trainer] = StepLossReader()
        reader.consumers.append(consumer)
        reader._sizes.append(every_n_steps)
        reader.every_n_steps = min(reader._sizes)
        reader._trainer = weakref.ref(trainer)
        return reader

    def detach(self, trainer: Trainer) -> None:
        """Ends the fit (fit end or exception): the next fit gets a fresh reader."""
        if _READERS.get(trainer) is self:
            del _READERS[trainer]

    def start(self, trainer: Trainer, pl_module: LightningModule, steps: int | None = None) -> None:
        """At train start (after any restore). The count of optimizer steps continues from ``steps``, the count of
        the one consumer that keeps one (the LR callback's scheduler), or else from Lightning's global step (the
        same number under automatic optimization; under manual optimization it counts every ``optimizer.step()``)."""
        if not self._started:
            self._started = True
            self._last_global_step = trainer.global_step
            self._divisor = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self._batch = -1
            self.steps = int(trainer.global_step)
        if steps is not None:
            self.steps = steps
        self.start_counts = (_batch_index(trainer), trainer.global_step, self.steps)

    # ------------------------------------------------------------------ per batch: no device work, no sync
    def on_train_batch_end(self, trainer: Trainer, outputs: Any) -> int | None:
        """Takes in the batch's loss once (every consumer calls this); returns the optimizer step the batch
        completed, or None while gradients accumulate."""
        batch = _batch_index(trainer)
        if batch == self._batch:
            return self._batch_step
        self._batch, self._batch_step = batch, None
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._micro.append(loss.detach().reshape(()))  # a loss of shape [1] too (numel 1)
            self._window += 1
        if trainer.global_step == self._last_global_step:
            return None
        self._last_global_step = trainer.global_step
        self.steps += 1
        self._batch_step = self.steps
        if self._window == 0:
            if not self._missing_warned:
                self._missing_warned = True
                rank_zero_warn(f"training_step returned no loss at optimizer step {self.steps}; FastFace callbacks "
                               "skip such steps. Return the loss tensor (or a dict with a 'loss' key).")
        else:
            log_step = trainer.fit_loop.epoch_loop._batches_that_stepped  # Lightning's x-axis for this batch
            self._pending.append((self.steps, self._window, self._divisor / self._window, log_step))
            self._window = 0
        for consumer in self.consumers:
            if hasattr(consumer, "on_optimizer_step"):
                consumer.on_optimizer_step(trainer, self.steps)
        if self.steps % self.every_n_steps == 0:  # blocks end at steps k, 2k, ... whatever was flushed between
            self.flush(trainer)
        return self.steps

    # ------------------------------------------------------------------ the block read
    def flush(self, trainer: Trainer | None = None, for_checkpoint: bool = False) -> None:
        """Reads the completed steps not yet read (one stack, one reduction, one transfer) and hands them over.

        ``for_checkpoint``: called from a consumer's ``state_dict`` (consumers may say so in what they raise).
        """
        if not self._pending:
            return
        trainer = trainer if trainer is not None else self._trainer()
        self.for_checkpoint = for_checkpoint
        pending, self._pending = self._pending, []
        count = len(self._micro) - self._window
        tensors, self._micro = self._micro[:count], self._micro[count:]
        values = self._read(trainer, tensors)
        block, start = [], 0
        for step, size, multiplier, log_step in pending:
            chunk = values[start : start + size]
            start += size
            block.append(StepLoss(step, sum(chunk) * multiplier, log_step))
        try:
            for consumer in self.consumers:
                consumer.receive_losses(trainer, block)
        finally:
            self.for_checkpoint = False

    @staticmethod
    def _read(trainer: Trainer, tensors: list[torch.Tensor]) -> list[float]:
        with torch.no_grad():
            if len(tensors) == 1 and trainer.world_size == 1:
                return [float(tensors[0].item())]  # k = 1: the synchronisation of every step
            block = torch.stack(tensors).float()  # a new tensor: strategy.reduce works in place on it
            # Under DDP every rank reads the mean across ranks (a NaN on any rank reaches all). Not while the
            # run is failing: an exception may have reached only some ranks, so no collective then.
            if trainer.world_size > 1 and trainer.state.status == TrainerStatus.RUNNING \
                    and torch.distributed.is_available() and torch.distributed.is_initialized():
                block = trainer.strategy.reduce(block, reduce_op="mean")
            return block.tolist()  # the one device->host synchronisation of the block

    def run_rates(self, trainer: Trainer) -> tuple[float, float] | None:
        """Under manual optimization: (global steps per optimizer step, optimizer steps per batch) seen in this
        fit, once two optimizer steps show the pattern; None before."""
        batch0, global0, steps0 = self.start_counts
        steps = self.steps - steps0
        if steps < 2:
            return None
        return (trainer.global_step - global0) / steps, steps / (_batch_index(trainer) - batch0)


class StepLossConsumer(Callback):
    """A callback fed by the fit's :class:`StepLossReader`: it holds the reader during a fit and gives it back at
    the fit's end or on an exception."""

    _reader: StepLossReader | None = None

    def _end_fit(self, trainer: Trainer) -> None:
        if self._reader is not None:
            self._reader.detach(trainer)
            self._reader = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_fit(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._end_fit(trainer)
