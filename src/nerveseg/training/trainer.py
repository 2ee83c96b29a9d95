"""The training loop: the paper's recipe by default, CPU-fast, resumable, atomic."""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..config import RunConfig
from ..data.augment import augment_batch
from ..data.cache import TensorSet, load_tensor_set
from ..data.samples import discover_samples, split_samples
from ..errors import ConfigError, InputError
from ..io_utils import atomic_write_csv, atomic_write_json
from ..models import create
from .checkpoint import load_training_state, save_training_state, save_weights, transfer_weights
from .losses import supervised_loss

HISTORY_FIELDS = ("epoch", "train_loss", "val_dice", "lr", "seconds")


@dataclass
class TrainResult:
    run_dir: Path
    best_val_dice: float
    best_epoch: int
    epochs_run: int
    seconds: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast: ~3x faster training steps on this CPU, same accuracy in our runs."""
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def learning_rate(cfg, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a step, as a pure function of position, so a resumed run agrees."""
    t = epoch + step / steps_per_epoch
    if cfg.warmup_epochs and t < cfg.warmup_epochs:
        return cfg.lr * (t + 1 / steps_per_epoch) / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    progress = min(1.0, (t - cfg.warmup_epochs) / span)
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "poly":  # nnU-Net's: lr (1 - t/T)^0.9
        return cfg.lr * (1 - progress) ** 0.9
    return cfg.lr


def _standardized(images: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    return (images - stats[:, 0, None, None, None]) / stats[:, 1, None, None, None]


@torch.no_grad()
def validation_dice(model, data: TensorSet, device, amp: bool, channels_last: bool, batch_size: int = 8) -> float:
    """Mean per-image Dice of the first (nerve) class at the network resolution (threshold 0.5),
    for checkpoint choice.

    Final figures come from ``nerveseg evaluate`` at the original resolution; this is the
    cheap in-loop estimate used only to pick the best epoch.
    """
    model.eval()
    dices = []
    for start in range(0, len(data), batch_size):
        x = _standardized(data.images[start : start + batch_size], data.stats[start : start + batch_size]).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            pred = model(x)[:, :1].float() >= 0
        truth = data.masks[start : start + batch_size, :1].to(device) >= 0.5
        inter = (pred & truth).flatten(1).sum(1).float()
        total = (pred.flatten(1).sum(1) + truth.flatten(1).sum(1)).float()
        dices.append(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).cpu())
    model.train()
    return float(torch.cat(dices).mean()) if dices else float("nan")


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_history(path: Path, rows: list[dict]) -> None:
    atomic_write_csv(path, rows, HISTORY_FIELDS)


def prepare_split(config: RunConfig, log=print) -> tuple[list, list]:
    """Find the samples, split them by subject and fill ``train_stems``/``val_stems``."""
    samples, problems = discover_samples(config.data.data_dir)
    for problem in problems:
        log(f"warning: skipped {problem}")
    if not samples:
        raise InputError(config.data.data_dir, "no usable image/mask pairs", "see the warnings above")
    if config.data.folds is not None:
        train, val = split_samples(samples, seed=config.data.seed, folds=config.data.folds, fold=config.data.fold)
    elif not config.data.val_fraction:
        # no validation: train on every non-test image and keep the last epoch (final models)
        train, val = [s for s in samples if s.split != "test"], []
    else:
        train, val = split_samples(samples, seed=config.data.seed, val_fraction=config.data.val_fraction)
    if config.data.max_train_images is not None and len(train) > config.data.max_train_images:
        order = np.random.default_rng(config.data.seed).permutation(len(train))
        train = [train[i] for i in sorted(order[: config.data.max_train_images])]
    config.train_stems = [s.stem for s in train]
    config.val_stems = [s.stem for s in val]
    return train, val


def model_kwargs(config: RunConfig) -> dict:
    """The architecture's constructor arguments with what the data and recipe imply: one output
    per class, auxiliary heads under deep supervision. Left out at their defaults, so a
    single-class paper-recipe config stays as it was."""
    kwargs = dict(config.model.kwargs)
    if len(config.data.class_labels) > 1:
        kwargs["out_channels"] = len(config.data.class_labels)
    if config.train.deep_supervision:
        kwargs["deep_supervision"] = True
    return kwargs


