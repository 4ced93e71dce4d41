"""Weights-only loading with one clear error per bad file, the newest checkpoint of a run, raw backbone weights."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastface_pl.checkpoints import (
    CheckpointError, checkpoint_candidates, describe_load_error, differing_hyperparameters, load_backbone_weights,
    load_checkpoint, load_lightning_checkpoint, newest_checkpoint,
)
from fastface_pl.data import write_bin


class RunsACommand:
    """A pickle payload that would create ``marker`` when unpickled by an unrestricted loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _lightning_like(tmp_path: Path, name: str = "good.ckpt", step: int = 7) -> Path:
    path = tmp_path / name
    torch.save({"state_dict": {"backbone.w": torch.ones(3), "classifier.w": torch.zeros(2)}, "global_step": step,
                "epoch": 0, "hyper_parameters": {"lr": 0.1, "backbone": "tiny"},
                "datamodule_hyper_parameters": {"root": Path("/data/x")}}, path)
    return path


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its error must contain)."""
    good = _lightning_like(tmp_path)
    data = good.read_bytes()
    marker = tmp_path / "ran"
    files = {
        "truncated": (data[: len(data) // 2], "truncated"),
        "random": (np.random.default_rng(0).bytes(4096), "not a torch checkpoint"),
        "text": (b"model weights: see the attached link\n", "holds text"),
        "empty": (b"", "empty"),
    }
    out = {}
    for name, (content, phrase) in files.items():
        (tmp_path / f"{name}.ckpt").write_bytes(content)
        out[name] = (tmp_path / f"{name}.ckpt", phrase)
    torch.save({"state_dict": {}, "global_step": 1, "payload": RunsACommand(marker)}, tmp_path / "crafted.ckpt")
    out["crafted"] = (tmp_path / "crafted.ckpt", "refused")
    with open(tmp_path / "crafted_legacy.pth", "wb") as f:
        pickle.dump({"w": RunsACommand(marker)}, f, protocol=2)
    out["crafted_legacy"] = (tmp_path / "crafted_legacy.pth", "refused")
    image = np.zeros((16, 16, 3), np.uint8)
    write_bin(tmp_path / "lfw.bin", [image] * 4, [True, False])
    out["bin"] = (tmp_path / "lfw.bin", "verification set (.bin)")
    (tmp_path / "renamed_bin.ckpt").write_bytes((tmp_path / "lfw.bin").read_bytes())
    out["bin_renamed"] = (tmp_path / "renamed_bin.ckpt", "verification set (.bin)")
    return out


@pytest.mark.parametrize("kind", ["truncated", "random", "text", "empty", "crafted", "crafted_legacy", "bin",
                                  "bin_renamed"])
def test_a_bad_file_is_one_clear_error_and_runs_nothing(tmp_path, kind):
    path, phrase = bad_files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as info:
        load_lightning_checkpoint(path)
    assert str(path) in str(info.value) and phrase in str(info.value)
    assert not (tmp_path / "ran").exists()  # the crafted pickle's command never ran


def test_the_crafted_file_would_run_a_command_without_weights_only(tmp_path):
    """The payload is real: torch's unrestricted loader runs it (so the test above tests something)."""
    path, _ = bad_files(tmp_path)["crafted"]
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").exists()


def test_a_lightning_checkpoint_loads_with_a_path_in_its_hyperparameters(tmp_path):
    checkpoint = load_lightning_checkpoint(_lightning_like(tmp_path))
    assert checkpoint["global_step"] == 7 and checkpoint["datamodule_hyper_parameters"]["root"] == Path("/data/x")
    assert torch.equal(checkpoint["state_dict"]["backbone.w"], torch.ones(3))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.ckpt")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)


def test_raw_weights_are_not_a_training_checkpoint(tmp_path):
    torch.save({"conv.weight": torch.ones(2)}, tmp_path / "backbone.pth")
    with pytest.raises(CheckpointError, match="raw weights"):
        load_lightning_checkpoint(tmp_path / "backbone.pth")


def test_backbone_weights_from_raw_ddp_and_lightning_files(tmp_path):
    torch.save({"module.conv.weight": torch.ones(2), "module.fc.weight": torch.ones(4, 2)}, tmp_path / "ddp.pth")
    state, hparams = load_backbone_weights(tmp_path / "ddp.pth")
    assert sorted(state) == ["conv.weight", "fc.weight"] and hparams is None
    state, hparams = load_backbone_weights(_lightning_like(tmp_path))
    assert list(state) == ["w"] and hparams == {"lr": 0.1, "backbone": "tiny"}
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_backbone_weights(tmp_path / "list.pth")


def test_newest_checkpoint_passes_over_a_corrupt_newest_file(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    older = _lightning_like(run / "checkpoints", "step0000005.ckpt", step=5)
    newer = _lightning_like(run / "checkpoints", "step0000010.ckpt", step=10)
    cut = run / "checkpoints" / "interrupted-step0000012.ckpt"
    cut.write_bytes(newer.read_bytes()[:100])  # a save cut short
    now = time.time()
    for i, path in enumerate((older, newer, cut)):
        os.utime(path, (now + i, now + i))
    assert checkpoint_candidates(run) == [cut, newer, older]
    skipped: list = []
    path, checkpoint = newest_checkpoint(run, skipped=skipped)
    assert path == newer and checkpoint["global_step"] == 10
    assert skipped and skipped[0][0] == cut and "truncated" in skipped[0][1]
    assert newest_checkpoint(tmp_path / "empty-run") is None


def test_differing_hyperparameters_by_dotted_key():
    saved = {"lr": 0.1, "margin_kwargs": {"s": 32.0, "m": 0.35}, "backbone": "tiny", "flag": True}
    current = {"lr": 0.05, "margin_kwargs": {"s": 32, "m": 0.3}, "backbone": "tiny", "flag": 1}
    assert differing_hyperparameters(saved, current) == [
        ("flag", True, 1), ("lr", 0.1, 0.05), ("margin_kwargs.m", 0.35, 0.3)]


def test_describe_load_error_counts_keys():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    with pytest.raises(RuntimeError) as info:
        net.load_state_dict({"0.weight": torch.ones(4, 2), "0.bias": torch.ones(3), "9.x": torch.ones(1)})
    text = describe_load_error(info.value)
    assert "2 missing key(s) (1.weight, 1.bias)" in text and "1 unexpected key(s) (9.x)" in text
    assert "1 size mismatch(es)" in text and "0.weight" in text
