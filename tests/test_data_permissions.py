"""Data the training process may not read gives one clear error naming the path and the fix (a DatasetError,
exit code 2 from the train command), whichever file or folder it is: the data root, an identity folder, the
record or index file, a verification ``.bin``, an image; and the packer says when it may not write.

Permissions are taken away with ``chmod``; where that has no effect (tests running as root, as here and in CI),
the calls that read or list a denied path raise the ``PermissionError`` the kernel would (:func:`deny`).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pytest
from PIL import Image

from fastface_pl.data import CorruptImageError, DatasetError, FaceDataModule, ImageFolderDataset, load_bin, write_bin
from fastface_pl.data.pack import main as pack_main
from fastface_pl.data.pack import pack_folder


def deny(paths: Iterable[os.PathLike], monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Take all permissions away from ``paths`` (files or folders), as ``chmod 000`` does for a normal user.

    Tries ``chmod`` first; where the paths stay readable (root), patches ``os.stat``, ``os.scandir``,
    ``os.listdir``, ``os.open`` and ``open`` to raise ``EACCES`` as the kernel would: a denied folder cannot be
    listed and nothing below it can be reached; a denied file cannot be opened (both can still be ``stat``-ed
    themselves). Returns the ``(path, mode)`` pairs to restore.
    """
    denied = [os.path.abspath(p) for p in paths]
    modes = [(path, os.stat(path).st_mode) for path in denied]
    for path in denied:
        os.chmod(path, 0)
    if not any(_readable(path) for path in denied):
        return modes

    def check(path, itself: bool) -> None:
        if isinstance(path, int):
            return
        target = os.path.abspath(os.fsdecode(os.fspath(path)))
        for d in denied:
            if (itself and target == d) or target.startswith(d + os.sep):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def guarded(function: Callable, itself: bool) -> Callable:
        def call(path=".", *args, **kwargs):
            check(path, itself)
            return function(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "stat", guarded(os.stat, itself=False))
    for name in ("scandir", "listdir", "open"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name), itself=True))
    opener = guarded(builtins.open, itself=True)
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)
    return modes


def _readable(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY))
        if os.path.isdir(path):
            with os.scandir(path):
                pass
    except PermissionError:
        return False
    return True


@pytest.fixture
def denied(monkeypatch) -> Callable[..., None]:
    """``denied(path, ...)`` takes the permissions away for this test (given back at teardown)."""
    modes: list[tuple[str, int]] = []
    yield lambda *paths: modes.extend(deny(paths, monkeypatch))
    for path, mode in reversed(modes):
        os.chmod(path, mode)


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    """``webface/faces/<id>/<n>.jpg`` + ``webface/lfw.bin``, and the same packed into ``pack/`` + ``pack/lfw.bin``."""
    rng = np.random.default_rng(0)
    faces = tmp_path / "webface" / "faces"
    for identity in ("id0", "id1", "id2"):
        (faces / identity).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(faces / identity / f"{i}.jpg")
    pairs = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    write_bin(faces.parent / "lfw.bin", pairs, [True, False])
    pack_folder(faces, tmp_path / "pack", progress=False)
    write_bin(tmp_path / "pack" / "lfw.bin", pairs, [True, False])
    return {"faces": faces, "pack": tmp_path / "pack"}


def _error(root: Path, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        dm = FaceDataModule(str(root), batch_size=4, num_workers=0, **kwargs)
        dm.prepare_data()
        dm.setup("fit")
    return str(info.value)


@pytest.mark.parametrize("layout", ["faces", "pack"])
def test_an_unreadable_data_root_is_named_with_the_fix(data, denied, layout):
    denied(data[layout])
    message = _error(data[layout])
    assert f"cannot read the data root {data[layout]}: Permission denied" in message
    assert f"chmod -R a+rX {data[layout]}`" in message


def test_an_unreadable_identity_folder_is_named(data, denied):
    denied(data["faces"] / "id1")
    message = _error(data["faces"], val_sets=[])
    assert f"cannot read the identity folder {data['faces'] / 'id1'}: Permission denied" in message
    assert "chmod" in message
    with pytest.raises(DatasetError, match="cannot read the identity folder .*id1"):
        ImageFolderDataset(data["faces"], rebuild_index=True)  # the walk, after the layout check


@pytest.mark.parametrize("name, what", [("train.rec", "record file"), ("train.idx", "index file")])
def test_unreadable_record_files_are_named(data, denied, name, what):
    denied(data["pack"] / name)
    message = _error(data["pack"], val_sets=[])
    assert f"cannot read the {what} {data['pack'] / name}: Permission denied" in message and "chmod" in message


@pytest.mark.parametrize("layout", ["faces", "pack"])
def test_an_unreadable_verification_set_is_named(data, denied, layout):
    where = data[layout].parent if layout == "faces" else data[layout]
    denied(where / "lfw.bin")
    message = _error(data[layout], val_sets=["lfw"])
    assert f"cannot read the verification set {where / 'lfw.bin'}: Permission denied" in message
    with pytest.raises(DatasetError, match="cannot read the verification set"):
        load_bin(where / "lfw.bin")


def test_an_unreadable_image_is_named_and_can_be_skipped(data, denied):
    strict = ImageFolderDataset(data["faces"])
    lenient = ImageFolderDataset(data["faces"], skip_corrupt=True)
    denied(data["faces"] / "id1" / "2.jpg")
    with pytest.raises(CorruptImageError) as info:
        strict[6]
    assert f"cannot read the image {data['faces'] / 'id1' / '2.jpg'}: Permission denied" in str(info.value)
    lenient[6]
    assert lenient.num_skipped == 1


def test_the_packer_names_what_it_cannot_read_or_write(data, tmp_path, denied, capsys):
    (tmp_path / "out").mkdir()
    denied(data["faces"] / "id2", tmp_path / "out")
    assert pack_main([str(data["faces"]), str(tmp_path / "elsewhere"), "--workers", "0", "--no-progress"]) == 2
    assert f"cannot read the identity folder {data['faces'] / 'id2'}: Permission denied" in capsys.readouterr().err
    with pytest.raises(DatasetError, match=r"cannot write the pack folder .*out.*chmod u\+w"):
        pack_folder(data["faces"], tmp_path / "out", progress=False)


@pytest.mark.slow
def test_the_train_command_exits_2_with_the_message(data, tmp_path):
    """End to end: ``python -m fastface_pl.train`` on a pack it may not read (denied as in :func:`deny`)."""
    denied = data["pack"]
    program = textwrap.dedent(f"""
        import runpy, sys
        import pytest
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_data_permissions import deny
        deny([{str(denied)!r}], pytest.MonkeyPatch())
        sys.argv = ["fastface_pl.train", "data=insightface", "data.root={data['pack']}", "data.val_sets=[lfw]",
                    "data.batch_size=4", "data.num_workers=0", "model=demo", "trainer.max_epochs=1", "plot=false",
                    "loggers=[csv]", "hydra.run.dir={tmp_path / 'run'}"]
        runpy.run_module("fastface_pl.train", run_name="__main__", alter_sys=True)
    """)
    env = {k: v for k, v in os.environ.items() if k != "FASTFACE_DATA_ROOT"}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"fastface_pl.train: error: cannot read the data root {denied}: Permission denied" in result.stderr
    assert "chmod" in result.stderr and "Traceback" not in result.stderr
