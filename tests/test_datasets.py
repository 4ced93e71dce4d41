"""Datasets: record packs and image folders agree, RGB order, the folder index cache, synthetic identities."""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastface_pl.data import CorruptImageError, DatasetError, RecordWriter
from fastface_pl.data.datasets import (
    INDEX_CACHE_NAME,
    FaceTransform,
    ImageFolderDataset,
    RecordDataset,
    SyntheticFaces,
    SyntheticPairs,
    decode_image,
)
from fastface_pl.data.pack import pack_folder
from fastface_pl.data.recordio import pack_header
from conftest import write_image_folder


def test_record_pack_and_image_folder_give_identical_samples(tmp_path):
    folder = write_image_folder(tmp_path / "faces", {"alice": 3, "bob": 2, "carol": 4}, size=24, smooth=True)
    pack_folder(folder, tmp_path / "pack", progress=False)
    from_folder = ImageFolderDataset(folder)
    from_records = RecordDataset(tmp_path / "pack")
    assert len(from_folder) == len(from_records) == 9
    assert from_folder.num_classes == from_records.num_classes == 3
    for i in range(9):
        image_f, label_f = from_folder[i]
        image_r, label_r = from_records[i]
        assert label_f == label_r
        assert image_f.dtype == torch.float32 and image_f.shape == (3, 24, 24)
        assert torch.equal(image_f, image_r)
    assert [from_folder[i][1] for i in range(9)] == [0, 0, 0, 1, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decoding_gives_rgb_order(fmt):
    # A pure red image, written as a standard encoder writes it (as cv2.imencode does from a BGR array):
    # decoding must give red in channel 0, with no BGR swap.
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buffer, fmt)
    image = decode_image(buffer.getvalue())
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    red, green, blue = (image[c].float().mean().item() for c in range(3))
    assert red > 250 and green < 5 and blue < 5
    normalised = FaceTransform()(image)
    assert normalised[0].mean() > 0.95 and normalised[1].mean() < -0.95 and normalised[2].mean() < -0.95


def test_red_image_through_a_record_pack_stays_red(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (250, 10, 10)).save(buffer, "JPEG", quality=95)
    with RecordWriter(tmp_path / "train.rec") as writer:
        writer.write(0, pack_header((2.0, 3.0)))
        writer.write(1, pack_header(0.0, id=1) + buffer.getvalue())
        writer.write(2, pack_header((1.0, 2.0), id=2))
    image, label = RecordDataset(tmp_path)[0]
    assert label == 0 and image[0].mean() > 0.9 and image[1].mean() < -0.8 and image[2].mean() < -0.8


def test_transform_flip_extra_and_resize():
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).reshape(3, 4, 4)
    plain = FaceTransform()(image)
    assert torch.allclose(plain, (image.float() / 255 - 0.5) / 0.5, atol=1e-6)
    torch.manual_seed(0)
    flips = [torch.equal(FaceTransform(flip=True)(image), plain.flip(-1)) for _ in range(64)]
    assert 10 < sum(flips) < 54  # about half flipped, the others untouched
    inverted = FaceTransform(extra=lambda x: 255 - x)(image)
    assert torch.allclose(inverted, -plain, atol=1e-5)
    assert FaceTransform(image_size=2)(image).shape == (3, 2, 2)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        FaceTransform(image_size=0)
    with pytest.raises(ValueError, match="extra must be callable"):
        FaceTransform(extra="flip")


def test_broken_image_names_its_source(tmp_path):
    folder = write_image_folder(tmp_path / "faces", {"a": 2}, size=24, smooth=True)
    broken = folder / "a" / "001.jpg"
    broken.write_bytes(broken.read_bytes()[:60])
    dataset = ImageFolderDataset(folder)
    with pytest.raises(CorruptImageError) as info:
        dataset[1]
    assert str(broken) in str(info.value)
    skipping = ImageFolderDataset(folder, skip_corrupt=True)
    image, label = skipping[1]  # replaced by the next good sample (wrapping around)
    assert torch.equal(image, dataset[0][0]) and skipping.num_skipped == 1


