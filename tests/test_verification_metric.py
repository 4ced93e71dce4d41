"""The 10-fold verification protocol (docs/evaluation.md): hand-computed cases and independent loop versions of
InsightFace's calculate_roc accuracy, calculate_val (VAL@FAR) and XNorm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastface_pl.evaluation import VerificationMetric, evaluate_pairs


def pairs_with_distances(distances, norms=(1.0, 1.0)):
    """Embedding pairs (in 2-D) whose normalised squared L2 distances are ``distances`` (cos = 1 − d/2)."""
    cos = 1.0 - torch.tensor(distances, dtype=torch.float64) / 2.0
    sin = torch.sqrt(1.0 - cos**2)
    emb_a = torch.stack([torch.ones_like(cos), torch.zeros_like(cos)], dim=1) * norms[0]
    emb_b = torch.stack([cos, sin], dim=1) * norms[1]
    return emb_a, emb_b


def loop_folds(n, num_folds):
    """(train, test) indices of each fold, as sklearn's KFold(shuffle=False) splits ``n`` pairs in file order."""
    sizes = [n // num_folds + (1 if k < n % num_folds else 0) for k in range(num_folds)]
    starts = np.cumsum([0] + sizes)
    for k in range(num_folds):
        test = np.arange(starts[k], starts[k + 1])
        yield np.setdiff1d(np.arange(n), test), test


def loop_protocol(distances, issame, num_folds=10):
    """Independent, deliberately plain version of InsightFace's calculate_roc accuracy (numpy, loops)."""
    distances, issame = np.asarray(distances, dtype=np.float64), np.asarray(issame, dtype=bool)
    thresholds = np.arange(0, 4, 0.01)
    accuracies, chosen = [], []
    for train, test in loop_folds(len(distances), num_folds):
        train_acc = [np.mean((distances[train] < t) == issame[train]) for t in thresholds]
        best = int(np.argmax(train_acc))
        chosen.append(thresholds[best])
        accuracies.append(np.mean((distances[test] < thresholds[best]) == issame[test]))
    return np.mean(accuracies), np.std(accuracies), np.mean(chosen)


def legacy_slinear(x, y, value):
    """interp1d(x, y, kind="slinear")(value) as scipy evaluated it before it refused repeated x: the degree-1
    B-spline with knots [x0, x..., x_last] and coefficients y, its interval found as scipy's find_interval."""
    t = [x[0], *x, x[-1]]
    k, n = 1, len(t) - 2
    interval = k
    while value >= t[interval + 1] and interval + 1 != n:
        interval += 1
    left, right = t[interval], t[interval + 1]
    return y[interval - 1] * (right - value) / (right - left) + y[interval] * (value - left) / (right - left)


def loop_val_far(threshold, distances, issame):
    accept = distances < threshold
    return np.sum(accept & issame) / np.sum(issame), np.sum(accept & ~issame) / np.sum(~issame)


def loop_calculate_val(distances, issame, far_target, num_folds=10):
    """InsightFace's calculate_val, with loops, on distances in file order."""
    distances, issame = np.asarray(distances, dtype=np.float64), np.asarray(issame, dtype=bool)
    thresholds = np.arange(0, 4, 0.001)
    vals, fars = [], []
    for train, test in loop_folds(len(distances), num_folds):
        far_train = np.array([loop_val_far(t, distances[train], issame[train])[1] for t in thresholds])
        threshold = legacy_slinear(far_train, thresholds, far_target) if far_train.max() >= far_target else 0.0
        val, far = loop_val_far(threshold, distances[test], issame[test])
        vals.append(val)
        fars.append(far)
    return np.mean(vals), np.std(vals), np.mean(fars)


def test_hand_computed_separable_case():
    distances = [0.5, 3.0] * 5  # 10 pairs: genuine at 0.5, impostors at 3.0, one pair per fold
    issame = torch.tensor([True, False] * 5)
    result = evaluate_pairs(*pairs_with_distances(distances), issame)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert result["threshold"] == pytest.approx(0.51)  # first threshold with dist < t for every genuine pair
    assert result["xnorm"] == pytest.approx(1.0)
    # VAL is undefined on the five folds without a genuine pair (the reference divides by zero there)
    assert math.isnan(result["val_at_far"]) and math.isnan(result["far"])  # and FAR on those without impostors
    doubled = evaluate_pairs(*pairs_with_distances(distances * 2), torch.cat([issame, issame]), num_folds=5)
    assert doubled["val_at_far"] == 1.0 and doubled["val_at_far_std"] == 0.0
    # train FAR jumps from 0 (t = 3.000) to 1 (t = 3.001): interpolated at 1e-3 the threshold is 3.000001, just
    # above the held-out impostors at 3.0, which are all accepted (calculate_val does the same)
    assert doubled["far"] == 1.0


def test_hand_computed_case_with_one_hard_positive():
    # fold 0 holds a genuine pair at distance 3.5: trained on the rest, t = 0.51 rejects it (accuracy 0);
    # every other fold still picks t = 0.51 (8 of 9 right) and gets its pair right: accuracies 0, 1, …, 1.
    distances = [3.5, 3.0, 0.5, 3.0, 0.5, 3.0, 0.5, 3.0, 0.5, 3.0]
    issame = torch.tensor([True, False, True, False, True, False, True, False, True, False])
    emb_a, emb_b = pairs_with_distances(distances, norms=(2.0, 4.0))
    result = evaluate_pairs(emb_a, emb_b, issame)
    assert result["accuracy"] == pytest.approx(0.9)
    assert result["accuracy_std"] == pytest.approx(0.3)  # population std of (0, 1 × 9)
    assert result["threshold"] == pytest.approx(0.51)
    assert result["xnorm"] == pytest.approx(3.0)  # mean of the unnormalised norms 2 and 4


@pytest.mark.parametrize("num_pairs", [100, 137])
def test_matches_independent_loop_version_on_random_pairs(num_pairs):
    generator = torch.Generator().manual_seed(num_pairs)
    issame = torch.rand(num_pairs, generator=generator) < 0.5
    emb_a = torch.randn(num_pairs, 16, generator=generator)
    noise = torch.randn(num_pairs, 16, generator=generator)
    emb_b = torch.where(issame.unsqueeze(1), emb_a + 0.9 * noise, noise) * 3.0
    result = evaluate_pairs(emb_a, emb_b, issame)
    a = emb_a.double() / emb_a.double().norm(dim=1, keepdim=True)
    b = emb_b.double() / emb_b.double().norm(dim=1, keepdim=True)
    accuracy, std, threshold = loop_protocol(((a - b) ** 2).sum(1).numpy(), issame.numpy())
    assert 0.6 < accuracy < 1.0  # a non-trivial case
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert result["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert result["threshold"] == pytest.approx(threshold, abs=1e-12)


@pytest.mark.parametrize("num_pairs, far", [(600, 1e-3), (1000, 1e-2), (1370, 0.05)])
def test_val_at_far_matches_calculate_val(num_pairs, far):
    generator = torch.Generator().manual_seed(num_pairs)
    issame = torch.rand(num_pairs, generator=generator) < 0.5
    emb_a = torch.randn(num_pairs, 32, generator=generator)
    noise = torch.randn(num_pairs, 32, generator=generator)
    emb_b = torch.where(issame.unsqueeze(1), emb_a + 1.2 * noise, noise)
    result = evaluate_pairs(emb_a, emb_b, issame, far=far)
    a = emb_a.double() / emb_a.double().norm(dim=1, keepdim=True)
    b = emb_b.double() / emb_b.double().norm(dim=1, keepdim=True)
    val, val_std, far_mean = loop_calculate_val(((a - b) ** 2).sum(1).numpy(), issame.numpy(), far)
    assert 0.05 < val < 1.0  # a non-trivial case
    assert result["val_at_far"] == pytest.approx(val, abs=1e-12)
    assert result["val_at_far_std"] == pytest.approx(val_std, abs=1e-12)
    assert result["far"] == pytest.approx(far_mean, abs=1e-12)


def test_val_threshold_interpolation_with_repeated_fars():
    # train FARs repeat on long runs (0 up to the first impostor): the threshold lies between the last one at
    # or below the target and the next, where the old scipy put it and where the current one raises
    far_train = np.array([0.0, 0.0, 0.0, 0.001, 0.001, 0.003, 0.003, 0.01])
    thresholds = np.arange(8) * 0.001
    assert legacy_slinear(far_train, thresholds, 0.002) == pytest.approx(0.0045)
    assert legacy_slinear(far_train, thresholds, 0.001) == pytest.approx(0.004)
    assert legacy_slinear(far_train, thresholds, 0.0) == pytest.approx(0.002)


def test_xnorm_is_the_mean_norm_of_image_and_flip_embeddings():
    generator = torch.Generator().manual_seed(4)
    views_a = torch.randn(40, 2, 8, generator=generator) * torch.tensor([1.0, 3.0]).view(1, 2, 1)
    views_b = torch.randn(40, 2, 8, generator=generator)
    issame = torch.rand(40, generator=generator) < 0.5
    result = evaluate_pairs(views_a, views_b, issame)
    norms = [np.linalg.norm(v) for views in (views_a, views_b) for pair in views.numpy() for v in pair]
    assert result["xnorm"] == pytest.approx(np.mean(norms), rel=1e-12)
    # pairs are scored on the sum of the views: the same as on their mean
    summed = evaluate_pairs(views_a.mean(1), views_b.mean(1), issame)
    assert result["accuracy"] == summed["accuracy"] and result["val_at_far"] == summed["val_at_far"]
    assert result["xnorm"] > summed["xnorm"]  # the norm of a mean is smaller than the mean of norms


def test_metric_in_batches_equals_function_and_resets():
    generator = torch.Generator().manual_seed(1)
    issame = torch.rand(64, generator=generator) < 0.5
    emb_a = torch.randn(64, 8, generator=generator)
    emb_b = torch.where(issame.unsqueeze(1), emb_a + 0.5 * torch.randn(64, 8, generator=generator),
                        torch.randn(64, 8, generator=generator))
    metric = VerificationMetric()
    for start in range(0, 64, 10):
        metric.update(emb_a[start:start + 10], emb_b[start:start + 10], issame[start:start + 10])
    computed = metric.compute()
    expected = evaluate_pairs(emb_a, emb_b, issame)
    assert set(computed) == {"accuracy", "accuracy_std", "threshold", "val_at_far", "val_at_far_std", "far", "xnorm"}
    for key, value in expected.items():
        assert float(computed[key]) == pytest.approx(value, abs=1e-12)
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()


def test_val_is_nan_without_impostors():
    result = evaluate_pairs(*pairs_with_distances([0.5] * 10), torch.ones(10, dtype=torch.bool))
    assert math.isnan(result["val_at_far"]) and math.isnan(result["far"]) and result["accuracy"] == 1.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: VerificationMetric(num_folds=1), "num_folds"),
        (lambda: VerificationMetric(far=0.0), "far"),
        (lambda: evaluate_pairs(torch.randn(5, 4), torch.randn(5, 4), torch.ones(5, dtype=torch.bool)),
         "at least num_folds=10 pairs"),
        (lambda: evaluate_pairs(torch.randn(12, 4), torch.randn(12, 3), torch.ones(12, dtype=torch.bool)),
         "shape"),
    ],
)
def test_invalid_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
