"""RecordIO reader/writer: dmlc framing, continuation parts, headers, InsightFace layout, corruption errors."""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from fastface_pl.data import CorruptRecordError, DatasetError, RecordFile, RecordKeyError, RecordWriter
from fastface_pl.data.recordio import (
    MAGIC,
    MAGIC_BYTES,
    decode_lrec,
    frame_record,
    pack_header,
    parse_layout,
    read_identity_range,
    unpack_header,
)


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_insightface_pack(rec_path, identities: list[int], header_labels=None, with_header: bool = True):
    """Pack images (one JPEG each) for identities given by label per image, InsightFace style. Returns payloads."""
    payloads = {}
    with RecordWriter(rec_path) as writer:
        n = len(identities)
        num_ids = max(identities) + 1
        first_key = 1 if with_header else 0
        if with_header:
            labels = header_labels if header_labels is not None else (n + 1, n + 1 + num_ids)
            writer.write(0, pack_header(labels))
        ranges = {}
        for i, label in enumerate(identities):
            key = first_key + i
            payloads[key] = pack_header(float(label), id=key) + jpeg_bytes(key)
            writer.write(key, payloads[key])
            start, _ = ranges.get(label, (key, key))
            ranges[label] = (start, key + 1)
        if with_header:
            for label in range(num_ids):
                key = n + 1 + label
                payloads[key] = pack_header(ranges[label], id=key)
                writer.write(key, payloads[key])
    return payloads


def test_frame_matches_hand_built_dmlc_bytes():
    # One 5-byte record: magic, lrec = (cflag 0 << 29) | 5, the data, 3 zero bytes of padding.
    expected = bytes.fromhex("0a23d7ce") + struct.pack("<I", 5) + b"hello" + b"\0\0\0"
    assert frame_record(b"hello") == expected
    # Magic at aligned offset 4: first part "abcd" (cflag 1), last part "wxyz!" (cflag 3), the magic dropped.
    payload = b"abcd" + MAGIC_BYTES + b"wxyz!"
    expected_split = (
        MAGIC_BYTES + struct.pack("<I", (1 << 29) | 4) + b"abcd"
        + MAGIC_BYTES + struct.pack("<I", (3 << 29) | 5) + b"wxyz!" + b"\0\0\0"
    )
    assert frame_record(payload) == expected_split
    assert MAGIC == 0xCED7230A and MAGIC_BYTES == b"\x0a\x23\xd7\xce"


def test_writer_file_bytes_and_index(tmp_path):
    with RecordWriter(tmp_path / "a.rec") as writer:
        assert writer.write(7, b"xy") == 0
        assert writer.write(3, b"12345678") == 12
    raw = (tmp_path / "a.rec").read_bytes()
    assert raw == MAGIC_BYTES + struct.pack("<I", 2) + b"xy\0\0" + MAGIC_BYTES + struct.pack("<I", 8) + b"12345678"
    assert (tmp_path / "a.idx").read_text() == "7\t0\n3\t12\n"
    rec = RecordFile(tmp_path / "a.rec")
    assert list(rec.keys()) == [3, 7] and len(rec) == 2
    assert rec.read(7) == b"xy" and rec.read(3) == b"12345678"


@pytest.mark.parametrize(
    "payload",
    [
        b"1234" + MAGIC_BYTES + b"5678",  # one split: first + last
        MAGIC_BYTES + b"tail",  # magic at offset 0: empty first part
        b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ijklmnopq",  # first + middle + last
        MAGIC_BYTES * 3,  # only magics: four empty parts
        b"12" + MAGIC_BYTES + b"34",  # unaligned: no split
        b"1234567" + MAGIC_BYTES[:3],  # partial magic at the end: no split
    ],
)
def test_payload_with_magic_round_trips_byte_exact(tmp_path, payload):
    with RecordWriter(tmp_path / "m.rec") as writer:
        writer.write(0, b"before")
        writer.write(1, payload)
        writer.write(2, b"after")
    rec = RecordFile(tmp_path / "m.rec")
    assert rec.read(1) == payload
    assert rec.read(0) == b"before" and rec.read(2) == b"after"
    raw = (tmp_path / "m.rec").read_bytes()
    first_cflag, _ = decode_lrec(struct.unpack_from("<I", raw, rec.offset(1) + 4)[0])
    aligned_magic = any(payload[i : i + 4] == MAGIC_BYTES for i in range(0, len(payload) & ~3, 4))
    assert first_cflag == (1 if aligned_magic else 0)


