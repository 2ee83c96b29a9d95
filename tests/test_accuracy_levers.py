"""Issue 10's levers: recipes, multi-class (nerve + vessel), losses, deep supervision, augmentation
geometry, test-time augmentation, ensembles, fine-tuning and post-processing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nerveseg.cli.main import build_parser, main
from nerveseg.config import DataConfig, ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from nerveseg.data.augment import augment_batch
from nerveseg.data.preprocess import mirror_content, to_network_input
from nerveseg.errors import ConfigError, InputError
from nerveseg.inference.onnx_backend import OnnxPredictor, load_predictor
from nerveseg.inference.predictor import EnsemblePredictor, Predictor, keep_largest_region
from nerveseg.models import create
from nerveseg.training import train
from nerveseg.training.checkpoint import save_weights, transfer_weights
from nerveseg.training.losses import deep_supervision_weights, dice_ce_loss, soft_dice_loss, supervised_loss
from nerveseg.training.recipes import FINE_TUNE_LR, build_run_config, describe, list_recipes
from nerveseg.training.trainer import learning_rate, train_all_folds

SMALL = {"features": [8, 16, 32, 64, 128]}

# `nerveseg train --data D --label 1 --out O` before issue 10, field for field (from the release's config.py)
PAPER_CONFIG_BEFORE = {
    "model": {"arch": "sa_unet", "kwargs": {}}, "preprocess": {"size": 256},
    "data": {"data_dir": "D", "label": 1, "seed": 0, "val_fraction": 0.2, "folds": None, "fold": None,
             "max_train_images": None},
    "train": {"epochs": 30, "batch_size": 4, "lr": 0.0005, "weight_decay": 0.0, "schedule": "constant",
              "warmup_epochs": 0, "augment": ["shear"], "shear_degrees": 15.0, "amp": True, "channels_last": True,
              "num_threads": None, "device": "auto"},
    "train_stems": [], "val_stems": [], "nerveseg_version": "",
}
NEW_FIELDS_OFF = {
    "model": {"encoder_weights": None},  # issue 22
    "data": {"labels": None, "label_names": None, "fold_val_fraction": None},  # issue 23
    "train": {"loss": "dice", "deep_supervision": False, "checkpoint": "best", "init_from": None, "seed": None,
              "data_cache": "memory", "loader_workers": 2, "sync_batchnorm": False,  # issue 13
              "compile": None, "optimizer": "adam", "ema_decay": None},
}


def _cli_config(argv):
    from nerveseg.cli.train_commands import _train_config

    return _train_config(build_parser().parse_args(["train", *argv]))


# ------------------------------------------------------------------------------------------------
# recipes


def test_recipe_paper_reproduces_the_config_of_before(tmp_path):
    for argv in (["--data", "D", "--label", "1", "--out", "O"], ["--recipe", "paper", "--data", "D", "--label", "1", "--out", "O"]):
        d = _cli_config(argv).to_dict()
        d["data"]["data_dir"] = "D"
        for section, fields in NEW_FIELDS_OFF.items():
            for key, value in fields.items():
                assert d[section].pop(key) == value, (section, key)
        assert d.pop("members") == [] and d.pop("inference") == {"tta": False, "keep_largest": [], "threshold": 0.5,
                                                           "low_confidence": 0.7}
        assert d.pop("recipe") == "paper"
        assert d.pop("test_stems") == []  # issue 23: filled only under data.fold_val_fraction
        assert d.pop("router") == ""  # issue 22: set only in a routed model's folder
        assert d == PAPER_CONFIG_BEFORE


def test_recipes_are_listed_in_full_and_flags_win(capsys):
    assert list_recipes() == ["paper", "nerveseg", "nerveseg_128_vessels"]
    assert main(["recipes"]) == 0
    printed = capsys.readouterr().out
    for name in ("recipe paper", "recipe nerveseg", "recipe nerveseg_128_vessels", "train.loss = dice_ce",
                 "train.schedule = poly", "data.labels = [1, 2]"):
        assert name in printed
    assert "train.augment" in describe("paper")
    config = _cli_config(["--recipe", "nerveseg", "--data", "D", "--out", "O", "--epochs", "7", "--arch", "unet", "--labels", "1"])
    assert config.train.epochs == 7 and config.model.arch == "unet" and config.data.labels == (1,)
    assert config.train.loss == "dice_ce" and config.recipe == "nerveseg"
    assert config.train.seed is None and config.data.seed == 0
    config = _cli_config(["--recipe", "nerveseg", "--data", "D", "--out", "O", "--seed", "2", "--train-seed", "3"])
    assert (config.data.seed, config.train.seed) == (2, 3)
    with pytest.raises(ConfigError, match="unknown recipe"):
        build_run_config("fast")


def test_recipe_nerveseg_is_the_study_winner_and_gives_way_to_class_flags():
    # the configuration that was cross-validated and shipped (docs/benchmarks.md, "Accuracy study")
    config = _cli_config(["--recipe", "nerveseg", "--data", "D", "--out", "O"])
    assert (config.preprocess.size, config.data.label, config.data.labels) == (256, 1, None)
    assert config.train.augment == ("shear", "hflip", "gamma", "contrast")
    assert (config.train.loss, config.train.schedule, config.train.checkpoint, config.train.epochs) == ("dice_ce", "poly", "last", 60)
    # asking for several classes replaces the recipe's single label instead of contradicting it
    multi = _cli_config(["--recipe", "nerveseg", "--data", "D", "--out", "O", "--labels", "1,2"])
    assert multi.data.class_labels == (1, 2) and multi.data.class_names == ("nerve", "class2")
    old = _cli_config(["--recipe", "nerveseg_128_vessels", "--data", "D", "--out", "O"])
    assert old.preprocess.size == 128 and old.data.labels == (1, 2) and old.data.label_names == ("nerve", "vessel")


def test_label_options_are_validated():
    with pytest.raises(ConfigError, match="distinct"):
        DataConfig(labels=(1, 1))
    with pytest.raises(ConfigError, match="one distinct name per label"):
        DataConfig(labels=(1, 2), label_names=("nerve",))
    with pytest.raises(ConfigError, match="disagree"):
        DataConfig(label=2, labels=(1, 2))
    with pytest.raises(ConfigError, match="letters"):
        DataConfig(labels=(1, 2), label_names=("nerve", "../x"))
    assert DataConfig(labels=(1, 2)).class_names == ("nerve", "class2")
    assert DataConfig(label=1).class_names == ("nerve",)


def test_poly_schedule_hand_computed():
    poly = TrainConfig(epochs=10, lr=1e-3, schedule="poly")
    assert learning_rate(poly, 0, 0, 5) == pytest.approx(1e-3)
    assert learning_rate(poly, 5, 0, 5) == pytest.approx(1e-3 * 0.5**0.9)
    assert learning_rate(poly, 10, 0, 5) == 0.0


# ------------------------------------------------------------------------------------------------
# losses and deep supervision


def test_multiclass_soft_dice_matches_monai_per_channel():
    monai_losses = pytest.importorskip("monai.losses")
    torch.manual_seed(1)
    logits = torch.randn(3, 2, 15, 19)
    target = (torch.rand(3, 2, 15, 19) > 0.6).float()
    target[1, 1] = 0  # a frame without a vessel
    ref = monai_losses.DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, batch=False)(logits, target)
    torch.testing.assert_close(soft_dice_loss(logits, target), ref)
    # MONAI's DiceCELoss uses a softmax cross-entropy for several channels; ours is one sigmoid per
    # class, so its pixel term is the binary cross-entropy, written out here
    p = torch.sigmoid(logits)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    torch.testing.assert_close(dice_ce_loss(logits, target), ref + bce)


def test_deep_supervision_shapes_and_weights():
    assert deep_supervision_weights(4) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    for arch in ("sa_unet", "unet"):
        model = create(arch, out_channels=2, deep_supervision=True, **SMALL).train()
        main_out, aux = model(torch.randn(2, 1, 64, 48))
        assert main_out.shape == (2, 2, 64, 48)
        assert [a.shape[-2:] for a in aux] == [(32, 24), (16, 12), (8, 6)]
        main_out, aux = model(torch.randn(1, 1, 50, 37))  # padded inside, cropped back
        assert main_out.shape[-2:] == (50, 37) and [a.shape[-2:] for a in aux] == [(25, 19), (13, 10), (7, 5)]
        model.eval()
        assert model(torch.randn(1, 1, 64, 48)).shape == (1, 2, 64, 48)  # inference sees the plain network
        # the auxiliary heads are the only extra parameters
        plain = create(arch, out_channels=2, **SMALL)
        extra = {k for k in model.state_dict()} - {k for k in plain.state_dict()}
        assert extra and all(k.startswith("aux_heads.") for k in extra)
    target = (torch.rand(2, 2, 64, 48) > 0.5).float()
    model.train()
    output = model(torch.randn(2, 1, 64, 48))
    loss = supervised_loss("dice", output, target)
    loss.backward()
    assert all(h.weight.grad is not None for h in model.aux_heads)


# ------------------------------------------------------------------------------------------------
# augmentation geometry: image and masks move together


def _blocks(b=4, size=48, channels=2):
    """Images that ARE their masks (a bright rectangle per class), so any misalignment shows."""
    masks = torch.zeros(b, channels, size, size)
    masks[:, 0, 10:30, 8:20] = 1
    masks[:, 1, 28:40, 26:44] = 1
    images = masks[:, :1].clone()
    return images, masks


@pytest.mark.parametrize("aug", ["shear", "scale", "rotate", "elastic", "hflip", "vflip"])
def test_geometric_augmentation_moves_image_and_masks_together(aug):
    images, masks = _blocks()
    moved_any = False
    for seed in range(6):
        out_img, out_mask = augment_batch(images, masks, (aug,), generator=torch.Generator().manual_seed(seed))
        assert out_mask.shape == masks.shape and set(out_mask.unique().tolist()) <= {0.0, 1.0}
        # the image was the nerve mask: resampled by the same grid it must still be the nerve mask
        agree = ((out_img[:, 0] >= 0.5) == (out_mask[:, 0] >= 0.5)).float().mean()
        assert agree > 0.995, (aug, seed, float(agree))
        moved_any |= bool((out_mask != masks).any())
    assert moved_any, f"{aug} never changed anything"


@pytest.mark.parametrize("aug", ["gamma", "contrast", "brightness", "noise", "blur", "lowres", "speckle"])
def test_intensity_augmentation_leaves_masks_and_range(aug):
    torch.manual_seed(0)
    images = torch.rand(8, 1, 32, 32)
    masks = (torch.rand(8, 2, 32, 32) > 0.5).float()
    out_img, out_mask = augment_batch(images, masks, (aug,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(out_mask, masks)
    assert out_img.shape == images.shape and out_img.min() >= 0 and out_img.max() <= 1
    assert not torch.equal(out_img, images)


def test_augmentations_draw_nothing_when_off():
    """The paper's shear consumes exactly the random numbers it did before the new transforms
    existed (two uniforms per sample), so the paper recipe's batches are unchanged."""
    images, masks = _blocks()
    used = torch.Generator().manual_seed(5)
    augment_batch(images, masks, ("shear",), generator=used)
    expected = torch.Generator().manual_seed(5)
    torch.rand(4, generator=expected)
    torch.rand(4, generator=expected)
    assert torch.equal(torch.rand(3, generator=used), torch.rand(3, generator=expected))
    out = augment_batch(images, masks, (), generator=torch.Generator().manual_seed(5))
    assert torch.equal(out[0], images) and torch.equal(out[1], masks)


