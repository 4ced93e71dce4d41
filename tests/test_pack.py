"""The pack command: image folder -> InsightFace train.rec/train.idx."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastface_pl.data import DatasetError, RecordFile, parse_layout, unpack_header
from fastface_pl.data.pack import main, pack_folder
from fastface_pl.data.recordio import read_identity_range
from conftest import write_image_folder


def test_pack_writes_insightface_layout(tmp_path):
    src = write_image_folder(tmp_path / "src", {"b_person": 2, "a_person": 3, "c_person": 1}, size=20, png_first=True)
    assert main([str(src), str(tmp_path / "dst"), "--workers", "0", "--no-progress"]) == 0
    rec = RecordFile(tmp_path / "dst" / "train.rec")
    layout = parse_layout(rec)
    assert layout.has_header_record and layout.header_labels == (7.0, 10.0)
    assert list(layout.image_keys) == [1, 2, 3, 4, 5, 6] and list(layout.identity_keys) == [7, 8, 9]
    # Identities sorted by folder name: a_person -> 0 (3 images), b_person -> 1 (2), c_person -> 2 (1).
    assert [rec.read_label(k) for k in layout.image_keys] == [0, 0, 0, 1, 1, 2]
    assert [read_identity_range(rec, k) for k in layout.identity_keys] == [(1, 4), (4, 6), (6, 7)]
    header, jpeg = unpack_header(rec.read(2))
    assert header.id == 2 and jpeg == (src / "a_person" / "001.jpg").read_bytes()  # JPEGs stored byte for byte
    _, converted = unpack_header(rec.read(1))
    assert converted[:3] == b"\xff\xd8\xff"  # the PNG was encoded as JPEG
    assert (tmp_path / "dst" / "property").read_text() == "3,20,20\n"
    assert not list((tmp_path / "dst").glob("*.partial"))


def test_pack_with_workers_matches_in_process(tmp_path):
    src = write_image_folder(tmp_path / "src", {"x": 3, "y": 3}, size=20, png_first=True)
    pack_folder(src, tmp_path / "serial", workers=0, progress=False)
    summary = pack_folder(src, tmp_path / "parallel", workers=2, progress=False)
    assert summary.num_images == 6 and summary.num_identities == 2 and summary.num_skipped == 0
    assert (tmp_path / "serial" / "train.rec").read_bytes() == (tmp_path / "parallel" / "train.rec").read_bytes()
    assert (tmp_path / "serial" / "train.idx").read_text() == (tmp_path / "parallel" / "train.idx").read_text()


def test_pack_corrupt_images_stop_or_are_skipped(tmp_path):
    src = write_image_folder(tmp_path / "src", {"x": 3, "y": 2}, size=20, png_first=True)
    (src / "x" / "001.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match=r"corrupt image .*x/001\.jpg"):
        pack_folder(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst" / "train.rec").exists() and not list((tmp_path / "dst").glob("*.partial"))
    summary = pack_folder(src, tmp_path / "dst", skip_corrupt=True, progress=False)
    assert summary.num_images == 4 and summary.num_skipped == 1
    rec = RecordFile(tmp_path / "dst" / "train.rec")
    layout = parse_layout(rec)
    assert [read_identity_range(rec, k) for k in layout.identity_keys] == [(1, 3), (3, 5)]


def test_pack_command_line_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "dst")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="quality must be an int in 1..100"):
        pack_folder(tmp_path, tmp_path / "dst", quality=101)


def test_pack_runs_as_module(tmp_path):
    src = write_image_folder(tmp_path / "src", {"p": 1, "q": 1}, size=20, png_first=True)
    result = subprocess.run(
        [sys.executable, "-m", "fastface_pl.data.pack", str(src), str(tmp_path / "dst"), "--workers", "0",
         "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "packed 2 images of 2 identities" in result.stdout
    assert len(RecordFile(tmp_path / "dst" / "train.rec")) == 5


def test_an_existing_pack_is_kept_unless_overwrite(tmp_path, capsys):
    src = write_image_folder(tmp_path / "src", {"p": 2, "q": 1}, size=20, png_first=True)
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), "--workers", "0", "--no-progress"]) == 0
    before = {name: (dst / name).read_bytes() for name in ("train.rec", "train.idx", "property")}
    write_image_folder(tmp_path / "other", {"r": 3}, size=20, png_first=True)
    capsys.readouterr()
    assert main([str(tmp_path / "other"), str(dst), "--workers", "0", "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert f"{dst} already holds a pack (train.rec, train.idx)" in message and "--overwrite" in message
    assert {name: (dst / name).read_bytes() for name in before} == before  # untouched
    (dst / "train.rec").unlink()  # half a pack is still a pack someone may want
    with pytest.raises(DatasetError, match=r"already holds a pack \(train.idx\)"):
        pack_folder(tmp_path / "other", dst, progress=False)
    assert main([str(tmp_path / "other"), str(dst), "--workers", "0", "--no-progress", "--overwrite"]) == 0
    rec = RecordFile(dst / "train.rec")
    assert len(parse_layout(rec).image_keys) == 3 and (dst / "property").read_text().startswith("1,")
