"""ONNX export and the onnxruntime backend: same probabilities as torch, dynamic sizes, caching."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export tests need onnx: pip install onnx onnxscript")
pytest.importorskip("onnxscript", reason="ONNX export tests need onnxscript (torch's dynamo exporter): pip install onnxscript")
pytest.importorskip("onnxruntime", reason="ONNX backend tests need onnxruntime: pip install onnxruntime")

import onnx  # noqa: E402
from scipy import ndimage  # noqa: E402

import nerveseg  # noqa: E402
from nerveseg.config import ModelConfig, PreprocessConfig, RunConfig  # noqa: E402
from nerveseg.errors import ConfigError  # noqa: E402
from nerveseg.inference.onnx_backend import OnnxPredictor, export_onnx, load_predictor, onnx_metadata  # noqa: E402
from nerveseg.inference.predictor import Predictor  # noqa: E402
from nerveseg.io_utils import atomic_write_json  # noqa: E402
from nerveseg.models import create  # noqa: E402
from nerveseg.training.checkpoint import save_weights  # noqa: E402

SMALL = {"features": [8, 16, 32, 64, 128]}
SIZES = [(64, 64), (96, 80), (45, 77)]  # 45 x 77: neither side a multiple of 16
TOL = 1e-4


def _model(arch: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """A network that behaves like a trained one: BatchNorm running statistics measured on
    inputs like ``_inputs``, random BN affine parameters, and a head scaled so the logits spread
    over several units (a freshly initialised net gives nearly constant logits, which would make
    any parity check toothless). Running variances are floored at 1e-3: measured on two batches
    a few channels come out near 0 and would amplify float32 rounding ~400x (torch float32 itself
    then differs from float64 by 1e-3 in the logits); so floored, the float32 noise (~5e-5 in
    the logits) is that of the trained SA-UNet in runs/."""
    torch.manual_seed(seed)
    model = create(arch, **kwargs)
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.copy_(0.4 * torch.rand(m.num_features, generator=g) - 0.2)
            m.momentum = None  # cumulative average over the calibration batches
            m.reset_running_stats()
        model.train()
        for kind in ("random", "real-like"):
            model(_inputs(kind, (64, 64), seed=seed + 100))
        model.eval()
        for m in bns:
            m.running_var.clamp_(min=1e-3)
        calib = model(_inputs("real-like", (64, 64), seed=seed + 200))
        model.head.weight.mul_(3.0 / max(float(calib.std()), 1e-6))
    return model


def _real_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth speckle-like background with one bright ellipse, in [0, 1]."""
    image = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=2.0)
    image = 0.3 + 0.1 * image / max(image.std(), 1e-6)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - 0.5 * h) / (0.2 * h)) ** 2 + ((xx - 0.45 * w) / (0.25 * w)) ** 2 <= 1
    image[inside] += 0.35
    return np.clip(ndimage.gaussian_filter(image, 1.0), 0, 1).astype(np.float32)


def _inputs(kind: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A batch of 2 network inputs: random normal, or standardised real-like images."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return torch.from_numpy(rng.standard_normal((2, 1, *shape)).astype(np.float32))
    images = np.stack([_real_like(rng, *shape) for _ in range(2)])[:, None]
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    sd = images.std(axis=(1, 2, 3), keepdims=True)
    return torch.from_numpy(((images - mean) / sd).astype(np.float32))


class _Exported:
    def __init__(self, model, path, config):
        self.model, self.path, self.config = model, path, config
        self.predictor = OnnxPredictor(path, config, device="cpu", intra_op_num_threads=1)


CASES = {
    "sa_unet-small": ("sa_unet", SMALL),
    "unet-small": ("unet", SMALL),
    "sa_unet-default": ("sa_unet", {}),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory) -> _Exported:
    arch, kwargs = CASES[request.param]
    model = _model(arch, kwargs)
    config = RunConfig(model=ModelConfig(arch, dict(kwargs)), preprocess=PreprocessConfig(size=96))
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx", config=config)
    return _Exported(model, path, config)


@pytest.mark.parametrize("kind", ["random", "real-like"])
def test_probabilities_match_torch(exported, kind):
    worst = 0.0
    for shape in SIZES:
        x = _inputs(kind, shape)
        with torch.no_grad():
            expected = torch.sigmoid(exported.model(x)).numpy()
        logits = exported.predictor.session.run(["logits"], {"image": x.numpy()})[0]
        got = torch.sigmoid(torch.from_numpy(logits)).numpy()
        assert got.shape == expected.shape == (2, 1, *shape)
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst < TOL, f"max |p_onnx - p_torch| = {worst:.2e}"


def test_export_leaves_the_model_alone(exported):
    assert exported.model.training is False
    if exported.config.model.arch == "unet":
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in exported.model.modules())


