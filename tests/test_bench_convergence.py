"""benchmarks/bench_convergence.py: the task, the statistics and the precondition checks, and a tiny run."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from fastface_pl.scheduling.lr_scheduler import FastFaceLR

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_convergence", BENCHMARKS / "bench_convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_convergence"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tar_at_far_reads_the_impostor_quantile(bench):
    impostor = torch.arange(1000, dtype=torch.float64) / 1000  # 0.000 … 0.999
    genuine = torch.tensor([0.9985, 0.9975, 0.5, 1.5], dtype=torch.float64)
    scores = torch.cat([impostor, genuine])
    issame = torch.cat([torch.zeros(1000, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])
    # FAR 1e-3 allows 1 impostor above the threshold: threshold 0.998, so 0.9985 and 1.5 are accepted
    assert bench.tar_at_far(scores, issame, 1e-3) == pytest.approx(0.5)
    # FAR 2e-3 allows 2: threshold 0.997, three genuine pairs above it
    assert bench.tar_at_far(scores, issame, 2e-3) == pytest.approx(0.75)


def _config(bench, **overrides):
    base = dict(identities=30, images_per_identity=4, unseen_identities=10, label_noise=0.2, data_seed=11)
    return bench.TaskConfig(**{**base, **overrides})


def test_fresh_images_on_every_visit_the_same_for_every_run(bench):
    task = bench.build_task(_config(bench))
    again = bench.build_task(_config(bench))
    first, second = task.epoch_images(0), task.epoch_images(1)
    assert first.shape == (120, 3, 16, 16) and first.dtype == torch.uint8
    assert torch.equal(first, again.epoch_images(0))  # deterministic from the data seed and the epoch
    assert (first.float() - second.float()).abs().mean() > 10  # a new pose, lighting, noise on each visit
    other = bench.build_task(_config(bench, data_seed=12))
    assert not torch.equal(other.epoch_images(0), first)  # another data seed, other identities
    assert not torch.equal(other.gallery_images, task.gallery_images)
    clean = torch.arange(30).repeat_interleave(4)
    assert 0.1 < (task.train_labels != clean).float().mean().item() < 0.3  # about 20 % label noise
    index_a, index_b, issame = task.pairs
    assert torch.equal(task.gallery_labels[index_a] == task.gallery_labels[index_b], issame)
    assert issame.sum() * 2 == len(issame)  # balanced


def test_the_fixed_set_repeats_its_images(bench):
    task = bench.build_task(_config(bench, fresh=False))
    assert torch.equal(task.epoch_images(0), task.epoch_images(5))
    within = (task.epoch_images(0)[0].float() - task.epoch_images(0)[1].float()).abs().mean()
    assert within > 10  # two photos of one identity, varied once


def test_mean_ci_is_students_t(bench):
    mean, half = bench.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.30265 * 1.0 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2 dof) · s / √n
    assert bench.mean_ci([5.0]) == (5.0, 0.0)


def _row(schedule, seed, tar, bins=None, data_seed=1):
    bins = bins or [1.0] * 100
    return {"schedule": schedule, "seed": seed, "data_seed": data_seed, "task": "fresh", "epochs": 1, "steps": 100,
            "wall_s": 1.0, "accuracy": 0.9, "tar": {"0.001": tar, "0.0001": tar / 2}, "final_loss": bins[-1],
            "decisions": [], "loss_bins": bins, "curve": [{"step": 100, "lr": 0.1, "tar@0.001": tar}]}


def _falling(until: float, floor: float = 10.0, start: float = 30.0, later: float = 0.0) -> list[float]:
    """Loss bins falling linearly to ``floor`` at ``until`` of the run, then by ``later`` more to the end."""
    knee = round(100 * until)
    return [start - (start - floor) * i / knee if i < knee else floor - later * (i - knee) / (100 - knee)
            for i in range(100)]


def test_the_precondition_holds_on_a_stationary_run(bench):
    rows = []
    for seed, noise in zip((1, 2, 3), (0.0, 0.01, -0.01)):
        rows += [_row("polynomial", seed, 0.60 + noise), _row("polynomial_4x", seed, 0.75 + noise),
                 _row("constant", seed, 0.50 + noise, _falling(0.4)),
                 _row("drop50", seed, 0.62 + noise, _falling(0.4)[:50] + [8.0] * 50)]
    checks = bench.precondition(rows)[("fresh", 1)]
    assert checks["holds"], checks
    assert checks["longer_schedule_pays"]["tar_gain"] == pytest.approx(0.15)
    assert checks["constant_flat_by_midrun"]["second_half_drop_over_first"] == pytest.approx(0.0, abs=1e-9)
    assert checks["midrun_decay_pays"]["loss_drop"] == pytest.approx(2.0)


def test_the_precondition_fails_on_a_budget_limited_run(bench):
    rows = []
    for seed in (1, 2, 3):
        still_falling = _falling(0.4, later=5.0)  # the second half sheds a quarter of the first half's drop
        rows += [_row("polynomial", seed, 0.60 + seed / 100), _row("polynomial_4x", seed, 0.60 + (2 - seed) / 50),
                 _row("constant", seed, 0.50, still_falling), _row("drop50", seed, 0.50, still_falling)]
    checks = bench.precondition(rows)[("fresh", 1)]
    assert not checks["holds"]
    assert not checks["longer_schedule_pays"]["holds"]  # 4E − E within the seed spread
    assert 0.15 < checks["constant_flat_by_midrun"]["second_half_drop_over_first"] < 0.3
    assert not checks["constant_flat_by_midrun"]["holds"]
    assert not checks["midrun_decay_pays"]["holds"]


def test_paired_differences_match_seeds(bench):
    a = [_row("fastface_auto", seed, tar) for seed, tar in ((1, 0.7), (2, 0.8), (3, 0.9))]
    b = [_row("constant", seed, tar) for seed, tar in ((3, 0.5), (1, 0.6))]  # seed 2 missing, out of order
    assert bench.paired(a, b, lambda r: r["tar"]["0.001"]) == pytest.approx([0.1, 0.4])


def test_tiny_run_end_to_end(bench, tmp_path, capsys):
    rows_path, plot_path = tmp_path / "rows.json", tmp_path / "curve.png"
    assert bench.main(["--tiny", "--seeds", "3", "--threads", "1", "--json", str(rows_path),
                       "--plot", str(plot_path), "--data-seed", "77"]) == 0
    stored = json.loads(rows_path.read_text())
    rows = stored["rows"]
    assert stored["threads"] == 1 and stored["config"]["data_seed"] == 77
    by_name: dict[str, list] = {}
    for row in rows:
        by_name.setdefault(row["schedule"], []).append(row)
        assert row["data_seed"] == 77 and row["threads"] == 1 and len(row["loss_bins"]) == bench.LOSS_BINS
        steps = [point["step"] for point in row["curve"]]
        assert steps == sorted(steps) and steps[-1] == row["steps"]
    assert set(by_name) == set(bench.SCHEDULES)
    assert all(sorted(r["seed"] for r in group) == [3407, 3408, 3409] for group in by_name.values())  # same seeds
    assert by_name["polynomial_4x"][0]["steps"] == 4 * by_name["polynomial"][0]["steps"]
    stops = {r["seed"]: r["steps"] for r in by_name["fastface_stop"]}
    assert {r["seed"]: r["steps"] for r in by_name["polynomial_at_stop"]} == stops  # the twin that knew S
    assert all(r["budget_steps"] == 4 * by_name["polynomial"][0]["steps"] for r in by_name["fastface_stop"])
    assert all(len(r["decisions"]) == 1 for r in by_name["fastface_cooldown"])  # the one start of the anneal
    assert by_name["polynomial"][0]["curve"][-1]["lr"] == 0.0
    assert by_name["step"][0]["final_lr"] == pytest.approx(0.1 * 0.1 ** 3)
    assert by_name["drop80"][0]["final_lr"] == pytest.approx(0.01)
    # one seed's initialisation and batch order are the same under every schedule: equal first losses
    first = {name: statistics.fmean(r["loss_bins"][0] for r in group if r["seed"] == 3407)
             for name, group in by_name.items()}
    assert max(first.values()) - min(first.values()) < 1e-6
    out = capsys.readouterr().out
    assert "| fastface_auto | 1 |" in out and " ± " in out and "fastface_cooldown − wsd, TAR@1e-3" in out and "Precondition, task fresh, data seed 77" in out
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.main(["--report", str(rows_path)]) == 0  # the tables again, from the stored rows
    assert "Precondition, task fresh, data seed 77" in capsys.readouterr().out


@pytest.mark.parametrize("dof, table", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (10, 2.228), (14, 2.145),
                                        (20, 2.086), (30, 2.042), (120, 1.980)])
def test_student_t_quantiles_for_any_number_of_seeds(bench, dof, table):
    assert bench.t_quantile(dof) == pytest.approx(table, abs=6e-4)


@pytest.mark.parametrize("name, mode", [("fastface_cooldown", "cooldown"), ("fastface_stop", "stop")])
def test_the_benchmark_decides_as_fastfacelr_does_for_a_user(bench, name, mode):
    config = _config(bench, epochs=2)
    task = bench.build_task(config)
    row = bench.train_run(task, config, name, 3407, keep_losses=True)
    per_epoch = len(task.train_labels) // config.batch_size
    options = {"total_steps": row["budget_steps"], "mode": mode}
    if mode == "stop":
        options.update(horizon_steps=round(bench.CHOSEN["fastface_stop"]["horizon"] * per_epoch),
                       cooldown_fraction=bench.CHOSEN["fastface_stop"]["c"])
    scheduler = FastFaceLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr), "fastface",
                           **options)
    for value in row["losses"]:
        scheduler.step(value)
    assert [list(d) for d in scheduler.decisions] == row["decisions"]
    assert scheduler.ending.start == row["cooldown_start"] is not None
    assert row["final_lr"] == pytest.approx(scheduler.get_last_lr()[0], rel=1e-12)
    if mode == "stop":
        assert row["stopped"] == scheduler.should_stop and row["steps"] == scheduler.ending.end


def test_help_states_the_tasks_own_defaults(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = bench.TaskConfig()
    assert f"E (default {defaults.epochs})" in text and f"(default {defaults.weight_decay:g})" in text


def test_bad_flags_are_refused(bench):
    for argv in (["--seeds", "0"], ["--jobs", "0"], ["--image-size", "8"], ["--schedules", "nope"],
                 ["--weight-decay", "-1"], ["--schedules", "wsd@lr=2"], ["--schedules", "schedule_free@beta=2"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
