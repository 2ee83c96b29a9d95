"""The architecture comparison: statistics against hand-computed cases, a tiny benchmark, resume."""

from __future__ import annotations

import csv
import json
import math

import pytest
from scipy import stats

from nerveseg.cli import main
from nerveseg.errors import ConfigError
from nerveseg.evaluation.statistics import mean_sd, paired_wilcoxon, run_level_summary


def _rows(arch, values, seed=0, fold=0):
    return [{"arch": arch, "seed": seed, "fold": fold, "stem": f"s{i}", "dice": v} for i, v in enumerate(values)]


def test_wilcoxon_hand_computed():
    # five pairs, every difference positive with distinct magnitudes: W- = 0, exact two-sided
    # p = 2 / 2**5 = 0.0625
    a = [0.9, 0.8, 0.7, 0.6, 0.5]
    b = [0.8, 0.6, 0.65, 0.3, 0.35]
    result = paired_wilcoxon(_rows("sa_unet", a) + _rows("unet", b), "sa_unet", "unet")
    assert result["n"] == 5
    assert result["p_value"] == pytest.approx(0.0625)
    assert result["median_difference"] == pytest.approx(0.15)
    # reversed roles: same p, negative median difference
    rev = paired_wilcoxon(_rows("sa_unet", b) + _rows("unet", a), "sa_unet", "unet")
    assert rev["p_value"] == pytest.approx(0.0625) and rev["median_difference"] == pytest.approx(-0.15)


def test_wilcoxon_pairs_by_image_and_drops_missing_and_matches_scipy():
    a = [0.91, 0.52, 0.77, 0.64, 0.88, 0.45, 0.7, 0.69]
    b = [0.85, 0.6, 0.7, 0.5, 0.8, 0.5, 0.61, 0.66]
    rows = _rows("sa_unet", a + [None]) + list(reversed(_rows("unet", b + [0.5])))  # order must not matter
    result = paired_wilcoxon(rows, "sa_unet", "unet")
    assert result["n"] == 8
    assert result["p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert math.isnan(paired_wilcoxon(_rows("sa_unet", [0.5]) + _rows("unet", [0.4]), "sa_unet", "unet")["p_value"])


def test_run_level_summary_is_mean_of_run_means_with_sd_over_runs():
    rows = _rows("a", [0.2, 0.4], seed=0) + _rows("a", [0.6, 0.8, 1.0], seed=1)
    mean, sd, n = run_level_summary(rows, "dice")
    assert (mean, n) == (pytest.approx(0.55), 2)  # run means 0.3 and 0.8
    assert sd == pytest.approx(math.sqrt(((0.3 - 0.55) ** 2 + (0.8 - 0.55) ** 2) / 1))
    # one run: SD over images
    assert run_level_summary(_rows("a", [0.2, 0.4]), "dice")[1] == pytest.approx(0.1414213, rel=1e-5)
    assert mean_sd([1.0, None, "nan", 3.0]) == (2.0, pytest.approx(1.41421356), 2)


def test_tiny_benchmark_writes_results_and_resumes(tmp_path, capsys):
    from conftest import write_ellipse_dataset

    data = write_ellipse_dataset(tmp_path / "data", 12)
    out = tmp_path / "bench"
    args = ["benchmark", "--data", str(data), "--label", "1", "--archs", "sa_unet,unet", "--seeds", "1", "--folds", "2",
            "--epochs", "1", "--size", "64", "--out", str(out), "--quiet", "--no-latency"]
    assert main(args) == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 12  # every image is validated once per architecture
    assert {r["arch"] for r in rows} == {"sa_unet", "unet"}
    for arch in ("sa_unet", "unet"):
        assert sorted(r["stem"] for r in rows if r["arch"] == arch) == [f"{i:03d}" for i in range(12)]
    summary = (out / "summary.md").read_text()
    for text in ("Table 3", "Table 2", "Wilcoxon", "| sa_unet |", "| unet |", "455,603"):
        assert text in summary, text
    assert (out / "roc.png").stat().st_size > 1000
    assert "p (Holm)" in summary
    # Fig. 4: 3 hardest, the lowest-contrast image not among them (ellipses are never bifid), 2 typical;
    # a column for the image and one per architecture
    from PIL import Image

    panel = Image.open(out / "overlay_panel.png")
    assert panel.size[1] == 18 + 6 * 256 and panel.size[0] > 3 * 256
    bench = json.loads((out / "benchmark.json").read_text())
    assert bench["train"]["checkpoint"] == "last" and bench["train"]["loss"] == "dice"  # the paper recipe

    # without --resume the folder is protected
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    # an interrupted benchmark: one run lost its evaluation -> only that run is redone
    finished = out / "runs" / "unet" / "seed0_fold0" / "model.safetensors"
    kept = out / "runs" / "sa_unet" / "seed0_fold1" / "model.safetensors"
    before = kept.stat().st_mtime_ns
    (out / "runs" / "unet" / "seed0_fold0" / "eval" / "per_image.csv").unlink()
    assert main(args + ["--resume"]) == 0
    assert kept.stat().st_mtime_ns == before  # not retrained
    assert finished.exists()
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 24
    assert "resuming: 3 of 4 runs already finished" in capsys.readouterr().err


def test_the_panel_is_drawn_from_the_saved_masks_once_the_weights_are_gone(tmp_path):
    """A study resumed from archived results (per-image scores and held-out masks, not the weights)
    draws the same Fig. 4 as the run that still had its models."""
    import numpy as np
    from PIL import Image

    from conftest import write_ellipse_dataset

    data = write_ellipse_dataset(tmp_path / "data", 8)
    out = tmp_path / "bench"
    args = ["benchmark", "--data", str(data), "--label", "1", "--archs", "sa_unet", "--seeds", "1", "--folds", "2",
            "--epochs", "1", "--size", "64", "--out", str(out), "--quiet", "--no-latency"]
    assert main(args) == 0
    for fold in (0, 1):
        masks = sorted((out / "runs" / "sa_unet" / f"seed0_fold{fold}" / "eval" / "masks").glob("*.png"))
        assert len(masks) == 4  # each held-out image of the fold
        values = np.unique(np.asarray(Image.open(masks[0])))
        assert set(values.tolist()) <= {0, 255}
    with_models = np.asarray(Image.open(out / "overlay_panel.png"))
    for weights in out.glob("runs/*/*/model.safetensors"):
        weights.unlink()
    (out / "overlay_panel.png").unlink()
    assert main(args + ["--resume", "--collect-only"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "overlay_panel.png")), with_models)


