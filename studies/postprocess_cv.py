"""Choose the nerve threshold and small-region removal by nested cross-validation, as nnU-Net
chooses its post-processing, for one recipe's fold models or an ensemble of several recipes' ones.

    python studies/postprocess_cv.py RUN [RUN ...] --data DATA --out OUT

Each RUN holds ``fold_k/`` runs trained on the same five splits (``--folds 5 --fold k``). For every
fold that all RUNs have finished, each fold model's nerve probabilities on fold k's held-out images
are computed once at the images' original resolution and cached (``fold_k/val_probs.npz``, float16);
several RUNs are averaged (bilinear resizing is linear, so this is the mean an ensemble folder's
``EnsemblePredictor`` computes, up to rounding).

Candidates: threshold t (0.30-0.70) x removal of nerve regions smaller than a fraction f of the largest
(0 = keep all, 1 = keep only the largest). **Nested**: for each held-out fold k, the candidate with the
best mean Dice on the *other* folds' images (with ``--max-zero-overlap R``: among those that miss at most
a fraction R of those images entirely) is applied to fold k, so no image takes part in choosing
the rule it is scored with. Printed, and written to ``OUT/summary.json`` and ``OUT/table.md``: the
plain rule (t = 0.5, f = 0) against the nested choice, pooled, with a paired Wilcoxon test, and the
rule each fold chose. The plain rule's Dice is checked against each run's own ``eval/per_image.csv``
(``nerveseg evaluate``), an independent code path.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    apply_rule,
    area_agreement_px,
    dice,
    dice_summary,
    fold_probabilities,
    fold_runs_parser,
    folds_of_every_run,
    load_per_image,
    mean_probability,
    mean_sd,
    nerve_truth,
    paired,
    samples_by_stem,
)

from nerveseg.io_utils import atomic_write_json  # noqa: E402

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.30, 0.701, 0.05))
FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)


def choose(inner: list[np.ndarray], max_zero_overlap: float | None) -> int:
    """The candidate with the best mean Dice over ``inner`` images (each (n_candidates, 2): Dice,
    miss); with ``max_zero_overlap``, only among candidates whose miss rate stays within it (the
    issue's second target), or, when none does, the one that misses fewest."""
    dice_mean = np.mean([x[:, 0] for x in inner], axis=0)
    if max_zero_overlap is None:
        return int(np.argmax(dice_mean))
    miss_rate = np.mean([x[:, 1] for x in inner], axis=0)
    allowed = miss_rate <= max_zero_overlap + 1e-12
    if not allowed.any():
        allowed = miss_rate == miss_rate.min()
    return int(np.flatnonzero(allowed)[np.argmax(dice_mean[allowed])])


def _without_n(summary: dict) -> dict:
    """summary.json's layout: the image count is given once, at the top."""
    return {k: v for k, v in summary.items() if k != "n"}


def main() -> None:
    ap = fold_runs_parser(__doc__)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fractions", type=lambda t: tuple(float(x) for x in t.split(",")), default=FRACTIONS,
                    help="region-removal fractions to try, e.g. 0 for thresholds only (what a model's config.json "
                         f"can carry); default {','.join(map(str, FRACTIONS))}")
    ap.add_argument("--thresholds", type=lambda t: tuple(round(float(x), 4) for x in t.split(",")), default=THRESHOLDS,
                    help="probability cuts to try (must include 0.5, the reference); default "
                         f"{','.join(map(str, THRESHOLDS))}")
    ap.add_argument("--max-zero-overlap", type=float, default=None,
                    help="choose only among rules whose complete-miss rate on the other folds is at most this "
                         "(e.g. 0.025, the issue's target); default: best Dice alone")
    args = ap.parse_args()

    folds = folds_of_every_run(args.runs)
    by_stem = samples_by_stem(args.data)
    candidates = list(itertools.product(args.thresholds, args.fractions))
    if (0.5, 0.0) not in candidates:
        sys.exit("--thresholds must include 0.5 and --fractions 0 (the plain rule is the reference)")
    scores: dict[str, np.ndarray] = {}  # stem -> (n_candidates, 3): dice, miss, predicted nerve area (px)
    truth_area: dict[str, int] = {}
    fold_of: dict[str, int] = {}
    for k in folds:
        per_run = [fold_probabilities(run / f"fold_{k}", by_stem) for run in args.runs]
        for stem in per_run[0]:
            prob = mean_probability([p[stem] for p in per_run])
            # the probabilities lie on the image's grid: its shape checks the mask without decoding the image again
            truth = nerve_truth(by_stem[stem], prob.shape)
            masks = [apply_rule(prob, t, f) for t, f in candidates]
            scores[stem] = np.array([(*dice(m, truth), np.count_nonzero(m)) for m in masks], dtype=float)
            truth_area[stem] = int(np.count_nonzero(truth))
            fold_of[stem] = k
        if len(args.runs) == 1:  # the plain rule must agree with `nerveseg evaluate`'s own figures
            reference = {stem: float(r["dice"]) for stem, r in load_per_image(args.runs[0] / f"fold_{k}" / "eval" / "per_image.csv").items()}
            plain_index = candidates.index((0.5, 0.0))
            worst = max(abs(scores[s][plain_index, 0] - reference[s]) for s in per_run[0])
            if worst > 0.01:
                sys.exit(f"fold {k}: plain-rule Dice differs from eval/per_image.csv by up to {worst:.4f}")

    stems = sorted(scores)
    plain = candidates.index((0.5, 0.0))
    chosen_dice, chosen_miss, chosen_area, per_fold = {}, {}, {}, {}
    for k in folds:
        inner = [s for s in stems if fold_of[s] != k]
        outer = [s for s in stems if fold_of[s] == k]
        best = choose([scores[s] for s in inner], args.max_zero_overlap) if inner else plain
        for s in outer:
            chosen_dice[s], chosen_miss[s], chosen_area[s] = scores[s][best]
        per_fold[k] = {"threshold": candidates[best][0], "min_region_fraction": candidates[best][1],
                       "n": len(outer), "plain_dice": float(np.mean([scores[s][plain, 0] for s in outer])),
                       "chosen_dice": float(np.mean([chosen_dice[s] for s in outer]))}
    a = np.array([scores[s][plain, 0] for s in stems])
    b = np.array([chosen_dice[s] for s in stems])
    grid = np.mean([scores[s][:, 0] for s in stems], axis=0)
    grid_misses = np.sum([scores[s][:, 1] for s in stems], axis=0)
    summary = {
        "runs": [r.name for r in args.runs], "folds": folds, "n": len(stems), "max_zero_overlap": args.max_zero_overlap,
        "plain": _without_n(dice_summary(a, sum(scores[s][plain, 1] for s in stems))),
        "nested": _without_n(dice_summary(b, sum(chosen_miss[s] for s in stems))),
        "nested_vs_plain": paired(b, a),
        # what a clinician reads off: the nerve area against the expert's, under each rule (px)
        "plain_area": area_agreement_px([{"area_pred_px": scores[s][plain, 2], "area_truth_px": truth_area[s]} for s in stems]),
        "nested_area": area_agreement_px([{"area_pred_px": chosen_area[s], "area_truth_px": truth_area[s]} for s in stems]),
        "per_fold": per_fold,
        # the rule to ship: the same choice made on every fold's images (its figure is optimistic; "nested" is not)
        "rule_on_all_folds": dict(zip(("threshold", "min_region_fraction"),
                                      candidates[choose([scores[s] for s in stems], args.max_zero_overlap)])),
        # for reading only, not for reporting: every candidate's pooled Dice over all folds
        "pooled_grid": {f"t={t:.2f},f={f:.1f}": float(v) for (t, f), v in zip(candidates, grid)},
        "pooled_grid_misses": {f"t={t:.2f},f={f:.1f}": int(v) for (t, f), v in zip(candidates, grid_misses)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "summary.json", summary)
    lines = ["| rule | n | nerve Dice (mean ± SD) | median | zero-overlap | median area error | area bias (px) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    chosen_label = "chosen on the other folds" + (
        f" (best Dice with at most {100 * args.max_zero_overlap:.1f}% misses)" if args.max_zero_overlap is not None else " (best Dice)")
    for name, label in (("plain", "threshold 0.5, keep all regions"), ("nested", chosen_label)):
        d, area = summary[name], summary[f"{name}_area"]
        lines.append(f"| {label} | {len(stems)} | {mean_sd(d)} | {d['dice_median']:.3f} | "
                     f"{d['zero_overlap']}/{len(stems)} | {area['median_ape_percent']:.1f}% | {area['bland_altman']['bias']:+.0f} |")
    t = summary["nested_vs_plain"]
    lines += ["", f"- chosen minus plain, paired per image: mean {t['mean_difference']:+.3f}, median "
              f"{t['median_difference']:+.3f}, Wilcoxon p = {t['p']:.2g} (n = {len(stems)})",
              "- rule chosen per held-out fold: " + ", ".join(
                  f"fold {k}: t = {v['threshold']:.2f}, f = {v['min_region_fraction']:.1f}" for k, v in per_fold.items())]
    lines.append(f"- the same choice on all {len(stems)} images (the rule to ship): t = "
                 f"{summary['rule_on_all_folds']['threshold']:.2f}, f = {summary['rule_on_all_folds']['min_region_fraction']:.1f}")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    top = sorted(summary["pooled_grid"].items(), key=lambda kv: -kv[1])[:5]
    print("best pooled candidates (reading only):", ", ".join(f"{k} {v:.3f}" for k, v in top))


if __name__ == "__main__":
    main()
