"""A validation split inside the training folds (``fold_val_fraction``): the held-out fold is only
scored, the checkpoint is chosen on subjects of the training folds, and no subject is in two parts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import write_ellipse_dataset
from nerveseg.cli import main
from nerveseg.config import DataConfig, RunConfig, TrainConfig
from nerveseg.data.samples import discover_samples
from nerveseg.errors import ConfigError
from nerveseg.evaluation.benchmark import BenchmarkConfig
from nerveseg.evaluation.evaluate import select_subset
from nerveseg.training.trainer import ensemble_config, prepare_split

WRIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mn-wrist"
PILOT = Path(__file__).resolve().parents[1] / "docs" / "results" / "paper_wrist" / "pilot" / "sa_unet" / "config.json"


def _subject_dataset(root: Path, n: int = 30) -> Path:
    """Ellipse images, two or three per subject (P0 has 3, ...), as in mn-wrist's manifest."""
    data = write_ellipse_dataset(root, n)
    subjects = [f"P{i // 3}" if i < 12 else f"P{4 + (i - 12) // 2}" for i in range(n)]
    (data / "manifest.csv").write_text("file,subject\n" + "".join(f"{i:03d}.png,{s}\n" for i, s in enumerate(subjects)))
    return data


def _split(data: Path, fold: int, fraction: float | None, folds: int = 5) -> RunConfig:
    config = RunConfig(data=DataConfig(str(data), label=1, folds=folds, fold=fold, fold_val_fraction=fraction))
    prepare_split(config, log=lambda m: None)
    return config


def test_fold_val_fraction_needs_folds_and_a_fraction():
    with pytest.raises(ConfigError, match="needs folds"):
        DataConfig("x", fold_val_fraction=0.2)
    for bad in (0.0, 1.0, -0.1, True):
        with pytest.raises(ConfigError, match="between 0 and 1"):
            DataConfig("x", folds=5, fold=0, fold_val_fraction=bad)


@pytest.mark.parametrize("fold", range(5))
def test_the_held_out_fold_is_unchanged_and_no_subject_is_in_two_parts(tmp_path, fold):
    data = _subject_dataset(tmp_path / "d")
    plain = _split(data, fold, None)
    inner = _split(data, fold, 0.2)
    # the reported fold is the same images with or without the inner split
    assert sorted(inner.test_stems) == sorted(plain.val_stems) and plain.test_stems == []
    # the training folds are shared between training and the inner validation
    assert sorted(inner.train_stems + inner.val_stems) == sorted(plain.train_stems)
    subject = {s.stem: s.subject for s in discover_samples(str(data))[0]}
    parts = [{subject[s] for s in stems} for stems in (inner.train_stems, inner.val_stems, inner.test_stems)]
    assert parts[0].isdisjoint(parts[1]) and parts[0].isdisjoint(parts[2]) and parts[1].isdisjoint(parts[2])
    # about a fifth of the 24 training-fold images, in whole subjects (2 or 3 images each)
    assert 3 <= len(inner.val_stems) <= 7


def test_test_stems_survive_config_json_and_pick_the_test_subset(tmp_path):
    data = _subject_dataset(tmp_path / "d")
    config = _split(data, 1, 0.25)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    loaded = RunConfig.load(path)
    assert loaded.test_stems == config.test_stems and loaded.data.fold_val_fraction == 0.25

    class Run:  # select_subset reads only the predictor's config (and members)
        def __init__(self, cfg, members=()):
            self.config, self.members = cfg, list(members)

    samples = discover_samples(str(data))[0]
    assert [s.stem for s in select_subset(samples, Run(loaded), "test")] == sorted(config.test_stems)
    assert [s.stem for s in select_subset(samples, Run(loaded), "val")] == sorted(config.val_stems)
    unseen = {s.stem for s in select_subset(samples, Run(loaded), "unseen")}
    assert unseen == set(config.val_stems) | set(config.test_stems)
    with pytest.raises(ConfigError, match="--subset test needs"):
        select_subset(samples, Run(_split(data, 1, None)), "test")
    # an ensemble of such runs scores each member's held-out fold under --subset cv, not its inner split
    members = [_split(data, k, 0.25) for k in range(5)]
    ensemble = Run(ensemble_config(members, [f"fold_{k}" for k in range(5)]), [Run(m) for m in members])
    assert ensemble.config.data.fold_val_fraction is None and ensemble.config.test_stems == []
    assert sorted(s.stem for s in select_subset(samples, ensemble, "cv")) == sorted(s.stem for s in samples)


def test_a_benchmark_never_chooses_a_checkpoint_on_the_fold_it_reports():
    with pytest.raises(ConfigError, match="needs --fold-val-fraction"):
        BenchmarkConfig(".", archs=("sa_unet",), train=TrainConfig(checkpoint="best"))
    with pytest.raises(ConfigError, match="between 0 and 1"):
        BenchmarkConfig(".", archs=("sa_unet",), fold_val_fraction=1.5, train=TrainConfig(checkpoint="best"))
    assert BenchmarkConfig(".", archs=("sa_unet",)).train.checkpoint == "last"