def test_record_label_out_of_range_is_reported(tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    with RecordWriter(tmp_path / "train.rec") as writer:
        writer.write(0, pack_header((3.0, 4.0)))
        writer.write(1, pack_header(0.0) + jpeg.getvalue())
        writer.write(2, pack_header(5.0) + jpeg.getvalue())  # only one identity record below
        writer.write(3, pack_header((1.0, 3.0)))
    dataset = RecordDataset(tmp_path)
    assert dataset.num_classes == 1 and dataset[0][1] == 0
    with pytest.raises(DatasetError, match=r"key 2 \(byte offset \d+\): label 5 is outside \[0, 1\)"):
        dataset[1]
    with pytest.raises(DatasetError, match="label 5 is outside"):
        dataset.validate()


def test_folder_index_is_cached_reused_and_invalidated(tmp_path, monkeypatch, caplog, listed):
    folder = write_image_folder(tmp_path / "faces", {"id0": 2, "id1": 3}, size=24, smooth=True)
    for path in (folder / "id0", folder / "id1", folder):  # a dataset prepared a while ago
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 3600 * 10**9))
    with caplog.at_level(logging.INFO, logger="fastface_pl.data.folder_index"):
        first = ImageFolderDataset(folder)
    cache = folder / INDEX_CACHE_NAME
    assert cache.is_file() and first.index_path == cache
    assert f"index cached at {cache}" in caplog.text

    listed.clear()
    second = ImageFolderDataset(folder)
    assert [second.path(i) for i in range(len(second))] == [first.path(i) for i in range(len(first))]
    assert not any(Path(p).name in ("id0", "id1") for p in listed)  # no identity folder was walked again

    write_image_folder(folder, {"id2": 1}, seed=1, size=24, smooth=True)  # a new identity changes the top level
    listed.clear()
    third = ImageFolderDataset(folder)
    assert third.num_classes == 3 and len(third) == 6
    assert [Path(p).name for p in listed if Path(p).parent == folder and not Path(p).name.startswith(".")] == [
        "id2"]  # only the new folder listed (the cache's own folder is listed for stale temporaries)
    monkeypatch.undo()
    assert ImageFolderDataset(folder, rebuild_index=True).num_classes == 3


