"""Nothing a user has is lost, and nothing received is trusted: packs and run folders under real kills
and a second writer, pack headers, image files and index caches that claim too much, odd pixel formats, and the
messages and exit codes of the commands. Each test uses small generated files; the kills are real SIGKILLs of real
processes."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import command_env, explain, run_python, run_train, train_command, write_image_folder
from PIL import Image

from fastface_pl.data import FaceDataModule, RecordWriter, load_bin, write_bin
from fastface_pl.data.datasets import ImageFolderDataset, RecordDataset, decode_image
from fastface_pl.data.errors import CorruptImageError, DatasetError, ImageTooLargeError
from fastface_pl.data.folder_index import INDEX_CACHE_NAME, FolderIndex, _write_cache, folder_mtimes, root_entries
from fastface_pl.data.pack import main as pack_main
from fastface_pl.data.pack import pack_folder
from fastface_pl.data.recordio import RecordFile, pack_header, parse_layout
from fastface_pl.evaluate import main as evaluate_main
from fastface_pl.evaluate import verification_sets

HOUR_NS = 3600 * 10**9


# ---------------------------------------------------------------------------------------------- helpers
def _start_python(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=command_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}) before {path} appeared:\n"
                                 f"{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.1)


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _pack_contents(dst: Path) -> tuple[int, int, str]:
    dataset = RecordDataset(dst)
    labels = [dataset[i][1] for i in range(len(dataset))]  # every image decodes
    return len(dataset), len(set(labels)), (dst / "property").read_text()


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (grey ``[H, W]`` or RGB ``[H, W, 3]``) written by hand: PIL writes only grey ones."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    height, width = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _png8(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- 1. pack --overwrite
_KILLING_PACK = """
    import os, signal, sys
    import fastface_pl.data.pack as pack
    from fastface_pl.data.recordio import RecordWriter
    kill_at = sys.argv[3]
    real_replace, real_write = os.replace, RecordWriter.write

    def replace(source, target, *args, **kwargs):
        real_replace(source, target, *args, **kwargs)
        if os.path.basename(os.fspath(target)) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def write(self, key, payload):
        if kill_at == "writing" and key == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(self, key, payload)

    os.replace, RecordWriter.write = replace, write
    sys.exit(pack.main([sys.argv[1], sys.argv[2], "--overwrite", "--workers", "0", "--no-progress"]))
"""


@pytest.mark.parametrize("kill_at", ["writing", ".fastface_pack_replace", "train.rec", "train.idx"])
def test_a_killed_pack_overwrite_leaves_the_old_pack_or_the_whole_new_one(tmp_path, kill_at):
    old = write_image_folder(tmp_path / "old", [2, 2], size=16)
    new = write_image_folder(tmp_path / "new", [3, 3, 3], size=20, seed=1)
    dst = tmp_path / "pack"
    pack_folder(old, dst, progress=False)
    before = _pack_contents(dst)
    process = _start_python(_KILLING_PACK, str(new), str(dst), kill_at)
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    after = _pack_contents(dst)  # the reader completes an interrupted replacement
    if kill_at == "writing":  # killed before the new pack was complete: the old one, untouched
        assert after == before
    else:  # complete when killed: the whole new pack, never the new .rec beside the old .idx
        assert after == (9, 3, "3,20,20\n")
    assert pack_main([str(new), str(dst), "--overwrite", "--workers", "0", "--no-progress"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == [".fastface_pack.lock", "property", "train.idx", "train.rec"]


# ---------------------------------------------------------------------------------------------- 2. two packs
_SLOW_PACK = """
    import sys, time
    from pathlib import Path
    import fastface_pl.data.pack as pack
    real_mapped = pack._mapped

    def mapped(jobs, workers):
        for n, item in enumerate(real_mapped(jobs, workers)):
            if n == 2:
                Path(sys.argv[3]).touch()  # half-way through: the other packer starts now
                time.sleep(300)
            yield item

    pack._mapped = mapped
    sys.exit(pack.main([sys.argv[1], sys.argv[2], "--workers", "0", "--no-progress"]))