# ------------------------------------------------------------------------------------------------
# prediction: TTA, ensembles, post-processing


class _Asymmetric(torch.nn.Module):
    """A network whose output depends on position and content (so a wrong flip shows): two classes."""

    def __init__(self, bias: float = 0.0):
        super().__init__()
        torch.manual_seed(0)  # every instance the same function, up to ``bias``
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.bias = bias

    def forward(self, x):
        ramp = torch.linspace(-1, 1, x.shape[-1])[None, None, None, :]
        return self.conv(x) + 2 * ramp + self.bias


def _config(**data):
    return RunConfig(preprocess=PreprocessConfig(size=32), data=DataConfig(labels=(1, 2), label_names=("nerve", "vessel"), **data))


def test_tta_is_the_mean_with_the_mirrored_prediction():
    image = np.random.default_rng(0).random((40, 27)).astype(np.float32)
    plain = Predictor(_Asymmetric(), _config(), device="cpu")
    tta = Predictor(_Asymmetric(), _config(), device="cpu", tta=True)
    expected = 0.5 * (plain.predict_classes(image) + plain.predict_classes(image[:, ::-1].copy())[:, :, ::-1])
    got = tta.predict_classes(image)
    assert got.shape == (2, 40, 27)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - plain.predict_classes(image)).max() > 1e-3  # the ramp makes TTA matter


