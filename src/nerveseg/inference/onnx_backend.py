"""ONNX deployment: export a trained network, and run it with onnxruntime behind ``Predictor``'s API.

``export_onnx`` writes one self-describing file: input ``image`` (B, 1, H, W) float32 with
dynamic batch, height and width (any H, W -- the padding to a multiple of the network's size
divisor is part of the graph), output ``logits`` (B, 1, H, W), and metadata naming the
architecture, its arguments, the preprocessing size and the nerveseg version. The ONNX file plus
the run's ``config.json`` is all a deployment needs; torch weights are not.

``OnnxPredictor`` has ``Predictor``'s interface (``from_run``, ``predict``, ``predict_many``,
``config``) and reuses the same preprocessing functions, so both give the same probabilities
(to ~1e-6). ``load_predictor`` chooses between them.

onnxruntime is an optional dependency (and exporting needs ``onnx`` and ``onnxscript`` too): they
are imported only when used.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..config import RunConfig
from ..errors import ConfigError, InputError
from ..io_utils import atomic_write_with
from .predictor import EnsemblePredictor, ProbabilityPredictor, read_run_config

__all__ = [
    "export_onnx",
    "export_onnx_proto",
    "onnx_metadata",
    "OnnxPredictor",
    "load_predictor",
    "onnxruntime_available",
    "INPUT_NAME",
    "OUTPUT_NAME",
]

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
ONNX_FILENAME = "model.onnx"
WEIGHTS_FILENAME = "model.safetensors"
DEFAULT_OPSET = 18
# bumped whenever export_onnx writes a different graph for the same weights, so that cached
# RUN/model.onnx files from an older export are re-exported
EXPORT_REVISION = "1"
_ORT_MISSING = "--backend onnx needs onnxruntime: pip install onnxruntime"
_EXPORT_MISSING = "exporting to ONNX needs onnx and onnxscript: pip install onnx onnxscript"
_DIM_NAMES = {0: "batch", 2: "height", 3: "width"}
# onnxruntime's graph optimisation level per architecture, measured on a 2-core AVX-512 CPU at
# 512x512 (docs/performance.md): for SA-UNet the NCHWc layout that ORT_ENABLE_ALL adds costs more in
# reorders around its concatenations and attention than it gains (EXTENDED 140 ms vs ALL 157 ms);
# for U-Net's plain 3x3 convolutions ALL is the faster one.
ORT_LEVEL_BY_ARCH = {"sa_unet": "ORT_ENABLE_EXTENDED"}
DEFAULT_ORT_LEVEL = "ORT_ENABLE_ALL"


# --------------------------------------------------------------------------------------------
# optional imports


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(_ORT_MISSING) from None
    return onnxruntime


def onnxruntime_available() -> bool:
    try:
        _import_onnxruntime()
    except ConfigError:
        return False
    return True


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError(_EXPORT_MISSING) from None
    return onnx


def _exporter_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# export


class _ExportWrapper(nn.Module):
    """``SegmentationModel.forward`` with the padding made unconditional.

    ``forward`` pads H, W up to a multiple of ``size_divisor`` only ``if pad_h or pad_w``: a
    Python branch on the input's shape. ``torch.export`` cannot keep H, W dynamic through it
    (the guard ``H % 16 == 0`` contradicts a free dimension and export fails), and the legacy
    TorchScript tracer would bake in whichever branch the example input took. Padding by
    ``ceil(H / d) * d - H`` (0 when H is already a multiple) and cropping back is the same
    function for every H, W, written without a branch; ``ceil(H/d)*d`` also lets the symbolic
    shape solver prove that each pooled-then-upsampled feature matches its skip.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.divisor = int(getattr(model, "size_divisor", 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2], image.shape[-1]
        d = self.divisor
        padded_h = (h + d - 1) // d * d
        padded_w = (w + d - 1) // d * d
        x = F.pad(image, (0, padded_w - w, 0, padded_h - h))
        return self.model.forward_padded(x)[..., :h, :w]


class _TwoStageECA(nn.Module):
    """``ECA`` with its global average pool taken in two stages (over width, then height).

    Same function, better float32 arithmetic in onnxruntime: its ReduceMean over all H*W pixels
    (and GlobalAveragePool, worse still) accumulates the sum with enough rounding error that a
    trained SA-UNet's logits on 256x256 inputs were 3e-3 off a float64 reference (torch float32:
    7e-5); with two stages of at most max(H, W) terms each they are 1.1e-4 off. Computes exactly
    ``ECA.forward``: x * sigmoid(conv1d(mean_hw(x)))."""

    def __init__(self, eca: nn.Module):
        super().__init__()
        self.conv = eca.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=3).mean(dim=2)  # (B, C)
        weights = self.conv(pooled.unsqueeze(1)).squeeze(1)
        return x * torch.sigmoid(weights)[:, :, None, None]


