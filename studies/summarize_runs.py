"""Print a Markdown table of evaluated runs: one row per RUN/eval/metrics.json.

Usage: python studies/summarize_runs.py runs/core
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from nerveseg.config import RunConfig
from nerveseg.models import count_parameters, create


def fmt(metric: dict | None, digits: int = 3) -> str:
    if not metric or metric.get("mean") is None:
        return "n/a"
    return f"{metric['mean']:.{digits}f} ± {metric['sd']:.{digits}f}"


def main(root: str) -> None:
    root_path = Path(root)
    print("| run | arch | size | epochs | schedule | augment | params | best epoch | precision | recall | Dice | HD (px) | HD95 (px) | AUC (per image) | pooled AUC | zero overlap | n | train time |")
    print("| --- | --- | ---: | ---: | --- | --- | ---: | ---: | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for metrics_path in sorted(root_path.glob("*/eval/metrics.json")):
        run = metrics_path.parent.parent
        m = json.loads(metrics_path.read_text())
        cfg = RunConfig.load(run / "config.json")
        with open(run / "history.csv", newline="") as f:
            history = list(csv.DictReader(f))
        best = max(history, key=lambda r: float(r["val_dice"]))
        params = count_parameters(create(cfg.model.arch, **cfg.model.kwargs))
        # training time = sum of the epochs' wall times in history.csv (excludes data loading)
        minutes = f"{sum(float(r['seconds']) for r in history) / 60:.0f} min"
        print(
            f"| {run.name} | {cfg.model.arch} | {cfg.preprocess.size} | {cfg.train.epochs} | {cfg.train.schedule} | "
            f"{'+'.join(cfg.train.augment)} | {params:,} | {best['epoch']} | {fmt(m['precision'])} | {fmt(m['recall'])} | "
            f"{fmt(m['dice'])} | {fmt(m['hd'], 1)} | {fmt(m['hd95'], 1)} | {fmt(m['auc'])} | {m['pooled_auc']:.4f} | "
            f"{m['zero_overlap_rate']:.3f} | {m['n_images']} | {minutes} |"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="runs/core", help="a folder of runs (default runs/core)")
    main(ap.parse_args().root)
