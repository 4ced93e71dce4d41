"""IJB-B/C 1:1 verification: the feature-level functions against a plain re-implementation of InsightFace's
eval_ijbc.py (its per-template loops and scikit-learn's ROC, written here independently), the alignment, and
the whole pipeline on a generated IJB folder through the function and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastface_pl.evaluation.alignment import arcface_template, similarity_transform, warp_affine
from fastface_pl.evaluation.ijb import (IJB_FARS, evaluate_ijb, pair_scores, read_ijb_meta, roc_curve,
                                        tar_at_far)


# ------------------------------------------------------------------ independent reference (plain numpy, loops)
def reference_pair_scores(features, faceness, templates, medias, pairs, norm_score=True, detector_score=True):
    """The reference's steps as it writes them: per template, per media, in float32, then float64 cosines."""
    feats = features.astype(np.float32)
    if not norm_score:
        feats = feats / np.sqrt(np.sum(feats**2, -1, keepdims=True))
    if detector_score:
        feats = feats * faceness.astype(np.float32)[:, None]
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), feats.shape[1]))
    for row, template in enumerate(unique_templates):
        (rows,) = np.where(templates == template)
        template_medias = medias[rows]
        media_feats = []
        for media in np.unique(template_medias):
            (ind,) = np.where(template_medias == media)
            media_feats.append(feats[rows][ind].mean(axis=0))
        template_feats[row] = np.sum(media_feats, axis=0)
    norms = np.sqrt((template_feats**2).sum(1, keepdims=True))
    template_feats = template_feats / np.where(norms == 0, 1, norms)
    row_of = {t: i for i, t in enumerate(unique_templates)}
    first = template_feats[[row_of[t] for t in pairs[:, 0]]]
    second = template_feats[[row_of[t] for t in pairs[:, 1]]]
    return np.sum(first * second, -1)


def reference_roc(scores, labels):
    """scikit-learn's roc_curve (drop_intermediate=True) restated: counts at each distinct threshold."""
    thresholds = np.unique(scores)[::-1]
    positives, negatives = np.sort(scores[labels == 1]), np.sort(scores[labels == 0])
    tps = len(positives) - np.searchsorted(positives, thresholds, side="left")  # #positives with score >= t
    fps = len(negatives) - np.searchsorted(negatives, thresholds, side="left")
    if len(tps) > 2:
        keep = [0] + [i for i in range(1, len(tps) - 1)
                      if tps[i + 1] - 2 * tps[i] + tps[i - 1] != 0 or fps[i + 1] - 2 * fps[i] + fps[i - 1] != 0]
        keep.append(len(tps) - 1)
        tps, fps = tps[keep], fps[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1]


def reference_tar_at_far(scores, labels, fars):
    """eval_ijbc.py's rule: flip the ROC, take min over (|fpr - far|, index)."""
    fpr, tpr = reference_roc(scores, labels)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    result = {}
    for far in fars:
        _, index = min(zip(abs(fpr - far), range(len(fpr))))
        result[far] = tpr[index]
    return result


def random_ijb_features(seed, num_images=6000, num_templates=400, dims=32, num_pairs=60_000, identities=80):
    rng = np.random.default_rng(seed)
    identity_of_template = rng.integers(0, identities, num_templates)
    template_ids = rng.choice(np.arange(1, 10 * num_templates), num_templates, replace=False)  # sparse ids
    templates = template_ids[rng.integers(0, num_templates, num_images)]
    templates[:num_templates] = template_ids  # every template has an image
    medias = rng.integers(0, 6, num_images) + 100 * rng.integers(0, 3, num_images)  # repeated medias: video frames
    centres = rng.normal(size=(identities, dims))
    row_of = {t: i for i, t in enumerate(template_ids)}
    identity = identity_of_template[[row_of[t] for t in templates]]
    features = (centres[identity] + 1.5 * rng.normal(size=(num_images, dims))) * rng.uniform(0.2, 3, (num_images, 1))
    faceness = rng.uniform(0.3, 1.0, num_images).astype(np.float32)
    pairs = template_ids[rng.integers(0, num_templates, (num_pairs, 2))]
    labels = (identity_of_template[[row_of[t] for t in pairs[:, 0]]]
              == identity_of_template[[row_of[t] for t in pairs[:, 1]]]).astype(np.int64)
    return features.astype(np.float32), faceness, templates, medias, pairs, labels


# ------------------------------------------------------------------ feature level
@pytest.mark.parametrize("norm_score, detector_score", [(True, True), (False, True), (True, False), (False, False)])
def test_pair_scores_match_the_reference_loops(norm_score, detector_score):
    features, faceness, templates, medias, pairs, _ = random_ijb_features(0)
    ours = pair_scores(features, faceness, templates, medias, pairs, norm_score=norm_score,
                       detector_score=detector_score)
    expected = reference_pair_scores(features, faceness, templates, medias, pairs, norm_score, detector_score)
    assert ours.dtype == np.float64 and ours.shape == (len(pairs),)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)  # the reference averages medias in float32