def test_mirror_content_is_an_involution_that_keeps_padding():
    x, box = to_network_input(np.random.default_rng(1).random((20, 32)).astype(np.float32), 32)
    assert box.resized_shape == (20, 32)
    m = mirror_content(x, [box])
    assert torch.equal(mirror_content(m, [box]), x)
    assert torch.equal(m[..., 20:, :], x[..., 20:, :])  # the bottom padding stays put
    assert torch.equal(m[..., :20, :], x[..., :20, :].flip(-1))


def test_ensemble_averages_member_probabilities():
    image = np.random.default_rng(2).random((33, 41)).astype(np.float32)
    members = [Predictor(_Asymmetric(bias=b), _config(), device="cpu") for b in (-1.0, 0.5, 2.0)]
    ensemble = EnsemblePredictor(members, _config())
    expected = np.mean([m.predict_classes(image) for m in members], axis=0)
    np.testing.assert_allclose(ensemble.predict_classes(image), expected, atol=1e-6)
    np.testing.assert_allclose(ensemble.predict(image), expected[0], atol=1e-6)
    other = Predictor(_Asymmetric(), RunConfig(preprocess=PreprocessConfig(size=64), data=DataConfig(labels=(1, 2))), device="cpu")
    with pytest.raises(ConfigError, match="members differ"):
        EnsemblePredictor([members[0], other], _config())


