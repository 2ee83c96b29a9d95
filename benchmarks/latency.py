"""CPU speed of nerveseg's inference and training paths, as ratios measured in one run.

Usage: python benchmarks/latency.py [--threads 2] [--repeats 10] [--archs sa_unet,unet] [--out docs/latency.json]
           [--inductor]
       python benchmarks/latency.py --shipped [--model RUN] [--threads 2]   the shipped model end to end

``--shipped``: milliseconds per 534x512 frame through the default backend (``load_predictor``, as
``nerveseg segment`` runs it) with the model's own ensemble members and test-time augmentation:
preprocessing, every member, the mirrored pass, resizing back and post-processing included.

For each architecture at 512x512, batch 1: eager fp32 (default layout), eager channels_last,
channels_last + bf16 autocast, and onnxruntime at ORT_ENABLE_ALL / EXTENDED / BASIC; for SA-UNet also
nerveseg's native fused SAConv operators (nerveseg.inference.native, the default CPU path) and two
rejected levers: ECA gate + BatchNorm rewritten as one per-channel multiply-add (same function), and
int8 static quantization (QDQ, per-channel weights, calibrated on 4 random inputs; speed only). Then frames
per second of nerveseg's onnxruntime path (native operators for SA-UNet when they build, else the
per-architecture level) at native ultrasound sizes (442x565, 576x864), and training-step
throughput (batch 4, 256x256) in fp32 eager vs channels_last + bf16 autocast. Medians of `repeats`
after warm-up. Nothing here is a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nerveseg.inference import native
from nerveseg.inference.onnx_backend import DEFAULT_ORT_LEVEL, ORT_LEVEL_BY_ARCH, export_onnx
from nerveseg.models import create, replace_modules_
from nerveseg.models.blocks import SAConv
from nerveseg.training.losses import soft_dice_loss


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def ort_session(path: Path, threads: int, level: str, native_ops: bool = False):
    """One session at a time: each holds a thread pool whose threads spin after a run, so a
    second live session would steal CPU from the one being timed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if native_ops:
        native.register_saconv(options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def native_available() -> bool:
    try:
        native.saconv_library()
    except native.NativeUnavailable as exc:
        print(f"native SAConv operators not measured: {exc}")
        return False
    return True


def inference_variants(arch: str, threads: int, repeats: int, tmp: Path, inductor: bool = False) -> dict:

    torch.manual_seed(0)
    model = create(arch).eval()
    x = torch.randn(1, 1, 512, 512)
    results = {}
    with torch.inference_mode():
        results["eager fp32"] = median_ms(lambda: model(x), repeats)
        model = model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        results["eager fp32 channels_last"] = median_ms(lambda: model(xc), repeats)

        def bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(xc)

        results["eager bf16 autocast channels_last"] = median_ms(bf16, repeats)
        if inductor:  # torch.compile's C++/OpenMP code generation fuses the elementwise passes
            compiled = torch.compile(model, dynamic=False)
            compiled(xc)
            results["torch.compile (Inductor) fp32 channels_last"] = median_ms(lambda: compiled(xc), repeats)
    path = export_onnx(create(arch).eval(), tmp / f"{arch}.onnx")
    feed = {"image": x.numpy()}
    for level in ("ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC"):
        session = ort_session(path, threads, level)
        results[f"onnxruntime fp32 {level}"] = median_ms(lambda session=session: session.run(None, feed), repeats)
    default_level = ORT_LEVEL_BY_ARCH.get(arch, DEFAULT_ORT_LEVEL)
    fps_path, fps_native = path, False
    if arch == "sa_unet" and native_available():
        fused = export_onnx(create(arch).eval(), tmp / f"{arch}-native.onnx", native_saconv=True)
        for level in ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
            session = ort_session(fused, threads, level, native_ops=True)
            results[f"onnxruntime fp32 native SAConv operators {level}"] = median_ms(
                lambda session=session: session.run(None, feed), repeats)
        del session
        fps_path, fps_native = fused, True
    if arch == "sa_unet":
        folded = export_gate_bn_folded(create(arch).eval(), tmp / "gate_bn.onnx", x)
        session = ort_session(folded, threads, default_level)
        results[f"onnxruntime fp32 gate+BN as one multiply-add {default_level}"] = median_ms(
            lambda: session.run(None, feed), repeats)
        quantized = quantize_int8(path, tmp)
        if quantized is not None:
            session = ort_session(quantized, threads, "ORT_ENABLE_ALL")
            results["onnxruntime int8 QDQ ORT_ENABLE_ALL"] = median_ms(lambda: session.run(None, feed), repeats)
    fps = {}
    session = ort_session(fps_path, threads, default_level, native_ops=fps_native)
    for h, w in ((442, 565), (576, 864)):
        frame = {"image": np.random.default_rng(0).standard_normal((1, 1, h, w), dtype=np.float32)}
        fps[f"{h}x{w}"] = 1000 / median_ms(lambda frame=frame: session.run(None, frame), repeats)
    return {"latency_ms_512": results, "fps_onnxruntime": fps, "fps_path": "native SAConv operators" if fps_native else default_level}


class _GateBatchNormFolded(nn.Module):
    """SAConv with ECA's gate and the BatchNorm after it merged: relu(z * (g * s) + t), where
    s, t are BatchNorm's per-channel scale and shift and g the attention weights. Same function as
    ``SAConv.forward`` in eval mode; one multiply-add over the feature map instead of two passes."""

    def __init__(self, sa: SAConv):
        super().__init__()
        self.sa = sa
        bn = sa.norm
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", (bn.bias - bn.running_mean * scale).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat(self.sa.scales(x), dim=1)
        pooled = z.mean(dim=3).mean(dim=2)
        gate = torch.sigmoid(self.sa.attention.conv(pooled.unsqueeze(1)).squeeze(1))
        return torch.relu(torch.addcmul(self.shift[None, :, None, None], z, (gate * self.scale)[:, :, None, None]))


def export_gate_bn_folded(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    replace_modules_(model, lambda m: isinstance(m, SAConv), _GateBatchNormFolded)
    torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamo=True, opset_version=18)
    return path


def quantize_int8(path: Path, tmp: Path) -> Path | None:
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        return None

    class RandomInputs(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.inputs = iter([{"image": rng.standard_normal((1, 1, 512, 512), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.inputs, None)

    pre = tmp / "int8_pre.onnx"
    quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
    out = tmp / "int8.onnx"
    quantize_static(str(pre), str(out), RandomInputs(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def training_throughput(arch: str, repeats: int) -> dict:
    out = {}
    for name, channels_last, amp in (("fp32 eager", False, False), ("channels_last + bf16 autocast", True, True)):
        torch.manual_seed(0)
        model = create(arch).train()
        x, y = torch.randn(4, 1, 256, 256), (torch.rand(4, 1, 256, 256) > 0.9).float()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=5e-4)

        def step(model=model, x=x, y=y, opt=opt, amp=amp):  # bound now: timed within this iteration
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = soft_dice_loss(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        out[name] = 4 * 1000 / median_ms(step, max(3, repeats // 2), warmup=1)
    return out


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), which platform.processor() leaves empty on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def shipped_latency(model_dir: str | None, threads: int, repeats: int, frame: tuple[int, int] = (534, 512)) -> dict:
    from nerveseg.inference.onnx_backend import load_predictor
    from nerveseg.pretrained import pretrained_dir

    folder = Path(model_dir) if model_dir else pretrained_dir()
    predictor = load_predictor(folder, intra_op_num_threads=threads)
    width, height = frame  # default 534x512: usgra-seg's frames; mn-wrist's are 606x468
    image = np.random.default_rng(0).random((height, width)).astype(np.float32)
    ms = median_ms(lambda: predictor.predict_classes(image), repeats, warmup=3)
    members = getattr(predictor, "members", [predictor])
    kinds = sorted({type(m).__name__ + (" (native SAConv)" if getattr(m, "native_ops", False) else "") for m in members})
    size = f"{width}x{height}"
    result = {"model": folder.name, f"ms_per_frame_{size}": round(ms, 2), "members": len(members), "tta": predictor.tta,
              "classes": predictor.class_names, "input_size": predictor.size, "backend": kinds, "threads": threads,
              "machine": f"{platform.platform()}, {cpu_name()}", "date": time.strftime("%Y-%m-%d")}
    print(f"shipped model {folder.name}: {ms:.1f} ms per {size} frame (median of {repeats}; {len(members)} member(s), "
          f"tta={predictor.tta}, input {predictor.size}px, classes {predictor.class_names}, {', '.join(kinds)}, {threads} threads)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--archs", default="sa_unet,unet")
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    parser.add_argument("--inductor", action="store_true", help="also torch.compile (needs a C++ compiler; ~20 s per model)")
    parser.add_argument("--shipped", action="store_true", help="only the shipped model (or --model) end to end, 534x512")
    parser.add_argument("--model", default=None, help="with --shipped: a run or ensemble folder instead")
    parser.add_argument("--frame", default="534x512", help="with --shipped: frame WIDTHxHEIGHT (mn-wrist: 606x468)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.shipped:
        width, height = (int(v) for v in args.frame.lower().split("x"))
        shipped_latency(args.model, args.threads, max(args.repeats, 20), (width, height))
        return
    report = {"machine": f"{platform.platform()}, {cpu_name()}",
              "torch": torch.__version__, "threads": args.threads, "date": time.strftime("%Y-%m-%d"), "archs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            r = inference_variants(arch, args.threads, args.repeats, Path(tmp), inductor=args.inductor)
            r["train_images_per_s_256_batch4"] = training_throughput(arch, args.repeats)
            report["archs"][arch] = r
            base = r["latency_ms_512"]["eager fp32"]
            print(f"\n{arch}: 512x512 batch 1, {args.threads} threads (median ms, ratio to eager fp32)")
            for name, ms in r["latency_ms_512"].items():
                print(f"  {name:<40} {ms:8.1f} ms  x{base / ms:5.2f}")
            for size, fps in r["fps_onnxruntime"].items():
                print(f"  onnxruntime frames/s at {size:<17} {fps:8.1f}  ({r['fps_path']})")
            for name, ips in r["train_images_per_s_256_batch4"].items():
                print(f"  training images/s (256, batch 4) {name:<30} {ips:6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
