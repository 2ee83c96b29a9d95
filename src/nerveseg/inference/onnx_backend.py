"""ONNX deployment: run an exported network with onnxruntime behind ``Predictor``'s API.

``OnnxPredictor`` has ``Predictor``'s interface (``from_run``, ``predict``, ``predict_many``,
``config``) and reuses the same preprocessing functions, so both give the same probabilities
(to ~1e-6). ``load_predictor`` chooses between them. Exporting is :mod:`.onnx_export`;
sessions, their options and the export cache are :mod:`.onnx_session`. This module re-exports
their public names, so ``nerveseg.inference.onnx_backend`` stays the one import of deployment.

onnxruntime is an optional dependency (and exporting needs ``onnx`` and ``onnxscript`` too): they
are imported only when used.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..errors import ConfigError, InputError
from .onnx_export import (
    DEFAULT_OPSET,
    INPUT_NAME,
    OUTPUT_NAME,
    export_onnx,
    export_onnx_proto,
    exporter_available,
    fold_batchnorm_,
    onnx_metadata,
    weights_sha256,
)
from .onnx_session import (
    DEFAULT_ORT_LEVEL,
    ONNX_FILENAME,
    ORT_LEVEL_BY_ARCH,
    WEIGHTS_FILENAME,
    cache_is_fresh,
    import_onnxruntime,
    load_torch_model,
    native_model,
    onnxruntime_available,
    open_session,
)
from .predictor import EnsemblePredictor, ProbabilityPredictor, read_run_config

__all__ = [
    "export_onnx",
    "export_onnx_proto",
    "fold_batchnorm_",
    "onnx_metadata",
    "weights_sha256",
    "OnnxPredictor",
    "load_predictor",
    "onnxruntime_available",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "DEFAULT_OPSET",
    "DEFAULT_ORT_LEVEL",
    "ORT_LEVEL_BY_ARCH",
    "ONNX_FILENAME",
    "WEIGHTS_FILENAME",
]


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
        self._init_pipeline(config, tta)
        self.path = None if isinstance(model, bytes) else Path(model)
        self.native_ops = native_ops
        self.session, self.optimization_level = open_session(
            model, config.model.arch, device, intra_op_num_threads, optimization_level, native_ops, allow_spinning)
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
        import_onnxruntime()  # fail early, before a possibly long export
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
            native_path = native_model(run_dir, config, device, opset, explicit=native is True)
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
        if not cache_is_fresh(onnx_path, weights, config):
            model = load_torch_model(run_dir, config)
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
    ort = import_onnxruntime()
    wants_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_gpu and "CUDAExecutionProvider" not in ort.get_available_providers():
        return Predictor.from_run(run_dir, device=device)
    run_dir = Path(run_dir)
    needs_export = (run_dir / WEIGHTS_FILENAME).is_file() and not _cache_is_fresh_quiet(run_dir)
    if needs_export and not exporter_available():
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
    return cache_is_fresh(run_dir / ONNX_FILENAME, run_dir / WEIGHTS_FILENAME, config)
