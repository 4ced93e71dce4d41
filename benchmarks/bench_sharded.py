"""Per-rank memory and bytes sent per step of the classification layer: replicated ``full`` under DDP vs ``sharded``.

    python benchmarks/bench_sharded.py            # the README table: computed for C = 100k, 1M, 2M, N = 2, 4, 8,
                                                  # measured with gloo on 2 CPU ranks (a few minutes)
    python benchmarks/bench_sharded.py --quick    # tiny sizes (seconds), for the tests

**Computed from the shapes** (fp32, D = embedding size, B = batch per rank, N ranks, C identities, c = ceil(C/N)):

- layer memory per rank = weight + gradient + momentum + logits buffer:
  replicated ``3·C·D·4 + B·C·4``; sharded ``3·c·D·4 + (N·B)·c·4``;
- bytes sent per rank per step by the layer's communication (ring algorithms):
  replicated, DDP's all-reduce of the dense gradient ``2·(N−1)/N·C·D·4``;
  sharded, all-gather of the embeddings ``(N−1)·B·D·4`` and labels ``(N−1)·B·8``, all-reduce of the
  ``[N·B]`` row maxima ``2·(N−1)/N·N·B·4`` and of the ``[2, N·B]`` sums ``2·(N−1)/N·2·N·B·4``,
  reduce-scatter of the ``[N·B, D]`` embedding gradient ``(N−1)·B·D·4``.

**Measured** on N = 2 gloo CPU ranks (one spawn; a tiny backbone ``Linear(F, D)``; RowSparseSGD with momentum
0.9): (a) DDP over a module holding the backbone and a ``FullClassifier``, (b) DDP over the backbone and a
``ShardedClassifier`` sharded over the ranks. Per rank: bytes of the layer's tensors after the steps (weight,
``.grad``, momentum buffer), peak RSS increase over the variant (``VmHWM`` after resetting it), seconds per
step, and bytes sent per step two ways: the bytes this rank's process wrote (``wchar`` of ``/proc/self/io``:
gloo's TCP writes, per rank) and the loopback interface's transmitted bytes (``lo`` in ``/proc/net/dev``,
divided by N; it counts every process's local traffic, so on a shared machine it can be far above the
per-rank figure: ``wchar`` is the one to quote). The expected figure for the comparison is
the layer's formula plus DDP's all-reduce of the backbone's gradient. A calibration records what one gloo
collective sends at the layer's shapes against the ring figure (gloo's reduce-scatter sends twice as much).
A layer is measured at a C only when its estimated peak per rank (weight, gradient, momentum, DDP's bucket copy
of the gradient, SGD's weight-decayed copy of it, logits; 5·C·D·4 + B·C·4 for the replicated one, 11 % below
of the peak RSS measured at C = 100k) fits ``--rank-budget-gb`` and N such ranks fit in 60 % of the available
memory: at C = 1M the replicated layer needs about 10.8 GB per rank and is not measured here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _record import add_json_argument, write_json
from bench_classifier_memory import _reset_peak  # noqa: E402  (same folder)

MIB = 2**20
FP32, INT64 = 4, 8
IN_FEATURES = 64


# ------------------------------------------------------------------------------------------------------------
# Computed from the shapes
# ------------------------------------------------------------------------------------------------------------
def ring_all_reduce(nbytes: float, world: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``nbytes``."""
    return 2 * (world - 1) / world * nbytes


def computed(classes: int, world: int, batch: int, dim: int) -> dict[str, Any]:
    """Per-rank layer bytes and bytes sent per step, replicated and sharded (the formulas of the docstring)."""
    local = math.ceil(classes / world)
    rep_state = 3 * classes * dim * FP32
    rep_logits = batch * classes * FP32
    rep_sent = ring_all_reduce(classes * dim * FP32, world)
    sh_state = 3 * local * dim * FP32
    sh_logits = world * batch * local * FP32
    sh_parts = {"all_gather_embeddings": (world - 1) * batch * dim * FP32,
                "all_gather_labels": (world - 1) * batch * INT64,
                "all_reduce_max": ring_all_reduce(world * batch * FP32, world),
                "all_reduce_sums": ring_all_reduce(2 * world * batch * FP32, world),
                "reduce_scatter_gradient": (world - 1) * batch * dim * FP32}
    sh_sent = sum(sh_parts.values())
    return {"classes": classes, "ranks": world, "batch": batch, "dim": dim,
            "replicated": {"state_bytes": rep_state, "logits_bytes": rep_logits, "layer_bytes": rep_state + rep_logits,
                           "sent_bytes": rep_sent},
            "sharded": {"state_bytes": sh_state, "logits_bytes": sh_logits, "layer_bytes": sh_state + sh_logits,
                        "sent_bytes": sh_sent, "sent_parts": sh_parts},
            "layer_ratio": (sh_state + sh_logits) / (rep_state + rep_logits), "state_ratio": sh_state / rep_state,
            "sent_ratio": sh_sent / rep_sent}