def test_folder_index_falls_back_to_xdg_cache_when_root_is_read_only(tmp_path, monkeypatch, caplog):
    folder = write_image_folder(tmp_path / "faces", {"a": 1, "b": 1}, size=24, smooth=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_replace, real_mkdir = os.replace, os.mkdir

    def refusing_replace(src, dst):  # the folder refuses writes, as a read-only mount would
        if folder in Path(dst).parents:
            raise PermissionError(13, "Read-only file system", str(dst))
        return real_replace(src, dst)

    def refusing_mkdir(path, *args, **kwargs):
        if folder in Path(path).parents:
            raise PermissionError(13, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refusing_replace)
    monkeypatch.setattr(os, "mkdir", refusing_mkdir)
    with caplog.at_level(logging.INFO, logger="fastface_pl.data.folder_index"):
        dataset = ImageFolderDataset(folder)
    assert dataset.index_path.parent == tmp_path / "xdg" / "fastface_pl"
    assert f"index cached at {dataset.index_path}" in caplog.text
    assert not (folder / INDEX_CACHE_NAME).exists()
    again = ImageFolderDataset(folder)  # found in the fallback place
    assert again.index_path == dataset.index_path and len(again) == 2


def test_explicit_index_cache_path(tmp_path):
    folder = write_image_folder(tmp_path / "faces", {"a": 2}, size=24, smooth=True)
    target = tmp_path / "elsewhere" / "index.json"
    dataset = ImageFolderDataset(folder, index_cache=target)
    assert target.is_file() and dataset.index_path == target and not (folder / INDEX_CACHE_NAME).exists()


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no identity folder with images"):
        ImageFolderDataset(tmp_path / "empty")


def test_synthetic_faces_are_deterministic():
    a = SyntheticFaces(num_identities=5, images_per_identity=4, image_size=32, seed=3)
    b = SyntheticFaces(num_identities=5, images_per_identity=4, image_size=32, seed=3)
    c = SyntheticFaces(num_identities=5, images_per_identity=4, image_size=32, seed=4)
    assert len(a) == 20 and a.num_classes == 5
    for index in (0, 7, 19):
        assert torch.equal(a[index][0], b[index][0]) and a[index][1] == index // 4
    assert torch.equal(a[7][0], a[7][0])  # order of access does not matter
    assert not torch.equal(a[7][0], c[7][0]) and not torch.equal(a[7][0], a[6][0])
    image = a[0][0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and -1 <= image.min() and image.max() <= 1
    with pytest.raises(ValueError, match="num_identities must be an int >= 1"):
        SyntheticFaces(num_identities=0)
    with pytest.raises(IndexError):
        a[20]


def test_synthetic_identities_are_learnable():
    faces = SyntheticFaces(num_identities=12, images_per_identity=6, image_size=32, seed=0)
    images = torch.stack([faces[i][0].flatten() for i in range(len(faces))])
    labels = torch.tensor([faces[i][1] for i in range(len(faces))])
    unit = torch.nn.functional.normalize(images, dim=1)
    cosine = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    intra = cosine[same & off_diagonal].mean().item()
    inter = cosine[~same].mean().item()
    assert intra > 0.6 and abs(inter) < 0.15 and intra - inter > 0.5
    # Nearest neighbour (leave one out) finds the identity almost always.
    nearest = cosine.masked_fill(~off_diagonal, -2).argmax(dim=1)
    assert (labels[nearest] == labels).float().mean() > 0.9


def test_synthetic_pairs_half_genuine_and_held_out():
    pairs = SyntheticPairs(num_pairs=20, num_identities=6, images_per_identity=4, image_size=32, seed=0,
                           unseen_identities=3)
    issame = [pairs[i][2] for i in range(20)]
    assert sum(issame) == 10 and issame[0] and not issame[1]
    for i in range(20):
        (ia, sa), (ib, sb), same = pairs.pair(i)
        assert sa >= 4 and sb >= 4  # never a training image
        assert (ia == ib) == same
    faces = SyntheticFaces(num_identities=6, images_per_identity=4, image_size=32, seed=0)
    a, b, _ = pairs[0]
    assert a.shape == faces[0][0].shape
    cos = lambda x, y: torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()  # noqa: E731
    genuine = [cos(*pairs[i][:2]) for i in range(0, 20, 2)]
    impostor = [cos(*pairs[i][:2]) for i in range(1, 20, 2)]
    assert np.mean(genuine) > np.mean(impostor) + 0.4


def test_opencv_encoded_bgr_decodes_to_rgb():
    # InsightFace packed with cv2.imencode from BGR arrays; such a JPEG must decode to RGB with no swap.
    import cv2  # opencv-python-headless is in the test extra: this runs in CI
    bgr = np.zeros((16, 16, 3), np.uint8)
    bgr[..., 2] = 255  # red, in OpenCV's channel order
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    image = decode_image(buffer.tobytes())
    assert image[0].float().mean() > 250 and image[1].float().mean() < 5 and image[2].float().mean() < 5


def test_record_dataset_in_dataloader_workers(tmp_path):
    folder = write_image_folder(tmp_path / "faces", {"a": 4, "b": 4}, size=24, smooth=True)
    pack_folder(folder, tmp_path / "pack", progress=False)
    dataset = RecordDataset(tmp_path / "pack")
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])  # opens the file in this process first
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    images = torch.cat([batch[0] for batch in loader])  # forked workers reopen their own handle
    assert torch.equal(images, expected)
    clone = pickle.loads(pickle.dumps(dataset))  # as spawned workers receive it
    assert torch.equal(clone[5][0], expected[5])
