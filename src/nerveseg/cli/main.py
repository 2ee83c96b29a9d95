"""``nerveseg`` command line: each command parses arguments and calls one library function.

One module per group of commands, each with its ``cmd_*`` functions and the ``add_*`` functions
that declare their arguments: ``train_commands`` (models, recipes, train, ensemble),
``evaluate_commands`` (evaluate, benchmark, export-dataset), ``segment_commands`` (segment,
collect), ``clinical_commands`` (report, import-seg), ``export_commands`` (export) and
``web_commands`` (serve, demo). This module builds the parser in the order ``--help`` lists the
commands and runs one, turning a NerveSegError into a one-line message and exit status 2.
"""

from __future__ import annotations

import os
import sys

from .. import __version__
from ..errors import NerveSegError
from .clinical_commands import add_import_seg, add_report
from .evaluate_commands import add_benchmark, add_evaluate, add_export_dataset
from .export_commands import add_export
from .parser import SuggestingParser
from .segment_commands import add_collect, add_segment
from .train_commands import add_ensemble, add_models, add_recipes, add_train
from .web_commands import add_web_commands

RESUMABLE = ("train", "segment", "benchmark")
"""Commands with --resume: Ctrl-C tells how to continue them."""


def build_parser() -> SuggestingParser:
    parser = SuggestingParser(prog="nerveseg", description="Segment and measure peripheral nerves in ultrasound.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_models(sub)
    add_recipes(sub)
    add_train(sub)
    add_ensemble(sub)
    add_evaluate(sub)
    add_segment(sub)
    add_import_seg(sub)
    add_collect(sub)
    add_benchmark(sub)
    add_export_dataset(sub)
    add_report(sub)
    add_export(sub)
    add_web_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code, clean = None, False  # code stays None while an unexpected exception propagates
    try:
        code = args.func(args)
        clean = True
        return code
    except NerveSegError as exc:
        print(f"nerveseg {args.command}: error: {exc}", file=sys.stderr)
        code = 2
        return code
    except KeyboardInterrupt:
        # the commands that can continue say how; the others have nothing to continue
        resume = f" ({args.command}: --resume continues)" if args.command in RESUMABLE else ""
        print(f"nerveseg {args.command}: interrupted; finished files are kept{resume}", file=sys.stderr)
        code = 130
        return code
    finally:
        if "torch.distributed" in sys.modules:  # leave a torchrun process group cleanly
            from ..training.distributed import shutdown_distributed

            if shutdown_distributed(synchronise=clean) and code is not None:
                # A torchrun worker whose command has ended: exit here. Letting the interpreter
                # finalise with gloo's threads alive aborts it now and then (SIGABRT, "terminate
                # called without an active exception"), which fails a finished run. Not while an
                # unexpected exception propagates: its traceback must still print.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
