"""Plots of the LR schedule: a detector replay, or the ``fastface/...`` metrics of a training run.

Both functions draw the same stacked panels (a column per detector or run):

1. training loss and its smoothed version (L^E for FastFace, the moving average a_t for Moving Haar);
2. the detector signal (D^E_t or S_t) with the threshold (λ or θ);
3. the stationary count with the patience P;
4. the LR, on a log scale (and the logged LR, where one is given).

Decisions are drawn as vertical lines in every panel. Figures are rendered with matplotlib's Agg
canvas (no display needed, and pyplot's global backend is left alone).

Example::

    python -m fastface_pl.scheduling.replay --plot replay.png
    python -c "from fastface_pl.plotting import plot_run_metrics; \
plot_run_metrics('outputs/lightning_logs/version_0/metrics.csv', 'run.png')"
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["plot_schedule", "plot_run_metrics", "read_run_metrics"]

Series = tuple[Sequence[float], Sequence[float]]

_PANELS = ("loss", "signal", "stationary_count", "lr")
_PANEL_LABELS = {"loss": "loss", "signal": "signal", "stationary_count": "stationary count", "lr": "LR"}
_LOSS_KEYS = ("fastface/loss", "train/loss", "train_loss", "train/loss_step", "train_loss_step", "loss")
_MAX_POINTS = 20_000


def _thin(x: Sequence[float], y: Sequence[float]) -> tuple[list[float], list[float]]:
    """Every k-th point so that at most ``_MAX_POINTS`` remain (plots of 200k steps stay quick)."""
    stride = max(1, math.ceil(len(x) / _MAX_POINTS))
    return list(x[::stride]), list(y[::stride])


def _columns_from_result(result: Any, initial_lr: float) -> dict[str, Any]:
    """Turns a :class:`~fastface_pl.scheduling.replay.ReplayResult` (recorded) into plot columns."""
    if not result.recorded:
        raise ValueError("the replay result holds no per-step arrays; replay with record=True to plot it")
    steps = range(1, result.steps + 1)
    return {
        "title": result.name,
        "loss": (steps, result.losses),
        "smoothed_loss": (steps, result.smoothed_loss),
        "signal": (steps, result.signal),
        "threshold": result.threshold,
        "stationary_count": (steps, result.stationary_count),
        "patience": result.patience,
        "lr": (steps, [initial_lr * s for s in result.lr_scale_trace]),
        "decisions": [step for step, _ in result.decisions],
    }


def _robust_limits(values: Sequence[float], extra: float | None) -> tuple[float, float] | None:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return None
    low, high = finite[int(0.01 * (len(finite) - 1))], finite[int(0.99 * (len(finite) - 1))]
    if extra is not None and math.isfinite(extra):
        low, high = min(low, extra), max(high, extra)
    pad = 0.1 * (high - low) or abs(high) * 0.1 or 1.0
    return low - pad, high + pad


def _has(series: Any) -> bool:
    return series is not None and len(series[0]) > 0


def _draw_panel(ax: Any, panel: str, columns: Mapping[str, Any]) -> None:
    if panel == "loss":
        ax.plot(*_thin(*columns["loss"]), lw=0.5, color="0.6", label="loss")
        if _has(columns.get("smoothed_loss")):
            ax.plot(*_thin(*columns["smoothed_loss"]), lw=1.2, color="C0", label="smoothed loss")
        ax.set_ylabel("loss")
    elif panel == "signal":
        x, y = columns["signal"]
        threshold = columns.get("threshold")
        ax.plot(*_thin(x, y), lw=0.8, color="C2", label="signal")
        if threshold is not None:
            ax.axhline(threshold, color="C3", ls="--", lw=1, label=f"threshold {threshold:g}")
        limits = _robust_limits(y, threshold)
        if limits:
            ax.set_ylim(*limits)
        ax.set_ylabel("signal")
    elif panel == "stationary_count":
        ax.plot(*_thin(*columns["stationary_count"]), lw=0.8, color="C4", label="stationary count")
        if columns.get("patience") is not None:
            ax.axhline(columns["patience"], color="C3", ls="--", lw=1, label=f"patience {columns['patience']:g}")
        ax.set_ylabel("count")
    elif panel == "lr":
        x, y = columns["lr"]
        ax.plot(x, y, lw=1.2, color="C1", label="LR", drawstyle="steps-post")
        reference = columns.get("reference_lr")
        if _has(reference):
            ax.plot(*reference, lw=1, color="k", ls=":", label="logged LR", drawstyle="steps-post")
        if any(v > 0 for v in y):
            ax.set_yscale("log")
        ax.set_ylabel("LR")
    for step in columns.get("decisions") or ():
        ax.axvline(step, color="C3", lw=0.6, alpha=0.5)
    ax.legend(loc="upper right", fontsize=7)
    ax.grid(True, alpha=0.3)


def _available(columns: Mapping[str, Any], panel: str) -> bool:
    return _has(columns.get(panel))


def _render(columns_list: Sequence[Mapping[str, Any]], path: str | Path, title: str | None) -> Path:
    from matplotlib.figure import Figure  # Agg canvas; pyplot's backend is not touched

    panels = [p for p in _PANELS if any(_available(c, p) for c in columns_list)]
    missing = [p for p in _PANELS if p not in panels]
    figure = Figure(figsize=(7 * len(columns_list), 2.4 * max(len(panels), 1) + 0.8), dpi=100)
    if not panels:
        ax = figure.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "nothing to plot: no loss, signal, count or LR column found", ha="center")
    else:
        axes = figure.subplots(len(panels), len(columns_list), squeeze=False, sharex="col")
        for col, columns in enumerate(columns_list):
            for row, panel in enumerate(panels):
                ax = axes[row][col]
                if _available(columns, panel):
                    _draw_panel(ax, panel, columns)
                else:
                    ax.axis("off")
                    ax.text(0.5, 0.5, f"no {_PANEL_LABELS[panel]} data", ha="center", va="center")
                if row == 0 and columns.get("title"):
                    ax.set_title(str(columns["title"]))
            axes[-1][col].set_xlabel("optimizer step")
    heading = title or ""
    if missing:
        heading += (" — " if heading else "") + "missing (panel skipped): " + ", ".join(
            _PANEL_LABELS[p] for p in missing)
    if heading:
        figure.suptitle(heading)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_schedule(results: Any, path: str | Path, *, initial_lr: float = 1.0,
                  reference_lr: Series | None = None, title: str | None = None) -> Path:
    """Draws one or more schedules into a PNG.

    Args:
        results: a :class:`~fastface_pl.scheduling.replay.ReplayResult` replayed with ``record=True``,
            a mapping of columns, or a sequence of those (one figure column each). A columns mapping
            has ``loss``, ``smoothed_loss``, ``signal``, ``stationary_count``, ``lr`` as
            ``(steps, values)`` pairs, ``threshold`` and ``patience`` as numbers, ``decisions`` as a
            list of steps and an optional ``title``; missing entries skip their panel.
        path: the PNG to write (parent folders are created).
        initial_lr: the LR before the first decision (replay results hold only the LR scale).
        reference_lr: ``(steps, lrs)`` of a logged LR, drawn dotted in the LR panel.
        title: figure title.

    Returns:
        The path written.
    """
    items = results if isinstance(results, (list, tuple)) else [results]
    columns_list = []
    for item in items:
        columns = dict(item) if isinstance(item, Mapping) else _columns_from_result(item, initial_lr)
        if reference_lr is not None and "reference_lr" not in columns:
            columns["reference_lr"] = reference_lr
        columns_list.append(columns)
    return _render(columns_list, path, title)


def read_run_metrics(metrics_csv_path: str | Path) -> dict[str, Any]:
    """Reads a Lightning ``CSVLogger`` ``metrics.csv`` into plot columns (see :func:`plot_schedule`).

    Uses the ``fastface/...`` keys that :class:`~fastface_pl.scheduling.callback.FastFaceLRCallback`
    logs; the loss falls back to ``train/loss``/``train_loss``, the LR to a ``lr-*`` column of
    Lightning's ``LearningRateMonitor``. Decisions are the steps where ``fastface/num_decisions`` grows.
    """
    path = Path(metrics_csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}; pass the metrics.csv that Lightning's CSVLogger "
                                "writes (e.g. <save_dir>/<name>/version_0/metrics.csv)")
    series: dict[str, tuple[list[float], list[float]]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        names = list(reader.fieldnames or [])
        for index, record in enumerate(reader):
            step_text = record.get("step") or ""
            try:
                step = float(step_text) if step_text else float(index)
            except ValueError:
                step = float(index)
            for name in names:
                text = record.get(name)
                if name == "step" or not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                xs, ys = series.setdefault(name, ([], []))
                xs.append(step)
                ys.append(value)

    def first(*keys: str) -> Series | None:
        for key in keys:
            if key in series:
                return series[key]
        return None

    columns: dict[str, Any] = {"title": path.parent.name or path.name}
    columns["loss"] = first(*_LOSS_KEYS)
    columns["smoothed_loss"] = first("fastface/smoothed_loss")
    columns["signal"] = first("fastface/signal")
    threshold = first("fastface/threshold")
    columns["threshold"] = threshold[1][-1] if threshold else None
    columns["stationary_count"] = first("fastface/stationary_count")
    lr_monitor = sorted(k for k in series if k.startswith("lr-") or k.startswith("lr/"))
    columns["lr"] = first("fastface/lr", *lr_monitor)
    decisions: list[float] = []
    counts = first("fastface/num_decisions")
    if counts:
        previous = 0.0
        for step, count in zip(*counts):
            if count > previous:
                decisions.append(step)
            previous = count
    columns["decisions"] = decisions
    return columns


def plot_run_metrics(metrics_csv_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Draws the schedule panels of a training run from its Lightning ``metrics.csv``.

    Panels whose columns are missing are skipped and named in the figure title.

    Args:
        metrics_csv_path: the CSVLogger ``metrics.csv``.
        out_png: the PNG to write.
        title: figure title (default: the run folder's name).

    Returns:
        The path written.
    """
    columns = read_run_metrics(metrics_csv_path)
    metrics_path = Path(metrics_csv_path)
    heading = title or f"{metrics_path.parent.name}/{metrics_path.name}".lstrip("/")
    columns["title"] = None  # the figure title names the run
    return _render([columns], out_png, heading)
