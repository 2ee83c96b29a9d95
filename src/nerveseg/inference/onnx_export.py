"""Export a trained network to one self-describing ONNX file.

``export_onnx`` writes input ``image`` (B, 1, H, W) float32 with dynamic batch, height and width
(any H, W -- the padding to a multiple of the network's size divisor is part of the graph),
output ``logits`` (B, 1, H, W), and metadata naming the architecture, its arguments, the
preprocessing size, the weights' SHA-256 and the nerveseg version. The ONNX file plus the run's
``config.json`` is all a deployment needs; torch weights are not. Running it is
:mod:`.onnx_session` (sessions) and :mod:`.onnx_backend` (the predictor).

Exporting needs ``onnx`` and ``onnxscript``, imported only when used.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..config import RunConfig
from ..errors import ConfigError
from ..io_utils import atomic_write_with

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
# bumped whenever export_onnx writes a different graph for the same weights, so that cached
# RUN/model.onnx files from an older export are re-exported
EXPORT_REVISION = "1"
EXPORT_MISSING = "exporting to ONNX needs onnx and onnxscript: pip install onnx onnxscript"
_DIM_NAMES = {0: "batch", 2: "height", 3: "width"}


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError(EXPORT_MISSING) from None
    return onnx


def exporter_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


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
            raise ConfigError(EXPORT_MISSING) from None
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