def test_jpeg_payload_containing_magic_is_split_and_rejoined(tmp_path):
    jpeg = jpeg_bytes(1, 32)
    cut = (len(jpeg) // 2) & ~3
    payload = pack_header(5.0) + jpeg[: cut - 24] + MAGIC_BYTES + jpeg[cut - 24 :]
    assert (24 + cut - 24) % 4 == 0
    with RecordWriter(tmp_path / "j.rec") as writer:
        writer.write(0, payload)
    raw = (tmp_path / "j.rec").read_bytes()
    assert raw.count(MAGIC_BYTES) == 2  # two parts, the payload's own magic removed
    header, rest = unpack_header(RecordFile(tmp_path / "j.rec").read(0))
    assert header.label == 5.0 and rest == jpeg[: cut - 24] + MAGIC_BYTES + jpeg[cut - 24 :]


def test_scalar_and_array_labels():
    header, rest = unpack_header(pack_header(12.0, id=5, id2=9) + b"img")
    assert (header.flag, header.label, header.id, header.id2, rest) == (0, 12.0, 5, 9, b"img")
    header, rest = unpack_header(pack_header([3.0, 1.5, -2.0], id=1) + b"jpeg")
    assert header.flag == 3 and header.label == (3.0, 1.5, -2.0) and header.labels[0] == 3.0 and rest == b"jpeg"
    assert len(pack_header(np.array([1, 2], dtype=np.float64))) == 24 + 8
    with pytest.raises(ValueError, match="fewer than the 24-byte header"):
        unpack_header(b"short")
    with pytest.raises(ValueError, match="declares 100 float32 labels"):
        unpack_header(struct.pack("<IfQQ", 100, 0.0, 0, 0) + b"abcd")


def test_insightface_layout_header_and_identity_records(tmp_path):
    labels = [0, 0, 1, 1, 1, 2]
    payloads = write_insightface_pack(tmp_path / "train.rec", labels)
    rec = RecordFile(tmp_path / "train.rec")
    layout = parse_layout(rec)
    assert layout.has_header_record and layout.header_labels == (7.0, 10.0)
    assert list(layout.image_keys) == [1, 2, 3, 4, 5, 6] and list(layout.identity_keys) == [7, 8, 9]
    assert layout.num_images == 6 and layout.num_identities == 3
    assert [read_identity_range(rec, k) for k in layout.identity_keys] == [(1, 3), (3, 6), (6, 7)]
    assert [rec.read_label(k) for k in layout.image_keys] == labels
    for key, payload in payloads.items():
        assert rec.read(key) == payload
    header, image = unpack_header(rec.read(4))
    assert image == jpeg_bytes(4) and Image.open(io.BytesIO(image)).size == (16, 16)


def test_pack_without_header_record_starts_at_key_0(tmp_path):
    write_insightface_pack(tmp_path / "plain.rec", [0, 1, 1], with_header=False)
    layout = parse_layout(RecordFile(tmp_path / "plain.rec"))
    assert not layout.has_header_record and layout.num_identities is None
    assert list(layout.image_keys) == [0, 1, 2] and len(layout.identity_keys) == 0


def test_inexact_float32_header_counts_are_corrected_from_the_index(tmp_path, caplog):
    # A header that is off by two, as float32 counts are above 2**24: the boundary comes from the records.
    write_insightface_pack(tmp_path / "train.rec", [0, 0, 1, 1, 2], header_labels=(8.0, 11.0))
    with caplog.at_level(logging.WARNING):
        layout = parse_layout(RecordFile(tmp_path / "train.rec"))
    assert list(layout.image_keys) == [1, 2, 3, 4, 5] and list(layout.identity_keys) == [6, 7, 8]
    assert "first identity record at key 6" in caplog.text


def test_corrupt_magic_names_file_key_and_offset(tmp_path):
    write_insightface_pack(tmp_path / "train.rec", [0, 1, 1])
    rec = RecordFile(tmp_path / "train.rec")
    offset = rec.offset(2)
    with open(tmp_path / "train.rec", "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff\xff\xff\xff")
    with pytest.raises(CorruptRecordError) as info:
        RecordFile(tmp_path / "train.rec").read(2)
    message = str(info.value)
    assert "train.rec" in message and "key 2" in message and f"byte offset {offset}" in message
    assert "bad magic number 0xFFFFFFFF" in message
    assert (info.value.key, info.value.offset) == (2, offset)
    assert isinstance(info.value, DatasetError) and isinstance(info.value, ValueError)
    assert rec.read(1)  # other records still read


def test_truncated_file_is_reported(tmp_path):
    write_insightface_pack(tmp_path / "train.rec", [0, 0, 1])
    rec = RecordFile(tmp_path / "train.rec")
    cut = rec.offset(3) + 20  # inside image record 3
    with open(tmp_path / "train.rec", "r+b") as handle:
        handle.truncate(cut)
    # The identity records now lie beyond the end: the index check fails first, naming key and offset.
    with pytest.raises(CorruptRecordError, match=r"key 4 points at byte offset \d+, beyond the end"):
        RecordFile(tmp_path / "train.rec")
    lines = (tmp_path / "train.idx").read_text().splitlines()[:4]
    (tmp_path / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptRecordError) as info:
        RecordFile(tmp_path / "train.rec").read(3)
    assert "truncated record" in str(info.value) and "key 3" in str(info.value)
    assert f"ends at byte {cut}" in str(info.value) and info.value.offset == rec.offset(3)


def test_bad_cflag_sequence_and_missing_key(tmp_path):
    # A middle part (cflag 2) where a record should start: the .idx points inside a split record.
    raw = MAGIC_BYTES + struct.pack("<I", (2 << 29) | 4) + b"abcd"
    (tmp_path / "bad.rec").write_bytes(raw)
    (tmp_path / "bad.idx").write_text("0\t0\n")
    rec = RecordFile(tmp_path / "bad.rec")
    with pytest.raises(CorruptRecordError, match=r"key 0 at byte offset 0: bad cflag sequence"):
        rec.read(0)
    with pytest.raises(RecordKeyError) as info:
        rec.read(5)
    assert isinstance(info.value, KeyError) and "key 5 is not in" in str(info.value) and "bad.idx" in str(info.value)
    assert 5 not in rec and 0 in rec
    # A first part followed by a whole record: the continuation is missing.
    raw = MAGIC_BYTES + struct.pack("<I", (1 << 29) | 4) + b"abcd" + MAGIC_BYTES + struct.pack("<I", 4) + b"efgh"
    (tmp_path / "bad.rec").write_bytes(raw)
    with pytest.raises(CorruptRecordError, match="follows a first/middle part"):
        RecordFile(tmp_path / "bad.rec").read(0)


def test_missing_files_and_malformed_index(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        RecordFile(tmp_path / "none.rec")
    (tmp_path / "x.rec").write_bytes(frame_record(b"data"))
    with pytest.raises(DatasetError, match=r"index file .*x\.idx .* does not exist"):
        RecordFile(tmp_path / "x.rec")
    (tmp_path / "x.idx").write_text("0\t0\n1\tabc\n")
    with pytest.raises(DatasetError, match=r"line 2 is b'1\\tabc'"):
        RecordFile(tmp_path / "x.rec")
    (tmp_path / "x.idx").write_text("0\t0\n0\t0\n")
    with pytest.raises(DatasetError, match="key 0 appears more than once"):
        RecordFile(tmp_path / "x.rec")


def test_lazy_handle_is_per_process_and_not_pickled(tmp_path, monkeypatch):
    write_insightface_pack(tmp_path / "train.rec", [0, 1])
    rec = RecordFile(tmp_path / "train.rec")
    assert rec._fd is None  # nothing opened until the first read
    first = rec.read(1)
    parent_fd = rec._fd
    assert parent_fd is not None
    clone = pickle.loads(pickle.dumps(rec))
    assert clone._fd is None and clone.read(1) == first
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # as a forked DataLoader worker would see it
    assert rec.read(1) == first
    assert rec._pid == real_pid + 1  # reopened for the "new process"
    monkeypatch.undo()
    rec.close()
    clone.close()


def test_writer_rejects_bad_keys_and_overwrites_in_place(tmp_path):
    with RecordWriter(tmp_path / "w.rec") as writer:
        writer.write(0, pack_header((0.0, 0.0)))
        writer.write(1, b"payload")
        with pytest.raises(ValueError, match="already written"):
            writer.write(1, b"again")
        with pytest.raises(ValueError, match="non-negative int"):
            writer.write(-1, b"x")
        writer.overwrite(0, pack_header((2.0, 3.0)))
        with pytest.raises(ValueError, match="frames to"):
            writer.overwrite(1, b"longer payload")
    rec = RecordFile(tmp_path / "w.rec")
    assert unpack_header(rec.read(0))[0].label == (2.0, 3.0) and rec.read(1) == b"payload"
