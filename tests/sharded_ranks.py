"""Rank processes of tests/test_sharded.py (spawned on CPU with gloo): what each rank computes, saved to a file."""

from __future__ import annotations

import os
from contextlib import contextmanager
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


@contextmanager
def gloo_rank(rank: int, world: int, init_file: str):
    """This process as rank ``rank`` of ``world`` CPU ranks (one thread), for the ``with`` block."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()  # no rank tears its connections down while another still talks to it
    finally:
        dist.destroy_process_group()


def sharded_on_rank(rank: int, world: int, num_classes: int, rate: float = 1.0):
    """(backbone, its DDP wrapper, the layer sharded for this rank, the optimizer, this rank's batch columns)."""
    backbone, layer = build(num_classes, rate)
    layer.shard(rank, world)
    return (backbone, DistributedDataParallel(backbone), layer, optimizer(backbone, layer),
            slice(rank * PER_RANK, (rank + 1) * PER_RANK))


def train(model: nn.Module, backbone: nn.Module, layer: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor, before_step=None, after_step=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """STEPS SGD steps of ``layer(model(x[step]), y[step])``: the losses and the backbone's first gradients."""
    losses, first_grads = [], None
    for step in range(STEPS):
        if before_step is not None:
            before_step(step)
        loss = layer(model(x[step]), y[step])
        opt.zero_grad()
        loss.backward()
        if first_grads is None:
            first_grads = [p.grad.clone() for p in backbone.parameters()]
        opt.step()
        losses.append(loss.detach())
        if after_step is not None:
            after_step(step)
    return torch.stack(losses), first_grads


def equality_rank(rank: int, world: int, init_file: str, out_dir: str, num_classes: int) -> None:
    """Trains the sharded layer with a DDP backbone for STEPS steps on this rank's part of each global batch."""
    with gloo_rank(rank, world, init_file):
        backbone, model, layer, opt, mine = sharded_on_rank(rank, world, num_classes)
        x, y = global_batches(num_classes, world)
        losses, first_grads = train(model, backbone, layer, opt, x[:, mine], y[:, mine])
        torch.save({"losses": losses, "grads": first_grads, "backbone": backbone.state_dict(),
                    "rows": layer.weight.detach().clone(), "range": (layer.start, layer.end)},
                   Path(out_dir, f"rank{rank}.pt"))


def autocast_step(model, layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One bf16-autocast forward and backward of ``layer(model(x), y)``: the loss and the gradients of the
    embeddings (bf16, as the backbone's last Linear gives them) and of the layer's rows."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = model(x)
        embeddings.retain_grad()
        loss = layer(embeddings, y)
    loss.backward()
    return {"loss": loss.detach(), "embeddings": embeddings.grad.clone(), "rows": layer.weight.grad.clone()}


def autocast_rank(rank: int, world: int, init_file: str, out_dir: str, num_classes: int) -> None:
    """The first step of :func:`equality_rank` under bf16 autocast, with the layer's range."""
    with gloo_rank(rank, world, init_file):
        _, model, layer, _, mine = sharded_on_rank(rank, world, num_classes)
        x, y = global_batches(num_classes, world)
        result = autocast_step(model, layer, x[0, mine], y[0, mine])
        torch.save({**result, "range": (layer.start, layer.end)}, Path(out_dir, f"rank{rank}.pt"))


def sampling_rank(rank: int, world: int, init_file: str, out_dir: str, num_classes: int, rate: float) -> None:
    """Records each step's sampled rows and positives; then a layer restored from the state after step 2 draws
    step 3's sample again."""
    with gloo_rank(rank, world, init_file):
        backbone, model, layer, opt, mine = sharded_on_rank(rank, world, num_classes, rate)
        x, y = global_batches(num_classes, world)
        samples, saved = [], {}

        def keep_state(step: int) -> None:
            if step == 2:
                saved.update({k: v.clone() if torch.is_tensor(v) else v for k, v in layer.state_dict().items()})

        train(model, backbone, layer, opt, x[:, mine], y[:, mine], before_step=keep_state,
              after_step=lambda step: samples.append(layer.last_sampled.clone()))
        _, again = build(num_classes, rate, seed=99)  # another seed: the restored state must decide
        again.shard(rank, world)
        again.load_state_dict(saved)
        again.train()
        again(model(x[2, mine]).detach(), y[2, mine])
        torch.save({"samples": samples, "resumed": again.last_sampled.clone(), "labels": y,
                    "range": (layer.start, layer.end), "num_sample": layer.num_sample},
                   Path(out_dir, f"rank{rank}.pt"))


def spawn(function, world: int, out_dir: Path, *args) -> list[dict]:
    """Runs ``function(rank, world, init_file, out_dir, *args)`` on ``world`` CPU ranks; their saved results."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_file = out_dir / "init"
    torch.multiprocessing.spawn(function, args=(world, str(init_file), str(out_dir), *args), nprocs=world)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]
