"""The accuracy study's scripts (studies/): the post-processing rules chosen on cross-validation
and the pooling of fold evaluations into one metrics.json, against hand-computed cases; and every
script that docs/*.md and README.md cite (benchmarks/ and studies/) exists and answers --help."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from nerveseg.evaluation.evaluate import PER_IMAGE_FIELDS, SUMMARY_KEYS, save_roc_histograms, write_per_image
from nerveseg.evaluation.metrics import RocAccumulator, image_metrics, summarize

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def postprocess():
    return _script("postprocess_cv")


@pytest.fixture(scope="module")
def pool():
    return _script("pool_fold_evals")


def _two_regions() -> np.ndarray:
    prob = np.zeros((20, 20))
    prob[1:7, 1:7] = 0.9  # 36 px
    prob[12:14, 12:14] = 0.6  # 4 px: 11% of the largest
    prob[15:17, 1:3] = 0.4  # 4 px, below 0.5
    return prob


def test_rule_threshold_and_region_fraction_by_hand(postprocess):
    prob = _two_regions()
    assert postprocess.apply_rule(prob, 0.5, 0.0).sum() == 40
    assert postprocess.apply_rule(prob, 0.3, 0.0).sum() == 44
    assert postprocess.apply_rule(prob, 0.5, 0.1).sum() == 40  # 4 >= 0.1 * 36
    assert postprocess.apply_rule(prob, 0.5, 0.2).sum() == 36  # 4 < 0.2 * 36
    assert postprocess.apply_rule(prob, 0.3, 1.0).sum() == 36
    assert postprocess.apply_rule(prob, 0.95, 0.5).sum() == 0  # nothing above threshold: nothing to filter


def test_rule_keep_largest_keeps_one_region_on_ties(postprocess):
    prob = np.zeros((10, 10))
    prob[0:2, 0:2] = prob[5:7, 5:7] = 1.0
    mask = postprocess.apply_rule(prob, 0.5, 1.0)
    assert mask.sum() == 4 and mask[0:2, 0:2].all()


def test_dice_matches_image_metrics(postprocess):
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth = rng.random((16, 16)) > 0.6
        pred = rng.random((16, 16)) > 0.5
        d, miss = postprocess.dice(pred, truth)
        ref = image_metrics(pred.astype(float), truth)
        assert d == pytest.approx(ref["dice"]) and miss == ref["zero_overlap"]
    truth = np.zeros((4, 4), bool)
    truth[0, 0] = True
    assert postprocess.dice(np.zeros((4, 4), bool), truth) == (0.0, True)


def _fold_eval(folder: Path, stems: list[str], rng) -> list[dict]:
    rows, roc = [], RocAccumulator()
    for stem in stems:
        truth = np.zeros((24, 24), bool)
        truth[5:15, 6:16] = True
        prob = np.clip(truth * rng.uniform(0.3, 1.0) + rng.random((24, 24)) * 0.5, 0, 1)
        roc.update(prob, truth)
        rows.append({"stem": stem, **image_metrics(prob, truth)})
    write_per_image(folder / "per_image.csv", [{k: r[k] for k in PER_IMAGE_FIELDS} for r in rows])
    save_roc_histograms(roc, folder / "roc.npz")
    return rows, roc


def test_pooled_fold_evaluations_equal_one_evaluation_of_all_images(pool, tmp_path):
    rng = np.random.default_rng(1)
    a, b = tmp_path / "fold_0", tmp_path / "fold_1"
    a.mkdir(), b.mkdir()
    rows_a, roc_a = _fold_eval(a, ["001", "002", "003"], rng)
    rows_b, roc_b = _fold_eval(b, ["004", "005"], rng)
    pooled = {**pool.load_per_image(a / "per_image.csv"), **pool.load_per_image(b / "per_image.csv")}
    summary = pool.write_pooled([a, b], pooled, tmp_path / "cv")
    expected = summarize(rows_a + rows_b, keys=SUMMARY_KEYS)
    for key in ("dice", "precision", "recall", "hd95", "auc"):
        assert summary[key]["mean"] == pytest.approx(expected[key]["mean"], abs=1e-5)
        assert summary[key]["sd"] == pytest.approx(expected[key]["sd"], abs=1e-5)
    assert summary["n_images"] == 5 and summary["zero_overlap_rate"] == expected["zero_overlap_rate"]
    both = RocAccumulator()
    both.pos_hist, both.neg_hist = roc_a.pos_hist + roc_b.pos_hist, roc_a.neg_hist + roc_b.neg_hist
    assert summary["pooled_auc"] == pytest.approx(both.auc())
    assert (tmp_path / "cv" / "metrics.json").exists() and len(pool.load_per_image(tmp_path / "cv" / "per_image.csv")) == 5
    assert summary["threshold"] is None  # these evaluations wrote no metrics.json to say
    for folder, t in ((a, 0.4), (b, 0.4)):
        (folder / "metrics.json").write_text(json.dumps({"threshold": t}))
    assert pool.write_pooled([a, b], pooled, tmp_path / "cv")["threshold"] == 0.4
    (b / "metrics.json").write_text(json.dumps({"threshold": 0.5}))
    with pytest.raises(SystemExit, match="different thresholds"):
        pool.write_pooled([a, b], pooled, tmp_path / "cv2")


def test_pooling_refuses_folds_that_share_images(pool, tmp_path):
    rng = np.random.default_rng(2)
    a, b = tmp_path / "fold_0", tmp_path / "fold_1"
    a.mkdir(), b.mkdir()
    _fold_eval(a, ["001", "002"], rng)
    _fold_eval(b, ["002", "003"], rng)
    pooled = {**pool.load_per_image(a / "per_image.csv"), **pool.load_per_image(b / "per_image.csv")}
    with pytest.raises(SystemExit, match="count an image twice"):
        pool.write_pooled([a, b], pooled, tmp_path / "cv")
    assert not (tmp_path / "cv").exists()


def test_rule_choice_best_dice_and_under_a_miss_budget(postprocess):
    # three candidates x four images: (Dice, miss)
    inner = [np.array([[0.9, 0], [0.8, 0], [0.7, 0]]),
             np.array([[0.0, 1], [0.7, 0], [0.6, 0]]),
             np.array([[0.95, 0], [0.0, 1], [0.6, 0]]),
             np.array([[0.9, 0], [0.8, 0], [0.7, 0]])]
    # mean Dice 0.6875, 0.575, 0.65; miss rates 0.25, 0.25, 0
    assert postprocess.choose(inner, None) == 0
    assert postprocess.choose(inner, 0.25) == 0
    assert postprocess.choose(inner, 0.1) == 2  # the only candidate within the budget
    everyone_misses = [np.array([[0.0, 1], [0.5, 0]]), np.array([[0.9, 0], [0.0, 1]]), np.array([[0.0, 1], [0.3, 0]])]
    assert postprocess.choose(everyone_misses, 0.0) == 1  # none within budget: the fewest misses (1/3 vs 2/3)


def _fake_fold_runs(root: Path, data: Path, probabilities) -> None:
    """Fold runs of a 2-fold split whose cached held-out probabilities are ``probabilities(truth)``:
    what member_sets.py reads, without training anything."""
    from nerveseg.config import RunConfig
    from nerveseg.data.io import read_mask
    from nerveseg.io_utils import atomic_write_json

    stems = sorted(p.stem for p in (data / "masks").glob("*.png"))
    for k, val in enumerate((stems[:3], stems[3:])):
        fold = root / f"fold_{k}"
        (fold / "eval").mkdir(parents=True)
        (fold / "model.safetensors").write_bytes(b"")
        (fold / "eval" / "metrics.json").write_text("{}")
        atomic_write_json(fold / "config.json", RunConfig(val_stems=list(val)).to_dict())
        truth = {s: read_mask(data / "masks" / f"{s}.png", label=1).astype(np.float16) for s in val}
        np.savez(fold / "val_probs.npz", **{s: probabilities(t) for s, t in truth.items()})


def test_member_sets_averages_members_and_tests_against_the_reference(tmp_path, monkeypatch):
    """Hand-made members: A is right everywhere (0.9 on the nerve), B predicts nothing. Their average,
    0.45 on the nerve, misses every image at 0.5 and is perfect at 0.4."""
    from conftest import write_ellipse_dataset

    member_sets = _script("member_sets")
    data = write_ellipse_dataset(tmp_path / "data", 6)
    _fake_fold_runs(tmp_path / "a", data, lambda t: (0.9 * t).astype(np.float16))
    _fake_fold_runs(tmp_path / "b", data, lambda t: np.zeros_like(t))
    out = tmp_path / "sets.json"
    monkeypatch.setattr("sys.argv", ["member_sets.py", "--data", str(data), "--reference", str(tmp_path / "a"),
                                     "--set", str(tmp_path / "b"), "--set", f"{tmp_path / 'a'},{tmp_path / 'b'}",
                                     "--thresholds", "0.5,0.4", "--out", str(out)])
    member_sets.main()
    rows = {(tuple(r["members"]), r["threshold"]): r for r in json.loads(out.read_text())["rows"]}
    assert json.loads(out.read_text())["folds"] == [0, 1]
    reference = rows[(("a",), 0.5)]
    assert reference["n"] == 6 and reference["dice_mean"] == 1.0 and reference["zero_overlap"] == 0
    for t in (0.5, 0.4):
        assert rows[(("b",), t)]["dice_mean"] == 0.0 and rows[(("b",), t)]["zero_overlap"] == 6
        assert rows[(("b",), t)]["mean_difference"] == -1.0
    assert rows[(("a", "b"), 0.5)]["zero_overlap"] == 6
    assert rows[(("a", "b"), 0.4)]["dice_mean"] == 1.0 and rows[(("a", "b"), 0.4)]["p"] == 1.0


def test_member_sets_refuses_an_unfinished_fold(tmp_path, monkeypatch):
    from conftest import write_ellipse_dataset

    member_sets = _script("member_sets")
    data = write_ellipse_dataset(tmp_path / "data", 6)
    _fake_fold_runs(tmp_path / "a", data, lambda t: t)
    monkeypatch.setattr("sys.argv", ["member_sets.py", "--data", str(data), "--reference", str(tmp_path / "a"),
                                     "--set", str(tmp_path / "a"), "--folds", "3"])
    with pytest.raises(SystemExit, match="not finished"):
        member_sets.main()


def test_qc_flags_of_a_routed_model_pool_the_routes_at_their_own_cuts(tmp_path, monkeypatch):
    """Two routes on two folders: A says 0.9 on its nerves and is cut at 0.85, B says 0.6 and is cut at
    0.3. Moved onto 0.5 as RoutedPredictor moves them, A's outlines have confidence
    0.5 + 0.05 * 0.5 / 0.15 = 0.667 and B's 0.5 + 0.3 * 0.5 / 0.7 = 0.714: at a low_confidence cut of 0.7 A's
    six images are flagged and B's four are not (raw, it would be the other way round)."""
    from conftest import write_ellipse_dataset

    qc = _script("qc_flags_cv")
    data_a = write_ellipse_dataset(tmp_path / "a_data", 6)
    data_b = write_ellipse_dataset(tmp_path / "b_data", 4, seed=1)
    for folder in ("images", "masks"):  # stems must be unique across the folders
        for f in sorted((data_b / folder).glob("*.png")):
            f.rename(f.with_name(f"b{f.name}"))
    _fake_fold_runs(tmp_path / "a", data_a, lambda t: (0.9 * t).astype(np.float16))
    _fake_fold_runs(tmp_path / "b", data_b, lambda t: (0.6 * t).astype(np.float16))
    out = tmp_path / "qc.json"
    argv = ["qc_flags_cv.py", str(tmp_path / "a"), str(tmp_path / "b"), "--data", str(data_a), "--data", str(data_b),
            "--low-confidence", "0.7", "--out", str(out)]
    monkeypatch.setattr("sys.argv", [*argv, "--routes", "--member-cut", "0.85", "--member-cut", "0.3"])
    qc.main()
    result = json.loads(out.read_text())
    flags = {r["flag"]: r for r in result["flags"]}
    assert result["n"] == 10 and result["failures"] == 0 and result["member_cuts"] == [0.85, 0.3]
    assert flags["low_confidence"]["flagged"] == 6 and flags["no_nerve"]["flagged"] == 0
    monkeypatch.setattr("sys.argv", [*argv, "--routes", "--member-cut", "0.85"])
    with pytest.raises(SystemExit):  # one cut per route
        qc.main()
    monkeypatch.setattr("sys.argv", [*argv, "--member-cut", "0.85", "--member-cut", "0.3"])
    with pytest.raises(SystemExit):  # cuts without --routes would be ignored silently
        qc.main()


