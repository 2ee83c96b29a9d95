"""Evaluation: per-image metrics, summaries, and the run evaluator."""

from .metrics import RocAccumulator, hausdorff, image_metrics, roc_auc, roc_curve, summarize

__all__ = ["RocAccumulator", "hausdorff", "image_metrics", "roc_auc", "roc_curve", "summarize"]