"""


def test_a_second_pack_into_a_folder_being_packed_is_refused_and_a_killed_one_blocks_nothing(tmp_path, capsys):
    src = write_image_folder(tmp_path / "faces", [3, 3], size=16)
    dst, ready = tmp_path / "pack", tmp_path / "ready"
    first = _start_python(_SLOW_PACK, str(src), str(dst), str(ready))
    try:
        _wait_for(ready, first)
        started = time.monotonic()
        assert pack_main([str(src), str(dst), "--workers", "0", "--no-progress"]) == 2
        assert time.monotonic() - started < 10
        message = capsys.readouterr().err
        assert f"pack folder {dst} is in use by process {first.pid}" in message
        assert (dst / "train.rec.partial").exists()  # the first packer's files are left alone
    finally:
        _kill(first)
    assert pack_main([str(src), str(dst), "--workers", "0", "--no-progress"]) == 0  # the dead holder blocks nothing
    assert not list(dst.glob("*.partial")) and _pack_contents(dst)[:2] == (6, 2)


# ---------------------------------------------------------------------------------------------- 3. run folder
TINY = ["data.synthetic.num_identities=8", "data.synthetic.images_per_identity=4", "data.synthetic.unseen_identities=2",
        "data.synthetic.num_val_pairs=20", "data.batch_size=8", "trainer.enable_progress_bar=false",
        "checkpoint_every_n_steps=2", "plot=false", "loggers=[csv]"]  # 4 optimizer steps per epoch


@pytest.mark.slow
def test_a_second_writer_of_a_live_run_folder_is_refused_and_a_dead_one_blocks_no_resume(tmp_path):
    run = tmp_path / "run"
    live = subprocess.Popen(train_command(run, *TINY, "trainer.max_epochs=100000"), env=command_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "checkpoints" / "last.ckpt", live, timeout=300)
        started = time.monotonic()
        second = run_train(run, *TINY, "ckpt_path=last", "trainer.max_epochs=100000", timeout=120)
        assert second.returncode == 2, explain(second)
        assert time.monotonic() - started < 120
        assert f"run folder {run} is in use by process {live.pid}" in second.stderr
        assert not (run / "config.1.yaml").exists()  # the live run's files are left alone
    finally:
        _kill(live)
    (run / "checkpoints" / ".last.ckpt.tmp-999999").write_bytes(b"half a checkpoint")  # what a kill leaves
    epoch = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    resumed = run_train(run, *TINY, "ckpt_path=last", f"trainer.max_epochs={epoch + 2}", timeout=600)
    assert resumed.returncode == 0, explain(resumed)
    assert (run / "config.1.yaml").is_file()
    assert not list((run / "checkpoints").glob(".*.tmp-*"))


def test_the_run_folder_lock_names_its_holder_and_is_released_by_death(tmp_path):
    from fastface_pl.locks import FolderInUseError, FolderLock

    holder = _start_python("""
        import sys, time
        from pathlib import Path
        from fastface_pl.runs import lock_run_folder
        lock_run_folder(Path(sys.argv[1]))
        Path(sys.argv[2]).touch()
        time.sleep(300)
    """, str(tmp_path / "run"), str(tmp_path / "ready"))
    try:
        _wait_for(tmp_path / "ready", holder)
        with pytest.raises(FolderInUseError, match=f"in use by process {holder.pid}"):
            FolderLock(tmp_path / "run" / ".fastface_run.lock", tmp_path / "run", "run folder", "x").acquire()
    finally:
        _kill(holder)
    FolderLock(tmp_path / "run" / ".fastface_run.lock", tmp_path / "run", "run folder", "x").acquire().release()


# ---------------------------------------------------------------------------------------------- 4. pack header
def _pack_with_header(tmp_path: Path, header: tuple[float, float], identity: tuple[float, float] = (1.0, 3.0)) -> Path:
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "pack").mkdir()
    with RecordWriter(tmp_path / "pack" / "train.rec") as writer:
        writer.write(0, pack_header(header))
        for key in (1, 2):
            writer.write(key, pack_header(0.0, id=key) + jpeg.getvalue())
        writer.write(3, pack_header(identity, id=3))
    return tmp_path / "pack"


def test_a_pack_header_claiming_2_to_the_46_images_is_refused_at_once(tmp_path):
    """The search for the boundary was sized by the header (2**46 images: 3 GB and 14 s)."""
    pack = _pack_with_header(tmp_path, (2.0**46, 2.0**46 + 1))
    started = time.monotonic()
    with pytest.raises(DatasetError, match="no image/identity boundary"):
        parse_layout(RecordFile(pack / "train.rec"))
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("header, identity", [((float("nan"), 4.0), (1.0, 3.0)), ((float("inf"), 4.0), (1.0, 3.0)),
                                              ((3.0, 4.0), (float("nan"), 3.0))])
def test_non_finite_counts_in_a_pack_are_named(tmp_path, header, identity):
    pack = _pack_with_header(tmp_path, header, identity)
    with pytest.raises(DatasetError, match=r"train\.rec.*not finite"):
        RecordDataset(pack).validate()


# ---------------------------------------------------------------------------------------------- 5. huge files
def test_a_sparse_image_file_is_refused_before_it_is_read(tmp_path, capsys):
    faces = write_image_folder(tmp_path / "faces", [2, 2], size=16)
    big = faces / "id01" / "big.jpg"
    big.write_bytes((faces / "id01" / "000.jpg").read_bytes())
    os.truncate(big, 256 << 20)  # a real sparse file: 256 MiB that take no disk
    dataset = ImageFolderDataset(faces)
    index = [i for i in range(len(dataset)) if dataset.path(i) == big][0]
    tracemalloc.start()
    with pytest.raises(ImageTooLargeError, match=rf"{big}: refused before reading.*data\.max_image_side"):
        dataset[index]
    assert tracemalloc.get_traced_memory()[1] < 16 << 20
    tracemalloc.stop()
    assert pack_main([str(faces), str(tmp_path / "pack"), "--workers", "0", "--no-progress"]) == 2
    assert f"{big}: refused before reading" in capsys.readouterr().err


def test_a_device_is_not_read_as_an_image(tmp_path):
    from fastface_pl.data.datasets import read_image_file

    with pytest.raises(CorruptImageError, match="not a regular file"):
        read_image_file("/dev/zero")


# ---------------------------------------------------------------------------------------------- 6. shipped cache
def test_a_cache_shipped_with_the_data_cannot_point_outside_the_folder(tmp_path):
    """The sender's folder holds a crafted index cache; tar restores its times and those of the folders."""
    sender = write_image_folder(tmp_path / "sender" / "faces", {"a": 1, "b": 1}, size=16)
    (tmp_path / "sender" / "secret.jpg").write_bytes((sender / "a" / "000.jpg").read_bytes())
    names = ["a", "b"]
    for name in names:  # whole seconds, which tar restores exactly
        os.utime(sender / name, (int(time.time()) - 3600,) * 2)
    crafted = FolderIndex.from_listing(names, [["../../secret.jpg"], ["000.jpg"]],
                                       folder_mtimes(sender, names).tolist(), root_entries(sender))
    (sender / ".fastface_cache").mkdir()
    _write_cache(crafted, sender, (".jpeg", ".jpg", ".png"), [sender / INDEX_CACHE_NAME])
    with tarfile.open(tmp_path / "faces.tar", "w") as archive:
        archive.add(sender, arcname="faces")
    with tarfile.open(tmp_path / "faces.tar") as archive:
        archive.extractall(tmp_path / "received", filter="tar")
    dataset = ImageFolderDataset(tmp_path / "received" / "faces")
    with pytest.raises(DatasetError, match=r"not a file inside .*received/faces.*delete it"):
        dataset[0]
    assert dataset.path(1) == tmp_path / "received" / "faces" / "b" / "000.jpg"


