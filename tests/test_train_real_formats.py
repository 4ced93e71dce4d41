"""Training on real file formats end to end, as a user does it: an image folder of JPEGs, packed with the pack
command into ``train.rec``/``train.idx``, an ``lfw.bin`` beside it, then ``python -m fastface_pl.train`` on the
pack and on the folder, ``python -m fastface_pl.evaluate`` on the checkpoint, and the errors a user meets
(a corrupt record, a wrong ``model.num_classes``). Subprocesses on the CPU, tiny model and data.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import explain, run_python, write_face_folder

from fastface_pl.data import RecordFile, write_bin

pytestmark = pytest.mark.slow

IDENTITIES = 12
IMAGES_PER_IDENTITY = 6
SIZE = 32  # the demo model's input_size
NUM_PAIRS = 20


def _train(root: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    if not any(e.startswith("data.num_workers=") for e in extra):
        extra = ("data.num_workers=0", *extra)
    return run_python(
        "-m", "fastface_pl.train", "data=insightface", f"data.root={root}", "data.val_sets=[lfw]",
        "data.batch_size=8", "model=demo", "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "plot=false", "loggers=[csv]",
        f"hydra.run.dir={run_dir}", *extra,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    """``webface/faces/<id>/<n>.jpg`` + ``webface/lfw.bin``, packed into ``pack/train.rec`` + ``pack/lfw.bin``."""
    base = tmp_path_factory.mktemp("real_formats")
    faces = base / "webface" / "faces"
    generator = write_face_folder(faces, IDENTITIES, IMAGES_PER_IDENTITY, size=SIZE, seed=11, noise=4.0)
    # held-out images (samples not in the folder) for the verification pairs, half genuine
    images, issame = [], []
    for pair in range(NUM_PAIRS):
        a = pair % IDENTITIES
        b = a if pair % 2 == 0 else (a + 1 + pair // 2) % IDENTITIES
        images += [generator.render(a, 100 + 2 * pair), generator.render(b, 101 + 2 * pair)]
        issame.append(a == b)
    pack = base / "pack"
    result = run_python("-m", "fastface_pl.data.pack", str(faces), str(pack), "--workers", "0", "--no-progress")
    assert result.returncode == 0, explain(result)
    assert f"packed {IDENTITIES * IMAGES_PER_IDENTITY} images of {IDENTITIES} identities" in result.stdout
    write_bin(pack / "lfw.bin", images, issame)
    write_bin(faces.parent / "lfw.bin", images, issame)  # an image folder's sets live one level up
    return {"base": base, "faces": faces, "pack": pack}


def _check_run(run_dir: Path, result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, explain(result)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    summary = json.loads((run_dir / "results.json").read_text())
    steps_per_epoch = IDENTITIES * IMAGES_PER_IDENTITY // 8
    assert summary["global_step"] == 2 * steps_per_epoch
    accuracy = summary["verification"]["lfw"]["accuracy"]
    assert f"{100 * accuracy:.2f}" in result.stdout  # the printed table shows what results.json holds
    return summary


@pytest.fixture(scope="module")
def record_run(dataset, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("rec_run") / "run"
    return run_dir, _train(dataset["pack"], run_dir)


def test_pack_has_the_insightface_layout(dataset):
    rec = RecordFile(dataset["pack"] / "train.rec")
    assert len(rec) == 1 + IDENTITIES * IMAGES_PER_IDENTITY + IDENTITIES  # header + images + identity records
    assert (dataset["pack"] / "property").read_text().strip() == f"{IDENTITIES},{SIZE},{SIZE}"


def test_train_on_a_record_pack(record_run):
    run_dir, result = record_run
    _check_run(run_dir, result)


def test_train_on_an_image_folder(dataset, tmp_path):
    run_dir = tmp_path / "run"
    result = _train(dataset["faces"], run_dir)
    _check_run(run_dir, result)
    assert (dataset["faces"] / ".fastface_cache" / "image_index.bin").is_file()  # the file index is cached beside the images


def test_evaluate_a_checkpoint_on_the_pack(dataset, record_run, tmp_path):
    run_dir, result = record_run
    assert result.returncode == 0, explain(result)
    out_json = tmp_path / "eval.json"
    evaluation = run_python(
        "-m", "fastface_pl.evaluate", str(run_dir / "checkpoints" / "last.ckpt"), "--data", str(dataset["pack"]),
        "--sets", "lfw", "--num-workers", "0", "--accelerator", "cpu", "--json", str(out_json),
    )
    assert evaluation.returncode == 0, explain(evaluation)
    assert "accuracy" in evaluation.stdout and "\nlfw " in evaluation.stdout
    per_set = json.loads(out_json.read_text())
    trained = json.loads((run_dir / "results.json").read_text())["verification"]["lfw"]
    assert set(per_set) == {"lfw"}
    assert per_set["lfw"]["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-6)  # same weights, same pairs


def _corrupt_copy(dataset, tmp_path: Path, position: str) -> tuple[Path, int, int]:
    """A copy of the pack with one image record in the middle damaged: its ``magic`` or its JPEG's first bytes."""
    pack = tmp_path / "pack"
    pack.mkdir()
    for name in ("train.rec", "train.idx", "lfw.bin"):
        (pack / name).write_bytes((dataset["pack"] / name).read_bytes())
    key = IDENTITIES * IMAGES_PER_IDENTITY // 2
    offset = RecordFile(pack / "train.rec").offset(key)
    where = offset if position == "magic" else offset + 8 + 24  # part header (8) + image header (24): the JPEG
    with open(pack / "train.rec", "r+b") as handle:
        handle.seek(where)
        handle.write(b"\x00\x11\x22\x33\x44\x55\x66\x77")
    return pack, key, offset


def test_a_corrupt_record_stops_training_naming_file_key_and_offset(dataset, tmp_path):
    pack, key, offset = _corrupt_copy(dataset, tmp_path, "magic")
    result = _train(pack, tmp_path / "run")
    assert result.returncode == 2, explain(result)
    assert f"key {key}" in result.stderr and f"byte offset {offset}" in result.stderr
    assert "train.rec" in result.stderr and "bad magic number" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", [0, 1])
def test_an_undecodable_image_stops_training_naming_its_record(dataset, tmp_path, workers):
    pack, key, offset = _corrupt_copy(dataset, tmp_path, "jpeg")
    result = _train(pack, tmp_path / "run", f"data.num_workers={workers}")
    assert result.returncode == 2, explain(result)  # also from a worker (it re-raises the same error type)
    assert f"key {key} (byte offset {offset})" in result.stderr and "cannot decode image" in result.stderr
    assert "CorruptImageError" in result.stderr or workers == 0


def test_num_classes_mismatch_is_a_clear_error(dataset, tmp_path):
    result = _train(dataset["pack"], tmp_path / "run", "model.num_classes=99")
    assert result.returncode == 2, explain(result)
    assert "model.num_classes=99" in result.stderr and f"has {IDENTITIES} identities" in result.stderr
    assert "Traceback" not in result.stderr
