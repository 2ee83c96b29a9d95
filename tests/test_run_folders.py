"""Untrusted run folders (issue 12): a config.json, weights or ONNX file from elsewhere is either
usable or refused with a clear error naming the file -- never a traceback, a silent conversion
or gigabytes allocated. And nothing in the package unpickles."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nerveseg.config import MAX_MODEL_PARAMETERS, ModelConfig, RunConfig, check_model_config
from nerveseg.errors import ConfigError, InputError, NerveSegError
from nerveseg.inference.predictor import Predictor
from nerveseg.models import create
from nerveseg.pretrained import pretrained_dir
from nerveseg.training.checkpoint import load_training_state, load_weights, save_weights

SRC = Path(__file__).resolve().parents[1] / "src" / "nerveseg"
SMALL = {"features": [8, 16, 32, 64, 128]}


def _run(folder: Path, model: dict | None = None, weights: bool = True, **config) -> Path:
    """A run folder: config.json (a tiny SA-UNet unless ``model`` says otherwise) + weights."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(model=ModelConfig("sa_unet", dict(SMALL)), **config).to_dict()
    if model is not None:
        cfg["model"] = model
    (folder / "config.json").write_text(json.dumps(cfg))
    if weights:
        torch.manual_seed(0)
        save_weights(create("sa_unet", **SMALL), folder / "model.safetensors")
    return folder


def _config_error(folder: Path, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        Predictor.from_run(folder, device="cpu")
    assert str(folder / "config.json") in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# config.json


def test_valid_tiny_run_folder_loads(tmp_path):
    pred = Predictor.from_run(_run(tmp_path / "run"), device="cpu")
    prob = pred.predict(np.random.default_rng(0).random((40, 50), dtype=np.float32))
    assert prob.shape == (40, 50) and np.isfinite(prob).all()


def test_unknown_architecture(tmp_path):
    msg = _config_error(_run(tmp_path / "run", model={"arch": "resnet9000", "kwargs": {}}), "unknown architecture")
    assert "sa_unet" in msg  # lists the valid names


@pytest.mark.parametrize("kwargs, match", [
    ({"no_such_argument": 3}, "bad arguments"),
    ({"features": "wide"}, "bad arguments"),
    ({"features": [8, -16, 32, 64, 128]}, "bad arguments"),
    ({"features": [8.5, 16, 32, 64, 128]}, "bad arguments"),
    ({"features": [4096] * 5}, "parameters; the limit is"),          # 175M parameters, never allocated
    ({"features": [2**40] * 5}, "parameters; the limit is|bad arguments"),
])
def test_bad_or_absurd_architecture_arguments(tmp_path, kwargs, match):
    _config_error(_run(tmp_path / "run", model={"arch": "sa_unet", "kwargs": kwargs}, weights=False), match)


def test_absurd_size_is_refused_before_building_anything():
    with pytest.raises(ConfigError, match="limit"):
        check_model_config(ModelConfig("unet", {"features": [2048, 4096, 8192, 16384, 32768]}))
    assert check_model_config(ModelConfig("sa_unet", {})) == 455_603 < MAX_MODEL_PARAMETERS


@pytest.mark.parametrize("text, match", [
    ("", "cannot read"),
    ("{", "cannot read"),
    ("[1, 2]", "JSON object"),
    ('{"model": "sa_unet"}', "'model' must be an object"),
    ('{"model": {"arch": 3}}', "model.arch"),
    ('{"model": {"arch": "sa_unet", "kwargs": [1]}}', "model.kwargs"),
    ('{"preprocess": {"size": 1e9}}', "size must be"),
    ('{"preprocess": {"size": 100.0}}', "size must be"),
    ('{"preprocess": {"size": "256"}}', "size must be"),
    ('{"preprocess": {"size": 256, "colour": 1}}', "unexpected keyword"),
    ('{"train": {"lr": NaN}}', "lr > 0"),
    ('{"train": {"augment": ["teleport"]}}', "unknown augmentation"),
    ('{"data": {"labels": 5}}', "cannot read"),
    ('{"members": "fold_0"}', "list of names"),
    ('{"train_stems": [1, 2]}', "list of names"),
    ("[" * 100_000, "cannot read"),  # deep nesting: RecursionError, not a crash
])
def test_malformed_config_json(tmp_path, text, match):
    run = _run(tmp_path / "run")
    (run / "config.json").write_bytes(text.encode())
    _config_error(run, match)


def test_config_that_is_not_utf8(tmp_path):
    run = _run(tmp_path / "run")
    (run / "config.json").write_bytes(b'{"model": "\xff\xfe"}')
    _config_error(run, "cannot read")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        Predictor.from_run(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------
# weights


def _weights_error(run: Path, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        Predictor.from_run(run, device="cpu")
    assert str(run / "model.safetensors") in str(info.value)


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in create("sa_unet", **SMALL).state_dict().items()}


def test_weights_with_a_wrong_shape(tmp_path):
    run = _run(tmp_path / "run")
    state = _tensors()
    state["head.weight"] = torch.zeros(3, *state["head.weight"].shape[1:])
    save_file(state, str(run / "model.safetensors"))
    _weights_error(run, r"tensor 'head.weight' has shape \(3, ")


def test_weights_with_a_wrong_dtype(tmp_path):
    run = _run(tmp_path / "run")
    state = _tensors()
    state["head.weight"] = state["head.weight"].to(torch.int32)
    save_file(state, str(run / "model.safetensors"))
    _weights_error(run, "has dtype torch.int32")
    state = _tensors()
    name = next(k for k in state if k.endswith("num_batches_tracked"))
    state[name] = state[name].float()
    save_file(state, str(run / "model.safetensors"))
    _weights_error(run, "has dtype torch.float32")


def test_weights_holding_nan(tmp_path):
    run = _run(tmp_path / "run")
    state = _tensors()
    state["head.bias"][0] = float("nan")
    save_file(state, str(run / "model.safetensors"))
    _weights_error(run, "NaN or infinite")


def test_weights_of_another_architecture(tmp_path):
    run = _run(tmp_path / "run")
    save_weights(create("unet", **SMALL), run / "model.safetensors")
    _weights_error(run, "do not fit the architecture")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "huge_header"])
