"""Fine-tuning a trained model on new pairs: the ``nerveseg train --init-from`` command a background
job runs (the web page's fine-tune job, :mod:`nerveseg.web.jobs`).

The command is built from the library's run configuration (:mod:`nerveseg.config`), not from the
command-line parser: each option that sets a configuration field is named after that field
(``TrainConfig.init_from`` is ``--init-from``), and a field that no longer exists fails here, at
once, rather than in the background process. ``tests/test_layers.py`` checks that the command line
accepts every option this module writes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..config import DataConfig, PreprocessConfig, TrainConfig

__all__ = ["finetune_command", "supports_init_from"]


def _option(section: type, name: str) -> str:
    """``--name-with-dashes`` for the field ``name`` of the config dataclass ``section``."""
    if name not in {f.name for f in dataclasses.fields(section)}:
        raise AttributeError(f"{section.__name__} has no field {name!r}; the fine-tune command is out of date")
    return "--" + name.replace("_", "-")


def supports_init_from() -> bool:
    """Whether this nerveseg's training can start from a trained run (``TrainConfig.init_from``,
    ``nerveseg train --init-from``; issue 10 adds it)."""
    return any(f.name == "init_from" for f in dataclasses.fields(TrainConfig))


def finetune_command(base_model: Path, workspace: Path, out: Path, epochs: int, size: int,
                     held_out: bool = True) -> list[str]:
    """``nerveseg train --init-from``; ``held_out=False`` (fewer than two subjects) trains with
    ``--val-fraction 0``: no validation, the last epoch kept, instead of the split's refusal."""
    argv = [sys.executable, "-m", "nerveseg", "train", _option(TrainConfig, "init_from"), str(base_model),
            "--data", str(workspace), "--out", str(out), _option(TrainConfig, "epochs"), str(epochs),
            _option(PreprocessConfig, "size"), str(size), _option(DataConfig, "label"), "1", "--quiet"]
    return argv if held_out else argv + [_option(DataConfig, "val_fraction"), "0"]
