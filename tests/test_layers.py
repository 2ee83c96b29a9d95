"""Layers (issue 25, docs/ARCHITECTURE.md): the web page's fine-tune job builds its ``nerveseg train``
command in the training layer from the library's configs (:mod:`nerveseg.training.finetune`), not from
the CLI parser, so the web layer never imports the command line. The command line must still accept
every option that command writes; ``lint-imports`` checks the layers themselves."""

from pathlib import Path

import pytest

from nerveseg.cli.main import build_parser
from nerveseg.training.finetune import finetune_command, supports_init_from


@pytest.mark.parametrize("held_out", [True, False])
def test_the_train_command_line_accepts_the_fine_tune_command(held_out):
    argv = finetune_command(Path("model"), Path("workspace"), Path("out"), 3, 64, held_out=held_out)
    assert argv[1:4] == ["-m", "nerveseg", "train"]
    args = build_parser().parse_args(argv[3:])
    assert (args.init_from, args.data, args.out, args.epochs, args.size, args.quiet) == \
        ("model", ["workspace"], "out", 3, 64, True)
    assert args.val_fraction == (0.2 if held_out else 0.0)


def test_fine_tuning_is_available():
    assert supports_init_from()  # TrainConfig.init_from, which `train --init-from` sets
