"""Pool the held-out evaluations of fold runs that have finished (before the ensemble exists).

    python studies/pool_fold_evals.py RUN/fold_0/eval RUN/fold_1/eval ... [--against OTHER/cv_plain/per_image.csv ...]

Each argument is an ``nerveseg evaluate --subset val`` folder of one fold model. Prints, for the union
of their images, nerve Dice mean ± SD, median, zero-overlap and HD95, one line per fold, and, for each
``--against`` table, the paired two-sided Wilcoxon signed-rank test on per-image Dice over the images
both hold (scipy), and over each data folder's images when they come from several. The same numbers ``evaluate --subset cv`` gives once every fold has finished.

``--out DIR`` also writes the pooled ``per_image.csv``, ``roc.npz``, ``metrics.json`` (with
``area_agreement``, and ``by_source`` when the rows come from several data folders) and
``bland_altman.png`` in ``evaluate``'s format (the model card reads it): for fold models that
cannot form one ensemble folder, such as 2-member ensembles per fold, or folds still training.
``--markdown`` prints, per data folder, a table of each fold and the pooled images: Dice, median,
misses, and the agreement of the nerve area with the expert's (median absolute error, Bland-Altman
bias and limits, Lin's CCC), as docs/benchmarks.md shows them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import area_agreement_px, column, describe, load_per_image, mean_sd, paired, source_groups  # noqa: E402

from nerveseg.evaluation.evaluate import (  # noqa: E402
    PER_IMAGE_FIELDS,
    RUN_EXTRA_FIELDS,
    SUMMARY_KEYS,
    agreement_summary,
    load_roc_histograms,
    save_roc_histograms,
    save_sources_bland_altman,
    source_summaries,
    write_per_image,
)
from nerveseg.evaluation.metrics import RocAccumulator, summarize  # noqa: E402
from nerveseg.io_utils import atomic_write_json  # noqa: E402


def line(rows: dict[str, dict]) -> str:
    d = describe(rows)
    return (f"Dice {mean_sd(d)} (median {d['dice_median']:.3f}), HD95 {d['hd95_mean']:.1f} px, "
            f"zero-overlap {d['zero_overlap']}/{d['n']} ({100 * d['zero_overlap_rate']:.1f}%), n = {d['n']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", nargs="+", type=Path)
    ap.add_argument("--against", nargs="*", type=Path, default=[])
    ap.add_argument("--out", type=Path, default=None, help="write the pooled per_image.csv, roc.npz and metrics.json here")
    ap.add_argument("--markdown", action="store_true", help="also print per-folder tables: each fold and the pooled images")
    args = ap.parse_args()
    pooled: dict[str, dict] = {}
    for folder in args.evals:
        rows = load_per_image(folder / "per_image.csv")
        print(f"{folder}: {line(rows)}")
        pooled.update(rows)
    print(f"pooled: {line(pooled)}")
    sources = sorted({r.get("source") or "" for r in pooled.values()})
    if len(sources) > 1:
        for source in sources:
            print(f"  {source}: {line({s: r for s, r in pooled.items() if (r.get('source') or '') == source})}")
    if args.out:
        write_pooled(args.evals, pooled, args.out)
    if args.markdown:
        print(markdown_tables(args.evals))
    for other_path in args.against:
        for comparison in compare_against(pooled, load_per_image(other_path)):
            where = "" if comparison["source"] is None else f" ({comparison['source']})"
            print(f"vs {other_path}{where}: {comparison['mean']:.3f} vs {comparison['other_mean']:.3f} on the same "
                  f"{comparison['n']} images, median difference {comparison['median_difference']:+.3f}, "
                  f"Wilcoxon p = {comparison['p']:.3g}")


def compare_against(pooled: dict[str, dict], other: dict[str, dict]) -> list[dict]:
    """Per-image nerve Dice of ``pooled`` against ``other`` on the images both hold: all of them, then
    each data folder (``source``) on its own when there are several (an arm can win on one anatomy
    and lose on the other). Paired two-sided Wilcoxon signed-rank test (scipy)."""
    out = []
    for source, stems in source_groups(pooled, sorted(set(pooled) & set(other))):
        a, b = column(pooled, stems=stems), column(other, stems=stems)
        out.append({"source": source, "n": len(stems), "mean": float(a.mean()), "other_mean": float(b.mean()),
                     **paired(a, b)})
    return out


def _table_row(name: str, rows: list[dict]) -> str:
    d = describe(rows)
    area = area_agreement_px(rows)
    ba = area["bland_altman"]

    def fmt(value, spec: str) -> str:  # None where a figure is undefined (e.g. CCC of constant areas)
        return "n/a" if value is None else format(value, spec)

    return (f"| {name} | {d['n']} | {mean_sd(d)} | {d['dice_median']:.3f} | {d['zero_overlap']} | "
            f"{fmt(area['median_ape_percent'], '.1f')}% | {fmt(ba['bias'], '.0f')} ({fmt(ba['loa_low'], '.0f')} to "
            f"{fmt(ba['loa_high'], '.0f')}) | {fmt(area['lins_ccc'], '.3f')} |")


def markdown_tables(evals: list[Path]) -> str:
    """One markdown table per data folder (``source``): a row per evaluation, then the pooled images."""
    folds = [(folder.name, list(load_per_image(folder / "per_image.csv").values())) for folder in evals]
    sources = sorted({r.get("source") or "" for _, rows in folds for r in rows})
    out = []
    for source in sources:
        out += [f"{source or 'all images'}:", "",
                "| evaluation | images | nerve Dice | median | misses | median area error | Bland-Altman bias (95% limits), px | Lin's CCC |",
                "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: |"]
        mine = [(name, [r for r in rows if (r.get("source") or "") == source]) for name, rows in folds]
        out += [_table_row(name, rows) for name, rows in mine if rows]
        out += [_table_row(f"**pooled, {len(mine)} folds**", [r for _, rows in mine for r in rows]), ""]
    return "\n".join(out)


def write_pooled(evals: list[Path], pooled: dict[str, dict], out: Path) -> dict:
    """evaluate's metrics.json for the union of the folds' images (summarize over their rows, the
    pixel ROC pooled from each fold's roc.npz, the threshold their metrics.json share)."""
    if len(pooled) != sum(len(load_per_image(f / "per_image.csv")) for f in evals):
        raise SystemExit("the evaluations share images: pooling them would count an image twice")
    thresholds = {json.loads((f / "metrics.json").read_text())["threshold"] for f in evals if (f / "metrics.json").exists()}
    if len(thresholds) > 1:
        raise SystemExit(f"the evaluations used different thresholds {sorted(thresholds)}: their figures do not pool")
    fields = PER_IMAGE_FIELDS + tuple(f for f in RUN_EXTRA_FIELDS if all(f in r for r in pooled.values()))
    rows = [{k: (None if r[k] == "" else r[k]) for k in fields} for r in pooled.values()]
    for r in rows:
        r["truth_empty"] = int(r["area_truth_px"]) == 0
        r["zero_overlap"] = bool(int(r["zero_overlap"]))
        r["area_pred_px"], r["area_truth_px"] = int(r["area_pred_px"]), int(r["area_truth_px"])
        for k in ("area_pred_mm2", "area_truth_mm2"):
            if r.get(k) is not None:
                r[k] = float(r[k])
    missing = [str(f) for f in evals if not (f / "roc.npz").is_file()]
    if missing:
        raise SystemExit(f"no roc.npz in {', '.join(missing)}: the pooled pixel ROC needs every fold's histograms "
                         "(run `nerveseg evaluate` there again)")
    roc = RocAccumulator()
    for folder in evals:
        part = load_roc_histograms(folder / "roc.npz")
        roc.pos_hist = roc.pos_hist + part.pos_hist
        roc.neg_hist = roc.neg_hist + part.neg_hist
    out.mkdir(parents=True, exist_ok=True)
    write_per_image(out / "per_image.csv", [{**r, "zero_overlap": int(r["zero_overlap"])} for r in rows], fields=fields)
    save_roc_histograms(roc, out / "roc.npz")
    summary = summarize(rows, keys=SUMMARY_KEYS)
    summary["area_agreement"] = agreement_summary(rows)
    by_source = source_summaries(rows)
    if by_source:
        summary["by_source"] = by_source
    save_sources_bland_altman(rows, out / "bland_altman.png")
    summary.update({"pooled_auc": roc.auc(), "threshold": thresholds.pop() if thresholds else None, "subset": "cv (pooled fold evaluations)",
                    "evaluations": [str(f) for f in evals]})
    atomic_write_json(out / "metrics.json", summary)
    return summary


if __name__ == "__main__":
    main()
