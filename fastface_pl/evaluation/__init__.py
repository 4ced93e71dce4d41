"""Evaluation: the 10-fold pair-verification protocol (LFW, CFP-FP, AgeDB-30 …) as a torchmetrics metric, and
IJB-B/C 1:1 template verification (:mod:`fastface_pl.evaluation.ijb`), both as InsightFace computes them.

Names are imported lazily (on first use).
"""

from __future__ import annotations

from fastface_pl._lazy import lazy_exports

_MODULES = {
    "fastface_pl.evaluation.verification": ("VerificationMetric", "evaluate_pairs", "verification_from_scores"),
    "fastface_pl.evaluation.ijb": ("evaluate_ijb",),
}

__all__ = sorted(name for names in _MODULES.values() for name in names)


__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
