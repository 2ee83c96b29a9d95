"""Score two recipes' fold models together: for every fold both have finished, the pair as one
2-member ensemble on the fold neither member trained on.

    python benchmarks/fold_pair_ensembles.py RUN_A RUN_B --data DATA --out OUT [--backend torch]

RUN_A and RUN_B hold ``fold_k/`` runs trained on the same splits (``--folds 5 --fold k``, same
seed); a fold counts once its ``eval/metrics.json`` exists (``accuracy_study.sh`` writes it after
training). For each such fold, ``OUT/fold_k`` becomes an ensemble folder (``nerveseg ensemble``: copies of
both members) and is scored with ``--subset unseen``: exactly fold k's held-out
images. Then, pooled over the folds: nerve Dice of A alone, B alone and the pair, with paired
two-sided Wilcoxon tests on per-image Dice (scipy), printed and written to ``OUT/summary.json``
and, as docs/benchmarks.md's table, ``OUT/table.md``.

Why: an ensemble of two architectures is cross-validated honestly only this way; averaging the
five fold models of one recipe cannot be scored on images one of them trained on.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from nerveseg.config import RunConfig
from nerveseg.errors import ConfigError
from nerveseg.evaluation.evaluate import evaluate_run
from nerveseg.io_utils import atomic_write_json
from nerveseg.training.trainer import assemble_ensemble


def load(path: Path) -> dict[str, dict]:
    with path.open(newline="") as f:
        return {row["stem"]: row for row in csv.DictReader(f)}


def finished_folds(run: Path) -> dict[int, Path]:
    return {int(d.name.split("_")[1]): d for d in sorted(run.glob("fold_*"))
            if (d / "eval" / "metrics.json").exists() and (d / "model.safetensors").exists()}


def build_pair(a: Path, b: Path, out: Path) -> Path:
    """OUT: the ensemble of fold runs ``a`` and ``b`` (members ``a/`` and ``b/``), if not built yet."""
    configs = [RunConfig.load(a / "config.json"), RunConfig.load(b / "config.json")]
    if sorted(configs[0].val_stems) != sorted(configs[1].val_stems):
        raise ConfigError(f"{a} and {b} hold out different images; train both with the same --folds, --fold and --seed")
    if not (out / "config.json").exists():
        assemble_ensemble([a, b], out, ["a", "b"])
    return out


def dice_of(rows: dict[str, dict], stems: list[str]) -> np.ndarray:
    return np.array([float(rows[s]["dice"]) for s in stems])


def describe(rows: dict[str, dict], stems: list[str]) -> dict:
    dice = dice_of(rows, stems)
    misses = sum(int(rows[s]["zero_overlap"]) for s in stems)
    hd95 = np.array([float(rows[s]["hd95"]) for s in stems])
    return {"n": len(stems), "dice_mean": float(dice.mean()), "dice_sd": float(dice.std(ddof=1)),
            "dice_median": float(np.median(dice)), "hd95_mean": float(hd95.mean()),
            "zero_overlap": misses, "zero_overlap_rate": misses / len(stems)}


def paired(x: dict[str, dict], y: dict[str, dict], stems: list[str]) -> dict:
    a, b = dice_of(x, stems), dice_of(y, stems)
    p = float(wilcoxon(a, b).pvalue) if np.any(a != b) else 1.0
    return {"median_difference": float(np.median(a - b)), "mean_difference": float((a - b).mean()), "p": p}


def markdown(summary: dict, labels: dict[str, str]) -> str:
    """docs/benchmarks.md's table: nerve Dice (mean ± SD) and complete misses per held-out fold and pooled."""
    def cell(d: dict, bold: str = "") -> str:
        return f"{bold}{d['dice_mean']:.3f} ± {d['dice_sd']:.3f}{bold} | {bold}{d['zero_overlap']}/{d['n']}{bold}"

    lines = [f"| held-out fold | n | {labels['a']}: Dice | misses | {labels['b']}: Dice | misses | {labels['pair']}: Dice | misses |",
             "| --- | ---: | --- | ---: | --- | ---: | --- | ---: |"]
    for k, fold in summary["per_fold"].items():
        lines.append(f"| {k} | {fold['a']['n']} | {cell(fold['a'])} | {cell(fold['b'])} | {cell(fold['pair'])} |")
    pooled = summary["pooled"]
    lines.append(f"| **pooled** | {pooled['a']['n']} | {cell(pooled['a'], '**')} | {cell(pooled['b'], '**')} | {cell(pooled['pair'], '**')} |")
    lines.append("")
    for key, (x, y) in {"b_vs_a": ("b", "a"), "pair_vs_a": ("pair", "a"), "pair_vs_b": ("pair", "b")}.items():
        t = summary[key]
        lines.append(f"- {labels[x]} minus {labels[y]}, paired per image: mean {t['mean_difference']:+.3f}, "
                     f"median {t['median_difference']:+.3f}, Wilcoxon p = {t['p']:.2g} (n = {pooled['a']['n']})")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--backend", default="torch", help="evaluate's backend (torch: the study's reference)")
    args = ap.parse_args()
    folds_a, folds_b = finished_folds(args.run_a), finished_folds(args.run_b)
    folds = sorted(set(folds_a) & set(folds_b))
    if not folds:
        sys.exit(f"no fold has finished in both {args.run_a} and {args.run_b} (fold_k/eval/metrics.json)")
    rows = {"a": {}, "b": {}, "pair": {}}
    per_fold = {}
    for k in folds:
        pair = build_pair(folds_a[k], folds_b[k], args.out / f"fold_{k}")
        if not (pair / "eval" / "metrics.json").exists():
            evaluate_run(pair, args.data, pair / "eval", subset="unseen", overlays=False, progress=False,
                         backend=args.backend, tta=False, keep_largest=[])
        fold_rows = {"a": load(folds_a[k] / "eval" / "per_image.csv"), "b": load(folds_b[k] / "eval" / "per_image.csv"),
                     "pair": load(pair / "eval" / "per_image.csv")}
        if not set(fold_rows["pair"]) == set(fold_rows["a"]) == set(fold_rows["b"]):
            raise ConfigError(f"fold {k}: the three evaluations scored different images")
        per_fold[k] = {name: describe(r, sorted(r)) for name, r in fold_rows.items()}
        for name in rows:
            rows[name].update(fold_rows[name])
    stems = sorted(rows["pair"])
    summary = {"run_a": args.run_a.name, "run_b": args.run_b.name, "folds": folds,
               "pooled": {name: describe(r, stems) for name, r in rows.items()}, "per_fold": per_fold,
               "pair_vs_a": paired(rows["pair"], rows["a"], stems), "pair_vs_b": paired(rows["pair"], rows["b"], stems),
               "b_vs_a": paired(rows["b"], rows["a"], stems)}
    atomic_write_json(args.out / "summary.json", summary)
    labels = {"a": args.run_a.name, "b": args.run_b.name, "pair": "pair ensemble"}
    (args.out / "table.md").write_text(markdown(summary, labels))
    print(f"folds {', '.join(map(str, folds))} pooled, n = {len(stems)}")
    for name, d in summary["pooled"].items():
        print(f"  {labels[name]:>28}: Dice {d['dice_mean']:.3f} ± {d['dice_sd']:.3f} (median {d['dice_median']:.3f}), "
              f"HD95 {d['hd95_mean']:.1f} px, zero-overlap {d['zero_overlap']}/{d['n']}")
    for key, (x, y) in {"b_vs_a": ("b", "a"), "pair_vs_a": ("pair", "a"), "pair_vs_b": ("pair", "b")}.items():
        t = summary[key]
        print(f"  {labels[x]} vs {labels[y]}: mean {t['mean_difference']:+.3f}, median {t['median_difference']:+.3f}, "
              f"Wilcoxon p = {t['p']:.3g}")


if __name__ == "__main__":
    main()
