"""Replay a logged loss curve through a detector, and compare its decisions with the logged LR.

The package ships one real curve: ResNet100 on MS1MV3, 5 epochs, one GPU, by the FastFace authors
(``fastface_pl/assets/ms1mv3_r100_fastface_log.csv``; one row per 10 optimizer steps, each the mean
of the steps it covers). Replaying it shows both detectors at work on real data in under a second.

Run it (prints the decisions next to the logged LR changes; ``--plot`` also draws them)::

    python -m fastface_pl.scheduling.replay
    python -m fastface_pl.scheduling.replay --plot replay.png

Example::

    >>> from fastface_pl.scheduling.detectors import MovingHaarDetector
    >>> rows = load_loss_log()
    >>> result = replay(MovingHaarDetector(window=4000), expand_loss_log(rows))
    >>> [decision_log_row(step) for step, _ in result.decisions][:3]
    [54280, 72870, 94820]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from array import array
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from fastface_pl.errors import ConfigurationError
from fastface_pl.scheduling.detectors import (
    PAPER_ALPHA,
    PAPER_PATIENCE_FRACTION,
    PAPER_THRESHOLD,
    Detector,
    FastFaceDetector,
    MovingHaarDetector,
)

__all__ = ["LogRow", "ReplayResult", "load_loss_log", "expand_loss_log", "replay", "decision_log_row",
           "logged_lr_changes", "main"]

PACKAGED_LOG = "ms1mv3_r100_fastface_log.csv"
LOG_INTERVAL = 10
#: Total optimizer steps of the packaged run (5 epochs of MS1MV3 at batch 128).
PACKAGED_TOTAL_STEPS = 202_320


class LogRow(NamedTuple):
    """One row of a training log: the optimizer step (1-based), the mean loss of the steps it covers
    (since the previous row), the LR in use at that step, and the epoch."""

    step: int
    loss: float
    lr: float
    epoch: int


@dataclass
class ReplayResult:
    """What :func:`replay` saw.

    Attributes:
        decisions: (1-based step of the deciding update, factor) for every factor other than 1.0, the steps
            counted as the detector counts its losses (``steps_seen``).
        lr_scale: product of all factors at the end (the final LR over the initial one).
        steps: number of losses replayed.
        threshold: the detector's threshold (λ or θ).
        patience: the detector's patience P.
        name: the detector's class name.
        losses, smoothed_loss, signal, stationary_count, lr_scale_trace: per-step arrays
            (``array('d')``, NaN where the detector has no value yet), filled only with ``record=True``.
    """

    decisions: list[tuple[int, float]]
    lr_scale: float
    steps: int
    threshold: float
    patience: int
    name: str
    losses: array = field(default_factory=lambda: array("d"))
    smoothed_loss: array = field(default_factory=lambda: array("d"))
    signal: array = field(default_factory=lambda: array("d"))
    stationary_count: array = field(default_factory=lambda: array("d"))
    lr_scale_trace: array = field(default_factory=lambda: array("d"))

    @property
    def recorded(self) -> bool:
        """Whether the per-step arrays were recorded."""
        return len(self.losses) > 0

    def lrs(self, initial_lr: float) -> list[float]:
        """The LR after each decision, starting from ``initial_lr``."""
        out, lr = [], initial_lr
        for _, factor in self.decisions:
            lr *= factor
            out.append(lr)
        return out


def load_loss_log(path: str | Path | None = None) -> list[LogRow]:
    """Reads a training log CSV with the columns ``step, loss, lr, epoch``.

    Lines starting with ``#`` (the packaged file's provenance line) are skipped.

    Args:
        path: a CSV file; None reads the packaged MS1MV3/ResNet100 log.

    Returns:
        The rows in file order.

    Raises:
        ValueError: a column is missing, a value does not parse, or steps do not increase.
    """
    if path is None:
        text = resources.files("fastface_pl.assets").joinpath(PACKAGED_LOG).read_text(encoding="utf-8")
        source = f"packaged {PACKAGED_LOG}"
    else:
        text = Path(path).read_text(encoding="utf-8")
        source = str(path)
    lines = [line for line in io.StringIO(text) if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    missing = {"step", "loss", "lr", "epoch"} - set(reader.fieldnames or [])
    if missing:
        raise ConfigurationError(
            f"{source}: missing column(s) {sorted(missing)}; expected a header 'step,loss,lr,epoch'")
    rows: list[LogRow] = []
    for number, record in enumerate(reader, start=2):
        try:
            row = LogRow(int(record["step"]), float(record["loss"]), float(record["lr"]), int(record["epoch"]))
        except (TypeError, ValueError) as error:
            raise ConfigurationError(f"{source}: data row {number} does not parse ({error}): {record}") from error
        if not math.isfinite(row.loss):
            raise ConfigurationError(f"{source}: data row {number} (step {row.step}) has a non-finite loss {row.loss}: "
                                     "a detector never takes one; remove or repair that row")
        if rows and row.step <= rows[-1].step:
            raise ConfigurationError(
                f"{source}: steps must increase, row {number} has step {row.step} after {rows[-1].step}")
        rows.append(row)
    if not rows:
        raise ConfigurationError(f"{source}: no data rows")
    return rows


def expand_loss_log(rows: Sequence[LogRow]) -> list[float]:
    """Expands logged means into a per-step loss stream.

    Each row's loss is repeated over the steps it covers: the first row covers steps 1..step (20 in
    the packaged log), every later row the steps since the previous row (10).

    Args:
        rows: rows from :func:`load_loss_log`.

    Returns:
        One loss per optimizer step; its length is the last row's step.
    """
    stream: list[float] = []
    previous = 0
    for row in rows:
        if row.step <= previous:
            raise ConfigurationError(f"row steps must increase and be positive, got {row.step} after {previous}")
        stream.extend([row.loss] * (row.step - previous))
        previous = row.step
    return stream


def decision_log_row(step: int, log_interval: int = LOG_INTERVAL) -> int:
    """The log row on which a decision at (1-based) optimizer step ``step`` first shows.

    The new LR is used from step ``step + 1``, which the row ceil((step+1)/interval)·interval covers.
    """
    return math.ceil((step + 1) / log_interval) * log_interval


def logged_lr_changes(rows: Sequence[LogRow]) -> list[tuple[int, float, float]]:
    """(row step, previous LR, new LR) for every row whose LR differs from the row before it."""
    return [(row.step, before.lr, row.lr) for before, row in zip(rows, rows[1:]) if row.lr != before.lr]


def replay(detector: Detector, losses: Iterable[float], record: bool = False) -> ReplayResult:
    """Feeds ``losses`` to ``detector`` one step at a time.

    Args:
        detector: a fresh (or resumed) detector; it is updated in place.
        losses: the per-step losses (e.g. from :func:`expand_loss_log`).
        record: also keep the per-step loss, smoothed loss, signal, stationary count and LR scale
            (8 bytes each per step), e.g. for :func:`fastface_pl.plotting.plot_schedule`.

    Returns:
        A :class:`ReplayResult`.
    """
    update = detector.update
    first_step = detector.steps_seen
    result = ReplayResult(decisions=[], lr_scale=1.0, steps=0, threshold=detector.threshold,
                          patience=detector.patience, name=type(detector).__name__)
    decide = result.decisions.append
    steps = 0
    if not record:
        for loss in losses:
            factor = update(loss)
            steps += 1
            if factor != 1.0:
                decide((first_step + steps, factor))
    else:
        nan = math.nan
        traces = (result.losses, result.smoothed_loss, result.signal, result.stationary_count,
                  result.lr_scale_trace)
        add_loss, add_smoothed, add_signal, add_count, add_scale = (t.append for t in traces)
        scale = 1.0
        for loss in losses:
            factor = update(loss)
            steps += 1
            if factor != 1.0:
                decide((first_step + steps, factor))
                scale *= factor
            smoothed, signal = detector.smoothed_loss, detector.signal
            add_loss(loss)
            add_smoothed(nan if smoothed is None else smoothed)
            add_signal(nan if signal is None else signal)
            add_count(detector.stationary_count)
            add_scale(scale)
    result.steps = steps
    result.lr_scale = math.prod(f for _, f in result.decisions)
    return result


# --------------------------------------------------------------------------------------------------
# Command line: the real curve through both detectors
# --------------------------------------------------------------------------------------------------
def _comparison_table(result: ReplayResult, rows: Sequence[LogRow], initial_lr: float,
                      compare: bool = True) -> list[str]:
    changes = logged_lr_changes(rows) if compare else []
    header = f"  {'#':>2}  {'decided at':>10}  {'shows on row':>12}  {'factor':>6}  {'new LR':>11}"
    if compare:
        header += f"  {'logged row':>10}  {'logged LR':>9}  {'row offset':>10}"
    lines = [header]
    lr = initial_lr
    for index in range(max(len(result.decisions), len(changes))):
        left = right = ""
        if index < len(result.decisions):
            step, factor = result.decisions[index]
            lr *= factor
            row = decision_log_row(step)
            left = f"{step:>10}  {row:>12}  {factor:>6g}  {lr:>11.4e}"
        else:
            left = " " * 45
        if index < len(changes):
            logged_row, _, logged_lr = changes[index]
            right = f"{logged_row:>10}  {logged_lr:>9.6f}"
            if index < len(result.decisions):
                offset = (decision_log_row(result.decisions[index][0]) - logged_row) // LOG_INTERVAL
                right += f"  {('exact' if offset == 0 else f'{offset:+d} row'):>10}"
        lines.append(f"  {index + 1:>2}  {left}  {right}".rstrip())
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Replays a loss log through the FastFace and Moving Haar detectors and prints their decisions."""
    parser = argparse.ArgumentParser(
        prog="python -m fastface_pl.scheduling.replay",
        description="Replay a real training-loss curve through both LR detectors and compare their "
                    "decisions with the LR changes in the log.")
    parser.add_argument("--log", default=None, help="CSV with step,loss,lr,epoch (default: the packaged "
                        "MS1MV3/ResNet100 log of the FastFace authors)")
    parser.add_argument("--total-steps", type=int, default=None,
                        help="T, total optimizer steps of the run (default: the log's last step)")
    parser.add_argument("--patience-fraction", type=float, default=PAPER_PATIENCE_FRACTION, help="τ for FastFace: P = int(τ·T)")
    parser.add_argument("--window", type=int, default=4000, help="m for Moving Haar")
    parser.add_argument("--theta", type=float, default=0.06, help="θ for Moving Haar")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also draw both replays into this PNG")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    if args.total_steps is not None and args.total_steps <= 0:
        parser.error(f"--total-steps must be a positive number of optimizer steps, got {args.total_steps}")
    if args.window < 2:
        parser.error(f"--window must be an integer >= 2, got {args.window}")
    if not math.isfinite(args.theta):
        parser.error(f"--theta must be a finite number, got {args.theta}")
    if not 0 < args.patience_fraction <= 1:
        parser.error(f"--patience-fraction must be in (0, 1], got {args.patience_fraction}")
    rows = load_loss_log(args.log)
    losses = expand_loss_log(rows)
    total = args.total_steps if args.total_steps is not None else rows[-1].step
    patience = int(args.patience_fraction * total)
    initial_lr = rows[0].lr
    detectors = [
        ("FastFace", FastFaceDetector(patience=patience), False,
         f"α=β={PAPER_ALPHA:g}, λ={PAPER_THRESHOLD:g}, τ={args.patience_fraction} of T={total} → P={patience}, δ=2, K=8"),
        ("Moving Haar", MovingHaarDetector(window=args.window, threshold=args.theta), True,
         f"m={args.window}, θ={args.theta}, P=2m={2 * args.window}, δ=2, R=3"),
    ]
    print(f"Replaying {len(losses)} optimizer steps ({len(rows)} log rows, "
          f"{args.log or 'packaged MS1MV3/ResNet100 FastFace log'}), initial LR {initial_lr:g}.")
    print("A decision at step s shows on log row ceil((s+1)/10)*10.")
    results = []
    for name, detector, compare, settings in detectors:
        result = replay(detector, losses, record=args.plot is not None)
        results.append(result)
        print(f"\n{name} ({settings}): {len(result.decisions)} decisions, final LR "
              f"{initial_lr * result.lr_scale:.4e}")
        if not compare:
            print("  (the log was produced by the Moving Haar rule; a FastFace decision changes the loss that "
                  "follows it, so only the first one is a check figure: step 94269 for the packaged log)")
        print("\n".join(_comparison_table(result, rows, initial_lr, compare)))
    if args.plot:
        from fastface_pl.plotting import plot_schedule

        plot_schedule(results, args.plot, initial_lr=initial_lr,
                      reference_lr=([r.step for r in rows], [r.lr for r in rows]))
        print(f"\nPlot written to {args.plot}")
    print(f"\nDone in {time.perf_counter() - began:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
