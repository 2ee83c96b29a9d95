"""Typed run configuration, validated on construction and saved with every run.

A run folder holds ``config.json`` = ``asdict(RunConfig)``: everything needed to rebuild the
network and preprocess an image exactly as in training (nnU-Net's and smp's habit: the
checkpoint carries its own recipe).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

AUGMENTATIONS = ("shear", "hflip", "vflip", "gamma", "contrast", "speckle", "scale")
SCHEDULES = ("constant", "cosine")


@dataclass
class ModelConfig:
    """Which architecture and its constructor arguments (``nerveseg.models.create``)."""

    arch: str = "sa_unet"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreprocessConfig:
    """How an image becomes a network input; identical in training and inference.

    The image (one float channel in [0, 1]) is scaled to fit ``size`` x ``size`` keeping its
    aspect ratio, padded with black (0) on the bottom/right, then standardised with the mean and
    SD of its own unpadded pixels (per-image z-score: ultrasound gain differs between
    acquisitions, so a fixed dataset mean would be wrong for a new machine).
    """

    size: int = 256

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 4096 or self.size % 16:
            raise ConfigError(f"size must be a multiple of 16 between 16 and 4096, got {self.size}")


@dataclass
class DataConfig:
    """Which data and which part of it is used for training and validation."""

    data_dir: str = ""
    label: int | str | None = None  # pixel value, or a LabelMe shape name
    seed: int = 0
    val_fraction: float | None = 0.2
    folds: int | None = None
    fold: int | None = None
    max_train_images: int | None = None

    def __post_init__(self) -> None:
        if self.folds is not None:
            if self.fold is None:
                raise ConfigError("--folds needs --fold (0-based index of the validation fold)")
            if self.folds < 2 or not 0 <= self.fold < self.folds:
                raise ConfigError(f"need folds >= 2 and 0 <= fold < folds, got folds={self.folds} fold={self.fold}")
            self.val_fraction = None
        elif self.fold is not None:
            raise ConfigError("--fold needs --folds")
        elif self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction} (0: train on everything)")
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ConfigError("max_train_images must be >= 1")


@dataclass
class TrainConfig:
    """The optimisation recipe. Defaults are the paper's: soft Dice loss, Adam 5e-4, batch 4,
    random shear of -15..15 degrees along x and y as the only augmentation, constant rate."""

    epochs: int = 30
    batch_size: int = 4
    lr: float = 5e-4
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: int = 0
    augment: tuple[str, ...] = ("shear",)
    shear_degrees: float = 15.0
    amp: bool = True  # bf16 autocast on CPU, bf16 on CUDA when supported
    channels_last: bool = True
    num_threads: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        self.augment = tuple(self.augment)
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise ConfigError(f"unknown augmentation(s) {unknown}; choose from {', '.join(AUGMENTATIONS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and batch_size must be >= 1 and lr > 0")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # filled by training: which images were used, so evaluation can pick the unseen ones
    train_stems: list[str] = field(default_factory=list)
    val_stems: list[str] = field(default_factory=list)
    nerveseg_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"]["augment"] = list(self.train.augment)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return cls(
            model=ModelConfig(**d.get("model", {})),
            preprocess=PreprocessConfig(**d.get("preprocess", {})),
            data=DataConfig(**d.get("data", {})),
            train=TrainConfig(**d.get("train", {})),
            train_stems=list(d.get("train_stems", [])),
            val_stems=list(d.get("val_stems", [])),
            nerveseg_version=d.get("nerveseg_version", ""),
        )

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot read run configuration ({exc})") from None
