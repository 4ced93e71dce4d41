"""Rank processes of tests/test_sharded.py (spawned on CPU with gloo): what each rank computes, saved to a file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastface_pl.models.optim import RowSparseSGD
from fastface_pl.models.sharded import ShardedClassifier

EMBEDDING, FEATURES, PER_RANK, STEPS = 8, 6, 4, 4


def build(num_classes: int, sample_rate: float = 1.0, seed: int = 0) -> tuple[nn.Module, ShardedClassifier]:
    """The tiny backbone and the layer, built whole from ``seed`` (every rank and the reference alike)."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(FEATURES, EMBEDDING), nn.Tanh(), nn.Linear(EMBEDDING, EMBEDDING))
    return backbone, ShardedClassifier(EMBEDDING, num_classes, "arcface", sample_rate=sample_rate)


def global_batches(num_classes: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``STEPS`` global batches of ``world × PER_RANK`` samples; one label per batch is −1 (no target)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, world * PER_RANK, FEATURES, generator=generator)
    y = torch.randint(0, num_classes, (STEPS, world * PER_RANK), generator=generator)
    y[:, 1] = -1
    return x, y


def optimizer(backbone: nn.Module, layer: nn.Module) -> torch.optim.Optimizer:
    return RowSparseSGD([{"params": backbone.parameters()}, {"params": layer.parameters()}], lr=0.1, momentum=0.9,
                        weight_decay=5e-4)


def equality_rank(rank: int, world: int, init_file: str, out_dir: str, num_classes: int) -> None:
    """Trains the sharded layer with a DDP backbone for STEPS steps on this rank's part of each global batch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        backbone, layer = build(num_classes)
        layer.shard(rank, world)
        model = DistributedDataParallel(backbone)
        opt = optimizer(backbone, layer)
        x, y = global_batches(num_classes, world)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        losses, first_grads = [], None
        for step in range(STEPS):
            loss = layer(model(x[step, mine]), y[step, mine])
            opt.zero_grad()
            loss.backward()
            if first_grads is None:
                first_grads = [p.grad.clone() for p in backbone.parameters()]
            opt.step()
            losses.append(loss.detach())
        torch.save({"losses": torch.stack(losses), "grads": first_grads, "backbone": backbone.state_dict(),
                    "rows": layer.weight.detach().clone(), "range": (layer.start, layer.end)},
                   Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def sampling_rank(rank: int, world: int, init_file: str, out_dir: str, num_classes: int, rate: float) -> None:
    """Records each step's sampled rows and positives; then a layer restored from the state after step 2 draws
    step 3's sample again."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        backbone, layer = build(num_classes, rate)
        layer.shard(rank, world)
        model = DistributedDataParallel(backbone)
        opt = optimizer(backbone, layer)
        x, y = global_batches(num_classes, world)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        samples, saved = [], None
        for step in range(STEPS):
            if step == 2:
                saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in layer.state_dict().items()}
            loss = layer(model(x[step, mine]), y[step, mine])
            opt.zero_grad()
            loss.backward()
            opt.step()
            samples.append(layer.last_sampled.clone())
        _, again = build(num_classes, rate, seed=99)  # another seed: the restored state must decide
        again.shard(rank, world)
        again.load_state_dict(saved)
        again.train()
        again(model(x[2, mine]).detach(), y[2, mine])
        torch.save({"samples": samples, "resumed": again.last_sampled.clone(), "labels": y,
                    "range": (layer.start, layer.end), "num_sample": layer.num_sample},
                   Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(function, world: int, out_dir: Path, *args) -> list[dict]:
    """Runs ``function(rank, world, init_file, out_dir, *args)`` on ``world`` CPU ranks; their saved results."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_file = out_dir / "init"
    torch.multiprocessing.spawn(function, args=(world, str(init_file), str(out_dir), *args), nprocs=world)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]