def test_router_shifts_pad_crop_and_change_intensity_by_hand():
    shift = _script("router_shift")
    img = np.arange(15, dtype=float).reshape(3, 5) / 14
    padded = shift._pad_square(img)
    assert padded.shape == (5, 5) and (padded[0] == 0).all() and np.array_equal(padded[1:4], img)
    assert np.array_equal(shift._crop_square(img), img[:, 1:4])
    assert shift._crop(np.ones((10, 20)), 0.8, 0.8).shape == (8, 16)
    fns = shift.shifts()
    assert list(fns)[0] == "as it is" and fns["as it is"](img) is img
    np.testing.assert_allclose(fns["darker (gamma 1.5)"](img), img ** 1.5)
    low = fns["lower contrast (x0.6)"](img)
    assert low.mean() == pytest.approx(img.mean()) and np.ptp(low) == pytest.approx(0.6 * np.ptp(img))
    np.testing.assert_array_equal(shift.shifts()["noise (sd 0.05)"](img), fns["noise (sd 0.05)"](img))  # seeded


# ------------------------------------------------------------------------------------------------
# accuracy_study.sh: what a phase asks nerveseg to do, with a stand-in nerveseg on PATH

FAKE_NERVESEG = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
out=
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
if [ "$CALL_FAILS" = 1 ]; then exit 1; fi
mkdir -p "$out" && echo '{}' > "$out/metrics.json"
"""


def _run_driver(tmp_path, fake: str, command: list[str], timeout: int = 60, **env):
    """Run a study driver with a stand-in ``nerveseg`` (``fake``, a bash script) first on PATH; every
    call it gets is a line of the returned list."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nerveseg").write_text(fake)
    (bin_dir / "nerveseg").chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), **env}
    result = subprocess.run(["bash", *command], env=full_env, capture_output=True, text=True, timeout=timeout)
    return result, calls.read_text().splitlines()