def test_corrupt_weights_file(tmp_path, damage):
    run = _run(tmp_path / "run")
    path = run / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 64 + data[64:], "empty": b"",
                      "huge_header": (2**62).to_bytes(8, "little") + data[8:]}[damage])
    _weights_error(run, "not a readable safetensors file")


def test_half_precision_weights_still_load(tmp_path):
    """A float16 copy is a floating-point tensor of the right shape: converted, not refused."""
    run = _run(tmp_path / "run")
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in _tensors().items()}
    save_file(state, str(run / "model.safetensors"))
    model = load_weights(create("sa_unet", **SMALL), run / "model.safetensors")
    assert model.head.weight.dtype == torch.float32


def test_corrupt_training_state_is_a_clear_error(tmp_path):
    model = create("sa_unet", **SMALL)
    opt = torch.optim.Adam(model.parameters())
    path = tmp_path / "last.safetensors"
    save_weights(model, path)  # weights without the loop state
    with pytest.raises(InputError, match="not a readable training state"):
        load_training_state(model, opt, path)
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(InputError, match=str(path).replace("\\", "\\\\")):
        load_training_state(model, opt, path)


# ------------------------------------------------------------------------------------------------
# ONNX


def _onnx_only_run(tmp_path: Path, **config_changes) -> Path:
    """A deployed folder: the shipped model.onnx next to a config.json (and no weights)."""
    run = tmp_path / "deployed"
    run.mkdir()
    shipped = pretrained_dir()
    members = json.loads((shipped / "config.json").read_text()).get("members") or []
    single = shipped / members[0] if members else shipped  # an ensemble's first member is one model
    shutil.copy(single / "model.onnx", run / "model.onnx")
    cfg = json.loads((single / "config.json").read_text())
    for section, values in config_changes.items():
        cfg[section].update(values)
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def test_onnx_only_folder_loads(tmp_path):
    pytest.importorskip("onnxruntime")
    from nerveseg.inference.onnx_backend import OnnxPredictor

    pred = OnnxPredictor.from_run(_onnx_only_run(tmp_path), device="cpu", intra_op_num_threads=1, native=False)
    assert pred.predict(np.full((40, 50), 0.3, dtype=np.float32)).shape == (40, 50)


def test_onnx_with_another_number_of_classes(tmp_path):
    pytest.importorskip("onnxruntime")
    from nerveseg.inference.onnx_backend import OnnxPredictor

    run = _onnx_only_run(tmp_path, data={"label": None, "labels": [1, 2], "label_names": ["nerve", "vessel"]})
    with pytest.raises(InputError, match="2 class") as info:
        OnnxPredictor.from_run(run, device="cpu", intra_op_num_threads=1, native=False)
    assert str(run / "model.onnx") in str(info.value)


