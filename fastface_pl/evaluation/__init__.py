"""Evaluation: the 10-fold pair-verification protocol (LFW, CFP-FP, AgeDB-30 …) as a torchmetrics metric, and
IJB-B/C 1:1 template verification (:mod:`fastface_pl.evaluation.ijb`), both as InsightFace computes them."""

from fastface_pl.evaluation.verification import VerificationMetric, evaluate_pairs, verification_from_scores

__all__ = ["VerificationMetric", "evaluate_pairs", "verification_from_scores"]