def test_benchmark_recipe_flag_takes_the_recipes_fields(tmp_path, ellipse_dataset, monkeypatch):
    import nerveseg.evaluation.benchmark as benchmark

    seen = {}
    monkeypatch.setattr(benchmark, "run_benchmark", lambda cfg, *a, **k: seen.update(cfg=cfg) or
                        {"summary": "", "rows": 0, "runs": 0, "planned": 0})
    assert main(["benchmark", "--data", str(ellipse_dataset), "--recipe", "nerveseg", "--epochs", "3",
                 "--out", str(tmp_path / "b"), "--quiet"]) == 0
    train = seen["cfg"].train
    assert train.loss == "dice_ce" and train.schedule == "poly" and train.epochs == 3 and train.checkpoint == "last"
    assert train.augment == ("shear", "hflip", "gamma", "contrast") and seen["cfg"].preprocess.size == 256


def test_benchmark_refuses_bad_arguments(tmp_path, ellipse_dataset):
    from nerveseg.evaluation.benchmark import BenchmarkConfig

    with pytest.raises(ConfigError, match="unknown architecture"):
        BenchmarkConfig(str(ellipse_dataset), archs=("sa_unet", "nope"))
    with pytest.raises(ConfigError):
        BenchmarkConfig(str(ellipse_dataset), folds=1)


