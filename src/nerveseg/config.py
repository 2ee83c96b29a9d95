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

AUGMENTATIONS = (
    "shear", "hflip", "vflip", "gamma", "contrast", "speckle", "scale",
    # nnU-Net's kind (Isensee et al. 2021), batched in torch: data/augment.py
    "rotate", "elastic", "brightness", "noise", "blur", "lowres",
)
SCHEDULES = ("constant", "cosine", "poly")
LOSSES = ("dice", "dice_ce")
CHECKPOINTS = ("best", "last")
OPTIMIZERS = ("adam", "adamw")
DATA_CACHES = ("memory", "disk")
ENCODER_WEIGHTS = (None, "imagenet")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

MAX_MODEL_PARAMETERS = 100_000_000
"""Largest network a run folder's config.json may describe (11x the largest registered network
at its defaults): a config.json from elsewhere must not make nerveseg allocate gigabytes."""


@dataclass
class ModelConfig:
    """Which architecture and its constructor arguments (``nerveseg.models.create``)."""

    arch: str = "sa_unet"
    kwargs: dict[str, Any] = field(default_factory=dict)
    # where a from-scratch training run takes its encoder's first weights: None = random init,
    # "imagenet" = the architecture's ImageNet weights (``load_pretrained_encoder``; only networks
    # with a pretrained encoder have them). Read once when training starts: the run's safetensors
    # hold everything after that, so inference never needs the weights' package
    encoder_weights: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise ConfigError(f"model.arch must be an architecture name, got {self.arch!r}")
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise ConfigError(f"model.kwargs must be an object of constructor arguments, got {self.kwargs!r}")
        if self.encoder_weights not in ENCODER_WEIGHTS:
            raise ConfigError(f"model.encoder_weights must be one of {list(ENCODER_WEIGHTS)}, got {self.encoder_weights!r}")


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
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 16 <= self.size <= 4096 or self.size % 16:
            raise ConfigError(f"size must be a multiple of 16 between 16 and 4096, got {self.size}")


