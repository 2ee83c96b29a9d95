"""Training: loss, loop and checkpoints."""

from .checkpoint import load_weights, save_weights
from .losses import soft_dice_loss
from .trainer import TrainResult, train

__all__ = ["load_weights", "save_weights", "soft_dice_loss", "TrainResult", "train"]