def _study(tmp_path, *args, **env):
    return _run_driver(tmp_path, FAKE_NERVESEG, [str(STUDIES / "accuracy_study.sh"), *args, "DATA", str(tmp_path / "out")],
                       **env)


def test_study_phase_trains_and_scores_each_fold_once(tmp_path):
    result, calls = _study(tmp_path, "ema256", FOLDS="1 0")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert len(calls) == 4
    train1, eval1, train0, eval0 = calls
    assert train1.startswith("train --data DATA --seed 0 --quiet") and f"--out {out}/sa_unet_ema256/fold_1" in train1
    assert "--recipe nerveseg --ema 0.998 --folds 5 --fold 1" in train1
    assert eval1.startswith(f"evaluate --model {out}/sa_unet_ema256/fold_1 --data DATA --subset val")
    assert eval1.endswith("--backend torch --no-tta --keep-largest ")
    assert "--fold 0" in train0 and "fold_0" in eval0
    assert (out / "sa_unet_ema256" / "fold_1" / ".trained").is_file()
    # finished runs and evaluations are skipped
    again, calls = _study(tmp_path, "ema256", FOLDS="1 0")
    assert again.returncode == 0 and calls == []


def test_study_phase_leaves_a_failed_run_unfinished(tmp_path):
    result, calls = _study(tmp_path, "ema256", FOLDS="1", CALL_FAILS="1")
    assert result.returncode != 0 and len(calls) == 1  # stops at the failed training
    assert not (tmp_path / "out" / "sa_unet_ema256" / "fold_1" / ".trained").exists()


def test_study_arms_are_checked(tmp_path):
    result, calls = _study(tmp_path, "reg128", ARMS="wide mixup", FOLDS="1")
    assert result.returncode == 2 and "unknown arm mixup" in result.stderr
    assert len(calls) == 2 and "features" in calls[0] and "--size 128" in calls[0]  # wide ran first


# ------------------------------------------------------------------------------------------------
# every script the documents cite exists and answers --help

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"\b(python3?|bash) ((?:benchmarks|studies)/[\w-]+\.(?:py|sh))\b")
MENTIONED = re.compile(r"\b((?:benchmarks|studies)/[\w-]+\.(?:py|sh))\b")


def _documents() -> list[Path]:
    return sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md"])


def _cited() -> list[tuple[str, str]]:
    """(interpreter, script) for each `python benchmarks/X.py`, `bash studies/X.sh`, ... in docs/*.md and README.md."""
    return sorted({(m[1].rstrip("3"), m[2]) for doc in _documents() for m in CITED.finditer(doc.read_text())})


def test_the_documents_cite_scripts():
    assert len(_cited()) >= 20  # the pattern still finds the commands


def test_every_script_the_documents_name_exists():
    missing = sorted({f"{doc.name}: {m[1]}" for doc in _documents() for m in MENTIONED.finditer(doc.read_text())
                      if not (ROOT / m[1]).is_file()})
    assert not missing


@pytest.mark.parametrize(("interpreter", "script"), _cited(), ids=lambda v: v)
def test_cited_script_answers_help(interpreter, script, tmp_path):
    """Run from an empty folder with `--help`: argparse scripts print their usage and exit 0; the shell
    drivers print their header (0, or 2 for an unknown phase) and start nothing."""
    import os
    import subprocess
    import sys

    path = ROOT / script
    assert path.is_file(), f"{script} is cited but does not exist"
    command = [sys.executable, str(path), "--help"] if interpreter == "python" else ["bash", str(path), "--help"]
    # a stand-in nerveseg that fails, so a driver that ignored --help could not train anything
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nerveseg").write_text("#!/bin/sh\nexit 3\n")
    (bin_dir / "nerveseg").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    missing = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", result.stderr)
    if result.returncode != 0 and missing:
        pytest.skip(f"{script} imports {missing[1]}, which is not installed here")
    if interpreter == "python":
        assert result.returncode == 0, result.stderr[-2000:]
        assert "usage:" in result.stdout
    else:
        assert result.returncode in (0, 2), result.stderr[-2000:]
        said = result.stdout + result.stderr
        assert path.name in said or "usage" in said.lower(), said[-2000:]  # its header: how to call it


