"""onnxruntime sessions for nerveseg's graphs: the execution providers for a device, the
session options (graph optimisation level per architecture, threads, spinning, nerveseg's
native operators), and whether a cached ``model.onnx`` still matches the run's weights and
architecture (:func:`cache_is_fresh`), including the native-operator graph kept in nerveseg's
cache folder (:func:`native_model`).

onnxruntime is an optional dependency, imported only when used.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import RunConfig
from ..errors import ConfigError, InputError
from .onnx_export import EXPORT_MISSING, EXPORT_REVISION, export_onnx, exporter_available, weights_sha256

ONNX_FILENAME = "model.onnx"
WEIGHTS_FILENAME = "model.safetensors"
ORT_MISSING = "--backend onnx needs onnxruntime: pip install onnxruntime"
# onnxruntime's graph optimisation level per architecture, measured on a 2-core AVX-512 CPU at
# 512x512 (docs/performance.md): for SA-UNet the NCHWc layout that ORT_ENABLE_ALL adds costs more in
# reorders around its concatenations and attention than it gains (EXTENDED 140 ms vs ALL 157 ms);
# for U-Net's plain 3x3 convolutions ALL is the faster one.
ORT_LEVEL_BY_ARCH = {"sa_unet": "ORT_ENABLE_EXTENDED"}
DEFAULT_ORT_LEVEL = "ORT_ENABLE_ALL"


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(ORT_MISSING) from None
    return onnxruntime


def onnxruntime_available() -> bool:
    try:
        import_onnxruntime()
    except ConfigError:
        return False
    return True


def providers_for(ort, device: str) -> list:
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


def open_session(
    model: str | Path | bytes,
    arch: str,
    device: str = "auto",
    intra_op_num_threads: int | None = None,
    optimization_level: str | None = None,
    native_ops: bool = False,
    allow_spinning: bool = True,
):
    """(an ``onnxruntime.InferenceSession`` on ``model``, the optimisation level it uses).

    ``optimization_level`` None picks the one measured fastest for ``arch``
    (:data:`ORT_LEVEL_BY_ARCH`, else ALL); every level computes the same function. A file
    onnxruntime cannot load is an InputError naming it."""
    ort = import_onnxruntime()
    level = optimization_level or ORT_LEVEL_BY_ARCH.get(arch, DEFAULT_ORT_LEVEL)
    if not hasattr(ort.GraphOptimizationLevel, level):
        raise ConfigError(f"unknown onnxruntime optimization level {level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if not allow_spinning:
        # idle threads sleep instead of spinning: with several sessions in one process (an
        # ensemble's members run one after another) spinning pools steal each other's cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if intra_op_num_threads is not None:
        if intra_op_num_threads < 1:
            raise ConfigError(f"intra_op_num_threads must be >= 1, got {intra_op_num_threads}")
        options.intra_op_num_threads = intra_op_num_threads
    if native_ops:
        from .native import NativeUnavailable, register_saconv

        try:
            register_saconv(options)
        except NativeUnavailable as exc:
            raise ConfigError(str(exc)) from None
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers_for(ort, device))
    except ConfigError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise InputError(
            None if isinstance(model, bytes) else Path(model), f"onnxruntime cannot load this model ({exc})",
            "delete it to re-export from model.safetensors"
        ) from None
    return session, level


def cache_is_fresh(
    onnx_path: Path, weights: Path, config: RunConfig, native_ops: bool = False, digest: str | None = None
) -> bool:
    """Whether ``onnx_path`` was exported from these weights (``digest``: their SHA-256, when the
    caller has it already) for this architecture and export revision."""
    if not onnx_path.is_file():
        return False
    try:
        ort = import_onnxruntime()
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


def native_model(run_dir: Path, config: RunConfig, device: str, opset: int, explicit: bool) -> Path | None:
    """Path of the run's graph with native ``nerveseg.SAConv`` operators (exported on first
    use into the cache folder, keyed by the weights' hash), or None when it does not apply: a
    GPU device, no SAConv in the architecture, NERVESEG_NATIVE=0, or the library cannot be
    built (warned about when ``explicit``)."""
    from ..models import create
    from . import native

    def skip(reason: str) -> None:
        if explicit:
            warnings.warn(f"{run_dir}: not using the native SAConv operator ({reason}); running the standard graph", stacklevel=3)
        return None

    if os.environ.get("NERVESEG_NATIVE", "1") == "0" and not explicit:
        return None
    ort = import_onnxruntime()
    if providers_for(ort, device) != ["CPUExecutionProvider"]:
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
    if not cache_is_fresh(path, weights, config, native_ops=True, digest=digest):
        if not exporter_available():
            return skip(EXPORT_MISSING)
        model = load_torch_model(run_dir, config)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            export_onnx(model, path, opset, config=config, weights_hash=digest, native_saconv=True)
        except OSError as exc:
            return skip(f"cannot write {path} ({exc})")
    return path


def load_torch_model(run_dir: Path, config: RunConfig) -> nn.Module:
    from ..models import create
    from ..training.checkpoint import load_weights

    model = create(config.model.arch, **config.model.kwargs)
    load_weights(model, run_dir / WEIGHTS_FILENAME)
    return model.eval()
