"""What the accuracy studies share, written once: fold runs and their held-out probabilities, the
post-processing rule, per-image tables, their summaries and paired tests.

The study scripts import it as ``from common import ...`` after putting their own folder on
``sys.path`` (``python studies/X.py`` does that by itself; the line is for tests that load a script
by its path). A fold run is ``RUN/fold_k`` trained with ``--folds 5 --fold k``; it has *finished*
once it holds its weights and the evaluation of its held-out fold (``fold_k/eval/metrics.json``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.stats import wilcoxon

# ------------------------------------------------------------------------------------------------
# fold runs


def finished_folds(run: Path) -> dict[int, Path]:
    """{k: run/fold_k} for the folds whose run has its weights and its held-out evaluation."""
    return {int(d.name.split("_")[1]): d for d in sorted(Path(run).glob("fold_*"))
            if (d / "model.safetensors").exists() and (d / "eval" / "metrics.json").exists()}


def fold_runs_parser(doc: str) -> argparse.ArgumentParser:
    """A study's command line that takes RUN [RUN ...] (folders of fold_k/ runs on the same splits,
    averaged as one ensemble) and --data."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="folders of fold_k/ runs trained on the same splits")
    ap.add_argument("--data", required=True, type=Path, action="append",
                    help="the dataset folder they were trained on (repeat it for runs trained on several, "
                         "`nerveseg train --data A --data B`)")
    return ap


def folds_of_every_run(runs: list[Path], wanted: list[int] | None = None) -> list[int]:
    """The folds finished in every run (or ``wanted``, which must all be); exits with a message
    when there are none or a wanted one is missing."""
    common = set.intersection(*[set(finished_folds(run)) for run in runs])
    folds = sorted(wanted) if wanted else sorted(common)
    missing = [k for k in folds if k not in common]
    if not folds or missing:
        sys.exit(f"folds {missing or 'none'} are not finished in every run "
                 "(fold_k/model.safetensors and fold_k/eval/metrics.json); train and evaluate them first")
    return folds


def samples_by_stem(data: Path | list[Path]) -> dict:
    """{stem: Sample} of a dataset folder, or of several (a stem in two of them is an error: the
    held-out stems of a run would not say which image they mean)."""
    from nerveseg.data.samples import discover_samples

    out: dict = {}
    for folder in [data] if isinstance(data, (str, Path)) else data:
        samples, _ = discover_samples(Path(folder))
        twice = sorted({s.stem for s in samples} & set(out))
        if twice:
            raise SystemExit(f"{folder}: stems {twice[:3]} are also in another --data folder; "
                             "the studies need stems that are unique across the folders")
        out.update({s.stem: s for s in samples})
    return out


def fold_probabilities(fold_run: Path, samples_by_stem: dict) -> dict[str, np.ndarray]:
    """{stem: (H, W) float16 nerve probability} on the fold run's validation images at their original
    resolution (no TTA, no region removal), cached in ``fold_run/val_probs.npz``."""
    from nerveseg.config import RunConfig
    from nerveseg.data.media import read_frame
    from nerveseg.inference.predictor import Predictor
    from nerveseg.io_utils import atomic_path

    cache = fold_run / "val_probs.npz"
    config = RunConfig.load(fold_run / "config.json")
    if cache.exists():
        with np.load(cache) as z:
            probs = {k: z[k] for k in z.files}
        if set(probs) == set(config.val_stems):
            return probs
    predictor = Predictor.from_run(fold_run, device="cpu", tta=False)
    predictor.config.inference.keep_largest = ()
    probs = {}
    for stem in config.val_stems:
        sample = samples_by_stem[stem]
        image, _, _ = read_frame(sample.image_path, sample.frame)
        probs[stem] = predictor.predict(image).astype(np.float16)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **probs)
    return probs


def mean_probability(members: list[np.ndarray]) -> np.ndarray:
    """The ensemble's probability: the members' mean in float32."""
    return np.mean([p.astype(np.float32) for p in members], axis=0)


def nerve_truth(sample, shape: tuple[int, ...]) -> np.ndarray:
    """The expert's nerve mask (label 1), checked against the probability's shape."""
    from nerveseg.data.io import read_mask

    return read_mask(sample.mask_path, label=1, image_shape=shape)


