"""What several test files share: image folders on disk, and the train and evaluate commands run as a user runs them.

Plain functions, imported by the tests that need them (``from conftest import run_train``): module-level
fixtures and helpers call them as well as tests do; and the fixture ``listed``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import pytest
import torch
from PIL import Image

from fastface_pl.data.datasets import SyntheticFaceGenerator


def write_image_folder(root: Path, counts: Union[Mapping[str, int], Sequence[int]], *, size: int = 16, seed: int = 0,
                       smooth: bool = False, png_first: bool = False) -> Path:
    """An image folder ``<root>/<identity>/<nnn>.jpg`` of random images; returns ``root``.

    ``counts`` maps identity name -> images, or lists the image counts of ``id00``, ``id01`` … . ``smooth``:
    random 3x3 colours scaled up (they survive JPEG); else pixel noise. ``png_first``: image 000 is a PNG.
    Writing into an existing identity replaces its files of the same number.
    """
    if not isinstance(counts, Mapping):
        counts = {f"id{k:02d}": count for k, count in enumerate(counts)}
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            if smooth:
                image = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((size, size),
                                                                                                  Image.BILINEAR)
            else:
                image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            image.save(root / name / f"{i:03d}.{'png' if png_first and i == 0 else 'jpg'}", quality=92)
    return root


def write_face_folder(folder: Path, identities: int, per_identity: int, *, size: int, seed: int,
                      noise: float) -> SyntheticFaceGenerator:
    """An image folder ``<folder>/id<nnn>/<n>.jpg`` of synthetic faces (JPEG q95); returns their generator, whose
    ``render(identity, sample)`` with later samples gives held-out images of the same identities."""
    generator = SyntheticFaceGenerator(image_size=size, seed=seed, noise=noise)
    for identity in range(identities):
        (folder / f"id{identity:03d}").mkdir(parents=True)
        for sample in range(per_identity):
            image = generator.render(identity, sample).permute(1, 2, 0).numpy()
            Image.fromarray(image, "RGB").save(folder / f"id{identity:03d}" / f"{sample}.jpg", quality=95)
    return generator


@pytest.fixture
def listed(monkeypatch) -> list[str]:
    """The folders listed with ``os.scandir`` from now on (the image-folder index avoids listing them again)."""
    calls: list[str] = []
    real_scandir = os.scandir

    def recording_scandir(path="."):
        calls.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", recording_scandir)
    return calls


@pytest.fixture
def host_reads(monkeypatch) -> list[int]:
    """The sizes of the tensors read to the host with ``Tensor.tolist`` from now on (the loss reader's block reads)."""
    reads: list[int] = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        reads.append(self.numel())
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    return reads


def command_env() -> dict[str, str]:
    """The environment of a command run by a test: no dataset from the user's environment, no warnings."""
    env = {k: v for k, v in os.environ.items() if k != "FASTFACE_DATA_ROOT"}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_python(*args: str, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python <args>`` as a user runs it (a subprocess of this interpreter), its output captured."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=command_env(),
                          timeout=timeout, cwd=cwd)


def train_command(run_dir: Path | None, *overrides: str) -> list[str]:
    """``python -m fastface_pl.train hydra.run.dir=<run_dir> <overrides>`` (no ``hydra.run.dir`` for None)."""
    return [sys.executable, "-m", "fastface_pl.train", *([f"hydra.run.dir={run_dir}"] if run_dir else []), *overrides]


def run_train(run_dir: Path | None, *overrides: str, timeout: int = 600, cwd: Path | None = None
              ) -> subprocess.CompletedProcess:
    """Run :func:`train_command`, its output captured."""
    return subprocess.run(train_command(run_dir, *overrides), capture_output=True, text=True, env=command_env(),
                          timeout=timeout, cwd=cwd)


def explain(result: subprocess.CompletedProcess) -> str:
    """A failed command's exit code and the ends of its output, for an assertion message."""
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"