def test_pair_scores_dense_grid_path_matches_the_reference():
    # enrolment x verification templates, a quarter of the grid: scored by the grid matrix products
    features, faceness, templates, medias, _, _ = random_ijb_features(1)
    rng = np.random.default_rng(1)
    ids = np.unique(templates)
    grid = np.stack(np.meshgrid(ids[:60], ids[60:], indexing="ij"), -1).reshape(-1, 2)
    pairs = grid[rng.random(len(grid)) < 0.25]
    ours = pair_scores(torch.from_numpy(features), faceness, templates, medias, pairs)
    np.testing.assert_allclose(ours, reference_pair_scores(features, faceness, templates, medias, pairs), atol=1e-6)


def test_pooling_by_hand():
    # template 7: media 1 holds two images (averaged), media 2 one image; the media features are summed.
    features = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 4.0], [1.0, 0.0]], dtype=np.float32)
    faceness = np.array([1.0, 1.0, 0.5, 1.0], dtype=np.float32)
    templates, medias = np.array([7, 7, 7, 9]), np.array([1, 1, 2, 1])
    # template 7: mean([2,0],[0,2]) + 0.5*[0,4] = [1, 3]; template 9: [1, 0]; cosine = 1/sqrt(10)
    scores = pair_scores(features, faceness, templates, medias, np.array([[7, 9], [9, 9]]))
    np.testing.assert_allclose(scores, [1 / np.sqrt(10), 1.0])
    # without the detector score: [1, 1] + [0, 4] = [1, 5]
    scores = pair_scores(features, faceness, templates, medias, np.array([[7, 9]]), detector_score=False)
    np.testing.assert_allclose(scores, [1 / np.sqrt(26)])


@pytest.mark.parametrize("ties", [False, True])
def test_tar_at_far_matches_the_reference_rule(ties):
    features, faceness, templates, medias, pairs, labels = random_ijb_features(2, num_pairs=200_000)
    scores = pair_scores(features, faceness, templates, medias, pairs)
    if ties:  # coarse scores: many pairs per threshold, straight ROC runs that scikit-learn drops
        scores = np.round(scores * 200) / 200
    fars = (1e-5, 1e-4, 3e-4, 1e-3, 1e-2, 1e-1, 0.5)
    ours = tar_at_far(scores, labels, fars)
    expected = reference_tar_at_far(scores, labels, fars)
    assert list(ours) == list(fars)
    for far in fars:
        assert ours[far] == expected[far], far
    fpr, tpr, thresholds = roc_curve(scores, labels)
    expected_fpr, expected_tpr = reference_roc(scores, labels)
    np.testing.assert_array_equal(fpr, expected_fpr)
    np.testing.assert_array_equal(tpr, expected_tpr)
    assert thresholds[0] == np.inf and np.all(np.diff(thresholds) < 0)


def test_tar_at_far_by_hand():
    # scores 0.9 (genuine), 0.8 (impostor), 0.7 (genuine), 0.6 (impostor): ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1)
    scores, labels = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])
    fpr, tpr, _ = roc_curve(scores, labels)
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1, 1])
    # FAR 0.1 is closest to fpr 0 (TPR 0 or 0.5: the larger), 0.5 to fpr 0.5 (TPR 0.5 or 1: the larger)
    assert tar_at_far(scores, labels, (0.1, 0.5)) == {0.1: 0.5, 0.5: 1.0}


def test_bad_inputs_are_clear_errors():
    features = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="templates with no image"):
        pair_scores(features, np.ones(3), np.array([1, 1, 2]), np.zeros(3), np.array([[1, 5]]))
    with pytest.raises(ValueError, match="length N"):
        pair_scores(features, np.ones(2), np.array([1, 1, 2]), np.zeros(3), np.array([[1, 2]]))
    with pytest.raises(ValueError, match="genuine and impostor"):
        tar_at_far(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="0 .* or 1"):
        tar_at_far(np.array([0.1, 0.2]), np.array([1, 2]))


# ------------------------------------------------------------------ alignment
def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(3)
    template = arcface_template(112).astype(np.float64)
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (template - shift) @ np.linalg.inv(scale * rotation).T  # template = s R landmarks + shift
    matrix = similarity_transform(landmarks + rng.normal(scale=1e-9, size=landmarks.shape), template)
    np.testing.assert_allclose(matrix[:, :2], scale * rotation, atol=1e-6)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-5)
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), template)