def test_graph_has_symbolic_batch_height_width(exported):
    graph = onnx.load(str(exported.path)).graph
    (inp,), (out,) = graph.input, graph.output
    assert (inp.name, out.name) == ("image", "logits")
    for value in (inp, out):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 4
        assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
        assert dims[1].dim_value == 1
    # and the session really accepts other sizes, batch included
    logits = exported.predictor.session.run(None, {"image": np.zeros((3, 1, 17, 130), np.float32)})[0]
    assert logits.shape == (3, 1, 17, 130)


def test_metadata(exported):
    meta = onnx_metadata(exported.path)
    assert meta["nerveseg_version"] == nerveseg.__version__
    assert meta["arch"] == exported.config.model.arch
    assert meta["preprocess_size"] == "96"
    assert meta["size_divisor"] == "16"
    assert exported.predictor.metadata == meta  # what onnxruntime reads back


def test_no_batchnorm_left_after_convolutions(exported):
    """Conv -> BN pairs are folded; only SA-UNet's BN after ECA's multiplication remains."""
    graph = onnx.load(str(exported.path)).graph
    n_bn = sum(node.op_type == "BatchNormalization" for node in graph.node)
    n_saconv = sum(type(m).__name__ == "SAConv" for m in exported.model.modules())
    assert n_bn == n_saconv


def _reduce_mean_axes(graph) -> list[tuple[int, ...]]:
    """The axes of every ReduceMean (an attribute up to opset 17, an input from opset 18)."""
    from onnx import numpy_helper

    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})
    found = []
    for node in graph.node:
        if node.op_type == "ReduceMean":
            attr = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            axes = attr["axes"] if "axes" in attr else constants[node.input[1]]
            found.append(tuple(int(a) for a in np.atleast_1d(axes)))
    return found


def test_channel_attention_pools_in_two_stages(exported):
    """onnxruntime's ReduceMean over H*W at once is ~20x less accurate than torch's mean (on a
    trained SA-UNet: 3e-3 vs 7e-5 off float64 in the logits); the export pools over W, then H."""
    axes = _reduce_mean_axes(onnx.load(str(exported.path)).graph)
    n_eca = sum(type(m).__name__ == "ECA" for m in exported.model.modules())
    assert sorted(axes) == sorted([(2,), (3,)] * n_eca)


def test_export_with_three_input_channels(tmp_path):
    torch.manual_seed(5)
    model = create("unet", in_channels=3, **SMALL).eval()
    path = export_onnx(model, tmp_path / "rgb.onnx", opset=17)
    x = torch.randn(2, 3, 45, 77)
    session = OnnxPredictor(path, RunConfig(), device="cpu", intra_op_num_threads=1).session
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).numpy()
    got = torch.sigmoid(torch.from_numpy(session.run(None, {"image": x.numpy()})[0])).numpy()
    assert np.abs(got - expected).max() < TOL


