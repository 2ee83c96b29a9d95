"""Evaluate a trained run on a dataset, at the original resolution (the paper's Statistical Analysis)."""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.io import read_image, read_mask
from ..data.samples import discover_samples
from ..errors import ConfigError, InputError
from ..inference.overlay import make_overlay, save_png
from ..inference.predictor import Predictor
from ..io_utils import atomic_path, atomic_write_json, atomic_write_text
from .metrics import RocAccumulator, image_metrics, summarize

PER_IMAGE_FIELDS = (
    "stem", "precision", "recall", "dice", "iou", "hd", "hd95", "hd_mm", "hd95_mm", "auc",
    "zero_overlap", "area_pred_px", "area_truth_px",
)
SUMMARY_KEYS = ("precision", "recall", "dice", "iou", "hd", "hd95", "hd_mm", "hd95_mm", "auc")
SUBSETS = ("all", "val", "train", "unseen")


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
    """``val``: the run's validation images; ``unseen``: everything it did not train on."""
    if subset not in SUBSETS:
        raise ConfigError(f"unknown subset {subset!r}; choose from {', '.join(SUBSETS)}")
    if subset == "all":
        return samples
    train, val = set(predictor.config.train_stems), set(predictor.config.val_stems)
    keep = {"val": lambda s: s in val, "train": lambda s: s in train, "unseen": lambda s: s not in train}[subset]
    return [s for s in samples if keep(s.stem)]


def save_roc_plot(fpr: np.ndarray, tpr: np.ndarray, auc: float, path: Path, label: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot(fpr, tpr, lw=2, label=f"{label} AUC = {auc:.4f}".strip())
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title("Pixel-level ROC (pooled over images)")
    ax.legend(loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    label: int | None = None,
    subset: str = "all",
    threshold: float = 0.5,
    mm_per_pixel: float | None = None,
    overlays: bool = True,
    progress: bool = True,
    log=None,
) -> dict:
    """Write ``metrics.json``, ``per_image.csv``, ``roc.png`` and ``overlays/`` to ``out_dir``.

    Returns the summary written to ``metrics.json``. Pairs that cannot be read are reported
    and skipped; ``metrics.json`` lists them under ``skipped``.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    predictor = Predictor.from_run(run_dir)
    if label is None:
        label = predictor.config.data.label
    samples, problems = discover_samples(data_dir)
    samples = select_subset(samples, predictor, subset)
    if not samples:
        raise InputError(data_dir, f"no image/mask pairs to evaluate (subset {subset!r})", "check --data and --subset")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spacing = None if mm_per_pixel is None else (mm_per_pixel, mm_per_pixel)
    roc = RocAccumulator()
    rows = []
    for sample in tqdm(samples, disable=not progress, desc="evaluate", unit="img"):
        try:
            image = read_image(sample.image_path)
            truth = read_mask(sample.mask_path, label=label, image_shape=image.shape)
        except InputError as exc:
            problems.append(exc)
            continue
        prob = predictor.predict(image)
        metrics = image_metrics(prob, truth, threshold=threshold, spacing=spacing)
        roc.update(prob, truth)
        rows.append({"stem": sample.stem, **metrics})
        if overlays:
            save_png(make_overlay(image, prob >= threshold, truth), out / "overlays" / f"{sample.stem}.png")
    for problem in problems:
        log(f"warning: skipped {problem}")
    if not rows:
        raise InputError(data_dir, "none of the pairs could be read", "see the warnings above")

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PER_IMAGE_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: _fmt(r.get(k)) for k in PER_IMAGE_FIELDS} for r in rows)
    atomic_write_text(out / "per_image.csv", buf.getvalue())

    summary = summarize(rows, keys=SUMMARY_KEYS)
    fpr, tpr = roc.curve()
    pooled_auc = roc.auc()
    summary["pooled_auc"] = pooled_auc
    summary.update(
        {
            "threshold": threshold,
            "subset": subset,
            "run": str(run_dir),
            "data": str(data_dir),
            "label": label,
            "skipped": [str(p) for p in problems],
            "auc_note": "auc = mean of per-image pixel ROC AUCs; pooled_auc = AUC of the ROC pooled over all pixels (roc.png)",
        }
    )
    atomic_write_json(out / "metrics.json", _jsonable(summary))
    save_roc_plot(fpr, tpr, pooled_auc, out / "roc.png", label=predictor.config.model.arch)
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
