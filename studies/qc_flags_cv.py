"""Do the measurement QC flags catch the segmentations that are wrong? Checked on cross-validation.

    python studies/qc_flags_cv.py RUN [RUN ...] --data DATA [--data DATA ...] [--threshold 0.4] [--fail-below 0.3] \
        [--low-confidence 0.7] [--routes --member-cut CUT [--member-cut CUT ...]] [--out OUT.json]

RUNs hold ``fold_k/`` runs trained on the same splits; each held-out image's nerve probability is
the mean of the RUNs' fold-k models (cached ``fold_k/val_probs.npz``, as postprocess_cv.py writes),
cut at ``--threshold``, and measured by ``nerveseg.inference.measure.measure_mask`` exactly as
``nerveseg segment`` measures it (``low_confidence`` cut 0.7 unless ``--low-confidence``). An image *fails* when its
nerve Dice against the expert mask is below ``--fail-below``. For each QC flag, and for any flag at
all, the table gives how many images it flags, the share of failures it catches (sensitivity) and
the share of flagged images that failed (PPV). Then, as scores of how likely an image is to have
failed: the ranking quality (AUROC, Mann-Whitney U from scipy) of 1 - confidence and, with two or
more RUNs, of the members' disagreement (1 - Dice between the members' masks at the same cut).

A routed model (``nerveseg ensemble --route-by``) is scored with ``--routes``: each RUN is then one
route's fold runs (one anatomy, scored on its own held-out images, pooled, not averaged), and each
RUN's probabilities are first moved from its ``--member-cut`` onto ``--threshold`` by
``rescale_to_cut``, exactly as ``RoutedPredictor`` does, so that ``confidence`` is the one the shipped
model reports. (Routing itself is taken as right: the router's own patient-grouped CV is
studies/anatomy_router.py's.)

Why: the clinic trusts a measurement by its flags; a flag that misses most wrong outlines, or
flags most right ones, is a defect whether or not the segmentation is accurate on average.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dice, fold_probabilities, fold_runs_parser, folds_of_every_run, mean_probability, nerve_truth, samples_by_stem  # noqa: E402

from nerveseg.inference.measure import QC_FLAGS, measure_mask  # noqa: E402
from nerveseg.inference.predictor import rescale_to_cut  # noqa: E402
from nerveseg.io_utils import atomic_write_json  # noqa: E402


def auroc(score: np.ndarray, failed: np.ndarray) -> float | None:
    """P(score of a failed image > score of a good one), ties counted half; None without both kinds."""
    if failed.all() or not failed.any():
        return None
    u = mannwhitneyu(score[failed], score[~failed], alternative="two-sided").statistic
    return float(u / (failed.sum() * (~failed).sum()))


def flag_table(flags: list[set[str]], failed: np.ndarray) -> list[dict]:
    rows = []
    for name in (*QC_FLAGS, "any flag"):
        hit = np.array([bool(f) if name == "any flag" else name in f for f in flags])
        rows.append({"flag": name, "flagged": int(hit.sum()), "failures_caught": int((hit & failed).sum()),
                     "failures": int(failed.sum()), "sensitivity": float((hit & failed).sum() / max(failed.sum(), 1)),
                     "ppv": float((hit & failed).sum() / hit.sum()) if hit.any() else None})
    return rows


def main() -> None:
    ap = fold_runs_parser(__doc__)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--fail-below", type=float, default=0.3, help="an image fails when its nerve Dice is below this")
    ap.add_argument("--low-confidence", type=float, default=0.7,
                    help="the cut under which measure_mask flags low_confidence (segment's default, 0.7)")
    ap.add_argument("--routes", action="store_true",
                    help="each RUN is one route of a routed model (pooled, not averaged); needs --member-cut per RUN")
    ap.add_argument("--member-cut", type=float, action="append", default=[],
                    help="with --routes, each RUN's own cut (in RUN order), moved onto --threshold")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.routes and len(args.member_cut) != len(args.runs):
        ap.error(f"--routes needs one --member-cut per RUN ({len(args.runs)}), got {len(args.member_cut)}")
    if args.member_cut and not args.routes:
        ap.error("--member-cut is for --routes")
    if any(not 0 < c < 1 for c in args.member_cut):
        ap.error(f"--member-cut must be in (0, 1), not {args.member_cut}")

    folds = folds_of_every_run(args.runs)
    by_stem = samples_by_stem(args.data)

    dices, flags, confidence, disagreement = [], [], [], []
    for k in folds:
        per_run = [fold_probabilities(run / f"fold_{k}", by_stem) for run in args.runs]
        if args.routes:  # one "ensemble" of one member per image: its route's, rescaled to the model's cut
            per_run = [{stem: rescale_to_cut(p.astype(np.float32), cut, args.threshold) for stem, p in route.items()}
                       for route, cut in zip(per_run, args.member_cut)]
            per_run = [{stem: p for route in per_run for stem, p in route.items()}]
        for stem in sorted(per_run[0]):
            members = [p[stem].astype(np.float32) for p in per_run]
            prob = mean_probability(members)
            mask = prob >= args.threshold
            truth = nerve_truth(by_stem[stem], prob.shape)
            dices.append(dice(mask, truth)[0])
            m = measure_mask(mask, prob, low_confidence=args.low_confidence)
            flags.append(set(filter(None, m["qc_flags"].split(";"))))
            confidence.append(m["confidence"] if m["confidence"] is not None else 0.0)
            if len(members) > 1:
                cuts = [p >= args.threshold for p in members]
                disagreement.append(1 - np.mean([dice(a, b)[0] for a, b in itertools.combinations(cuts, 2)]))
    d = np.array(dices)
    failed = d < args.fail_below
    table = flag_table(flags, failed)
    scores = {"1 - confidence": auroc(1 - np.array(confidence), failed)}
    if disagreement:
        scores["members' disagreement"] = auroc(np.array(disagreement), failed)
    print(f"{len(d)} held-out images (folds {','.join(map(str, folds))}), threshold {args.threshold}, "
          f"low_confidence under {args.low_confidence}; "
          f"{failed.sum()} fail (nerve Dice < {args.fail_below})\n")
    print("| flag | images flagged | failures caught | sensitivity | PPV |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in table:
        ppv = "--" if r["ppv"] is None else f"{r['ppv']:.2f}"
        print(f"| {r['flag']} | {r['flagged']} | {r['failures_caught']}/{r['failures']} | {r['sensitivity']:.2f} | {ppv} |")
    print()
    for name, value in scores.items():
        print(f"- AUROC of {name} for failure: {'--' if value is None else f'{value:.3f}'}")
    if args.out:
        atomic_write_json(args.out, {"runs": [r.name for r in args.runs], "routes": args.routes,
                                     "member_cuts": args.member_cut, "folds": folds, "threshold": args.threshold,
                                     "fail_below": args.fail_below, "low_confidence": args.low_confidence, "n": len(d), "failures": int(failed.sum()),
                                     "flags": table, "auroc": scores})


if __name__ == "__main__":
    main()
