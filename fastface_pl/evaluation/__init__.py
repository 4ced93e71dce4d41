"""Evaluation: the 10-fold pair-verification protocol (LFW, CFP-FP, AgeDB-30 …) as a torchmetrics metric."""

from fastface_pl.evaluation.verification import VerificationMetric, evaluate_pairs, verification_from_scores

__all__ = ["VerificationMetric", "evaluate_pairs", "verification_from_scores"]