def test_legacy_exporter_for_opset_17(tmp_path):
    model = _model("sa_unet", SMALL, seed=1)
    path = export_onnx(model, tmp_path / "m17.onnx", opset=17)
    proto = onnx.load(str(path))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    predictor = OnnxPredictor(path, RunConfig(), device="cpu", intra_op_num_threads=1)
    x = _inputs("real-like", (45, 77))
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).numpy()
    got = torch.sigmoid(torch.from_numpy(predictor.session.run(None, {"image": x.numpy()})[0])).numpy()
    assert np.abs(got - expected).max() < TOL
    assert onnx_metadata(path)["arch"] == "sa_unet"
    with pytest.raises(ConfigError, match="opset 18 or later"):
        export_onnx(model, tmp_path / "no.onnx", opset=17, dynamo=True)


def test_falls_back_to_the_legacy_exporter_when_torch_export_fails(tmp_path, monkeypatch):
    from nerveseg.inference import onnx_export

    def fail(*args, **kwargs):
        raise RuntimeError("torch.export cannot capture this")

    monkeypatch.setattr(onnx_export, "_export_dynamo", fail)
    with pytest.warns(UserWarning, match="TorchScript"):
        path = export_onnx(create("unet", **SMALL).eval(), tmp_path / "m.onnx")
    assert {o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")} == {18}
    with pytest.raises(RuntimeError):  # asked for dynamo explicitly: no silent fallback
        export_onnx(create("unet", **SMALL).eval(), tmp_path / "n.onnx", dynamo=True)


# ---------------------------------------------------------------------------------------------
# run folders


def _make_run(run: Path, arch: str, kwargs: dict, seed: int = 0, size: int = 96) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    config = RunConfig(
        model=ModelConfig(arch, dict(kwargs)), preprocess=PreprocessConfig(size=size), nerveseg_version=nerveseg.__version__
    )
    atomic_write_json(run / "config.json", config.to_dict())
    save_weights(_model(arch, kwargs, seed), run / "model.safetensors")
    return run


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [_real_like(rng, 60, 76), _real_like(rng, 101, 67), rng.uniform(0, 1, (60, 76)).astype(np.float32)]


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small U-Net run: from_run's default (dynamo) export of it takes ~1/4 of an SA-UNet's,
    whose export and parity the ``exported`` tests cover."""
    return _make_run(tmp_path_factory.mktemp("runs") / "unet", "unet", SMALL)


def test_onnx_predictor_from_run_matches_predictor(run_dir):
    onnx_pred = OnnxPredictor.from_run(run_dir, device="cpu", intra_op_num_threads=1)
    assert (run_dir / "model.onnx").is_file()
    assert onnx_pred.config.model.arch == "unet" and onnx_pred.config.preprocess.size == 96
    assert onnx_pred.metadata["export_revision"] and onnx_pred.metadata["preprocess_size"] == "96"
    assert onnx_pred.providers == ["CPUExecutionProvider"]
    torch_pred = Predictor.from_run(run_dir, device="cpu")
    images = _images()
    expected = torch_pred.predict_many(images, batch_size=2)
    got = onnx_pred.predict_many(images, batch_size=2)
    assert [g.shape for g in got] == [(60, 76), (101, 67), (60, 76)]
    assert _max_diff(got, expected) < TOL
    single = onnx_pred.predict(images[1])
    assert single.dtype == np.float32 and single.shape == (101, 67)
    assert np.abs(single - expected[1]).max() < TOL
    assert 0.0 <= min(float(g.min()) for g in got) and max(float(g.max()) for g in got) <= 1.0


def test_load_predictor_backends(run_dir, monkeypatch):
    assert isinstance(load_predictor(run_dir, backend="torch", device="cpu"), Predictor)
    assert isinstance(load_predictor(run_dir, backend="onnx", device="cpu"), OnnxPredictor)
    assert isinstance(load_predictor(run_dir, backend="auto", device="cpu"), OnnxPredictor)
    with pytest.raises(ConfigError, match="backend"):
        load_predictor(run_dir, backend="tensorrt")
    # without onnxruntime: auto falls back to torch, onnx says what to install
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert isinstance(load_predictor(run_dir, backend="auto", device="cpu"), Predictor)
    with pytest.raises(ConfigError, match=r"--backend onnx needs onnxruntime: pip install onnxruntime"):
        load_predictor(run_dir, backend="onnx", device="cpu")


def test_cache_reexported_when_the_weights_change(tmp_path):
    # opset 17 = the legacy exporter, 20x faster to export; the caching logic is the same
    run = _make_run(tmp_path / "run", "unet", SMALL, seed=0)
    first = OnnxPredictor.from_run(run, device="cpu", intra_op_num_threads=1, opset=17)
    cache = run / "model.onnx"
    stamp = cache.stat().st_mtime_ns
    images = _images()[:2]
    before = first.predict_many(images)

    # fresh cache: reused, not rewritten
    OnnxPredictor.from_run(run, device="cpu", intra_op_num_threads=1, opset=17)
    assert cache.stat().st_mtime_ns == stamp

    # a copy or checkout that makes the weights look newer does not force a re-export ...
    os.utime(run / "model.safetensors", ns=(stamp + 10**9, stamp + 10**9))
    OnnxPredictor.from_run(run, device="cpu", intra_op_num_threads=1, opset=17)
    assert cache.stat().st_mtime_ns == stamp
    # ... but other weights, even stamped older than the cache, are exported again and used
    save_weights(_model("unet", SMALL, seed=7), run / "model.safetensors")
    os.utime(run / "model.safetensors", ns=(stamp - 10**9, stamp - 10**9))
    second = OnnxPredictor.from_run(run, device="cpu", intra_op_num_threads=1, opset=17)
    assert cache.stat().st_mtime_ns != stamp
    after = second.predict_many(images)
    assert _max_diff(after, Predictor.from_run(run, device="cpu").predict_many(images)) < TOL
    assert _max_diff(after, before) > 1e-3  # really the new network

    # an ONNX file and config.json are enough to deploy
    (run / "model.safetensors").unlink()
    deployed = OnnxPredictor.from_run(run, device="cpu", intra_op_num_threads=1)
    assert _max_diff(deployed.predict_many(images), after) == 0.0


def test_read_only_run_folder_exports_in_memory(tmp_path, monkeypatch):
    from nerveseg.inference import onnx_backend

    run = _make_run(tmp_path / "run", "unet", SMALL, seed=2)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(onnx_backend, "export_onnx", refuse)
    with pytest.warns(UserWarning, match="in memory"):
        pred = OnnxPredictor.from_run(run, device="cpu", intra_op_num_threads=1, opset=17)
    assert not (run / "model.onnx").exists() and pred.path is None
    images = _images()[:1]
    assert _max_diff(pred.predict_many(images), Predictor.from_run(run, device="cpu").predict_many(images)) < TOL


def test_stale_cache_for_another_architecture_is_replaced(tmp_path):
    run = _make_run(tmp_path / "run", "unet", SMALL, seed=4)
    export_onnx(_model("sa_unet", SMALL), run / "model.onnx", opset=17)  # newer, but the wrong network
    pred = OnnxPredictor.from_run(run, device="cpu", intra_op_num_threads=1, opset=17)
    assert pred.metadata["arch"] == "unet"


def test_optimization_level_chosen_per_architecture_and_every_level_agrees(exported):
    from nerveseg.inference.onnx_backend import DEFAULT_ORT_LEVEL, ORT_LEVEL_BY_ARCH

    arch = exported.config.model.arch
    assert exported.predictor.optimization_level == ORT_LEVEL_BY_ARCH.get(arch, DEFAULT_ORT_LEVEL)
    assert OnnxPredictor(exported.path, RunConfig(), device="cpu").optimization_level == "ORT_ENABLE_EXTENDED"
    x = _inputs("real-like", (40, 56)).numpy()
    outputs = [
        OnnxPredictor(exported.path, exported.config, device="cpu", intra_op_num_threads=1, optimization_level=level)
        .session.run(["logits"], {"image": x})[0]
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
    ]
    for other in outputs[1:]:
        assert np.abs(other - outputs[0]).max() < 1e-4
    with pytest.raises(ConfigError, match="optimization level"):
        OnnxPredictor(exported.path, exported.config, device="cpu", optimization_level="ORT_FAST")
