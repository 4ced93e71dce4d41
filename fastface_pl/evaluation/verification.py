"""Face verification on image pairs (LFW, CFP-FP, AgeDB-30 …) with InsightFace's 10-fold protocol.

docs/evaluation.md: embeddings are L2-normalised, pairs scored by squared L2 distance (0 … 4); the pairs are
split into 10 consecutive folds (no shuffling; the first ``P mod 10`` folds get one pair more, as
scikit-learn's ``KFold``); for each fold the threshold in {0, 0.01, …, 3.99} with the best accuracy on the
other 9 folds (the first one on ties) gives the accuracy on that fold ("same" when distance < threshold).
Reported: mean and population std (``ddof=0``) of the 10 accuracies, the mean chosen threshold, the mean
embedding norm (XNorm) and TAR at FAR (default 1e-3) over all pairs from the cosine scores.

Example::

    metric = VerificationMetric()
    for emb_a, emb_b, issame in batches:      # unnormalised embeddings, issame bool[B]
        metric.update(emb_a, emb_b, issame)
    metric.compute()["accuracy"]

    evaluate_pairs(emb_a, emb_b, issame)      # the same, without torchmetrics state

.. note:: pairs must arrive in their file order for the folds to match InsightFace's. Under DDP, gathered
   states are concatenated rank by rank, which reorders the pairs (and so the folds): evaluate on one device
   for numbers comparable with published ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_sensitivity_at_specificity
from torchmetrics.utilities import dim_zero_cat

__all__ = ["VerificationMetric", "evaluate_pairs", "verification_from_scores"]

THRESHOLD_STEP = 0.01
THRESHOLD_MAX = 4.0


def _check_args(num_folds: int, far: float) -> None:
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}")
    if isinstance(far, bool) or not isinstance(far, (int, float)) or not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far!r}")


def _fold_ids(num_pairs: int, num_folds: int, device: torch.device) -> torch.Tensor:
    """Fold index of every pair: consecutive folds, the first ``num_pairs % num_folds`` one pair larger."""
    base, extra = divmod(num_pairs, num_folds)
    sizes = torch.tensor([base + (1 if k < extra else 0) for k in range(num_folds)], device=device)
    return torch.repeat_interleave(torch.arange(num_folds, device=device), sizes)


def verification_from_scores(distances: torch.Tensor, cosines: torch.Tensor, issame: torch.Tensor,
                             num_folds: int = 10, far: float = 1e-3) -> dict[str, torch.Tensor]:
    """The protocol on precomputed scores.

    Args:
        distances: ``float[P]`` squared L2 distances of the normalised embeddings.
        cosines: ``float[P]`` cosine similarities (for TAR at FAR).
        issame: ``bool[P]``.
        num_folds: folds of the cross-validation.
        far: false accept rate at which TAR is read.

    Returns:
        dict of 0-d float64 tensors: ``accuracy``, ``accuracy_std``, ``threshold``, ``tar_at_far``
        (NaN if there are no genuine or no impostor pairs).
    """
    _check_args(num_folds, far)
    num_pairs = distances.numel()
    if num_pairs < num_folds:
        raise ValueError(f"need at least num_folds={num_folds} pairs for the {num_folds}-fold protocol, got {num_pairs}")
    device = distances.device
    distances = distances.double().flatten()
    issame = issame.bool().flatten()
    thresholds = torch.arange(0, round(THRESHOLD_MAX / THRESHOLD_STEP), device=device, dtype=torch.float64)
    thresholds = thresholds * THRESHOLD_STEP
    folds = _fold_ids(num_pairs, num_folds, device)
    correct = (distances.unsqueeze(0) < thresholds.unsqueeze(1)) == issame.unsqueeze(0)  # [T, P]
    per_fold = torch.zeros(thresholds.numel(), num_folds, dtype=torch.int64, device=device)
    per_fold.index_add_(1, folds, correct.long())  # correct counts [T, F]
    fold_sizes = torch.bincount(folds, minlength=num_folds)
    total = per_fold.sum(dim=1, keepdim=True)
    train_correct = total - per_fold  # counts on the other folds, same denominator for every threshold
    best = train_correct.argmax(dim=0)  # first maximum, like numpy.argmax
    accuracies = per_fold[best, torch.arange(num_folds, device=device)].double() / fold_sizes.double()
    result = {
        "accuracy": accuracies.mean(),
        "accuracy_std": accuracies.std(correction=0),
        "threshold": thresholds[best].mean(),
        "tar_at_far": torch.tensor(math.nan, dtype=torch.float64, device=device),
    }
    num_same = int(issame.sum())
    if 0 < num_same < num_pairs:
        # cosine in [-1, 1] mapped to [0, 1] so torchmetrics does not apply a sigmoid
        probabilities = ((cosines.double().flatten() + 1.0) / 2.0).clamp(0.0, 1.0)
        sensitivity, _ = binary_sensitivity_at_specificity(probabilities, issame.long(), min_specificity=1.0 - far)
        result["tar_at_far"] = sensitivity.double()
    return result


def _pair_scores(emb_a: torch.Tensor, emb_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    emb_a, emb_b = emb_a.detach().double(), emb_b.detach().double()
    norms = torch.cat([emb_a.norm(dim=1), emb_b.norm(dim=1)])
    a, b = F.normalize(emb_a, dim=1), F.normalize(emb_b, dim=1)
    return (a - b).pow(2).sum(dim=1), (a * b).sum(dim=1), norms


def _check_pairs(emb_a: torch.Tensor, emb_b: torch.Tensor, issame: torch.Tensor) -> None:
    if emb_a.dim() != 2 or emb_a.shape != emb_b.shape or issame.shape != (emb_a.shape[0],):
        raise ValueError(
            f"expected emb_a and emb_b of shape [P, D] and issame of shape [P], got {list(emb_a.shape)}, "
            f"{list(emb_b.shape)} and {list(issame.shape)}"
        )


def evaluate_pairs(emb_a: torch.Tensor, emb_b: torch.Tensor, issame: torch.Tensor, num_folds: int = 10,
                   far: float = 1e-3) -> dict[str, float]:
    """The 10-fold verification protocol on unnormalised embeddings, without Lightning or torchmetrics state.

    Args:
        emb_a, emb_b: ``float[P, D]`` embeddings of the two images of each pair (in file order).
        issame: ``bool[P]`` whether each pair shows one identity.
        num_folds: folds (10 in the protocol).
        far: FAR at which ``tar_at_far`` is read.

    Returns:
        dict of floats: ``accuracy``, ``accuracy_std``, ``threshold``, ``tar_at_far``, ``xnorm``.
    """
    emb_a, emb_b, issame = torch.as_tensor(emb_a), torch.as_tensor(emb_b), torch.as_tensor(issame)
    _check_pairs(emb_a, emb_b, issame)
    distances, cosines, norms = _pair_scores(emb_a, emb_b)
    result = verification_from_scores(distances, cosines, issame, num_folds, far)
    result["xnorm"] = norms.mean()
    return {key: float(value) for key, value in result.items()}


class VerificationMetric(Metric):
    """torchmetrics version of :func:`evaluate_pairs`: accumulate pairs with ``update``, then ``compute``.

    Args:
        num_folds: folds of the cross-validation (10).
        far: false accept rate for ``tar_at_far`` (1e-3).

    ``update(emb_a, emb_b, issame)`` takes *unnormalised* embeddings ``float[B, D]`` (normalised here; XNorm
    is the mean norm of all of them) and ``issame bool[B]``. Only scores are kept (4 numbers per pair), not
    the embeddings. ``compute()`` returns a dict of 0-d tensors: ``accuracy``, ``accuracy_std``,
    ``threshold``, ``tar_at_far``, ``xnorm``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_folds: int = 10, far: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_args(num_folds, far)
        self.num_folds, self.far = num_folds, float(far)
        self.add_state("distances", default=[], dist_reduce_fx="cat")
        self.add_state("cosines", default=[], dist_reduce_fx="cat")
        self.add_state("issame", default=[], dist_reduce_fx="cat")
        self.add_state("norms", default=[], dist_reduce_fx="cat")

    def update(self, emb_a: torch.Tensor, emb_b: torch.Tensor, issame: torch.Tensor) -> None:  # type: ignore[override]
        _check_pairs(emb_a, emb_b, issame)
        distances, cosines, norms = _pair_scores(emb_a, emb_b)
        self.distances.append(distances)
        self.cosines.append(cosines)
        self.issame.append(issame.bool())
        self.norms.append(norms)

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        # A list before any update; after the sync across ranks (DDP) torchmetrics has concatenated it to a tensor.
        if isinstance(self.distances, list) and not self.distances:
            raise ValueError("VerificationMetric.compute() called before any update(): no pairs to evaluate")
        result = verification_from_scores(dim_zero_cat(self.distances), dim_zero_cat(self.cosines),
                                           dim_zero_cat(self.issame), self.num_folds, self.far)
        result["xnorm"] = dim_zero_cat(self.norms).mean()
        return result