def _two_stage_eca_(model: nn.Module) -> int:
    """Replace every ``ECA`` (exactly that class) in ``model`` by ``_TwoStageECA``, in place."""
    from ..models import replace_modules_
    from ..models.blocks import ECA

    return replace_modules_(model, lambda m: type(m) is ECA, _TwoStageECA)


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d/ConvTranspose2d inside an
    ``nn.Sequential`` into that convolution (in place); returns how many were folded.

    That covers U-Net's conv -> BN -> ReLU and the attention gates' conv -> BN. In SA-UNet the
    BatchNorm follows ECA's multiplication ``z * sigmoid(conv1d(mean(z)))``, not a convolution:
    its scale cannot be moved into the cascade convolutions because the attention weights depend
    on the scale of z, so those stay BatchNormalization nodes (a per-channel multiply-add).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = seq._modules[first], seq._modules[second]
            if (
                isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d))
                and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
                and bn.running_mean is not None
                and not conv.training
                and not bn.training
            ):
                transpose = isinstance(conv, nn.ConvTranspose2d)
                seq._modules[first] = fuse_conv_bn_eval(conv, bn, transpose=transpose)
                seq._modules[second] = nn.Identity()
                folded += 1
    return folded


def _registered_name(model: nn.Module) -> str:
    from ..models import list_models, registry

    for name in list_models():
        if registry._REGISTRY.get(name) is type(model):
            return name
    return type(model).__name__


def _in_channels(model: nn.Module, config: RunConfig | None) -> int:
    """Image channels: the run's ``in_channels`` argument, else the first Conv2d's input."""
    if config is not None and "in_channels" in config.model.kwargs:
        return int(config.model.kwargs["in_channels"])
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 1


