"""Cost of one detector update against torch's ReduceLROnPlateau.step, on the same loss stream.

Every contender is fed the same per-step losses (by default the packaged real MS1MV3/ResNet100
curve, 202,320 optimizer steps) in a plain Python loop; the table shows the best of ``--repeats``
runs in microseconds per update and the ratio to ``ReduceLROnPlateau.step`` (on an SGD optimizer
over one parameter). The contenders take turns within each repeat, so a busy machine slows them alike.
Target: both detectors at or below ReduceLROnPlateau.step (1x); the code favours readable arithmetic
over shaving the last fraction of a microsecond.

Run::

    python benchmarks/bench_detectors.py
    python benchmarks/bench_detectors.py --steps 50000 --repeats 3 --window 4000
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from typing import Callable

import torch

from fastface_pl.scheduling.detectors import FastFaceDetector, MovingHaarDetector
from fastface_pl.scheduling.replay import expand_loss_log, load_loss_log
from fastface_pl.scheduling.lr_scheduler import FastFaceLR
from _record import add_json_argument, write_json


def time_once(make_step: Callable[[], Callable[[float], object]], losses: list[float]) -> float:
    """Time per call in microseconds of one run of a fresh contender."""
    step = make_step()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for loss in losses:
            step(loss)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / len(losses) / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="number of updates (default: the whole real curve)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per contender; the best one counts")
    parser.add_argument("--window", type=int, default=4000, help="Moving Haar window m")
    add_json_argument(parser, "detectors")
    args = parser.parse_args()

    losses = expand_loss_log(load_loss_log())
    if args.steps is not None:
        losses = (losses * (args.steps // len(losses) + 1))[:args.steps]
    total = len(losses)
    torch.set_num_threads(1)

    def plateau():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5,
                                                          patience=int(0.05 * total)).step

    def fastface_lr():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
        return FastFaceLR(optimizer, "fastface", total_steps=total).step

    contenders = [
        ("ReduceLROnPlateau.step (torch)", plateau),
        ("FastFaceDetector.update", lambda: FastFaceDetector(patience=int(0.05 * total)).update),
        (f"MovingHaarDetector.update (m={args.window})", lambda: MovingHaarDetector(window=args.window).update),
        ("FastFaceLR.step (owns the LR, for reference)", fastface_lr),
        ("empty loop (lambda, for reference)", lambda: (lambda loss: None)),
    ]
    print(f"{total} updates per run, best of {args.repeats}; Python {platform.python_version()}, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    results = {name: float("inf") for name, _ in contenders}
    for _ in range(args.repeats):  # round-robin: every contender once per repeat; the best run counts
        for name, make in contenders:
            results[name] = min(results[name], time_once(make, losses))
    baseline = results[contenders[0][0]]
    print(f"{'contender':<44} {'us/update':>10} {'x ReduceLROnPlateau':>20}")
    for name, micros in results.items():
        print(f"{name:<44} {micros:>10.3f} {micros / baseline:>20.2f}")
    fast = results[contenders[1][0]] / baseline
    haar = results[contenders[2][0]] / baseline
    print(f"targets: FastFace <= 1x: {fast:.2f}x {'OK' if fast <= 1.0 else 'MISSED'}; "
          f"Moving Haar <= 1x: {haar:.2f}x {'OK' if haar <= 1.0 else 'MISSED'}")
    write_json(args, {"updates": total, "us_per_update": results,
                      "ratio_to_reduce_lr_on_plateau": {name: micros / baseline for name, micros in results.items()}}, "detectors")


if __name__ == "__main__":
    main()
