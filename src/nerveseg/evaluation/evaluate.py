"""Evaluate a trained run on a dataset, at the original resolution (the paper's Statistical Analysis)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..data.io import read_mask
from ..data.media import read_frame
from ..data.samples import discover_datasets, discover_samples
from ..errors import ConfigError, InputError
from ..inference.onnx_backend import load_predictor
from ..inference.overlay import make_overlay, save_png
from ..inference.predictor import Predictor
from ..io_utils import atomic_path, atomic_write_csv, atomic_write_json
from .agreement import area_agreement, save_bland_altman_plot
from .metrics import RocAccumulator, image_metrics, summarize

PER_IMAGE_FIELDS = (
    "stem", "precision", "recall", "dice", "iou", "hd", "hd95", "hd_mm", "hd95_mm", "auc",
    "zero_overlap", "area_pred_px", "area_truth_px",
)
# evaluate_run's per_image.csv adds these: the areas in mm² where the image is calibrated, and the
# data folder of each image when several were evaluated together
RUN_EXTRA_FIELDS = ("area_pred_mm2", "area_truth_mm2", "source")
SUMMARY_KEYS = ("precision", "recall", "dice", "iou", "hd", "hd95", "hd_mm", "hd95_mm", "auc")
SUBSETS = ("all", "val", "train", "unseen", "cv", "test")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, (float, np.floating)):
        return f"{value:.6f}"
    return str(value)


def select_subset(samples, predictor: Predictor, subset: str):
    """``val``: the run's validation images; ``test``: its held-out fold when the validation images
    came from the training folds (``data.fold_val_fraction``); ``unseen``: everything it did not
    train on; ``cv``: an ensemble's members' held-out folds (each scored by its own member)."""
    if subset not in SUBSETS:
        raise ConfigError(f"unknown subset {subset!r}; choose from {', '.join(SUBSETS)}")
    if subset == "all":
        return samples
    if subset == "cv":
        held_out = {s for m in _members(predictor) for s in (m.config.test_stems or m.config.val_stems)}
        return [s for s in samples if s.stem in held_out]
    if subset == "test" and not predictor.config.test_stems:
        raise ConfigError("--subset test needs a run trained with a validation split inside its training folds "
                          "(data.fold_val_fraction); for a plain fold run its held-out fold is --subset val")
    train, val, test = (set(predictor.config.train_stems), set(predictor.config.val_stems),
                        set(predictor.config.test_stems))
    keep = {"val": lambda s: s in val, "train": lambda s: s in train, "unseen": lambda s: s not in train,
            "test": lambda s: s in test}[subset]
    return [s for s in samples if keep(s.stem)]


def _members(predictor) -> list:
    members = getattr(predictor, "members", None)
    if not members:
        raise ConfigError("--subset cv needs an ensemble folder (written by `nerveseg train --folds K --all-folds`)")
    return members


def save_roc_plot(curves: dict[str, RocAccumulator], path: Path) -> None:
    """One figure with the pooled pixel ROC of each named accumulator (the paper's Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.8), dpi=120)
    for name, roc in curves.items():
        fpr, tpr = roc.curve()
        ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC {roc.auc():.4f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title("Pixel-level ROC (pooled over images)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def evaluate_samples(
    predictor: Predictor,
    samples,
    out_dir: str | Path,
    label=None,
    threshold: float = 0.5,
    mm_per_pixel: float | None = None,
    overlays: bool = True,
    progress: bool = True,
    class_labels: Sequence | None = None,
    mask_dir: str | Path | None = None,
) -> tuple[dict[str, list[dict]], dict[str, RocAccumulator], list[InputError]]:
    """Predict and score each sample at its original resolution, per class; unreadable pairs are
    returned. ``class_labels``: the mask label of each of the predictor's classes (default: the
    run's); ``label`` overrides the first (nerve) one. ``mask_dir``: also save each predicted nerve
    mask there (``STEM.png``, 0/255), so that figures can be drawn later without the model.
    Returns rows and ROC accumulators by class name."""
    out = Path(out_dir)
    spacing = None if mm_per_pixel is None else (mm_per_pixel, mm_per_pixel)
    names = list(getattr(predictor, "class_names", ["nerve"]))
    labels = list(class_labels if class_labels is not None else predictor.config.data.class_labels)
    if label is not None:
        labels[0] = label
    rocs = {name: RocAccumulator() for name in names}
    rows: dict[str, list[dict]] = {name: [] for name in names}
    problems = []
    for sample in tqdm(samples, disable=not progress, desc="evaluate", unit="img"):
        try:
            image, file_spacing, _ = read_frame(sample.image_path, sample.frame)
            truths = [read_mask(sample.mask_path, label=lab, image_shape=image.shape) for lab in labels]
        except InputError as exc:
            problems.append(exc)
            continue
        probs = predictor.predict_classes(image) if hasattr(predictor, "predict_classes") else predictor.predict(image)[None]
        pixel = _spacing(spacing, file_spacing)
        for name, prob, truth in zip(names, probs, truths):
            rocs[name].update(prob, truth)
            row = {"stem": sample.stem, "source": sample.source,
                   **image_metrics(prob, truth, threshold=threshold, spacing=pixel)}
            if pixel is not None:  # areas in mm² only where the pixel size is known
                row["area_pred_mm2"] = row["area_pred_px"] * pixel[0] * pixel[1]
                row["area_truth_mm2"] = row["area_truth_px"] * pixel[0] * pixel[1]
            rows[name].append(row)
        if overlays:
            save_png(make_overlay(image, probs[0] >= threshold, truths[0]), out / "overlays" / f"{sample.stem}.png")
        if mask_dir is not None:
            save_png(((probs[0] >= threshold) * 255).astype(np.uint8), Path(mask_dir) / f"{sample.stem}.png")
    return rows, rocs, problems


def _spacing(user, file_spacing):
    """Pixel size for HD in mm: ``--mm-per-pixel`` when given, else the file's own (DICOM), else None."""
    if user is not None or file_spacing is None:
        return user
    return (file_spacing.row_mm, file_spacing.col_mm)


def write_per_image(path: Path, rows: list[dict], fields=PER_IMAGE_FIELDS) -> None:
    atomic_write_csv(path, ({k: _fmt(r.get(k)) for k in fields} for r in rows), fields)


def save_roc_histograms(roc: RocAccumulator, path: Path) -> None:
    """The pooled ROC as two histograms, so curves of many runs can be merged later."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, pos=roc.pos_hist, neg=roc.neg_hist)


def load_roc_histograms(path: Path) -> RocAccumulator:
    with np.load(path, allow_pickle=False) as data:
        roc = RocAccumulator(bins=len(data["pos"]))
        roc.pos_hist += data["pos"]
        roc.neg_hist += data["neg"]
    return roc


def agreement_summary(rows: list[dict]) -> dict:
    """Area agreement of prediction and expert over ``rows``: in px always, in mm² over the
    images whose pixel size is known (``evaluation.agreement``)."""
    out = {"px": area_agreement([r["area_pred_px"] for r in rows], [r["area_truth_px"] for r in rows], unit="px")}
    calibrated = [r for r in rows if r.get("area_truth_mm2") is not None]
    if calibrated:
        out["mm2"] = area_agreement([r["area_pred_mm2"] for r in calibrated],
                                    [r["area_truth_mm2"] for r in calibrated], unit="mm2")
    return out


def source_summaries(rows: list[dict]) -> dict[str, dict]:
    """Each data folder's figures (``summarize`` + :func:`agreement_summary`) when ``rows`` come
    from several (their ``source``); {} for one folder, whose figures are the pooled ones."""
    sources = sorted({r.get("source") or "" for r in rows})
    if len(sources) < 2:
        return {}
    out = {}
    for source in sources:
        part = [r for r in rows if (r.get("source") or "") == source]
        out[source] = {**summarize(part, keys=SUMMARY_KEYS), "area_agreement": agreement_summary(part)}
    return out


def save_sources_bland_altman(rows: list[dict], path: Path) -> None:
    """The Bland-Altman plot of predicted vs expert nerve area (px), one series per data folder."""
    sources = sorted({r.get("source") or "" for r in rows})
    save_bland_altman_plot({source or "all": ([r["area_pred_px"] for r in rows if (r.get("source") or "") == source],
                                              [r["area_truth_px"] for r in rows if (r.get("source") or "") == source])
                            for source in sources}, path)


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    label=None,
    subset: str = "all",
    threshold: float | None = None,
    mm_per_pixel: float | None = None,
    overlays: bool = True,
    progress: bool = True,
    log=None,
    backend: str = "auto",
    tta: bool | None = None,
    keep_largest: Sequence[str] | None = None,
) -> dict:
    """Write ``metrics.json``, ``per_image.csv``, ``roc.png``, ``roc.npz`` and ``overlays/``.

    Returns the summary written to ``metrics.json``. Pairs that cannot be read are reported
    and skipped; ``metrics.json`` lists them under ``skipped``.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    predictor = load_predictor(run_dir, backend=backend)
    if tta is not None:
        predictor.tta = tta
    if keep_largest is not None:  # trying post-processing on cross-validation: members too
        for model in [predictor, *getattr(predictor, "members", [])]:
            unknown = set(keep_largest) - set(model.class_names)
            if unknown:
                raise ConfigError(f"--keep-largest names unknown classes {sorted(unknown)}; the model has {model.class_names}")
            model.config.inference.keep_largest = tuple(keep_largest)
    if label is None:
        label = predictor.config.data.label
    if threshold is None:  # the cut chosen with the model (config.json inference.threshold)
        threshold = predictor.config.inference.threshold
    data_dirs = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    samples, problems = discover_datasets(data_dirs)
    samples = select_subset(samples, predictor, subset)
    data_dir = ", ".join(str(d) for d in data_dirs)
    if not samples:
        raise InputError(data_dir, f"no image/mask pairs to evaluate (subset {subset!r})", "check --data and --subset")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # cross-validation: every held-out image is scored by the member that did not train on it
    groups = ([(m, [s for s in samples if s.stem in set(m.config.val_stems)]) for m in _members(predictor)]
              if subset == "cv" else [(predictor, samples)])
    names = list(getattr(predictor, "class_names", ["nerve"]))
    rows: dict[str, list[dict]] = {name: [] for name in names}
    rocs = {name: RocAccumulator() for name in names}
    for model, group in groups:
        model.tta = predictor.tta  # a member scored alone mirrors for itself
        group_rows, group_rocs, read_problems = evaluate_samples(
            model, group, out, label=label, threshold=threshold, mm_per_pixel=mm_per_pixel,
            overlays=overlays, progress=progress,
        )
        problems += read_problems
        for name in names:
            rows[name] += group_rows[name]
            rocs[name].pos_hist += group_rocs[name].pos_hist
            rocs[name].neg_hist += group_rocs[name].neg_hist
    for problem in problems:
        log(f"warning: skipped {problem}")
    nerve = names[0]
    if not rows[nerve]:
        raise InputError(data_dir, "none of the pairs could be read", "see the warnings above")
    write_per_image(out / "per_image.csv", rows[nerve], fields=PER_IMAGE_FIELDS + RUN_EXTRA_FIELDS)
    save_roc_histograms(rocs[nerve], out / "roc.npz")

    summary = summarize(rows[nerve], keys=SUMMARY_KEYS)
    summary["pooled_auc"] = rocs[nerve].auc()
    summary["area_agreement"] = agreement_summary(rows[nerve])
    by_source = source_summaries(rows[nerve])
    if by_source:
        summary["by_source"] = by_source
    save_sources_bland_altman(rows[nerve], out / "bland_altman.png")
    summary.update(
        {
            "threshold": threshold,
            "subset": subset,
            "run": str(run_dir),
            "data": str(data_dir),
            "label": label,
            "tta": bool(getattr(predictor, "tta", False)),
            "keep_largest": list(predictor.config.inference.keep_largest),
            "skipped": [str(p) for p in problems],
            "auc_note": "auc = mean of per-image pixel ROC AUCs; pooled_auc = AUC of the ROC pooled over all pixels (roc.png)",
        }
    )
    if len(names) > 1:  # the nerve's figures stay at the top level; every class (nerve too) under "classes"
        summary["classes"] = {}
        for name, class_label in zip(names, predictor.config.data.class_labels):
            per_class = summarize(rows[name], keys=SUMMARY_KEYS)
            per_class.update({"pooled_auc": rocs[name].auc(), "label": label if name == nerve else class_label})
            summary["classes"][name] = per_class
            if name != nerve:
                write_per_image(out / f"per_image_{name}.csv", rows[name])
    atomic_write_json(out / "metrics.json", _jsonable(summary))
    save_roc_plot({f"{predictor.config.model.arch} {name}": rocs[name] for name in names} if len(names) > 1
                  else {predictor.config.model.arch: rocs[nerve]}, out / "roc.png")
    return summary


PREDICTION_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


def _prediction_path(pred_dir: Path, stem: str) -> Path | None:
    """The prediction of one sample: ``<stem>.png`` or the nnU-Net case name ``export_nnunet`` gave it."""
    from ..data.export import nnunet_case_name

    for name in dict.fromkeys((stem, nnunet_case_name(stem))):
        for suffix in PREDICTION_SUFFIXES:
            if (pred_dir / f"{name}{suffix}").is_file():
                return pred_dir / f"{name}{suffix}"
    return None


def evaluate_prediction_folder(
    pred_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    label=None,
    pred_label: int = 1,
    mm_per_pixel: float | None = None,
    log=None,
) -> dict:
    """Score masks predicted by another tool (e.g. nnU-Net's ``fold_N/validation/``) with our metrics.

    Each image of ``data_dir`` that has a prediction ``<stem>.png`` (or the nnU-Net case name) in
    ``pred_dir`` is scored at its original resolution against its expert mask; pixels equal to
    ``pred_label`` are the prediction. Images without a prediction are not scored (a fold's
    validation folder holds only that fold). Masks carry no scores, so ``auc`` is left empty.
    Writes ``metrics.json`` and ``per_image.csv`` (the same columns as ``nerveseg evaluate``, so the
    two can be paired by ``stem``).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    pred_dir, out = Path(pred_dir), Path(out_dir)
    if not pred_dir.is_dir():
        raise InputError(pred_dir, "prediction folder not found", "pass the folder holding <stem>.png masks")
    samples, problems = discover_samples(data_dir)
    spacing = None if mm_per_pixel is None else (mm_per_pixel, mm_per_pixel)
    rows, unmatched = [], 0
    for sample in samples:
        path = _prediction_path(pred_dir, sample.stem)
        if path is None:
            unmatched += 1
            continue
        try:
            image, file_spacing, _ = read_frame(sample.image_path, sample.frame)
            truth = read_mask(sample.mask_path, label=label, image_shape=image.shape)
            pred = read_mask(path, label=pred_label, image_shape=image.shape)
        except InputError as exc:
            problems.append(exc)
            continue
        metrics = image_metrics(pred.astype(np.float32), truth, threshold=0.5, spacing=_spacing(spacing, file_spacing))
        metrics["auc"] = math.nan  # a binary mask has no ranking to score
        rows.append({"stem": sample.stem, **metrics})
    for problem in problems:
        log(f"warning: skipped {problem}")
    if not rows:
        raise InputError(pred_dir, f"no prediction matched an image of {data_dir}",
                         "name predictions <stem>.png after the images (nnU-Net case names also match)")
    out.mkdir(parents=True, exist_ok=True)
    write_per_image(out / "per_image.csv", rows)
    summary = summarize(rows, keys=SUMMARY_KEYS)
    summary.update({
        "predictions": str(pred_dir), "data": str(data_dir), "label": label, "pred_label": pred_label,
        "images_without_prediction": unmatched, "skipped": [str(p) for p in problems],
        "auc_note": "predictions are binary masks: no AUC",
    })
    atomic_write_json(out / "metrics.json", _jsonable(summary))
    return summary


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj
