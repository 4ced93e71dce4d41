"""Margin heads: from cosine logits and labels to the scaled logits of a margin softmax (docs/models.md).

Each head changes only the *target* logit cos θ_y of every sample and multiplies all logits by the scale s:

=================  ===========================================  ====================================
name               target logit                                 gradient w.r.t. cos θ_y
=================  ===========================================  ====================================
``arcface``        cos(θ + m), m = 0.5                          1 (straight-through, arcface_torch)
``arcface_exact``  cos(θ + m); cos θ − m·sin m when θ + m > π   d cos(θ + m) / d cos θ
``cosface``        cos θ − m, m = 0.4                           1
``combined``       cos(m1·θ + m2) − m3                          straight-through (default) or exact
=================  ===========================================  ====================================

The paper presets use ``arcface`` (MS1MV3) and ``cosface`` (WebFace). ``arcface`` is the convention of
InsightFace's ``arcface_torch`` and of the FastFace code: the margin is applied under ``no_grad`` and the
gradient passes to cos θ as if there were no margin. ``arcface_exact`` is textbook ArcFace: it differentiates
through cos(θ + m) = cos θ·cos m − sin θ·sin m, whose derivative cos m + cos θ·sin m / sin θ grows without
bound as θ → 0; it is kept finite by a floor on sin θ (see :func:`safe_sin_from_cos`). Beyond θ + m > π,
where cos(θ + m) would rise again, it uses InsightFace's classic rule cos θ − m·sin m (monotone in θ).

Heads expose :meth:`MarginHead.target_logit` (an elementwise function of the target cosines, unscaled) and
the scale ``s``; the classification layers (:mod:`fastface_pl.models.classifiers`) use those two directly
in a fused, memory-lean cross-entropy. :meth:`MarginHead.forward` is the readable full-matrix form.

Example::

    head = build_margin("arcface", s=64.0, m=0.5)
    logits = head(cosine, labels)            # cosine: float[B, C] in [-1, 1], labels: long[B] (-1 = ignore)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-1)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fastface_pl.errors import ConfigurationError
from fastface_pl.argument_checks import check_real

__all__ = [
    "MarginHead",
    "ArcFace",
    "ArcFaceExact",
    "CosFace",
    "CombinedMargin",
    "MARGINS",
    "build_margin",
    "safe_sin_from_cos",
    "safe_arccos",
    "clamp_cosine",
]

IGNORE_LABEL = -1
# Floor on sin²θ: sin θ ≥ 1e-6 keeps gradients finite at cos θ = ±1 and changes values by at most 1e-6.
_SIN2_FLOOR = 1e-12


def clamp_cosine(cosine: torch.Tensor) -> torch.Tensor:
    """Clamps to [−1, 1] with gradient 1 everywhere (torch's clamp gives 0 at the bounds themselves)."""
    return cosine + (cosine.clamp(-1.0, 1.0) - cosine).detach()


def safe_sin_from_cos(cosine: torch.Tensor) -> torch.Tensor:
    """sin θ = sqrt(1 − cos²θ) for θ in [0, π], with a floor of 1e-6 so the gradient stays finite at ±1."""
    return (1.0 - cosine * cosine).clamp_min(_SIN2_FLOOR).sqrt()


class _SafeArccos(torch.autograd.Function):
    """arccos with a finite gradient at ±1: d/dx arccos x = −1 / max(sqrt(1 − x²), 1e-6)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clamp(-1.0, 1.0)
        ctx.save_for_backward(x)
        return torch.arccos(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return -grad / safe_sin_from_cos(x)


def safe_arccos(x: torch.Tensor) -> torch.Tensor:
    """θ = arccos(clamp(x, −1, 1)) whose gradient is finite everywhere (see :class:`_SafeArccos`)."""
    return _SafeArccos.apply(x)


class MarginHead(nn.Module):
    """Base class: modifies the target cosine and scales every logit by ``s``.

    Args:
        s: the scale s (64 in the paper); logits are s·cos θ_j for j ≠ y and s·target_logit(cos θ_y).

    Subclasses implement :meth:`target_logit`.
    """

    name = "base"

    def __init__(self, s: float = 64.0) -> None:
        super().__init__()
        self.s = check_real("s", s, 0.0, 1e4)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """Maps target cosines ``float[N]`` (in [−1, 1]) to unscaled margin logits, differentiable per the
        head's gradient convention."""
        raise NotImplementedError

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits ``s · cosine`` with each row's target entry replaced by the margin logit.

        Args:
            cosine: ``float[B, C]`` cosines (clamped here to [−1, 1], with gradient 1: see :func:`clamp_cosine`).
            labels: ``long[B]`` class indices in [0, C), or −1 for a row without a target (left unchanged).

        Returns:
            ``float[B, C]`` logits (a new tensor; ``cosine`` is not modified).
        """
        if cosine.dim() != 2 or labels.dim() != 1 or labels.shape[0] != cosine.shape[0]:
            raise ValueError(f"expected cosine [B, C] and labels [B], got {list(cosine.shape)} and {list(labels.shape)}")
        logits = clamp_cosine(cosine)
        rows = (labels != IGNORE_LABEL).nonzero().squeeze(1)
        cols = labels[rows]
        target = self.target_logit(logits[rows, cols])
        logits = logits.index_put((rows, cols), target.to(logits.dtype))
        return logits * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}"


class CosFace(MarginHead):
    """CosFace (large margin cosine loss): target cos θ − m (m = 0.4 in the paper's WebFace runs)."""

    name = "cosface"

    def __init__(self, s: float = 64.0, m: float = 0.4) -> None:
        super().__init__(s)
        self.m = check_real("m", m, 0.0, 2.0, low_open=False)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.m

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class ArcFace(MarginHead):
    """ArcFace, straight-through (arcface_torch / FastFace convention; the paper presets use it).

    Value cos(θ + m) with m = 0.5; gradient w.r.t. cos θ is 1, as if there were no margin (the margin is
    computed under ``no_grad``). Never NaN: the arccos input is clamped to [−1, 1].
    """

    name = "arcface"

    def __init__(self, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__(s)
        self.m = check_real("m", m, 0.0, math.pi, low_open=False)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            shifted = torch.cos(torch.arccos(cos_target.clamp(-1.0, 1.0)) + self.m)
        return cos_target + (shifted - cos_target.detach())

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class ArcFaceExact(MarginHead):
    """Textbook ArcFace: differentiates through cos(θ + m); cos θ − m·sin m where θ + m > π.

    cos(θ + m) = cos θ·cos m − sin θ·sin m with sin θ from :func:`safe_sin_from_cos`, so gradients are finite
    at cos θ = ±1 (the true derivative is unbounded as θ → 0). "Easy margin" is off.
    """

    name = "arcface_exact"

    def __init__(self, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__(s)
        self.m = check_real("m", m, 0.0, math.pi, low_open=False)
        self.cos_m, self.sin_m = math.cos(self.m), math.sin(self.m)
        self.threshold = math.cos(math.pi - self.m)  # θ + m > π  ⇔  cos θ < cos(π − m)
        self.fallback_offset = self.m * self.sin_m

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        cos_target = clamp_cosine(cos_target)
        arc = cos_target * self.cos_m - safe_sin_from_cos(cos_target) * self.sin_m
        return torch.where(cos_target > self.threshold, arc, cos_target - self.fallback_offset)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class CombinedMargin(MarginHead):
    """Combined margin (m1, m2, m3): target cos(m1·θ + m2) − m3, all three margins at once (InsightFace's
    original combined loss, docs/models.md).

    ArcFace is (1, 0.5, 0), CosFace (1, 0, 0.4), SphereFace-like (m1 > 1, 0, 0).

    .. note:: arcface_torch's ``CombinedMarginLoss`` is not this formula in general: it handles (1, m2, 0)
       (ArcFace, the same values as here) and, whenever m3 > 0, computes cos θ − m3, ignoring m1 and m2 (it
       refuses m1 ≠ 1 with m3 = 0). Here every margin applies. They agree on ArcFace and CosFace.

    Args:
        s: scale.
        m1: multiplicative angular margin (≥ 1).
        m2: additive angular margin.
        m3: additive cosine margin.
        straight_through: if True (default, as arcface_torch's ArcFace branch), the angular part
            cos(m1·θ + m2) is computed under ``no_grad`` (with no rule beyond π, as there) and the gradient
            w.r.t. cos θ is 1. If False,
            differentiates through it (with :func:`safe_arccos`) and uses cos θ − m3 − m2·sin m2 where
            m1·θ + m2 > π (the ArcFace-exact rule; for m1 = 1, m3 = 0 it equals ``arcface_exact``).
    """

    name = "combined"

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 straight_through: bool = True) -> None:
        super().__init__(s)
        self.m1 = check_real("m1", m1, 1.0, 10.0, low_open=False)
        self.m2 = check_real("m2", m2, 0.0, math.pi, low_open=False)
        self.m3 = check_real("m3", m3, 0.0, 2.0, low_open=False)
        self.straight_through = bool(straight_through)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        if self.straight_through:  # arcface_torch's CombinedMarginLoss: no rule beyond π
            with torch.no_grad():
                shifted = torch.cos(self.m1 * torch.arccos(cos_target.clamp(-1.0, 1.0)) + self.m2)
            return cos_target + (shifted - cos_target.detach()) - self.m3
        angle = self.m1 * safe_arccos(cos_target) + self.m2
        fallback = clamp_cosine(cos_target) - self.m2 * math.sin(self.m2)
        return torch.where(angle <= math.pi, torch.cos(angle), fallback) - self.m3

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, straight_through={self.straight_through}"


MARGINS: dict[str, type[MarginHead]] = {
    "arcface": ArcFace,
    "arcface_exact": ArcFaceExact,
    "cosface": CosFace,
    "combined": CombinedMargin,
}


def build_margin(name: str, **kwargs: Any) -> MarginHead:
    """Builds a margin head by name (``arcface``, ``arcface_exact``, ``cosface``, ``combined``).

    Raises:
        ValueError: unknown name (lists the valid ones) or invalid arguments.
    """
    if name not in MARGINS:
        raise ConfigurationError(f"unknown margin {name!r}; valid names: {', '.join(MARGINS)}")
    try:
        return MARGINS[name](**kwargs)
    except TypeError as error:
        raise ConfigurationError(f"invalid arguments for margin {name!r}: {error}") from error