def weights_sha256(path: str | Path) -> str:
    """Content hash of a weights file: names the exact weights an ONNX cache was exported from
    (modification times are not enough: a git checkout or a copy reorders them)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _metadata(model: nn.Module, config: RunConfig | None, folded: int, weights_hash: str | None = None) -> dict[str, str]:
    meta = {
        "nerveseg_version": __version__,
        "export_revision": EXPORT_REVISION,
        "arch": config.model.arch if config is not None else _registered_name(model),
        "model_kwargs": json.dumps(config.model.kwargs if config is not None else {}, sort_keys=True),
        "size_divisor": str(int(getattr(model, "size_divisor", 1))),
        "input": f"{INPUT_NAME}: (batch, channels, height, width) float32, the standardised letterboxed image",
        "output": f"{OUTPUT_NAME}: (batch, classes, height, width) float32 logits; sigmoid gives probabilities",
        "batchnorm_folded": str(folded),
    }
    if weights_hash:
        meta["weights_sha256"] = weights_hash
    if config is not None:
        meta["preprocess_size"] = str(config.preprocess.size)
        meta["preprocess"] = json.dumps(config.to_dict()["preprocess"], sort_keys=True)
        if config.nerveseg_version:
            meta["trained_with_nerveseg_version"] = config.nerveseg_version
    return meta


def _strip_source_locations(proto) -> None:
    """Drop the exporter's per-node stack traces (doc strings and metadata naming source files of
    the machine that exported): a shipped ONNX file carries no path of that machine."""
    graphs = [proto.graph] + [f for f in proto.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
        if hasattr(graph, "metadata_props"):
            del graph.metadata_props[:]


def _name_dynamic_dims(proto) -> None:
    """Give the graph's input and output the same symbolic dims: batch, height, width.

    torch.export names the output dims after its symbolic expressions (e.g.
    ``Min(height, 16*((height + 15)//16))``); they equal the input's, so say so.
    """
    for value in list(proto.graph.input) + list(proto.graph.output):
        if value.name not in (INPUT_NAME, OUTPUT_NAME):
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, name in _DIM_NAMES.items():
            if axis < len(dims):
                dims[axis].Clear()
                dims[axis].dim_param = name


class _NoTorchvisionNotice(logging.Filter):
    """The exporter logs one line per torchvision operator it cannot register; nerveseg does
    not use torchvision, so those lines are noise on every `segment` call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


def _export_dynamo(net: nn.Module, example: torch.Tensor, opset: int, translation_table: dict | None = None):
    from torch.export import Dim

    dims = {axis: Dim(name) for axis, name in _DIM_NAMES.items()}
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice_filter = _NoTorchvisionNotice()
    registration_log.addFilter(notice_filter)
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        stack.callback(registration_log.removeFilter, notice_filter)
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net,
            (example,),
            None,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=(dims,),
            custom_translation_table=translation_table,
            optimize=True,  # onnxscript's optimizer: constant folding, dead code, Conv+BN fusion
            verbose=False,
        )
    return program.model_proto


def _export_torchscript(net: nn.Module, example: torch.Tensor, opset: int):
    import io

    onnx = _import_onnx()
    buf = io.BytesIO()
    axes = {INPUT_NAME: dict(_DIM_NAMES), OUTPUT_NAME: dict(_DIM_NAMES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            net,
            (example,),
            buf,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def export_onnx_proto(
    model: nn.Module,
    opset: int = DEFAULT_OPSET,
    fold_batchnorm: bool = True,
    *,
    config: RunConfig | None = None,
    dynamo: bool | None = None,
    in_channels: int | None = None,
    weights_hash: str | None = None,
    native_saconv: bool = False,
):
    """The ONNX ``ModelProto`` that ``export_onnx`` writes (see there)."""
    onnx = _import_onnx()
    automatic = dynamo is None
    if native_saconv and (dynamo is False or opset < 18):
        raise ConfigError(f"the native SAConv graph is written by the dynamo exporter, opset 18 or later (not {opset})")
    if automatic:
        # The dynamo exporter emits opset >= 18 only; asked for 17 it exports 18 and then fails
        # to down-convert (onnx's version converter has no Pad 18 -> 17 adapter), so a lower
        # opset goes through the legacy exporter, which writes it natively.
        dynamo = opset >= 18
    elif dynamo and opset < 18:
        raise ConfigError(f"the dynamo ONNX exporter writes opset 18 or later, not {opset}; use dynamo=False for opset {opset}")
    net = copy.deepcopy(model).cpu().float().eval()
    folded = fold_batchnorm_(net) if fold_batchnorm else 0
    translation_table = None
    native_ops = 0
    if native_saconv:
        from . import native

        net = native.fuse_saconv_network(net)
        native_ops = sum(isinstance(m, native.FusedSAConv) for m in net.modules())
        translation_table = native.onnx_translation_table()
    _two_stage_eca_(net)
    if hasattr(net, "forward_padded"):
        net = _ExportWrapper(net).eval()
    # An example that is not a multiple of 16 and a batch > 1, so no dimension can be
    # specialised to the example's value (torch.export specialises sizes 0 and 1).
    example = torch.randn(2, in_channels or _in_channels(model, config), 45, 77)
    if dynamo:
        try:
            proto = _export_dynamo(net, example, opset, translation_table)
        except ImportError:
            raise ConfigError(_EXPORT_MISSING) from None
        except Exception as exc:
            if not automatic or native_saconv:
                raise
            # a future architecture torch.export cannot capture: the tracer still can
            warnings.warn(f"dynamo ONNX export failed ({type(exc).__name__}); using the TorchScript exporter", stacklevel=3)
            proto = _export_torchscript(net, example, opset)
    else:
        proto = _export_torchscript(net, example, opset)
    _name_dynamic_dims(proto)
    _strip_source_locations(proto)
    meta = _metadata(model, config, folded, weights_hash)
    if native_ops:
        meta["native_ops"] = f"{native_ops} x nerveseg.SAConv (needs nerveseg's native library: nerveseg.inference.native)"
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = f"nerveseg {__version__} {meta['arch']}: {INPUT_NAME} -> {OUTPUT_NAME}"
    onnx.checker.check_model(proto)
    return proto


def export_onnx(
    model: nn.Module,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    fold_batchnorm: bool = True,
    *,
    config: RunConfig | None = None,
    dynamo: bool | None = None,
    in_channels: int | None = None,
    weights_hash: str | None = None,
    native_saconv: bool = False,
) -> Path:
    """Export ``model`` (in eval mode, on the CPU, float32; the caller's model is not changed)
    to ``path``, written atomically. Returns ``path``.

    Graph: input ``image`` (batch, 1, height, width) float32 -> output ``logits`` (batch, 1,
    height, width), all three dims dynamic, any height and width (not only multiples of 16).
    Also: every ``ECA``'s global mean is taken over W, then H (``_TwoStageECA``) -- the same
    function, but onnxruntime's single ReduceMean over H*W loses precision.

    Exporter: torch 2.13's default, ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript,
    the maintained path; the TorchScript exporter is deprecated), on a wrapper that makes the
    model's pad-to-multiple-of-16 branch-free (see ``_ExportWrapper``): without it torch.export
    refuses dynamic H, W. Its lowest opset is 18, hence the default; ``opset < 18`` (or
    ``dynamo=False``) uses the legacy TorchScript exporter instead, which traces the same
    wrapper correctly (and is the fallback, with a warning, when ``dynamo`` is left None and
    torch.export fails). Both give the same graph function (tested).

    ``fold_batchnorm`` folds BatchNorm into the preceding convolution in torch where there is
    one (``fold_batchnorm_``); onnxruntime's ORT_ENABLE_ALL would also fuse Conv+BN. ``config``
    (the run's ``RunConfig``) fills the metadata: arch, model kwargs, preprocess size.
    ``in_channels`` (default: from ``config``, else the first Conv2d) is the image channels.

    ``native_saconv`` writes every SAConv as one ``nerveseg.SAConv`` node, which onnxruntime runs
    only with nerveseg's native library registered (``nerveseg.inference.native``): ~2.6x faster
    on a CPU, but not portable to other runtimes. The default graph uses standard ONNX operators.
    """
    proto = export_onnx_proto(
        model,
        opset,
        fold_batchnorm,
        config=config,
        dynamo=dynamo,
        in_channels=in_channels,
        weights_hash=weights_hash,
        native_saconv=native_saconv,
    )
    onnx = _import_onnx()
    path = Path(path)
    # one self-contained file (our models are far below protobuf's 2 GB limit)
    atomic_write_with(path, lambda tmp: onnx.save_model(proto, str(tmp)))
    return path


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file as a dict."""
    onnx = _import_onnx()
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


# --------------------------------------------------------------------------------------------
# inference


def _providers(ort, device: str) -> list:
    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigError(
                f"device {device!r}: this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); pip install onnxruntime-gpu, or use --device cpu"
            )
        return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]
    raise ConfigError(f"unknown device {device!r} for the onnx backend; use auto, cpu, cuda or cuda:N")


def _config_matches(meta: dict[str, str], config: RunConfig) -> bool:
    if meta.get("arch") != config.model.arch or meta.get("export_revision") != EXPORT_REVISION:
        return False
    try:
        kwargs = json.loads(meta.get("model_kwargs", "{}"))
    except json.JSONDecodeError:
        return False
    # JSON round trip on both sides: tuples and lists compare equal
    return kwargs == json.loads(json.dumps(config.model.kwargs))


class OnnxPredictor(ProbabilityPredictor):
    """``Predictor``'s interface on an onnxruntime session.

    ``predict(image)`` takes a (H, W) float image in [0, 1] and returns (H, W) probabilities,
    with the same preprocessing (``nerveseg.data.preprocess``) as training and ``Predictor``.

    Args:
        model: path of an ONNX file written by ``export_onnx``, or its bytes.
        config: the run's configuration (preprocessing size).
        device: "auto" (CUDA when onnxruntime has the CUDA provider, else CPU), "cpu", "cuda[:N]".
        intra_op_num_threads: onnxruntime's intra-op thread count; None keeps its default.
        optimization_level: an ``onnxruntime.GraphOptimizationLevel`` name; None picks the one
            measured fastest for the run's architecture (``ORT_LEVEL_BY_ARCH``, else ALL). Every
            level computes the same function.
        native_ops: register nerveseg's native operators (``nerveseg.SAConv``), which a model
            exported with ``native_saconv=True`` needs; builds the library on first use.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        config: RunConfig,
        device: str = "auto",
        intra_op_num_threads: int | None = None,
        optimization_level: str | None = None,
        native_ops: bool = False,
        tta: bool | None = None,
        allow_spinning: bool = True,
    ):
        ort = _import_onnxruntime()
        self._init_pipeline(config, tta)
        self.path = None if isinstance(model, bytes) else Path(model)
        self.optimization_level = optimization_level or ORT_LEVEL_BY_ARCH.get(config.model.arch, DEFAULT_ORT_LEVEL)
        if not hasattr(ort.GraphOptimizationLevel, self.optimization_level):
            raise ConfigError(f"unknown onnxruntime optimization level {self.optimization_level!r}")
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, self.optimization_level)
        if not allow_spinning:
            # idle threads sleep instead of spinning: with several sessions in one process (an
            # ensemble's members run one after another) spinning pools steal each other's cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if intra_op_num_threads is not None:
            if intra_op_num_threads < 1:
                raise ConfigError(f"intra_op_num_threads must be >= 1, got {intra_op_num_threads}")
            options.intra_op_num_threads = intra_op_num_threads
        self.native_ops = native_ops
        if native_ops:
            from .native import NativeUnavailable, register_saconv

            try:
                register_saconv(options)
            except NativeUnavailable as exc:
                raise ConfigError(str(exc)) from None
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(source, sess_options=options, providers=_providers(ort, device))
        except ConfigError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise InputError(
                self.path, f"onnxruntime cannot load this model ({exc})", "delete it to re-export from model.safetensors"
            ) from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def _check_signature(self, config: RunConfig) -> None:
        """InputError unless the graph takes one (B, C, H, W) image and gives one logit map per
        class of ``config`` (an ONNX file from another run must not be used with this config)."""
        where = self.path if self.path is not None else Path("model.onnx")
        fix = "delete it to re-export from model.safetensors, or use the config.json saved with it"
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise InputError(where, f"the ONNX graph has {len(inputs)} inputs and {len(outputs)} outputs; "
                                    "a nerveseg model has one image input and one logit output", fix)
        shape_in, shape_out = list(inputs[0].shape), list(outputs[0].shape)
        channels = config.model.kwargs.get("in_channels", 1)
        if len(shape_in) != 4 or (isinstance(shape_in[1], int) and shape_in[1] != channels):
            raise InputError(where, f"the ONNX input has shape {shape_in}; this model needs (batch, {channels}, height, width)", fix)
        if inputs[0].type != "tensor(float)":
            raise InputError(where, f"the ONNX input is {inputs[0].type}; nerveseg feeds float32", fix)
        n_classes = len(config.data.class_names)
        if len(shape_out) != 4 or (isinstance(shape_out[1], int) and shape_out[1] != n_classes):
            raise InputError(where, f"the ONNX output has shape {shape_out}; the run's config.json has {n_classes} "
                                    f"class(es) {list(config.data.class_names)}", fix)
        arch = self.metadata.get("arch")
        if arch is not None and arch != config.model.arch:
            raise InputError(where, f"the ONNX file was exported from architecture {arch!r}, but config.json "
                                    f"says {config.model.arch!r}", fix)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        device: str = "auto",
        intra_op_num_threads: int | None = None,
        opset: int = DEFAULT_OPSET,
        native: bool | None = None,
        allow_spinning: bool = True,
    ) -> "OnnxPredictor":
        """Load RUN/config.json and RUN/model.onnx, (re-)exporting model.onnx from
        RUN/model.safetensors when it is missing, was exported from other weights (SHA-256 of
        model.safetensors in the ONNX metadata), or for another architecture. A run folder with
        only config.json + model.onnx works too. When the folder is read-only the export is kept
        in memory.

        ``native`` (default: on when running on the CPU, the architecture has SAConvs and the
        native library builds here, unless the environment sets NERVESEG_NATIVE=0): run the
        graph with fused ``nerveseg.SAConv`` operators instead (same function, ~2.6x faster on a
        CPU; docs/performance.md), exported once into nerveseg's cache folder, not the run
        folder. If it cannot be used, the standard graph runs (with a warning when ``native``
        was asked for explicitly)."""
        _import_onnxruntime()  # fail early, before a possibly long export
        run_dir = Path(run_dir)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise InputError(run_dir, "not a nerveseg run folder (no config.json)", "pass the --out folder of `nerveseg train`")
        config = RunConfig.load(config_path)
        if config.members:
            return EnsemblePredictor.from_run(
                run_dir, lambda member: cls.from_run(member, device, intra_op_num_threads, opset, native, allow_spinning=False)
            )
        onnx_path, weights = run_dir / ONNX_FILENAME, run_dir / WEIGHTS_FILENAME
        if weights.is_file() and native is not False:
            native_path = _native_model(run_dir, config, device, opset, explicit=native is True)
            if native_path is not None:
                return cls(native_path, config, device, intra_op_num_threads, native_ops=True, allow_spinning=allow_spinning)
        if not weights.is_file():
            if not onnx_path.is_file():
                raise InputError(
                    weights, "weights file not found (and no model.onnx)", "point --model at a run folder written by `nerveseg train`"
                )
            predictor = cls(onnx_path, config, device, intra_op_num_threads, allow_spinning=allow_spinning)
            predictor._check_signature(config)  # no weights to re-export from: the file must fit config.json
            return predictor
        if not _cache_is_fresh(onnx_path, weights, config):
            model = _load_torch_model(run_dir, config)
            digest = weights_sha256(weights)
            try:
                export_onnx(model, onnx_path, opset, config=config, weights_hash=digest)
            except OSError as exc:  # read-only run folder: export to memory instead
                warnings.warn(f"{onnx_path}: cannot write the ONNX cache ({exc}); exporting in memory", stacklevel=2)
                proto = export_onnx_proto(model, opset, config=config, weights_hash=digest)
                return cls(proto.SerializeToString(), config, device, intra_op_num_threads, allow_spinning=allow_spinning)
        return cls(onnx_path, config, device, intra_op_num_threads, allow_spinning=allow_spinning)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def network_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._run(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        return torch.sigmoid(torch.from_numpy(logits).float())


def _cache_is_fresh(
    onnx_path: Path, weights: Path, config: RunConfig, native_ops: bool = False, digest: str | None = None
) -> bool:
    """Whether ``onnx_path`` was exported from these weights (``digest``: their SHA-256, when the
    caller has it already) for this architecture and export revision."""
    if not onnx_path.is_file():
        return False
    try:
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if native_ops:
            from .native import register_saconv

            register_saconv(options)
        meta = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]).get_modelmeta()
    except ConfigError:
        raise
    except Exception:  # unreadable / truncated cache: export again
        return False
    meta = dict(meta.custom_metadata_map)
    return meta.get("weights_sha256") == (digest or weights_sha256(weights)) and _config_matches(meta, config)


