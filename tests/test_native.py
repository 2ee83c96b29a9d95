"""The native fused SAConv (onnxruntime custom operator): same function as the torch module."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="native operator tests need onnx: pip install onnx onnxscript")
pytest.importorskip("onnxscript", reason="native operator tests need onnxscript: pip install onnxscript")
ort = pytest.importorskip("onnxruntime", reason="native operator tests need onnxruntime: pip install onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from nerveseg.config import ModelConfig, PreprocessConfig, RunConfig  # noqa: E402
from nerveseg.errors import ConfigError  # noqa: E402
from nerveseg.inference import native  # noqa: E402
from nerveseg.inference.onnx_backend import OnnxPredictor, export_onnx  # noqa: E402
from nerveseg.inference.predictor import Predictor  # noqa: E402
from nerveseg.io_utils import atomic_write_json  # noqa: E402
from nerveseg.models.blocks import SAConv  # noqa: E402
from nerveseg.training.checkpoint import save_weights  # noqa: E402
from test_onnx import SMALL, _inputs, _model  # noqa: E402

try:
    native.saconv_library()
except native.NativeUnavailable as exc:  # pragma: no cover - machines without a C compiler
    pytest.skip(f"native SAConv library not available here: {exc}", allow_module_level=True)

NAMES = ("x", "w1", "b1", "dw", "dwb", "pw", "pwb", "eca", "bn_scale", "bn_shift")


def _saconv(cin: int, cout: int, n: int, bias: bool = True, seed: int = 0) -> SAConv:
    """An eval-mode SAConv with non-trivial BatchNorm statistics (including negative scales)."""
    torch.manual_seed(seed)
    module = SAConv(cin, cout, n, bias=bias)
    with torch.no_grad():
        module.norm.weight.uniform_(-1.5, 1.5)
        module.norm.bias.uniform_(-0.5, 0.5)
        module.norm.running_mean.uniform_(-0.3, 0.3)
        module.norm.running_var.uniform_(0.2, 2.0)
    return module.eval()


def _single_op_session(threads: int = 2, op: str = "SAConv") -> ort.InferenceSession:
    """A graph of one nerveseg operator whose weights are graph inputs."""
    names = ("a", "b", *NAMES[1:]) if op == "SAConvCat" else NAMES
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node(op, list(names), ["y"], domain="nerveseg")
    graph = helper.make_graph([node], "saconv", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("nerveseg", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    native.register_saconv(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feed(module: SAConv, x: torch.Tensor) -> dict[str, np.ndarray]:
    fused = native.FusedSAConv(module)
    feed = {name: getattr(fused, name).numpy() for name in NAMES[1:]}
    feed["x"] = x.numpy()
    return feed


@pytest.fixture(scope="module")
def session():
    return _single_op_session()


# (cin, cout, n, bias, batch, H, W): tails narrower than a 16-float vector, several row chunks
# (H >= 64), chunk boundaries that do not divide H, one row, n = 1 (no cascade) and n = 5
SHAPES = [
    (1, 32, 4, True, 1, 37, 53),
    (32, 32, 4, True, 2, 100, 70),
    (64, 32, 4, False, 1, 129, 31),
    (5, 24, 3, True, 1, 17, 9),
    (16, 16, 1, True, 1, 20, 20),
    (8, 40, 5, True, 2, 66, 5),
    (12, 12, 2, True, 1, 1, 40),
    (3, 20, 4, True, 1, 45, 1),
]


@pytest.mark.parametrize("cin,cout,n,bias,batch,h,w", SHAPES)
def test_operator_matches_the_torch_module(session, cin, cout, n, bias, batch, h, w):
    module = _saconv(cin, cout, n, bias)
    x = torch.randn(batch, cin, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module.double()(x.double()).numpy()  # float64 reference
    module.float()
    got = session.run(None, _feed(module, x))[0]
    assert got.shape == expected.shape == (batch, cout, h, w)
    assert np.abs(got - expected).max() < 2e-5 * max(1.0, np.abs(expected).max())
    assert (got >= 0).all()  # ReLU


@pytest.mark.parametrize("batch,h,w", [(1, 40, 36), (2, 35, 8), (1, 1, 1)])
def test_upsampling_variant_is_saconv_of_the_nearest_x2_input(batch, h, w):
    module = _saconv(24, 16, 4)
    x = torch.randn(batch, 24, h, w)
    with torch.no_grad():
        expected = module(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")).numpy()
    got = _single_op_session(op="SAConvUp2").run(None, _feed(module, x))[0]
    assert got.shape == (batch, 16, 2 * h, 2 * w)
    assert np.abs(got - expected).max() < 2e-5 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("ca,cb", [(16, 16), (3, 9), (1, 1)])
def test_concatenation_variant_is_saconv_of_the_concatenated_inputs(ca, cb):
    module = _saconv(ca + cb, 16, 4)
    a, b = torch.randn(2, ca, 70, 33), torch.randn(2, cb, 70, 33)
    with torch.no_grad():
        expected = module(torch.cat([a, b], dim=1)).numpy()
    feed = _feed(module, a)
    del feed["x"]
    feed.update(a=a.numpy(), b=b.numpy())
    session = _single_op_session(op="SAConvCat")
    got = session.run(None, feed)[0]
    assert np.abs(got - expected).max() < 2e-5 * max(1.0, np.abs(expected).max())
    feed["b"] = feed["b"][:, :, :-1].copy()  # a and b of different heights
    with pytest.raises(Exception, match="same B, H, W"):
        session.run(None, feed)


def test_a_nan_input_gives_nan_like_torch(session):
    module = _saconv(4, 16, 4)
    x = torch.randn(1, 4, 20, 20)
    x[0, 1, 5, 7] = float("nan")
    with torch.no_grad():
        expected = module(x).numpy()
    got = session.run(None, _feed(module, x))[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))  # the mean, so every pixel
    assert np.isnan(got).all()


def test_operator_is_the_same_with_one_thread_and_two(session):
    module = _saconv(32, 32, 4)
    x = torch.randn(1, 32, 130, 90)
    one = _single_op_session(threads=1).run(None, _feed(module, x))[0]
    two = session.run(None, _feed(module, x))[0]
    np.testing.assert_array_equal(one, two)  # each output element is computed by the same code


def test_rejects_weights_that_do_not_fit(session):
    feed = _feed(_saconv(8, 16, 4), torch.randn(1, 8, 20, 20))
    feed["pw"] = feed["pw"][:, :, :3].copy()
    with pytest.raises(Exception, match="nerveseg.SAConv: weight shapes"):
        session.run(None, feed)
    feed = _feed(_saconv(8, 16, 4), torch.randn(1, 5, 20, 20))
    with pytest.raises(Exception, match="nerveseg.SAConv: x must be"):
        session.run(None, feed)


def test_fused_module_is_the_same_function():
    module = _saconv(16, 32, 4, bias=False)
    x = torch.randn(2, 16, 23, 31)
    with torch.no_grad():
        torch.testing.assert_close(native.FusedSAConv(module)(x), module(x), rtol=1e-5, atol=1e-5)
    net = torch.nn.Sequential(_saconv(1, 8, 4), torch.nn.ReLU(), _saconv(8, 8, 4).train())
    fused = native.fuse_saconv_(net)
    assert fused == 1  # the module in training mode is left alone (its BatchNorm is not fixed)
    assert isinstance(net[0], native.FusedSAConv) and isinstance(net[2], SAConv)


def test_fused_network_is_the_same_function():
    import copy

    model = _model("sa_unet", SMALL)
    fused = native.fuse_saconv_network(copy.deepcopy(model))
    assert isinstance(fused, native.FusedUNetDecoder)
    x = _inputs("real-like", (45, 77))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    unet = native.fuse_saconv_network(copy.deepcopy(_model("unet", SMALL)))
    assert not isinstance(unet, native.FusedUNetDecoder)  # nothing to fuse in a plain U-Net


@pytest.fixture(scope="module", params=["sa_unet-small", "sa_unet-default"])
def exported_native(request, tmp_path_factory):
    kwargs = SMALL if request.param == "sa_unet-small" else {}
    model = _model("sa_unet", kwargs)
    config = RunConfig(model=ModelConfig("sa_unet", dict(kwargs)), preprocess=PreprocessConfig(size=96))
    path = export_onnx(model, tmp_path_factory.mktemp("native") / "model.onnx", config=config, native_saconv=True)
    return model, path, config


@pytest.mark.parametrize("kind", ["random", "real-like"])
def test_native_graph_matches_torch(exported_native, kind):
    model, path, config = exported_native
    predictor = OnnxPredictor(path, config, device="cpu", intra_op_num_threads=2, native_ops=True)
    worst = 0.0
    for shape in [(64, 64), (96, 80), (45, 77)]:
        x = _inputs(kind, shape)
        with torch.no_grad():
            expected = torch.sigmoid(model(x)).numpy()
        got = torch.sigmoid(torch.from_numpy(predictor.session.run(None, {"image": x.numpy()})[0])).numpy()
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst < 1e-4, f"max |p_native - p_torch| = {worst:.2e}"


def test_native_graph_has_one_node_per_saconv(exported_native):
    model, path, _ = exported_native
    graph = onnx.load(str(path)).graph
    ops = [(n.domain, n.op_type) for n in graph.node]
    saconvs = sum(isinstance(m, SAConv) for m in model.modules())
    native_nodes = [op for domain, op in ops if domain == "nerveseg"]
    assert len(native_nodes) == saconvs == 22
    # each decoder level: its up-sampling SAConv reads the deeper feature at half resolution,
    # its first SAConv reads skip and up-sampled features without a concatenation
    assert native_nodes.count("SAConvUp2") == native_nodes.count("SAConvCat") == 4
    for op in ("BatchNormalization", "ReduceMean", "Resize", "Upsample"):
        assert ("", op) not in ops
    fed_to_native = {i for n in graph.node if n.domain == "nerveseg" for i in n.input}
    assert not [n for n in graph.node if n.op_type == "Concat" and n.output[0] in fed_to_native]
    assert "nerveseg.SAConv" in {p.key: p.value for p in onnx.load(str(path)).metadata_props}["native_ops"]


def test_native_graph_needs_the_library(exported_native):
    _, path, config = exported_native
    with pytest.raises(Exception, match="SAConv"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture
def sa_run(tmp_path):
    model = _model("sa_unet", SMALL)
    run = tmp_path / "run"
    run.mkdir()
    config = RunConfig(model=ModelConfig("sa_unet", dict(SMALL)), preprocess=PreprocessConfig(size=64))
    atomic_write_json(run / "config.json", config.to_dict())
    save_weights(model, run / "model.safetensors")
    return run


def test_predictor_uses_the_native_graph_on_the_cpu(sa_run):
    image = np.random.default_rng(0).random((70, 90)).astype(np.float32)
    fast = OnnxPredictor.from_run(sa_run, device="cpu")
    plain = OnnxPredictor.from_run(sa_run, device="cpu", native=False)
    assert fast.native_ops and not plain.native_ops
    assert fast.path.parent.parent == native.cache_dir()  # the run folder is left as it was
    reference = Predictor.from_run(sa_run, device="cpu").predict(image)
    assert np.abs(fast.predict(image) - reference).max() < 1e-4
    assert np.abs(plain.predict(image) - reference).max() < 1e-4
    # a second load reuses the exported graph
    before = fast.path.stat().st_mtime_ns
    assert OnnxPredictor.from_run(sa_run, device="cpu").path.stat().st_mtime_ns == before


def test_predictor_falls_back_when_the_library_cannot_be_built(sa_run, monkeypatch):
    def unavailable():
        raise native.NativeUnavailable("no C compiler found (test)")

    monkeypatch.setattr(native, "saconv_library", unavailable)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = OnnxPredictor.from_run(sa_run, device="cpu")  # automatic choice: silent fallback
    assert not quiet.native_ops
    with pytest.warns(UserWarning, match="no C compiler found"):
        asked = OnnxPredictor.from_run(sa_run, device="cpu", native=True)
    assert not asked.native_ops
    with pytest.raises(ConfigError, match="no C compiler"):
        OnnxPredictor(quiet.path, quiet.config, device="cpu", native_ops=True)


def test_environment_switch_turns_it_off(sa_run, monkeypatch):
    monkeypatch.setenv("NERVESEG_NATIVE", "0")
    assert not OnnxPredictor.from_run(sa_run, device="cpu").native_ops


def test_build_is_cached_per_cpu_and_reports_a_missing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("NERVESEG_CACHE_DIR", str(tmp_path))
    first = native.saconv_library()
    assert first.is_file() and first.is_relative_to(tmp_path)
    assert native.saconv_library() == first
    assert not list(first.parent.glob(".build-*"))  # no temporary left behind
    monkeypatch.setattr(native, "_cpu_signature", lambda: "another CPU")
    native._build.cache_clear()
    assert native.saconv_library() != first  # -march=native builds are not shared across CPUs
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv("NERVESEG_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(native.NativeUnavailable, match="no C compiler"):
        native.saconv_library()
    native._build.cache_clear()


def test_cli_export_native(sa_run, tmp_path, capsys):
    from nerveseg.cli.main import main

    out = tmp_path / "native.onnx"
    assert main(["export", "--model", str(sa_run), "--native", "--out", str(out)]) == 0
    assert "native SAConv operators" in capsys.readouterr().out
    domains = {n.domain for n in onnx.load(str(out)).graph.node}
    assert "nerveseg" in domains
    assert main(["export", "--model", str(sa_run), "--native", "--opset", "17", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "opset 18 or later" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
