"""``nerveseg benchmark``: the paper's comparison (Tables 2-3, Fig. 3) on any dataset.

Every architecture is trained and evaluated under the identical recipe and split, for S seeds x
K folds (repeated K-fold cross-validation: seed s fixes both the fold assignment and the
initial weights, so two architectures with the same seed and fold see the same images).
Each finished run leaves ``runs/<arch>/seed<s>_fold<f>/eval/``; a resumed benchmark skips those.
Several processes may share one output folder, each taking a disjoint ``shard`` of the runs (on a
GPU, one small network does not fill the device); a last ``collect_only`` call writes the summary
over whatever has finished.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import DataConfig, ModelConfig, PreprocessConfig, RunConfig, TrainConfig, check_open_fraction
from ..data.samples import discover_samples
from ..errors import ConfigError
from ..inference.predictor import Predictor
from ..io_utils import atomic_path, atomic_write_csv, atomic_write_json, atomic_write_text, csv_values
from ..models import count_gflops, count_parameters, create, list_models
from ..models.complexity import cpu_latency_ms
from ..training.trainer import train
from .evaluate import (
    PER_IMAGE_FIELDS,
    evaluate_samples,
    load_roc_histograms,
    save_roc_histograms,
    save_roc_plot,
    select_subset,
    write_per_image,
)
from .hard_cases import hard_case_stems
from .metrics import RocAccumulator
from .statistics import holm_adjust, mean_sd, paired_wilcoxon, run_level_summary

LOSS_NAMES = {"dice": "soft Dice", "dice_ce": "soft Dice + cross-entropy"}
RESULT_FIELDS = ("arch", "seed", "fold", "device", "region") + PER_IMAGE_FIELDS


@dataclass
class BenchmarkConfig:
    data_dir: str
    archs: tuple[str, ...] = ("sa_unet", "unet")
    label: int | str | None = None
    seeds: int = 3
    folds: int = 5
    # a subject-grouped fraction of each run's training folds that picks its checkpoint (None: the
    # last epoch is kept); the held-out fold is then only scored
    fold_val_fraction: float | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(checkpoint="last"))
    command: str = ""

    def __post_init__(self) -> None:
        self.archs = tuple(self.archs)
        unknown = [a for a in self.archs if a not in list_models()]
        if unknown:
            raise ConfigError(f"unknown architecture(s) {unknown}; choose from {', '.join(list_models())}")
        if len(set(self.archs)) != len(self.archs) or not self.archs:
            raise ConfigError("--archs must list each architecture once")
        if self.seeds < 1 or self.folds < 2:
            raise ConfigError("need --seeds >= 1 and --folds >= 2")
        if self.fold_val_fraction is not None:
            check_open_fraction(self.fold_val_fraction, "--fold-val-fraction")
        elif self.train.checkpoint != "last":
            # without an inner split a run's validation images are the fold it reports
            raise ConfigError("a checkpoint chosen on validation needs --fold-val-fraction: otherwise the held-out fold "
                              "the benchmark reports would pick it; keep the last epoch (train.checkpoint='last')")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"]["augment"] = list(self.train.augment)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BenchmarkConfig":
        d = dict(d)
        d["preprocess"] = PreprocessConfig(**d["preprocess"])
        d["train"] = TrainConfig(**d["train"])
        return cls(**d)


def run_dir_for(out: Path, arch: str, seed: int, fold: int) -> Path:
    return out / "runs" / arch / f"seed{seed}_fold{fold}"


def _run_one(cfg: BenchmarkConfig, out: Path, arch: str, seed: int, fold: int, samples_by_stem: dict,
             is_main: bool = True) -> None:
    run_dir = run_dir_for(out, arch, seed, fold)
    run_config = RunConfig(
        model=ModelConfig(arch),
        preprocess=replace(cfg.preprocess),
        data=DataConfig(cfg.data_dir, label=cfg.label, seed=seed, folds=cfg.folds, fold=fold,
                        fold_val_fraction=cfg.fold_val_fraction),
        train=replace(cfg.train),
    )
    t0 = time.perf_counter()
    if not (run_dir / "model.safetensors").exists() or not _finished_training(run_dir, cfg.train.epochs):
        # under torchrun every rank trains (DDP); rank 0 alone evaluates and writes below
        train(run_config, run_dir, resume=(run_dir / "config.json").exists(), progress=False, log=lambda m: None)
    train_seconds = time.perf_counter() - t0
    if not is_main:
        return
    predictor = Predictor.from_run(run_dir)
    held_out = select_subset(list(samples_by_stem.values()), predictor, "val" if cfg.fold_val_fraction is None else "test")
    # the held-out masks are kept (a few KB each) so that Fig. 4 can be drawn once the weights are gone
    rows_by_class, rocs, _ = evaluate_samples(predictor, held_out, run_dir / "eval", label=cfg.label, overlays=False, progress=False,
                                              mask_dir=run_dir / "eval" / "masks")
    rows, roc = rows_by_class[predictor.class_names[0]], rocs[predictor.class_names[0]]
    save_roc_histograms(roc, run_dir / "eval" / "roc.npz")
    atomic_write_json(run_dir / "eval" / "timing.json", {"train_seconds": train_seconds, "device": _device_name(cfg)})
    write_per_image(run_dir / "eval" / "per_image.csv", rows)  # written last: marks the run finished


def _device_name(cfg: BenchmarkConfig) -> str:
    from ..training.trainer import resolve_device

    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_timings(cfg: BenchmarkConfig, out: Path) -> list[dict]:
    """The ``eval/timing.json`` of every finished run: training seconds and device."""
    paths = (run_dir_for(out, arch, seed, fold) / "eval" / "timing.json"
             for seed in range(cfg.seeds) for fold in range(cfg.folds) for arch in cfg.archs)
    return [json.loads(path.read_text()) for path in paths if path.exists()]


def training_devices(cfg: BenchmarkConfig, out: Path) -> list[str]:
    """Where the finished runs trained (a benchmark may be resumed on another machine)."""
    return sorted({t.get("device", "not recorded") for t in run_timings(cfg, out)})


def _finished_training(run_dir: Path, epochs: int) -> bool:
    history = run_dir / "history.csv"
    if not history.exists():
        return False
    with history.open(newline="") as f:
        return len(list(csv.DictReader(f))) >= epochs


def run_convergence(cfg: BenchmarkConfig, out: Path, runs) -> list[dict]:
    """Each finished (seed, fold, arch) run's validation curve from its history.csv: the epoch it
    kept (the last, or under ``fold_val_fraction`` the first best), its best epoch, and whether
    that best came in the last tenth of training (a curve still rising: train longer)."""
    result = []
    for seed, fold, arch in runs:
        path = run_dir_for(out, arch, seed, fold) / "history.csv"
        if not path.exists():
            continue
        with path.open(newline="") as f:
            curve = [float(r["val_dice"]) for r in csv.DictReader(f) if r.get("val_dice") not in (None, "")]
        finite = [v for v in curve if math.isfinite(v)]
        if not finite:
            continue
        best = curve.index(max(finite)) + 1
        kept = best if cfg.fold_val_fraction is not None else len(curve)
        result.append({"arch": arch, "seed": seed, "fold": fold, "epochs": len(curve), "best_epoch": best,
                       "kept_epoch": kept, "val_dice_kept": curve[kept - 1], "val_dice_best": curve[best - 1],
                       "late_best": best > len(curve) - max(1, len(curve) // 10), "curve": curve})
    return result


def save_convergence_plot(cfg: BenchmarkConfig, convergence: list[dict], path: Path) -> None:
    """One panel per architecture: every run's validation Dice by epoch, its kept epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = [a for a in cfg.archs if any(c["arch"] == a for c in convergence)]
    fig, axes = plt.subplots(1, len(archs), figsize=(3.6 * len(archs), 3.2), dpi=110, squeeze=False, sharey=True)
    for ax, arch in zip(axes[0], archs):
        for c in (c for c in convergence if c["arch"] == arch):
            epochs = range(1, len(c["curve"]) + 1)
            line, = ax.plot(epochs, c["curve"], lw=0.9, alpha=0.8, label=f"seed {c['seed']} fold {c['fold']}")
            ax.plot([c["kept_epoch"]], [c["val_dice_kept"]], "o", ms=4, color=line.get_color())
        ax.set_title(arch, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation Dice" + (" (inner split)" if cfg.fold_val_fraction is not None
                                               else " (held-out fold, logged only)"))
    axes[0][0].set_ylim(0, 1)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.suptitle("Convergence: each run's validation Dice, the kept epoch marked", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def collect_results(cfg: BenchmarkConfig, out: Path, samples_by_stem: dict) -> list[dict]:
    rows = []
    for seed in range(cfg.seeds):
        for fold in range(cfg.folds):
            for arch in cfg.archs:
                path = run_dir_for(out, arch, seed, fold) / "eval" / "per_image.csv"
                if not path.exists():
                    continue
                with path.open(newline="") as f:
                    for raw in csv.DictReader(f):
                        row = csv_values(raw)  # a stem written escaped ('=x) is the sample =x
                        sample = samples_by_stem.get(row["stem"])
                        rows.append({
                            "arch": arch, "seed": seed, "fold": fold,
                            "device": sample.device if sample else "", "region": sample.region if sample else "",
                            **row,
                        })
    return rows


def write_results(path: Path, rows: list[dict]) -> None:
    atomic_write_csv(path, rows, RESULT_FIELDS)


def common_runs(rows: list[dict], archs) -> tuple[list[dict], int]:
    """Keep the rows of the (seed, fold) pairs that every architecture finished.

    A comparison is fair only on identical splits: in a partial benchmark the faster architectures
    have finished more runs. Returns (kept rows, number of runs left out).
    """
    done = {a: {(r["seed"], r["fold"]) for r in rows if r["arch"] == a} for a in archs}
    if not done:
        return rows, 0
    shared = set.intersection(*done.values())
    left_out = sum(len(pairs - shared) for pairs in done.values())
    return [r for r in rows if (r["seed"], r["fold"]) in shared], left_out


def _pm(mean: float, sd: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def efficiency(archs, cache_path: Path, latency: bool = True) -> dict[str, dict]:
    """Parameters, GFLOPs and CPU ms at 512x512 per architecture (cached: measuring takes a while)."""
    cached = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for arch in archs:
        if arch in cached and (cached[arch].get("cpu_ms") is not None or not latency):
            continue
        model = create(arch)
        cached[arch] = {
            "params": count_parameters(model),
            "gflops_512": count_gflops(model, 512, 512),
            "cpu_ms": cpu_latency_ms(model, 512, 512, repeats=5, warmup=1) if latency else None,
        }
    atomic_write_json(cache_path, cached)
    return cached


def total_train_seconds(cfg: BenchmarkConfig, out: Path) -> float:
    """Sum of the training times the runs recorded (each run's own, whichever call trained it)."""
    return sum(t["train_seconds"] for t in run_timings(cfg, out))


def render_summary(cfg: BenchmarkConfig, rows: list[dict], eff: dict, wall_seconds: float, n_runs: int,
                   train_seconds: float = 0.0, n_planned: int | None = None, devices: list[str] | None = None,
                   convergence: list[dict] | None = None, pooled_auc: dict[str, float] | None = None) -> str:
    """summary.md. ``pooled_auc``: each architecture's ROC AUC over every held-out pixel of every
    finished run (the paper's Fig. 3 "averaged over pixels"; roc.png draws the same curves)."""
    archs = [a for a in cfg.archs if any(r["arch"] == a for r in rows)]
    rows, left_out = common_runs(rows, archs)
    runs = {(r["arch"], r["seed"], r["fold"]) for r in rows}
    single_run = all(sum(1 for (a, _, _) in runs if a == arch) == 1 for arch in archs)
    sd_note = ("SD over images (one run per architecture)" if single_run
               else "mean of the per-run means, SD over runs (seed x fold), as in the paper's repeated runs")
    lines = [
        "# Benchmark summary",
        "",
        f"- command: `{cfg.command}`" if cfg.command else "- command: (library call)",
        f"- data: `{cfg.data_dir}` (label {cfg.label}), {cfg.folds}-fold cross-validation x {cfg.seeds} seed(s); "
        f"{n_runs} run(s) finished" + (f" of {n_planned} planned" if n_planned not in (None, n_runs) else ""),
        f"- recipe: size {cfg.preprocess.size}, {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, Adam lr {cfg.train.lr}, "
        f"schedule {cfg.train.schedule}, augment {'+'.join(cfg.train.augment) or 'none'}, loss {LOSS_NAMES.get(cfg.train.loss, cfg.train.loss)}; "
        + ("the last epoch kept" if cfg.fold_val_fraction is None else
           f"the best epoch on a subject-grouped {cfg.fold_val_fraction:.0%} of each run's training folds kept"),
        f"- trained on: {'; '.join(devices) if devices else 'not recorded'}",
        f"- summarized on: {platform.platform()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU"),
        f"- date: {_dt.date.today().isoformat()}; training time summed over runs: {train_seconds / 60:.1f} min; "
        f"wall time of this invocation: {wall_seconds / 60:.1f} min",
        f"- metrics at the original resolution on each run's held-out fold; {sd_note}",
    ]
    if left_out:
        lines.append(
            f"- **partial benchmark**: the tables use only the {len({(r['seed'], r['fold']) for r in rows})} (seed, fold) "
            f"pair(s) that every architecture finished; {left_out} run(s) finished by only some architectures are "
            "left out here (they stay in results.csv)"
        )
    lines += [
        "",
        "## Segmentation (the paper's Table 3)",
        "",
        "| architecture | precision | recall | DSC | HD (px) | DSC over images: mean ± SD (median) | misses |",
        "| --- | --- | --- | --- | --- | --- | ---: |",
    ]
    for arch in archs:
        arch_rows = [r for r in rows if r["arch"] == arch]
        cells = [_pm(*run_level_summary(arch_rows, m)[:2], digits=1 if m == "hd" else 3) for m in ("precision", "recall", "dice", "hd")]
        dice = [float(r["dice"]) for r in arch_rows if r["dice"] not in ("", "nan") and math.isfinite(float(r["dice"]))]
        mean, sd, n = mean_sd(dice)
        cells.append(f"{_pm(mean, sd)} ({float(np.median(dice)):.3f})" if n else "n/a")
        cells.append(str(sum(1 for r in arch_rows if r["area_truth_px"] not in ("", "0") and float(r["zero_overlap"]) == 1)))
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## All metrics and efficiency (the paper's Table 2)",
        "",
        "| architecture | HD95 (px) | AUC (mean per image) | AUC (pooled over pixels) | zero-overlap rate | images | params | "
        "GFLOPs @512 | CPU ms @512 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arch in archs:
        arch_rows = [r for r in rows if r["arch"] == arch]
        zero = [float(r["zero_overlap"]) for r in arch_rows if r["area_truth_px"] not in ("", "0")]
        e = eff.get(arch, {})
        ms = f"{e['cpu_ms']:.0f}" if e.get("cpu_ms") is not None else "n/a"
        lines.append(
            f"| {arch} | {_pm(*run_level_summary(arch_rows, 'hd95')[:2], digits=1)} | {_pm(*run_level_summary(arch_rows, 'auc')[:2])} | "
            f"{(pooled_auc or {}).get(arch, math.nan):.4f} | {(sum(zero) / len(zero) if zero else math.nan):.4f} | {len(arch_rows)} | {e.get('params', 0):,} | "
            f"{e.get('gflops_512', math.nan):.2f} | {ms} |"
        )
    if "sa_unet" in archs and len(archs) > 1:
        lines += [
            "",
            "## SA-UNet against each baseline: paired Wilcoxon signed-rank test on per-image DSC",
            "",
            "Pairs: the same image in the same seed and fold. Positive median difference = SA-UNet better.",
            "Holm: the p-values adjusted for the number of baselines compared (Holm 1979), so that",
            "the chance of any false 'SA-UNet differs' over the whole table stays at the level read.",
            "",
            "| baseline | pairs | median DSC difference (SA-UNet - baseline) | p-value (two-sided) | p (Holm) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        baselines = [arch for arch in archs if arch != "sa_unet"]
        tests = [paired_wilcoxon(rows, "sa_unet", arch) for arch in baselines]
        for arch, w, holm in zip(baselines, tests, holm_adjust([w["p_value"] for w in tests])):
            p = "n/a" if math.isnan(w["p_value"]) else f"{w['p_value']:.3g}"
            ph = "n/a" if math.isnan(holm) else f"{holm:.3g}"
            lines.append(f"| {arch} | {w['n']} | {w['median_difference']:+.4f} | {p} | {ph} |")
    if convergence:
        where = ("a subject-grouped part of the training folds, which picked the kept epoch" if cfg.fold_val_fraction
                 is not None else "the held-out fold, logged only: the last epoch is kept whatever it shows")
        lines += [
            "",
            "## Convergence (each run's history.csv; convergence.png)",
            "",
            f"Validation Dice per epoch on {where}. A best epoch in the last tenth of training means the curve",
            "was still rising when training stopped.",
            "",
            "| architecture | runs | epochs | kept epoch (median, range) | validation Dice at the kept epoch | "
            "runs whose best epoch is in the last tenth |",
            "| --- | ---: | ---: | --- | --- | ---: |",
        ]
        for arch in archs:
            runs_of = [c for c in convergence if c["arch"] == arch]
            if not runs_of:
                continue
            kept = sorted(c["kept_epoch"] for c in runs_of)
            m, sd, _ = mean_sd(c["val_dice_kept"] for c in runs_of)
            lines.append(f"| {arch} | {len(runs_of)} | {max(c['epochs'] for c in runs_of)} | "
                         f"{kept[len(kept) // 2]} ({kept[0]}-{kept[-1]}) | {_pm(m, sd)} | "
                         f"{sum(c['late_best'] for c in runs_of)} |")
    for key in ("device", "region"):
        groups = sorted({r[key] for r in rows if r[key]})
        if not groups:
            continue
        lines += ["", f"## DSC by {key}", "", "| architecture | " + " | ".join(groups) + " |",
                  "| --- |" + " --- |" * len(groups)]
        for arch in archs:
            cells = []
            for g in groups:
                m, sd, n = mean_sd(r["dice"] for r in rows if r["arch"] == arch and r[key] == g)
                cells.append(f"{_pm(m, sd)} (n={n})")
            lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N: this process takes every N-th run starting at the I-th."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def run_benchmark(cfg: BenchmarkConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
                  measure_latency: bool = True, log=None, shard: tuple[int, int] = (0, 1),
                  collect_only: bool = False, overlays: bool = True) -> dict:
    """Train and evaluate every (seed, fold, arch); write results.csv, summary.md, roc.png and
    (``overlays``) overlay_panel.png.

    ``shard=(i, n)`` trains only the runs whose index in the job list is i mod n (jobs are ordered
    seed, fold, arch), so n processes can share ``out_dir``. ``collect_only`` trains nothing and
    summarizes the runs that have finished.
    """
    from ..training.distributed import init_distributed
    from ..training.trainer import resolve_device

    # under torchrun the ranks train each run together; shard splits runs between torchrun groups
    ctx = init_distributed(resolve_device(cfg.train.device))
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not ctx.is_main:
        log, progress = (lambda msg: None), False
    out = Path(out_dir)
    saved_path = out / "benchmark.json"
    if saved_path.exists():
        if not resume:
            raise ConfigError(f"{out} already holds a benchmark; pass --resume to continue it or choose another --out")
        saved = BenchmarkConfig.from_dict(json.loads(saved_path.read_text()))
        # threads, device and compilation change the speed, not the recipe: workers may differ in them
        def recipe(c: BenchmarkConfig):
            return (c.data_dir, c.label, c.folds, c.fold_val_fraction, c.preprocess,
                    replace(c.train, num_threads=None, device="auto", compile=None))

        if recipe(saved) != recipe(cfg):
            raise ConfigError(f"{out}: the recipe differs from the saved benchmark.json; use another --out")
    ctx.barrier()  # every rank checked before rank 0 writes
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(saved_path, cfg.to_dict())

    samples, problems = discover_samples(cfg.data_dir)
    for problem in problems:
        log(f"warning: skipped {problem}")
    samples_by_stem = {s.stem: s for s in samples}
    jobs = [(s, f, a) for s in range(cfg.seeds) for f in range(cfg.folds) for a in cfg.archs]
    mine = [] if collect_only else jobs[shard[0]::shard[1]]
    todo = [j for j in mine if not _finished(out, *j)]
    if len(todo) < len(mine):
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} runs already finished")
    t0 = time.perf_counter()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress, unit="run", dynamic_ncols=True)
    for seed, fold, arch in todo:
        bar.set_description(f"{arch} seed {seed} fold {fold}")
        _run_one(cfg, out, arch, seed, fold, samples_by_stem, is_main=ctx.is_main)
        if ctx.is_main:
            write_results(out / "results.csv", collect_results(cfg, out, samples_by_stem))
        ctx.barrier()
        bar.update(1)
    bar.close()
    if not ctx.is_main:
        return {"rows": 0, "runs": 0, "planned": len(jobs), "summary": ""}

    rows = collect_results(cfg, out, samples_by_stem)
    write_results(out / "results.csv", rows)
    finished = [j for j in jobs if _finished(out, *j)]
    if len(finished) < len(jobs):
        log(f"summary over {len(finished)} of {len(jobs)} runs: the others have not finished")
    eff = efficiency(cfg.archs, out / "efficiency.json", latency=measure_latency)
    convergence = run_convergence(cfg, out, finished)
    curves: dict[str, RocAccumulator] = {}
    for seed, fold, arch in finished:
        roc = load_roc_histograms(run_dir_for(out, arch, seed, fold) / "eval" / "roc.npz")
        if arch in curves:
            curves[arch].pos_hist += roc.pos_hist
            curves[arch].neg_hist += roc.neg_hist
        else:
            curves[arch] = roc
    summary = render_summary(cfg, rows, eff, time.perf_counter() - t0, len(finished), total_train_seconds(cfg, out),
                             n_planned=len(jobs), devices=training_devices(cfg, out), convergence=convergence,
                             pooled_auc={arch: roc.auc() for arch, roc in curves.items()})
    atomic_write_text(out / "summary.md", summary)
    if curves:
        save_roc_plot(curves, out / "roc.png")
    if convergence:
        save_convergence_plot(cfg, convergence, out / "convergence.png")
    if finished and overlays:  # Fig. 4: the hardest, a bifid, a low-contrast and typical images, every network
        kinds = hard_case_stems(samples, label=cfg.label)
        overlay_panel(cfg, out, pick_panel_stems(rows, kinds=kinds))
    return {"rows": len(rows), "runs": len(finished), "planned": len(jobs), "summary": summary}


