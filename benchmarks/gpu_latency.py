"""GPU inference latency of nerveseg's networks: eager, autocast, torch.compile and CUDA graphs.

Usage: python benchmarks/gpu_latency.py [--archs sa_unet,unet] [--size 512] [--repeats 50] [--warmup 20]
           [--batch 32] [--compile-mode default|max-autotune-no-cudagraphs|max-autotune]
           [--groups eager,compile,cudagraph,reduce-overhead] [--dtypes fp32,bf16,fp16]
           [--no-tf32] [--out FILE.json] [--cpu-check [--cpu-compile] [--threads N]]

For each architecture, at size x size, batch 1, under torch.inference_mode, with the model and input in
channels_last and cudnn.benchmark on, in fp32 and with torch.autocast("cuda") in bfloat16 and float16:

  eager                  the plain nn.Module;
  compile[MODE]          torch.compile(model, mode=MODE, dynamic=False); MODE is --compile-mode, "default"
                         unless changed (max-autotune* compiles take much longer);
  CUDA graph             torch.cuda.CUDAGraph capture of the eager model with static input and output
                         buffers (autocast with cache_enabled=False inside the capture); each call copies
                         the input into the static buffer and replays the graph;
  compile[reduce-overhead]  torch.compile's own CUDA-graph mode (cudagraph trees).

Latency is the median over --repeats calls after --warmup calls. Each call is timed with a pair of
torch.cuda.Event(enable_timing=True) recorded around it, with a torch.cuda.synchronize() before each call
(so launch overhead counts: this is per-image latency, not pipelined time). Then throughput
(images/s) at --batch (32) for eager bf16 and for the compiled variant with the lowest batch-1 latency.
Compile time (the first call, synchronized) is reported separately and is not part of the latency.
Each variant's sigmoid output is compared with eager fp32 (max |difference|) as a sanity check.

Every variant runs in its own try/except: a failure is reported as "failed: <reason>" and the rest go
on. With --out, the JSON is rewritten after every variant, so a run cut short keeps what it measured.

Without CUDA the script refuses (exit code 2) unless --cpu-check is given: then it runs the code paths
that make sense on the CPU (eager fp32 and bf16 with autocast "cpu"; torch.compile only with
--cpu-compile; CUDA graphs and fp16 skipped) at a tiny size (defaults --size 64 --repeats 3
--warmup 1 --batch 4), timed with time.perf_counter. Those numbers check the script, nothing else.

Random weights (latency does not depend on them); BatchNorm in eval mode. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from nerveseg.models import count_parameters, create

PAPER_REFERENCE = {
    "ms_per_image": 9.9,
    "gpu": "RTX 3090",
    "source": "Kim et al., Ultrasonography 2022;41:706-717 (SA-UNet paper), as reported there",
    "note": "the paper's figure, with its own implementation and setup; not measured by this script",
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GROUPS = ("eager", "compile", "cudagraph", "reduce-overhead")


class Skipped(Exception):
    """A variant that does not apply here (reported as "skipped: <reason>", not as a failure)."""


# --------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> dict:
    """Per-call wall time of ``fn`` in ms: median, mean, min, p90 over ``repeats`` after ``warmup`` calls.

    On CUDA each call is bracketed by two CUDA events after a synchronize (so the GPU is idle when the
    start event is recorded and the interval includes launch overhead); on the CPU by time.perf_counter.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    if device.type == "cuda":
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in pairs:
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in pairs]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": ordered[0],
        "p90_ms": p90,
        "repeats": repeats,
        "warmup": warmup,
        "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
    }


def timed_first_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one synchronized call (the compile, for torch.compile variants)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- variants


def autocast(device: torch.device, dtype: torch.dtype, cache_enabled: bool = True):
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def build_eager(model, x, device, dtype, opts) -> tuple[Callable, dict]:
    if device.type == "cpu" and dtype is torch.float16:
        raise Skipped("fp16 autocast is a GPU path (--cpu-check runs fp32 and bf16)")

    def fn():
        with autocast(device, dtype):
            return model(x)

    return fn, {}


def graph_break_count() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


def build_compiled(model, x, device, dtype, opts, mode: str) -> tuple[Callable, dict]:
    if device.type == "cpu":
        if mode == "reduce-overhead":
            raise Skipped("needs CUDA (CUDA graphs)")
        if not opts.cpu_compile:
            raise Skipped("torch.compile on the CPU only with --cpu-compile")
        if dtype is torch.float16:
            raise Skipped("fp16 autocast is a GPU path (--cpu-check runs fp32 and bf16)")
    torch._dynamo.reset()
    breaks_before = graph_break_count()
    compiled = torch.compile(model, mode=mode, dynamic=False)
    mark_step = mode == "reduce-overhead"

    def fn():
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, dtype):
            return compiled(x)

    compile_s = timed_first_call(fn, device)
    breaks_after = graph_break_count()
    breaks = None if breaks_before is None or breaks_after is None else breaks_after - breaks_before
    return fn, {"compile_s": compile_s, "compile_mode": mode, "graph_breaks": breaks}