def test_benchmark_with_an_inner_split_scores_each_held_out_image_once(tmp_path, capsys):
    data = _subject_dataset(tmp_path / "d", n=16)
    out = tmp_path / "bench"
    args = ["benchmark", "--data", str(data), "--label", "1", "--archs", "sa_unet", "--seeds", "1", "--folds", "2",
            "--epochs", "2", "--size", "32", "--out", str(out), "--quiet", "--no-latency"]
    assert main(args + ["--fold-val-fraction", "0.3"]) == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["stem"] for r in rows) == [f"{i:03d}" for i in range(16)]  # both held-out folds, once each
    for fold in (0, 1):
        run = RunConfig.load(out / "runs" / "sa_unet" / f"seed0_fold{fold}" / "config.json")
        assert run.train.checkpoint == "best" and run.data.fold_val_fraction == 0.3
        assert run.val_stems and set(run.val_stems).isdisjoint(run.test_stems)
        assert {r["stem"] for r in rows if r["fold"] == str(fold)} == set(run.test_stems)
    bench = json.loads((out / "benchmark.json").read_text())
    assert bench["fold_val_fraction"] == 0.3 and bench["train"]["checkpoint"] == "best"
    assert "best epoch on a subject-grouped 30% of each run's training folds" in (out / "summary.md").read_text()
    # the inner split is part of the recipe: resuming without it is refused
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    assert "the recipe differs" in capsys.readouterr().err


def test_fold_0s_inner_split_on_mn_wrist_is_the_pilots_validation_split(tmp_path):
    """The paper comparison's training length was chosen on a pilot (studies/inner_validation.py)
    whose validation patients must be the ones `paper` then validates fold 0 on."""
    if not (WRIST / "manifest.csv").is_file():
        pytest.skip(f"mn-wrist not found at {WRIST} (../shared/data is only on developer and CI machines)")
    pilot = json.loads(PILOT.read_text())
    inner = _split(WRIST, 0, 0.2)
    assert sorted(inner.val_stems) == sorted(pilot["val_stems"])
    assert sorted(inner.train_stems) == sorted(pilot["train_stems"])
    assert len(inner.test_stems) == 38


def _history(run: Path, curve: list[float]) -> None:
    run.mkdir(parents=True)
    (run / "history.csv").write_text("epoch,train_loss,val_dice,lr,seconds\n" + "".join(
        f"{e},0.5,{v},5e-4,1.0\n" for e, v in enumerate(curve, start=1)))


def test_convergence_reads_the_kept_and_best_epochs_off_each_history(tmp_path):
    from nerveseg.evaluation.benchmark import render_summary, run_convergence, save_convergence_plot

    # sa_unet: best 0.8 first at epoch 3 (and again at 5), then a dip; unet: still rising at its last epoch
    _history(tmp_path / "runs" / "sa_unet" / "seed0_fold0", [0.2, 0.6, 0.8, 0.5, 0.8, 0.7, 0.75, 0.6, 0.7, 0.72])
    _history(tmp_path / "runs" / "unet" / "seed0_fold0", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8])
    jobs = [(0, 0, "sa_unet"), (0, 0, "unet"), (0, 1, "unet")]  # fold 1 has no history: left out
    inner = BenchmarkConfig(".", archs=("sa_unet", "unet"), fold_val_fraction=0.2, train=TrainConfig(checkpoint="best"))
    got = {c["arch"]: c for c in run_convergence(inner, tmp_path, jobs)}
    assert len(got) == 2
    assert (got["sa_unet"]["best_epoch"], got["sa_unet"]["kept_epoch"], got["sa_unet"]["late_best"]) == (3, 3, False)
    assert got["sa_unet"]["val_dice_kept"] == pytest.approx(0.8)
    assert (got["unet"]["best_epoch"], got["unet"]["kept_epoch"], got["unet"]["late_best"]) == (10, 10, True)
    last = {c["arch"]: c for c in run_convergence(BenchmarkConfig(".", archs=("sa_unet", "unet")), tmp_path, jobs)}
    assert last["sa_unet"]["kept_epoch"] == 10 and last["sa_unet"]["val_dice_kept"] == pytest.approx(0.72)
    rows = [{"arch": a, "seed": 0, "fold": 0, "stem": "x", "dice": "0.5", "precision": "0.5", "recall": "0.5",
             "hd": "1", "hd95": "1", "auc": "0.9", "zero_overlap": "0", "area_truth_px": "10", "device": "", "region": ""}
            for a in ("sa_unet", "unet")]
    text = render_summary(inner, rows, {}, 0.0, 2, convergence=list(got.values()))
    assert "| sa_unet | 1 | 10 | 3 (3-3) | 0.800 ± 0.000 | 0 |" in text
    assert "| unet | 1 | 10 | 10 (10-10) | 0.800 ± 0.000 | 1 |" in text
    assert "which picked the kept epoch" in text
    save_convergence_plot(inner, list(got.values()), tmp_path / "convergence.png")
    assert (tmp_path / "convergence.png").stat().st_size > 1000