def pick_panel_stems(rows: list[dict], n_hard: int = 3, n_typical: int = 2,
                     kinds: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """Images for the overlay panel, each with why it is there: the ``n_hard`` with the lowest Dice
    averaged over every architecture and run ("hardest"), then for each of ``kinds`` (a name and its
    candidate stems, e.g. :func:`~nerveseg.evaluation.hard_cases.hard_case_stems`) the candidate with
    the lowest mean Dice not already shown, then the ``n_typical`` closest to the median of the means
    ("typical"). An image is shown once; a kind without a scored candidate is left out."""
    by_stem: dict[str, list[float]] = {}
    for r in rows:
        v = r.get("dice")
        if v not in (None, "", "nan") and math.isfinite(float(v)):
            by_stem.setdefault(r["stem"], []).append(float(v))
    if not by_stem:
        return []
    mean = {stem: sum(v) / len(v) for stem, v in by_stem.items()}
    ranked = sorted(mean, key=lambda stem: (mean[stem], stem))
    picked = [(stem, "hardest") for stem in ranked[:n_hard]]
    for kind, candidates in (kinds or {}).items():
        shown = {stem for stem, _ in picked}
        left = [stem for stem in candidates if stem in mean and stem not in shown]
        if left:
            picked.append((min(left, key=lambda stem: (mean[stem], stem)), kind))
    shown = {stem for stem, _ in picked}
    median = mean[ranked[len(ranked) // 2]]
    rest = sorted((stem for stem in ranked if stem not in shown), key=lambda stem: (abs(mean[stem] - median), stem))
    return picked + [(stem, "typical") for stem in rest[:n_typical]]


def overlay_panel(cfg: BenchmarkConfig, out: Path, stems: list[str] | list[tuple[str, str]], seed: int = 0,
                  path: Path | None = None, tile: int = 256) -> Path | None:
    """The paper's Fig. 4: one row per image (a stem, or a stem and why it is shown, written beside
    the stem), the image then each architecture's prediction (red)
    over the expert's outline (green), each by the seed-``seed`` model of the fold that held the
    image out: its saved held-out mask (``eval/masks``) where there is one, else the run's model (so a
    benchmark whose weights were not kept, e.g. resumed from archived results, still draws its panel).
    Architectures whose run has not finished are left out; None when nothing is left."""
    from PIL import Image, ImageDraw

    from ..data.io import read_mask
    from ..data.media import read_frame
    from ..data.samples import fold_assignment
    from ..inference.overlay import make_overlay

    samples, _ = discover_samples(cfg.data_dir)
    by_stem = {s.stem: s for s in samples}
    folds = fold_assignment(samples, cfg.folds, seed)
    reasons = dict(item if isinstance(item, tuple) else (item, "") for item in stems)
    stems = [s for s in reasons if s in by_stem and s in folds]
    archs = [a for a in cfg.archs if all(_finished(out, seed, folds[s], a) for s in stems)]
    if not archs or not stems:
        return None
    predictors: dict[tuple[str, int], Predictor] = {}
    rows = []
    for stem in stems:
        sample = by_stem[stem]
        image, _, _ = read_frame(sample.image_path, sample.frame)
        truth = read_mask(sample.mask_path, label=cfg.label, image_shape=image.shape)
        cells = [make_overlay(image, None, truth)]
        for arch in archs:
            run_dir = run_dir_for(out, arch, seed, folds[stem])
            saved = run_dir / "eval" / "masks" / f"{stem}.png"
            if saved.is_file():
                predicted = read_mask(saved, image_shape=image.shape)
            else:
                key = (arch, folds[stem])
                if key not in predictors:
                    predictors[key] = Predictor.from_run(run_dir, device="cpu")
                predicted = predictors[key].predict(image) >= 0.5
            cells.append(make_overlay(image, predicted, truth))
        rows.append(cells)
    h = tile
    widths = [round(c.shape[1] * h / c.shape[0]) for c in rows[0]]
    label_h = 18
    panel = Image.new("RGB", (sum(widths), label_h + h * len(rows)), "white")
    draw = ImageDraw.Draw(panel)
    x = 0
    for title, w in zip(["image + expert (green)", *archs], widths):
        draw.text((x + 4, 3), title, fill="black")
        x += w
    for i, cells in enumerate(rows):
        x = 0
        for cell in cells:
            w = round(cell.shape[1] * h / cell.shape[0])
            panel.paste(Image.fromarray(cell).resize((w, h), Image.BILINEAR), (x, label_h + i * h))
            x += w
        caption = f"{stems[i]} ({reasons[stems[i]]})" if reasons[stems[i]] else stems[i]
        # on a black box: the top of an ultrasound frame is often bright, where yellow alone cannot be read
        draw.rectangle(draw.textbbox((4, label_h + i * h + 3), caption), fill="black")
        draw.text((4, label_h + i * h + 3), caption, fill="yellow")
    path = path or out / "overlay_panel.png"
    from ..io_utils import atomic_path

    with atomic_path(path) as tmp:
        panel.save(tmp, format="PNG")
    return path


def _finished(out: Path, seed: int, fold: int, arch: str) -> bool:
    return (run_dir_for(out, arch, seed, fold) / "eval" / "per_image.csv").exists()