# ---------------------------------------------------------------------------------------------- 7. workers
def test_data_workers_are_bounded_by_the_usable_cpus(caplog):
    cpus = len(os.sched_getaffinity(0))
    with caplog.at_level(logging.WARNING, logger="fastface_pl.argument_checks"):
        datamodule = FaceDataModule(root="synthetic", num_workers=1000)
    assert datamodule.num_workers == cpus
    assert f"data.num_workers=1000 but this process may use only {cpus} CPU(s)" in caplog.text


# ---------------------------------------------------------------------------------------------- 8. 16-bit pixels
GREY16 = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
RGB16 = np.stack([GREY16, 65535 - GREY16, np.full_like(GREY16, 32896)], axis=2)


def _eight_bit(pixels16: np.ndarray) -> np.ndarray:
    return ((pixels16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


@pytest.mark.parametrize("pixels", [GREY16, RGB16], ids=["grey", "rgb"])
def test_16_bit_pngs_come_out_in_the_8_bit_range_everywhere(tmp_path, pixels):
    expected = torch.from_numpy(_eight_bit(pixels) if pixels.ndim == 3 else
                                np.repeat(_eight_bit(pixels)[:, :, None], 3, axis=2)).permute(2, 0, 1)
    assert torch.equal(decode_image(png16(pixels), "x.png"), expected)  # training, .bin and pack decode this way
    faces = tmp_path / "faces"
    for identity in ("a", "b"):
        (faces / identity).mkdir(parents=True)
        (faces / identity / "0.png").write_bytes(png16(pixels))
    image, _ = ImageFolderDataset(faces)[0]
    assert image.dtype == torch.float32 and -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert pack_main([str(faces), str(tmp_path / "pack"), "--workers", "0", "--no-progress"]) == 0
    packed, _ = RecordDataset(tmp_path / "pack")[0]
    assert (packed - image).abs().max() < 0.1  # JPEG of the same 8-bit pixels
    write_bin(tmp_path / "lfw.bin", [png16(pixels)] * 20, [True, False] * 5)
    first, _, _ = load_bin(tmp_path / "lfw.bin")[0]
    assert torch.equal(first, image)


def test_an_ijb_crop_in_16_bits_is_scaled_like_an_8_bit_one(tmp_path):
    from fastface_pl.evaluation.ijb import IJBImages

    for name, data in (("a.png", png16(GREY16)), ("b.png", _png8(_eight_bit(GREY16)))):
        (tmp_path / name).write_bytes(data)
    landmarks = np.tile(np.array([[10, 12], [22, 12], [16, 17], [11, 24], [21, 24]], np.float32), (2, 1, 1))
    crops = IJBImages(tmp_path, ["a.png", "b.png"], landmarks)
    assert torch.equal(crops[0], crops[1])


def test_floating_point_pixels_are_refused_with_a_message():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.float32), "F").save(buffer, "TIFF")
    with pytest.raises(CorruptImageError, match="x.tif: floating-point pixels"):
        decode_image(buffer.getvalue(), "x.tif")