def test_export_nnunet_writes_raw_format_with_our_folds(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from conftest import write_ellipse_dataset
    from nerveseg.data import discover_samples, split_samples

    data = write_ellipse_dataset(tmp_path / "data", 10)
    (data / "manifest.csv").write_text("file,subject,split\n" + "".join(
        f"{i:03d}.png,p{i // 2},{'test' if i >= 8 else ''}\n" for i in range(10)))
    out = tmp_path / "raw"
    assert main(["export-dataset", "--data", str(data), "--label", "1", "--format", "nnunet", "--folds", "2",
                 "--out", str(out), "--dataset-id", "7", "--name", "Toy"]) == 0
    root = out / "Dataset007_Toy"
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 8 and meta["labels"] == {"background": 0, "nerve": 1} and meta["file_ending"] == ".png"
    assert sorted(p.name for p in (root / "imagesTs").iterdir()) == ["008_0000.png", "009_0000.png"]
    image = np.array(Image.open(root / "imagesTr" / "000_0000.png"))
    label = np.array(Image.open(root / "labelsTr" / "000.png"))
    assert image.shape == label.shape == (60, 76) and set(np.unique(label)) == {0, 1}
    splits = json.loads((root / "splits_final.json").read_text())
    assert len(splits) == 2
    samples, _ = discover_samples(data)
    for fold, split in enumerate(splits):
        _, val = split_samples(samples, seed=0, folds=2, fold=fold)
        assert split["val"] == sorted(s.stem for s in val)  # exactly the split `nerveseg train` uses
        assert not set(split["train"]) & set(split["val"])
        assert sorted(split["train"] + split["val"]) == [f"{i:03d}" for i in range(8)]
        # subjects are never split across train and val
        assert {int(c) // 2 for c in split["train"]}.isdisjoint({int(c) // 2 for c in split["val"]})


def test_shards_split_the_runs_and_collect_only_summarizes_what_finished(tmp_path, capsys):
    from conftest import write_ellipse_dataset

    data = write_ellipse_dataset(tmp_path / "data", 8)
    out = tmp_path / "bench"
    base = ["benchmark", "--data", str(data), "--label", "1", "--archs", "sa_unet,unet", "--seeds", "1", "--folds", "2",
            "--epochs", "1", "--size", "64", "--out", str(out), "--quiet", "--no-latency", "--resume"]
    # jobs in order (seed, fold, arch): (0,0,sa), (0,0,unet), (0,1,sa), (0,1,unet); shard 0/2 takes both sa_unet runs
    assert main(base + ["--shard", "0/2"]) == 0
    trained = sorted(p.parent.name + "/" + p.name for p in (out / "runs").glob("*/*"))
    assert trained == ["sa_unet/seed0_fold0", "sa_unet/seed0_fold1"]
    summary = (out / "summary.md").read_text()
    assert "2 run(s) finished of 4 planned" in summary and "| unet |" not in summary
    assert "trained on: " in summary and "CPU" in summary
    capsys.readouterr()

    # collect-only trains nothing
    assert main(base + ["--collect-only"]) == 0
    assert not (out / "runs" / "unet").exists()
    assert "summary over 2 of 4 runs" in capsys.readouterr().err
    # threads and compilation are speed settings a later session may change; the recipe is not
    assert main(base + ["--collect-only", "--compile", "default", "--threads", "1"]) == 0
    assert json.loads((out / "benchmark.json").read_text())["train"]["compile"] == "default"
    capsys.readouterr()
    assert main(base + ["--collect-only", "--lr", "0.01"]) == 2
    assert "the recipe differs" in capsys.readouterr().err

    assert main(base + ["--shard", "1/2"]) == 0
    assert main(base + ["--collect-only"]) == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 8 and {r["arch"] for r in rows} == {"sa_unet", "unet"}
    assert "4 run(s) finished" in (out / "summary.md").read_text()
    assert "planned" not in (out / "summary.md").read_text()


@pytest.mark.parametrize("text", ["2/2", "-1/3", "a/b", "3", "0/0"])
def test_parse_shard_refuses_bad_values(text):
    from nerveseg.evaluation.benchmark import parse_shard

    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(text)
    assert parse_shard("1/3") == (1, 3)


def test_common_runs_keeps_only_splits_every_architecture_finished():
    from nerveseg.evaluation.benchmark import BenchmarkConfig, common_runs, render_summary

    def row(arch, seed, fold, stem, dice):
        return {"arch": arch, "seed": seed, "fold": fold, "stem": stem, "dice": dice, "device": "", "region": ""}

    rows = [row("sa_unet", 0, 0, "a", 0.9), row("sa_unet", 0, 1, "b", 0.1),
            row("unet", 0, 0, "a", 0.5), row("unet", 0, 1, "b", 0.4), row("unet", 1, 0, "a", 0.3)]
    kept, left_out = common_runs(rows, ["sa_unet", "unet"])
    assert left_out == 1  # unet's (seed 1, fold 0): sa_unet has not finished it
    assert sorted((r["arch"], r["seed"], r["fold"]) for r in kept) == [
        ("sa_unet", 0, 0), ("sa_unet", 0, 1), ("unet", 0, 0), ("unet", 0, 1)]
    assert common_runs(kept, ["sa_unet", "unet"]) == (kept, 0)
    # the rendered tables use the kept rows: unet's DSC is the mean of its run means 0.5 and 0.4
    full_rows = [{**r, **{k: r["dice"] for k in ("precision", "recall", "hd", "hd95", "auc")},
                  "zero_overlap": "0", "area_truth_px": "10"} for r in rows]
    cfg = BenchmarkConfig(".", archs=("sa_unet", "unet"), folds=2, seeds=2)
    text = render_summary(cfg, full_rows, {}, 0.0, 5, n_planned=8, devices=["x CPU"])
    assert "partial benchmark" in text and "1 run(s) finished by only some" in text
    assert "| unet | 0.450 ± 0.071 |" in text
    assert "trained on: x CPU" in text
    # Table 3 also over images (mean ± SD, median) with the misses; Table 2 the pixel-pooled AUC given
    full_rows[1]["zero_overlap"] = "1"  # sa_unet missed image b
    text = render_summary(cfg, full_rows, {}, 0.0, 5, pooled_auc={"sa_unet": 0.97126, "unet": 0.9})
    sa_line = next(line for line in text.splitlines() if line.startswith("| sa_unet | 0.500"))
    assert sa_line.endswith("| 0.500 ± 0.566 (0.500) | 1 |")  # images a 0.9 and b 0.1: SD 0.8 / sqrt(2)
    assert "| unet | 0.450 ± 0.071 | 0.450 ± 0.071 | 0.450 ± 0.071 | 0.5 ± 0.1 | 0.450 ± 0.071 (0.450) | 0 |" in text
    assert "| 0.9713 |" in text and "| 0.9000 |" in text
