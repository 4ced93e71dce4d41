"""Training throughput of FaceRecognitionModule under ``Trainer.fit`` against a plain PyTorch loop, on CPU.

    python benchmarks/bench_module_throughput.py                       # r18_tiny at 64×64, batch 64
    python benchmarks/bench_module_throughput.py --backbone tiny --input-size 32 --steps 60 --repeats 5

Both sides do the same work each step: the same backbone, ArcFace (straight-through, s = 64, m = 0.5),
full classification layer, batch, SGD (lr 0.02, momentum 0.9, weight decay 5e-4, two parameter groups),
gradient-norm clipping at 5 on the backbone, and the same DataLoader over the same in-memory images. The
Trainer runs with ``logger=False`` and without progress bar, checkpointing or model summary (the module
still calls ``self.log("train/loss")`` every step). The first ``--warmup`` steps of every run are excluded;
runs alternate (Lightning, loop, Lightning, loop …) and the median images/s of each side is compared.
Target: ratio ≥ 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from fastface_pl.models.module import FaceRecognitionModule
from _record import add_json_argument, write_json


def _clocks() -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process): CPU time is robust to other processes' load."""
    return time.perf_counter(), time.process_time()


def _rates(images: int, start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    return images / (end[0] - start[0]), images / (end[1] - start[1])


class StepTimer(Callback):
    """Times the optimizer steps after the warm-up (end of batch ``warmup`` to end of the last batch)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = _clocks()
        if batch_idx + 1 == self.warmup:
            self.start = now
        self.end = now


def make_loader(args: argparse.Namespace) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    count = args.batch * (args.steps + args.warmup)
    images = torch.randn(count, 3, args.input_size, args.input_size, generator=generator)
    labels = torch.randint(0, args.classes, (count,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=args.batch, shuffle=False, drop_last=True)


def make_module(args: argparse.Namespace) -> FaceRecognitionModule:
    torch.manual_seed(0)
    return FaceRecognitionModule(num_classes=args.classes, backbone=args.backbone,
                                 backbone_kwargs={"input_size": args.input_size}, embedding_size=args.embedding_size,
                                 margin="arcface", clip_grad_norm=5.0)


def run_lightning(args: argparse.Namespace, loader: DataLoader) -> tuple[float, float]:
    module = make_module(args)
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(max_steps=args.steps + args.warmup, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)
    return _rates(args.steps * args.batch, timer.start, timer.end)


def run_plain(args: argparse.Namespace, loader: DataLoader) -> tuple[float, float]:
    """The same training step written by hand (what the module does, without Lightning)."""
    module = make_module(args)
    backbone, classifier = module.backbone, module.classifier
    backbone.train()
    classifier.train()
    optimizer = torch.optim.SGD(
        [{"params": [p for p in backbone.parameters() if p.requires_grad]},
         {"params": list(classifier.parameters())}],
        lr=0.02, momentum=0.9, weight_decay=5e-4)
    clipped = [p for p in backbone.parameters() if p.requires_grad]
    start = None
    for step, (images, labels) in enumerate(loader):
        loss = classifier(backbone(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clipped, 5.0)
        optimizer.step()
        if step + 1 == args.warmup:
            start = _clocks()
    return _rates(args.steps * args.batch, start, _clocks())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="r18_tiny")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side, alternating")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (1: least sensitive to other processes on a shared CPU)")
    add_json_argument(parser, "module_throughput")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loader = make_loader(args)

    runs: dict[str, list[tuple[float, float]]] = {"lightning": [], "plain": []}
    for _ in range(args.repeats):
        runs["lightning"].append(run_lightning(args, loader))
        runs["plain"].append(run_plain(args, loader))
    print(f"backbone {args.backbone} @ {args.input_size}x{args.input_size}, embedding {args.embedding_size}, "
          f"C={args.classes}, batch {args.batch}, {args.steps} timed steps x {args.repeats} runs per side "
          f"(alternating), {args.threads} thread(s), CPU")
    print(f"{'side':<22}{'clock':<6}{'median img/s':>14}   runs")
    medians = {}
    for clock, index in (("wall", 0), ("cpu", 1)):
        for side, label in (("lightning", "Trainer.fit (module)"), ("plain", "plain PyTorch loop")):
            rates = [run[index] for run in runs[side]]
            medians[side, clock] = statistics.median(rates)
            print(f"{label:<22}{clock:<6}{medians[side, clock]:>14.1f}   " + ", ".join(f"{r:.1f}" for r in rates))
    ratios = {}
    for clock in ("wall", "cpu"):
        ratios[clock] = medians["lightning", clock] / medians["plain", clock]
        print(f"ratio Lightning / plain ({clock} time): {ratios[clock]:.3f} (target >= 0.95)")
    write_json(args, {"median_images_per_s": {f"{side} ({clock})": rate for (side, clock), rate in medians.items()},
                      "ratio_lightning_to_plain": ratios}, "module_throughput")


if __name__ == "__main__":
    main()
