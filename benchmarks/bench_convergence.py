"""Time to accuracy: the same face model trained under FastFace and the usual LR schedules, side by side.

    python benchmarks/bench_convergence.py --quick --json conv.json --plot conv.png   # < 10 min on 2 CPU cores
    python benchmarks/bench_convergence.py --json conv.json --plot conv.png           # the full run

The task is face-like and hard enough for the schedule to matter: thousands of synthetic identities (the
project's :class:`~fastface_pl.data.datasets.SyntheticFaceGenerator` prototypes) whose images vary within an
identity as real faces do: pose-like warps (rotation, scale, a yaw-like horizontal squash, shifts), lighting
(gain, colour cast, a directional gradient), occlusions (a flat-coloured rectangle), blur and pixel noise,
plus label noise (a share of the training labels replaced by a random identity). The training set is rendered
once (a fixed dataset, as a real one is); the seed of a run sets the initialisation and the batch order.

Verification is on identities never seen in training: a gallery of them, every pair scored by cosine
similarity. Reported: TAR at FAR = 1e-3 and 1e-4 over all pairs of the gallery, and the 10-fold accuracy
(InsightFace's protocol, :func:`fastface_pl.evaluation.verification.evaluate_pairs`) on a balanced list of
its pairs.

The model: the ``tiny`` IResNet (widths 8-16-32-64, 32×32 input, 128-d embedding), CosFace (s = 32,
m = 0.35), the full classification layer, SGD (lr 0.1, momentum 0.9, weight decay 5e-4), backbone gradient
clipping at 5: the demo's recipe, in a plain PyTorch loop. Schedules (E epochs unless said):

* ``fastface_auto``: :class:`FastFaceLR` with the auto rule (:mod:`fastface_pl.scheduling.auto`);
* ``fastface_demo``: the hand-tuned demo values (α = β = 0.02, λ = 1e-3, τ = 0.05);
* ``polynomial`` E and 4E: arcface_torch's (1 − t/T)² decay over the run;
* ``step``: ×0.1 after 40 %, 60 % and 80 % of the run (the 5-epoch preset's [2, 3, 4]);
* ``constant``;
* ``plateau``: ``ReduceLROnPlateau`` (factor 0.5, patience 2) stepped with the mean training loss of each
  1/25 of the run;
* ``moving_haar``: MHLR with the window scaled to the run (m = 2 % of T, as 4,000 of 202,320), θ scaled by
  the loss level of the first steps (0.06 at 45.5), P = 2m, restarts after R = 3.

The headline pair (``fastface_auto`` E vs ``polynomial`` 4E) runs with ``--seeds`` seeds (3 by default),
the others with the first seed. Output: a table (mean ± std over seeds), ``--json`` (one row per run:
schedule, epochs, steps, seed, wall time, accuracy, tar, curve, decisions) and ``--plot`` (accuracy and
TAR@1e-3 against optimizer steps).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastface_pl.data.datasets import SyntheticFaceGenerator
from fastface_pl.evaluation.verification import evaluate_pairs
from fastface_pl.models.backbones import build_backbone
from fastface_pl.models.classifiers import FullClassifier
from fastface_pl.models.margins import build_margin
from fastface_pl.models.module import PolynomialFactor
from fastface_pl.scheduling.auto import PAPER_LOSS_SCALE, AutoFastFaceDetector, calibration_steps
from fastface_pl.scheduling.detectors import FastFaceDetector, MovingHaarDetector
from fastface_pl.scheduling.lr_scheduler import FastFaceLR

FARS = (1e-3, 1e-4)
HEADLINE = ("fastface_auto", "polynomial_4x")
SCHEDULES = ("fastface_auto", "fastface_demo", "polynomial_4x", "polynomial", "constant", "step", "plateau",
             "moving_haar")


@dataclass
class TaskConfig:
    """Sizes of the task and the recipe."""

    identities: int = 4000
    images_per_identity: int = 10
    unseen_identities: int = 500
    images_per_unseen: int = 4
    image_size: int = 32
    label_noise: float = 0.05
    pixel_noise: float = 20.0
    batch_size: int = 128
    epochs: int = 5
    lr: float = 0.1
    evals_per_run: int = 10
    data_seed: int = 1234


QUICK = dict(identities=2000, images_per_identity=6, unseen_identities=400, batch_size=64, epochs=3)
TINY = dict(identities=40, images_per_identity=4, unseen_identities=12, images_per_unseen=3, batch_size=32,
            epochs=1, evals_per_run=2)


# ----------------------------------------------------------------------------------------------------------
# The task: synthetic identities with real intra-class variation
# ----------------------------------------------------------------------------------------------------------
def _vary(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pose-like warp, lighting, blur and occlusion applied to ``uint8 [N, 3, S, S]`` images."""
    n, _, size, _ = images.shape
    x = images.float() / 127.5 - 1.0
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    # pose-like warp: rotation ±12°, scale 0.9-1.1, yaw-like horizontal squash 0.8-1, shift ±6 %
    angle = (u(n) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * u(n)
    squash = 0.8 + 0.2 * u(n)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos / (scale * squash), -sin / scale, (u(n) * 2 - 1) * 0.12], dim=1),
        torch.stack([sin / (scale * squash), cos / scale, (u(n) * 2 - 1) * 0.12], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # lighting: gain, colour cast, a directional gradient of up to ±50 %
    axis = torch.linspace(-1, 1, size)
    direction = u(n) * 2 * math.pi
    ramp = torch.cos(direction)[:, None, None] * axis[None, None, :] + torch.sin(direction)[:, None, None] * axis[None, :, None]
    light = (0.75 + 0.5 * u(n))[:, None, None] * (1 + 0.5 * u(n)[:, None, None] * ramp)
    cast = 1 + 0.08 * (u(n, 3) * 2 - 1)
    x = (x + 1) * light[:, None] * cast[:, :, None, None] - 1
    # blur on 30 % of the images (Gaussian, sigma 0.6-1.4)
    blurred = u(n) < 0.3
    if blurred.any():
        sigma = 0.6 + 0.8 * u(int(blurred.sum()))
        taps = torch.arange(-3, 4, dtype=torch.float32)
        kernels = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
        kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [3m, 7]
        chosen = x[blurred].reshape(1, -1, size, size)
        chosen = F.conv2d(F.pad(chosen, (3, 3, 0, 0), mode="replicate"), kernels[:, None, None, :], groups=chosen.shape[1])
        chosen = F.conv2d(F.pad(chosen, (0, 0, 3, 3), mode="replicate"), kernels[:, None, :, None], groups=chosen.shape[1])
        x[blurred] = chosen.reshape(-1, 3, size, size)
    # occlusion on 30 % of the images: a flat rectangle of 25-45 % of the side
    occluded = u(n) < 0.3
    height, width = ((0.25 + 0.2 * u(n, 2)) * size).long().unbind(1)
    top = (u(n) * (size - height)).long()
    left = (u(n) * (size - width)).long()
    rows, cols = torch.arange(size)[None, :], torch.arange(size)[None, :]
    inside = (((rows >= top[:, None]) & (rows < (top + height)[:, None]))[:, :, None]
              & ((cols >= left[:, None]) & (cols < (left + width)[:, None]))[:, None, :])
    inside &= occluded[:, None, None]
    fill = (u(n, 3) * 2 - 1)[:, :, None, None].expand_as(x)
    x = torch.where(inside[:, None], fill, x)
    return ((x + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


def render_faces(generator: SyntheticFaceGenerator, identities: range, samples: int, first_sample: int,
                 seed: int) -> torch.Tensor:
    """``uint8 [len(identities)·samples, 3, S, S]``, identity-major, with :func:`_vary` applied."""
    base = torch.stack([generator.render(i, first_sample + s) for i in identities for s in range(samples)])
    rng = torch.Generator().manual_seed(seed)
    return torch.cat([_vary(chunk, rng) for chunk in base.split(2048)])


@dataclass
class Task:
    train_images: torch.Tensor  # uint8 [N, 3, S, S]
    train_labels: torch.Tensor  # long [N] (with label noise)
    gallery_images: torch.Tensor  # uint8 [G, 3, S, S], unseen identities
    gallery_labels: torch.Tensor  # long [G]
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (index a, index b, issame) into the gallery
    num_classes: int


def build_task(config: TaskConfig) -> Task:
    generator = SyntheticFaceGenerator(config.image_size, config.data_seed, config.pixel_noise)
    train = render_faces(generator, range(config.identities), config.images_per_identity, 0, config.data_seed)
    labels = torch.arange(config.identities).repeat_interleave(config.images_per_identity)
    rng = torch.Generator().manual_seed(config.data_seed + 1)
    noisy = torch.rand(len(labels), generator=rng) < config.label_noise
    labels[noisy] = torch.randint(0, config.identities, (int(noisy.sum()),), generator=rng)
    unseen = range(config.identities, config.identities + config.unseen_identities)
    gallery = render_faces(generator, unseen, config.images_per_unseen, 0, config.data_seed + 2)
    gallery_labels = torch.arange(config.unseen_identities).repeat_interleave(config.images_per_unseen)
    # a balanced pair list for the 10-fold protocol: every genuine pair, as many impostors, interleaved
    a, b = torch.triu_indices(len(gallery_labels), len(gallery_labels), offset=1)
    same = gallery_labels[a] == gallery_labels[b]
    genuine = torch.nonzero(same).flatten()
    impostor = torch.nonzero(~same).flatten()
    impostor = impostor[torch.randperm(len(impostor), generator=rng)[: len(genuine)]]
    order = torch.stack([genuine, impostor], dim=1).flatten()
    return Task(train, labels, gallery, gallery_labels, (a[order], b[order], same[order]), config.identities)


def normalise(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------------------------------------
# Evaluation on unseen identities
# ----------------------------------------------------------------------------------------------------------
def tar_at_far(scores: torch.Tensor, issame: torch.Tensor, far: float) -> float:
    """TAR at the threshold that accepts a fraction ``far`` of the impostor pairs (higher score = same)."""
    impostor = scores[~issame]
    allowed = int(math.floor(far * impostor.numel()))
    threshold = torch.topk(impostor, allowed + 1).values[-1]  # at most `allowed` impostors score above it
    return float((scores[issame] > threshold).double().mean())


@torch.no_grad()
def evaluate(backbone: torch.nn.Module, task: Task) -> dict[str, float]:
    was_training = backbone.training
    backbone.eval()
    embeddings = torch.cat([backbone(normalise(chunk)) for chunk in task.gallery_images.split(512)])
    backbone.train(was_training)
    unit = F.normalize(embeddings.double(), dim=1)
    upper = torch.ones(len(unit), len(unit), dtype=torch.bool).triu_(diagonal=1)  # every pair once
    scores = (unit @ unit.T)[upper]
    issame = (task.gallery_labels[:, None] == task.gallery_labels[None, :])[upper]
    result = {f"tar@{far:g}": tar_at_far(scores, issame, far) for far in FARS}
    index_a, index_b, pair_same = task.pairs
    metrics = evaluate_pairs(embeddings[index_a], embeddings[index_b], pair_same)
    result["accuracy"] = metrics["accuracy"]
    result["accuracy_std"] = metrics["accuracy_std"]
    return result


# ----------------------------------------------------------------------------------------------------------
# Schedules: one object per run, told after every optimizer step
# ----------------------------------------------------------------------------------------------------------
class Schedule:
    """``after_step(loss)`` once per optimizer step (loss a float)."""

    decisions: list

    def after_step(self, loss: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class TorchSchedule(Schedule):
    def __init__(self, scheduler: Any) -> None:
        self.scheduler, self.decisions = scheduler, []

    def after_step(self, loss: float) -> None:
        self.scheduler.step()


class DetectorSchedule(Schedule):
    def __init__(self, optimizer: torch.optim.Optimizer, detector: Any) -> None:
        self.scheduler = FastFaceLR(optimizer, detector)

    @property
    def decisions(self) -> list:
        return self.scheduler.decisions

    def after_step(self, loss: float) -> None:
        self.scheduler.step(loss)


class DeferredDetectorSchedule(Schedule):
    """Builds its detector after the first ``wait`` losses (from them), replays them, then forwards."""

    def __init__(self, optimizer: torch.optim.Optimizer, wait: int, build: Callable[[list[float]], Any]) -> None:
        self.optimizer, self.wait, self.build = optimizer, wait, build
        self.pending: list[float] = []
        self.scheduler: FastFaceLR | None = None

    @property
    def decisions(self) -> list:
        return [] if self.scheduler is None else self.scheduler.decisions

    def after_step(self, loss: float) -> None:
        if self.scheduler is not None:
            self.scheduler.step(loss)
            return
        self.pending.append(loss)
        if len(self.pending) >= self.wait:
            self.scheduler = FastFaceLR(self.optimizer, self.build(self.pending))
            for value in self.pending:
                self.scheduler.step(value)


class PlateauSchedule(Schedule):
    def __init__(self, optimizer: torch.optim.Optimizer, block: int) -> None:
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
        self.block, self.losses, self.decisions, self.step = block, [], [], 0
        self.optimizer = optimizer

    def after_step(self, loss: float) -> None:
        self.step += 1
        self.losses.append(loss)
        if len(self.losses) == self.block:
            before = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step(statistics.fmean(self.losses))
            self.losses = []
            after = self.optimizer.param_groups[0]["lr"]
            if after != before:
                self.decisions.append((self.step, after / before, after))


def make_schedule(name: str, optimizer: torch.optim.Optimizer, total_steps: int) -> Schedule:
    """The schedule ``name`` for a run of ``total_steps`` optimizer steps."""
    if name == "fastface_auto":
        return DetectorSchedule(optimizer, AutoFastFaceDetector(total_steps))
    if name == "fastface_demo":
        return DetectorSchedule(optimizer, FastFaceDetector(0.02, 0.02, 1e-3, patience=int(0.05 * total_steps)))
    if name.startswith("polynomial"):
        return TorchSchedule(torch.optim.lr_scheduler.LambdaLR(optimizer, PolynomialFactor(total_steps, 0, 2.0)))
    if name == "step":
        milestones = [round(f * total_steps) for f in (0.4, 0.6, 0.8)]
        return TorchSchedule(torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1))
    if name == "constant":
        return TorchSchedule(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
    if name == "plateau":
        return PlateauSchedule(optimizer, max(1, total_steps // 25))
    if name == "moving_haar":
        window = max(2, round(0.02 * total_steps))

        def build(losses: list[float]) -> MovingHaarDetector:
            theta = 0.06 * statistics.median(losses) / PAPER_LOSS_SCALE
            return MovingHaarDetector(window=window, threshold=theta)

        return DeferredDetectorSchedule(optimizer, calibration_steps(total_steps), build)
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


# ----------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------
def train_run(task: Task, config: TaskConfig, schedule_name: str, epochs: int, seed: int) -> dict[str, Any]:
    """Trains one model under one schedule; returns its row (with the accuracy curve)."""
    torch.manual_seed(seed)
    backbone = build_backbone("tiny", 128, input_size=config.image_size)
    classifier = FullClassifier(128, task.num_classes, build_margin("cosface", s=32.0, m=0.35))
    optimizer = torch.optim.SGD(
        [{"params": [p for p in backbone.parameters() if p.requires_grad]}, {"params": classifier.parameters()}],
        lr=config.lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(task.train_labels) // config.batch_size
    total = steps_per_epoch * epochs
    schedule = make_schedule(schedule_name, optimizer, total)
    base_steps = steps_per_epoch * config.epochs  # evaluations at the same steps for every run length
    eval_every = max(1, base_steps // config.evals_per_run)
    order_rng = torch.Generator().manual_seed(seed)
    curve, losses, step, began = [], [], 0, time.perf_counter()
    eval_seconds = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(task.train_labels), generator=order_rng)
        for batch in order[: steps_per_epoch * config.batch_size].view(steps_per_epoch, config.batch_size):
            loss = classifier(backbone(normalise(task.train_images[batch])), task.train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
            optimizer.step()
            step += 1
            value = loss.item()
            losses.append(value)
            schedule.after_step(value)
            if step % eval_every == 0 or step == total:
                tick = time.perf_counter()
                metrics = evaluate(backbone, task)
                eval_seconds += time.perf_counter() - tick
                curve.append({"step": step, "lr": optimizer.param_groups[0]["lr"], **metrics})
    final = curve[-1]
    return {
        "schedule": schedule_name, "epochs": epochs, "steps": total, "seed": seed,
        "wall_s": round(time.perf_counter() - began - eval_seconds, 1),
        "accuracy": final["accuracy"], "tar": {f"{far:g}": final[f"tar@{far:g}"] for far in FARS},
        "final_lr": optimizer.param_groups[0]["lr"], "final_loss": statistics.fmean(losses[-max(1, total // 50):]),
        "decisions": [list(d) for d in schedule.decisions], "curve": curve,
    }


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["schedule"], row["epochs"]), []).append(row)
    lines = ["| schedule | epochs | optimizer steps | seeds | wall time (s) | accuracy (%) | TAR@FAR=1e-3 (%) "
             "| TAR@FAR=1e-4 (%) | LR decisions |", "|---|---|---|---|---|---|---|---|---|"]
    for (name, epochs), group in groups.items():
        decisions = statistics.fmean(len(r["decisions"]) for r in group)
        lines.append(
            f"| {name} | {epochs} | {group[0]['steps']:,} | {len(group)} | "
            f"{statistics.fmean(r['wall_s'] for r in group):.0f} | {_mean_std([r['accuracy'] for r in group])} | "
            f"{_mean_std([r['tar']['0.001'] for r in group])} | {_mean_std([r['tar']['0.0001'] for r in group])} | "
            f"{decisions:g} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    seen: set[tuple[str, int]] = set()
    colours = dict(zip(SCHEDULES, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    for row in rows:
        key = (row["schedule"], row["epochs"])
        steps = [point["step"] for point in row["curve"]]
        style = dict(color=colours.get(row["schedule"], "k"), lw=1.6 if row["schedule"] in HEADLINE else 1.0,
                     alpha=1.0 if key not in seen else 0.35)
        label = None if key in seen else f"{row['schedule']} ({row['epochs']} ep)"
        axes[0].plot(steps, [100 * p["accuracy"] for p in row["curve"]], label=label, **style)
        axes[1].plot(steps, [100 * p["tar@0.001"] for p in row["curve"]], **style)
        axes[2].step(steps, [p["lr"] for p in row["curve"]], where="post", **style)
        seen.add(key)
    axes[2].set_yscale("symlog", linthresh=1e-4)
    for axis, title in zip(axes, ("10-fold accuracy, unseen identities (%)", "TAR @ FAR = 1e-3 (%)",
                                  "learning rate (at the evaluations)")):
        axis.set_xlabel("optimizer steps")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2,000 identities, 3 epochs, batch 64 (< 10 min on 2 cores)")
    mode.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (for the tests)")
    parser.add_argument("--epochs", type=int, default=None, help="E (default: 5, --quick 3)")
    parser.add_argument("--identities", type=int, default=None, help="training identities")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the headline pair (the others use the first)")
    parser.add_argument("--seed", type=int, default=3407, help="first seed")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--plot", default=None, metavar="PNG", help="plot accuracy and TAR against steps")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = TaskConfig(**(QUICK if args.quick else TINY if args.tiny else {}))
    if args.epochs is not None:
        if args.epochs < 1:
            parser.error(f"--epochs must be >= 1, got {args.epochs}")
        config = replace(config, epochs=args.epochs)
    if args.identities is not None:
        if args.identities < 2:
            parser.error(f"--identities must be >= 2, got {args.identities}")
        config = replace(config, identities=args.identities)

    began = time.perf_counter()
    task = build_task(config)
    print(f"Task: {config.identities:,} identities × {config.images_per_identity} images "
          f"({len(task.train_labels):,}, {config.label_noise:.0%} label noise), {config.image_size}×{config.image_size}; "
          f"verification on {config.unseen_identities} unseen identities × {config.images_per_unseen} "
          f"({len(task.pairs[0]):,} pairs for the 10-fold accuracy); batch {config.batch_size}, E = {config.epochs}; "
          f"rendered in {time.perf_counter() - began:.0f} s", flush=True)
    seeds = [args.seed + k for k in range(args.seeds)]
    plan = [(name, seeds[0]) for name in args.schedules]  # every schedule once, then the headline's other seeds
    plan += [(name, seed) for seed in seeds[1:] for name in args.schedules if name in HEADLINE]
    runs = []
    for name, seed in plan:
        epochs = 4 * config.epochs if name == "polynomial_4x" else config.epochs
        row = train_run(task, config, name, epochs, seed)
        runs.append(row)
        print(f"  {name:>14} E={epochs:<3} seed {seed}: accuracy {100 * row['accuracy']:.2f} %, "
              f"TAR@1e-3 {100 * row['tar']['0.001']:.2f} %, TAR@1e-4 {100 * row['tar']['0.0001']:.2f} %, "
              f"{len(row['decisions'])} LR decisions, final LR {row['final_lr']:.3g}, {row['wall_s']:.0f} s",
              flush=True)
        if args.json:  # after every run, so an interrupted benchmark keeps what it measured
            Path(args.json).write_text(json.dumps(runs, indent=1))
    print()
    print(table(runs))
    print(f"\nSeeds {seeds} for {' and '.join(HEADLINE)}, {seeds[0]} for the others; data seed {config.data_seed}. "
          f"Total {time.perf_counter() - began:.0f} s.")
    if args.json:
        print(f"Rows written to {args.json}")
    if args.plot:
        plot(runs, args.plot)
        print(f"Plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