def test_pooling_reports_each_data_folder_and_the_area_agreement(pool, tmp_path):
    """Folds of a two-folder run (issue 22): the pooled metrics.json has each folder's figures and the
    area agreement, equal to evaluation.agreement on the same rows; --markdown's pooled rows agree."""
    from nerveseg.evaluation.agreement import area_agreement

    rng = np.random.default_rng(3)
    folders, all_rows = [], []
    for k, stems in enumerate((["w1", "w2", "u1"], ["w3", "u2", "u3"])):
        folder = tmp_path / f"fold_{k}"
        folder.mkdir()
        rows, roc = [], RocAccumulator()
        for stem in stems:
            truth = np.zeros((24, 24), bool)
            truth[5:15, 6:16 + k] = True
            prob = np.clip(truth * rng.uniform(0.3, 1.0) + rng.random((24, 24)) * 0.5, 0, 1)
            roc.update(prob, truth)
            rows.append({"stem": stem, **image_metrics(prob, truth), "source": "wrist" if stem[0] == "w" else "usgra"})
        fields = PER_IMAGE_FIELDS + ("source",)
        write_per_image(folder / "per_image.csv", [{k: r[k] for k in fields} for r in rows], fields=fields)
        save_roc_histograms(roc, folder / "roc.npz")
        folders.append(folder)
        all_rows += rows
    pooled = {s: r for f in folders for s, r in pool.load_per_image(f / "per_image.csv").items()}
    summary = pool.write_pooled(folders, pooled, tmp_path / "cv")
    assert set(summary["by_source"]) == {"wrist", "usgra"}
    for source in ("wrist", "usgra"):
        mine = [r for r in all_rows if r["source"] == source]
        assert summary["by_source"][source]["n_images"] == 3
        assert summary["by_source"][source]["dice"]["mean"] == pytest.approx(np.mean([r["dice"] for r in mine]), abs=1e-5)
        expected = area_agreement([r["area_pred_px"] for r in mine], [r["area_truth_px"] for r in mine])
        got = summary["by_source"][source]["area_agreement"]["px"]
        assert got["median_ape_percent"] == pytest.approx(expected["median_ape_percent"])
        assert got["bland_altman"]["bias"] == pytest.approx(expected["bland_altman"]["bias"])
    assert summary["area_agreement"]["px"]["n"] == 6
    assert (tmp_path / "cv" / "bland_altman.png").stat().st_size > 0
    assert "source" in (tmp_path / "cv" / "per_image.csv").read_text().splitlines()[0]
    table = pool.markdown_tables(folders)
    wrist = [r for r in all_rows if r["source"] == "wrist"]
    pooled_row = [line for line in table.splitlines() if line.startswith("| **pooled")][1]  # usgra first, then wrist
    assert f"{np.mean([r['dice'] for r in wrist]):.3f} ± {np.std([r['dice'] for r in wrist], ddof=1):.3f}" in pooled_row


# ------------------------------------------------------------------------------------------------
# issue 23: the training length chosen on the training folds' own validation, and runs archived


@pytest.fixture
def inner():
    return _script("inner_validation")


def test_converged_epoch_by_hand(inner):
    # trailing 3-epoch means: 0.2, 0.4, 0.6, 0.7, 0.733, 0.75 (epochs 3..8); best 0.75 at epoch 8;
    # within 0.06 of it first at epoch 6 (0.7)
    curve = [0.0, 0.3, 0.3, 0.6, 0.9, 0.6, 0.7, 0.95]
    choice = inner.converged_epoch(curve, window=3, tolerance=0.06)
    assert choice["epoch"] == 6 and choice["best_at"] == 8
    assert choice["best_moving_mean"] == pytest.approx(0.75) and choice["moving_mean"] == pytest.approx(0.7)
    assert inner.converged_epoch(curve, window=3, tolerance=0.0)["epoch"] == 8
    assert inner.converged_epoch([0.5] * 4, window=2)["epoch"] == 2  # a flat curve: as soon as the window fills
    with pytest.raises(ValueError, match="fewer than the window"):
        inner.converged_epoch([0.5, 0.6], window=5)


def test_training_side_folder_holds_every_other_fold_and_no_patient_of_the_held_out_one(inner, tmp_path):
    from conftest import write_ellipse_dataset
    from nerveseg.data.samples import discover_samples, fold_assignment

    data = write_ellipse_dataset(tmp_path / "data", 20)
    (data / "manifest.csv").write_text("file,subject\n" + "".join(f"{i:03d}.png,P{i // 2}\n" for i in range(20)))
    samples, _ = discover_samples(data)
    folds = fold_assignment(samples, 5, 0)
    counts = inner.training_side_folder(data, 5, 2, tmp_path / "f2")
    kept, _ = discover_samples(tmp_path / "f2")
    held_subjects = {s.subject for s in samples if folds[s.stem] == 2}
    assert {s.stem for s in kept} == {s.stem for s in samples if folds[s.stem] != 2}
    assert not {s.subject for s in kept} & held_subjects and len(held_subjects) == 2
    assert counts == {"training_images": 16, "training_subjects": 8, "held_out_images": 4, "held_out_subjects": 2}
    # the links lead to the same pixels
    assert (tmp_path / "f2" / "images" / kept[0].image_path.name).read_bytes() == (data / "images" / kept[0].image_path.name).read_bytes()


FAKE_BENCHMARK = r"""#!/usr/bin/env bash
# a stand-in `nerveseg benchmark`: writes the one run its --shard I/N names (job order seed, fold, arch)
echo "$*" >> "$CALLS"
while [ $# -gt 0 ]; do
  case "$1" in --out) out=$2;; --archs) archs=$2;; --shard) shard=$2;; --epochs) epochs=$2;;
    --fold-val-fraction) inner=$2;; --collect-only) collect=1;; esac; shift
done
if [ -z "${collect:-}" ]; then
  IFS=',' read -r -a names <<< "$archs"; n=${#names[@]}; i=${shard%/*}
  run="$out/runs/${names[i % n]}/seed$((i / (5 * n)))_fold$(((i / n) % 5))"
  mkdir -p "$run/eval/masks" && echo "epoch" > "$run/history.csv" && echo "{}" > "$run/config.json"
  echo "stem,dice" > "$run/eval/per_image.csv" && echo png > "$run/eval/masks/a.png" && echo weights > "$run/model.safetensors"
fi
python3 -c "import json, sys; json.dump({'archs': sys.argv[1].split(','), 'train': {'epochs': int(sys.argv[2])},
  'fold_val_fraction': float(sys.argv[3]) if sys.argv[3] else None}, open(sys.argv[4], 'w'))" \
  "$archs" "${epochs:-30}" "${inner:-}" "$out/benchmark.json"
echo "| table |" > "$out/summary.md"
"""


def _paper_wrist(tmp_path, *args, **env):
    return _run_driver(tmp_path, FAKE_BENCHMARK, [str(STUDIES / "paper_comparison_wrist.sh"), *args],
                       RUNS=str(tmp_path / "runs"), KEEP=str(tmp_path / "keep"), **env)


