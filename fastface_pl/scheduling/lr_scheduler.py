"""FastFaceLR: the FastFace / Moving Haar schedule for plain PyTorch loops (no Lightning).

It works like ``torch.optim.lr_scheduler.ReduceLROnPlateau``, but is stepped once per *optimizer*
step with that step's training loss::

    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    scheduler = FastFaceLR(optimizer, FastFaceDetector(patience=int(0.05 * total_steps)))
    for images, labels in loader:
        loss = criterion(model(images), labels)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        scheduler.step(loss.detach())   # reads the loss to the host: a CPU-GPU sync point

To avoid the sync on every step, collect the losses on the device and call ``step`` for each value
of a block read with one ``.tolist()`` (the decisions are the same, applied up to a block later).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch

from fastface_pl.scheduling.auto import AutoFastFaceDetector
from fastface_pl.scheduling.detectors import Detector, FastFaceDetector, MovingHaarDetector

__all__ = ["FastFaceLR"]

_STATE_VERSION = 1
_NONFINITE_CHOICES = ("skip", "raise")


class FastFaceLR:
    """Scales the LR of every parameter group by the detector's factor after each optimizer step.

    Args:
        optimizer: the wrapped optimizer; all its parameter groups get the same factor (ratios kept).
        detector: a :class:`~fastface_pl.scheduling.detectors.FastFaceDetector` or
            :class:`~fastface_pl.scheduling.detectors.MovingHaarDetector`.
        min_lr: floor for the LR: a float for every group or one per group (None: no floor).
            A restart (factor > 1) is never capped.
        on_nonfinite: ``"skip"``: a NaN/inf loss is not fed to the detector, counted in
            ``num_nonfinite`` and reported with one warning; ``"raise"``: it raises ValueError.

    Example::

        >>> import torch
        >>> from fastface_pl.scheduling.detectors import FastFaceDetector
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
        >>> scheduler = FastFaceLR(optimizer, FastFaceDetector(patience=1))
        >>> for loss in (3.0, 3.0, 3.0):
        ...     _ = scheduler.step(loss)
        >>> scheduler.get_last_lr()
        [0.01]

    .. note::
        Call ``step(loss)`` once per optimizer step (not per epoch), after ``optimizer.step()``;
        the new LR applies from the next optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, detector: Detector,
                 min_lr: float | Sequence[float] | None = None, on_nonfinite: str = "skip") -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(detector, (FastFaceDetector, MovingHaarDetector, AutoFastFaceDetector)):
            raise ValueError(f"`detector` must be a FastFaceDetector, MovingHaarDetector or AutoFastFaceDetector "
                             f"(see build_detector), "
                             f"got {type(detector).__name__}")
        if on_nonfinite not in _NONFINITE_CHOICES:
            raise ValueError(f"`on_nonfinite` can be {' or '.join(_NONFINITE_CHOICES)}, got {on_nonfinite!r}")
        self.optimizer = optimizer
        self.detector = detector
        self.on_nonfinite = on_nonfinite
        self.min_lrs = self._resolve_min_lr(min_lr, len(optimizer.param_groups))
        self.last_step = 0
        self.num_nonfinite = 0
        self.decisions: list[tuple[int, float, float]] = []
        self._warned = False
        self._last_lr = [float(group["lr"]) for group in optimizer.param_groups]

    @staticmethod
    def _resolve_min_lr(min_lr: Any, num_groups: int) -> list[float] | None:
        if min_lr is None:
            return None
        values = list(min_lr) if isinstance(min_lr, (list, tuple)) else [min_lr] * num_groups
        if len(values) != num_groups:
            raise ValueError(f"`min_lr` must be one float or {num_groups} (one per parameter group), "
                             f"got {len(values)} values")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
                raise ValueError(f"`min_lr` must be a finite float >= 0 (or None), got {min_lr!r}")
        return [float(v) for v in values]

    def step(self, loss: float | torch.Tensor) -> float:
        """Feeds the loss of one optimizer step and rescales the LR if the detector decides.

        Args:
            loss: a float or a one-element tensor (read with ``.item()``: a CPU-GPU sync point).

        Returns:
            The factor applied (1.0 when nothing was decided or the loss was skipped).
        """
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"`loss` must be a scalar (one element), got a tensor of shape {tuple(loss.shape)}; "
                                 "pass the mean loss of the optimizer step")
            loss = loss.item()
        loss = float(loss)
        self.last_step += 1
        if not math.isfinite(loss):
            if self.on_nonfinite == "raise":
                raise ValueError(f"non-finite loss {loss} at optimizer step {self.last_step}; "
                                 "pass on_nonfinite='skip' to skip such steps")
            self.num_nonfinite += 1
            if not self._warned:
                self._warned = True
                warnings.warn(f"FastFaceLR: non-finite loss {loss} at optimizer step {self.last_step} skipped "
                              "(not fed to the detector); further ones are counted in `num_nonfinite` silently.",
                              RuntimeWarning, stacklevel=2)
            return 1.0
        factor = self.detector.update(loss)
        if factor != 1.0:
            self._apply(factor)
        return factor

    def _apply(self, factor: float) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            old_lr = float(group["lr"])
            new_lr = old_lr * factor
            if self.min_lrs is not None and factor < 1.0:
                # never below the floor, and a group already below it is left alone (a decay never raises the LR)
                new_lr = max(new_lr, min(old_lr, self.min_lrs[index]))
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(new_lr)
            else:
                group["lr"] = new_lr
        self._last_lr = [float(group["lr"]) for group in self.optimizer.param_groups]
        self.decisions.append((self.last_step, factor, self._last_lr[0]))

    def get_last_lr(self) -> list[float]:
        """The LR of every parameter group after the last step (as ReduceLROnPlateau)."""
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """Scheduler and detector state (the LRs themselves live in the optimizer's state_dict)."""
        return {
            "version": _STATE_VERSION,
            "detector": self.detector.state_dict(),
            "min_lrs": self.min_lrs,
            "on_nonfinite": self.on_nonfinite,
            "last_step": self.last_step,
            "num_nonfinite": self.num_nonfinite,
            "warned": self._warned,
            "decisions": [list(d) for d in self.decisions],
            "last_lr": list(self._last_lr),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; load the optimizer's own state_dict too, for its LRs."""
        if "detector" not in state:
            raise ValueError("state has no 'detector' entry: pass a dict from FastFaceLR.state_dict()")
        self.detector.load_state_dict(state["detector"])
        self.min_lrs = state.get("min_lrs", self.min_lrs)
        on_nonfinite = state.get("on_nonfinite", self.on_nonfinite)
        if on_nonfinite not in _NONFINITE_CHOICES:
            raise ValueError(f"state['on_nonfinite'] can be {' or '.join(_NONFINITE_CHOICES)}, got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.last_step = int(state.get("last_step", 0))
        self.num_nonfinite = int(state.get("num_nonfinite", 0))
        self._warned = bool(state.get("warned", self.num_nonfinite > 0))
        self.decisions = [(int(s), float(f), float(lr)) for s, f, lr in state.get("decisions", [])]
        self._last_lr = [float(v) for v in state.get("last_lr", self._last_lr)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(detector={self.detector!r}, min_lrs={self.min_lrs}, "
                f"on_nonfinite={self.on_nonfinite!r}, last_step={self.last_step})")