def resolve_init_from(init_from: str, fold: int | None = None) -> Path:
    """The run folder whose weights ``--init-from`` means: "default" is the shipped model; an
    ensemble folder gives its member for ``fold`` (member 0 without a fold)."""
    if init_from == "default":
        from ..pretrained import pretrained_dir

        source = pretrained_dir()
    else:
        source = Path(init_from)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise InputError(source, "--init-from needs a run folder (config.json + model.safetensors)",
                         "pass a folder written by `nerveseg train`, or 'default' for the shipped model")
    members = RunConfig.load(config_path).members
    if members:
        source = source / members[(fold or 0) % len(members)]
    return source


def train(config: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True, log=None) -> TrainResult:
    """Train ``config`` into ``out_dir``; with ``resume`` continue an interrupted run there.

    Writes ``config.json``, ``model.safetensors`` (best validation Dice; the last epoch when
    there is no validation set, ``val_fraction=0``), ``last.safetensors``
    (weights + optimizer + loop state for resuming) and ``history.csv``; every write is atomic.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out_dir)
    config_path, last_path = out / "config.json", out / "last.safetensors"
    if resume:
        if not config_path.exists():
            raise ConfigError(f"{out}: nothing to resume (no config.json); start without --resume")
        # a run killed during an atomic write leaves its temporary file (io_utils: .NAME.XXXX.tmp.SUFFIX);
        # a run folder has one writer, so on resume every such file is an orphan
        for name in ("config.json", "model.safetensors", "last.safetensors", "history.csv"):
            for orphan in out.glob(f".{name}.*.tmp*"):
                orphan.unlink(missing_ok=True)
        saved = RunConfig.load(config_path)
        saved.train.epochs = config.train.epochs  # the only thing a resume may change: run longer
        config = saved
    elif config_path.exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    cfg = config.train
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)

    train_samples, val_samples = prepare_split(config, log)
    if resume and (config.train_stems != RunConfig.load(config_path).train_stems):
        raise ConfigError(f"{out}: the data folder changed since this run started; cannot resume on another split")
    size = config.preprocess.size
    label = config.data.labels if config.data.labels is not None else config.data.label
    train_set, problems = load_tensor_set(train_samples, size, label)
    val_set, val_problems = load_tensor_set(val_samples, size, label)
    for problem in problems + val_problems:
        log(f"warning: skipped {problem}")
    if len(train_set) == 0:
        raise InputError(config.data.data_dir, "no usable training pairs", "see the warnings above")
    config.train_stems, config.val_stems = train_set.stems, val_set.stems
    config.nerveseg_version = __version__
    # keep the decoded set on the training device: on a GPU, batches and their augmentation then
    # never cross the bus (the random draws still come from the CPU generator, so a run is the
    # same on either device up to floating point)
    train_set, val_set = train_set.to(device), val_set.to(device)
    out.mkdir(parents=True, exist_ok=True)
    config.model.kwargs = model_kwargs(config)
    atomic_write_json(config_path, config.to_dict())
    torch.manual_seed(config.data.seed)  # the same seed gives the same initial weights
    model = create(config.model.arch, **config.model.kwargs)
    if cfg.init_from and not (resume and last_path.exists()):
        source = resolve_init_from(cfg.init_from, config.data.fold)
        skipped = transfer_weights(model, source / "model.safetensors")
        log(f"initialised from {source}" + (f" (kept fresh: {', '.join(skipped)})" if skipped else ""))
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = _read_history(out / "history.csv")
    start_epoch, best_dice, best_epoch = 0, -1.0, -1
    if resume and last_path.exists():
        state = load_training_state(model, optimizer, last_path)
        start_epoch, best_dice, best_epoch = state["epoch"] + 1, state["best_val_dice"], state["best_epoch"]
        history = history[:start_epoch]
        log(f"resuming {out} at epoch {start_epoch + 1}/{cfg.epochs} (best val Dice {best_dice:.4f})")

    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch,
        initial=start_epoch * steps_per_epoch,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        # one generator per epoch seeded by (seed, epoch): a resumed run draws the same batches
        gen = torch.Generator().manual_seed(config.data.seed * 100_003 + epoch)
        order = torch.randperm(len(train_set), generator=gen).to(device)
        losses = []
        bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            images, masks = augment_batch(
                train_set.images[idx], train_set.masks[idx], cfg.augment, cfg.shear_degrees, generator=gen
            )
            x = _standardized(images, train_set.stats[idx]).to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = masks.to(device)
            lr = learning_rate(cfg, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast_context(device, cfg.amp):
                output = model(x)
            loss = supervised_loss(cfg.loss, output, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", val_dice=f"{max(best_dice, 0):.4f}")
        val_dice = validation_dice(model, val_set, device, cfg.amp, cfg.channels_last) if len(val_set) else float("nan")
        improved = len(val_set) > 0 and val_dice > best_dice
        if improved:
            best_dice, best_epoch = val_dice, epoch
        elif len(val_set) == 0:
            best_epoch = epoch
        if improved or len(val_set) == 0 or cfg.checkpoint == "last":
            save_weights(model, out / "model.safetensors", metadata={"epoch": str(epoch), "val_dice": f"{val_dice:.6f}"})
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": f"{np.mean(losses):.6f}",
                "val_dice": f"{val_dice:.6f}",
                "lr": f"{lr:.3e}",
                "seconds": f"{time.perf_counter() - epoch_start:.2f}",
            }
        )
        _write_history(out / "history.csv", history)
        save_training_state(
            model, optimizer, last_path, {"epoch": epoch, "best_val_dice": best_dice, "best_epoch": best_epoch}
        )
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", val_dice=f"{val_dice:.4f}")
    bar.close()
    return TrainResult(out, best_dice, best_epoch + 1, cfg.epochs - start_epoch, time.perf_counter() - t0)


def fold_run_name(fold: int) -> str:
    return f"fold_{fold}"


def ensemble_config(fold_configs: list[RunConfig], members: list[str]) -> RunConfig:
    """The config.json of an ensemble folder: the members' shared recipe, their union of training
    images (so ``--subset unseen`` means images no member saw), and the member folders."""
    first = fold_configs[0]
    config = RunConfig.from_dict(first.to_dict())
    config.data.folds = config.data.fold = config.data.val_fraction = None  # the members hold their splits
    config.train_stems = sorted({s for c in fold_configs for s in c.train_stems})
    config.val_stems = []
    config.members = list(members)
    return config


def train_all_folds(config: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True, log=None) -> list[TrainResult]:
    """Cross-validation that ships: train fold k of ``config.data.folds`` into ``OUT/fold_k`` for
    every k, then write ``OUT/config.json`` naming them as ``members``, which makes ``OUT`` an
    ensemble that every predictor and command loads like one model (probabilities averaged).
    Each fold validates on its own held-out fold (``nerveseg evaluate --subset cv`` scores
    every member there: the cross-validated figure). Resumable fold by fold; the ensemble's
    config.json is written last, so its presence means all folds finished."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if config.data.folds is None:
        raise ConfigError("--all-folds needs --folds K")
    out = Path(out_dir)
    if (out / "config.json").exists() and not resume:
        raise ConfigError(f"{out} already holds an ensemble; pass --resume or choose another --out")
    results, configs, members = [], [], []
    for fold in range(config.data.folds):
        fold_config = RunConfig.from_dict(config.to_dict())
        fold_config.data.fold = fold
        run_dir = out / fold_run_name(fold)
        log(f"fold {fold + 1}/{config.data.folds} -> {run_dir}")
        results.append(train(fold_config, run_dir, resume=resume and (run_dir / "config.json").exists(),
                             progress=progress, log=log))
        configs.append(RunConfig.load(run_dir / "config.json"))
        members.append(fold_run_name(fold))
    atomic_write_json(out / "config.json", ensemble_config(configs, members).to_dict())
    return results
