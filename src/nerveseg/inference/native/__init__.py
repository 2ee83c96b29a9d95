"""Native CPU kernel for SA-UNet: the fused SAConv as an onnxruntime custom operator.

onnxruntime runs one SAConv as ~15 operators (1x1 and depthwise convolutions, a concatenation,
two reductions, the ECA gate, BatchNorm, ReLU), each a pass over memory; at 512x512 that
traffic, not arithmetic, is most of SA-UNet's CPU time (docs/performance.md). ``saconv_kernel.c``
computes a whole SAConv in one streamed pass over the image plus one pass for gate, BatchNorm and
ReLU, and ``saconv_op.c`` exposes it to onnxruntime as the operator ``nerveseg.SAConv``.

Pieces:
- ``saconv_library()`` compiles both C files with the system C compiler (``$CC``, else ``cc`` /
  ``gcc``) at first use, ``-O3 -march=native``, into a per-user cache keyed by the sources, the
  compiler and the CPU, and returns the shared library's path; ``NativeUnavailable`` says why
  when it cannot (no compiler, not Linux/macOS x86-64/arm64, compile error). Callers fall back
  to the portable graph.
- ``fuse_saconv_(model)`` swaps every ``SAConv`` for ``FusedSAConv``: the same function (tested
  against the module), written as one call of the torch custom op ``nerveseg::saconv``, which the
  ONNX exporter translates to one ``nerveseg.SAConv`` node (``onnx_translation_table``).
- ``register_saconv(session_options)`` makes an onnxruntime session able to run that node.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...models.base import SegmentationModel

__all__ = [
    "DOMAIN",
    "OP_NAME",
    "NativeUnavailable",
    "cache_dir",
    "saconv_library",
    "native_saconv_available",
    "register_saconv",
    "FusedSAConv",
    "fuse_saconv_",
    "fuse_saconv_network",
    "FusedUNetDecoder",
    "saconv_reference",
    "onnx_translation_table",
]

DOMAIN = "nerveseg"
OP_NAME = "SAConv"
ABI_VERSION = 2  # nerveseg_saconv_abi() of a library built from these sources
_HERE = Path(__file__).resolve().parent
_SOURCES = ("saconv_kernel.c", "saconv_op.c")
_HEADERS = ("saconv_kernel.h",)
_FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC", "-fvisibility=default")
_LIBS = ("-lm", "-lpthread")
_LIBRARY_NAME = "libnerveseg_saconv.so"


class NativeUnavailable(RuntimeError):
    """The native SAConv library cannot be built or loaded here (the message says why)."""


# --------------------------------------------------------------------------------------------
# building the shared library


def _cache_root() -> Path:
    if os.environ.get("NERVESEG_CACHE_DIR"):
        return Path(os.environ["NERVESEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nerveseg"


def cache_dir() -> Path:
    """Where the native library and the graphs exported for it are kept:
    $NERVESEG_CACHE_DIR, else $XDG_CACHE_HOME/nerveseg, else ~/.cache/nerveseg."""
    return _cache_root() / "native"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags (a
    cache on a shared home directory must not hand an AVX-512 build to a CPU without it)."""
    parts = [platform.machine(), platform.system()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                parts.append(line)
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _build_key(compiler: str) -> str:
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        digest.update(name.encode() + b"\0" + (_HERE / name).read_bytes())
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = compiler
    for part in (version, " ".join(_FLAGS + _LIBS), _cpu_signature(), str(ABI_VERSION)):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _check_library(path: Path) -> None:
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.nerveseg_saconv_abi()
    except (OSError, AttributeError) as exc:
        raise NativeUnavailable(f"{path}: cannot load the native SAConv library ({exc})") from None
    if abi != ABI_VERSION:
        raise NativeUnavailable(f"{path}: library ABI {abi}, expected {ABI_VERSION}; delete it to rebuild")


@functools.lru_cache(maxsize=None)
def _build(cache_root: str) -> Path:
    if sys.platform not in ("linux", "darwin"):
        raise NativeUnavailable(f"the native SAConv kernel is built on Linux and macOS only, not {sys.platform}")
    compiler = _compiler()
    if compiler is None:
        raise NativeUnavailable("no C compiler found (set $CC, or install gcc) to build the native SAConv kernel")
    folder = Path(cache_root) / "native" / "lib" / _build_key(compiler)
    library = folder / _LIBRARY_NAME
    if not library.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # compile to a temporary name in the same folder, then rename: a concurrent process
            # or an interrupted build never leaves a half-written library under the final name
            fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
            os.close(fd)
        except OSError as exc:
            raise NativeUnavailable(f"cannot write the native kernel cache {folder} ({exc}); set NERVESEG_CACHE_DIR") from None
        tmp = Path(tmp_name)
        command = [compiler, *_FLAGS, "-o", str(tmp), *(str(_HERE / s) for s in _SOURCES), *_LIBS]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise NativeUnavailable(f"compiling the native SAConv kernel failed:\n{' '.join(command)}\n{result.stderr.strip()}")
            os.replace(tmp, library)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NativeUnavailable(f"compiling the native SAConv kernel failed ({exc})") from None
        finally:
            tmp.unlink(missing_ok=True)
    _check_library(library)
    return library


def saconv_library() -> Path:
    """Path of the compiled ``nerveseg.SAConv`` onnxruntime library, building it on first use
    (about a second). Raises ``NativeUnavailable`` with the reason when it cannot."""
    return _build(str(_cache_root()))


def native_saconv_available() -> bool:
    """Whether ``saconv_library()`` succeeds here (builds it if needed)."""
    try:
        saconv_library()
    except NativeUnavailable:
        return False
    return True


def register_saconv(session_options) -> Path:
    """Let sessions made with ``session_options`` (an ``onnxruntime.SessionOptions``) run
    ``nerveseg.SAConv`` nodes. Returns the library's path; raises ``NativeUnavailable``."""
    path = saconv_library()
    session_options.register_custom_ops_library(str(path))
    return path


# --------------------------------------------------------------------------------------------
# torch side: one custom op per SAConv, and its ONNX translation


def saconv_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    dw: torch.Tensor,
    dwb: torch.Tensor,
    pw: torch.Tensor,
    pwb: torch.Tensor,
    eca: torch.Tensor,
    bn_scale: torch.Tensor,
    bn_shift: torch.Tensor,
) -> torch.Tensor:
    """An eval-mode SAConv from the flattened weights the native operator takes, in torch."""
    width = w1.shape[0]
    f = F.conv2d(x, w1[:, :, None, None], b1)
    scales = [f]
    for k in range(dw.shape[0]):
        f = F.conv2d(f, dw[k].reshape(width, 1, 3, 3), dwb[k], padding=1, groups=width)
        f = F.conv2d(f, pw[k][:, :, None, None], pwb[k])
        scales.append(f)
    z = torch.cat(scales, dim=1)
    logits = F.conv1d(z.mean(dim=(2, 3))[:, None], eca[None, None], padding=eca.numel() // 2)[:, 0]
    scale = torch.sigmoid(logits) * bn_scale
    return torch.relu(z * scale[:, :, None, None] + bn_shift[None, :, None, None])


WEIGHT_NAMES = ("w1", "b1", "dw", "dwb", "pw", "pwb", "eca", "bn_scale", "bn_shift")


def _custom_op(name: str, inputs: tuple[str, ...], function, output_shape):
    """Register ``nerveseg::<name>(inputs..., weights...) -> Tensor`` with ``function`` as its
    eager implementation and ``output_shape(first input, bn_scale)`` for tracing."""
    schema = "(" + ", ".join(f"Tensor {arg}" for arg in inputs + WEIGHT_NAMES) + ") -> Tensor"
    op = torch.library.custom_op(f"nerveseg::{name}", function, mutates_args=(), schema=schema)
    op.register_fake(lambda *args: args[0].new_empty(output_shape(args[0], args[-2])))
    return op


_saconv_op = _custom_op(
    "saconv",
    ("x",),
    saconv_reference,
    lambda x, bn_scale: (x.shape[0], bn_scale.shape[0], x.shape[2], x.shape[3]),
)
_saconv_up2_op = _custom_op(
    "saconv_up2",
    ("x",),
    lambda x, *w: saconv_reference(F.interpolate(x, scale_factor=2.0, mode="nearest"), *w),
    lambda x, bn_scale: (x.shape[0], bn_scale.shape[0], 2 * x.shape[2], 2 * x.shape[3]),
)
_saconv_cat_op = _custom_op(
    "saconv_cat",
    ("a", "b"),
    lambda a, b, *w: saconv_reference(torch.cat([a, b], dim=1), *w),
    lambda a, bn_scale: (a.shape[0], bn_scale.shape[0], a.shape[2], a.shape[3]),
)


class FusedSAConv(nn.Module):
    """An eval-mode ``SAConv`` as one ``nerveseg::saconv`` call (same function).

    BatchNorm is kept as its per-channel affine (``bn_scale``, ``bn_shift``): it follows ECA's
    input-dependent gate, so it is applied together with the gate, not folded into the cascade.
    Missing biases (``bias=False``) become zeros.
    """

    def __init__(self, saconv: nn.Module):
        super().__init__()
        from ...models.blocks import SAConv

        if not isinstance(saconv, SAConv) or not fusable(saconv):
            raise ValueError("FusedSAConv needs an eval-mode SAConv with BatchNorm + ReLU (norm=True)")
        first = saconv.cascade[0]
        width = first.out_channels

        def bias(conv: nn.Conv2d) -> torch.Tensor:
            return conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)

        def stacked(tensors: list[torch.Tensor], *shape: int) -> torch.Tensor:
            return torch.stack(tensors) if tensors else torch.zeros(0, *shape)  # n = 1: no stages

        stages = list(saconv.cascade[1:])
        self.register_buffer("w1", first.weight.detach().reshape(width, -1).clone())
        self.register_buffer("b1", bias(first).clone())
        self.register_buffer("dw", stacked([s[0].weight.detach().reshape(width, 9) for s in stages], width, 9))
        self.register_buffer("dwb", stacked([bias(s[0]) for s in stages], width))
        self.register_buffer("pw", stacked([s[1].weight.detach().reshape(width, width) for s in stages], width, width))
        self.register_buffer("pwb", stacked([bias(s[1]) for s in stages], width))
        self.register_buffer("eca", saconv.attention.conv.weight.detach().reshape(-1).clone())
        bn = saconv.norm
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean * scale
        self.register_buffer("bn_scale", scale.float().clone())
        self.register_buffer("bn_shift", shift.float().clone())

    def weights(self) -> tuple[torch.Tensor, ...]:
        return (self.w1, self.b1, self.dw, self.dwb, self.pw, self.pwb, self.eca, self.bn_scale, self.bn_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _saconv_op(x, *self.weights())

    def forward_upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(nearest x2 upsampling of x)`` without materialising the upsampled input."""
        return _saconv_up2_op(x, *self.weights())

    def forward_concat(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``forward(torch.cat([a, b], dim=1))`` without materialising the concatenation."""
        return _saconv_cat_op(a, b, *self.weights())


def fusable(saconv: nn.Module) -> bool:
    """An SAConv the native operator computes: eval mode, BatchNorm with running statistics
    followed by ReLU, 3x3 depthwise stages (what ``SAConv`` builds)."""
    bn = getattr(saconv, "norm", None)
    return (
        not saconv.training
        and isinstance(bn, nn.BatchNorm2d)
        and bn.track_running_stats
        and bn.running_mean is not None
        and isinstance(getattr(saconv, "act", None), nn.ReLU)
        and saconv.attention.conv.weight.numel() % 2 == 1
    )


def fuse_saconv_(model: nn.Module) -> int:
    """Replace every fusable ``SAConv`` in ``model`` by ``FusedSAConv``, in place; returns how many."""
    from ...models import replace_modules_
    from ...models.blocks import SAConv

    return replace_modules_(model, lambda m: isinstance(m, SAConv) and fusable(m), FusedSAConv)


class FusedUNetDecoder(SegmentationModel):
    """A ``UNetSkeleton`` (SA-UNet) whose decoder steps each run as two native calls: the
    up-sampling SAConv reads the deeper feature at half resolution (``forward_upsampled``) and
    the level's first SAConv reads skip and up-sampled features side by side
    (``forward_concat``), so neither the x2 upsampled tensor nor the concatenation is written to
    memory. Same function as ``UNetSkeleton.forward_padded``; built by ``fuse_saconv_`` when the
    skeleton's upsampling is nearest x2 and its decoder SAConvs are fused."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.size_divisor = unet.size_divisor

    @staticmethod
    def applies_to(unet: nn.Module) -> bool:
        from ...models.base import UNetSkeleton

        upsample = getattr(unet, "upsample", None)
        return (
            isinstance(unet, UNetSkeleton)
            and isinstance(upsample, nn.Upsample)
            and upsample.mode == "nearest"
            and upsample.size is None
            and float(upsample.scale_factor) == 2.0
            and all(isinstance(m, FusedSAConv) for m in unet.up_convs)
            and all(isinstance(level, nn.Sequential) and isinstance(level[0], FusedSAConv) for level in unet.decoder)
        )

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        x, skips = unet.encode(x)
        for up_conv, level in zip(unet.up_convs, unet.decoder):
            x = up_conv.forward_upsampled(x)
            x = level[0].forward_concat(skips.pop(), x)
            for layer in list(level)[1:]:
                x = layer(x)
        return unet.head(x)


def fuse_saconv_network(model: nn.Module) -> nn.Module:
    """``fuse_saconv_(model)`` (in place), wrapped in ``FusedUNetDecoder`` when that applies."""
    fuse_saconv_(model)
    return FusedUNetDecoder(model) if FusedUNetDecoder.applies_to(model) else model


def has_saconv(model: nn.Module) -> bool:
    from ...models.blocks import SAConv

    return any(isinstance(m, SAConv) for m in model.modules())


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: each call of
    ``nerveseg::saconv`` / ``saconv_up2`` / ``saconv_cat`` becomes one node ``nerveseg.SAConv`` /
    ``SAConvUp2`` / ``SAConvCat`` (opset ``nerveseg`` 1)."""
    import onnxscript
    from onnx.defs import OpSchema

    opset = onnxscript.values.Opset(DOMAIN, 1)

    def op(name: str, inputs: tuple[str, ...]):
        schema = OpSchema(
            name,
            DOMAIN,
            1,
            inputs=[OpSchema.FormalParameter(i, "T") for i in inputs + WEIGHT_NAMES],
            outputs=[OpSchema.FormalParameter("y", "T")],
            type_constraints=[("T", ["tensor(float)"], "float32")],
        )
        return onnxscript.values.Op(opset, name, schema)

    plain, up2, cat = op(OP_NAME, ("x",)), op("SAConvUp2", ("x",)), op("SAConvCat", ("a", "b"))

    def saconv(x, *w):
        return plain(x, *w)

    def saconv_up2(x, *w):
        return up2(x, *w)

    def saconv_cat(a, b, *w):
        return cat(a, b, *w)

    return {
        torch.ops.nerveseg.saconv.default: saconv,
        torch.ops.nerveseg.saconv_up2.default: saconv_up2,
        torch.ops.nerveseg.saconv_cat.default: saconv_cat,
    }