def test_paper_wrist_runs_one_job_a_call_archives_each_and_resumes_from_the_archive(tmp_path):
    import shutil

    result, calls = _paper_wrist(tmp_path, "paper", SHARD="1/2", EPOCHS="40")
    assert result.returncode == 0, result.stderr
    assert [c.split("--shard ")[1].split()[0] for c in calls] == ["1/10", "3/10", "5/10", "7/10", "9/10"]
    # the paper's recipe keeps each run's best epoch on a patient-grouped 20% of its training folds
    assert all("--epochs 40" in c and "--recipe paper" in c and "--fold-val-fraction 0.2" in c for c in calls)
    keep = tmp_path / "keep" / "paper"
    archived = sorted(p.parent.parent.relative_to(keep).as_posix() for p in keep.glob("runs/*/*/eval/per_image.csv"))
    assert archived == [f"runs/unet/seed0_fold{k}" for k in range(5)]  # odd jobs: U-Net on each fold
    assert not list(keep.glob("runs/*/*/model.safetensors"))  # the weights are not archived
    assert (keep / "runs/unet/seed0_fold3/eval/masks/a.png").is_file() and (keep / "summary.md").is_file()
    # a new session: runs/ is gone; the archive is restored and no finished run is trained again
    shutil.rmtree(tmp_path / "runs")
    result, calls = _paper_wrist(tmp_path, "paper", SHARD="1/2", EPOCHS="40")
    assert result.returncode == 0 and calls == []
    assert (tmp_path / "runs/paper/runs/unet/seed0_fold4/eval/per_image.csv").is_file()
    # the other shard trains only its own runs
    result, calls = _paper_wrist(tmp_path, "paper", SHARD="0/2", EPOCHS="40")
    assert len(calls) == 5 and len(list(keep.glob("runs/*/*/eval/per_image.csv"))) == 10


def test_paper_wrist_nerveseg_keeps_the_last_epoch_and_tables_resume_each_phase_as_it_was_saved(tmp_path):
    result, calls = _paper_wrist(tmp_path, "nerveseg", SHARD="0/10")
    assert result.returncode == 0, result.stderr
    assert len(calls) == 1 and "--recipe nerveseg" in calls[0] and "--fold-val-fraction" not in calls[0]
    assert _paper_wrist(tmp_path, "paper", SHARD="0/10", EPOCHS="41")[0].returncode == 0
    # tables: no EPOCHS given; each phase is summarized with its saved length and inner split
    result, calls = _paper_wrist(tmp_path, "tables")
    assert result.returncode == 0, result.stderr
    by_recipe = {c.split("--recipe ")[1].split()[0]: c for c in calls}
    assert all("--collect-only" in c and "--resume" in c for c in calls) and len(calls) == 2
    assert "--epochs 41" in by_recipe["paper"] and "--fold-val-fraction 0.2" in by_recipe["paper"]
    assert "--epochs 30" in by_recipe["nerveseg"] and "--fold-val-fraction" not in by_recipe["nerveseg"]


def test_paper_wrist_others_reuses_the_paper_runs_of_sa_unet_and_unet_and_trains_only_the_three_others(tmp_path):
    import shutil

    assert _paper_wrist(tmp_path, "paper", EPOCHS="41")[0].returncode == 0  # all 10 runs of the two networks
    shutil.rmtree(tmp_path / "runs")  # a later session: only the archive is left
    result, calls = _paper_wrist(tmp_path, "others", EPOCHS="41")
    assert result.returncode == 0, result.stderr
    # job order seed, fold, arch over 5 architectures: SA-UNet (0) and U-Net (1) of every fold are reused
    shards = [int(c.split("--shard ")[1].split("/")[0]) for c in calls]
    assert shards == [i for i in range(25) if i % 5 >= 2]
    assert all("--archs sa_unet,unet,unet_pp,attention_unet,multires_unet" in c and "--epochs 41" in c for c in calls)
    keep = tmp_path / "keep" / "paper_all"
    assert len(list(keep.glob("runs/*/*/eval/per_image.csv"))) == 25
    assert (keep / "runs/sa_unet/seed0_fold4/eval/masks/a.png").is_file()
    assert not list(keep.glob("runs/*/*/model.safetensors"))
    # another length than the paper phase's could not pair with its runs: refused before any training
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(keep)
    result, calls = _paper_wrist(tmp_path, "others", EPOCHS="30")
    assert result.returncode == 2 and calls == [] and "differs from the paper phase's 41" in result.stderr


FAKE_GPU_BENCHMARK = r"""#!/usr/bin/env bash
# a stand-in `nerveseg benchmark` for the GPU drivers: logs its call; a summary for --collect-only
echo "$*" >> "$CALLS"
while [ $# -gt 0 ]; do case "$1" in --out) out=$2;; --collect-only) collect=1;; esac; shift; done
mkdir -p "$out"
[ -n "${collect:-}" ] && echo "| table of $out |" > "$out/summary.md"
exit 0
"""


def test_gpu_paper_wrist_runs_both_recipes_at_once_with_their_own_protocol(tmp_path):
    out = tmp_path / "gpu"
    result, calls = _run_driver(tmp_path, FAKE_GPU_BENCHMARK, [str(STUDIES / "gpu_paper_wrist.sh"), str(out)],
                                SHARED=str(tmp_path / "shared"), WORKERS_PAPER="3", WORKERS_NERVESEG="2")
    assert result.returncode == 0, result.stderr
    paper = [c for c in calls if f"--out {out}/paper " in c + " "]
    nerveseg = [c for c in calls if f"--out {out}/nerveseg " in c + " "]
    assert len(paper) == 3 + 2 and len(nerveseg) == 2 + 2  # workers + the initial and the final collect
    assert all("--archs sa_unet,unet,unet_pp,attention_unet,multires_unet --recipe paper" in c for c in paper)
    assert all("--epochs 41" in c and "--fold-val-fraction 0.2" in c and "--seeds 3" in c for c in paper)
    assert all("--archs sa_unet,unet --recipe nerveseg" in c and "--epochs 60" in c for c in nerveseg)
    assert not any("--fold-val-fraction" in c for c in nerveseg)  # the last epoch is kept
    assert all(f"--data {tmp_path}/shared/mn-wrist" in c for c in calls)
    shards = sorted(c.split("--shard ")[1].split()[0] for c in paper if "--shard" in c)
    assert shards == ["0/3", "1/3", "2/3"]
    assert f"| table of {out}/paper |" in result.stdout and f"| table of {out}/nerveseg |" in result.stdout


