"""``nerveseg`` command line: each command parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, NerveSegError
from .parser import SuggestingParser

RESUMABLE = ("train", "segment", "benchmark")
"""Commands with --resume: Ctrl-C tells how to continue them."""


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):  # inf: a cut-off that never flags, a pixel size that overflows
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _label(text: str) -> int | str:
    """An integer pixel value for raster masks, or a LabelMe shape name."""
    return int(text) if text.lstrip("-").isdigit() else text


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


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"features\": [8, 16, 32, 64, 128]}'")
    return value


def _labels(text: str) -> tuple[int | str, ...]:
    return tuple(_label(t.strip()) for t in text.split(",") if t.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


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
                  fold=0 if args.all_folds and args.fold is None else args.fold, max_train_images=args.max_train_images),
        train=dict(epochs=args.epochs, batch_size=args.batch_size, lr=lr, schedule=args.schedule,
                   warmup_epochs=args.warmup_epochs, augment=augment, amp=False if args.no_amp else None,
                   channels_last=False if args.no_channels_last else None, num_threads=args.threads,
                   device=args.device, loss=args.loss, deep_supervision=args.deep_supervision,
                   checkpoint=args.checkpoint, init_from=args.init_from, seed=args.train_seed, data_cache=args.data_cache,
                   loader_workers=args.loader_workers, sync_batchnorm=args.sync_bn, compile=args.compile,
                   weight_decay=args.weight_decay, optimizer=args.optimizer, ema_decay=args.ema),
        inference=dict(tta=args.tta),
    )


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
    out = assemble_ensemble(args.runs, args.out, names)
    print(f"wrote the ensemble {out} of {len(args.runs)} runs (use it as --model {out})")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from ..training.recipes import describe, list_recipes

    print("\n\n".join(describe(name) for name in list_recipes()))
    print("\nflags given to `nerveseg train` win over the recipe's values")
    return 0


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


def _spacing_xy(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in mm per pixel, got {text!r}") from None
    return x, y


def cmd_segment(args: argparse.Namespace) -> int:
    from ..inference import segment_files
    from ..inference.calibration import spacing_from_user
    from ..inference.onnx_backend import load_predictor
    from ..inference.planning import parse_shard, plan_inputs
    from ..inference.segment import SegmentOptions
    from ..pretrained import resolve_model

    if not args.inputs and args.list is None:
        raise ConfigError("give the inputs: files or folders, or --list FILE.csv")
    shard = parse_shard(args.shard)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.collect_only:  # no model: the inputs are listed only to tell which are missing
        from ..inference.archive import collect

        items, problems = plan_inputs(args.inputs, Path(args.out), recursive=args.recursive, list_file=args.list, log=log)
        return _report_collect(collect(args.out, planned=[it.path for it in items], log=log, failed=problems))
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    predictor = load_predictor(model_dir, backend=args.backend, device=args.device, intra_op_num_threads=args.threads)
    options = SegmentOptions(
        threshold=args.threshold,
        low_confidence=args.low_confidence,
        spacing=spacing_from_user(args.mm_per_pixel, args.spacing),
        postprocess=args.postprocess,
        min_area_px=args.min_area,
        per_component=args.per_component,
        labelme=args.labelme,
        temporal_smoothing=args.temporal_smoothing,
    )
    dicom = None
    if args.dicom_out:  # a DICOM SEG + SR next to each DICOM input's masks (docs/CLINICAL.md)
        from ..clinical.dicom_out import DicomResultWriter, model_identity
        from ..inference.segment import with_model_threshold

        dicom = DicomResultWriter(args.out, model_identity(model_dir), getattr(predictor, "class_names", ["nerve"]),
                                  threshold=with_model_threshold(options, predictor).threshold, log=log)
    result = segment_files(args.inputs, predictor, args.out, options, log=log, resume=args.resume,
                           recursive=args.recursive, list_file=args.list, shard=shard, on_input=dicom)
    n_inputs = len({row["file"] for row in result.rows})
    resumed = f" ({len(result.skipped)} already complete, kept)" if result.skipped else ""
    job = f" (job {shard[0]}/{shard[1]}: {result.planned} input(s) of the whole)" if shard[1] > 1 else ""
    print(f"segmented {n_inputs} input(s){resumed}{job} with the model in {model_dir}: {len(result.rows)} measurement "
          f"row(s), {len(result.problems)} problem(s); "
          + (f"wrote {result.table}" if result.table else f"wrote nothing ({args.out} not created)"))
    if dicom is not None:
        print(dicom.summary())
    if shard[1] > 1:
        print(f"when every job has finished: nerveseg collect {args.out}")
    if result.problems:
        print(f"nerveseg segment: {len(result.problems)} input(s) not segmented (listed above as error:); "
              "exit status 1", file=sys.stderr)
    if dicom is not None and dicom.problems:
        print(f"nerveseg segment: {len(dicom.problems)} DICOM input(s) without SEG/SR (listed above as error:); "
              "exit status 1", file=sys.stderr)
    return 1 if result.problems or (dicom is not None and dicom.problems) else 0


def cmd_import_seg(args: argparse.Namespace) -> int:
    from ..clinical.dicom_out import import_seg
    from ..errors import InputError

    if args.stem and len(args.segs) > 1:
        raise ConfigError("--stem names one pair; give one SEG with it")
    failed = 0
    for seg in args.segs:
        try:
            pair = import_seg(seg, args.out, args.source, stem=args.stem)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        for warning in pair.warnings:
            print(f"warning: {seg}: {warning}", file=sys.stderr)
        masks = pair.masks[0] if len(pair.masks) == 1 else f"{len(pair.masks)} frame masks in {pair.masks[0].parent}"
        print(f"{seg}: wrote {pair.image} and {masks} ({', '.join(f'{n} {c}' for n, c in pair.segments.items())})")
    if failed:
        print(f"nerveseg import-seg: {failed} SEG file(s) not imported (listed above as error:); exit status 1",
              file=sys.stderr)
    return 1 if failed else 0


def cmd_collect(args: argparse.Namespace) -> int:
    from ..inference.archive import collect

    return _report_collect(collect(args.out, log=lambda m: print(m, file=sys.stderr)))


def _report_collect(result) -> int:
    jobs = f" of {result.shards} jobs" if result.shards > 1 else ""
    print(f"collected {result.inputs} input(s){jobs}: {result.rows} row(s) in {result.table}; {len(result.missing)} "
          f"missing, {len(result.failed)} failed, {len(result.problems)} job problem(s) (collect.json lists them)")
    return 0 if result.complete else 1


COLLECT_HELP = """\
Join the measurements tables that `nerveseg segment` jobs wrote into OUT (measurements.shard-I-of-N.csv,
or one job's measurements.csv) into OUT/measurements.csv, sorted by relative path (or file), frame and
component: the same bytes however the work was split or resumed. Also writes OUT/videos.json and
OUT/collect.json (missing inputs, failed inputs, jobs that have not run or not finished).

exit status:
  0  the table is complete: every job finished and every input has its rows
  1  the table was written, but inputs are missing or failed, or a job has not finished (listed)
  2  nothing was collected: no table in OUT, or tables of different splits (N)
"""


SEGMENT_EXIT_CODES = """\
exit status:
  0  every input was segmented (or, with --resume, was already complete)
  1  all inputs were tried, and at least one could not be segmented: unreadable, missing,
     of an unknown type, or a folder inside an input folder (each is reported as "error: ...";
     the others' results are written); with --dicom-out also a DICOM input whose SEG/SR could
     not be made (e.g. it lacks its Study/Series/SOP Instance UID)
  2  nothing or not everything was tried: a bad option or model, or a result could not be
     written (full disk, read-only folder; the results finished before are intact, run again
     with --resume)
  130 interrupted (Ctrl-C); --resume continues
"""


def cmd_benchmark(args: argparse.Namespace) -> int:
    from ..config import PreprocessConfig, TrainConfig
    from ..evaluation.benchmark import BenchmarkConfig, parse_shard, run_benchmark
    from ..training.recipes import recipe_values

    # the recipe's training fields, then every flag given. The checkpoint is always the last epoch:
    # a fold's validation images are the ones it reports, so choosing an epoch on them would flatter it
    train_values = recipe_values(args.recipe)["train"]
    given = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                 augment=None if args.augment is None else tuple(a for a in args.augment.split(",") if a))
    train_values.update({k: v for k, v in given.items() if v is not None})
    train_values.update(num_threads=args.threads, device=args.device, sync_batchnorm=args.sync_bn, checkpoint="last")
    config = BenchmarkConfig(
        data_dir=str(Path(args.data).resolve()),
        archs=tuple(a.strip() for a in args.archs.split(",") if a.strip()),
        label=args.label,
        seeds=args.seeds,
        folds=args.folds,
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


def cmd_report(args: argparse.Namespace) -> int:
    import os

    from ..clinical.screening import Cutoffs, screen, write_screening_report

    cutoffs = Cutoffs(wrist_csa_mm2=args.wrist_csa, wfr=args.wfr, delta_csa_mm2=args.delta_csa)
    rows = screen(args.manifest, args.measurements, cutoffs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seg_dir = Path(args.measurements).parent
    overlays = {
        p.name[: -len("_overlay.png")]: os.path.relpath(p, out) for p in sorted(seg_dir.glob("*_overlay.png"))
    }
    write_screening_report(rows, out, cutoffs, overlays)
    flagged = sum(1 for r in rows if r["any_flag"])
    print(f"{len(rows)} subject/side pair(s), {flagged} with a flag; wrote {out}/screening.csv and report.md "
          "(decision support only)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..config import ModelConfig, RunConfig
    from ..inference.onnx_backend import export_onnx, weights_sha256
    from ..models import create
    from ..pretrained import resolve_model
    from ..training.checkpoint import load_weights

    if args.arch:  # untrained weights, for benchmarking
        config, model, digest = RunConfig(model=ModelConfig(args.arch)), create(args.arch), None
    else:
        run = resolve_model(args.model)
        config = RunConfig.load(run / "config.json")
        model = load_weights(create(config.model.arch, **config.model.kwargs), run / "model.safetensors")
        digest = weights_sha256(run / "model.safetensors")
    export_onnx(model, args.out, args.opset, config=config, weights_hash=digest, native_saconv=args.native)
    kind = "native SAConv operators: run with nerveseg.inference.native.register_saconv" if args.native else "standard operators"
    print(f"wrote {args.out} ({config.model.arch}, dynamic batch/height/width, opset {args.opset}, {kind})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="nerveseg", description="Segment and measure peripheral nerves in ultrasound.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list architectures with parameters and GFLOPs at 512x512")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("recipes", help="print the named training recipes in full")
    p.set_defaults(func=cmd_recipes)

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
    p.add_argument("--compile", default=None, choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile the training step (GPU: reduce-overhead replays CUDA graphs; see docs/SCALE.md)")
    p.add_argument("--no-amp", action="store_true", help="train in float32 (default: bf16 autocast)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--out", required=True, help="run folder to write (with --all-folds: the ensemble folder)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ensemble", help="combine trained runs (e.g. SA-UNet + U-Net) into one ensemble folder")
    p.add_argument("runs", nargs="+", help="run folders; same input size and classes, any architectures")
    p.add_argument("--out", required=True, help="ensemble folder to create (members are copied into it)")
    p.add_argument("--names", default=None, help="comma-separated member folder names (default: the runs' names)")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("evaluate", help="metrics of a trained run on a dataset at original resolution")
    p.add_argument("--model", default=None, help="run folder written by `nerveseg train`, or 'default' for the shipped model")
    p.add_argument("--predictions", default=None,
                   help="instead of --model: a folder of predicted masks <stem>.png from another tool (e.g. nnU-Net)")
    p.add_argument("--pred-label", type=int, default=1, help="with --predictions: the predicted masks' nerve value")
    p.add_argument("--data", required=True, action="append",
                   help="folder with images/ and masks/; repeat for a model trained on several (figures per folder and pooled)")
    p.add_argument("--label", type=_label, default=None, help="default: the label the run was trained on")
    p.add_argument("--subset", default="all", choices=("all", "val", "train", "unseen", "cv"),
                   help="val: the run's validation images; unseen: all it did not train on; "
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

    p = sub.add_parser("segment", help="segment images, DICOM or cine loops; write masks, overlays, measurements.csv",
                       epilog=SEGMENT_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image, DICOM or video files, or folders of them (sub-folders are "
                   "searched with --recursive, else reported; other files are reported)")
    p.add_argument("--recursive", action="store_true",
                   help="search input folders and their sub-folders; results mirror the tree: ROOT/a/b/case.png -> "
                        "OUT/a/b/case_mask.png (paths relative to the folder given, or to the deepest folder holding "
                        "all the folders given), and measurements get a relpath column")
    p.add_argument("--list", default=None, metavar="FILE.csv",
                   help="segment the files in a CSV with a column 'path' (or a text file, one path per line); relative "
                        "paths are read from the list's folder, and results mirror them below --out as with --recursive; "
                        "bad lines are reported and the rest go on")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="job I (0-based) of N sharing --out: segments only the inputs whose name hashes to I (needs no "
                        "coordination; give every job the same inputs) and writes measurements.shard-I-of-N.csv; "
                        "then `nerveseg collect OUT`. 0/1 (default): all inputs, measurements.csv. See docs/SCALE.md")
    p.add_argument("--collect-only", action="store_true",
                   help="segment nothing: join the jobs' tables in --out into measurements.csv (as `nerveseg collect`) "
                        "and report which of the inputs given are missing")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the network (torch and onnxruntime; default: theirs). With N jobs on one "
                        "machine, give each cores/N")
    p.add_argument("--model", default=None, help="run folder from `nerveseg train` (default: the shipped SA-UNet)")
    p.add_argument("--out", required=True)
    p.add_argument("--mm-per-pixel", type=_positive_float, default=None, help="isotropic pixel size in mm (overrides DICOM)")
    p.add_argument("--spacing", type=_spacing_xy, default=None, help="X,Y pixel size in mm (overrides DICOM)")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability cut for the masks (default: the model's, config.json inference.threshold, 0.5 "
                        "unless chosen on cross-validation)")
    p.add_argument("--low-confidence", type=float, default=None,
                   help="flag measurements whose mean probability inside the mask is under this (default: the "
                        "model's, config.json inference.low_confidence, chosen on cross-validation)")
    p.add_argument("--postprocess", choices=("none", "largest", "min_area", "ellipse"), default="none")
    p.add_argument("--min-area", type=int, default=0, help="drop components smaller than this many pixels")
    p.add_argument("--per-component", action="store_true", help="one measurement row per component")
    p.add_argument("--labelme", action="store_true", help="also write <stem>.json LabelMe polygons (correct and retrain)")
    p.add_argument("--temporal-smoothing", type=float, default=0.0, help="cine loops: weight of previous frames (0-0.9)")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto: onnxruntime when installed (fastest on CPU), else torch")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true",
                   help="skip inputs whose outputs in --out are complete (their rows in measurements.csv and every "
                        "mask/overlay file, or a loop's overlay video); the rest are segmented and measurements.csv "
                        "ends with every input's rows. Use the same inputs and options as the interrupted run "
                        "(and the same --shard: each job resumes its own table)")
    p.add_argument("--dicom-out", action="store_true",
                   help="also write, for each DICOM input, <stem>_seg.dcm (DICOM Segmentation, one segment per class "
                        "found) and <stem>_sr.dcm (DICOM SR, TID 1500: CSA and perimeter in mm where calibrated, "
                        "circularity, flattening, QC flags); non-DICOM inputs get a note (no study to attach to). "
                        "See docs/CLINICAL.md")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("import-seg", help="a DICOM SEG (e.g. corrected in 3D Slicer/OHIF) + its image -> a training pair",
                       description="Write images/<stem>.png and masks/<stem>.png (0 background, 1 nerve, 2 vessel) "
                                   "into a data folder from a DICOM SEG and its source image; a cine loop gives "
                                   "images/<stem>.dcm and masks/<stem>/frame_NNNNN.png. Train with --labels 1,2 "
                                   "--label-names nerve,vessel (or --label 1 for the nerve).")
    p.add_argument("segs", nargs="+", metavar="SEG.dcm", help="DICOM Segmentation file(s)")
    p.add_argument("--source", nargs="+", required=True, metavar="PATH",
                   help="the source image(s) or folders holding them (found by the SOP Instance UID the SEG references)")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="data folder (images/, masks/ are made)")
    p.add_argument("--stem", default=None, help="name of the pair (default: the source image's file name)")
    p.set_defaults(func=cmd_import_seg)

    p = sub.add_parser("collect", help="join the measurements tables of `segment --shard` jobs into one measurements.csv",
                       description=COLLECT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the --out folder the segment jobs shared")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("benchmark", help="train + evaluate several architectures on identical splits (paper Tables 2-3)")
    p.add_argument("--data", required=True)
    p.add_argument("--label", type=_label, default=None)
    p.add_argument("--archs", default="sa_unet,unet,unet_pp,attention_unet,multires_unet")
    p.add_argument("--seeds", type=int, default=3, help="repetitions (the paper: 20)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--recipe", default="paper", help="training recipe of every architecture (`nerveseg recipes`); "
                   "flags below win; the last epoch is always kept (no held-out image picks a checkpoint)")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's (paper: 30)")
    p.add_argument("--size", type=int, default=None, help="default: the recipe's (256)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--schedule", choices=("constant", "cosine", "poly"), default=None)
    p.add_argument("--augment", default=None, help="comma list; default: the recipe's (paper: shear)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: synchronised BatchNorm (see `train --sync-bn`)")
    p.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue; finished runs are not redone")
    p.add_argument("--shard", default="0/1", help="I/N: train only every N-th run from the I-th (N processes share --out)")
    p.add_argument("--collect-only", action="store_true", help="train nothing; summarize the finished runs")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_benchmark)

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

    p = sub.add_parser("report", help="carpal tunnel screening: wrist/forearm CSA, WFR, delta-CSA (decision support)")
    p.add_argument("--manifest", required=True, help="CSV with file, subject, region (wrist/forearm), side")
    p.add_argument("--measurements", required=True, help="measurements.csv from `nerveseg segment` (calibrated)")
    p.add_argument("--wrist-csa", type=_positive_float, default=10.0, help="wrist CSA cut-off, mm² (published 8.5-14)")
    p.add_argument("--wfr", type=_positive_float, default=1.4, help="wrist-to-forearm ratio cut-off")
    p.add_argument("--delta-csa", type=_positive_float, default=2.0, help="wrist minus forearm CSA cut-off, mm²")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export a model to ONNX (dynamic height and width)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help="run folder (default: the shipped SA-UNet)")
    group.add_argument("--arch", default=None, help="export an untrained architecture (benchmarking)")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--out", required=True, help="FILE.onnx")
    p.add_argument("--native", action="store_true",
                   help="write each SAConv as one nerveseg.SAConv node (about 2.6x faster on a CPU; onnxruntime then "
                        "needs nerveseg's native library registered, so the file is not portable)")
    p.set_defaults(func=cmd_export)
    from .web_commands import add_web_commands
    add_web_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code, clean = None, False  # code stays None while an unexpected exception propagates
    try:
        code = args.func(args)
        clean = True
        return code
    except NerveSegError as exc:
        print(f"nerveseg {args.command}: error: {exc}", file=sys.stderr)
        code = 2
        return code
    except KeyboardInterrupt:
        # the commands that can continue say how; the others have nothing to continue
        resume = f" ({args.command}: --resume continues)" if args.command in RESUMABLE else ""
        print(f"nerveseg {args.command}: interrupted; finished files are kept{resume}", file=sys.stderr)
        code = 130
        return code
    finally:
        if "torch.distributed" in sys.modules:  # leave a torchrun process group cleanly
            from ..training.distributed import shutdown_distributed

            if shutdown_distributed(synchronise=clean) and code is not None:
                # A torchrun worker whose command has ended: exit here. Letting the interpreter
                # finalise with gloo's threads alive aborts it now and then (SIGABRT, "terminate
                # called without an active exception"), which fails a finished run. Not while an
                # unexpected exception propagates: its traceback must still print.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
