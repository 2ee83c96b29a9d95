"""Score two recipes' fold models together: for every fold both have finished, the pair as one
2-member ensemble on the fold neither member trained on.

    python studies/fold_pair_ensembles.py RUN_A RUN_B --data DATA --out OUT [--backend torch]

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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import column, describe, finished_folds, load_per_image, mean_sd, paired  # noqa: E402

from nerveseg.config import RunConfig  # noqa: E402
from nerveseg.errors import ConfigError  # noqa: E402
from nerveseg.evaluation.evaluate import evaluate_run  # noqa: E402
from nerveseg.io_utils import atomic_write_json  # noqa: E402
from nerveseg.training.trainer import assemble_ensemble  # noqa: E402


def build_pair(a: Path, b: Path, out: Path) -> Path:
    """OUT: the ensemble of fold runs ``a`` and ``b`` (members ``a/`` and ``b/``), if not built yet."""
    configs = [RunConfig.load(a / "config.json"), RunConfig.load(b / "config.json")]
    if sorted(configs[0].val_stems) != sorted(configs[1].val_stems):
        raise ConfigError(f"{a} and {b} hold out different images; train both with the same --folds, --fold and --seed")
    if not (out / "config.json").exists():
        assemble_ensemble([a, b], out, ["a", "b"])
    return out


def paired_rows(x: dict[str, dict], y: dict[str, dict], stems: list[str]) -> dict:
    """x minus y, per-image nerve Dice on ``stems``."""
    test = paired(column(x, stems=stems), column(y, stems=stems))
    return {"median_difference": test["median_difference"], "mean_difference": test["mean_difference"], "p": test["p"]}


def markdown(summary: dict, labels: dict[str, str]) -> str:
    """docs/benchmarks.md's table: nerve Dice (mean ± SD) and complete misses per held-out fold and pooled."""
    def cell(d: dict, bold: str = "") -> str:
        return f"{bold}{mean_sd(d)}{bold} | {bold}{d['zero_overlap']}/{d['n']}{bold}"

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
        fold_rows = {"a": load_per_image(folds_a[k] / "eval" / "per_image.csv"),
                     "b": load_per_image(folds_b[k] / "eval" / "per_image.csv"), "pair": load_per_image(pair / "eval" / "per_image.csv")}
        if not set(fold_rows["pair"]) == set(fold_rows["a"]) == set(fold_rows["b"]):
            raise ConfigError(f"fold {k}: the three evaluations scored different images")
        per_fold[k] = {name: describe(r, sorted(r)) for name, r in fold_rows.items()}
        for name in rows:
            rows[name].update(fold_rows[name])
    stems = sorted(rows["pair"])
    summary = {"run_a": args.run_a.name, "run_b": args.run_b.name, "folds": folds,
               "pooled": {name: describe(r, stems) for name, r in rows.items()}, "per_fold": per_fold,
               "pair_vs_a": paired_rows(rows["pair"], rows["a"], stems), "pair_vs_b": paired_rows(rows["pair"], rows["b"], stems),
               "b_vs_a": paired_rows(rows["b"], rows["a"], stems)}
    atomic_write_json(args.out / "summary.json", summary)
    labels = {"a": args.run_a.name, "b": args.run_b.name, "pair": "pair ensemble"}
    (args.out / "table.md").write_text(markdown(summary, labels))
    print(f"folds {', '.join(map(str, folds))} pooled, n = {len(stems)}")
    for name, d in summary["pooled"].items():
        print(f"  {labels[name]:>28}: Dice {mean_sd(d)} (median {d['dice_median']:.3f}), "
              f"HD95 {d['hd95_mean']:.1f} px, zero-overlap {d['zero_overlap']}/{d['n']}")
    for key, (x, y) in {"b_vs_a": ("b", "a"), "pair_vs_a": ("pair", "a"), "pair_vs_b": ("pair", "b")}.items():
        t = summary[key]
        print(f"  {labels[x]} vs {labels[y]}: mean {t['mean_difference']:+.3f}, median {t['median_difference']:+.3f}, "
              f"Wilcoxon p = {t['p']:.3g}")


if __name__ == "__main__":
    main()