FAKE_TRAIN = r"""#!/usr/bin/env bash
# a stand-in `nerveseg train`: a validation curve that rises to 0.8 by epoch 10, then stays flat
echo "$*" >> "$CALLS"
while [ $# -gt 0 ]; do
  case "$1" in --out) out=$2;; --epochs) epochs=$2;; esac; shift
done
mkdir -p "$out" && echo "{\"data_dir\": \"$PWD/runs/pilot/data_f0\"}" > "$out/config.json"
echo weights > "$out/last.safetensors"
echo "epoch,train_loss,val_dice,lr,seconds" > "$out/history.csv"
for ((e = 1; e <= epochs; e++)); do
  echo "$e,0.5,$(python3 -c "print(min(0.8, 0.08 * $e))"),5e-4,1.0" >> "$out/history.csv"
done
"""


def test_pilot_chooses_epochs_from_the_training_side_and_a_later_session_trains_only_what_is_missing(tmp_path):
    import shutil

    from conftest import write_ellipse_dataset

    data = write_ellipse_dataset(tmp_path / "shared" / "mn-wrist", 20)
    (data / "manifest.csv").write_text("file,subject\n" + "".join(f"{i:03d}.png,P{i // 2}\n" for i in range(20)))
    keep = tmp_path / "keep"

    def pilot(**env):
        result, calls = _run_driver(tmp_path, FAKE_TRAIN, [str(STUDIES / "paper_comparison_wrist.sh"), "pilot"],
                                    timeout=120, SHARED=str(tmp_path / "shared"), RUNS=str(tmp_path / "runs"),
                                    KEEP=str(keep), PILOT_EPOCHS="20", **env)
        assert result.returncode == 0, result.stderr
        return calls, json.loads((keep / "pilot" / "choice.json").read_text())

    # session 1 has time for SA-UNet only: trained on fold 0's training side, never on its held-out patients
    calls_1, choice = pilot(PILOT_ARCHS="sa_unet")
    assert len(calls_1) == 1 and "--arch sa_unet" in calls_1[0] and "--recipe paper" in calls_1[0]
    assert "--epochs 20" in calls_1[0] and "--val-fraction 0.2" in calls_1[0]
    trained_on = Path(calls_1[0].split("--data ")[1].split()[0])
    assert len(list((trained_on / "images").iterdir())) == 16  # 4 of 20 images (2 patients) held out
    # the curve reaches 0.8 at epoch 10; the 5-epoch mean is within 0.01 of its best from epoch 14
    assert choice["epochs"] == 14 and list(choice["runs"]) == [str(keep / "pilot" / "sa_unet")]
    assert not list(keep.rglob("*.safetensors"))  # curves and configs only
    # the archive is committed: the run's absolute path on this machine is made relative
    assert json.loads((keep / "pilot" / "sa_unet" / "config.json").read_text()) == {"data_dir": "runs/pilot/data_f0"}
    # session 2: runs/ is gone; SA-UNet is not trained again, U-Net is, and both curves choose
    shutil.rmtree(tmp_path / "runs")
    calls_2, choice = pilot(PILOT_ARCHS="sa_unet unet")
    assert len(calls_2) == 1 and "--arch unet" in calls_2[0]
    assert sorted(Path(r).name for r in choice["runs"]) == ["sa_unet", "unet"] and choice["epochs"] == 14


def test_against_compares_all_images_and_each_data_folder_on_the_images_both_hold(pool):
    from scipy.stats import wilcoxon

    wrist = {f"w{i}": 0.5 + 0.04 * i for i in range(8)}
    usgra = {f"u{i}": 0.3 + 0.05 * i for i in range(7)}
    mine = {s: {"stem": s, "dice": f"{d:.4f}", "source": "mn-wrist" if s[0] == "w" else "usgra-seg"}
            for s, d in {**wrist, **usgra}.items()}
    # the other arm: better on the wrist by a varying margin, worse on usgra; it also holds an image mine lacks
    other_dice = {**{s: d + 0.01 * (i + 1) for i, (s, d) in enumerate(wrist.items())},
                  **{s: d - 0.02 * (i + 1) for i, (s, d) in enumerate(usgra.items())}, "x9": 0.9}
    other = {s: {"stem": s, "dice": f"{d:.4f}"} for s, d in other_dice.items()}
    got = pool.compare_against(mine, other)
    assert [(c["source"], c["n"]) for c in got] == [(None, 15), ("mn-wrist", 8), ("usgra-seg", 7)]
    for c, stems in zip(got, (sorted(mine), sorted(wrist), sorted(usgra)), strict=True):
        a = np.array([round(({**wrist, **usgra})[s], 4) for s in stems])
        b = np.array([round(other_dice[s], 4) for s in stems])
        assert c["p"] == pytest.approx(wilcoxon(a, b).pvalue)
        assert c["mean"] == pytest.approx(a.mean()) and c["other_mean"] == pytest.approx(b.mean())
    assert got[1]["median_difference"] < 0 < got[2]["median_difference"]  # mine loses on the wrist, wins on usgra
    # one data folder: only the line over all images
    assert [c["source"] for c in pool.compare_against({s: mine[s] for s in wrist}, other)] == [None]


FAKE_TRAIN_EVALUATE = r"""#!/usr/bin/env bash
# a stand-in nerveseg: records each call; train and ensemble write config.json, evaluate its metrics.json
echo "$*" >> "$CALLS"
command=$1
while [ $# -gt 0 ]; do case "$1" in --out) out=$2;; esac; shift; done
mkdir -p "$out"
case "$command" in train|ensemble) echo "{}" > "$out/config.json";; *) echo "{}" > "$out/metrics.json";; esac
"""


def test_wrist_levers_train_their_flags_score_with_tta_when_asked_and_skip_what_is_finished(tmp_path):

    def screen(**env):
        result, calls = _run_driver(tmp_path, FAKE_TRAIN_EVALUATE, [str(STUDIES / "wrist_study.sh"), "screen"],
                                    SHARED="/data", RUNS=str(tmp_path / "runs"), **env)
        assert result.returncode == 0, result.stderr
        return calls

    made = screen(ARMS="effunet_both_384 effunet_both_45", FOLDS="0", EVAL_TTA="1")
    trains = [c for c in made if c.startswith("train")]
    assert len(trains) == 2 and all("--data /data/mn-wrist --data /data/usgra-seg" in c for c in trains)
    assert "--size 384" in trains[0] and "--epochs 30" in trains[0] and "--fold 0" in trains[0]
    assert "--epochs 45" in trains[1] and "--size" not in trains[1]
    evaluations = [c for c in made if c.startswith("evaluate")]
    assert len(evaluations) == 4 and sum("--tta" in c for c in evaluations) == 2
    assert all("--subset val" in c for c in evaluations)
    # a second call: every run is finished and scored, nothing is trained or scored again
    assert screen(ARMS="effunet_both_384 effunet_both_45", FOLDS="0", EVAL_TTA="1") == []
    # without EVAL_TTA the flip evaluation is not made
    assert not [c for c in screen(ARMS="effunet_both_384", FOLDS="1") if "--tta" in c]