def _native_model(run_dir: Path, config: RunConfig, device: str, opset: int, explicit: bool) -> Path | None:
    """Path of the run's graph with native ``nerveseg.SAConv`` operators (exported on first
    use into the cache folder, keyed by the weights' hash), or None when it does not apply: a
    GPU device, no SAConv in the architecture, NERVESEG_NATIVE=0, or the library cannot be
    built (warned about when ``explicit``)."""
    import os

    from ..models import create
    from . import native

    def skip(reason: str) -> None:
        if explicit:
            warnings.warn(f"{run_dir}: not using the native SAConv operator ({reason}); running the standard graph", stacklevel=3)
        return None

    if os.environ.get("NERVESEG_NATIVE", "1") == "0" and not explicit:
        return None
    ort = _import_onnxruntime()
    if _providers(ort, device) != ["CPUExecutionProvider"]:
        return skip("it runs on the CPU only")
    with torch.device("meta"):  # the layer structure only: no weights allocated
        skeleton = create(config.model.arch, **config.model.kwargs)
    if not native.has_saconv(skeleton):
        return skip(f"{config.model.arch} has no SAConv")
    try:
        native.saconv_library()
    except native.NativeUnavailable as exc:
        return skip(str(exc))
    weights = run_dir / WEIGHTS_FILENAME
    digest = weights_sha256(weights)
    path = native.cache_dir() / "models" / f"{config.model.arch}-{digest[:24]}-r{EXPORT_REVISION}.onnx"
    if not _cache_is_fresh(path, weights, config, native_ops=True, digest=digest):
        if not _exporter_available():
            return skip(_EXPORT_MISSING)
        model = _load_torch_model(run_dir, config)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            export_onnx(model, path, opset, config=config, weights_hash=digest, native_saconv=True)
        except OSError as exc:
            return skip(f"cannot write {path} ({exc})")
    return path


