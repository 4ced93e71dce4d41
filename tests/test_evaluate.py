"""``python -m fastface_pl.evaluate``: a checkpoint or raw backbone weights, a folder holding only ``lfw.bin``,
and one clear error (exit 2, nothing executed) for every file that is not a usable checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from fastface_pl.data import write_bin
from fastface_pl.data.datamodule import FaceDataModule
from fastface_pl.data.datasets import SyntheticFaceGenerator
from fastface_pl.evaluate import main
from fastface_pl.models.module import FaceRecognitionModule
from test_checkpoints import bad_files

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint of the tiny demo model (a few steps), its backbone as a raw state dict, and a folder that
    holds nothing but ``lfw.bin``."""
    base = tmp_path_factory.mktemp("evaluate")
    datamodule = FaceDataModule("synthetic", batch_size=16, num_workers=0,
                                synthetic={"num_identities": 12, "images_per_identity": 4, "image_size": SIZE,
                                           "num_val_pairs": 20, "unseen_identities": 4})
    module = FaceRecognitionModule(num_classes=12, backbone="tiny", backbone_kwargs={"input_size": SIZE},
                                   embedding_size=64, margin="cosface", margin_kwargs={"s": 32.0, "m": 0.35}, lr=0.1)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
                         default_root_dir=base)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(base / "model.ckpt")
    torch.save(module.backbone.state_dict(), base / "backbone.pth")
    bins = base / "bins_only"
    bins.mkdir()
    generator = SyntheticFaceGenerator(image_size=SIZE, seed=5, noise=4.0)
    images, issame = [], []
    for pair in range(20):
        a = pair % 6
        b = a if pair % 2 == 0 else (a + 1) % 6
        images += [generator.render(a, 50 + 2 * pair), generator.render(b, 51 + 2 * pair)]
        issame.append(a == b)
    write_bin(bins / "lfw.bin", images, issame)
    return {"ckpt": base / "model.ckpt", "raw": base / "backbone.pth", "bins": bins}


def _evaluate(*args: str, out: Path | None = None) -> tuple[int, dict]:
    argv = [*args, "--num-workers", "0", "--accelerator", "cpu"] + (["--json", str(out)] if out else [])
    code = main(argv)
    return code, (json.loads(out.read_text()) if out and code == 0 else {})


def test_a_folder_holding_only_lfw_bin_is_enough(trained, tmp_path):
    code, per_set = _evaluate(str(trained["ckpt"]), "--data", str(trained["bins"]), "--sets", "lfw",
                              out=tmp_path / "r.json")
    assert code == 0 and list(per_set) == ["lfw"] and 0.0 <= per_set["lfw"]["accuracy"] <= 1.0
    code, every = _evaluate(str(trained["ckpt"]), "--data", str(trained["bins"]), out=tmp_path / "all.json")
    assert code == 0 and every == per_set  # without --sets: every .bin in the folder


def test_raw_backbone_weights_give_the_checkpoints_numbers(trained, tmp_path):
    _, from_checkpoint = _evaluate(str(trained["ckpt"]), "--data", str(trained["bins"]), out=tmp_path / "a.json")
    code, from_raw = _evaluate(str(trained["raw"]), "--backbone", "tiny", "--input-size", str(SIZE), "--data",
                               str(trained["bins"]), out=tmp_path / "b.json")
    assert code == 0 and from_raw == from_checkpoint  # embedding size read from the weights (fc: 64)


def test_the_checkpoints_own_synthetic_pairs(trained, tmp_path):
    code, per_set = _evaluate(str(trained["ckpt"]), out=tmp_path / "r.json")
    assert code == 0 and list(per_set) == ["synthetic"]


def test_raw_weights_need_a_backbone_that_fits(trained, capsys):
    assert _evaluate(str(trained["raw"]), "--data", str(trained["bins"]))[0] == 2
    assert "give --backbone" in capsys.readouterr().err
    assert _evaluate(str(trained["raw"]), "--backbone", "r18", "--data", str(trained["bins"]))[0] == 2
    err = capsys.readouterr().err
    assert "do not fit --backbone r18" in err and "missing key(s)" in err and "size mismatch" in err


def test_missing_sets_are_named(trained, capsys):
    assert _evaluate(str(trained["ckpt"]), "--data", str(trained["bins"]), "--sets", "cfp_fp")[0] == 2
    err = capsys.readouterr().err
    assert "cfp_fp.bin" in err and "['lfw']" in err


@pytest.mark.parametrize("kind", ["truncated", "random", "text", "empty", "crafted", "crafted_legacy", "bin"])
def test_a_bad_file_is_exit_2_with_one_message(trained, tmp_path, capsys, kind):
    path, phrase = bad_files(tmp_path)[kind]
    assert _evaluate(str(path), "--data", str(trained["bins"]))[0] == 2
    err = capsys.readouterr().err
    assert phrase in err and err.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_the_command_never_runs_a_crafted_checkpoint(trained, tmp_path):
    path, _ = bad_files(tmp_path)["crafted"]
    env = {k: v for k, v in os.environ.items() if k != "FASTFACE_DATA_ROOT"}
    result = subprocess.run([sys.executable, "-m", "fastface_pl.evaluate", str(path), "--data", str(trained["bins"])],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "refused" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ran").exists()