def test_one_folder_arms_train_and_are_scored_on_their_folder_alone(tmp_path):
    result, calls = _run_driver(tmp_path, FAKE_TRAIN_EVALUATE, [str(STUDIES / "wrist_study.sh"), "screen"],
                                SHARED="/data", RUNS=str(tmp_path / "runs"), ARMS="effunet_wrist effunet_both", FOLDS="3")
    assert result.returncode == 0, result.stderr
    (wrist_train, wrist_eval, both_train, both_eval) = calls
    for call in (wrist_train, wrist_eval):
        assert "--data /data/mn-wrist" in call and "usgra-seg" not in call
    assert wrist_train.startswith("train") and "--folds 5 --fold 3" in wrist_train
    assert wrist_eval.startswith(f"evaluate --model {tmp_path}/runs/screen/effunet_wrist_f3 ") and "--subset val" in wrist_eval
    for call in (both_train, both_eval):
        assert "--data /data/mn-wrist --data /data/usgra-seg" in call
    result, calls = _run_driver(tmp_path, FAKE_TRAIN_EVALUATE, [str(STUDIES / "wrist_study.sh"), "screen"],
                                SHARED="/data", RUNS=str(tmp_path / "runs"), ARMS="effunet_usgra", FOLDS="3")
    assert result.returncode == 0, result.stderr
    assert len(calls) == 2 and all("--data /data/usgra-seg" in c and "mn-wrist" not in c for c in calls)


def test_routed_final_trains_one_model_per_folder_fits_the_router_and_assembles_them_once(tmp_path):
    fake_python = tmp_path / "fake_python"
    fake_python.write_text('#!/usr/bin/env bash\necho "python $*" >> "$CALLS"\n'
                           'while [ $# -gt 0 ]; do case "$1" in --out) out=$2;; esac; shift; done\n'
                           'mkdir -p "$out"; echo "{}" > "$out/router.json"\n')
    fake_python.chmod(0o755)

    def phase():
        result, calls = _run_driver(tmp_path, FAKE_TRAIN_EVALUATE, [str(STUDIES / "wrist_study.sh"), "final_routed"],
                                    SHARED="/data", RUNS=str(tmp_path / "runs"), PYTHON=str(fake_python))
        assert result.returncode == 0, result.stderr
        return calls

    final = tmp_path / "runs" / "final"
    wrist, usgra, router, ensemble = phase()
    assert wrist.startswith("train ") and f"--out {final}/effunet_wrist " in wrist
    assert "--data /data/mn-wrist --arch efficientnet_unet --epochs 30 --val-fraction 0" in wrist and "usgra" not in wrist
    assert f"--out {final}/effunet_usgra " in usgra and "--data /data/usgra-seg --arch" in usgra and "mn-wrist" not in usgra
    assert router.startswith("python ") and router.endswith(
        f"anatomy_router.py --route wrist /data/mn-wrist --route nerves /data/usgra-seg --out {final}/router")
    assert ensemble == (f"ensemble {final}/effunet_wrist {final}/effunet_usgra --names wrist,nerves "
                        f"--route-by {final}/router --out {final}/routed")
    assert phase() == []  # everything made: nothing is trained, fitted or assembled again
    result, calls = _run_driver(tmp_path, FAKE_TRAIN_EVALUATE, [str(STUDIES / "wrist_study.sh"), "ship"],
                                SHARED="/data", RUNS=str(tmp_path / "runs"), PYTHON=str(fake_python),
                                SHIP_RUN=f"{final}/routed", MEMBER_THRESHOLDS="wrist=0.75 nerves=0.5")
    assert result.returncode == 0, result.stderr
    (ship,) = calls
    assert f"ship_default_model.py {final}/routed --name nerveseg_nerves" in ship
    assert ship.endswith("--member-threshold wrist=0.75 --member-threshold nerves=0.5")


def test_wrist_seed_pair_trains_a_second_seed_on_the_same_split_and_scores_the_pair_on_its_fold(tmp_path):
    def phase(name, **env):
        result, calls = _run_driver(tmp_path, FAKE_TRAIN_EVALUATE, [str(STUDIES / "wrist_study.sh"), name],
                                    SHARED="/data", RUNS=str(tmp_path / "runs"), **env)
        assert result.returncode == 0, result.stderr
        return calls

    trains = [c for c in phase("screen", ARMS="effunet_both effunet_both_t1", FOLDS="2") if c.startswith("train")]
    assert len(trains) == 2
    # the same split (--seed untouched, same fold), another training seed for the second member only
    assert all("--folds 5 --fold 2" in c and "--seed" not in c.replace("--train-seed", "") for c in trains)
    assert "--train-seed" not in trains[0] and "--train-seed 1" in trains[1]
    screen_dir = tmp_path / "runs" / "screen"
    ensemble, evaluation = phase("pair", FOLDS="2")
    assert ensemble == (f"ensemble --out {screen_dir}/effunet_pair_f2 --names s0,s1 "
                        f"{screen_dir}/effunet_both_f2 {screen_dir}/effunet_both_t1_f2")
    # scored on the images neither member trained on: the fold's held-out images
    assert evaluation.startswith(f"evaluate --model {screen_dir}/effunet_pair_f2 --data /data/mn-wrist "
                                 "--data /data/usgra-seg --subset unseen")
    assert phase("pair", FOLDS="2") == []  # built and scored: nothing is made again


