"""Hostile and broken input: decompression bombs, allocation bombs in ``.bin`` files, a full disk while
saving, tampered checkpoint state, IJB meta faults and paths leaving the IJB folder. Each ends in one message
naming the file, before memory or time is spent, and nothing under a final name is left truncated."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastface_pl.atomic import DiskFullError, write_text_atomic
from fastface_pl.checkpoints import AtomicCheckpointIO, CheckpointError, SavedStateError, restoring_from
from fastface_pl.data import FaceDataModule, RecordWriter, load_bin, write_bin
from fastface_pl.data.datamodule import check_state
from fastface_pl.data.datasets import RecordDataset, decode_image
from fastface_pl.data.errors import CorruptImageError, DatasetError, ImageTooLargeError
from fastface_pl.data.pack import main as pack_main
from fastface_pl.data.recordio import pack_header

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- inputs
def normal_jpeg(size: int = 112, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def jpeg_bomb(side: int = 20000) -> bytes:
    """A few hundred bytes: an 8 x 8 JPEG whose frame header says ``side`` x ``side``."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, start + 5, side, side)
    return bytes(data)


def png_bomb(side: int = 20000) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


class _ArrayBomb:
    """Pickles as ``numpy.ndarray((n,), 'u1')``: an allowed global asked for ``n`` bytes."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self):
        return np.ndarray, ((self.n,), "u1")


def bin_bomb(path: Path, n: int) -> Path:
    path.write_bytes(pickle.dumps(([_ArrayBomb(n), _ArrayBomb(n)], [True]), protocol=2))
    return path


# ---------------------------------------------------------------------------------------------- 1. image bombs
@pytest.mark.parametrize("bomb", [jpeg_bomb, png_bomb])
def test_a_decompression_bomb_is_refused_from_its_header(bomb):
    data = bomb()
    assert len(data) < 1000
    with pytest.raises(ImageTooLargeError, match=r"crop\.x: refused before decoding.*20000 x 20000.*1024.*"
                                                 r"data\.max_image_side"):
        decode_image(data, "crop.x")


def test_the_limit_can_be_raised_and_a_truncated_image_raises():
    data = normal_jpeg(300)
    with pytest.raises(ImageTooLargeError, match="300 x 300"):
        decode_image(data, "big.jpg", max_side=256)
    assert decode_image(data, "big.jpg", max_side=300).shape == (3, 300, 300)
    with pytest.raises(CorruptImageError, match="cut.jpg: cannot decode"):
        decode_image(data[: len(data) // 2], "cut.jpg")


def _pack(root: Path, images: list[bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with RecordWriter(root / "train.rec", root / "train.idx") as writer:
        for key, data in enumerate(images, 1):
            writer.write(key, pack_header(float(key % 2), id=key) + data)
    return root


def test_training_data_refuses_a_bomb_record_naming_it(tmp_path):
    root = _pack(tmp_path / "pack", [normal_jpeg(seed=1), jpeg_bomb(), normal_jpeg(seed=2), normal_jpeg(seed=3)])
    dataset = RecordDataset(root, num_classes=2)
    assert dataset[0][0].shape == (3, 112, 112)
    with pytest.raises(ImageTooLargeError, match=r"train\.rec key 2 \(byte offset \d+\): refused before decoding"):
        dataset[1]
    skipping = RecordDataset(root, num_classes=2, skip_corrupt=True)
    assert skipping[1][0].shape == (3, 112, 112) and skipping.num_skipped == 1
    module = FaceDataModule(str(root), batch_size=2, num_workers=0, val_sets=[], image_size=32)
    assert module.max_image_side == 1024  # 8 x image_size is smaller
    assert FaceDataModule(str(root), num_workers=0, val_sets=[], image_size=256).max_image_side == 2048


def test_packing_refuses_a_bomb_with_exit_2(tmp_path, capsys):
    src = tmp_path / "src"
    for name, data in (("a", normal_jpeg(seed=1)), ("b", png_bomb())):
        (src / name).mkdir(parents=True)
        (src / name / "0.png").write_bytes(data)
    assert pack_main([str(src), str(tmp_path / "dst"), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "b/0.png: refused before decoding" in err and "20000 x 20000" in err
    assert not (tmp_path / "dst" / "train.rec").exists()


def test_a_verification_set_refuses_a_bomb_image(tmp_path):
    path = write_bin(tmp_path / "lfw.bin", [normal_jpeg(seed=1), jpeg_bomb()], [True])
    pairs = load_bin(path)
    with pytest.raises(ImageTooLargeError, match="lfw image 1: refused before decoding"):
        pairs[0]


def test_an_ijb_crop_bomb_is_refused_naming_the_file(tmp_path):
    from fastface_pl.evaluation.ijb import IJBImages

    (tmp_path / "1.png").write_bytes(png_bomb())
    dataset = IJBImages(tmp_path, ["1.png"], np.zeros((1, 5, 2), np.float32))
    with pytest.raises(DatasetError, match=r"1\.png: refused before decoding.*20000 x 20000"):
        dataset[0]


_MEMORY_SCRIPT = textwrap.dedent("""
    import io, pickle, resource, sys
    sys.path.insert(0, {tests!r})
    from test_hostile_input import bin_bomb, jpeg_bomb, normal_jpeg, png_bomb
    from pathlib import Path
    import numpy as np
    from fastface_pl.data import load_bin
    from fastface_pl.data.datasets import FaceTransform, decode_image
    from fastface_pl.evaluation.ijb import IJBImages
    transform = FaceTransform(image_size=112)
    transform(decode_image(normal_jpeg(), "warm-up"))  # the decoders' own start-up, in both runs
    folder = Path(sys.argv[2])
    if sys.argv[1] == "normal":
        transform(decode_image(normal_jpeg(seed=1), "normal"))
    else:
        for data in (jpeg_bomb(), png_bomb()):
            try:
                decode_image(data, "bomb")
            except Exception:
                pass
        (folder / "1.png").write_bytes(png_bomb())
        try:
            IJBImages(folder, ["1.png"], np.zeros((1, 5, 2), np.float32))[0]
        except Exception:
            pass
        for n in (500_000_000, 2 ** 50):
            try:
                load_bin(bin_bomb(folder / "bomb.bin", n))
            except Exception:
                pass
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