def _load_torch_model(run_dir: Path, config: RunConfig) -> nn.Module:
    from ..models import create
    from ..training.checkpoint import load_weights

    model = create(config.model.arch, **config.model.kwargs)
    load_weights(model, run_dir / WEIGHTS_FILENAME)
    return model.eval()


# --------------------------------------------------------------------------------------------
# backend choice

BACKENDS = ("auto", "torch", "onnx")


def load_predictor(
    run_dir: str | Path,
    backend: str = "auto",
    device: str = "auto",
    intra_op_num_threads: int | None = None,
    allow_spinning: bool = True,
) -> Any:
    """A ``Predictor`` (backend "torch") or ``OnnxPredictor`` (backend "onnx") for a run folder.

    "auto" picks onnx when onnxruntime imports -- unless the device would be a GPU that only
    torch can use (onnxruntime without its CUDA provider), or model.onnx has to be exported and
    onnx/onnxscript are missing or the export fails (then torch, with a warning).
    ``intra_op_num_threads`` applies to the onnx backend only.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    from .predictor import Predictor

    if read_run_config(Path(run_dir)).members:  # an ensemble: each member on the backend it gets
        return EnsemblePredictor.from_run(
            run_dir, lambda member: load_predictor(member, backend, device, intra_op_num_threads, allow_spinning=False)
        )

    if backend == "torch":
        return Predictor.from_run(run_dir, device=device)
    if backend == "onnx":
        return OnnxPredictor.from_run(run_dir, device=device, intra_op_num_threads=intra_op_num_threads,
                                      allow_spinning=allow_spinning)
    # auto
    if not onnxruntime_available():
        return Predictor.from_run(run_dir, device=device)
    ort = _import_onnxruntime()
    wants_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_gpu and "CUDAExecutionProvider" not in ort.get_available_providers():
        return Predictor.from_run(run_dir, device=device)
    run_dir = Path(run_dir)
    needs_export = (run_dir / WEIGHTS_FILENAME).is_file() and not _cache_is_fresh_quiet(run_dir)
    if needs_export and not _exporter_available():
        return Predictor.from_run(run_dir, device=device)
    try:
        return OnnxPredictor.from_run(run_dir, device=device, intra_op_num_threads=intra_op_num_threads,
                                      allow_spinning=allow_spinning)
    except (InputError, ConfigError):
        raise
    except Exception as exc:  # an export the exporter cannot handle: torch still works
        warnings.warn(f"{run_dir}: ONNX export failed ({type(exc).__name__}: {exc}); using the torch backend", stacklevel=2)
        return Predictor.from_run(run_dir, device=device)


def _cache_is_fresh_quiet(run_dir: Path) -> bool:
    try:
        config = RunConfig.load(run_dir / "config.json")
    except ConfigError:
        return False
    return _cache_is_fresh(run_dir / ONNX_FILENAME, run_dir / WEIGHTS_FILENAME, config)