# ------------------------------------------------------------------------------------------------
# post-processing and per-image scores


def apply_rule(prob: np.ndarray, threshold: float, fraction: float) -> np.ndarray:
    """Cut at ``threshold``, then drop nerve regions smaller than ``fraction`` of the largest
    (0 keeps all, 1 keeps exactly one: the largest, the first on ties)."""
    mask = prob >= threshold
    if fraction <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= fraction * sizes.max()) + 1
    if fraction >= 1:  # exactly one region, the largest (first on ties)
        keep = keep[:1]
    return np.isin(labels, keep)


def dice(pred: np.ndarray, truth: np.ndarray) -> tuple[float, bool]:
    """(Dice, complete miss) under the policy of nerveseg.evaluation.metrics (truth is never empty here)."""
    tp = int(np.count_nonzero(pred & truth))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    return (2 * tp / total if total else 1.0), tp == 0


# ------------------------------------------------------------------------------------------------
# per-image tables (``nerveseg evaluate``'s per_image.csv), summaries and paired tests


def read_rows(path: Path) -> list[dict]:
    """The rows of a per_image.csv, in its order."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def load_per_image(path: Path) -> dict[str, dict]:
    """{stem: row} of a per_image.csv."""
    return {row["stem"]: row for row in read_rows(path)}


def column(rows: dict[str, dict] | list[dict], key: str = "dice", stems: list[str] | None = None) -> np.ndarray:
    """One column of per-image rows as floats ('' and 'nan' as NaN), in ``stems``' order when given."""
    chosen = [rows[s] for s in stems] if stems is not None else list(rows.values() if isinstance(rows, dict) else rows)
    return np.array([float(r[key]) if r[key] not in (None, "", "nan") else np.nan for r in chosen])


def dice_summary(dice: np.ndarray, misses: int) -> dict:
    """n, nerve Dice mean, SD (ddof 1), median, and complete misses."""
    dice = np.asarray(dice, dtype=float)
    return {"n": len(dice), "dice_mean": float(dice.mean()), "dice_sd": float(dice.std(ddof=1)),
            "dice_median": float(np.median(dice)), "zero_overlap": int(misses)}


def describe(rows: dict[str, dict] | list[dict], stems: list[str] | None = None) -> dict:
    """dice_summary of per-image rows, with HD95's mean and the miss rate."""
    chosen = [rows[s] for s in stems] if stems is not None else list(rows.values() if isinstance(rows, dict) else rows)
    summary = dice_summary(column(chosen), sum(int(r["zero_overlap"]) for r in chosen))
    misses = summary.pop("zero_overlap")
    return {**summary, "hd95_mean": float(column(chosen, "hd95").mean()), "zero_overlap": misses,
            "zero_overlap_rate": misses / len(chosen)}


def mean_sd(d: dict) -> str:
    """'0.612 ± 0.245' of a summary."""
    return f"{d['dice_mean']:.3f} ± {d['dice_sd']:.3f}"


def source_groups(rows: dict[str, dict], stems: list[str]) -> list[tuple[str | None, list[str]]]:
    """(None, all ``stems``), then (source, its stems) for each data folder when the rows come from
    several: an arm can win on one anatomy and lose on the other, so each is judged on its own too."""
    sources = sorted({rows[s].get("source") or "" for s in stems})
    per_source = [(src, [s for s in stems if (rows[s].get("source") or "") == src]) for src in sources]
    return [(None, list(stems))] + (per_source if len(sources) > 1 else [])


def area_agreement_px(rows: list[dict]) -> dict:
    """The nerve-area agreement in px (median absolute % error, Bland-Altman, Lin's CCC) of per_image.csv rows."""
    from nerveseg.evaluation.evaluate import agreement_summary

    return agreement_summary([{"area_pred_px": float(r["area_pred_px"]), "area_truth_px": float(r["area_truth_px"])}
                              for r in rows])["px"]


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """a minus b on the same images: mean and median difference, two-sided Wilcoxon signed-rank p
    (1.0 when the two are identical)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    p = float(wilcoxon(a, b).pvalue) if np.any(a != b) else 1.0
    return {"mean_difference": float((a - b).mean()), "median_difference": float(np.median(a - b)), "p": p}