def test_keep_largest_region_hand_computed():
    prob = np.zeros((10, 10), np.float32)
    prob[1:4, 1:4] = 0.9  # 9 px
    prob[6:9, 5:9] = 0.8  # 12 px: the largest
    prob[0, 9] = 0.3  # below threshold: untouched
    out = keep_largest_region(prob)
    assert (out[1:4, 1:4] == 0).all() and (out[6:9, 5:9] == 0.8).all() and out[0, 9] == pytest.approx(0.3)
    single = np.zeros((5, 5), np.float32)
    single[1:3, 1:3] = 0.7
    assert keep_largest_region(single) is single


# ------------------------------------------------------------------------------------------------
# multi-class training, evaluation against MONAI, fine-tuning, all folds


def write_two_class_dataset(root, n=8, h=40, w=52, seed=0):
    """Speckled frames with a bright 'nerve' ellipse (1) and a dark round 'vessel' (2) beside it;
    one frame without a vessel."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.25, 0.45) * w
        nerve = ((yy - cy) / 6) ** 2 + ((xx - cx) / 8) ** 2 <= 1
        vessel = ((yy - cy) ** 2 + (xx - cx - 18) ** 2 <= 25) if i != 3 else np.zeros_like(nerve)
        image = np.clip(0.35 + 0.06 * rng.standard_normal((h, w)) + 0.4 * nerve - 0.3 * vessel, 0, 1)
        mask = np.where(nerve, 1, np.where(vessel, 2, 0)).astype(np.uint8)
        Image.fromarray((image * 255).astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
    return root


def _two_class_run_config(data, **train):
    return RunConfig(
        model=ModelConfig("sa_unet", dict(SMALL)),
        preprocess=PreprocessConfig(size=32),
        data=DataConfig(str(data), labels=(1, 2), label_names=("nerve", "vessel"), seed=0, val_fraction=0.25),
        train=TrainConfig(**{"epochs": 2, "lr": 3e-3, "loss": "dice_ce", "deep_supervision": True, **train}),
    )


def test_multiclass_evaluation_matches_monai(tmp_path):
    monai_metrics = pytest.importorskip("monai.metrics")
    from nerveseg.data.io import read_image, read_mask
    from nerveseg.data.samples import discover_samples
    from nerveseg.evaluation.evaluate import evaluate_samples

    data = write_two_class_dataset(tmp_path / "data")
    predictor = Predictor(_Asymmetric(), _config(), device="cpu")
    samples, _ = discover_samples(data)
    rows, rocs, problems = evaluate_samples(predictor, samples, tmp_path / "eval", overlays=False, progress=False)
    assert not problems and set(rows) == {"nerve", "vessel"}
    for c, (name, label) in enumerate((("nerve", 1), ("vessel", 2))):
        for sample, row in zip(samples, rows[name]):
            image = read_image(sample.image_path)
            truth = read_mask(sample.mask_path, label=label)
            pred = predictor.predict_classes(image)[c] >= 0.5
            y_pred, y = torch.from_numpy(pred[None, None]).float(), torch.from_numpy(truth[None, None]).float()
            ref = monai_metrics.compute_dice(y_pred, y, include_background=True, ignore_empty=False).item()
            assert row["dice"] == pytest.approx(ref, abs=1e-6), (name, sample.stem)
            if pred.any() and truth.any():
                hd = monai_metrics.compute_hausdorff_distance(y_pred, y, include_background=True).item()
                assert row["hd"] == pytest.approx(hd, abs=1e-4)


@pytest.mark.slow
def test_two_class_training_evaluation_and_segmentation(tmp_path):
    from nerveseg.evaluation.evaluate import evaluate_run
    from nerveseg.inference.segment import segment_files

    data = write_two_class_dataset(tmp_path / "data")
    train(_two_class_run_config(data), tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["kwargs"]["out_channels"] == 2 and saved["model"]["kwargs"]["deep_supervision"]
    for backend in ("torch", "onnx"):
        predictor = load_predictor(tmp_path / "run", backend=backend)
        assert predictor.class_names == ["nerve", "vessel"]
        assert predictor.predict_classes(np.zeros((40, 52), np.float32)).shape == (2, 40, 52)
    summary = evaluate_run(tmp_path / "run", data, tmp_path / "eval", subset="all", progress=False, overlays=False)
    assert set(summary["classes"]) == {"nerve", "vessel"}
    assert summary["dice"] == summary["classes"]["nerve"]["dice"] and summary["classes"]["vessel"]["label"] == 2
    assert (tmp_path / "eval" / "per_image_vessel.csv").is_file()
    result = segment_files([data / "images" / "000.png"], load_predictor(tmp_path / "run"), tmp_path / "seg", log=lambda m: None)
    assert not result.problems
    assert (tmp_path / "seg" / "000_mask.png").is_file() and (tmp_path / "seg" / "000_vessel_mask.png").is_file()
    with open(tmp_path / "seg" / "measurements.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:4] == ["file", "frame", "component", "area_px"]
    assert header[-3:] == ["vessel_area_px", "vessel_area_mm2", "vessel_components"]


def test_transfer_weights_keeps_what_fits(tmp_path):
    source = create("sa_unet", **SMALL)
    save_weights(source, tmp_path / "w.safetensors")
    same = create("sa_unet", **SMALL)
    assert transfer_weights(same, tmp_path / "w.safetensors") == []
    for k, v in source.state_dict().items():
        torch.testing.assert_close(same.state_dict()[k], v)
    two = create("sa_unet", out_channels=2, deep_supervision=True, **SMALL)
    fresh = transfer_weights(two, tmp_path / "w.safetensors")
    assert "head" in fresh and all(f == "head" or f.startswith("aux_heads") for f in fresh)
    key = next(iter(source.state_dict()))  # the first encoder convolution
    torch.testing.assert_close(two.state_dict()[key], source.state_dict()[key])
    with pytest.raises(InputError, match="same architecture"):
        transfer_weights(create("unet", **SMALL), tmp_path / "w.safetensors")


@pytest.mark.slow
def test_all_folds_ensemble_cv_and_fine_tuning(tmp_path, capsys):
    from nerveseg.evaluation.evaluate import evaluate_run

    data = write_two_class_dataset(tmp_path / "data", n=6)
    config = _two_class_run_config(data, epochs=1, checkpoint="last")
    config.data.val_fraction, config.data.folds, config.data.fold = None, 3, 0
    config.data.__post_init__()
    results = train_all_folds(config, tmp_path / "ens", progress=False, log=lambda m: None)
    assert len(results) == 3
    ens = RunConfig.load(tmp_path / "ens" / "config.json")
    assert ens.members == ["fold_0", "fold_1", "fold_2"] and len(ens.train_stems) == 6
    for loader in (lambda p: Predictor.from_run(p, device="cpu"), OnnxPredictor.from_run, load_predictor):
        predictor = loader(tmp_path / "ens")
        assert isinstance(predictor, EnsemblePredictor) and len(predictor.members) == 3
        assert predictor.predict(np.zeros((40, 52), np.float32)).shape == (40, 52)
    summary = evaluate_run(tmp_path / "ens", data, tmp_path / "cv", subset="cv", progress=False, overlays=False,
                           backend="torch")
    with open(tmp_path / "cv" / "per_image.csv", newline="") as f:
        stems = [r["stem"] for r in csv.DictReader(f)]
    assert sorted(stems) == [f"{i:03d}" for i in range(6)]  # every image once, by the member that never saw it
    assert summary["n_images"] == 6
    # fine-tuning from the ensemble: fold k starts from member k; the network comes from the source
    assert main(["train", "--data", str(data), "--init-from", str(tmp_path / "ens"), "--epochs", "1",
                 "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    ft = RunConfig.load(tmp_path / "ft" / "config.json")
    assert ft.preprocess.size == 32 and ft.model.kwargs["features"] == SMALL["features"]
    assert ft.data.labels == (1, 2) and ft.train.init_from == str(tmp_path / "ens")
    # a single-class source passes on its label (usgra-seg / workspace masks hold 1 nerve, 2 vessel)
    one = _cli_config(["--data", str(data), "--init-from", str(tmp_path / "ens" / "fold_0"), "--out", "O"])
    assert one.data.labels == (1, 2)
    # fine-tuning's own learning rate (the learning curve's best), unless --lr says otherwise
    assert one.train.lr == FINE_TUNE_LR == 5e-5 and ft.train.lr == 5e-5
    assert _cli_config(["--data", str(data), "--init-from", str(tmp_path / "ens" / "fold_0"), "--lr", "2e-4",
                        "--out", "O"]).train.lr == 2e-4
    assert _cli_config(["--data", str(data), "--out", "O"]).train.lr == 5e-4  # not fine-tuning: the recipe's
    single = RunConfig.load(tmp_path / "ens" / "fold_0" / "config.json")
    single.data.labels = single.data.label_names = None
    single.model.kwargs.pop("out_channels", None)
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "config.json").write_text(json.dumps(single.to_dict()))
    assert _cli_config(["--data", str(data), "--init-from", str(tmp_path / "single"), "--out", "O"]).data.label == 1
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--init-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "needs a run folder" in capsys.readouterr().err


def _single_run(path, arch, data, seed):
    """A trained-looking run folder: a small ``arch`` with seeded random weights, nerve only, 32 px."""
    torch.manual_seed(seed)
    config = RunConfig(model=ModelConfig(arch, dict(SMALL)), preprocess=PreprocessConfig(size=32),
                       data=DataConfig(str(data), label=1, folds=3, fold=0, seed=0))
    config.train_stems, config.val_stems = ["000", "001"], ["002"]
    path.mkdir(parents=True)
    save_weights(create(arch, **SMALL).eval(), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    return path


def test_mixed_architecture_ensemble_averages_its_members_on_every_backend(tmp_path, capsys):
    # `nerveseg ensemble`: SA-UNet + U-Net runs as one folder, loaded like one model by every predictor
    sa = _single_run(tmp_path / "sa" / "fold_0", "sa_unet", tmp_path, seed=1)
    un = _single_run(tmp_path / "un" / "fold_0", "unet", tmp_path, seed=2)
    assert main(["ensemble", str(sa), str(un), "--names", "sa_unet,unet", "--out", str(tmp_path / "pair")]) == 0
    pair = tmp_path / "pair"
    assert RunConfig.load(pair / "config.json").members == ["sa_unet", "unet"]
    assert sorted(p.name for p in pair.iterdir()) == ["config.json", "sa_unet", "unet"]  # no temporary left
    image = np.random.default_rng(3).random((37, 45)).astype(np.float32)
    alone = [Predictor.from_run(run, device="cpu").predict(image) for run in (sa, un)]
    assert np.abs(alone[0] - alone[1]).max() > 1e-3  # two different functions, so the mean is a real test
    for loader in (lambda p: Predictor.from_run(p, device="cpu"), OnnxPredictor.from_run, load_predictor):
        ensemble = loader(pair)
        assert isinstance(ensemble, EnsemblePredictor) and len(ensemble.members) == 2
        np.testing.assert_allclose(ensemble.predict(image), 0.5 * (alone[0] + alone[1]), atol=2e-4)
    capsys.readouterr()
    # what cannot be averaged, or would be lost, is refused before anything is written
    small = _single_run(tmp_path / "small", "unet", tmp_path, seed=3)
    config = RunConfig.load(small / "config.json")
    config.preprocess.size = 48
    (small / "config.json").write_text(json.dumps(config.to_dict()))
    for argv, message in [([str(sa), str(small)], "input size 48 vs 32"),
                          ([str(sa), str(un)], "must be distinct"),          # both folders are called fold_0
                          ([str(sa)], "at least two runs"),
                          ([str(sa), str(pair)], "is itself an ensemble"),
                          ([str(sa), str(tmp_path / "nowhere")], "is not a trained run")]:
        assert main(["ensemble", *argv, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["ensemble", str(sa), str(un), "--names", "a,b", "--out", str(pair)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_fold_pair_ensembles_refuses_folds_of_different_splits(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "fold_pair_ensembles", Path(__file__).resolve().parents[1] / "studies" / "fold_pair_ensembles.py")
    pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pairs)
    sa = _single_run(tmp_path / "sa" / "fold_0", "sa_unet", tmp_path, seed=1)
    other = _single_run(tmp_path / "un" / "fold_0", "unet", tmp_path, seed=2)
    config = RunConfig.load(other / "config.json")
    config.val_stems = ["001"]
    (other / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(ConfigError, match="hold out different images"):
        pairs.build_pair(sa, other, tmp_path / "pair")
    assert not (tmp_path / "pair").exists()


def test_model_threshold_is_validated_saved_and_used_by_segment_and_evaluate(tmp_path):
    from nerveseg.config import InferenceConfig
    from nerveseg.evaluation.evaluate import evaluate_run
    from nerveseg.inference.segment import SegmentOptions, segment_files, with_model_threshold

    for bad in (0, 1, 1.5, -0.1, "0.5", True, None):
        with pytest.raises(ConfigError, match="inference.threshold"):
            InferenceConfig(threshold=bad)
    run = _single_run(tmp_path / "run", "sa_unet", tmp_path, seed=4)
    image = (np.random.default_rng(5).random((40, 48)) * 255).astype(np.uint8)
    prob = Predictor.from_run(run, device="cpu").predict(image.astype(np.float32) / 255)
    cut = float(np.quantile(prob, 0.7))  # a cut that keeps about 30% of the pixels: neither 0.5's mask nor empty
    d = json.loads((run / "config.json").read_text())
    assert d["inference"]["threshold"] == 0.5  # written by default, read back the same
    d["inference"]["threshold"] = cut
    (run / "config.json").write_text(json.dumps(d))
    predictor = Predictor.from_run(run, device="cpu")
    assert with_model_threshold(SegmentOptions(), predictor).threshold == pytest.approx(cut)
    assert with_model_threshold(SegmentOptions(threshold=0.4), predictor).threshold == 0.4  # the user's wins
    # segment: the mask is prob >= the model's cut, computed here independently
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "a.png")
    segment_files([tmp_path / "a.png"], predictor, tmp_path / "seg", SegmentOptions(), log=lambda m: None)
    mask = np.asarray(Image.open(tmp_path / "seg" / "a_mask.png")) > 0
    expected = prob >= cut
    assert 0 < expected.sum() < expected.size and abs(int(mask.sum()) - int(expected.sum())) <= 0.01 * expected.size
    # evaluate: the model's cut unless --threshold is given
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for stem in ("000", "001", "002"):
        Image.fromarray(image).save(data / "images" / f"{stem}.png")
        Image.fromarray((expected * 1).astype(np.uint8)).save(data / "masks" / f"{stem}.png")
    summary = evaluate_run(run, data, tmp_path / "ev", subset="all", overlays=False, progress=False, backend="torch")
    assert summary["threshold"] == pytest.approx(cut) and summary["dice"]["mean"] > 0.98
    summary = evaluate_run(run, data, tmp_path / "ev2", subset="all", overlays=False, progress=False, backend="torch",
                           threshold=0.5)
    assert summary["threshold"] == 0.5 and summary["dice"]["mean"] < 0.98


def test_low_confidence_cut_comes_from_the_model_unless_given(tmp_path):
    """The low_confidence QC flag is set when the mean probability inside the mask is under the
    model's cut (config.json inference.low_confidence), or the user's; checked against the
    confidence segment itself reports, one cut either side of it."""
    import csv as _csv

    from nerveseg.config import InferenceConfig
    from nerveseg.inference.segment import SegmentOptions, segment_files

    for bad in (-0.1, 1.5, "0.7", True, None):
        with pytest.raises(ConfigError, match="inference.low_confidence"):
            InferenceConfig(low_confidence=bad)
    with pytest.raises(ConfigError, match="low_confidence"):
        SegmentOptions(low_confidence=2.0)
    run = _single_run(tmp_path / "run", "sa_unet", tmp_path, seed=4)
    image = (np.random.default_rng(5).random((40, 48)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    d = json.loads((run / "config.json").read_text())
    assert d["inference"]["low_confidence"] == 0.7  # written by default
    d["inference"]["threshold"] = float(np.quantile(Predictor.from_run(run, device="cpu").predict(
        image.astype(np.float32) / 255), 0.7))  # a non-empty mask, so there is a confidence to flag

    def row(cut_in_model, options=None, name="seg"):
        d["inference"]["low_confidence"] = cut_in_model
        (run / "config.json").write_text(json.dumps(d))
        segment_files([tmp_path / "a.png"], Predictor.from_run(run, device="cpu"), tmp_path / name, options or SegmentOptions(),
                      log=lambda m: None)
        with open(tmp_path / name / "measurements.csv", newline="") as f:
            return next(_csv.DictReader(f))

    confidence = float(row(0.0, name="probe")["confidence"])
    assert 0 < confidence < 1
    assert "low_confidence" in row(min(confidence + 0.01, 1.0), name="above")["qc_flags"]
    assert "low_confidence" not in row(max(confidence - 0.01, 0.0), name="below")["qc_flags"]
    # the user's cut wins over the model's
    assert "low_confidence" not in row(1.0, SegmentOptions(low_confidence=0.0), name="user")["qc_flags"]


def test_regularisation_flags_reach_the_config():
    config = _cli_config(["--recipe", "nerveseg", "--data", "D", "--out", "O", "--weight-decay", "1e-4",
                          "--optimizer", "adamw", "--ema", "0.99"])
    assert (config.train.weight_decay, config.train.optimizer, config.train.ema_decay) == (1e-4, "adamw", 0.99)
    plain = _cli_config(["--recipe", "nerveseg", "--data", "D", "--out", "O"])
    assert (plain.train.weight_decay, plain.train.optimizer, plain.train.ema_decay) == (0.0, "adam", None)
