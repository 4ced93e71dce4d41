"""Face verification on image pairs (LFW, CFP-FP, AgeDB-30 …) with InsightFace's 10-fold protocol.

docs/evaluation.md: embeddings are L2-normalised, pairs scored by squared L2 distance (0 … 4); the pairs are
split into 10 consecutive folds (no shuffling; the first ``P mod 10`` folds get one pair more, as
scikit-learn's ``KFold``); for each fold the threshold in {0, 0.01, …, 3.99} with the best accuracy on the
other 9 folds (the first one on ties) gives the accuracy on that fold ("same" when distance < threshold).
Reported: mean and population std (``ddof=0``) of the 10 accuracies, the mean chosen threshold, VAL@FAR
(default FAR 1e-3) as InsightFace's ``calculate_val`` (mean ± std over the folds, and the mean FAR reached on
the held-out folds) and XNorm, the mean norm of the image and flip embeddings (``docs/evaluation.md``).

VAL@FAR: on the 9 training folds the FAR of every distance threshold in {0, 0.001, …, 3.999} is computed and
the threshold reaching the target FAR interpolated linearly (as ``scipy.interpolate.interp1d(far, thresholds,
kind="slinear")`` did before scipy refused the repeated FAR values that every fold has: between the last
threshold whose FAR is ≤ the target and the next one); 0 when no threshold reaches the target. VAL is the
fraction of genuine pairs of the held-out fold under that threshold (NaN for a fold without genuine pairs).

Example::

    metric = VerificationMetric()
    for emb_a, emb_b, issame in batches:      # unnormalised embeddings [B, D] or [B, 2, D] (image, flip)
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
from torchmetrics.utilities import dim_zero_cat

from fastface_pl.errors import ConfigurationError

__all__ = ["VerificationMetric", "evaluate_pairs", "verification_from_scores"]

THRESHOLD_STEP = 0.01
THRESHOLD_MAX = 4.0
VAL_THRESHOLD_STEP = 0.001  # calculate_val's finer grid


def _check_args(num_folds: int, far: float) -> None:
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ConfigurationError(f"num_folds must be an integer >= 2, got {num_folds!r}")
    if isinstance(far, bool) or not isinstance(far, (int, float)) or not 0.0 < far < 1.0:
        raise ConfigurationError(f"far must be in (0, 1), got {far!r}")


def _fold_ids(num_pairs: int, num_folds: int, device: torch.device) -> torch.Tensor:
    """Fold index of every pair: consecutive folds, the first ``num_pairs % num_folds`` one pair larger."""
    base, extra = divmod(num_pairs, num_folds)
    sizes = torch.tensor([base + (1 if k < extra else 0) for k in range(num_folds)], device=device)
    return torch.repeat_interleave(torch.arange(num_folds, device=device), sizes)


def _val_at_far(distances: torch.Tensor, issame: torch.Tensor, folds: torch.Tensor, num_folds: int,
                far: float) -> dict[str, torch.Tensor]:
    """InsightFace's ``calculate_val``: VAL on each held-out fold at the threshold that reaches ``far`` on the rest."""
    device = distances.device
    thresholds = torch.arange(0, round(THRESHOLD_MAX / VAL_THRESHOLD_STEP), device=device, dtype=torch.float64)
    thresholds = thresholds * VAL_THRESHOLD_STEP
    num_thresholds = thresholds.numel()
    # a pair is accepted at threshold j (distance < thresholds[j]) for every j >= its bucket
    bucket = torch.searchsorted(thresholds, distances, right=True)
    impostor = ~issame
    counts = torch.zeros(num_folds, num_thresholds + 1, dtype=torch.int64, device=device)
    counts.index_put_((folds[impostor], bucket[impostor]), torch.ones_like(bucket[impostor]), accumulate=True)
    accepted = counts.cumsum(dim=1)[:, :num_thresholds]  # impostors accepted per fold and threshold [F, T]
    impostors = torch.bincount(folds[impostor], minlength=num_folds)
    train_far = (accepted.sum(0, keepdim=True) - accepted).double() / (impostors.sum() - impostors).unsqueeze(1)
    # interp1d(train_far, thresholds, kind="slinear")(far): train_far is non-decreasing in the threshold
    lo = ((train_far <= far).sum(dim=1) - 1).clamp(min=0)
    hi = (lo + 1).clamp(max=num_thresholds - 1)
    far_lo, far_hi = train_far.gather(1, lo[:, None])[:, 0], train_far.gather(1, hi[:, None])[:, 0]
    weight = 1.0 / (far_hi - far_lo)
    interpolated = thresholds[lo] * (weight * (far_hi - far)) + thresholds[hi] * (weight * (far - far_lo))
    interpolated = torch.where(far_hi > far_lo, interpolated, thresholds[lo])
    chosen = torch.where(train_far.max(dim=1).values >= far, interpolated, torch.zeros_like(interpolated))
    accept = distances.unsqueeze(0) < chosen.unsqueeze(1)  # [F, P]
    in_fold = folds.unsqueeze(0) == torch.arange(num_folds, device=device).unsqueeze(1)
    genuine_in_fold = (in_fold & issame).sum(1)
    val = (accept & in_fold & issame).sum(1).double() / genuine_in_fold  # NaN for a fold without genuine pairs
    fold_far = (accept & in_fold & impostor).sum(1).double() / (in_fold & impostor).sum(1)
    return {"val_at_far": val.mean(), "val_at_far_std": val.std(correction=0), "far": fold_far.mean()}