@pytest.mark.slow
def test_peak_memory_on_the_bombs_stays_below_twice_that_of_a_normal_image(tmp_path):
    """Peak RSS of a process fed every bomb (JPEG and PNG headers of 20000 x 20000, an IJB crop, ``.bin`` files
    asking for 5e8 and 2^50 bytes) against one that decodes a normal 112 x 112 image. Before the checks the
    JPEG bomb alone took 1.2 GB, the first ``.bin`` 3.2 GB."""
    script = _MEMORY_SCRIPT.format(tests=str(ROOT / "tests"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    peaks = {}
    for kind in ("normal", "bombs"):
        folder = tmp_path / kind
        folder.mkdir()
        result = subprocess.run([sys.executable, "-c", script, kind, str(folder)], capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        peaks[kind] = int(result.stdout.split()[-1])  # KiB
    print(f"peak RSS: normal image {peaks['normal'] / 1024:.0f} MiB, bombs {peaks['bombs'] / 1024:.0f} MiB")
    assert peaks["bombs"] < 2 * peaks["normal"]
    assert peaks["bombs"] - peaks["normal"] < 64 * 1024  # and no more than 64 MiB above it, far below one bomb


# ---------------------------------------------------------------------------------------------- 2. .bin allocation bombs
@pytest.mark.parametrize("n", [500_000_000, 2 ** 50])
def test_a_bin_that_asks_for_more_than_its_size_is_refused(tmp_path, n):
    path = bin_bomb(tmp_path / "lfw.bin", n)
    assert path.stat().st_size < 120
    with pytest.raises(DatasetError, match=rf"lfw\.bin .*allocate {n:,} bytes.*more than the file itself"):
        load_bin(path)


def test_a_bin_with_a_huge_bytearray_or_dtype_is_refused(tmp_path):
    class Huge:
        def __reduce__(self):
            return bytearray, (2 ** 40,)

    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps(([Huge(), b""], [True]), protocol=2))
    with pytest.raises(DatasetError, match="bytearray"):
        load_bin(path)


# ---------------------------------------------------------------------------------------------- 3. a full disk
def _checkpoint(megabytes: float) -> dict:
    return {"state_dict": {"w": torch.ones(int(megabytes * 2 ** 18))}, "global_step": 1}


def test_a_failed_checkpoint_save_leaves_the_previous_one_and_names_path_and_space(tmp_path, monkeypatch):
    io_plugin = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io_plugin.save_checkpoint(_checkpoint(0.1), path)
    before = path.read_bytes()
    real_save = torch.save

    def save_then_fill_the_disk(obj, handle, *args, **kwargs):
        handle.write(b"x" * 1000)  # part of the file was written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    with pytest.raises(DiskFullError, match=r"cannot write the checkpoint .*last\.ckpt: no space left on the "
                                            r"device \([\d.]+ \w+ free in .*checkpoints\)"):
        io_plugin.save_checkpoint(_checkpoint(0.2), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before  # the previous checkpoint, as it was
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_results_and_text_files_are_replaced_whole(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_text_atomic(path, '{"status": "running"}')
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(DiskFullError, match="results.json: the disk quota is exceeded"):
        write_text_atomic(path, '{"status": "completed"}')
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MiB tmpfs mounted for the test (needs root or CAP_SYS_ADMIN; skipped with the reason otherwise)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command: cannot make a small file system")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'not permitted'}); the simulated "
                    "ENOSPC tests cover the same code")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_real_full_disk_keeps_the_previous_checkpoint(small_filesystem):
    io_plugin = AtomicCheckpointIO()
    path = small_filesystem / "last.ckpt"
    io_plugin.save_checkpoint(_checkpoint(0.3), path)
    before = path.read_bytes()
    with pytest.raises(DiskFullError, match=r"last\.ckpt: no space left on the device \(.* free in "):
        io_plugin.save_checkpoint(_checkpoint(0.9), path)  # fits alone, not beside the previous one
    assert path.read_bytes() == before
    assert [p.name for p in small_filesystem.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["state_dict"]["w"].numel() == int(0.3 * 2 ** 18)


# ---------------------------------------------------------------------------------------------- 4. tampered state
@pytest.mark.parametrize("state, named", [
    ({"seed": 1, "num_skipped": 0, "epoch": 0, "batches_done": -3, "epoch_finished": False}, "batches_done=-3"),
    ({"seed": 1, "num_skipped": 0, "epoch": 0, "batches_done": 1e6, "epoch_finished": False}, "batches_done=1000000.0"),
    ({"seed": 1, "num_skipped": 0, "epoch": "zero", "batches_done": 0, "epoch_finished": False}, "epoch='zero'"),
    ({"seed": 1, "num_skipped": 0, "epoch": 0}, "no batches_done"),
    ({"seed": 1, "num_skipped": 0, "epoch": 0, "batches_done": 2, "epoch_finished": "x"}, "epoch_finished='x'"),
    (["not", "a", "dict"], "a list"),
])
def test_the_data_module_rejects_a_tampered_state(state, named):
    with pytest.raises(SavedStateError, match=named):
        check_state(state)
    with pytest.raises(SavedStateError, match=named):
        FaceDataModule("synthetic", num_workers=0).load_state_dict(state)


def test_a_position_beyond_the_epoch_is_rejected_when_the_loader_is_built():
    module = FaceDataModule("synthetic", batch_size=4, num_workers=0,
                            synthetic={"num_identities": 4, "images_per_identity": 4, "image_size": 8})
    module.load_state_dict({"seed": 1, "num_skipped": 0, "epoch": 0, "batches_done": 1000, "epoch_finished": False})
    with pytest.raises(SavedStateError, match="1000 batches of epoch 0.*has 4 batches"):
        module.train_dataloader()


def test_restoring_from_names_the_file_for_a_rejected_state():
    with pytest.raises(CheckpointError, match=r"checkpoint run/last\.ckpt holds a state this run cannot restore: "
                                              r"the data module's saved state has epoch='zero'"):
        with restoring_from("run/last.ckpt"):
            check_state({"epoch": "zero", "batches_done": 0})
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass through unchanged
        with restoring_from("run/last.ckpt"):
            raise ValueError("unrelated")


# ---------------------------------------------------------------------------------------------- 9, 10. IJB meta
def _ijb(tmp_path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_ijb import make_ijb_folder

    return make_ijb_folder(tmp_path, num_images=12, num_templates=4)


def _edit(path: Path, line: int, change) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = change(lines[line - 1])
    path.write_text("\n".join(lines) + "\n")


def _field(index: int, value: str):
    def change(line: str) -> str:
        fields = line.split()
        fields[index] = value
        return " ".join(fields)
    return change


@pytest.mark.parametrize("file, line, change, message", [
    ("ijbc_name_5pts_score.txt", 3, _field(11, "-0.5"), r"ijbc_name_5pts_score\.txt:3: the detector score -0\.5 is "
                                                        "negative"),
    ("ijbc_name_5pts_score.txt", 4, _field(11, "nan"), r"ijbc_name_5pts_score\.txt:4: a landmark or the score is not "
                                                       "finite"),
    ("ijbc_name_5pts_score.txt", 5, _field(2, "abc"), r"ijbc_name_5pts_score\.txt:5: the landmarks and the score must "
                                                      "be numbers"),
    ("ijbc_template_pair_label.txt", 2, _field(2, "2"), r"ijbc_template_pair_label\.txt:2: the pair label is 2"),
    ("ijbc_template_pair_label.txt", 3, _field(0, "999"), r"ijbc_template_pair_label\.txt:3: template 999 or .* has "
                                                          "no image"),
    ("ijbc_face_tid_mid.txt", 2, _field(1, "x"), r"ijbc_face_tid_mid\.txt:2: template and media ids must be "
                                                 "integers"),
])
def test_ijb_meta_faults_are_named_by_file_and_line_before_any_image(tmp_path, file, line, change, message):
    folder = _ijb(tmp_path)
    _edit(folder / "meta" / file, line, change)

    def no_images(_):
        raise AssertionError("an image was read before the meta files were checked")

    with pytest.raises(DatasetError, match=message):
        evaluate_ijb_no_images = __import__("fastface_pl.evaluation.ijb", fromlist=["evaluate_ijb"]).evaluate_ijb
        evaluate_ijb_no_images(no_images, folder, tmp_path / "out", num_workers=0, progress=False)


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.jpg", "sub/../../outside.jpg"])
def test_an_ijb_image_path_leaving_the_folder_is_refused(tmp_path, name):
    from fastface_pl.evaluation.ijb import read_ijb_meta

    folder = _ijb(tmp_path)
    for file in ("ijbc_name_5pts_score.txt", "ijbc_face_tid_mid.txt"):
        _edit(folder / "meta" / file, 2, _field(0, name))
    with pytest.raises(DatasetError, match=r"ijbc_name_5pts_score\.txt:2: the image .* is not a path inside "
                                           "loose_crop/"):
        read_ijb_meta(folder)


# ---------------------------------------------------------------------------------------------- 5, 7, 8, 12
def test_a_pack_of_mixed_image_sizes_names_the_record_or_is_resized(tmp_path):
    root = _pack(tmp_path / "pack", [normal_jpeg(112, 1), normal_jpeg(112, 2), normal_jpeg(96, 3), normal_jpeg(112, 4)])
    dataset = RecordDataset(root, num_classes=2)
    dataset[0]
    with pytest.raises(DatasetError, match=r"train\.rec key 3 \(byte offset \d+\): the image is 96 x 96 pixels, "
                                           r"other images .* are 112 x 112.*data\.image_size"):
        dataset[2]
    module = FaceDataModule(str(root), batch_size=4, num_workers=0, val_sets=[], image_size=112, flip=False)
    images, _ = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 112, 112)


def test_one_identity_is_refused():
    module = FaceDataModule("synthetic", batch_size=4, num_workers=0,
                            synthetic={"num_identities": 1, "images_per_identity": 8, "image_size": 8})
    with pytest.raises(DatasetError, match="holds 1 identity: a margin softmax over one class learns nothing"):
        module.setup("fit")


def test_a_bin_with_no_pair_is_refused_and_one_kind_of_pair_warns(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(pickle.dumps(([], []), protocol=2))
    with pytest.raises(DatasetError, match=r"empty\.bin holds no pairs"):
        load_bin(empty)
    genuine = write_bin(tmp_path / "genuine.bin", [normal_jpeg(seed=i) for i in range(4)], [True, True])
    with pytest.warns(UserWarning, match=r"genuine\.bin: all 2 pairs are genuine pairs.*VAL@FAR is undefined"):
        load_bin(genuine)


@pytest.mark.parametrize("index, problem", [
    ("1\t0\n99999999999999999999\t100\n", r"line 2 holds a key or offset beyond the 64-bit range"),
    ("1\t0\n2\t0\n", r"keys 1 and 2 point at the same byte offset 0"),
])
def test_a_corrupt_idx_is_named(tmp_path, index, problem):
    from fastface_pl.data.recordio import RecordFile

    root = _pack(tmp_path / "pack", [normal_jpeg(seed=1), normal_jpeg(seed=2)])
    (root / "train.idx").write_text(index)
    with pytest.raises(DatasetError, match=rf"train\.idx: {problem}"):
        RecordFile(root / "train.rec")


def test_packing_into_the_source_folder_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "0.jpg").write_bytes(normal_jpeg())
    assert pack_main([str(src), str(src / "packed"), "--workers", "0", "--no-progress"]) == 2
    assert "lies inside the source folder" in capsys.readouterr().err
    assert not (src / "packed").exists()
