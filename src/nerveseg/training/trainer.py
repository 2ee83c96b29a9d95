"""The training loop: the paper's recipe by default, CPU-fast, resumable, atomic."""

from __future__ import annotations

import csv
import math
import os
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
from ..data.disk_cache import DiskTensorSet, GlobalBatchSampler, load_disk_tensor_set
from ..data.samples import discover_datasets, split_samples
from ..errors import ConfigError, InputError
from ..io_utils import atomic_write_csv, atomic_write_json, leftover_temporaries
from ..models import create, has_pretrained_encoder
from .checkpoint import load_training_state, save_training_state, save_weights, transfer_weights
from .distributed import DistributedContext, convert_sync_batchnorm, init_distributed, rank_device, unwrap
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


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Without it oneDNN emulates
    bf16 and a training step is slower than fp32: an SA-UNet step at 256 px, batch 4, took 15.5 s
    in bf16 against 2.5 s in fp32 on a 2-core AVX2 AMD EPYC (2026-12-03)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast: ~3x faster training steps on CPUs with native bf16, same accuracy in our
    runs; on a CPU without it (``cpu_has_fast_bf16``) ``amp`` means fp32, the faster path there."""
    if not enabled or (device.type == "cpu" and not cpu_has_fast_bf16()):
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


def _batches(data: TensorSet | DiskTensorSet, batch_size: int):
    """(images, masks, stats) in order, ``batch_size`` at a time, from memory or the disk cache."""
    for start in range(0, len(data), batch_size):
        if isinstance(data, DiskTensorSet):
            yield data.batch(range(start, min(start + batch_size, len(data))))
        else:
            end = start + batch_size
            yield data.images[start:end], data.masks[start:end], data.stats[start:end]


@torch.no_grad()
def validation_dice(model, data: TensorSet | DiskTensorSet, device, amp: bool, channels_last: bool,
                    batch_size: int = 8) -> float:
    """Mean per-image Dice of the first (nerve) class at the network resolution (threshold 0.5),
    for checkpoint choice.

    Final figures come from ``nerveseg evaluate`` at the original resolution; this is the
    cheap in-loop estimate used only to pick the best epoch.
    """
    model.eval()
    dices = []
    for images, masks, stats in _batches(data, batch_size):
        x = _standardized(images.to(device), stats.to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            pred = model(x)[:, :1].float() >= 0
        truth = masks[:, :1].to(device) >= 0.5
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
    """Find the samples, split them by subject and fill ``train_stems``/``val_stems`` (and
    ``test_stems``, the held-out fold, under ``data.fold_val_fraction``)."""
    samples, problems = discover_datasets(config.data.data_dirs)
    for problem in problems:
        log(f"warning: skipped {problem}")
    if not samples:
        raise InputError(", ".join(config.data.data_dirs), "no usable image/mask pairs", "see the warnings above")
    test: list = []
    if config.data.folds is not None:
        train, val = split_samples(samples, seed=config.data.seed, folds=config.data.folds, fold=config.data.fold)
        if config.data.fold_val_fraction is not None:
            # the held-out fold is only scored; the checkpoint is chosen on subjects of the training folds
            test = val
            train, val = split_samples(train, seed=config.data.seed, val_fraction=config.data.fold_val_fraction)
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
    config.test_stems = [s.stem for s in test]
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


def load_training_data(config: RunConfig, train_samples, val_samples, ctx: DistributedContext,
                       cache_dir: str | Path | None, log):
    """The decoded training and validation sets: in memory (``train.data_cache = "memory"``) or
    memory-mapped from the on-disk cache ("disk"), which the first process of each node builds
    while the others wait, then every process opens."""
    size = config.preprocess.size
    label = config.data.labels if config.data.labels is not None else config.data.label
    if config.train.data_cache == "memory":
        train_set, problems = load_tensor_set(train_samples, size, label)
        val_set, val_problems = load_tensor_set(val_samples, size, label)
        return train_set, val_set, problems + val_problems
    def open_cache():
        return [load_disk_tensor_set(samples, size, label, cache_dir, log=log) for samples in (train_samples, val_samples)]

    if ctx.local_rank == 0:  # builds the entries (or finds them) while the node's other ranks wait
        sets = open_cache()
    ctx.barrier()
    if ctx.local_rank != 0:
        sets = open_cache()
    (train_set, problems), (val_set, val_problems) = sets
    return train_set, val_set, problems + val_problems


def load_encoder_weights(model: torch.nn.Module, weights: str, arch: str) -> None:
    """Start ``model``'s encoder from pretrained ``weights`` ("imagenet"); ConfigError when the
    architecture has no pretrained encoder."""
    loader = getattr(model, "load_pretrained_encoder", None)
    if loader is None:
        raise ConfigError(f"architecture {arch!r} has no pretrained encoder")
    if weights != "imagenet":
        raise ConfigError(f"unknown encoder weights {weights!r}; choose imagenet")
    loader()


def train(config: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True, log=None,
          cache_dir: str | Path | None = None) -> TrainResult:
    """Train ``config`` into ``out_dir``; with ``resume`` continue an interrupted run there.

    Writes ``config.json``, ``model.safetensors`` (best validation Dice; the last epoch when
    there is no validation set, ``val_fraction=0``), ``last.safetensors``
    (weights + optimizer + loop state for resuming) and ``history.csv``; every write is atomic.

    Under torchrun (``WORLD_SIZE`` > 1) each process trains its share of every global batch with
    DistributedDataParallel and rank 0 alone validates and writes (training/distributed.py).
    ``cache_dir`` is where ``train.data_cache = "disk"`` keeps its entries (default
    ``$NERVESEG_CACHE_DIR`` or ~/.cache/nerveseg).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out_dir)
    config_path, last_path = out / "config.json", out / "last.safetensors"
    cfg = config.train
    device = resolve_device(cfg.device)
    ctx = init_distributed(device)
    device = rank_device(device, ctx)
    if not ctx.is_main:
        log = lambda msg: None  # noqa: E731 -- one voice: rank 0's
        progress = False
    # every check before any write, on every rank: rank 0's first write must not fail another's check
    if resume:
        if not config_path.exists():
            raise ConfigError(f"{out}: nothing to resume (no config.json); start without --resume")
        saved = RunConfig.load(config_path)
        saved.train.epochs = config.train.epochs  # the only thing a resume may change: run longer
        config = saved
    elif config_path.exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    ctx.barrier()
    if resume and ctx.is_main:
        # a run killed during an atomic write leaves its temporary file; a run folder has one writer,
        # so on resume every such file is an orphan
        for orphan in leftover_temporaries(out, ("config.json", "model.safetensors", "last.safetensors", "history.csv")):
            orphan.unlink(missing_ok=True)
    cfg = config.train
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)

    if config.model.encoder_weights and not has_pretrained_encoder(config.model.arch):
        raise ConfigError(f"architecture {config.model.arch!r} has no pretrained encoder; drop --encoder-weights "
                          "or choose an architecture that has one (efficientnet_unet)")
    train_samples, val_samples = prepare_split(config, log)
    if resume and (config.train_stems != RunConfig.load(config_path).train_stems):
        raise ConfigError(f"{out}: the data folder changed since this run started; cannot resume on another split")
    train_set, val_set, problems = load_training_data(config, train_samples, val_samples, ctx, cache_dir, log)
    for problem in problems:
        log(f"warning: skipped {problem}")
    if len(train_set) == 0:
        raise InputError(", ".join(config.data.data_dirs), "no usable training pairs", "see the warnings above")
    config.train_stems, config.val_stems = list(train_set.stems), list(val_set.stems)
    config.nerveseg_version = __version__
    in_memory = isinstance(train_set, TensorSet)
    if in_memory:
        # keep the decoded set on the training device: on a GPU, batches and their augmentation then
        # never cross the bus (the random draws still come from the CPU generator, so a run is the
        # same on either device up to floating point)
        train_set, val_set = train_set.to(device), val_set.to(device)
    config.model.kwargs = model_kwargs(config)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config_path, config.to_dict())
    train_seed = cfg.seed if cfg.seed is not None else config.data.seed
    torch.manual_seed(train_seed)  # the same seed gives the same initial weights
    model = create(config.model.arch, **config.model.kwargs)
    if config.model.encoder_weights and not cfg.init_from and not (resume and last_path.exists()):
        load_encoder_weights(model, config.model.encoder_weights, config.model.arch)
        log(f"encoder initialised from {config.model.encoder_weights} weights")
    if cfg.init_from and not (resume and last_path.exists()):
        source = resolve_init_from(cfg.init_from, config.data.fold)
        skipped = transfer_weights(model, source / "model.safetensors")
        log(f"initialised from {source}" + (f" (kept fresh: {', '.join(skipped)})" if skipped else ""))
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.enabled:
        if cfg.sync_batchnorm:
            model = convert_sync_batchnorm(model, device).to(device)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # the compiled module shares the parameters: validation and checkpoints use ``model`` itself
    step_model = torch.compile(model, mode=cfg.compile, dynamic=False) if cfg.compile else model
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    averaged = weight_average(unwrap(model), cfg.ema_decay) if cfg.ema_decay else None
    history = _read_history(out / "history.csv")
    start_epoch, best_dice, best_epoch = 0, -1.0, -1
    if resume and last_path.exists():
        state = load_training_state(unwrap(model), optimizer, last_path, averaged)
        start_epoch, best_dice, best_epoch = state["epoch"] + 1, state["best_val_dice"], state["best_epoch"]
        log(f"resuming {out} at epoch {start_epoch + 1}/{cfg.epochs} (best val Dice {best_dice:.4f})")
    # rows past the saved state are redone: a kill between the history write and the state write, or
    # before the first state, leaves one
    history = history[:start_epoch]

    loader = sampler = None
    if not in_memory:
        sampler = GlobalBatchSampler(cfg.batch_size)
        workers = cfg.loader_workers
        loader = torch.utils.data.DataLoader(
            train_set.dataset(), batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=device.type == "cuda")
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
        # one generator per epoch seeded by (seed, epoch): a resumed run draws the same batches, and
        # so does every rank of a distributed run (each then keeps its share of each batch)
        gen = torch.Generator().manual_seed(train_seed * 100_003 + epoch)
        order = torch.randperm(len(train_set), generator=gen)
        if in_memory:
            order = order.to(device)
            batches = ((train_set.images[idx], train_set.masks[idx], train_set.stats[idx])
                       for idx in (order[k * cfg.batch_size : (k + 1) * cfg.batch_size] for k in range(steps_per_epoch)))
        else:
            sampler.set_order(order.tolist())
            batches = iter(loader)
        losses = []
        bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
        for step, (images, masks, stats) in enumerate(batches):
            images, masks = augment_batch(images.to(device), masks.to(device), cfg.augment, cfg.shear_degrees, generator=gen)
            n_batch = len(images)
            if ctx.enabled:
                if n_batch < ctx.world_size:  # every rank needs an image; this tail batch is left out on all ranks
                    bar.update(1)
                    continue
                keep = ctx.rank_slice(torch.arange(n_batch, device=images.device))
                images, masks, stats = images[keep], masks[keep], stats.to(device)[keep]
            x = _standardized(images, stats.to(device)).to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = masks.to(device)
            lr = learning_rate(cfg, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast_context(device, cfg.amp):
                output = step_model(x)
            loss = supervised_loss(cfg.loss, output, y)
            losses.append(loss.item())
            if ctx.enabled:
                # DDP averages the ranks' gradients; weighting each rank's mean loss by its share of the
                # global batch makes that average the gradient of the mean loss over the global batch
                loss = loss * (len(x) * ctx.world_size / n_batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if averaged is not None:
                averaged.update_parameters(unwrap(model))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", val_dice=f"{max(best_dice, 0):.4f}")
        epoch_loss = ctx.mean(float(np.mean(losses)) if losses else float("nan"))
        if ctx.is_main:
            net = unwrap(model)
            kept = net
            if averaged is not None:  # the average is the model: validated, kept and shipped
                kept = averaged.module
                recompute_batchnorm(kept, train_set, device, cfg.amp, cfg.channels_last)
            val_dice = validation_dice(kept, val_set, device, cfg.amp, cfg.channels_last) if len(val_set) else float("nan")
            improved = len(val_set) > 0 and val_dice > best_dice
            if improved:
                best_dice, best_epoch = val_dice, epoch
            elif len(val_set) == 0:
                best_epoch = epoch
            if improved or len(val_set) == 0 or cfg.checkpoint == "last":
                save_weights(kept, out / "model.safetensors", metadata={"epoch": str(epoch), "val_dice": f"{val_dice:.6f}"})
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": f"{epoch_loss:.6f}",
                    "val_dice": f"{val_dice:.6f}",
                    "lr": f"{lr:.3e}",
                    "seconds": f"{time.perf_counter() - epoch_start:.2f}",
                }
            )
            _write_history(out / "history.csv", history)
            save_training_state(
                net, optimizer, last_path, {"epoch": epoch, "best_val_dice": best_dice, "best_epoch": best_epoch},
                averaged=averaged,
            )
            bar.set_postfix(loss=f"{epoch_loss:.4f}", val_dice=f"{val_dice:.4f}")
        ctx.barrier()  # the others wait for rank 0's checkpoint: a kill now leaves a complete epoch
    bar.close()
    best_dice, best_epoch = ctx.broadcast((best_dice, best_epoch))
    return TrainResult(out, best_dice, best_epoch + 1, cfg.epochs - start_epoch, time.perf_counter() - t0)


