"""Inference: a predictor for trained runs, overlays, and batch segmentation of files."""

from .predictor import Predictor
from .segment import segment_files

__all__ = ["Predictor", "segment_files"]
