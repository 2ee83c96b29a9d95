"""End to end through the command line: models, train -> evaluate -> segment, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerveseg.cli import main

SMALL_TRAIN = ["--size", "64", "--epochs", "2", "--quiet", "--label", "1"]


def test_models_json_lists_the_architectures(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert 440_000 <= rows["sa_unet"]["params"] <= 520_000
    assert rows["unet"]["params"] > 10 * rows["sa_unet"]["params"]
    assert rows["sa_unet"]["gflops_512"] > 0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from conftest import write_ellipse_dataset

    root = tmp_path_factory.mktemp("cli")
    data = write_ellipse_dataset(root / "data", 10)
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *SMALL_TRAIN]) == 0
    return data, run


def test_train_writes_run_folder(trained_run, capsys):
    data, run = trained_run
    for name in ("model.safetensors", "config.json", "history.csv", "last.safetensors"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["arch"] == "sa_unet" and config["preprocess"]["size"] == 64
    assert config["data"]["label"] == 1 and config["train"]["lr"] == 5e-4 and config["train"]["batch_size"] == 4
    assert config["train"]["augment"] == ["shear"]
    with open(run / "history.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    # a second train into the same folder refuses instead of overwriting
    assert main(["train", "--data", str(data), "--out", str(run), *SMALL_TRAIN]) == 2
    assert "--resume" in capsys.readouterr().err
    # resume with more epochs continues
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", "--epochs", "3", "--quiet"]) == 0
    with open(run / "history.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_evaluate_writes_every_file(trained_run, tmp_path, capsys):
    data, run = trained_run
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run), "--data", str(data), "--subset", "val", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("precision", "recall", "dice", "hd", "hd95", "auc"):
        assert set(metrics[key]) >= {"mean", "sd"}, key
    config = json.loads((run / "config.json").read_text())
    assert metrics["n_images"] == len(config["val_stems"]) == 2
    assert 0 <= metrics["zero_overlap_rate"] <= 1
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["stem"] for r in rows) == sorted(config["val_stems"])
    assert Image.open(out / "roc.png").size[0] > 100
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == sorted(f"{s}.png" for s in config["val_stems"])
    assert "dice" in capsys.readouterr().out


def test_segment_writes_masks_overlays_measurements_and_survives_bad_files(trained_run, tmp_path, capsys):
    data, run = trained_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = Image.open(data / "images" / "000.png")
    good.save(inputs / "a.png")
    good.convert("RGB").save(inputs / "b.jpg")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "seg"
    # 1: every input was tried and one (broken.png) could not be segmented
    assert main(["segment", str(inputs), "--model", str(run), "--out", str(out), "--mm-per-pixel", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err
    with open(out / "measurements.csv", newline="") as f:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(f)}
    assert set(rows) == {"a.png", "b.jpg"}
    for stem in ("a", "b"):
        mask = np.array(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == (60, 76) and set(np.unique(mask)) <= {0, 255}
        assert Image.open(out / f"{stem}_overlay.png").size == (76, 60)
        row = rows[f"{stem}.{'png' if stem == 'a' else 'jpg'}"]
        assert int(row["area_px"]) == int((mask > 0).sum())
        assert float(row["area_mm2"]) == pytest.approx(int(row["area_px"]) * 0.01, abs=1e-3)


def test_segment_without_scale_leaves_mm_empty(trained_run, tmp_path):
    data, run = trained_run
    out = tmp_path / "seg"
    assert main(["segment", str(data / "images" / "001.png"), "--model", str(run), "--out", str(out)]) == 0
    with open(out / "measurements.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["area_mm2"] == ""


def test_bad_model_folder_is_a_clear_error(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(img)
    assert main(["segment", str(img), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "config.json" in err


def test_training_reports_bad_pairs_and_goes_on(tmp_path, capsys):
    from conftest import write_ellipse_dataset

    data = write_ellipse_dataset(tmp_path / "data", 8)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / "masks" / "001.png")  # wrong size
    Image.fromarray(np.zeros((60, 76), np.uint8)).save(data / "masks" / "002.png")  # no nerve
    (data / "images" / "003.png").write_bytes(b"garbage")  # corrupt image
    (data / "masks" / "004.png").unlink()  # missing mask
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--size", "32", "--label", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    for stem in ("001", "002", "003", "004"):
        assert f"{stem}.png" in err, stem
    config = json.loads((run / "config.json").read_text())
    assert not {"001", "002", "003", "004"} & set(config["train_stems"] + config["val_stems"])


def test_invalid_options_are_refused(tmp_path, capsys, ellipse_dataset):
    assert main(["train", "--data", str(ellipse_dataset), "--out", str(tmp_path / "r"), "--arch", "nonet", "--epochs", "1"]) == 2
    assert "sa_unet" in capsys.readouterr().err
    assert main(["train", "--data", str(ellipse_dataset), "--out", str(tmp_path / "r"), "--folds", "5", "--epochs", "1"]) == 2
    assert "--fold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["segment", "x.png", "--model", "m", "--out", "o", "--mm-per-pixel", "-1"])


def test_export_and_onnx_backend_agree_with_torch(trained_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx backend needs onnxruntime")
    data, run = trained_run
    out_onnx = tmp_path / "m.onnx"
    assert main(["export", "--model", str(run), "--format", "onnx", "--opset", "17", "--out", str(out_onnx)]) == 0
    import onnx

    assert onnx.load(str(out_onnx)).graph.input[0].name == "image"
    masks = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        assert main(["segment", str(data / "images"), "--model", str(run), "--out", str(out), "--backend", backend]) == 0
        masks[backend] = [np.array(Image.open(p)) for p in sorted(out.glob("*_mask.png"))]
    assert len(masks["torch"]) == 10
    for a, b in zip(masks["torch"], masks["onnx"]):
        assert (a != b).mean() < 1e-3  # probabilities agree to ~1e-5; a pixel at exactly 0.5 may flip


def test_evaluate_scores_masks_from_another_tool(tmp_path, capsys):
    """`evaluate --predictions`: nnU-Net-style label PNGs scored against the expert masks."""
    from conftest import write_ellipse_dataset

    data = write_ellipse_dataset(tmp_path / "data", 5)
    # a stem nnU-Net would rename: export_nnunet writes case "scan_1" for stem "scan 1"
    (data / "images" / "004.png").rename(data / "images" / "scan 1.png")
    (data / "masks" / "004.png").rename(data / "masks" / "scan 1.png")
    truth = {stem: np.asarray(Image.open(data / "masks" / f"{stem}.png")) for stem in ("000", "001", "002", "scan 1")}
    preds = tmp_path / "preds"
    preds.mkdir()
    Image.fromarray(truth["000"]).save(preds / "000.png")  # perfect
    Image.fromarray(np.zeros_like(truth["001"])).save(preds / "001.png")  # missed entirely
    shifted = np.roll(truth["002"], 3, axis=1)
    Image.fromarray(shifted).save(preds / "002.png")
    Image.fromarray(truth["scan 1"]).save(preds / "scan_1.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(preds / "003.png")  # wrong size: reported, skipped
    out = tmp_path / "eval"
    assert main(["evaluate", "--predictions", str(preds), "--data", str(data), "--label", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "003.png" in err  # the bad prediction is named
    with open(out / "per_image.csv", newline="") as f:
        rows = {r["stem"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["000", "001", "002", "scan 1"]
    a, b = truth["002"].astype(bool), shifted.astype(bool)
    assert float(rows["002"]["dice"]) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-6)
    assert float(rows["000"]["dice"]) == 1.0 and float(rows["scan 1"]["dice"]) == 1.0
    assert rows["001"]["zero_overlap"] == "1" and float(rows["001"]["dice"]) == 0.0
    assert rows["000"]["auc"] == "nan"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 4 and metrics["zero_overlap_rate"] == pytest.approx(0.25)
    assert metrics["dice"]["mean"] == pytest.approx((2 + float(rows["002"]["dice"])) / 4, abs=1e-6)

    # exactly one of --model / --predictions
    assert main(["evaluate", "--data", str(data), "--out", str(out)]) == 2
    assert "--predictions" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--predictions", str(empty), "--data", str(data), "--out", str(out)]) == 2
    assert "no prediction matched" in capsys.readouterr().err
