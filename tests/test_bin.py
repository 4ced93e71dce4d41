"""InsightFace verification .bin files: protocol-2 pickles read and written."""

from __future__ import annotations

import io
import pickle
import pickletools

import numpy as np
import pytest
import torch
from PIL import Image

from fastface_pl.data import DatasetError, load_bin, write_bin


def encoded(colour, size: int = 20, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, fmt)
    return buffer.getvalue()


def test_hand_built_python2_style_bin(tmp_path):
    # What InsightFace's scripts produced: pickle.dump((bins, issame), f, protocol=2) of byte strings.
    bins = [encoded((255, 0, 0)), encoded((250, 5, 5)), encoded((0, 0, 255)), encoded((0, 255, 0), fmt="PNG")]
    data = pickle.dumps((bins, [True, False]), protocol=2)
    assert data[:2] == b"\x80\x02"  # protocol 2
    (tmp_path / "lfw.bin").write_bytes(data)
    pairs = load_bin(tmp_path / "lfw.bin")
    assert len(pairs) == 2 and pairs.name == "lfw" and pairs.issame == [True, False]
    a, b, same = pairs[0]
    assert same is True and a.shape == b.shape == (3, 20, 20) and a.dtype == torch.float32
    assert a[0].mean() > 0.9 and a[2].mean() < -0.9  # red decoded as red
    c, d, same = pairs[1]
    assert same is False and c[2].mean() > 0.9 and d[1].mean() > 0.99  # blue, then green (lossless PNG)


def test_numpy_encoded_bins_and_numpy_issame(tmp_path):
    bins = [np.frombuffer(encoded((10 * i, 0, 0)), dtype=np.uint8) for i in range(4)]
    (tmp_path / "cfp_fp.bin").write_bytes(pickle.dumps((bins, np.array([True, True])), protocol=2))
    pairs = load_bin(tmp_path / "cfp_fp.bin", image_size=8)
    assert pairs.issame == [True, True] and pairs[1][0].shape == (3, 8, 8)


def test_write_bin_round_trip_protocol_2(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [  # smooth images, so that JPEG keeps them close
        np.array(Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((16, 16), Image.BILINEAR))
        for _ in range(3)
    ]
    chw = torch.from_numpy(arrays[0]).permute(2, 0, 1).contiguous()
    items = [arrays[0], arrays[1], encoded((0, 0, 255)), chw, arrays[2], arrays[2]]
    path = write_bin(tmp_path / "sets" / "agedb_30.bin", items, [False, False, True])
    raw = path.read_bytes()
    assert raw[:2] == b"\x80\x02"
    assert max(op.proto for op, _, _ in pickletools.genops(raw)) <= 2
    # InsightFace's loader: pickle.load(f, encoding="bytes") and bytes per image.
    bins, issame = pickle.loads(raw, encoding="bytes")
    assert issame == [False, False, True] and all(isinstance(b, bytes) for b in bins)
    assert bins[2] == items[2]  # encoded bytes stored unchanged
    pairs = load_bin(path)
    first, _, _ = pairs[0]
    expected = torch.from_numpy(arrays[0]).permute(2, 0, 1).float() / 127.5 - 1
    assert (first - expected).abs().mean() < 0.05  # JPEG at quality 95
    second_pair_b = pairs[1][1]
    assert torch.allclose(second_pair_b, first)  # the CHW tensor encoded the same image


def test_bin_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_bin(tmp_path / "missing.bin")
    (tmp_path / "odd.bin").write_bytes(pickle.dumps(([b"x"] * 3, [True, False]), protocol=2))
    with pytest.raises(DatasetError, match="3 images for 2 pairs, expected 4"):
        load_bin(tmp_path / "odd.bin")
    (tmp_path / "evil.bin").write_bytes(pickle.dumps((print, [True]), protocol=2))
    with pytest.raises(DatasetError, match=r"may not reference (__builtin__|builtins)\.print"):
        load_bin(tmp_path / "evil.bin")
    (tmp_path / "text.bin").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="is not an InsightFace verification .bin"):
        load_bin(tmp_path / "text.bin")
    with pytest.raises(ValueError, match="must hold 2 \\* len\\(issame\\) = 2 images, got 1"):
        write_bin(tmp_path / "w.bin", [b"x"], [True])
    with pytest.raises(ValueError, match="quality must be an int in 1..100"):
        write_bin(tmp_path / "w.bin", [b"x", b"y"], [True], quality=0)
    with pytest.raises(ValueError, match="uint8 RGB image"):
        write_bin(tmp_path / "w.bin", [np.zeros((4, 4), np.float32), b"y"], [True])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_bins_of_any_shape_and_any_pickle_protocol(tmp_path, protocol):
    # cv2.imencode returns (n, 1) uint8 arrays; Python 3 scripts often dump with pickle.HIGHEST_PROTOCOL (5),
    # where numpy rebuilds arrays with numpy(._core).numeric._frombuffer.
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
    bins = [np.frombuffer(encoded(c), dtype=np.uint8).reshape(-1, 1) for c in colours]
    path = tmp_path / f"agedb_30_p{protocol}.bin"
    path.write_bytes(pickle.dumps((bins, np.array([False, True])), protocol=protocol))
    pairs = load_bin(path)
    assert pairs.issame == [False, True]
    image_a, image_b, issame = pairs[1]
    assert issame is True
    assert image_a[:, 8, 8].tolist() == pytest.approx([-1.0, -1.0, 0.57], abs=0.05)  # blue
    assert image_b[0, 8, 8] > 0.4 and image_b[1, 8, 8] > 0.4 and image_b[2, 8, 8] < -0.8  # yellow
