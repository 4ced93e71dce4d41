"""Peak memory of one training step (forward + backward) of the margin classification layer, on CPU.

    python benchmarks/bench_classifier_memory.py                 # C = 100,000, batch 128, D = 512
    python benchmarks/bench_classifier_memory.py --classes 20000 --batch 64

Each variant runs in its own subprocess (Linux). The weight ``float[C, D]``, the embeddings and the
labels are allocated and touched first; then the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``) and the figure is the peak resident memory during one forward + backward step
(``VmHWM``) minus the resident memory before it: what the step needs on top of the weight, including the
weight's gradient (C × D), which every variant must produce. glibc is told to serve every allocation above
64 KiB with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed tensors go back to the OS at once and the peak
RSS follows live tensors (torch's CPU allocator does not cache). Variants:

- ``straightforward``: ``F.normalize`` of the weight, ``one_hot``, ``arccos``/``cos`` on the whole matrix,
  ``torch.where``, ``softmax`` then ``log``, a one-hot weighted sum (a common textbook implementation);
- ``arcface_torch-style``: ``F.normalize`` of both, ``linear``, ``clamp``, the margin on the target column
  under ``no_grad``, scaling, ``F.cross_entropy``;
- ``fastface_pl full``: :class:`fastface_pl.models.classifiers.FullClassifier` (fused, one B × C buffer);
- ``fastface_pl sampled``: :class:`SampledClassifier` with ``--sample-rate`` (sparse weight gradient).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from _record import add_json_argument, write_json

VARIANTS = ["straightforward", "arcface_torch-style", "fastface_pl full", "fastface_pl sampled"]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Resets the kernel's peak-RSS counter (VmHWM) of this process; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _run_variant(variant: str, classes: int, batch: int, dim: int, sample_rate: float, margin: float,
                 scale: float) -> dict:
    import torch
    import torch.nn.functional as F

    from fastface_pl.models.classifiers import FullClassifier, SampledClassifier
    from fastface_pl.models.margins import ArcFace

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    weight = torch.nn.Parameter(torch.empty(classes, dim).normal_(0.0, 0.01))  # no temporary copy
    embeddings = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, classes, (batch,))

    def straightforward() -> torch.Tensor:
        cosine = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        one_hot = F.one_hot(labels, classes).float()
        target = torch.cos(torch.arccos(cosine) + margin)
        logits = torch.where(one_hot.bool(), target, cosine) * scale
        probabilities = torch.softmax(logits, dim=1)
        return -(one_hot * torch.log(probabilities + 1e-30)).sum() / batch

    def arcface_torch_style() -> torch.Tensor:
        logits = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
        rows = torch.arange(batch)
        with torch.no_grad():
            target = logits[rows, labels].arccos() + margin
            logits[rows, labels] = target.cos()
        return F.cross_entropy(logits * scale, labels)

    if variant == "straightforward":
        step = straightforward
    elif variant == "arcface_torch-style":
        step = arcface_torch_style
    else:
        if variant == "fastface_pl full":
            layer = FullClassifier(dim, classes, ArcFace(s=scale, m=margin))
        else:
            layer = SampledClassifier(dim, classes, ArcFace(s=scale, m=margin), sample_rate=sample_rate)
        layer.weight = weight

        def step() -> torch.Tensor:
            return layer(embeddings, labels)

    if not _reset_peak():  # fall back on the lifetime peak: setup must not have exceeded the current RSS
        assert _status_bytes("VmHWM") - _status_bytes("VmRSS") < 2**20, "cannot reset the peak RSS counter"
    baseline = _status_bytes("VmRSS")
    loss = step()
    loss.backward()
    peak = _status_bytes("VmHWM")
    assert math.isfinite(loss.item()) and weight.grad is not None
    return {"variant": variant, "step_mib": (peak - baseline) / 2**20, "peak_mib": peak / 2**20,
            "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100_000, help="number of identities C")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512, help="embedding size D")
    parser.add_argument("--sample-rate", type=float, default=0.1, help="for the sampled layer")
    parser.add_argument("--margin", type=float, default=0.5, help="ArcFace m")
    parser.add_argument("--scale", type=float, default=64.0, help="s")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    add_json_argument(parser, "classifier_memory")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_run_variant(args.variant, args.classes, args.batch, args.dim, args.sample_rate,
                                      args.margin, args.scale)))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    results = []
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--classes", str(args.classes), "--batch",
                   str(args.batch), "--dim", str(args.dim), "--sample-rate", str(args.sample_rate),
                   "--margin", str(args.margin), "--scale", str(args.scale)]
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))

    mib = 2**20
    bxc = args.batch * args.classes * 4 / mib
    cxd = args.classes * args.dim * 4 / mib
    print(f"classification layer, one forward+backward step on CPU: C={args.classes:,}, batch={args.batch}, "
          f"D={args.dim}, fp32")
    print(f"for scale: one [B, C] fp32 tensor = {bxc:.1f} MiB, one [C, D] fp32 tensor = {cxd:.1f} MiB "
          f"(the weight's gradient is one of those)")
    reference = results[0]["step_mib"]
    print(f"{'variant':<24}{'step peak MiB':>15}{'vs straightforward':>20}{'loss':>10}")
    for result in results:
        print(f"{result['variant']:<24}{result['step_mib']:>15.1f}{result['step_mib'] / reference:>20.2f}"
              f"{result['loss']:>10.3f}")
    write_json(args, {"variants": results}, "classifier_memory")


if __name__ == "__main__":
    main()