def estimated_peak(variant: str, classes: int, world: int, batch: int, dim: int) -> int:
    """Rough per-rank peak of a measured variant (bytes): what decides whether it runs here."""
    local = math.ceil(classes / world)
    if variant == "replicated":  # weight, gradient, momentum, DDP's bucket, SGD's weight-decayed gradient, logits
        return 5 * classes * dim * FP32 + batch * classes * FP32
    # built whole then sliced; later weight, gradient, momentum, SGD's weight-decayed gradient, logits
    return max((classes + local) * dim * FP32, 4 * local * dim * FP32 + world * batch * local * FP32)


def _proc_number(path: str, key: str, scale: int = 1) -> int | None:
    """The number after ``key:`` in a ``/proc`` file, times ``scale``; None where the file or the key is missing."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * scale
    except OSError:
        pass
    return None


def available_bytes() -> int | None:
    return _proc_number("/proc/meminfo", "MemAvailable", 1024)


# ------------------------------------------------------------------------------------------------------------
# Measured on gloo CPU ranks
# ------------------------------------------------------------------------------------------------------------
def _lo_tx() -> int | None:
    """Bytes transmitted so far on the loopback interface; None where /proc/net/dev is unavailable."""
    try:
        with open("/proc/net/dev") as dev:
            for line in dev:
                name, _, counters = line.partition(":")
                if name.strip() == "lo":
                    return int(counters.split()[8])
    except OSError:
        pass
    return None


def _wchar() -> int | None:
    """Bytes this process has written (files and sockets); None where /proc/self/io is unavailable."""
    return _proc_number("/proc/self/io", "wchar")


def _status_bytes(field: str) -> int | None:
    return _proc_number("/proc/self/status", field, 1024)  # reported in kB


def _delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def _calibrate(world: int, batch: int, dim: int) -> dict[str, Any]:
    """Bytes one rank writes in each gloo collective at the sharded layer's shapes, against the ring figure."""
    import torch
    import torch.distributed as dist

    from fastface_pl.models import sharded

    rows = torch.randn(batch, dim)
    gathered = torch.empty(world * batch, dim)
    cases = {"all_gather [B, D]": (lambda: sharded._all_gather(gathered, rows), (world - 1) * batch * dim * FP32),
             "all_reduce [N·B, D]": (lambda: dist.all_reduce(gathered), ring_all_reduce(world * batch * dim * FP32,
                                                                                        world)),
             "reduce_scatter [N·B, D]": (lambda: sharded._reduce_scatter(rows, gathered),
                                         (world - 1) * batch * dim * FP32)}
    out = {}
    for name, (call, ideal) in cases.items():
        dist.barrier()
        before = _wchar()
        call()
        dist.barrier()
        sent = _delta(_wchar(), before)
        out[name] = {"sent_bytes": sent, "ring_bytes": ideal, "ratio": None if sent is None else sent / ideal}
    return out