def test_wrist_larger_encoder_arms_pass_their_encoder_as_one_json_argument(tmp_path):
    # a stand-in that records its arguments one per line, to see how the shell split them
    fake = FAKE_TRAIN_EVALUATE.replace('echo "$*" >> "$CALLS"', 'printf "%s\\n" "$@" >> "$CALLS"; echo --- >> "$CALLS"')
    result, lines = _run_driver(tmp_path, fake, [str(STUDIES / "wrist_study.sh"), "screen"], SHARED="/data",
                                RUNS=str(tmp_path / "runs"), ARMS="effunet_lite1_both effunet_lite2_both", FOLDS="0")
    assert result.returncode == 0, result.stderr
    for variant in ("lite1", "lite2"):
        i = lines.index(f"{tmp_path}/runs/screen/effunet_{variant}_both_f0")
        call = lines[max(j for j in range(i) if lines[j] == "train"):]  # the train call that writes that run
        call = call[:call.index("---")]
        assert call[call.index("--model-kwargs") + 1] == '{"encoder":"%s"}' % variant
        assert json.loads(call[call.index("--model-kwargs") + 1]) == {"encoder": variant}


def _write_rows(path: Path, rows: list[tuple[str, float, int, int, str]]) -> Path:
    """A per_image.csv of (stem, dice, area_pred_px, area_truth_px, source) rows (a miss where Dice is 0)."""
    path.mkdir(parents=True, exist_ok=True)
    lines = ["stem,dice,hd95,zero_overlap,area_pred_px,area_truth_px,source"]
    lines += [f"{s},{d},1.0,{int(d == 0)},{p},{t},{src}" for s, d, p, t, src in rows]
    (path / "per_image.csv").write_text("\n".join(lines) + "\n")
    return path


def test_repeated_cv_means_over_repeats_by_hand(tmp_path):
    repeated = _script("repeated_cv")
    # repeat a: two fold folders; repeat b: one pooled folder with the same four images
    a0 = _write_rows(tmp_path / "a0", [("w1", 0.9, 110, 100, "wrist"), ("u1", 0.5, 50, 100, "usgra")])
    a1 = _write_rows(tmp_path / "a1", [("w2", 0.7, 90, 100, "wrist"), ("u2", 0.0, 0, 100, "usgra")])
    b = _write_rows(tmp_path / "b", [("w1", 0.8, 120, 100, "wrist"), ("w2", 0.9, 100, 100, "wrist"),
                                     ("u1", 0.6, 100, 100, "usgra"), ("u2", 0.2, 150, 100, "usgra")])
    out = repeated.main(["--repeat", "a", str(a0), str(a1), "--repeat", "b", str(b), "--json", str(tmp_path / "r.json")])
    wrist = out["wrist"]
    assert wrist["repeats"]["a"]["dice_mean"] == pytest.approx(0.8)
    assert wrist["repeats"]["b"]["dice_mean"] == pytest.approx(0.85)
    assert wrist["over_repeats"]["dice_mean"]["mean"] == pytest.approx(0.825)
    assert wrist["over_repeats"]["dice_mean"]["sd"] == pytest.approx(np.std([0.8, 0.85], ddof=1))
    # median absolute area error: a = median(10%, 10%) = 10%, b = median(20%, 0%) = 10%
    assert wrist["repeats"]["a"]["median_ape_percent"] == pytest.approx(10.0)
    assert wrist["repeats"]["b"]["median_ape_percent"] == pytest.approx(10.0)
    usgra = out["usgra"]
    assert usgra["repeats"]["a"]["zero_overlap"] == 1 and usgra["repeats"]["b"]["zero_overlap"] == 0
    assert usgra["over_repeats"]["zero_overlap"]["mean"] == pytest.approx(0.5)
    assert out["all"]["n"] == 4 and out["all"]["over_repeats"]["dice_mean"]["mean"] == pytest.approx((0.525 + 0.625) / 2)
    assert out["wrist"]["against_first"]["b"]["mean_difference"] == pytest.approx(0.05)
    assert json.loads((tmp_path / "r.json").read_text())["by_source"]["wrist"]["n"] == 2


def test_repeated_cv_refuses_repeats_over_other_images_or_an_image_twice(tmp_path):
    repeated = _script("repeated_cv")
    a = _write_rows(tmp_path / "a", [("w1", 0.9, 110, 100, "wrist"), ("w2", 0.7, 90, 100, "wrist")])
    b = _write_rows(tmp_path / "b", [("w1", 0.8, 120, 100, "wrist")])
    with pytest.raises(SystemExit, match="same images"):
        repeated.main(["--repeat", "a", str(a), "--repeat", "b", str(b)])
    with pytest.raises(SystemExit, match="already in this repeat"):
        repeated.main(["--repeat", "a", str(a), str(a)])


def test_studies_read_the_samples_of_several_data_folders_and_refuse_a_stem_in_two(tmp_path):
    from conftest import write_ellipse_dataset

    common = _script("common")
    a = write_ellipse_dataset(tmp_path / "a", 3)
    b = write_ellipse_dataset(tmp_path / "b", 2, seed=1)
    for path in sorted((b / "images").iterdir()) + sorted((b / "masks").iterdir()):
        path.rename(path.with_name("b" + path.name))
    by_stem = common.samples_by_stem([a, b])
    assert sorted(by_stem) == ["000", "001", "002", "b000", "b001"]
    assert by_stem["b001"].image_path.parent.parent == b
    assert sorted(common.samples_by_stem(a)) == ["000", "001", "002"]
    args = common.fold_runs_parser("doc").parse_args(["run", "--data", str(a), "--data", str(b)])
    assert args.data == [a, b]
    with pytest.raises(SystemExit, match="also in another --data folder"):
        common.samples_by_stem([a, write_ellipse_dataset(tmp_path / "c", 1)])


def test_model_card_of_an_all_data_model_gives_each_data_folder_and_its_split(tmp_path):
    from nerveseg.config import RunConfig

    ship = _script("ship_default_model")
    part = {"dice": {"mean": 0.9, "sd": 0.05}, "zero_overlap_rate": 0.0, "n_images": 190}
    metrics = {"n_images": 394, "dice": {"mean": 0.8, "sd": 0.2}, "zero_overlap_rate": 0.03,
               "by_source": {"mn-wrist": part, "usgra-seg": {**part, "n_images": 204, "zero_overlap_rate": 0.059}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    card = ship.model_card(tmp_path / "metrics.json", RunConfig(), cv_folds=5)
    assert "these weights saw every image" in card["validation"]
    assert "by patient where it names them" in card["validation"] and "split by image" not in card["validation"]
    assert "mn-wrist: nerve Dice 0.900 ± 0.050 (190 images), 0.0% complete misses" in card["validation"]
    assert "usgra-seg: nerve Dice 0.900 ± 0.050 (204 images), 5.9% complete misses" in card["validation"]