def check_open_fraction(value, name: str) -> None:
    """``value`` must be a number strictly between 0 and 1 (a share of the images held out)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ConfigError(f"{name} must be between 0 and 1 (exclusive), got {value!r}")


@dataclass
class DataConfig:
    """Which data and which part of it is used for training and validation."""

    # one data folder, or several trained on together (a list in config.json): folds and splits
    # are then made within each folder (grouped by subject) and joined, so every fold holds its
    # share of each folder, and evaluation reports each folder as well as all of them
    data_dir: str | tuple[str, ...] = ""
    label: int | str | None = None  # pixel value, or a LabelMe shape name
    seed: int = 0
    val_fraction: float | None = 0.2
    folds: int | None = None
    fold: int | None = None
    # with folds: a subject-grouped fraction of the training folds becomes the validation set that
    # picks the checkpoint, and the held-out fold becomes the test set (``test_stems``, `evaluate
    # --subset test`), so no reported image chooses an epoch
    fold_val_fraction: float | None = None
    max_train_images: int | None = None
    # multi-class: one network output per entry (pixel values or LabelMe names), in this order;
    # None = the single class ``label``. The first class is the primary one (the nerve).
    labels: tuple[int | str, ...] | None = None
    label_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data_dir, (list, tuple)):
            dirs = tuple(self.data_dir)
            if not dirs or not all(isinstance(d, str) and d for d in dirs):
                raise ConfigError(f"data_dir must be a folder or a list of folders, got {list(dirs)!r}")
            if len(set(dirs)) != len(dirs):
                raise ConfigError(f"data_dir lists a folder twice: {list(dirs)}")
            self.data_dir = dirs[0] if len(dirs) == 1 else dirs
        elif not isinstance(self.data_dir, str):
            raise ConfigError(f"data_dir must be a folder or a list of folders, got {self.data_dir!r}")
        if self.labels is not None:
            self.labels = tuple(self.labels)
            if not self.labels or len(set(self.labels)) != len(self.labels):
                raise ConfigError(f"labels must be distinct and non-empty, got {list(self.labels)}")
            if self.label is not None and self.label != self.labels[0]:
                raise ConfigError(f"label {self.label!r} and labels {list(self.labels)} disagree: the first of --labels is the nerve")
            self.label = self.labels[0]
        if self.label_names is not None:
            self.label_names = tuple(self.label_names)
            if len(self.label_names) != len(self.class_labels) or len(set(self.label_names)) != len(self.label_names):
                raise ConfigError(f"need one distinct name per label: labels {list(self.class_labels)}, names {list(self.label_names)}")
            bad = [n for n in self.label_names if not n.replace("_", "").isalnum()]
            if bad:
                raise ConfigError(f"label names must be letters, digits or _ (they become file names and columns): {bad}")
        if self.folds is not None:
            if self.fold is None:
                raise ConfigError("--folds needs --fold (0-based index of the validation fold)")
            if self.folds < 2 or not 0 <= self.fold < self.folds:
                raise ConfigError(f"need folds >= 2 and 0 <= fold < folds, got folds={self.folds} fold={self.fold}")
            self.val_fraction = None
        elif self.fold is not None:
            raise ConfigError("--fold needs --folds")
        if self.fold_val_fraction is not None:
            if self.folds is None:
                raise ConfigError("fold_val_fraction splits the training folds: it needs folds and fold")
            check_open_fraction(self.fold_val_fraction, "fold_val_fraction")
        elif self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction} (0: train on everything)")
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ConfigError("max_train_images must be >= 1")

    @property
    def data_dirs(self) -> tuple[str, ...]:
        """Every data folder of the run, in the order given (one for most runs)."""
        return self.data_dir if isinstance(self.data_dir, tuple) else (self.data_dir,)

    @property
    def class_labels(self) -> tuple[int | str | None, ...]:
        """The label of each network output channel."""
        return self.labels if self.labels is not None else (self.label,)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the output channels: the nerve first (its outputs keep their historic names)."""
        if self.label_names is not None:
            return self.label_names
        if self.labels is None:
            return ("nerve",)
        return ("nerve",) + tuple(f"class{label}" for label in self.labels[1:])


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
    # levers beyond the paper (issue 10); each off by default, so the paper's recipe is unchanged
    loss: str = "dice"  # "dice_ce": soft Dice + binary cross-entropy per class (nnU-Net's default pairing)
    deep_supervision: bool = False  # auxiliary heads on the decoder levels, training only
    checkpoint: str = "best"  # "last": keep the final epoch (no selection on the validation fold)
    init_from: str | None = None  # weights to start from: a run folder (recorded as given)
    # the training's randomness (initial weights, batch order, augmentation draws); None = data.seed.
    # Another value on the same data.seed trains a second model on the same split (a seed ensemble)
    seed: int | None = None
    # scale (issue 13): how the data is held and how several processes share BatchNorm statistics
    data_cache: str = "memory"  # "disk": decode once into memory-mapped files, read by DataLoader workers
    loader_workers: int = 2  # DataLoader worker processes for data_cache = "disk"
    sync_batchnorm: bool = False  # under torchrun: BatchNorm statistics of the global batch, not each rank's
    # torch.compile mode for the training step ("default", "reduce-overhead" = CUDA graphs, ...): SA-UNet's
    # many small kernels leave a GPU waiting on launches; None = eager
    compile: str | None = None
    # regularisation (issue 10: the shipped recipe scores 0.81 on its training images, 0.59 held out).
    # "adamw" decays the weights apart from the gradient (Loshchilov & Hutter), where "adam" adds
    # weight_decay * w to the gradient, which Adam's scaling then undoes for rarely-updated weights
    optimizer: str = "adam"
    # exponential moving average of the weights, decay per step, with BatchNorm statistics re-measured
    # for it on the training images each epoch; the average, not the last step's weights, is validated
    # and saved as model.safetensors. None = off
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        self.augment = tuple(self.augment)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.ema_decay is not None and (isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float))
                                           or not 0 < self.ema_decay < 1):
            raise ConfigError(f"train.ema_decay must be a number in (0, 1) or null, got {self.ema_decay!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < float("inf")):
            raise ConfigError(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.checkpoint not in CHECKPOINTS:
            raise ConfigError(f"unknown checkpoint policy {self.checkpoint!r}; choose from {', '.join(CHECKPOINTS)}")
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise ConfigError(f"unknown augmentation(s) {unknown}; choose from {', '.join(AUGMENTATIONS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.data_cache not in DATA_CACHES:
            raise ConfigError(f"unknown data cache {self.data_cache!r}; choose from {', '.join(DATA_CACHES)}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ConfigError(f"unknown compile mode {self.compile!r}; choose from {', '.join(COMPILE_MODES)}")
        if self.loader_workers < 0:
            raise ConfigError("loader_workers must be >= 0")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.lr == float("inf"):
            raise ConfigError("epochs and batch_size must be >= 1 and lr > 0")


@dataclass
class InferenceConfig:
    """How probabilities are made and cleaned at inference; chosen on cross-validation, saved with the model."""

    tta: bool = False  # average with the prediction of the horizontally mirrored image
    keep_largest: tuple[str, ...] = ()  # class names whose mask keeps only its largest component
    # probability cut for every class's mask; an ensemble's averaged probabilities may want a lower
    # one than a single model's 0.5 (where members disagree, their mean drops under 0.5)
    threshold: float = 0.5
    # measurements whose mean probability inside the mask is under this get the low_confidence QC
    # flag; how confident a model is where it is wrong depends on the model (an ensemble's averaged
    # probabilities run lower), so the cut is chosen with it on cross-validation
    # (studies/qc_flags_cv.py) and saved here
    low_confidence: float = 0.7

    def __post_init__(self) -> None:
        self.keep_largest = tuple(self.keep_largest)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 < self.threshold < 1:
            raise ConfigError(f"inference.threshold must be a number in (0, 1), got {self.threshold!r}")
        self.threshold = float(self.threshold)
        if (isinstance(self.low_confidence, bool) or not isinstance(self.low_confidence, (int, float))
                or not 0 <= self.low_confidence <= 1):
            raise ConfigError(f"inference.low_confidence must be a number in [0, 1], got {self.low_confidence!r}")
        self.low_confidence = float(self.low_confidence)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # filled by training: which images were used, so evaluation can pick the unseen ones
    train_stems: list[str] = field(default_factory=list)
    val_stems: list[str] = field(default_factory=list)
    # the held-out fold when the validation set came from the training folds (data.fold_val_fraction)
    test_stems: list[str] = field(default_factory=list)
    nerveseg_version: str = ""
    # an ensemble folder: the member run folders, relative to it; predictions average their probabilities
    members: list[str] = field(default_factory=list)
    # a routed model: the sub-folder of its anatomy router (router.safetensors, router.json); each image then
    # goes to the one member the router names (members = the router's routes) instead of their average
    router: str = ""
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    recipe: str = ""  # the named recipe the run started from ("" = assembled from flags)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"]["augment"] = list(self.train.augment)
        d["inference"]["keep_largest"] = list(self.inference.keep_largest)
        if isinstance(self.data.data_dir, tuple):
            d["data"]["data_dir"] = list(self.data.data_dir)
        for key in ("labels", "label_names"):
            if d["data"][key] is not None:
                d["data"][key] = list(d["data"][key])
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
            test_stems=list(d.get("test_stems", [])),
            nerveseg_version=d.get("nerveseg_version", ""),
            members=list(d.get("members", [])),
            router=str(d.get("router", "")),
            inference=InferenceConfig(**d.get("inference", {})),
            recipe=d.get("recipe", ""),
        )

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """Read and check a run's config.json. It may come from anywhere (a downloaded run folder),
        so every problem is a ConfigError naming the file: unreadable or invalid JSON, wrong types,
        invalid values, an unknown architecture, constructor arguments it does not take, or a
        network larger than ``MAX_MODEL_PARAMETERS`` (checked on the meta device: nothing is
        allocated)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON and UTF-8 errors
            raise ConfigError(f"{path}: cannot read run configuration ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a run configuration is a JSON object, got {type(data).__name__}")
        for key in ("model", "preprocess", "data", "train", "inference"):
            if not isinstance(data.get(key, {}), dict):
                raise ConfigError(f"{path}: '{key}' must be an object, got {type(data[key]).__name__}")
        for key in ("train_stems", "val_stems", "test_stems", "members"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: '{key}' must be a list of names")
        if not isinstance(data.get("router", ""), str):
            raise ConfigError(f"{path}: 'router' must be the name of the router's sub-folder")
        try:
            config = cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ConfigError(f"{path}: cannot read run configuration ({type(exc).__name__}: {exc})") from None
        check_model_config(config.model, path)
        return config


def check_model_config(model: ModelConfig, path: str | Path | None = None) -> int:
    """Build ``model`` on the meta device (no memory is allocated) and return its parameter count;
    ConfigError (naming ``path``) for an unknown architecture, arguments it refuses or a network
    over ``MAX_MODEL_PARAMETERS``."""
    import torch

    from .models import create

    where = f"{path}: " if path is not None else ""
    try:
        with torch.device("meta"):
            network = create(model.arch, **model.kwargs)
        n = sum(p.numel() for p in network.parameters())
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    except Exception as exc:  # constructors raise ValueError, RuntimeError, ... for bad values
        raise ConfigError(f"{where}bad arguments for architecture {model.arch!r}: {type(exc).__name__}: {exc}") from None
    if n > MAX_MODEL_PARAMETERS:
        raise ConfigError(f"{where}architecture {model.arch!r} with {model.kwargs} has {n:,} parameters; "
                          f"the limit is {MAX_MODEL_PARAMETERS:,}")
    return n
