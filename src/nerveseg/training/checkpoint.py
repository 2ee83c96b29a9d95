"""Checkpoints as safetensors (never pickle): weights, and for resuming the optimizer too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import InputError
from ..io_utils import atomic_path


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weights file not found", "point --model at a run folder written by `nerveseg train`")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise InputError(path, f"not a readable safetensors file ({exc})", "re-export or re-train the model") from None
    check_state(path, model.state_dict(), state)
    model.load_state_dict(state)
    return model


def check_state(path: Path, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """InputError unless ``state`` has exactly ``own``'s tensor names, shapes and kinds of dtype
    (floating point where the model is, integer where it is), all finite: a weights file from
    elsewhere is never copied in half, converted silently or loaded with NaN."""
    fix = "use the config.json that was saved with these weights"
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise InputError(
            path,
            f"weights do not fit the architecture (missing {len(missing)}, unexpected {len(unexpected)} tensors"
            + (f", e.g. missing {missing[0]!r}" if missing else f", e.g. unexpected {unexpected[0]!r}") + ")",
            fix,
        )
    for name, expected in own.items():
        value = state[name]
        if tuple(value.shape) != tuple(expected.shape):
            raise InputError(path, f"tensor {name!r} has shape {tuple(value.shape)}, the architecture needs "
                                   f"{tuple(expected.shape)}", fix)
        if value.dtype.is_floating_point != expected.dtype.is_floating_point or value.dtype == torch.bool:
            raise InputError(path, f"tensor {name!r} has dtype {value.dtype}, the architecture needs {expected.dtype}", fix)
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise InputError(path, f"tensor {name!r} holds NaN or infinite values", "re-train or re-export the model")


def save_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path, state: dict[str, Any],
    averaged: nn.Module | None = None,
) -> None:
    """Write model, Adam moments, the weight average (``train.ema_decay``) if any and the loop state
    (JSON in the header) as one atomic file.

    One file, so a crash can never leave weights and loop state from different epochs.
    """
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if averaged is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in averaged.state_dict().items()})
    opt = optimizer.state_dict()
    for index, param_state in opt["state"].items():
        for key, value in param_state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    header = json.dumps({**state, "param_groups": opt["param_groups"]})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": header})


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path,
                        averaged: nn.Module | None = None) -> dict[str, Any]:
    """Restore what ``save_training_state`` wrote (the weight average into ``averaged``); returns the loop state."""
    path = Path(path)
    fix = "delete it to start the run again, or restore it from a backup"
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {})["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
            raise ValueError("loop state is not an object with param_groups")
    except Exception as exc:  # safetensors raises several types for corrupt files; KeyError, JSON errors
        raise InputError(path, f"not a readable training state ({type(exc).__name__}: {exc})", fix) from None
    check_state(path, model.state_dict(), {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    if averaged is not None:
        saved = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not saved:
            raise InputError(path, "the run keeps a weight average (train.ema_decay) but this state has none",
                             "resume with the config it was written with, or " + fix)
        check_state(path, averaged.state_dict(), saved)
        averaged.load_state_dict(saved)
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            per_param.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state


def transfer_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Start ``model`` from the weights in ``path`` (fine-tuning): every tensor whose name and
    shape match is copied; the rest (a head for another number of classes, auxiliary heads the
    source was trained without) keep their fresh initialisation and are returned by name.
    Refuses a source that shares too little with ``model`` to be the same architecture."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weights file not found", "point --init-from at a run folder written by `nerveseg train`")
    try:
        source = load_file(str(path))
    except Exception as exc:
        raise InputError(path, f"not a readable safetensors file ({exc})", "re-export or re-train the model") from None
    own = model.state_dict()
    matching = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if len(matching) < 0.5 * len(own):
        raise InputError(path, f"these weights fit only {len(matching)} of the model's {len(own)} tensors",
                         "--init-from needs a run of the same architecture (the new run takes its arch from it)")
    model.load_state_dict(matching, strict=False)
    return sorted({k.rsplit(".", 1)[0] for k in own if k not in matching})