# ---------------------------------------------------------------------------------------------- 9. folder cache
@pytest.mark.parametrize("change", ["add", "remove"])
def test_identity_folders_changed_under_an_old_top_level_time_are_found(tmp_path, caplog, change):
    """``rsync -a`` and ``tar x`` give the top level the sender's (older) modification time."""
    faces = write_image_folder(tmp_path / "faces", {"a": 1, "b": 1, "c": 1}, size=8)
    ImageFolderDataset(faces)
    if change == "add":
        write_image_folder(faces, {"d": 2}, size=8)
    else:
        shutil.rmtree(faces / "b")
    stat = faces.stat()
    os.utime(faces, ns=(stat.st_atime_ns, stat.st_mtime_ns - 2 * HOUR_NS))  # rsync -a: the sender's time
    with caplog.at_level(logging.WARNING):
        dataset = ImageFolderDataset(faces)
    assert dataset.identities == (["a", "b", "c", "d"] if change == "add" else ["a", "c"])
    assert f"1 identity folder(s) {'added' if change == 'add' else 'removed'}" in caplog.text
    for i in range(len(dataset)):
        dataset[i]


# ---------------------------------------------------------------------------------------------- 10, 13. resume
@pytest.mark.slow
def test_a_resume_in_place_in_a_moved_run_folder_updates_last_ckpt_and_keeps_two_step_checkpoints(tmp_path):
    first = run_train(tmp_path / "before", *TINY, "trainer.max_epochs=2")
    assert first.returncode == 0, explain(first)
    run = tmp_path / "moved"
    (tmp_path / "before").rename(run)
    resumed = run_train(run, *TINY, "ckpt_path=last", "trainer.max_epochs=4")
    assert resumed.returncode == 0, explain(resumed)
    checkpoints = run / "checkpoints"
    assert not list(checkpoints.glob("last-v*.ckpt"))
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 16
    assert sorted(p.name for p in checkpoints.glob("step*.ckpt")) == ["step0000014.ckpt", "step0000016.ckpt"]


