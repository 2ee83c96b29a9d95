"""Training: the loss against MONAI, the schedule, augmentation, a real (short) fit, resume."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nerveseg.config import DataConfig, ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from nerveseg.data.augment import augment_batch
from nerveseg.errors import ConfigError
from nerveseg.training import soft_dice_loss, train
from nerveseg.training.trainer import learning_rate

SMALL = {"features": [8, 16, 32, 64, 128]}


def test_soft_dice_loss_matches_monai():
    monai_losses = pytest.importorskip("monai.losses")
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 17, 23)
    target = (torch.rand(3, 1, 17, 23) > 0.7).float()
    target[2] = 0  # an empty mask
    ref = monai_losses.DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, batch=False)(logits, target)
    torch.testing.assert_close(soft_dice_loss(logits, target), ref)


def test_soft_dice_loss_edges_hand_computed():
    # a perfect confident prediction -> loss ~0; empty mask + confident empty prediction -> ~0
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1
    assert soft_dice_loss(target * 40 - 20, target).item() == pytest.approx(0, abs=1e-6)
    empty = torch.zeros(1, 1, 4, 4)
    assert soft_dice_loss(torch.full_like(empty, -30.0), empty).item() == pytest.approx(0, abs=1e-6)
    # p = 0.5 everywhere on a 4-pixel target out of 16: 1 - (2*2 + 1) / (8 + 4 + 1)
    assert soft_dice_loss(torch.zeros(1, 1, 4, 4), target).item() == pytest.approx(1 - 5 / 13, rel=1e-6)
    assert torch.isfinite(soft_dice_loss(torch.zeros(1, 1, 4, 4), empty))


def test_learning_rate_schedules():
    const = TrainConfig(epochs=10, lr=1e-3)
    assert learning_rate(const, 0, 0, 5) == learning_rate(const, 9, 4, 5) == 1e-3
    cos = TrainConfig(epochs=10, lr=1e-3, schedule="cosine")
    assert learning_rate(cos, 0, 0, 5) == pytest.approx(1e-3)
    assert learning_rate(cos, 5, 0, 5) == pytest.approx(0.5e-3)
    assert learning_rate(cos, 9, 4, 5) < 0.05e-3
    warm = TrainConfig(epochs=10, lr=1e-3, schedule="cosine", warmup_epochs=2)
    assert learning_rate(warm, 0, 0, 5) == pytest.approx(1e-3 / 10)
    assert learning_rate(warm, 2, 0, 5) == pytest.approx(1e-3)


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown augmentation"):
        TrainConfig(augment=("mixup",))
    with pytest.raises(ConfigError, match="multiple of 16"):
        PreprocessConfig(size=100)
    with pytest.raises(ConfigError, match="--fold"):
        DataConfig(folds=5)
    with pytest.raises(ConfigError):
        DataConfig(folds=5, fold=5)
    cfg = RunConfig(train=TrainConfig(augment=("shear", "hflip")))
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_shear_matches_the_hand_computed_map():
    # One bright pixel. grid_sample reads output pixel p from input point theta @ p (normalised
    # coordinates), with theta = [[1, tan a], [tan b, 1]] for shear angles a, b.
    n = 65
    images = torch.zeros(1, 1, n, n)
    images[0, 0, 48, 32] = 1.0
    out, out_mask = augment_batch(images, images.clone(), ("shear",), 15.0, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the same draws, in the same order
    a = math.radians(torch.rand(1, generator=gen).item() * 30 - 15)
    b = math.radians(torch.rand(1, generator=gen).item() * 30 - 15)
    assert abs(a) > math.radians(2)  # the seed gives a visible shear
    theta = np.array([[1, math.tan(a)], [math.tan(b), 1]])
    to_norm = lambda i: (2 * i + 1) / n - 1  # noqa: E731
    to_index = lambda v: ((v + 1) * n - 1) / 2  # noqa: E731
    px, py = np.linalg.solve(theta, [to_norm(32), to_norm(48)])
    y, x = np.unravel_index(out[0, 0].argmax().item(), (n, n))
    assert abs(x - to_index(px)) <= 1 and abs(y - to_index(py)) <= 1
    assert (x, y) != (32, 48)
    assert set(torch.unique(out_mask).tolist()) <= {0.0, 1.0}


def test_augmentations_keep_masks_binary_and_identity_without_any():
    torch.manual_seed(0)
    images, masks = torch.rand(4, 1, 32, 40), (torch.rand(4, 1, 32, 40) > 0.5).float()
    same_i, same_m = augment_batch(images, masks, (), generator=torch.Generator().manual_seed(0))
    assert torch.equal(same_i, images) and torch.equal(same_m, masks)
    all_augs = ("shear", "scale", "hflip", "vflip", "gamma", "contrast", "speckle")
    out_i, out_m = augment_batch(images, masks, all_augs, generator=torch.Generator().manual_seed(0))
    assert out_i.shape == images.shape and set(torch.unique(out_m).tolist()) <= {0.0, 1.0}
    assert out_i.min() >= 0 and out_i.max() <= 1


def _config(data_dir, epochs: int, lr: float = 2e-3) -> RunConfig:
    return RunConfig(
        model=ModelConfig("sa_unet", dict(SMALL)),
        preprocess=PreprocessConfig(size=64),
        data=DataConfig(str(data_dir), label=1, seed=0, val_fraction=0.25),
        train=TrainConfig(epochs=epochs, lr=lr),
    )


@pytest.mark.slow
def test_short_training_learns_noisy_ellipses(tmp_path):
    from conftest import write_ellipse_dataset
    from nerveseg.evaluation.evaluate import evaluate_run

    data = write_ellipse_dataset(tmp_path / "data", 16)
    result = train(_config(data, epochs=25), tmp_path / "run", progress=False)
    # a network that learned nothing scores 0 here (its output is empty), one that learned ~0.9
    assert result.best_val_dice > 0.7
    summary = evaluate_run(tmp_path / "run", data, tmp_path / "eval", subset="val", progress=False)
    assert summary["n_images"] == 4
    assert summary["dice"]["mean"] > 0.6  # at the original 60x76 resolution
    assert summary["zero_overlap_rate"] == 0


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    from conftest import write_ellipse_dataset

    data = write_ellipse_dataset(tmp_path / "data", 8)
    train(_config(data, epochs=3), tmp_path / "straight", progress=False)
    train(_config(data, epochs=1), tmp_path / "resumed", progress=False)  # "interrupted" after 1 epoch
    with pytest.raises(ConfigError, match="--resume"):
        train(_config(data, epochs=3), tmp_path / "resumed", progress=False)
    train(_config(data, epochs=3), tmp_path / "resumed", resume=True, progress=False)
    a = load_file(str(tmp_path / "straight" / "last.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    with open(tmp_path / "resumed" / "history.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
    for name in ("config.json", "model.safetensors", "last.safetensors", "history.csv"):
        assert (tmp_path / "resumed" / name).is_file()
    saved = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert saved["train"]["epochs"] == 3 and len(saved["val_stems"]) == 2
    assert not set(saved["train_stems"]) & set(saved["val_stems"])


def test_resume_after_a_kill_before_the_first_state_redoes_its_history_rows(tmp_path, ellipse_dataset):
    # killed after epoch 1's history row but before its training state: the resumed run starts over,
    # and the history holds each epoch once (the stale row is dropped, not kept beside the new one)
    train(_config(ellipse_dataset, epochs=1), tmp_path / "run", progress=False)
    (tmp_path / "run" / "last.safetensors").unlink()
    train(_config(ellipse_dataset, epochs=2), tmp_path / "run", resume=True, progress=False)
    with open(tmp_path / "run" / "history.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]


def test_train_seed_changes_the_training_not_the_split(tmp_path, ellipse_dataset):
    # a second model of the same fold (a seed ensemble's member): same images, other weights
    runs = {}
    for name, seed in (("default", None), ("same", 0), ("other", 1)):
        config = _config(ellipse_dataset, epochs=1)
        config.train.seed = seed
        train(config, tmp_path / name, progress=False)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["train"]["seed"] == seed
        runs[name] = (saved["train_stems"], saved["val_stems"], load_file(str(tmp_path / name / "model.safetensors")))
    assert runs["other"][:2] == runs["default"][:2]  # the split follows data.seed alone
    for key, value in runs["default"][2].items():
        torch.testing.assert_close(runs["same"][2][key], value, rtol=0, atol=0, msg=key)  # None means data.seed
    assert any(not torch.equal(runs["other"][2][key], value) for key, value in runs["default"][2].items()
               if value.is_floating_point())


def test_resume_removes_the_temporary_files_of_a_killed_write(tmp_path, ellipse_dataset):
    # a kill inside a checkpoint write leaves io_utils' temporary file and, inside it, the one
    # safetensors >= 0.8 writes first (Rust tempfile: .tmp + 6 characters); files of other names stay
    train(_config(ellipse_dataset, epochs=1), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    orphans = [run / ".last.safetensors.k3j_x9aq.tmp.safetensors", run / ".tmpAb12Cd", run / ".history.csv.zz99yy88.tmp.csv"]
    kept = [run / ".tmp_notes", run / "notes.tmp", run / ".tmpAb12Cd7"]
    for path in orphans + kept:
        path.write_bytes(b"partial")
    train(_config(ellipse_dataset, epochs=2), run, resume=True, progress=False)
    assert not [p for p in orphans if p.exists()]
    assert all(p.exists() for p in kept)


def test_resume_needs_a_run(tmp_path, ellipse_dataset):
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(_config(ellipse_dataset, 1), tmp_path / "none", resume=True, progress=False)


def test_training_without_validation_keeps_the_last_epoch(tmp_path, ellipse_dataset):
    config = _config(ellipse_dataset, epochs=2)
    config.data.val_fraction = 0.0
    result = train(config, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["val_stems"] == [] and len(saved["train_stems"]) == 12
    assert result.best_epoch == 2
    last = load_file(str(tmp_path / "run" / "last.safetensors"))
    best = load_file(str(tmp_path / "run" / "model.safetensors"))
    for key, value in best.items():
        torch.testing.assert_close(value, last[f"model.{key}"])


# ------------------------------------------------------------------------------------------------
# regularisation levers: decoupled weight decay, a moving average of the weights


def test_weight_average_is_the_hand_computed_exponential_average():
    from nerveseg.training.trainer import weight_average

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1))
    average = weight_average(net, 0.75)
    for k in range(4):
        with torch.no_grad():
            net[0].weight.fill_(float(k + 1))
        net(torch.randn(2, 1, 3, 3) * (k + 1))  # moves the trained model's BatchNorm statistics
        average.update_parameters(net)
    # the first update copies, each later one blends 1/4 in: 0.75 (0.75 (0.75 * 1 + 0.25 * 2) + 0.25 * 3) + 0.25 * 4
    assert float(average.module[0].weight) == pytest.approx(2.265625)
    assert float(net[0].weight) == 4.0  # the trained model itself is untouched
    # statistics are not averaged (they would not fit the averaged weights): torch copies the trained
    # model's until recompute_batchnorm measures the average's own
    assert float(net[1].running_var) != 1.0
    assert float(average.module[1].running_var) == float(net[1].running_var)


def test_recompute_batchnorm_measures_the_statistics_of_the_data():
    from nerveseg.data.cache import TensorSet
    from nerveseg.training.trainer import recompute_batchnorm

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1, momentum=0.3))
    with torch.no_grad():
        net[0].weight.fill_(3.0)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(5, 1, 6, 6, generator=gen)
    stats = torch.stack([images.flatten(1).mean(1), images.flatten(1).std(1)], 1)
    data = TensorSet([str(i) for i in range(5)], images, torch.zeros_like(images), stats)
    net.eval()
    recompute_batchnorm(net, data, torch.device("cpu"), amp=False, channels_last=False, batch_size=8)
    standardized = 3.0 * (images - stats[:, 0, None, None, None]) / stats[:, 1, None, None, None]
    # one batch holds all five images: the running statistics are that batch's, whatever the momentum
    assert float(net[1].running_mean) == pytest.approx(float(standardized.mean()), abs=1e-5)
    assert float(net[1].running_var) == pytest.approx(float(standardized.var(unbiased=True)), rel=1e-4)
    assert net[1].momentum == 0.3 and not net.training  # left as found


def test_ema_run_saves_the_average_and_resumes_exactly(tmp_path):
    from conftest import write_ellipse_dataset

    data = write_ellipse_dataset(tmp_path / "data", 8)

    def config(epochs):
        cfg = _config(data, epochs)
        cfg.train.ema_decay, cfg.train.optimizer, cfg.train.weight_decay, cfg.train.checkpoint = 0.9, "adamw", 0.01, "last"
        return cfg

    train(config(3), tmp_path / "straight", progress=False)
    train(config(1), tmp_path / "resumed", progress=False)
    train(config(3), tmp_path / "resumed", resume=True, progress=False)
    a = load_file(str(tmp_path / "straight" / "last.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    # the kept model is the average, not the last step's weights
    kept = load_file(str(tmp_path / "straight" / "model.safetensors"))
    for name, value in kept.items():
        torch.testing.assert_close(value, a[f"ema.module.{name}"], msg=name)
    moved = [n for n in kept if kept[n].is_floating_point() and not torch.allclose(kept[n], a[f"model.{n}"])]
    assert any("running_var" in n for n in moved)  # re-measured for the average's weights
    assert moved, "the average equals the last weights: it was not kept"
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())["train"]
    assert (saved["ema_decay"], saved["optimizer"], saved["weight_decay"]) == (0.9, "adamw", 0.01)


def test_resuming_an_ema_run_needs_its_average(tmp_path):
    from conftest import write_ellipse_dataset
    from nerveseg.errors import InputError

    data = write_ellipse_dataset(tmp_path / "data", 8)
    train(_config(data, epochs=1), tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["train"]["ema_decay"] = 0.9  # a run whose state was written without one
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="weight average"):
        train(_config(data, epochs=2), tmp_path / "run", resume=True, progress=False)


def test_adamw_decays_weights_apart_from_the_gradient():
    # with a zero gradient, Adam's L2 term is rescaled to a step of ~lr, AdamW's is lr * wd * w
    def step(optimizer_name):
        w = torch.nn.Parameter(torch.tensor([2.0]))
        cls = torch.optim.AdamW if optimizer_name == "adamw" else torch.optim.Adam
        opt = cls([w], lr=0.1, weight_decay=0.5)
        w.grad = torch.zeros(1)
        opt.step()
        return float(w)

    assert step("adamw") == pytest.approx(2.0 - 0.1 * 0.5 * 2.0)  # 1.9
    assert step("adam") == pytest.approx(2.0 - 0.1, rel=1e-4)  # sign(grad + wd * w) * lr


def test_regularisation_config_is_validated():
    for bad in (dict(optimizer="sgd"), dict(ema_decay=1.0), dict(ema_decay=0), dict(ema_decay=True),
                dict(weight_decay=-1e-4), dict(weight_decay=float("inf"))):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    assert TrainConfig().optimizer == "adam" and TrainConfig().ema_decay is None
