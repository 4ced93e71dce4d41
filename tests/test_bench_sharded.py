"""benchmarks/bench_sharded.py: its formulas by hand, and a --quick run on two gloo CPU ranks."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # for its `from _record import ...`
    try:
        spec = importlib.util.spec_from_file_location("bench_sharded", BENCHMARKS / "bench_sharded.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_formulas_at_one_million_identities_on_eight_ranks(bench):
    row = bench.computed(1_000_000, 8, 128, 512)
    weight = 1_000_000 * 512 * 4
    assert row["replicated"]["state_bytes"] == 3 * weight
    assert row["replicated"]["logits_bytes"] == 128 * 1_000_000 * 4
    assert row["replicated"]["sent_bytes"] == pytest.approx(2 * 7 / 8 * weight)
    assert row["sharded"]["state_bytes"] == 3 * 125_000 * 512 * 4  # C/N rows exactly
    assert row["state_ratio"] == pytest.approx(1 / 8)
    assert row["sharded"]["logits_bytes"] == row["replicated"]["logits_bytes"]  # N·B × C/N = B × C
    # gather 7·128·512·4, labels 7·128·8, max 2·7/8·1024·4, sums 2·7/8·2048·4, reduce-scatter 7·128·512·4
    assert row["sharded"]["sent_bytes"] == pytest.approx(1_835_008 + 7_168 + 7_168 + 14_336 + 1_835_008)
    assert row["sent_ratio"] == pytest.approx(3_698_688 / (2 * 7 / 8 * weight)) and row["sent_ratio"] < 2e-3


def test_uneven_split_rounds_up(bench):
    row = bench.computed(100_001, 8, 128, 512)
    assert row["sharded"]["state_bytes"] == 3 * 12_501 * 512 * 4
    assert row["state_ratio"] == pytest.approx(1 / 8, rel=1e-4) and row["state_ratio"] > 1 / 8


@pytest.mark.slow  # spawns two gloo ranks (about 6 s)
def test_quick_run_measures_far_fewer_bytes_for_the_sharded_layer(tmp_path):
    out = tmp_path / "sharded.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(BENCHMARKS / "bench_sharded.py"), "--quick", "--json", str(out)], env=env,
                   check=True, timeout=120, capture_output=True, text=True)
    record = json.loads(out.read_text())
    assert record["arguments"]["quick"] is True
    runs = {run["variant"]: run for run in record["figures"]["measured"]["runs"]}
    replicated, sharded = runs["replicated"], runs["sharded"]
    assert replicated["classes"] == sharded["classes"] == 4_000
    # the real tensors: the sharded rank holds half the rows of weight, gradient and momentum
    assert replicated["layer_state_bytes"] == replicated["computed_state_bytes"] == 3 * 4_000 * 32 * 4
    assert sharded["layer_state_bytes"] == sharded["computed_state_bytes"] == 3 * 2_000 * 32 * 4
    sent = "sent_bytes_per_step_wchar"
    if replicated[sent] is None:
        sent = "sent_bytes_per_step_lo"
    if replicated[sent] is None:
        pytest.skip("neither /proc/self/io nor /proc/net/dev here")
    assert sharded[sent] * 10 < replicated[sent]
    # DDP's all-reduce is what the formula says (gloo's ring on two ranks), within protocol overhead
    assert replicated["measured_over_expected_wchar"] == pytest.approx(1.0, abs=0.1)
    assert all(math.isfinite(loss) for run in runs.values() for loss in run["losses_rank0"])