# ---------------------------------------------------------------------------------------------- 11. messages
def test_a_data_root_that_is_a_device_is_named():
    with pytest.raises(DatasetError, match="data root /dev/null is neither a folder nor a .rec"):
        FaceDataModule(root="/dev/null").setup("fit")


def test_packing_into_a_file_is_refused_with_a_message(tmp_path, capsys):
    src = write_image_folder(tmp_path / "faces", [1, 1], size=8)
    (tmp_path / "out").write_text("not a folder")
    assert pack_main([str(src), str(tmp_path / "out"), "--workers", "0", "--no-progress"]) == 2
    assert f"the pack destination {tmp_path / 'out'} is a file" in capsys.readouterr().err


def test_evaluate_checks_its_json_path_before_evaluating(tmp_path, capsys):
    assert evaluate_main([str(tmp_path / "missing.ckpt"), "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err


def test_a_verification_set_too_small_for_ten_folds_is_named_before_inference(tmp_path):
    image = _png8(np.zeros((8, 8, 3), np.uint8))
    write_bin(tmp_path / "tiny.bin", [image] * 8, [True, False, True, False])
    with pytest.raises(DatasetError, match=r"tiny\.bin \(4 pairs\)"):
        verification_sets(str(tmp_path), None, {}, None)


# ---------------------------------------------------------------------------------------------- 12. exit codes
@pytest.mark.slow
@pytest.mark.parametrize("bug, said", [
    ('raise RuntimeError("a bug in build")', "RuntimeError: a bug in build"),
    # a ValueError whose traceback ends in the package's own code is a bug too, not a usage error
    ('exec(compile("first, second = (1, 2, 3)", train.__file__, "exec"))',
     "ValueError: too many values to unpack (expected 2"),
])
def test_a_crash_of_train_exits_1_with_its_traceback(tmp_path, bug, said):
    script = f"""
        import sys
        import fastface_pl.train as train

        def build(*args, **kwargs):
            {bug}

        train.build = build
        sys.argv = ["fastface-train", *sys.argv[1:]]
        train.main()
    """
    result = run_python("-c", textwrap.dedent(script), f"hydra.run.dir={tmp_path / 'run'}", *TINY)
    assert result.returncode == 1, explain(result)
    assert "Traceback" in result.stderr and said in result.stderr, explain(result)
    usage = run_train(tmp_path / "run2", "model=nonsense")
    assert usage.returncode == 2, explain(usage)


# ---------------------------------------------------------------------------------------------- 13. messages
def test_a_corrupt_image_message_offers_skip_corrupt_and_no_library_internals(tmp_path):
    faces = write_image_folder(tmp_path / "faces", [2, 2], size=16)
    broken = faces / "id00" / "000.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(CorruptImageError) as error:
        ImageFolderDataset(faces)[0]
    message = str(error.value)
    assert str(broken) in message and "data.skip_corrupt=true" in message
    assert "/__w/" not in message and ".cpp" not in message and "BytesIO" not in message


def test_a_killed_index_write_leaves_no_temporary_file_behind(tmp_path):
    faces = write_image_folder(tmp_path / "faces", [1, 1], size=8)
    (faces / ".fastface_cache").mkdir()
    killed = _start_python("""
        import os, signal, sys
        from fastface_pl.atomic import atomic_write
        with atomic_write(sys.argv[1]) as handle:
            handle.write(b"half an index")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """, str(faces / INDEX_CACHE_NAME))
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in (faces / ".fastface_cache").iterdir()] == [f".image_index.bin.tmp-{killed.pid}"]
    ImageFolderDataset(faces)
    assert [p.name for p in (faces / ".fastface_cache").iterdir()] == ["image_index.bin"]
