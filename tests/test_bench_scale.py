"""benchmarks/bench_scale.py keeps working at a small scale, and its synthetic metadata is right."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCHMARKS / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module
    spec.loader.exec_module(module)
    return module


def test_identity_counts_sum_to_the_images_with_two_or_more_each(bench):
    counts = bench.identity_counts(10_000, 700)
    assert counts.sum() == 10_000 and counts.min() >= 2 and len(counts) == 700


def test_folder_index_arrays_spell_the_paths_of_their_labels(bench):
    arrays = bench.folder_index_arrays(50, 7)
    paths = [p.decode() for p in arrays["paths"].tolist()]
    assert paths[0] == "m.0000000/0000000.jpg"
    labels = arrays["labels"].tolist()
    assert all(p.startswith(f"m.{label:07d}/") for p, label in zip(paths, labels))
    assert np.array_equal(np.bincount(labels, minlength=7), arrays["counts"]) and len(set(paths)) == 50


@pytest.mark.slow
def test_a_small_run_writes_before_and_after(bench, tmp_path):
    out = tmp_path / "scale.json"
    assert bench.main(["--images", "20000", "--identities", "1000", "--tree-folders", "500", "--pack-identities",
                       "300", "--pool-steps", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    keys = {"epoch_start_s", "epoch_start_bytes_per_image", "index_start_s", "identity_index_reload_s"}
    assert set(result["after"]) == keys and set(result["before"]) == keys
    assert result["details"]["pool"]["pool_size"] == 64  # 1 % of 1000, raised to one step's gallery
    assert result["before"]["epoch_start_bytes_per_image"] > result["after"]["epoch_start_bytes_per_image"]