def cv2_warp_affine_float(image, matrix, size):
    """cv2.warpAffine's definition (INTER_LINEAR, BORDER_CONSTANT 0) in float: dst(x, y) = src(M⁻¹(x, y))."""
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    height, width, _ = image.shape
    out = np.zeros((size, size, 3))
    for y in range(size):
        for x in range(size):
            sx, sy = inverse @ [x, y, 1]
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            fx, fy = sx - x0, sy - y0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    if 0 <= y0 + dy < height and 0 <= x0 + dx < width:
                        out[y, x] += wy * wx * image[y0 + dy, x0 + dx]
    return out


def test_warp_matches_the_cv2_definition():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
    matrix = np.array([[0.8, -0.3, 5.5], [0.25, 0.9, -3.2]])  # rotation, scale, shear-free, out-of-image corners
    ours = warp_affine(image, matrix, 32).permute(1, 2, 0).numpy().astype(np.float64)
    expected = cv2_warp_affine_float(image, matrix, 32)
    assert np.abs(ours - expected).max() <= 0.5 + 1e-3  # float32 sampling, one rounding
    assert (expected[ours == 0] < 0.5 + 1e-3).all()  # zeros outside the source, blended at its border


# ------------------------------------------------------------------ a generated IJB folder, end to end
def make_ijb_folder(root: Path, target="ijbc", num_images=48, num_templates=12, seed=5) -> Path:
    """Real JPEG loose crops (a face-like pattern placed by a random similarity), meta files as InsightFace's."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / target.upper()
    (folder / "loose_crop").mkdir(parents=True)
    (folder / "meta").mkdir()
    # 4 identities' smooth "faces" in the 112 x 112 template frame (kept in the folder for the alignment test)
    coarse = rng.integers(0, 256, (4, 7, 7, 3)).astype(np.uint8)
    base = np.stack([np.asarray(Image.fromarray(c).resize((112, 112), Image.BICUBIC)) for c in coarse])
    np.save(root / f"{target}_faces.npy", base)
    template = arcface_template(112).astype(np.float64)
    identity_of_template = np.arange(num_templates) % 4
    landmark_lines, template_lines = [], []
    for index in range(num_images):
        template_id = 100 + index % num_templates
        identity = identity_of_template[index % num_templates]
        angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.2)
        shift = rng.uniform(48, 64, 2)  # room for the rotated face inside the crop
        forward = np.hstack([scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]),
                             shift[:, None]])  # template frame -> loose crop
        crop = warp_affine(base[identity], forward, int(112 * scale * 1.3) + 96).permute(1, 2, 0).numpy()
        name = f"{index + 1}.jpg"
        Image.fromarray(crop).save(folder / "loose_crop" / name, quality=95)
        landmarks = template @ forward[:, :2].T + forward[:, 2]
        score = rng.uniform(0.5, 1.0)
        landmark_lines.append(" ".join([name, *(f"{v:.4f}" for v in landmarks.ravel()), f"{score:.6f}"]))
        template_lines.append(f"{name} {template_id} {index % 3}")
    pair_lines = [f"{100 + a} {100 + b} {int(identity_of_template[a] == identity_of_template[b])}"
                  for a in range(num_templates) for b in range(a + 1, num_templates)]
    (folder / "meta" / f"{target}_name_5pts_score.txt").write_text("\n".join(landmark_lines) + "\n")
    (folder / "meta" / f"{target}_face_tid_mid.txt").write_text("\n".join(template_lines) + "\n")
    (folder / "meta" / f"{target}_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    return folder


def test_read_meta_and_its_errors(tmp_path):
    folder = make_ijb_folder(tmp_path, target="ijbb", num_images=12, num_templates=4)
    meta = read_ijb_meta(folder)
    assert meta.target == "ijbb" and len(meta.image_names) == 12 and meta.landmarks.shape == (12, 5, 2)
    assert meta.pairs.shape == (6, 2) and meta.labels.tolist() == [0, 0, 0, 0, 0, 0]
    with pytest.raises(FileNotFoundError, match="not an IJB folder"):
        read_ijb_meta(tmp_path)
    lines = (folder / "meta" / "ijbb_face_tid_mid.txt").read_text().splitlines()
    (folder / "meta" / "ijbb_face_tid_mid.txt").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="same images in the same order"):
        read_ijb_meta(folder)
    (folder / "meta" / "ijbb_face_tid_mid.txt").write_text("\n".join(lines) + "\n")
    pair_file = folder / "meta" / "ijbb_template_pair_label.txt"
    pair_file.write_text(pair_file.read_text().replace("101 102 0", "101 1O2 0"))  # a letter O in a number
    with pytest.raises(ValueError, match=r"ijbb_template_pair_label.txt:4: expected 3 integers"):
        read_ijb_meta(folder)


def test_evaluate_ijb_end_to_end_matches_the_feature_level_reference(tmp_path):
    from fastface_pl.evaluation.ijb import IJBImages, extract_features
    from fastface_pl.models import build_backbone

    folder = make_ijb_folder(tmp_path)
    torch.manual_seed(0)
    backbone = build_backbone("tiny", embedding_size=16, input_size=32).eval()
    result = evaluate_ijb(backbone, folder, tmp_path / "out", name="tiny", image_size=32, batch_size=8,
                          num_workers=0, device="cpu", progress=False)
    assert result["target"] == "ijbc" and result["num_images"] == 48 and result["num_pairs"] == 66
    assert set(result["tar_at_far"]) == {f"{far:.0e}" for far in IJB_FARS}
    saved = json.loads((tmp_path / "out" / "tiny_ijbc.json").read_text())
    assert saved == result
    assert (tmp_path / "out" / "tiny_ijbc_roc.png").stat().st_size > 5_000
    scores = np.load(tmp_path / "out" / "tiny_ijbc_scores.npy")

    # the same from the pieces: aligned crops -> reference pooling -> reference ROC rule
    meta = read_ijb_meta(folder)
    crops = torch.stack([IJBImages(folder / "loose_crop", meta.image_names, meta.landmarks, 32)[i]
                         for i in range(48)])
    images = (crops.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        features = (backbone(images) + backbone(images.flip(-1))).numpy()
    np.testing.assert_allclose(features, extract_features(backbone, IJBImages(
        folder / "loose_crop", meta.image_names, meta.landmarks, 32), batch_size=5, num_workers=0,
        device="cpu", progress=False), atol=1e-5)
    expected = reference_pair_scores(features, meta.faceness, meta.templates, meta.medias, meta.pairs)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    expected_tars = reference_tar_at_far(expected, meta.labels, IJB_FARS)
    assert [result["tar_at_far"][f"{far:.0e}"] for far in IJB_FARS] == pytest.approx(
        [expected_tars[far] for far in IJB_FARS])
    with pytest.raises(FileExistsError, match="already exist"):  # results are never overwritten
        evaluate_ijb(backbone, folder, tmp_path / "out", name="tiny", image_size=32, num_workers=0, device="cpu")


def test_aligned_crop_recovers_the_face(tmp_path):
    # the generated crops put a known pattern at a random similarity: alignment must undo it
    from fastface_pl.evaluation.ijb import IJBImages

    folder = make_ijb_folder(tmp_path, num_images=4, num_templates=4, seed=6)
    meta = read_ijb_meta(folder)
    dataset = IJBImages(folder / "loose_crop", meta.image_names, meta.landmarks, 112)
    faces = torch.from_numpy(np.load(tmp_path / "ijbc_faces.npy")).permute(0, 3, 1, 2).float()
    for index in range(4):  # image i shows identity i
        errors = [(dataset[index].float() - face)[:, 8:-8, 8:-8].abs().mean().item() for face in faces]
        assert errors[index] < 4.0, errors  # JPEG and two bilinear resamplings away from the pattern
        assert min(e for i, e in enumerate(errors) if i != index) > 20.0


@pytest.mark.slow
def test_evaluate_command_with_ijb(tmp_path):
    import lightning.pytorch as pl  # noqa: F401  (the checkpoint format)
    from fastface_pl.models.module import FaceRecognitionModule

    folder = make_ijb_folder(tmp_path)
    module = FaceRecognitionModule(num_classes=4, backbone="tiny", backbone_kwargs={"input_size": 32},
                                   embedding_size=16, margin="cosface")
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": pl.__version__}, checkpoint)
    result = subprocess.run([sys.executable, "-m", "fastface_pl.evaluate", str(checkpoint), "--ijb", str(folder),
                             "--ijb-out", str(tmp_path / "out"), "--num-workers", "2", "--batch-size", "16",
                             "--json", str(tmp_path / "all.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "tiny-IJBC" in result.stdout and "1e-04" in result.stdout
    saved = json.loads((tmp_path / "out" / "tiny_ijbc.json").read_text())
    assert saved["num_pairs"] == 66 and 0.0 <= saved["tar_at_far"]["1e-04"] <= 1.0
    assert json.loads((tmp_path / "all.json").read_text())["ijb"]["tar_at_far"] == saved["tar_at_far"]
    # an unreadable crop: exit code 2 and a message naming the file, not a traceback
    broken = sorted((folder / "loose_crop").iterdir())[3]
    broken.write_bytes(b"not a jpeg")
    result = subprocess.run([sys.executable, "-m", "fastface_pl.evaluate", str(checkpoint), "--ijb", str(folder),
                             "--ijb-out", str(tmp_path / "out2"), "--num-workers", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and broken.name in result.stderr and "Traceback" not in result.stderr, \
        result.stderr[-2000:]
    # a folder that is not IJB: exit code 2 and a message naming the layout
    result = subprocess.run([sys.executable, "-m", "fastface_pl.evaluate", str(checkpoint), "--ijb", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "loose_crop" in result.stderr
