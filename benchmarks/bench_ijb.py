"""IJB-C-sized template pooling, pair scoring and TAR@FAR: fastface_pl vs InsightFace's numpy pipeline.

    python benchmarks/bench_ijb.py                  # IJB-C size: 469,375 images, 23,124 templates, 15.7M pairs
    python benchmarks/bench_ijb.py --scale 0.1      # a tenth of it, for a quick look
    python benchmarks/bench_ijb.py --device cuda    # ours on the GPU (the reference is numpy on the CPU)

Synthetic features stand in for a network's: 512-d image features, detector scores, templates made of photos
and video frames (medias), and IJB-C's 1:1 structure (each of the 19,593 verification templates against its subject's enrolment template and a
random 22.6 % of the other 3,530: 15.7M pairs, 19.6k genuine). The reference is a faithful re-implementation
of ``arcface_torch/eval_ijbc.py`` after feature extraction: its per-template loop (``np.where`` per template,
``np.unique`` of the medias, media means, sums), its ``template2id`` table and 100,000-pair numpy batches, and
scikit-learn's ``roc_curve`` (restated in numpy: stable descending sort, distinct thresholds,
``drop_intermediate``) with the table's closest-FPR rule. Both run in one process on the same inputs; the
script prints both timings, their ratio, the largest score difference and both TAR tables.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fastface_pl.evaluation.ijb import IJB_FARS, pair_scores, tar_at_far
from _record import add_json_argument, write_json

NOISE = 3.0  # per-dimension noise around each subject's centre: TAR@FAR=1e-4 about 42 % at full size
IJBC = {"images": 469_375, "enrolment": 3_531, "verification": 19_593, "pairs": 15_658_489, "genuine": 19_557}


def synthetic_ijbc(scale: float, dims: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    num_images = int(IJBC["images"] * scale)
    num_enrol, num_verif = max(2, int(IJBC["enrolment"] * scale)), max(2, int(IJBC["verification"] * scale))
    num_templates = num_enrol + num_verif
    identities = num_enrol  # every enrolment template is one subject; verification templates show one of them
    identity = np.concatenate([np.arange(num_enrol), rng.integers(0, identities, num_verif)])
    template_ids = rng.permutation(np.arange(1, 4 * num_templates))[:num_templates]  # sparse, unordered ids
    # images: every template at least one, the rest spread unevenly; medias: photos and videos of many frames
    owner = np.concatenate([np.arange(num_templates), rng.zipf(1.6, num_images - num_templates) % num_templates])
    rng.shuffle(owner)
    medias = np.where(rng.random(num_images) < 0.3, rng.integers(0, 1_000_000, num_images),  # a photo
                      rng.integers(0, 8, num_images))  # a frame of one of the template's few videos
    centres = rng.standard_normal((identities, dims), dtype=np.float32)
    features = centres[identity[owner]] + NOISE * rng.standard_normal((num_images, dims), dtype=np.float32)
    features *= rng.uniform(0.3, 2.0, (num_images, 1)).astype(np.float32)
    faceness = rng.uniform(0.5, 1.0, num_images).astype(np.float32)
    # pairs: enrolment x verification, a fraction of the grid; genuine ones are the same identity
    density = min(1.0, IJBC["pairs"] / (IJBC["enrolment"] * IJBC["verification"]))
    grid = rng.random((num_enrol, num_verif)) < density
    grid[identity[num_enrol:], np.arange(num_verif)] = True  # every verification template meets its subject
    first, second = np.nonzero(grid)
    second = second + num_enrol
    labels = (identity[first] == identity[second]).astype(np.int64)
    pairs = np.stack([template_ids[first], template_ids[second]], 1)
    return features, faceness, template_ids[owner], medias.astype(np.int64), pairs, labels


# ---------------------------------------------------------------- the reference, loop structure as eval_ijbc.py
def reference_image2template(img_feats, templates, medias):
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        template_feats[count_template] = np.sum(np.array(media_norm_feats), axis=0)
    norms = np.sqrt(np.sum(template_feats**2, -1, keepdims=True))  # sklearn.preprocessing.normalize
    return template_feats / np.where(norms == 0, 1, norms), unique_templates


def reference_verification(template_norm_feats, unique_templates, p1, p2):
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count_template, uqt in enumerate(unique_templates):
        template2id[uqt] = count_template
    score = np.zeros((len(p1),))
    total_pairs = np.array(range(len(p1)))
    batchsize = 100000
    for s in [total_pairs[i:i + batchsize] for i in range(0, len(p1), batchsize)]:
        feat1 = template_norm_feats[template2id[p1[s]]]
        feat2 = template_norm_feats[template2id[p2[s]]]
        score[s] = np.sum(feat1 * feat2, -1).flatten()
    return score


def reference_roc_curve(y_true, y_score):
    """sklearn.metrics.roc_curve(y_true, y_score) with its defaults, restated in numpy."""
    desc_score_indices = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[desc_score_indices], y_true[desc_score_indices]
    distinct_value_indices = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct_value_indices, y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    if len(fps) > 2:
        optimal_idxs = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps = fps[optimal_idxs], tps[optimal_idxs]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1]


def reference_pipeline(features, faceness, templates, medias, pairs, labels):
    img_input_feats = features * faceness[:, np.newaxis]  # norm score and detector score on (the defaults)
    template_norm_feats, unique_templates = reference_image2template(img_input_feats, templates, medias)
    score = reference_verification(template_norm_feats, unique_templates, pairs[:, 0], pairs[:, 1])
    fpr, tpr = reference_roc_curve(labels, score)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    tars = {}
    for far in IJB_FARS:
        _, min_index = min(list(zip(abs(fpr - far), range(len(fpr)))))
        tars[far] = tpr[min_index]
    return score, tars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's images, templates and pairs")
    parser.add_argument("--dims", type=int, default=512, help="feature dimension")
    parser.add_argument("--device", default="cpu", help="device for ours: cpu | cuda")
    add_json_argument(parser, "ijb")
    args = parser.parse_args()

    started = time.perf_counter()
    features, faceness, templates, medias, pairs, labels = synthetic_ijbc(args.scale, args.dims)
    print(f"synthetic IJB-C x {args.scale:g}: {len(features):,} images x {args.dims}, "
          f"{len(np.unique(templates)):,} templates, {len(np.unique(np.stack([templates, medias], 1), axis=0)):,} "
          f"medias, {len(pairs):,} pairs ({labels.sum():,} genuine); made in {time.perf_counter() - started:.1f} s")
    print(f"torch threads: {torch.get_num_threads()}, device for ours: {args.device}")

    started = time.perf_counter()
    reference_scores, reference_tars = reference_pipeline(features, faceness, templates, medias, pairs, labels)
    reference_seconds = time.perf_counter() - started

    feats = torch.from_numpy(features).to(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    scores = pair_scores(feats, faceness, templates, medias, pairs)
    tars = tar_at_far(torch.from_numpy(scores).to(args.device), torch.from_numpy(labels).to(args.device))
    ours_seconds = time.perf_counter() - started

    print(f"reference (numpy loops, eval_ijbc.py): {reference_seconds:8.2f} s")
    print(f"fastface_pl (pair_scores + tar_at_far): {ours_seconds:8.2f} s   ratio {ours_seconds / reference_seconds:.3f}")
    print(f"largest |score difference|: {np.abs(scores - reference_scores).max():.2e}")
    print(f"{'TAR (%) at FAR':<16}" + "".join(f"{far:>9.0e}" for far in IJB_FARS))
    print(f"{'reference':<16}" + "".join(f"{100 * reference_tars[far]:>9.2f}" for far in IJB_FARS))
    print(f"{'fastface_pl':<16}" + "".join(f"{100 * tars[far]:>9.2f}" for far in IJB_FARS))
    write_json(args, {"reference_seconds": reference_seconds, "ours_seconds": ours_seconds,
                      "ratio": ours_seconds / reference_seconds,
                      "largest_score_difference": float(np.abs(scores - reference_scores).max()),
                      "tar_at_far": {f"{far:.0e}": {"reference": float(reference_tars[far]), "ours": float(tars[far])}
                                     for far in IJB_FARS}}, "ijb")


if __name__ == "__main__":
    main()
