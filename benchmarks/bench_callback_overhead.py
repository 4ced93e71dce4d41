"""Overhead of FastFaceLRCallback in ``Trainer.fit``: the same steps of a tiny MLP with and without it.

The runs alternate (without, with k=1, with k=16, without, ...) and the table shows the median time per
optimizer step of each setting and its ratio to the run without the callback (target: at most 2% more).
Only the training loop is timed (on_train_start to on_train_end), not the Trainer's setup.

Run::

    python benchmarks/bench_callback_overhead.py                 # 400 steps, 7 repeats
    python benchmarks/bench_callback_overhead.py --steps 1000 --repeats 9 --hidden 512 --sync-every 1 4 16
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from fastface_pl.scheduling.callback import FastFaceLRCallback


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


class LoopTimer(Callback):
    """Wall time of the training loop only."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def time_fit(loader: DataLoader, args: argparse.Namespace, sync_every: int | None) -> float:
    """Milliseconds per optimizer step of one fit (``sync_every=None``: without the callback)."""
    torch.manual_seed(0)
    model = TinyMLP(args.features, args.hidden, args.classes)
    timer = LoopTimer()
    callbacks: list[Callback] = [timer]
    if sync_every is not None:
        # FastFace defaults (α = β = 1e-3, λ = 5e-5, τ = 0.05), as a user would add it.
        callbacks.insert(0, FastFaceLRCallback("fastface", sync_every_n_steps=sync_every, verbose=False))
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(model, loader)
    assert trainer.global_step == args.steps
    return 1e3 * timer.seconds / args.steps


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
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    generator = torch.Generator().manual_seed(0)
    n = args.steps * args.batch_size
    data = TensorDataset(torch.randn(n, args.features, generator=generator),
                         torch.randint(0, args.classes, (n,), generator=generator))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)

    settings: list[int | None] = [None, *args.sync_every]
    times: dict[int | None, list[float]] = {s: [] for s in settings}
    time_fit(loader, args, None)  # warm-up (imports, allocator)
    for _ in range(args.repeats):
        for setting in settings:
            times[setting].append(time_fit(loader, args, setting))

    base = statistics.median(times[None])
    print(f"Trainer.fit, tiny MLP ({args.features}-{args.hidden}-{args.hidden}-{args.classes}, batch "
          f"{args.batch_size}), {args.steps} steps, median of {args.repeats} alternating runs, "
          f"{args.threads} torch thread(s)")
    print(f"{'setting':<26}{'ms/step':>10}{'min':>10}{'max':>10}{'ratio':>9}{'overhead':>10}")
    for setting in settings:
        label = "without callback" if setting is None else f"FastFaceLRCallback k={setting}"
        median = statistics.median(times[setting])
        print(f"{label:<26}{median:>10.3f}{min(times[setting]):>10.3f}{max(times[setting]):>10.3f}"
              f"{median / base:>9.3f}{100 * (median / base - 1):>9.1f}%")


if __name__ == "__main__":
    main()
