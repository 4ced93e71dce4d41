"""GPU check, one script: throughput, peak memory and host-device synchronisations of the training step.

    python benchmarks/gpu_check.py                      # on a CUDA device (a few minutes)
    python benchmarks/gpu_check.py --json gpu.json      # also write the figures
    python benchmarks/gpu_check.py --cpu-smoke          # tiny sizes on the CPU: checks that it runs (seconds)
    python benchmarks/gpu_check.py --parts multigpu --multigpu-classes 1000000 2059906   # with WebFace42M's

Four parts:

1. **Throughput**: r50 and r100 at batch 128, under ``16-mixed`` and ``bf16-mixed``, channels-last off/on,
   ``torch.compile`` off/on: images/s of :class:`FaceRecognitionModule` under ``Trainer.fit`` against a plain
   PyTorch loop doing the same step (autocast, GradScaler for fp16, backbone clipping at 5, SGD), both fed
   from the same pinned in-memory batches. The clock runs between two ``torch.cuda.synchronize()`` after
   ``--warmup`` untimed steps (compilation included in the warm-up).
2. **Peak memory** (``torch.cuda.max_memory_allocated``) of training steps of r50 and r100 with the full
   classification layer at WebFace12M's 617,970 identities, batch 128, 16-mixed.
3. **Synchronisations per step** of the callback stack that ``fastface_pl.train`` builds, the FastFace callback
   and the divergence guard together (both k = ``sync_every_n_steps`` = ``check_every_n_steps``), and without
   them: with ``torch.cuda.set_sync_debug_mode("warn")`` every synchronising call warns; the warnings raised
   during the timed steps are counted per step and attributed to the file that made the call. The goal: none
   per step from the two callbacks, whose one loss reader reads one block per k optimizer steps (the block
   reads are counted too, on any device). On the CPU (``--cpu-smoke``) there is no sync debug mode; the
   profiler's count of ``aten::_local_scalar_dense`` (``.item()``, ``float(tensor)``) stands in, which sees
   per-step scalar reads but not the block read (``.tolist()``).
4. **Several GPUs** (``multigpu``; only with 2 or more CUDA devices, else a recorded skip): one process per GPU
   with NCCL, r50 at batch 128 per GPU, 16-mixed, the replicated ``full`` layer (inside the DDP module: its
   dense C × D gradient is all-reduced every step) against ``sharded`` (each GPU holds C/N rows,
   ``docs/sharded.md``) at ``--multigpu-classes`` (default 1M; WebFace42M has 2,059,906): images/s over all
   GPUs and the peak memory of each GPU (``torch.cuda.max_memory_allocated``). The same plain step as part 1
   (autocast, GradScaler, backbone clipping at 5, the module's SGD). Each row also records the global batch's
   loss at the first step (``first_loss``: the same weights and batches, so the two layers agree to rounding)
   and at the last (``loss``: under mixed precision the two runs drift apart within a few steps, by rounding
   alone, ``docs/sharded.md``). ``--cpu-smoke`` runs it on 2 gloo CPU ranks at tiny sizes, in bf16-mixed and
   in fp32 (``32-true``, where the last losses agree too).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from fastface_pl.models.module import FaceRecognitionModule
from fastface_pl.safety import DivergenceGuard
from fastface_pl.scheduling.callback import FastFaceLRCallback
from fastface_pl.scheduling.loss_reader import StepLossReader

WEBFACE12M_IDENTITIES = 617_970
WEBFACE42M_IDENTITIES = 2_059_906


@dataclass
class Sizes:
    """What one part of the check runs on."""

    backbones: tuple[str, ...] = ("r50", "r100")
    input_size: int = 112
    embedding_size: int = 512
    batch: int = 128
    classes: int = 10_000  # throughput runs (the layer's size barely matters there)
    memory_classes: int = WEBFACE12M_IDENTITIES
    precisions: tuple[str, ...] = ("16-mixed", "bf16-mixed")
    compile_options: tuple[bool, ...] = (False, True)
    steps: int = 30
    warmup: int = 10
    sync_steps: int = 64
    sync_every: int = 16
    multigpu_backbone: str = "r50"
    multigpu_classes: tuple[int, ...] = (1_000_000,)
    multigpu_steps: int = 20
    multigpu_warmup: int = 5
    multigpu_precisions: tuple[str, ...] = ("16-mixed",)


CPU_SMOKE = Sizes(backbones=("tiny",), input_size=32, embedding_size=64, batch=8, classes=50, memory_classes=500,
                  precisions=("bf16-mixed",), compile_options=(False,), steps=3, warmup=2, sync_steps=8, sync_every=4,
                  multigpu_backbone="tiny", multigpu_classes=(500,), multigpu_steps=2, multigpu_warmup=1,
                  multigpu_precisions=("bf16-mixed", "32-true"))
CPU_SMOKE_RANKS = 2  # gloo CPU ranks of the multigpu part in --cpu-smoke
# (no torch.compile in the smoke: inductor builds C++ on the CPU for minutes)


# ------------------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------------------
def make_loader(sizes: Sizes, classes: int, batches: int, device: torch.device) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    count = sizes.batch * batches
    images = torch.randn(count, 3, sizes.input_size, sizes.input_size, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=sizes.batch, drop_last=True,
                      pin_memory=device.type == "cuda")


def make_module(sizes: Sizes, backbone: str, classes: int, channels_last: bool, compile: bool) -> FaceRecognitionModule:
    torch.manual_seed(0)
    return FaceRecognitionModule(num_classes=classes, backbone=backbone,
                                 backbone_kwargs={"input_size": sizes.input_size},
                                 embedding_size=sizes.embedding_size, margin="arcface", clip_grad_norm=5.0,
                                 channels_last=channels_last, compile=compile)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(Callback):
    """Wall time from the end of batch ``warmup`` to the end of the last batch, synchronised with the device."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start = self.end = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.end = time.perf_counter()