def build_cuda_graph(model, x, device, dtype, opts) -> tuple[Callable, dict]:
    if device.type != "cuda":
        raise Skipped("needs CUDA")
    t0 = time.perf_counter()
    static_x = x.clone()  # preserves channels_last

    def step():
        # the autocast weight cache must be off inside a capture (torch.cuda.graph docs)
        with autocast(device, dtype, cache_enabled=False):
            return model(static_x)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up (cudnn.benchmark picks its algorithms) off the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    torch.cuda.synchronize(device)
    capture_s = time.perf_counter() - t0

    def fn():
        static_x.copy_(x)  # a real pipeline copies each new frame into the static input
        graph.replay()
        return static_out

    return fn, {"capture_s": capture_s, "_keep": graph}


def variant_table(groups: list[str], dtypes: list[str], compile_mode: str) -> list[tuple[str, str, Callable]]:
    """(name, dtype key, builder) in report order."""
    out = []
    for group in GROUPS:
        if group not in groups:
            continue
        for key in dtypes:
            if group == "eager":
                out.append((f"eager {key}", key, build_eager))
            elif group == "compile":
                out.append((f"compile[{compile_mode}] {key}", key,
                            lambda m, x, d, t, o: build_compiled(m, x, d, t, o, compile_mode)))
            elif group == "cudagraph":
                out.append((f"CUDA graph {key}", key, build_cuda_graph))
            else:
                out.append((f"compile[reduce-overhead] {key}", key,
                            lambda m, x, d, t, o: build_compiled(m, x, d, t, o, "reduce-overhead")))
    return out


def short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:300]


