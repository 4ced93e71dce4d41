"""The issue-12 benchmarks keep working: bench_convergence.py in its tiny mode, gpu_check.py in --cpu-smoke."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def convergence():
    return _load("bench_convergence")


def test_tar_at_far_reads_the_impostor_quantile(convergence):
    impostor = torch.arange(1000, dtype=torch.float64) / 1000  # 0.000 … 0.999
    genuine = torch.tensor([0.9985, 0.9975, 0.5, 1.5], dtype=torch.float64)
    scores = torch.cat([impostor, genuine])
    issame = torch.cat([torch.zeros(1000, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])
    # FAR 1e-3 allows 1 impostor above the threshold: threshold 0.998, so 0.9985 and 1.5 are accepted
    assert convergence.tar_at_far(scores, issame, 1e-3) == pytest.approx(0.5)
    # FAR 2e-3 allows 2: threshold 0.997, three genuine pairs above it
    assert convergence.tar_at_far(scores, issame, 2e-3) == pytest.approx(0.75)


def test_task_has_intra_class_variation_and_label_noise(convergence):
    config = convergence.TaskConfig(identities=50, images_per_identity=6, unseen_identities=10, label_noise=0.2)
    task = convergence.build_task(config)
    again = convergence.build_task(config)
    assert torch.equal(task.train_images, again.train_images)  # deterministic from the data seed
    assert task.train_images.shape == (300, 3, 32, 32) and task.train_images.dtype == torch.uint8
    clean = torch.arange(50).repeat_interleave(6)
    flipped = (task.train_labels != clean).float().mean().item()
    assert 0.1 < flipped < 0.3  # about 20 % (a few noisy labels land on the right identity)
    images = task.train_images.float()
    within = (images[0] - images[1]).abs().mean()  # two images of identity 0
    assert within > 10  # warps, lighting, occlusion: far from pixel-identical
    index_a, index_b, issame = task.pairs
    labels = task.gallery_labels
    assert torch.equal(labels[index_a] == labels[index_b], issame)
    assert issame.sum() * 2 == len(issame) and bool(issame[0]) and not bool(issame[1])  # balanced, interleaved


def test_convergence_tiny_mode_end_to_end(convergence, tmp_path, capsys):
    rows_path, plot_path = tmp_path / "rows.json", tmp_path / "curve.png"
    assert convergence.main(["--tiny", "--seeds", "3", "--threads", "1", "--json", str(rows_path),
                             "--plot", str(plot_path)]) == 0
    rows = json.loads(rows_path.read_text())
    assert {row["schedule"] for row in rows} == set(convergence.SCHEDULES)
    for row in rows:
        assert {"schedule", "epochs", "steps", "accuracy", "tar", "seed", "wall_s", "curve"} <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0 and set(row["tar"]) == {"0.001", "0.0001"}
        steps = [point["step"] for point in row["curve"]]
        assert steps == sorted(steps) and steps[-1] == row["steps"]
    by_name = {}
    for row in rows:
        by_name.setdefault(row["schedule"], []).append(row)
    assert len(by_name["fastface_auto"]) == len(by_name["polynomial_4x"]) == 3  # the headline pair, 3 seeds
    assert len(by_name["constant"]) == 1
    assert by_name["polynomial_4x"][0]["steps"] == 4 * by_name["polynomial"][0]["steps"]
    assert by_name["polynomial"][0]["curve"][-1]["lr"] == 0.0  # decayed to zero at the end of its run
    assert by_name["step"][0]["final_lr"] == pytest.approx(0.1 * 0.1 ** 3)
    out = capsys.readouterr().out
    assert "| fastface_auto | 1 |" in out and " ± " in out
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # six Trainer.fit runs (about 20 s on an idle 2-core machine)
def test_gpu_check_cpu_smoke(tmp_path):
    gpu_check = _load("gpu_check")
    report_path = tmp_path / "gpu.json"
    assert gpu_check.main(["--cpu-smoke", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    throughput = report["throughput"]
    assert len(throughput) == 2 and all("error" not in row for row in throughput)  # channels-last off / on
    assert all(row["trainer_images_s"] > 0 and row["plain_images_s"] > 0 for row in throughput)
    assert report["memory"][0]["classes"] == gpu_check.CPU_SMOKE.memory_classes
    rows = {row["setting"]: row for row in report["syncs"]}
    k = gpu_check.CPU_SMOKE.sync_every
    steps = gpu_check.CPU_SMOKE.sync_steps + gpu_check.CPU_SMOKE.warmup
    assert rows["without callback"]["syncs_per_step"] == 0.0 and rows["without callback"]["block_reads"] == 0
    # The callback and the guard share one reader: one read per step at k = 1, one per k steps (block reads,
    # which the CPU profiler does not see) otherwise.
    assert rows["FastFace callback + DivergenceGuard, k = 1"]["syncs_per_step"] == pytest.approx(1.0)
    assert rows["FastFace callback + DivergenceGuard, k = 1"]["block_reads"] == steps
    assert rows[f"FastFace callback + DivergenceGuard, k = {k}"]["syncs_per_step"] == 0.0
    assert rows[f"FastFace callback + DivergenceGuard, k = {k}"]["block_reads"] == math.ceil(steps / k)
