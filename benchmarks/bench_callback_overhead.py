"""Overhead of FastFaceLRCallback in ``Trainer.fit``: the same steps of a tiny MLP with and without it.

The runs alternate (without, with an empty Callback, with k=1, with k=16, without, ...) and the table
shows the median time per optimizer step of each setting and its ratio to the run without the callback
(target: at most 2% more). Only the training loop is timed (on_train_start to on_train_end), not the
Trainer's setup. The callback also times its own per-batch hook, a figure that a busy machine blurs less.

Run::

    python benchmarks/bench_callback_overhead.py                 # 400 steps, 7 repeats
    python benchmarks/bench_callback_overhead.py --steps 1000 --repeats 9 --hidden 512 --sync-every 1 4 16
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from fastface_pl.scheduling.callback import FastFaceLRCallback
from _record import add_json_argument, write_json


class TinyMLP(LightningModule):
    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, num_classes),
        )

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return torch.nn.functional.cross_entropy(self.net(inputs), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)


class TimedFastFaceLRCallback(FastFaceLRCallback):
    """The callback, also timing its own per-batch hook (robust to a busy machine, unlike the fit time)."""

    hook_seconds = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.hook_seconds += time.perf_counter() - start


class LoopTimer(Callback):
    """Wall time of the training loop only."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def time_fit(loader: DataLoader, args: argparse.Namespace, sync_every: int | None) -> tuple[float, float]:
    """Milliseconds per optimizer step of one fit and of the callback's hook.

    ``sync_every``: k of the callback; ``None``: without it; ``0``: an empty ``Callback`` instead (what
    Lightning's dispatch of one more callback's hooks costs by itself).
    """
    torch.manual_seed(0)
    model = TinyMLP(args.features, args.hidden, args.classes)
    timer = LoopTimer()
    callbacks: list[Callback] = [timer]
    scheduler = None
    if sync_every == 0:
        callbacks.insert(0, Callback())
    elif sync_every is not None:
        # FastFace defaults (α = β = 1e-3, λ = 5e-5, τ = 0.05), as a user would add it.
        scheduler = TimedFastFaceLRCallback("fastface", sync_every_n_steps=sync_every, verbose=False)
        callbacks.insert(0, scheduler)
    trainer = Trainer(
        accelerator=args.accelerator, devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(model, loader)
    assert trainer.global_step == args.steps
    hook_ms = 0.0 if scheduler is None else 1e3 * scheduler.hook_seconds / args.steps
    return 1e3 * timer.seconds / args.steps, hook_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per fit")
    parser.add_argument("--repeats", type=int, default=7, help="fits per setting (alternating); medians reported")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--sync-every", type=int, nargs="+", default=[1, 16], help="values of k to time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on shared CPUs)")
    parser.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto (on a GPU, k=1 syncs every step)")
    add_json_argument(parser, "callback_overhead")  # callback_overhead_hidden<N> with --hidden N
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")  # lightning vs newer torch
    for name in ("lightning.pytorch", "lightning.fabric"):  # the Trainer's per-fit chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    generator = torch.Generator().manual_seed(0)
    n = args.steps * args.batch_size
    data = TensorDataset(torch.randn(n, args.features, generator=generator),
                         torch.randint(0, args.classes, (n,), generator=generator))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)

    settings: list[int | None] = [None, 0, *args.sync_every]
    times: dict[int | None, list[float]] = {s: [] for s in settings}
    hook_times: dict[int | None, list[float]] = {s: [] for s in settings}
    time_fit(loader, args, None)  # warm-up (imports, allocator)
    for _ in range(args.repeats):
        for setting in settings:
            step_ms, hook_ms = time_fit(loader, args, setting)
            times[setting].append(step_ms)
            hook_times[setting].append(hook_ms)

    base = statistics.median(times[None])
    print(f"Trainer.fit, tiny MLP ({args.features}-{args.hidden}-{args.hidden}-{args.classes}, batch "
          f"{args.batch_size}), {args.steps} steps, median of {args.repeats} alternating runs, "
          f"{args.threads} torch thread(s), accelerator {args.accelerator}")
    print(f"{'setting':<26}{'ms/step':>9}{'min':>8}{'max':>8}{'ratio':>8}{'overhead':>10}"
          f"{'hook us/step':>14}{'hook share':>12}")
    rows = {}
    for setting in settings:
        label = {None: "without callback", 0: "empty Callback()"}.get(setting, f"FastFaceLRCallback k={setting}")
        median = statistics.median(times[setting])
        # Ratio to the run without the callback of the same round (paired: robust to a drifting machine load).
        ratio = statistics.median(t / t0 for t, t0 in zip(times[setting], times[None]))
        hook_us = 1e3 * statistics.median(hook_times[setting])
        print(f"{label:<26}{median:>9.3f}{min(times[setting]):>8.3f}{max(times[setting]):>8.3f}"
              f"{ratio:>8.3f}{100 * (ratio - 1):>9.1f}%{hook_us:>14.1f}{hook_us / (10 * base):>11.2f}%")
        rows[label] = {"ms_per_step": median, "ratio": ratio, "overhead_percent": 100 * (ratio - 1),
                       "hook_us_per_step": hook_us, "hook_share_percent": hook_us / (10 * base)}
    print("ratio/overhead: median over rounds of the fit time per step against the run without the callback in the "
          "same round\n(includes Lightning's dispatch of one more callback's hooks, see the empty Callback); hook: time "
          "inside the callback's on_train_batch_end per step, as a share of the step time without it.")
    write_json(args, rows, "callback_overhead" + ("" if args.hidden == 256 else f"_hidden{args.hidden}"))


if __name__ == "__main__":
    main()