def make_trainer(sizes: Sizes, device: torch.device, precision: str, steps: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(accelerator=device.type, devices=1, precision=precision, max_steps=steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=10_000, callbacks=callbacks)


class HandStep:
    """The module's optimizer step by hand: autocast (none for ``32-true``), a GradScaler for fp16 on CUDA, the
    backbone clipped at 5, the module's optimizer. ``step(loss_of, images, labels)`` returns the loss."""

    def __init__(self, module: FaceRecognitionModule, device: torch.device, precision: str) -> None:
        groups = module.configure_optimizers()
        self.optimizer = groups if isinstance(groups, torch.optim.Optimizer) else groups["optimizer"]
        self.device_type = device.type
        self.dtype = torch.float16 if precision.startswith("16") else torch.bfloat16
        self.autocast = precision.endswith("-mixed")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16 and device.type == "cuda")
        self.clipped = [p for p in module.backbone.parameters() if p.requires_grad]

    def step(self, loss_of, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast):
            loss = loss_of(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.clipped, 5.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss


def plain_loop(module: FaceRecognitionModule, loader: DataLoader, device: torch.device, precision: str,
               steps: int, warmup: int) -> float:
    """The module's training step by hand; returns the wall seconds of the steps after ``warmup``."""
    module.to(device).train()
    hand = HandStep(module, device, precision)
    start = None
    for step, (images, labels) in enumerate(itertools.islice(itertools.cycle(loader), steps)):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        hand.step(lambda x, y: module.classifier(module(x), y), images, labels)
        if step + 1 == warmup:
            synchronize(device)
            start = time.perf_counter()
    synchronize(device)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------------
# 1. Throughput
# ------------------------------------------------------------------------------------------------------------
def throughput(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    total = sizes.steps + sizes.warmup
    loader = make_loader(sizes, sizes.classes, min(total, 20), device)
    for backbone, precision, channels_last, compile in itertools.product(
            sizes.backbones, sizes.precisions, (False, True), sizes.compile_options):
        row = {"backbone": backbone, "precision": precision, "channels_last": channels_last, "compile": compile,
               "batch": sizes.batch}
        try:
            clock = StepClock(sizes.warmup, device)
            module = make_module(sizes, backbone, sizes.classes, channels_last, compile)
            repeated = DataLoader(_Cycle(loader, total), batch_size=None)
            make_trainer(sizes, device, precision, total, [clock]).fit(module, train_dataloaders=repeated)
            row["trainer_images_s"] = sizes.steps * sizes.batch / (clock.end - clock.start)
            module = make_module(sizes, backbone, sizes.classes, channels_last, compile)
            seconds = plain_loop(module, loader, device, precision, total, sizes.warmup)
            row["plain_images_s"] = sizes.steps * sizes.batch / seconds
            row["ratio"] = row["trainer_images_s"] / row["plain_images_s"]
        except Exception as error:  # one failing combination (e.g. bf16 on an old GPU) must not hide the others
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        finally:
            _free(device)
        rows.append(row)
        print("  " + _row_text(row), flush=True)
    return rows


class _Cycle(torch.utils.data.IterableDataset):
    """``steps`` batches from ``loader``, cycling (one fit of exactly ``steps`` optimizer steps)."""

    def __init__(self, loader: DataLoader, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __iter__(self):
        return itertools.islice(itertools.cycle(self.loader), self.steps)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row_text(row: dict[str, Any]) -> str:
    head = (f"{row['backbone']:>5} {row['precision']:>10} channels_last={str(row['channels_last']):<5} "
            f"compile={str(row['compile']):<5}")
    if "error" in row:
        return f"{head}  failed: {row['error']}"
    return (f"{head}  Trainer.fit {row['trainer_images_s']:8.1f} img/s, plain loop {row['plain_images_s']:8.1f} img/s, "
            f"ratio {row['ratio']:.3f}")


# ------------------------------------------------------------------------------------------------------------
# 2. Peak memory with the full layer at WebFace12M's identities
# ------------------------------------------------------------------------------------------------------------
def peak_memory(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for backbone in sizes.backbones:
        row: dict[str, Any] = {"backbone": backbone, "classes": sizes.memory_classes, "batch": sizes.batch,
                               "precision": "16-mixed" if device.type == "cuda" else "bf16-mixed"}
        try:
            if device.type == "cuda":
                _free(device)
                torch.cuda.reset_peak_memory_stats(device)
            module = make_module(sizes, backbone, sizes.memory_classes, False, False)
            loader = make_loader(sizes, sizes.memory_classes, 3, device)
            make_trainer(sizes, device, row["precision"], 3, []).fit(module, train_dataloaders=loader)
            if device.type == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                row["device_total_mib"] = torch.cuda.get_device_properties(device).total_memory / 2**20
            else:
                row["peak_mib"] = None  # no allocator statistics on the CPU
            row["classifier_mib"] = module.classifier.weight.numel() * 4 / 2**20
        except torch.cuda.OutOfMemoryError as error:
            row["error"] = f"out of memory: {str(error).splitlines()[0][:200]}"
        finally:
            module = None
            _free(device)
        rows.append(row)
        peak = "n/a on the CPU" if row.get("peak_mib") is None else f"{row['peak_mib']:,.0f} MiB"
        print(f"  {backbone:>5} C={row['classes']:,} batch {row['batch']} {row['precision']}: "
              f"{row.get('error', 'peak ' + peak)} (layer weight {row.get('classifier_mib', math.nan):,.0f} MiB)",
              flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------------
# 3. Host-device synchronisations per training step
# ------------------------------------------------------------------------------------------------------------
class SyncCounter(Callback):
    """Counts synchronising calls made between the start of batch ``warmup`` and the end of training.

    CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` makes each one raise a warning, recorded here with the
    file that made the call. CPU: the profiler's ``aten::_local_scalar_dense`` events (scalar reads) stand in.
    """

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.by_file: collections.Counter = collections.Counter()
        self.steps = 0
        self._stack = contextlib.ExitStack()
        self._records: list = []
        self._profiler = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx != self.warmup:
            return
        synchronize(self.device)
        if self.device.type == "cuda":
            self._records = self._stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._profiler = self._stack.enter_context(
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            for record in self._records:
                if "synchroniz" in str(record.message).lower():
                    self.by_file[Path(record.filename).name] += 1
            self._stack.close()
        elif self._profiler is not None:
            self._stack.close()
            for event in self._profiler.events():
                if event.name == "aten::_local_scalar_dense":
                    self.by_file[_caller_file(event)] += 1

    @property
    def per_step(self) -> float:
        return sum(self.by_file.values()) / max(1, self.steps)


def _caller_file(event: Any) -> str:
    for frame in getattr(event, "stack", None) or []:
        name = frame.split("(")[0].strip()
        if name.endswith(".py") and "/torch/" not in name:
            return Path(name).name
    return "caller not recorded"


@contextlib.contextmanager
def counting_block_reads():
    """Counts the block reads of the step-loss reader (one stack, reduce and transfer each); yields the list of
    their sizes (micro-batch losses per read)."""
    sizes: list[int] = []
    original = StepLossReader._read

    def counted(trainer: pl.Trainer, tensors: list) -> list[float]:
        sizes.append(len(tensors))
        return original(trainer, tensors)

    StepLossReader._read = staticmethod(counted)
    try:
        yield sizes
    finally:
        StepLossReader._read = staticmethod(original)


def _stack(k: int) -> list[Callback]:
    """The FastFace callback and the divergence guard as ``fastface_pl.train`` builds them, at block size k."""
    return [FastFaceLRCallback("fastface", patience_fraction=0.05, sync_every_n_steps=k, verbose=False,
                               log_signals=False),
            DivergenceGuard(max_nonfinite_steps=20, check_every_n_steps=k)]


def sync_counts(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    backbone = sizes.backbones[0]
    precision = sizes.precisions[0]
    total = sizes.sync_steps + sizes.warmup
    loader = make_loader(sizes, sizes.classes, min(total, 20), device)
    for label, k in (("without callback", None), (f"FastFace callback + DivergenceGuard, k = {sizes.sync_every}",
                                                  sizes.sync_every), ("FastFace callback + DivergenceGuard, k = 1", 1)):
        counter = SyncCounter(sizes.warmup, device)
        module = make_module(sizes, backbone, sizes.classes, False, False)
        repeated = DataLoader(_Cycle(loader, total), batch_size=None)
        with counting_block_reads() as reads:
            make_trainer(sizes, device, precision, total, [counter] + (_stack(k) if k else [])).fit(
                module, train_dataloaders=repeated)
        _free(device)
        row = {"setting": label, "steps": counter.steps, "syncs_per_step": counter.per_step,
               "by_file": dict(counter.by_file), "block_reads": len(reads), "fit_steps": total,
               "method": "set_sync_debug_mode" if device.type == "cuda" else "profiler aten::_local_scalar_dense"}
        rows.append(row)
        print(f"  {label:<42} {row['syncs_per_step']:.3f} per step over {row['steps']} steps  {row['by_file']}; "
              f"{len(reads)} block reads in {total} optimizer steps", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------------
# 4. Several GPUs: replicated full layer vs sharded
# ------------------------------------------------------------------------------------------------------------
class _TrainStep(nn.Module):
    """The backbone and the layer in one module: under DDP the full layer's gradient is all-reduced too."""

    def __init__(self, module: FaceRecognitionModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.module.classifier(self.module(images), labels)


def _multigpu_job(rank: int, world: int, device: torch.device, settings: dict[str, Any], layer: str,
                  classes: int, precision: str) -> dict[str, Any]:
    """Warm-up and timed steps of one layer on this rank; its seconds, peak memory, first and last loss."""
    row: dict[str, Any] = {"layer": layer, "classes": classes, "precision": precision}
    module = step_loss = hand = None
    try:
        _free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        module = FaceRecognitionModule(num_classes=classes, backbone=settings["backbone"],
                                       backbone_kwargs={"input_size": settings["input_size"]},
                                       embedding_size=settings["embedding_size"], margin="arcface",
                                       classifier=layer, clip_grad_norm=5.0)
        if layer == "sharded":
            module.classifier.shard(rank, world)
        module.to(device).train()
        ids = [device.index] if device.type == "cuda" else None
        if layer == "sharded":  # the layer's rows stay out of DDP
            backbone = DistributedDataParallel(module.backbone, device_ids=ids)

            def step_loss(images, labels):
                return module.classifier(backbone(images), labels)
        else:
            step_loss = DistributedDataParallel(_TrainStep(module), device_ids=ids)
        hand = HandStep(module, device, precision)
        generator = torch.Generator().manual_seed(rank)
        size, batch = settings["input_size"], settings["batch"]
        batches = [(torch.randn(batch, 3, size, size, generator=generator).to(device),
                    torch.randint(0, classes, (batch,), generator=generator).to(device)) for _ in range(2)]
        start = first = None
        for step in range(settings["warmup"] + settings["steps"]):
            if step == settings["warmup"]:
                synchronize(device)
                dist.barrier()
                start = time.perf_counter()
            loss = hand.step(step_loss, *batches[step % len(batches)])
            if first is None:
                first = loss.detach().float().clone()
        synchronize(device)
        dist.barrier()
        row["seconds"] = time.perf_counter() - start
        losses = torch.stack([first, loss.detach().float()])
        if layer == "full":  # this rank's batch: the mean over the ranks is the global batch's, as sharded's
            dist.all_reduce(losses)
            losses /= world
        row["first_loss"], row["loss"] = losses.tolist()
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    except torch.cuda.OutOfMemoryError as error:
        row["error"] = f"out of memory: {str(error).splitlines()[0][:200]}"
    finally:
        module = step_loss = hand = None
        _free(device)
    return row


def _multigpu_rank(rank: int, world: int, backend: str, init_file: str, out_dir: str, settings: dict[str, Any],
                   jobs: list[tuple[str, int]]) -> None:
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = [_multigpu_job(rank, world, device, settings, *job) for job in jobs]
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))


def multigpu(sizes: Sizes, device: torch.device, classes: tuple[int, ...]) -> list[dict[str, Any]]:
    """``full`` vs ``sharded`` on every GPU (gloo CPU ranks in the smoke): one row per layer and C."""
    if device.type == "cuda":
        world, backend = torch.cuda.device_count(), "nccl"
        if world < 2:
            row = {"skipped": f"needs 2 or more CUDA devices, found {world}"}
            print(f"  skipped: {row['skipped']}", flush=True)
            return [row]
    else:
        world, backend = CPU_SMOKE_RANKS, "gloo"
    settings = {"backbone": sizes.multigpu_backbone, "input_size": sizes.input_size, "batch": sizes.batch,
                "embedding_size": sizes.embedding_size, "steps": sizes.multigpu_steps,
                "warmup": sizes.multigpu_warmup}
    jobs = [(layer, count, precision) for precision in sizes.multigpu_precisions for count in classes
            for layer in ("full", "sharded")]
    here = str(Path(__file__).resolve().parent)  # the ranks import this file by its module name
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            torch.multiprocessing.spawn(_multigpu_rank, args=(world, backend, str(Path(tmp, "init")), tmp, settings,
                                                              jobs), nprocs=world)
            ranks = [json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in range(world)]
    finally:
        if added:
            sys.path.remove(here)
    rows = []
    for index, (layer, count, precision) in enumerate(jobs):
        per_rank = [rank_rows[index] for rank_rows in ranks]
        row: dict[str, Any] = {"backbone": settings["backbone"], "layer": layer, "classes": count, "ranks": world,
                               "batch_per_rank": settings["batch"], "precision": precision, "backend": backend,
                               "steps": settings["steps"]}
        errors = [r["error"] for r in per_rank if "error" in r]
        if errors:
            row["error"] = errors[0]
        else:
            seconds = max(r["seconds"] for r in per_rank)
            row["images_s"] = world * settings["batch"] * settings["steps"] / seconds
            # the global batch's loss at the first and the last step
            row["first_loss"], row["loss"] = per_rank[0]["first_loss"], per_rank[0]["loss"]
            peaks = [r["peak_mib"] for r in per_rank]
            row["peak_mib_per_rank"] = None if None in peaks else peaks
            row["peak_mib"] = None if None in peaks else max(peaks)
        rows.append(row)
        peak = "n/a on the CPU" if row.get("peak_mib") is None else f"{row['peak_mib']:,.0f} MiB"
        print(f"  {row['backbone']:>5} C={count:,} {layer:>7} {precision:>10} x{world} {backend}: " +
              (f"failed: {row['error']}" if "error" in row else
               f"{row['images_s']:8.1f} img/s over all ranks, peak per rank {peak}, loss "
               f"{row['first_loss']:.4f} first, {row['loss']:.4f} last"), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, to check the script runs")
    parser.add_argument("--parts", nargs="+", default=["throughput", "memory", "syncs", "multigpu"],
                        choices=["throughput", "memory", "syncs", "multigpu"])
    parser.add_argument("--multigpu-classes", type=int, nargs="+", default=None, metavar="C",
                        help=f"identities of the multigpu part (default 1,000,000; WebFace42M: "
                             f"{WEBFACE42M_IDENTITIES})")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile half of the throughput grid")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # no per-fit banners between the figures
    try:
        return _run(args)
    finally:
        lightning_log.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    if args.cpu_smoke:
        device, sizes = torch.device("cpu"), CPU_SMOKE
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda", torch.cuda.current_device()), Sizes()
    else:
        print("No CUDA device: run with --cpu-smoke to check the script on the CPU.", file=sys.stderr)
        return 2
    if args.no_compile:
        sizes = replace(sizes, compile_options=(False,))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke sizes)"
    print(f"Device: {name}; torch {torch.__version__}, lightning {pl.__version__}", flush=True)
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "lightning": pl.__version__}
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if "throughput" in args.parts:
        print(f"1. Throughput, batch {sizes.batch}, {sizes.steps} timed steps after {sizes.warmup}:", flush=True)
        report["throughput"] = throughput(sizes, device)
    if "memory" in args.parts:
        print(f"2. Peak memory, full layer at {sizes.memory_classes:,} identities:", flush=True)
        report["memory"] = peak_memory(sizes, device)
    if "syncs" in args.parts:
        print(f"3. Host-device synchronisations per optimizer step ({sizes.backbones[0]}, {sizes.precisions[0]}):",
              flush=True)
        report["syncs"] = sync_counts(sizes, device)
    if "multigpu" in args.parts:
        classes = tuple(args.multigpu_classes or sizes.multigpu_classes)
        print(f"4. Several GPUs, {sizes.multigpu_backbone} batch {sizes.batch} per rank, replicated full vs sharded "
              f"at {', '.join(f'{c:,}' for c in classes)} identities:", flush=True)
        report["multigpu"] = multigpu(sizes, device, classes)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"Figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