def verification_from_scores(distances: torch.Tensor, issame: torch.Tensor, num_folds: int = 10,
                             far: float = 1e-3) -> dict[str, torch.Tensor]:
    """The protocol on precomputed scores.

    Args:
        distances: ``float[P]`` squared L2 distances of the normalised embeddings.
        issame: ``bool[P]``.
        num_folds: folds of the cross-validation.
        far: the FAR target of VAL@FAR.

    Returns:
        dict of 0-d float64 tensors: ``accuracy``, ``accuracy_std``, ``threshold``, ``val_at_far``,
        ``val_at_far_std``, ``far`` (the mean FAR reached on the held-out folds); the VAL entries are NaN
        when there are no genuine or no impostor pairs.
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
    }
    nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
    num_same = int(issame.sum())
    if 0 < num_same < num_pairs:
        result.update(_val_at_far(distances, issame, folds, num_folds, far))
    else:
        result.update(val_at_far=nan, val_at_far_std=nan, far=nan)
    return result


def _pair_scores(emb_a: torch.Tensor, emb_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 distances of the normalised (view-summed) embeddings, and the norms of every view."""
    emb_a, emb_b = emb_a.detach().double(), emb_b.detach().double()
    if emb_a.dim() == 3:  # [P, V, D]: image and flip embeddings
        norms = torch.cat([emb_a.norm(dim=2).flatten(), emb_b.norm(dim=2).flatten()])
        emb_a, emb_b = emb_a.sum(dim=1), emb_b.sum(dim=1)
    else:
        norms = torch.cat([emb_a.norm(dim=1), emb_b.norm(dim=1)])
    a, b = F.normalize(emb_a, dim=1), F.normalize(emb_b, dim=1)
    return (a - b).pow(2).sum(dim=1), norms


def _check_pairs(emb_a: torch.Tensor, emb_b: torch.Tensor, issame: torch.Tensor) -> None:
    if emb_a.dim() not in (2, 3) or emb_a.shape != emb_b.shape or issame.shape != (emb_a.shape[0],):
        raise ValueError(
            f"expected emb_a and emb_b of shape [P, D] (or [P, V, D]: image and flip embeddings) and issame of "
            f"shape [P], got {list(emb_a.shape)}, "
            f"{list(emb_b.shape)} and {list(issame.shape)}"
        )


def evaluate_pairs(emb_a: torch.Tensor, emb_b: torch.Tensor, issame: torch.Tensor, num_folds: int = 10,
                   far: float = 1e-3) -> dict[str, float]:
    """The 10-fold verification protocol on unnormalised embeddings, without Lightning or torchmetrics state.

    Args:
        emb_a, emb_b: ``float[P, D]`` embeddings of the two images of each pair (in file order), or
            ``float[P, V, D]`` with the embeddings of V views (image and flip): the pair is scored on their sum
            and XNorm averages the norms of all views, as InsightFace.
        issame: ``bool[P]`` whether each pair shows one identity.
        num_folds: folds (10 in the protocol).
        far: the FAR target of VAL@FAR.

    Returns:
        dict of floats: ``accuracy``, ``accuracy_std``, ``threshold``, ``val_at_far``, ``val_at_far_std``,
        ``far``, ``xnorm``.
    """
    emb_a, emb_b, issame = torch.as_tensor(emb_a), torch.as_tensor(emb_b), torch.as_tensor(issame)
    _check_pairs(emb_a, emb_b, issame)
    distances, norms = _pair_scores(emb_a, emb_b)
    result = verification_from_scores(distances, issame, num_folds, far)
    result["xnorm"] = norms.mean()
    return {key: float(value) for key, value in result.items()}


class VerificationMetric(Metric):
    """torchmetrics version of :func:`evaluate_pairs`: accumulate pairs with ``update``, then ``compute``.

    Args:
        num_folds: folds of the cross-validation (10).
        far: the FAR target of VAL@FAR (1e-3).

    ``update(emb_a, emb_b, issame)`` takes *unnormalised* embeddings ``float[B, D]`` or ``float[B, V, D]``
    (image and flip; scored on their sum) and ``issame bool[B]``; XNorm is the mean norm of all embeddings
    given. Only distances and norms are kept, not the embeddings. ``compute()`` returns a dict of 0-d
    tensors: ``accuracy``, ``accuracy_std``, ``threshold``, ``val_at_far``, ``val_at_far_std``, ``far``,
    ``xnorm``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_folds: int = 10, far: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_args(num_folds, far)
        self.num_folds, self.far = num_folds, float(far)
        self.add_state("distances", default=[], dist_reduce_fx="cat")
        self.add_state("issame", default=[], dist_reduce_fx="cat")
        self.add_state("norms", default=[], dist_reduce_fx="cat")

    def update(self, emb_a: torch.Tensor, emb_b: torch.Tensor, issame: torch.Tensor) -> None:  # type: ignore[override]
        _check_pairs(emb_a, emb_b, issame)
        distances, norms = _pair_scores(emb_a, emb_b)
        self.distances.append(distances)
        self.issame.append(issame.bool())
        self.norms.append(norms)

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        # A list before any update; after the sync across ranks (DDP) torchmetrics has concatenated it to a tensor.
        if isinstance(self.distances, list) and not self.distances:
            raise ValueError("VerificationMetric.compute() called before any update(): no pairs to evaluate")
        result = verification_from_scores(dim_zero_cat(self.distances), dim_zero_cat(self.issame),
                                           self.num_folds, self.far)
        result["xnorm"] = dim_zero_cat(self.norms).mean()
        return result
