"""Evaluation: the 10-fold pair-verification protocol (LFW, CFP-FP, AgeDB-30 …) as a torchmetrics metric, and
IJB-B/C 1:1 template verification (:mod:`fastface_pl.evaluation.ijb`), both as InsightFace computes them.

Names are imported lazily (on first use).
"""

from __future__ import annotations

from fastface_pl._lazy import lazy_exports

_EXPORTS = {
    "VerificationMetric": "fastface_pl.evaluation.verification",
    "evaluate_pairs": "fastface_pl.evaluation.verification",
    "verification_from_scores": "fastface_pl.evaluation.verification",
    "evaluate_ijb": "fastface_pl.evaluation.ijb",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
