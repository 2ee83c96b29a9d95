"""``nerveseg export``: a trained (or untrained, for benchmarking) network as an ONNX file."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    from ..config import ModelConfig, RunConfig
    from ..inference.onnx_backend import export_onnx, weights_sha256
    from ..models import create
    from ..pretrained import resolve_model
    from ..training.checkpoint import load_weights

    if args.arch:  # untrained weights, for benchmarking
        config, model, digest = RunConfig(model=ModelConfig(args.arch)), create(args.arch), None
    else:
        run = resolve_model(args.model)
        config = RunConfig.load(run / "config.json")
        model = load_weights(create(config.model.arch, **config.model.kwargs), run / "model.safetensors")
        digest = weights_sha256(run / "model.safetensors")
    export_onnx(model, args.out, args.opset, config=config, weights_hash=digest, native_saconv=args.native)
    kind = "native SAConv operators: run with nerveseg.inference.native.register_saconv" if args.native else "standard operators"
    print(f"wrote {args.out} ({config.model.arch}, dynamic batch/height/width, opset {args.opset}, {kind})")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (dynamic height and width)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help="run folder (default: the shipped model, nerveseg_nerves; docs/MODEL_CARD.md)")
    group.add_argument("--arch", default=None, help="export an untrained architecture (benchmarking)")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--out", required=True, help="FILE.onnx")
    p.add_argument("--native", action="store_true",
                   help="write each SAConv as one nerveseg.SAConv node (about 2.6x faster on a CPU; onnxruntime then "
                        "needs nerveseg's native library registered, so the file is not portable)")
    p.set_defaults(func=cmd_export)