def _measure(variant: str, rank: int, world: int, classes: int, batch: int, dim: int, steps: int,
             warmup: int) -> dict[str, Any]:
    import gc

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from fastface_pl.models.classifiers import FullClassifier
    from fastface_pl.models.optim import RowSparseSGD
    from fastface_pl.models.sharded import ShardedClassifier

    gc.collect()
    dist.barrier()
    peak_reset = _reset_peak()
    rss_before = _status_bytes("VmRSS")
    torch.manual_seed(0)
    backbone = nn.Linear(IN_FEATURES, dim)
    if variant == "replicated":
        class Whole(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.backbone, self.classifier = backbone, FullClassifier(dim, classes)

            def forward(self, x, y):
                return self.classifier(self.backbone(x), y)

        whole = Whole()
        layer = whole.classifier
        model = DistributedDataParallel(whole)
        step_loss = model
    else:
        layer = ShardedClassifier(dim, classes)
        layer.shard(rank, world)
        model = DistributedDataParallel(backbone)

        def step_loss(x, y):
            return layer(model(x), y)  # noqa: F821 (defined just above; pyflakes misreads the branch)

    optimizer = RowSparseSGD([{"params": backbone.parameters()}, {"params": layer.parameters()}], lr=0.1,
                             momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1000 + rank)
    data = [(torch.randn(batch, IN_FEATURES, generator=generator), torch.randint(0, classes, (batch,),
                                                                                 generator=generator))
            for _ in range(warmup + steps)]
    losses = []
    lo_before = wchar_before = start = None
    for index, (x, y) in enumerate(data):
        if index == warmup:
            dist.barrier()
            lo_before, wchar_before, start = _lo_tx(), _wchar(), time.perf_counter()
        loss = step_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    dist.barrier()
    lo_sent, wchar_sent = _delta(_lo_tx(), lo_before), _delta(_wchar(), wchar_before)
    momentum = optimizer.state[layer.weight].get("momentum_buffer")
    tensors = {"weight": layer.weight, "grad": layer.weight.grad, "momentum": momentum}
    layer_bytes = {name: (0 if t is None else t.numel() * t.element_size()) for name, t in tensors.items()}
    peak = _status_bytes("VmHWM")
    result = {"variant": variant, "rank": rank, "classes": classes, "batch": batch, "dim": dim, "steps": steps,
              "warmup": warmup, "rows": layer.weight.shape[0], "layer_tensor_bytes": layer_bytes,
              "layer_state_bytes": sum(layer_bytes.values()),
              "peak_rss_increase_bytes": (peak - rss_before) if peak_reset and peak and rss_before else None,
              "seconds_per_step": seconds / steps, "losses": losses,
              "wchar_sent_per_step": None if wchar_sent is None else wchar_sent / steps,
              "lo_sent_per_rank_per_step": None if lo_sent is None else lo_sent / steps / world}
    del model, optimizer, layer, step_loss, tensors, momentum
    gc.collect()
    return result


def _rank(rank: int, world: int, init_file: str, out_dir: str, jobs: list, batch: int, dim: int, steps: int,
          warmup: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {"calibration": _calibrate(world, batch, dim), "runs": []}
        for variant, classes in jobs:
            results["runs"].append(_measure(variant, rank, world, classes, batch, dim, steps, warmup))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def measure(jobs: list[tuple[str, int]], world: int, batch: int, dim: int, steps: int,
            warmup: int) -> list[dict[str, Any]]:
    """Runs the (variant, classes) jobs on ``world`` gloo CPU ranks; every rank's results."""
    import torch.multiprocessing

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors go back to the OS: RSS follows them
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_rank, args=(world, str(Path(tmp, "init")), tmp, jobs, batch, dim, steps, warmup),
                                    nprocs=world)
        return [json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in range(world)]


def summarize(ranks: list[dict[str, Any]], world: int, in_features: int = IN_FEATURES) -> dict[str, Any]:
    """Per (variant, C): the ranks' figures (max over ranks) and the comparison with the formula."""
    rows = []
    for index, first in enumerate(ranks[0]["runs"]):
        runs = [rank["runs"][index] for rank in ranks]
        variant, classes, batch, dim = first["variant"], first["classes"], first["batch"], first["dim"]
        formula = computed(classes, world, batch, dim)[variant]
        backbone = ring_all_reduce((in_features * dim + dim) * FP32, world)  # DDP's all-reduce of the backbone
        expected = formula["sent_bytes"] + backbone
        # the same with gloo's reduce-scatter, which sends more than the ring figure (the calibration's ratio)
        scatter = ranks[0]["calibration"]["reduce_scatter [N·B, D]"]["ratio"]
        expected_gloo = expected + ((scatter - 1) * formula["sent_parts"]["reduce_scatter_gradient"]
                                    if variant == "sharded" and scatter is not None else 0.0)
        wchar = [run["wchar_sent_per_step"] for run in runs]
        wchar = None if None in wchar else max(wchar)
        lo = first["lo_sent_per_rank_per_step"]  # read on every rank over the same window: take rank 0's
        peaks = [run["peak_rss_increase_bytes"] for run in runs]
        rows.append({"variant": variant, "classes": classes, "ranks": world, "batch": batch, "dim": dim,
                     "steps": first["steps"], "warmup": first["warmup"],
                     "layer_state_bytes": max(run["layer_state_bytes"] for run in runs),
                     "computed_state_bytes": formula["state_bytes"],
                     "peak_rss_increase_bytes": None if None in peaks else max(peaks),
                     "seconds_per_step": max(run["seconds_per_step"] for run in runs),
                     "sent_bytes_per_step_wchar": wchar, "sent_bytes_per_step_lo": lo,
                     "expected_sent_bytes": expected, "expected_backbone_bytes": backbone,
                     "measured_over_expected_wchar": None if wchar is None else wchar / expected,
                     "measured_over_expected_lo": None if lo is None else lo / expected,
                     "expected_gloo_sent_bytes": expected_gloo,
                     "measured_over_expected_gloo_wchar": None if wchar is None else wchar / expected_gloo,
                     "losses_rank0": first["losses"]})
    return {"calibration": ranks[0]["calibration"], "runs": rows}


# ------------------------------------------------------------------------------------------------------------
def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:,.1f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def computed_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| C | N | replicated layer MiB/rank | sharded layer MiB/rank | replicated sent MiB/step | "
             "sharded sent MiB/step | memory ratio | sent ratio |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        rep, sh = row["replicated"], row["sharded"]
        lines.append(f"| {row['classes']:,} | {row['ranks']} | {_mib(rep['layer_bytes'])} | {_mib(sh['layer_bytes'])} "
                     f"| {_mib(rep['sent_bytes'])} | {sh['sent_bytes'] / MIB:.3f} | {row['layer_ratio']:.3f} | "
                     f"{row['sent_ratio']:.2e} |")
    return "\n".join(lines)


def _mib3(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.3f}"


def measured_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| layer | C | N | B | layer tensors MiB/rank (computed) | peak RSS increase MiB | s/step | "
             "sent MiB/step/rank (wchar) | (lo) | expected MiB | measured/expected | with gloo's reduce-scatter |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        lines.append(f"| {run['variant']} | {run['classes']:,} | {run['ranks']} | {run['batch']} | "
                     f"{_mib(run['layer_state_bytes'])} ({_mib(run['computed_state_bytes'])}) | "
                     f"{_mib(run['peak_rss_increase_bytes'])} | {run['seconds_per_step']:.2f} | "
                     f"{_mib3(run['sent_bytes_per_step_wchar'])} | {_mib3(run['sent_bytes_per_step_lo'])} | "
                     f"{_mib3(run['expected_sent_bytes'])} | {_ratio(run['measured_over_expected_wchar'])} | "
                     f"{_ratio(run['measured_over_expected_gloo_wchar'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000],
                        help="C of the computed table")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], help="N of the computed table")
    parser.add_argument("--batch", type=int, default=128, help="batch per rank B")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D")
    parser.add_argument("--measure-classes", type=int, nargs="*", default=[100_000, 1_000_000],
                        help="C measured on the gloo ranks (the replicated layer only where it fits)")
    parser.add_argument("--measure-ranks", type=int, default=2)
    parser.add_argument("--measure-batch", type=int, default=None, help="B of the measured runs (default --batch)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measured run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank-budget-gb", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks that it runs")
    add_json_argument(parser, "sharded")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.ranks, args.batch, args.dim = [1_000, 20_000], [2, 4], 8, 32
        args.measure_classes, args.steps, args.warmup = [4_000], 2, 1
    batch = args.measure_batch or args.batch

    table = [computed(classes, world, args.batch, args.dim) for classes in args.classes for world in args.ranks]
    print(f"Computed per rank, D = {args.dim}, B = {args.batch} per rank, fp32 (layer = weight + gradient + "
          f"momentum + logits; sent = the layer's collectives, ring algorithms):")
    print(computed_table(table), flush=True)

    jobs, decisions = [], []
    available = available_bytes()
    for classes in args.measure_classes:
        for variant in ("replicated", "sharded"):
            peak = estimated_peak(variant, classes, args.measure_ranks, batch, args.dim)
            reasons = []
            if peak > args.rank_budget_gb * 1e9:
                reasons.append(f"estimated peak {peak / 1e9:.1f} GB per rank > the {args.rank_budget_gb:g} GB budget")
            if available is not None and args.measure_ranks * peak > 0.6 * available:
                reasons.append(f"{args.measure_ranks} ranks × {peak / 1e9:.1f} GB > 60 % of the "
                               f"{available / 1e9:.1f} GB available")
            fits = not reasons
            decisions.append({"variant": variant, "classes": classes, "estimated_peak_bytes_per_rank": peak,
                              "available_bytes": available, "measured": fits,
                              "reason": "; ".join(reasons) or None})
            if fits:
                jobs.append((variant, classes))
    figures: dict[str, Any] = {"computed": table, "measure_decisions": decisions}
    if jobs:
        print(f"\nMeasured on {args.measure_ranks} gloo CPU ranks, B = {batch} per rank, {args.steps} timed steps "
              f"after {args.warmup}:", flush=True)
        measured = summarize(measure(jobs, args.measure_ranks, batch, args.dim, args.steps, args.warmup),
                             args.measure_ranks)
        print(measured_table(measured["runs"]))
        for decision in decisions:
            if not decision["measured"]:
                print(f"not measured: {decision['variant']} at C = {decision['classes']:,}: {decision['reason']}")
        print("gloo collectives at the sharded layer's shapes, bytes sent per rank / ring figure: " + ", ".join(
            f"{name} {value['ratio']:.2f}" for name, value in measured["calibration"].items()
            if value["ratio"] is not None))
        figures["measured"] = measured
    write_json(args, figures, "sharded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