def test_onnx_of_another_architecture(tmp_path):
    pytest.importorskip("onnxruntime")
    from nerveseg.inference.onnx_backend import OnnxPredictor

    shipped_arch = RunConfig.load(pretrained_dir() / "config.json").model.arch  # the shipped ONNX graph's
    run = _onnx_only_run(tmp_path, model={"arch": "unet"})
    with pytest.raises(InputError, match=f"exported from architecture '{shipped_arch}'"):
        OnnxPredictor.from_run(run, device="cpu", intra_op_num_threads=1, native=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_onnx_without_weights(tmp_path, damage):
    pytest.importorskip("onnxruntime")
    from nerveseg.inference.onnx_backend import OnnxPredictor

    run = _onnx_only_run(tmp_path)
    data = (run / "model.onnx").read_bytes()
    (run / "model.onnx").write_bytes(data[: len(data) // 3] if damage == "truncate" else bytes(reversed(data)))
    with pytest.raises(InputError, match="onnxruntime cannot load this model") as info:
        OnnxPredictor.from_run(run, device="cpu", intra_op_num_threads=1, native=False)
    assert str(run / "model.onnx") in str(info.value)
    # (an ONNX file next to weights it was not exported from is exported again from the weights:
    # tests/test_onnx.py::test_cache_reexported_when_the_weights_change)


# ------------------------------------------------------------------------------------------------
# ensembles


def test_ensemble_member_outside_the_folder_is_refused(tmp_path):
    _run(tmp_path / "elsewhere")
    for member in ("../elsewhere", str((tmp_path / "elsewhere").resolve())):
        ens = tmp_path / "ens"
        _run(ens, weights=False, members=[member])
        with pytest.raises(InputError, match="outside the ensemble folder") as info:
            Predictor.from_run(ens, device="cpu")
        assert str(ens / "config.json") in str(info.value)
        shutil.rmtree(ens)


def test_ensemble_member_through_a_symlink_out_of_the_folder_is_refused(tmp_path):
    _run(tmp_path / "elsewhere")
    ens = _run(tmp_path / "ens", weights=False, members=["fold_0"])
    (ens / "fold_0").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(InputError, match="outside the ensemble folder"):
        Predictor.from_run(ens, device="cpu")


def test_ensemble_with_a_broken_member(tmp_path):
    ens = _run(tmp_path / "ens", weights=False, members=["fold_0"])
    (ens / "fold_0").mkdir()
    (ens / "fold_0" / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=re.escape(str(ens / "fold_0" / "config.json"))):
        Predictor.from_run(ens, device="cpu")


def test_every_refusal_is_a_nerveseg_error():
    assert issubclass(InputError, NerveSegError) and issubclass(ConfigError, NerveSegError)


# ------------------------------------------------------------------------------------------------
# nothing unpickles


def test_nothing_in_the_package_unpickles():
    """Weights are safetensors; arrays are read with an explicit allow_pickle=False."""
    offenders = []
    patterns = [
        (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
        (re.compile(r"^\s*(import pickle|from pickle|import cPickle|import dill|import joblib)", re.M), "pickle import"),
        (re.compile(r"\bpickle\.(loads?|Unpickler)\b"), "pickle.load"),
        (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
        (re.compile(r"\b(np|numpy)\.load\((?![^)]*allow_pickle\s*=\s*False)"), "np.load without an explicit allow_pickle=False"),
        (re.compile(r"\bpd\.read_pickle\b|\bshelve\b|\bmarshal\.loads?\b"), "other unpickling"),
    ]
    bad = {"torch.load(f)": 0, "import pickle": 1, "np.load(f, allow_pickle=True)": 3, "np.load(f)": 4}
    for text, index in bad.items():  # the patterns do catch what they are for ...
        assert patterns[index][0].search(text), text
    for text in ("torch.load(f, weights_only=True)", "np.load(f, allow_pickle=False)"):  # ... and only that
        assert not any(p.search(text) for p, _ in patterns), text
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    for path in files:
        text = path.read_text(encoding="utf-8")
        for pattern, what in patterns:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                offenders.append(f"{path.relative_to(SRC)}:{line}: {what}")
    assert not offenders, "\n".join(offenders)