def weight_average(model: torch.nn.Module, decay: float) -> torch.nn.Module:
    """An exponential moving average of ``model``'s weights (torch.optim.swa_utils; the first
    update copies them): after each step, average <- decay * average + (1 - decay) * weights.

    Only the parameters are averaged; each update copies the BatchNorm statistics of ``model``.
    Averaged statistics do not fit averaged weights: at Adam's 5e-4 the weights move far within a
    500-step horizon, their average has smaller activations than any of them, and on usgra-seg the
    network with averaged statistics output a constant. ``recompute_batchnorm`` measures the
    average's own statistics instead, as SWA does."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, data: TensorSet | DiskTensorSet, device, amp: bool,
                        channels_last: bool, batch_size: int = 8) -> None:
    """Set every BatchNorm layer's running statistics to their mean over ``data`` (un-augmented
    training images) under ``model``'s own weights (torch.optim.swa_utils.update_bn, on our batches)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    was_training = model.training
    model.train()
    for images, _, stats in _batches(data, batch_size):
        x = _standardized(images.to(device), stats.to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def fold_run_name(fold: int) -> str:
    return f"fold_{fold}"


def ensemble_config(fold_configs: list[RunConfig], members: list[str]) -> RunConfig:
    """The config.json of an ensemble folder: the members' shared recipe, their union of training
    images (so ``--subset unseen`` means images no member saw), and the member folders."""
    first = fold_configs[0]
    config = RunConfig.from_dict(first.to_dict())
    # the members hold their splits
    config.data.folds = config.data.fold = config.data.val_fraction = config.data.fold_val_fraction = None
    config.train_stems = sorted({s for c in fold_configs for s in c.train_stems})
    config.val_stems, config.test_stems = [], []
    config.members = list(members)
    return config


def assemble_ensemble(runs: list[str | Path], out_dir: str | Path, names: list[str] | None = None,
                      router: str | Path | None = None) -> Path:
    """Make ``out_dir`` an ensemble folder of trained runs: a copy of each (config.json, weights and
    any exported model.onnx) as a member sub-folder, and a config.json naming them. Every predictor
    and command then loads ``out_dir`` like one model, averaging the members' probabilities.

    Members may be different architectures (SA-UNet + U-Net) but must share the network input size
    and the classes, which the average needs. Copies, not links: the folder is shipped or moved whole,
    and the loader refuses links. Written in a temporary folder and renamed into place, so a failed
    or interrupted call leaves nothing half-made.

    ``router``: a folder written by ``training.router.save_router`` whose routes are ``names`` in order;
    the folder is then a routed model (one member per image, chosen by the router, copied in as
    ``router/``) instead of an average."""
    import shutil
    import tempfile

    runs = [Path(r) for r in runs]
    out = Path(out_dir)
    if len(runs) < 2:
        raise ConfigError("an ensemble needs at least two runs")
    names = list(names) if names else [r.name for r in runs]
    if len(names) != len(runs):
        raise ConfigError(f"{len(names)} member names for {len(runs)} runs")
    if len(set(names)) != len(names) or any(not n or "/" in n or "\\" in n or n.startswith(".") for n in names):
        raise ConfigError(f"member names {names} must be distinct plain folder names; pass --names")
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another --out")
    configs = []
    for run in runs:
        config = RunConfig.load(run / "config.json") if (run / "config.json").is_file() else None
        if config is not None and config.members:
            raise ConfigError(f"{run} is itself an ensemble; list its member runs instead")
        if config is None or not (run / "model.safetensors").is_file():
            raise ConfigError(f"{run} is not a trained run (it needs config.json and model.safetensors)")
        configs.append(config)
    first = configs[0]
    for run, config in zip(runs[1:], configs[1:]):
        if config.preprocess.size != first.preprocess.size or config.data.class_names != first.data.class_names:
            raise ConfigError(f"{run} differs from {runs[0]}: input size {config.preprocess.size} vs "
                              f"{first.preprocess.size}, classes {list(config.data.class_names)} vs "
                              f"{list(first.data.class_names)}; members must share both")
    if router is not None:
        from .router import ROUTER_CONFIG, ROUTER_WEIGHTS, load_router

        router = Path(router)
        routes = load_router(router)[1]["routes"]
        if list(routes) != names:
            raise ConfigError(f"the router's routes {routes} must be the member names {names}, in order; "
                              f"pass --names {','.join(routes)} with the runs in that order")
        if "router" in names:
            raise ConfigError("no member may be named 'router' in a routed model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for run, name in zip(runs, names):
            (tmp / name).mkdir()
            for file in ("config.json", "model.safetensors", "model.onnx"):
                if (run / file).is_file():
                    shutil.copyfile(run / file, tmp / name / file)
        config = ensemble_config(configs, names)
        if router is not None:
            (tmp / "router").mkdir()
            for file in (ROUTER_WEIGHTS, ROUTER_CONFIG):
                shutil.copyfile(router / file, tmp / "router" / file)
            config.router = "router"
        atomic_write_json(tmp / "config.json", config.to_dict())
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def train_all_folds(config: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True, log=None,
                    cache_dir: str | Path | None = None) -> list[TrainResult]:
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
                             progress=progress, log=log, cache_dir=cache_dir))
        configs.append(RunConfig.load(run_dir / "config.json"))
        members.append(fold_run_name(fold))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 writes (the folds' barriers synchronised us)
        atomic_write_json(out / "config.json", ensemble_config(configs, members).to_dict())
    return results
