"""``nerveseg evaluate``, ``benchmark`` and ``export-dataset``: scoring trained models, comparing
architectures on identical splits, and handing our splits to other tools (nnU-Net)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import COMPILE_MODES
from ..errors import ConfigError
from .common import _is_main_process, _label, _names, _positive_float


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import evaluate_prediction_folder, evaluate_run

    if (args.model is None) == (args.predictions is None):
        raise ConfigError("give either --model RUN (predict and score) or --predictions DIR (score masks from another tool)")
    if args.predictions is not None:
        if len(args.data) > 1:
            raise ConfigError("--predictions scores one data folder at a time; give one --data")
        summary = evaluate_prediction_folder(args.predictions, args.data[0], args.out, label=args.label,
                                             pred_label=args.pred_label, mm_per_pixel=args.mm_per_pixel)
        for key in ("precision", "recall", "dice", "hd", "hd95"):
            m = summary[key]
            if m["mean"] is not None:
                print(f"{key:<10} {m['mean']:.4f} +/- {m['sd']:.4f}")
        print(f"zero-overlap rate {summary['zero_overlap_rate']:.4f} over {summary['n_images']} images "
              f"({summary['images_without_prediction']} images had no prediction)")
        print(f"wrote {args.out}/metrics.json, per_image.csv")
        return 0
    from ..pretrained import resolve_model

    summary = evaluate_run(
        resolve_model(args.model), args.data, args.out, label=args.label, subset=args.subset, threshold=args.threshold,
        mm_per_pixel=args.mm_per_pixel, overlays=not args.no_overlays, progress=not args.quiet, backend=args.backend,
        tta=args.tta, keep_largest=args.keep_largest,
    )
    for key in ("precision", "recall", "dice", "hd", "hd95", "auc"):
        m = summary[key]
        if m["mean"] is not None:
            print(f"{key:<10} {m['mean']:.4f} +/- {m['sd']:.4f}")
    print(f"zero-overlap rate {summary['zero_overlap_rate']:.4f} over {summary['n_images']} images; pooled AUC {summary['pooled_auc']:.4f}")
    agreement = summary["area_agreement"]["px"]
    if agreement["median_ape_percent"] is not None:
        ba = agreement["bland_altman"]
        print(f"nerve area vs expert: median abs. error {agreement['median_ape_percent']:.1f}%, "
              f"Bland-Altman bias {ba['bias']:.0f} px (95% limits {ba['loa_low']:.0f} to {ba['loa_high']:.0f}), "
              f"Lin's CCC {agreement['lins_ccc'] if agreement['lins_ccc'] is not None else float('nan'):.3f}")
    for source, m in summary.get("by_source", {}).items():
        ape = m["area_agreement"]["px"]["median_ape_percent"]
        print(f"{source}: dice {m['dice']['mean']:.4f} +/- {m['dice']['sd']:.4f}, zero-overlap rate "
              f"{m['zero_overlap_rate']:.4f} over {m['n_images']} images, median area error "
              + (f"{ape:.1f}%" if ape is not None else "n/a"))
    for name, m in summary.get("classes", {}).items():
        if name != next(iter(summary["classes"])):
            print(f"{name}: dice {m['dice']['mean']:.4f} +/- {m['dice']['sd']:.4f}, zero-overlap rate "
                  f"{m['zero_overlap_rate']:.4f}, pooled AUC {m['pooled_auc']:.4f}")
    print(f"wrote {args.out}/metrics.json, per_image.csv, roc.png" + ("" if args.no_overlays else ", overlays/"))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from ..config import PreprocessConfig, TrainConfig
    from ..evaluation.benchmark import BenchmarkConfig, parse_shard, run_benchmark
    from ..training.recipes import recipe_values

    # the recipe's training fields, then every flag given. A fold's held-out images are the ones it
    # reports, so choosing an epoch on them would flatter it: the last epoch is kept, or, with
    # --fold-val-fraction, the best epoch on subjects taken from the training folds
    train_values = recipe_values(args.recipe)["train"]
    given = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                 augment=None if args.augment is None else tuple(a for a in args.augment.split(",") if a))
    train_values.update({k: v for k, v in given.items() if v is not None})
    train_values.update(num_threads=args.threads, device=args.device, sync_batchnorm=args.sync_bn, compile=args.compile,
                        checkpoint="last" if args.fold_val_fraction is None else "best")
    config = BenchmarkConfig(
        data_dir=str(Path(args.data).resolve()),
        archs=tuple(a.strip() for a in args.archs.split(",") if a.strip()),
        label=args.label,
        seeds=args.seeds,
        folds=args.folds,
        fold_val_fraction=args.fold_val_fraction,
        preprocess=PreprocessConfig(size=args.size or recipe_values(args.recipe)["preprocess"].get("size", 256)),
        train=TrainConfig(**train_values),
        command=("nerveseg " + " ".join(sys.argv[1:])) if sys.argv and Path(sys.argv[0]).name in ("nerveseg", "__main__.py") else "",
    )
    result = run_benchmark(config, args.out, resume=args.resume or args.collect_only, progress=not args.quiet,
                           measure_latency=not args.no_latency, shard=parse_shard(args.shard),
                           collect_only=args.collect_only)
    if not _is_main_process():  # under torchrun, rank 0 reports
        return 0
    print(result["summary"])
    print(f"wrote {args.out}/results.csv ({result['rows']} rows from {result['runs']} of {result['planned']} runs), "
          "summary.md" + (", roc.png" if result["runs"] else ""))
    return 0


def cmd_export_dataset(args: argparse.Namespace) -> int:
    from ..data.export import export_nnunet

    export_nnunet(args.data, args.out, label=args.label, folds=args.folds, seed=args.seed,
                  dataset_id=args.dataset_id, name=args.name)
    return 0


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a trained run on a dataset at original resolution")
    p.add_argument("--model", default=None, help="run folder written by `nerveseg train`, or 'default' for the shipped model")
    p.add_argument("--predictions", default=None,
                   help="instead of --model: a folder of predicted masks <stem>.png from another tool (e.g. nnU-Net)")
    p.add_argument("--pred-label", type=int, default=1, help="with --predictions: the predicted masks' nerve value")
    p.add_argument("--data", required=True, action="append",
                   help="folder with images/ and masks/; repeat for a model trained on several (figures per folder and pooled)")
    p.add_argument("--label", type=_label, default=None, help="default: the label the run was trained on")
    p.add_argument("--subset", default="all", choices=("all", "val", "train", "unseen", "cv", "test"),
                   help="val: the run's validation images; test: its held-out fold when it validated inside its "
                        "training folds (--fold-val-fraction); unseen: all it did not train on; "
                        "cv: an --all-folds ensemble's held-out folds, each scored by its own member")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation (default: the model's setting)")
    p.add_argument("--keep-largest", type=_names, default=None,
                   help="classes whose mask keeps only its largest region, e.g. nerve or nerve,vessel; "
                        "'' for none (default: the model's setting)")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability cut for the masks (default: the model's, config.json inference.threshold, 0.5 "
                        "unless chosen on cross-validation)")
    p.add_argument("--mm-per-pixel", type=_positive_float, default=None, help="pixel size, for HD in mm")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto: onnxruntime when installed (fastest on CPU), else torch")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar (the metric summary still prints)")
    p.set_defaults(func=cmd_evaluate)



def add_benchmark(sub) -> None:
    p = sub.add_parser("benchmark", help="train + evaluate several architectures on identical splits (paper Tables 2-3)")
    p.add_argument("--data", required=True)
    p.add_argument("--label", type=_label, default=None)
    p.add_argument("--archs", default="sa_unet,unet,unet_pp,attention_unet,multires_unet")
    p.add_argument("--seeds", type=int, default=3, help="repetitions (the paper: 20)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--recipe", default="paper", help="training recipe of every architecture (`nerveseg recipes`); "
                   "flags below win; the last epoch is kept (no held-out image picks a checkpoint) unless "
                   "--fold-val-fraction is given")
    p.add_argument("--fold-val-fraction", type=float, default=None,
                   help="keep each run's best epoch on this subject-grouped fraction of its training folds (e.g. 0.2); "
                        "the held-out fold is only scored. Default: no inner validation, the last epoch is kept")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's (paper: 30)")
    p.add_argument("--size", type=int, default=None, help="default: the recipe's (256)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--schedule", choices=("constant", "cosine", "poly"), default=None)
    p.add_argument("--augment", default=None, help="comma list; default: the recipe's (paper: shear)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: synchronised BatchNorm (see `train --sync-bn`)")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="torch.compile each run's training step (as `train --compile`); a speed setting, not part "
                        "of the recipe: a resumed benchmark may change it")
    p.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue; finished runs are not redone")
    p.add_argument("--shard", default="0/1", help="I/N: train only every N-th run from the I-th (N processes share --out)")
    p.add_argument("--collect-only", action="store_true", help="train nothing; summarize the finished runs")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_benchmark)



def add_export_dataset(sub) -> None:
    p = sub.add_parser("export-dataset", help="write the dataset and our fold split in nnU-Net v2 raw format")
    p.add_argument("--data", required=True)
    p.add_argument("--label", type=_label, default=None)
    p.add_argument("--format", choices=("nnunet",), default="nnunet")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="the fold seed; the same as `train --seed` / benchmark seed")
    p.add_argument("--dataset-id", type=int, default=501)
    p.add_argument("--name", default="NerveUS")
    p.add_argument("--out", required=True, help="e.g. $nnUNet_raw")
    p.set_defaults(func=cmd_export_dataset)
