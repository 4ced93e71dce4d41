"""F2C's Dynamic Class Pool vs the full and sampled classification layers, side by side in one run.

    python benchmarks/bench_f2c.py                               # memory + step time at C = 100k, 1M, 2M
    python benchmarks/bench_f2c.py --classes 100000 --max-gib 4
    python benchmarks/bench_f2c.py --accuracy --epochs 4         # + the demo (synthetic pairs): full vs dcp
    python benchmarks/bench_f2c.py --classes --accuracy          # the demo comparison only

**Memory and time** (D = 512, batch 128, fp32, CPU). Each (layer, C) runs in its own subprocess (Linux): the
figure is the peak resident memory while the layer is built (with the SGD momentum it trains with) and runs
``--steps`` training steps, minus the resident memory before: everything the layer costs in training.

- ``full``: :class:`~fastface_pl.models.classifiers.FullClassifier` + SGD (weight, gradient, momentum: 3·C·D);
- ``sampled``: :class:`~fastface_pl.models.classifiers.SampledClassifier` (``--sample-rate``) + RowSparseSGD;
- ``dcp``: :class:`~fastface_pl.models.dcp.DynamicClassPool` with 1 % of C entries, filled, running F2C's two
  passes per step (write the gallery view, score the probe view, roll back; then the committed pass) on a
  batch of 32 identity pairs + 64 instances. It has no parameters; its gallery network (a copy of the
  backbone) is a fixed cost independent of C, listed once (ResNet100: 65 M parameters, 250 MiB fp32).

Step time is the median CPU time (one thread, ``time.process_time``: robust to other load on the machine)
of ``--steps`` steps after one warm-up. A (layer, C) whose persistent tensors alone
exceed ``--max-gib`` is skipped and listed as such (the full layer at 2M × 512 needs 12 GiB before a step).

**Accuracy** (``--accuracy``): trains the CPU demo (``python -m fastface_pl.train``, synthetic identities) with
``model.classifier=full`` and ``=dcp`` for the same epochs (both at once, one process each) and prints both
verification accuracies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from _record import add_json_argument, write_json
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_classifier_memory import _reset_peak, _status_bytes  # noqa: E402  (same folder)

LAYERS = ["full", "sampled", "dcp"]
CLASSES = [100_000, 1_000_000, 2_000_000]


def persistent_bytes(layer: str, classes: int, dim: int, sample_rate: float, pool_fraction: float) -> int:
    """Bytes of the tensors the layer keeps between steps (weight, gradient, momentum; pool and LRU)."""
    if layer == "full":
        return 3 * classes * dim * 4
    if layer == "sampled":
        return 2 * classes * dim * 4 + int(sample_rate * classes) * dim * 4
    pool = math.ceil(pool_fraction * classes)
    return 2 * pool * dim * 4 + classes * 8 + 4 * pool * 8


def _run(layer: str, classes: int, batch: int, dim: int, sample_rate: float, pool_fraction: float,
         steps: int) -> dict:
    import torch

    from fastface_pl.models.classifiers import FullClassifier, SampledClassifier
    from fastface_pl.models.dcp import DynamicClassPool, default_pool_size
    from fastface_pl.models.margins import CosFace
    from fastface_pl.models.optim import RowSparseSGD

    torch.manual_seed(0)
    torch.set_num_threads(1)  # CPU time of one thread: robust on a shared machine
    embeddings = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, classes, (batch,))
    pairs = batch // 4  # the dual loader's default: half the batch in identity pairs
    if not _reset_peak():
        assert _status_bytes("VmHWM") - _status_bytes("VmRSS") < 2**20, "cannot reset the peak RSS counter"
    baseline = _status_bytes("VmRSS")
    margin = CosFace(s=64.0, m=0.4)
    if layer in ("full", "sampled"):
        if layer == "full":
            module = FullClassifier(dim, classes, margin)
            optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        else:
            module = SampledClassifier(dim, classes, margin, sample_rate=sample_rate)
            optimizer = RowSparseSGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            loss = module(embeddings, labels)
            loss.backward()
            optimizer.step()
            return loss.item()
    else:
        pool = default_pool_size(classes, pool_fraction, minimum=batch // 2)
        module = DynamicClassPool(dim, classes, pool, margin)
        for start in range(0, pool, batch // 2):  # a full pool, as in steady-state training
            ids = torch.arange(start, min(start + batch // 2, pool))
            module.write(ids, torch.randn(len(ids), dim))
        identity = torch.randint(0, classes, (pairs,))
        labels_a = torch.cat([identity, labels[: batch // 2 - pairs]])
        labels_b = torch.cat([identity, labels[batch // 2 - pairs: batch - 2 * pairs]])

        def step() -> float:
            embeddings.grad = None
            view_a, view_b = embeddings[0::2], embeddings[1::2]
            loss_a, _ = module(view_a, labels_a, view_b.detach(), labels_b, rollback=True)
            loss_b, _ = module(view_b, labels_b, view_a.detach(), labels_a, rollback=False)
            loss = (loss_a + loss_b) / 2
            loss.backward()
            return loss.item()

    step()  # warm-up (allocates the momentum)
    times = []
    for _ in range(steps):
        start = time.process_time()
        loss = step()
        times.append(time.process_time() - start)
    peak = _status_bytes("VmHWM")
    assert math.isfinite(loss)
    return {"layer": layer, "classes": classes, "peak_mib": (peak - baseline) / 2**20,
            "step_ms": 1000 * statistics.median(times), "loss": loss}


def accuracy(epochs: int) -> dict[str, tuple[dict, float]]:
    """Demo verification accuracy with the full layer and with dcp, same epochs and seed, trained concurrently."""
    runs = {}
    with tempfile.TemporaryDirectory() as root:
        for layer in ("full", "dcp"):
            command = [sys.executable, "-m", "fastface_pl.train", f"classifier={layer}",
                       f"trainer.max_epochs={epochs}", f"hydra.run.dir={root}/{layer}", "plot=false",
                       "loggers=[csv]", "trainer.enable_progress_bar=false"]
            env = dict(os.environ, OMP_NUM_THREADS="1")  # one core each: two runs at once, no oversubscription
            runs[layer] = (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                            env=env),
                           time.perf_counter())
        results = {}
        for layer, (process, start) in runs.items():
            _, errors = process.communicate()
            if process.returncode:
                raise RuntimeError(f"the {layer} demo failed:\n{errors[-3000:]}")
            summary = json.loads(Path(root, layer, "results.json").read_text())
            results[layer] = (summary, time.perf_counter() - start)
    return results


def _accuracy_of(summary: dict) -> float:
    """Mean 10-fold accuracy over the verification sets of a run's results.json."""
    sets = summary.get("verification", {})
    values = [metrics["accuracy"] for metrics in sets.values() if "accuracy" in metrics]
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="*", default=CLASSES, help="identity counts (none: skip)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--pool-fraction", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-gib", type=float, default=10.0, help="skip a layer whose tensors exceed this")
    parser.add_argument("--accuracy", action="store_true", help="also train the demo with full and dcp")
    parser.add_argument("--epochs", type=int, default=16, help="demo epochs for --accuracy")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    add_json_argument(parser, "f2c")  # f2c_accuracy.json with --accuracy
    args = parser.parse_args()
    if args.run:
        layer, classes = args.run.split(":")
        print(json.dumps(_run(layer, int(classes), args.batch, args.dim, args.sample_rate, args.pool_fraction,
                              args.steps)))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for classes in args.classes:
        for layer in LAYERS:
            need = persistent_bytes(layer, classes, args.dim, args.sample_rate, args.pool_fraction) / 2**30
            if need > args.max_gib:
                rows.append({"layer": layer, "classes": classes, "skipped": f"needs {need:.1f} GiB > --max-gib"})
                continue
            command = [sys.executable, __file__, "--run", f"{layer}:{classes}", "--batch", str(args.batch),
                       "--dim", str(args.dim), "--sample-rate", str(args.sample_rate), "--pool-fraction",
                       str(args.pool_fraction), "--steps", str(args.steps)]
            output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))

    figures: dict = {}
    if rows:
        _print_rows(rows, args)
        figures["layer_step"] = rows
    if args.accuracy:
        results = accuracy(args.epochs)
        print(f"\ndemo (synthetic verification pairs, {args.epochs} epochs, same seed):")
        for layer, (summary, seconds) in results.items():
            print(f"  {layer:<5} accuracy {_accuracy_of(summary):.4f}   wall {seconds:.0f} s")
        figures["demo_accuracy"] = {layer: {"accuracy": _accuracy_of(summary), "wall_s": seconds}
                                    for layer, (summary, seconds) in results.items()}
    write_json(args, figures, "f2c_accuracy" if args.accuracy else "f2c")


def _print_rows(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"one training step of the classification layer on CPU: batch {args.batch}, D = {args.dim}, fp32; "
          f"sampled rate {args.sample_rate}, dcp pool {args.pool_fraction:g} of C")
    print(f"{'C':>10}  {'layer':<8}{'peak MiB':>11}{'vs full':>9}{'CPU ms/step':>13}{'vs full':>9}")
    for classes in args.classes:
        full = next((r for r in rows if r["classes"] == classes and r["layer"] == "full" and "skipped" not in r),
                    None)
        for row in (r for r in rows if r["classes"] == classes):
            if "skipped" in row:
                print(f"{classes:>10,}  {row['layer']:<8}  skipped: {row['skipped']}")
                continue
            mem_ratio = f"{row['peak_mib'] / full['peak_mib']:.3f}" if full else "-"
            time_ratio = f"{row['step_ms'] / full['step_ms']:.3f}" if full else "-"
            print(f"{classes:>10,}  {row['layer']:<8}{row['peak_mib']:>11.1f}{mem_ratio:>9}"
                  f"{row['step_ms']:>13.1f}{time_ratio:>9}")


if __name__ == "__main__":
    main()
