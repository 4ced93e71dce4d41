"""The 10-fold verification protocol (docs/evaluation.md): hand-computed cases and an independent loop version."""

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


def loop_protocol(distances, issame, num_folds=10):
    """Independent, deliberately plain version of InsightFace's calculate_roc accuracy (numpy, loops)."""
    distances, issame = np.asarray(distances, dtype=np.float64), np.asarray(issame, dtype=bool)
    n = len(distances)
    thresholds = np.arange(0, 4, 0.01)
    sizes = [n // num_folds + (1 if k < n % num_folds else 0) for k in range(num_folds)]
    starts = np.cumsum([0] + sizes)
    accuracies, chosen = [], []
    for k in range(num_folds):
        test = np.arange(starts[k], starts[k + 1])
        train = np.setdiff1d(np.arange(n), test)
        train_acc = [np.mean((distances[train] < t) == issame[train]) for t in thresholds]
        best = int(np.argmax(train_acc))
        chosen.append(thresholds[best])
        accuracies.append(np.mean((distances[test] < thresholds[best]) == issame[test]))
    return np.mean(accuracies), np.std(accuracies), np.mean(chosen)


def loop_tar_at_far(cosines, issame, far):
    """Best TAR over thresholds t (accept score ≥ t) whose FAR = #impostors ≥ t / #impostors is ≤ far."""
    cosines, issame = np.asarray(cosines), np.asarray(issame, dtype=bool)
    genuine, impostor = cosines[issame], cosines[~issame]
    best = 0.0
    for t in np.concatenate([np.unique(cosines), [np.inf]]):
        if np.mean(impostor >= t) <= far:
            best = max(best, np.mean(genuine >= t))
    return best


def test_hand_computed_separable_case():
    distances = [0.5, 3.0] * 5  # 10 pairs: genuine at 0.5, impostors at 3.0, one pair per fold
    issame = torch.tensor([True, False] * 5)
    result = evaluate_pairs(*pairs_with_distances(distances), issame)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert result["threshold"] == pytest.approx(0.51)  # first threshold with dist < t for every genuine pair
    assert result["xnorm"] == pytest.approx(1.0)
    assert result["tar_at_far"] == 1.0


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


def test_tar_at_far_against_independent_computation():
    generator = torch.Generator().manual_seed(0)
    genuine = torch.rand(300, generator=generator) * 0.8 + 0.1
    impostor = torch.rand(1000, generator=generator) * 0.8 - 0.5
    cosines = torch.cat([genuine, impostor]).double()
    issame = torch.cat([torch.ones(300, dtype=torch.bool), torch.zeros(1000, dtype=torch.bool)])
    order = torch.randperm(1300, generator=generator)
    cosines, issame = cosines[order], issame[order]
    angle = torch.arccos(cosines)
    emb_a = torch.stack([torch.ones_like(angle), torch.zeros_like(angle)], 1)
    emb_b = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    for far in (0.0105, 0.05):
        result = evaluate_pairs(emb_a, emb_b, issame, far=far)
        expected = loop_tar_at_far(cosines.numpy(), issame.numpy(), far)
        assert 0.0 < expected < 1.0
        assert result["tar_at_far"] == pytest.approx(expected, abs=1e-6)  # torchmetrics works in fp32


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
    assert set(computed) == {"accuracy", "accuracy_std", "threshold", "tar_at_far", "xnorm"}
    for key, value in expected.items():
        assert float(computed[key]) == pytest.approx(value, abs=1e-12)
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()


def test_tar_is_nan_without_impostors():
    result = evaluate_pairs(*pairs_with_distances([0.5] * 10), torch.ones(10, dtype=torch.bool))
    assert math.isnan(result["tar_at_far"]) and result["accuracy"] == 1.0


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