def cleanup(device: torch.device) -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(name, builder, model, x, device, dtype, opts, reference, log) -> dict:
    """Build, time and check one variant; never raises."""
    fn = meta = None
    try:
        fn, meta = builder(model, x, device, dtype, opts)
        result = {"status": "ok", **{k: v for k, v in meta.items() if not k.startswith("_")}}
        result.update(time_callable(fn, device, opts.repeats, opts.warmup))
        with torch.inference_mode():
            out = fn().float().clone()
        if reference is not None:
            result["max_abs_diff_prob_vs_eager_fp32"] = float((torch.sigmoid(out) - torch.sigmoid(reference)).abs().max())
        result["_output"] = out
        extra = f" (compile {meta['compile_s']:.1f} s)" if "compile_s" in meta else ""
        extra += f" (capture {meta['capture_s']:.2f} s)" if "capture_s" in meta else ""
        log(f"{name}: {result['median_ms']:.3f} ms{extra}")
    except Skipped as exc:
        result = {"status": "skipped", "reason": str(exc)}
        log(f"{name}: skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the others
        result = {"status": "failed", "reason": short_reason(exc)}
        log(f"{name}: failed: {result['reason']}")
        print("".join(traceback.format_exc().splitlines(keepends=True)[-15:]), file=sys.stderr, flush=True)
    finally:
        del fn, meta
        cleanup(device)
    return result


# -------------------------------------------------------------------------------------------- report


def environment(device: torch.device, opts) -> dict:
    env = {
        "device": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "host": f"{platform.platform()}, {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = f"{props.name} (compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads -- CPU CHECK"
    return env


def fmt_ms(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        reason = r["reason"] if len(r["reason"]) <= 70 else r["reason"][:67] + "..."
        return f"{r['status']}: {reason}".replace("|", "/")
    return f"{r['median_ms']:.3f}"


def markdown(report: dict, archs: list[str], names: list[str], opts) -> str:
    env = report["environment"]
    lines = [
        f"## nerveseg GPU latency{' -- CPU CHECK (not GPU numbers)' if opts.cpu_check else ''}",
        "",
        f"- device: {env['device']}",
        f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}; date {env['date']}",
        f"- {opts.size}x{opts.size}, batch 1, median of {opts.repeats} calls after {opts.warmup} warm-up, "
        f"timer: {'CUDA events, synchronize before each call' if report['device_type'] == 'cuda' else 'time.perf_counter'}; "
        "torch.inference_mode, channels_last"
        + (f", cudnn.benchmark={env.get('cudnn_benchmark')}, TF32 convs={env.get('cudnn_allow_tf32')}, "
           f"TF32 matmul={env.get('matmul_allow_tf32')}" if report["device_type"] == "cuda" else ""),
        f"- torch.compile mode for compile[...] rows: \"{opts.compile_mode}\" (dynamic=False); "
        "compile[reduce-overhead] uses torch.compile's CUDA graphs; \"CUDA graph\" is a manual torch.cuda.CUDAGraph capture",
        "- params: " + ", ".join(f"{a} " + (f"{n:,}" if (n := report["archs"][a]["params"]) is not None else "?")
                                 for a in archs),
        "",
        "| variant | " + " | ".join(f"{a} ms" for a in archs) + " | "
        + " | ".join(f"{a} x vs eager fp32" for a in archs) + " |",
        "|---|" + "---:|" * (2 * len(archs)),
    ]
    for name in names:
        cells, ratios = [], []
        for a in archs:
            lat = report["archs"][a]["latency_ms_batch1"]
            r, base = lat.get(name), lat.get("eager fp32")
            cells.append(fmt_ms(r))
            if r and base and r["status"] == "ok" and base["status"] == "ok":
                ratios.append(f"{base['median_ms'] / r['median_ms']:.2f}")
            else:
                ratios.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["", "x = eager fp32 ms / variant ms (higher is faster).", ""]

    lines += [f"Throughput at batch {opts.batch} ({opts.size}x{opts.size}), images/s:", "",
              "| variant | " + " | ".join(f"{a} images/s" for a in archs) + " |", "|---|" + "---:|" * len(archs)]
    for key in ("eager bf16", "best compiled"):
        cells = []
        for a in archs:
            r = report["archs"][a]["throughput"].get(key)
            if r is None:
                cells.append("-")
            elif r["status"] == "ok":
                cells.append(f"{r['images_per_s']:.1f}" + (f" ({r['variant']})" if key == "best compiled" else ""))
            else:
                cells.append(fmt_ms(r))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "best compiled = the torch.compile variant (either mode) with the lowest batch-1 latency, rebuilt at this batch.", ""]

    comp = [(n, a, r) for a in archs for n, r in report["archs"][a]["latency_ms_batch1"].items()
            if r["status"] == "ok" and ("compile_s" in r or "capture_s" in r)]
    comp += [(f"{r['variant']} @ batch {opts.batch}", a, r) for a in archs
             for r in [report["archs"][a]["throughput"].get("best compiled")] if r and r["status"] == "ok" and "compile_s" in r]
    if comp:
        lines += ["Compile / capture time (first call, synchronized; not included in the latencies):", "",
                  "| variant | arch | seconds | graph breaks |", "|---|---|---:|---:|"]
        for n, a, r in comp:
            sec = r.get("compile_s", r.get("capture_s"))
            kind = "" if "compile_s" in r else " (capture)"
            breaks = r.get("graph_breaks")
            lines.append(f"| {n}{kind} | {a} | {sec:.2f} | {'-' if breaks is None else breaks} |")
        lines.append("")

    lines += ["Sanity check: max |sigmoid(variant) - sigmoid(eager fp32)| on the same random input:", "",
              "| variant | " + " | ".join(archs) + " |", "|---|" + "---:|" * len(archs)]
    for name in names:
        cells = []
        for a in archs:
            r = report["archs"][a]["latency_ms_batch1"].get(name)
            d = r.get("max_abs_diff_prob_vs_eager_fp32") if r else None
            cells.append("-" if d is None else f"{d:.2e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ref = report["paper_reference"]
    lines += ["", f"Reference (THE PAPER'S figure, not ours): {ref['ms_per_image']} ms per image on an {ref['gpu']} "
                  f"-- {ref['source']}; {ref['note']}."]
    return "\n".join(lines)


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="sa_unet,unet")
    parser.add_argument("--size", type=int, default=None, help="square input side (default 512; 64 with --cpu-check)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 50; 3 with --cpu-check)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 20; 1 with --cpu-check)")
    parser.add_argument("--batch", type=int, default=None, help="throughput batch (default 32; 4 with --cpu-check)")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "max-autotune-no-cudagraphs", "max-autotune"],
                        help="mode of the compile[...] rows (reduce-overhead rows are always run too)")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"subset of {','.join(GROUPS)}")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16", help="subset of fp32,bf16,fp16")
    parser.add_argument("--no-tf32", action="store_true", help="fp32 convolutions and matmuls without TF32")
    parser.add_argument("--out", default=None, help="also write the raw results as JSON (rewritten after each variant)")
    parser.add_argument("--cpu-check", action="store_true", help="no GPU: check the script's logic on the CPU at a tiny size")
    parser.add_argument("--cpu-compile", action="store_true", help="with --cpu-check: also run torch.compile (needs a C++ compiler)")
    parser.add_argument("--threads", type=int, default=None, help="with --cpu-check: torch.set_num_threads")
    args = parser.parse_args(argv)
    small = args.cpu_check
    for name, gpu_default, cpu_default in (("size", 512, 64), ("repeats", 50, 3), ("warmup", 20, 1), ("batch", 32, 4)):
        if getattr(args, name) is None:
            setattr(args, name, cpu_default if small else gpu_default)
    args.groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for g in args.groups:
        if g not in GROUPS:
            parser.error(f"unknown group {g!r}; choose from {','.join(GROUPS)}")
    for d in args.dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}; choose from {','.join(DTYPES)}")
    if args.repeats < 1 or args.warmup < 0 or args.size < 1 or args.batch < 1:
        parser.error("--size, --repeats and --batch must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_check:
        device = torch.device("cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print(
            "error: no CUDA device: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}).\n"
            "This script measures GPU latency; run it on a machine with an NVIDIA GPU and a CUDA build of torch,\n"
            "or pass --cpu-check to exercise its logic on the CPU at a tiny size (those numbers are not GPU latencies).",
            file=sys.stderr,
        )
        return 2

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if args.no_tf32:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False

    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    variants = variant_table(args.groups, args.dtypes, args.compile_mode)
    names = [name for name, _, _ in variants]
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {arch}: {msg}", flush=True)

    report = {
        "environment": environment(device, args),
        "device_type": device.type,
        "cpu_check": args.cpu_check,
        "settings": {
            "size": args.size, "batch_latency": 1, "batch_throughput": args.batch, "repeats": args.repeats,
            "warmup": args.warmup, "compile_mode": args.compile_mode, "groups": args.groups, "dtypes": args.dtypes,
            "inference_mode": True, "channels_last": True, "no_tf32": args.no_tf32,
        },
        "paper_reference": PAPER_REFERENCE,
        "archs": {},
    }
    print(f"device: {report['environment']['device']}; torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)

    for arch in archs:
        torch.manual_seed(0)
        entry = {"params": None, "latency_ms_batch1": {}, "throughput": {}}
        report["archs"][arch] = entry
        try:
            model = create(arch).eval().to(device=device, memory_format=torch.channels_last)
            entry["params"] = count_parameters(model)
        except Exception as exc:  # noqa: BLE001
            reason = short_reason(exc)
            print(f"{arch}: could not build the model: {reason}", flush=True)
            for name in names:
                entry["latency_ms_batch1"][name] = {"status": "failed", "reason": f"model: {reason}"}
            for key in ("eager bf16", "best compiled"):
                entry["throughput"][key] = {"status": "failed", "reason": f"model: {reason}"}
            write_json(args.out, report)
            continue
        log(f"{entry['params']:,} parameters")
        x1 = torch.randn(1, 1, args.size, args.size, generator=torch.Generator().manual_seed(0))
        x1 = x1.to(device).contiguous(memory_format=torch.channels_last)
        reference = None
        with torch.inference_mode():
            for name, key, builder in variants:
                r = run_variant(name, builder, model, x1, device, DTYPES[key], args, reference, log)
                out = r.pop("_output", None)
                if name == "eager fp32" and out is not None:
                    reference = out
                    r["max_abs_diff_prob_vs_eager_fp32"] = 0.0
                entry["latency_ms_batch1"][name] = r
                write_json(args.out, report)

            # throughput at --batch: eager bf16 and the fastest compiled variant at batch 1
            xb = torch.randn(args.batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(1))
            xb = xb.to(device).contiguous(memory_format=torch.channels_last)
            candidates = [(r["median_ms"], n, k, b) for n, k, b in variants
                          for r in [entry["latency_ms_batch1"][n]] if n.startswith("compile[") and r["status"] == "ok"]
            plans = [("eager bf16", "eager bf16", "bf16", build_eager)]
            if candidates:
                _, n, k, b = min(candidates, key=lambda c: c[0])
                plans.append(("best compiled", n, k, b))
            else:
                entry["throughput"]["best compiled"] = {"status": "skipped", "reason": "no compiled variant ran at batch 1"}
            for key, name, dkey, builder in plans:
                r = run_variant(f"{name} @ batch {args.batch}", builder, model, xb, device, DTYPES[dkey], args, None, log)
                r.pop("_output", None)
                r["variant"], r["batch"] = name, args.batch
                if r["status"] == "ok":
                    r["images_per_s"] = args.batch * 1000 / r["median_ms"]
                entry["throughput"][key] = r
                write_json(args.out, report)
            del xb
        del model, x1, reference
        cleanup(device)

    report["elapsed_s"] = time.perf_counter() - started
    write_json(args.out, report)
    print()
    try:
        print(markdown(report, archs, names, args))
    except Exception:  # noqa: BLE001 - never lose a GPU run's numbers to a formatting bug
        traceback.print_exc()
        print(json.dumps(report, indent=2))
    print(f"\nelapsed {report['elapsed_s']:.1f} s" + (f"; raw results in {args.out}" if args.out else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
