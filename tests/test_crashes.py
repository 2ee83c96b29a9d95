"""Crashes and full disks (issue 12): kill -9 at random moments of `train` and `segment`, and a
write that finds the disk full.

- train: each trial starts a tiny training (8 images of 40x50, 32 px, SA-UNet 8-128, 3 epochs)
  in a subprocess and kills it (SIGKILL) after a seeded random delay: half anywhere in the run,
  half within 60 ms after an epoch ends, while its files are written. The folder must be usable -- every file under a final name reads, and
  nothing but hidden temporary files is left over -- and `--resume` (or a fresh start when the
  kill came before config.json) must end with last.safetensors equal to an uninterrupted run's.
- segment: a subprocess `python -m nerveseg segment DIR --out OUT` on small generated PNGs with
  the shipped model, killed after a random delay: no truncated or corrupt file under a final
  name, and `segment --resume` completes the set.
- full disk: a small tmpfs needs a root mount, so the write path (``os.replace``, which every
  atomic write ends with) is monkeypatched to raise ENOSPC.

The trials are marked slow (about a minute on 2 busy cores). More trials:
``NERVESEG_KILL_TRIALS=50 python -m pytest -q tests/test_crashes.py -m slow``.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nerveseg.config import DataConfig, ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from nerveseg.errors import ConfigError, NerveSegError, OutputError
from nerveseg.training import train

SMALL = {"features": [8, 16, 32, 64, 128]}
TRIALS = int(os.environ.get("NERVESEG_KILL_TRIALS", "10"))
RUN_FILES = {"config.json", "model.safetensors", "last.safetensors", "history.csv"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def _config(data: Path, epochs: int = 3) -> RunConfig:
    return RunConfig(
        model=ModelConfig("sa_unet", dict(SMALL)),
        preprocess=PreprocessConfig(size=32),
        data=DataConfig(str(data), label=1, seed=0, val_fraction=0.25),
        train=TrainConfig(epochs=epochs, lr=2e-3, num_threads=1),
    )


TRAIN_CHILD = r"""
import json, sys
import nerveseg.training.trainer as trainer
from nerveseg.config import RunConfig
from nerveseg.training import train
write_history = trainer._write_history
def announced(path, rows):  # says when an epoch ends (history.csv, then last.safetensors follow)
    print("epoch", len(rows), flush=True)
    write_history(path, rows)
trainer._write_history = announced
config = RunConfig.from_dict(json.loads(sys.argv[1]))
print("ready", flush=True)
train(config, sys.argv[2], resume=False, progress=False, log=lambda m: None)
print("done", flush=True)
"""


def _check_run_folder_usable(run: Path) -> str:
    """Every file under a final name is whole; return what state the kill left."""
    from nerveseg.models import create
    from nerveseg.training.checkpoint import load_training_state, load_weights

    if not run.exists():
        return "nothing written"
    names = {p.name for p in run.iterdir()}
    leftovers = {n for n in names - RUN_FILES if not (n.startswith(".") and ".tmp" in n)}
    assert not leftovers, f"unexpected files {leftovers}"
    if "config.json" not in names:
        assert not names & RUN_FILES, names  # nothing else is written before config.json
        return "before config.json"
    config = RunConfig.load(run / "config.json")
    model = create(config.model.arch, **config.model.kwargs)
    if "model.safetensors" in names:
        load_weights(model, run / "model.safetensors")
    state, epochs = None, []
    if "last.safetensors" in names:
        state = load_training_state(model, torch.optim.Adam(model.parameters()), run / "last.safetensors")
    if "history.csv" in names:
        with open(run / "history.csv", newline="") as f:
            epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
        assert epochs == list(range(1, len(epochs) + 1))
    done = 0 if state is None else state["epoch"] + 1
    # history.csv is written before last.safetensors: it may be one epoch ahead (resume trims it)
    assert done <= len(epochs) <= done + 1, (done, epochs)
    ahead = ", history.csv one epoch ahead" if len(epochs) > done else ""
    temporary = len(names - RUN_FILES)
    left = f", {temporary} temporary file(s) left" if temporary else ""
    return ("no epoch finished" if state is None else f"after epoch {done}") + ahead + left


@pytest.mark.slow
def test_kill_9_during_train_then_resume_gives_the_uninterrupted_weights(tmp_path):
    from conftest import write_ellipse_dataset

    data = write_ellipse_dataset(tmp_path / "data", 8, height=40, width=50)
    train(_config(data), tmp_path / "straight", progress=False, log=lambda m: None)
    reference = load_file(str(tmp_path / "straight" / "last.safetensors"))

    def start(run: Path) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", TRAIN_CHILD, json.dumps(_config(data).to_dict()), str(run)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        return child

    # an uninterrupted child: how long training takes there (kills are spread over it), and the
    # same weights as in this process
    child, t0 = start(tmp_path / "child"), time.monotonic()
    lines = [line.strip() for line in child.stdout]
    assert lines == ["epoch 1", "epoch 2", "epoch 3", "done"], child.stderr.read()
    child_seconds = time.monotonic() - t0
    child.wait()
    for key, value in load_file(str(tmp_path / "child" / "last.safetensors")).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5, msg=key)
    rng = np.random.default_rng(12)
    states = []
    for trial in range(TRIALS):
        run = tmp_path / f"trial{trial}"
        child = start(run)
        if trial % 2 == 0:  # anywhere in the run (the first epoch, with its warm-up, takes most of it)
            time.sleep(float(rng.uniform(0, 1.1 * child_seconds)))
        else:  # within 60 ms after an epoch ends: while history.csv, last.safetensors (and model.safetensors) are written
            epoch = int(rng.integers(1, 4))
            while child.stdout.readline().strip() not in (f"epoch {epoch}", "done", ""):
                pass
            time.sleep(float(rng.uniform(0, 0.06)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        state = _check_run_folder_usable(run)
        states.append(state if child.returncode == -signal.SIGKILL else "finished before the kill")
        if state in ("nothing written", "before config.json"):
            with pytest.raises(ConfigError, match="nothing to resume"):
                train(_config(data), run, resume=True, progress=False, log=lambda m: None)
            train(_config(data), run, progress=False, log=lambda m: None)  # what the message says to do
        else:
            train(_config(data), run, resume=True, progress=False, log=lambda m: None)
        resumed = load_file(str(run / "last.safetensors"))
        assert resumed.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(resumed[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"trial {trial}: {key}")
        with open(run / "history.csv", newline="") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
    print("kill -9 trials (train):", states)
    assert len(states) == TRIALS
    assert sum(s.startswith("after epoch") for s in states) >= TRIALS // 3, states


def _pngs(folder: Path, n: int = 10) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        image = (0.3 + 0.1 * rng.standard_normal((64, 72))).clip(0, 1)
        yy, xx = np.mgrid[:64, :72]
        image[((yy - 32) / 10) ** 2 + ((xx - 36) / 14) ** 2 <= 1] += 0.4
        path = folder / f"scan{i:02d}.png"
        Image.fromarray((image.clip(0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _check_segment_outputs_whole(out: Path, inputs: list[Path]) -> int:
    """Every file under a final name decodes completely; measurements.csv rows name finished
    inputs. Returns how many inputs measurements.csv holds."""
    if not out.exists():
        return 0
    for path in out.iterdir():
        if path.name.startswith("."):
            assert ".tmp" in path.name, path  # an atomic write's temporary file, never a final name
            continue
        if path.suffix == ".png":
            with Image.open(path) as img:
                img.load()  # raises on a truncated file
        elif path.name == "measurements.csv":
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            for row in rows:
                stem = Path(row["file"]).stem
                assert (out / f"{stem}_mask.png").is_file() and (out / f"{stem}_overlay.png").is_file()
            return len({r["file"] for r in rows})
        else:
            raise AssertionError(f"unexpected file {path}")
    return 0


@pytest.mark.slow
def test_kill_9_during_segment_then_resume_completes_the_set(tmp_path):
    from nerveseg.cli.main import main

    inputs = _pngs(tmp_path / "in")
    reference = tmp_path / "reference"
    assert main(["segment", str(tmp_path / "in"), "--out", str(reference), "--backend", "torch"]) == 0
    with open(reference / "measurements.csv", newline="") as f:
        expected = {r["file"]: int(r["area_px"]) for r in csv.DictReader(f)}
    rng = np.random.default_rng(5)
    done_at_kill = []
    for trial in range(max(3, TRIALS // 2)):
        out = tmp_path / f"out{trial}"
        child = subprocess.Popen([sys.executable, "-m", "nerveseg", "segment", str(tmp_path / "in"), "--out", str(out),
                                  "--backend", "torch"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        # wait until the first result exists, then kill somewhere in the batch
        deadline = time.monotonic() + 120
        while not (out / "scan00_mask.png").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0, 0.8)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        done_at_kill.append(_check_segment_outputs_whole(out, inputs))
        assert main(["segment", str(tmp_path / "in"), "--out", str(out), "--backend", "torch", "--resume"]) == 0
        assert _check_segment_outputs_whole(out, inputs) == len(inputs)
        assert not [p for p in out.rglob(".*")], "resume removes what the killed run left"
        with open(out / "measurements.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["file"] for r in rows] == sorted(expected)  # one row per input, in input order
        for row in rows:  # the same model on the same image (other thread counts may move a pixel)
            assert abs(int(row["area_px"]) - expected[row["file"]]) <= 2
    print("inputs complete at the kill (segment):", done_at_kill)


# ------------------------------------------------------------------------------------------------
# a full disk


def _disk_full_after(monkeypatch, n_ok: int) -> None:
    real_replace = os.replace
    count = {"n": 0}

    def replace(src, dst, *args, **kwargs):
        count["n"] += 1
        if count["n"] > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_full_disk_during_train_is_a_clear_error_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    from conftest import write_ellipse_dataset

    data = write_ellipse_dataset(tmp_path / "data", 8, height=40, width=50)
    run = tmp_path / "run"
    train(_config(data, epochs=1), run, progress=False, log=lambda m: None)  # one epoch done
    before = {name: (run / name).read_bytes() for name in RUN_FILES}
    _disk_full_after(monkeypatch, 1)  # config.json is rewritten; the next write finds the disk full
    with pytest.raises(OutputError, match="No space left on device") as info:
        train(_config(data, epochs=3), run, resume=True, progress=False, log=lambda m: None)
    assert isinstance(info.value, NerveSegError) and info.value.errno == errno.ENOSPC
    assert str(run) in str(info.value) and "intact" in str(info.value)
    monkeypatch.undo()
    for name in RUN_FILES - {"config.json"}:  # earlier results untouched, no temporary file left
        assert (run / name).read_bytes() == before[name], name
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    _check_run_folder_usable(run)
    train(_config(data, epochs=3), run, resume=True, progress=False, log=lambda m: None)
    with open(run / "history.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_full_disk_through_the_train_command_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from conftest import write_ellipse_dataset
    from nerveseg.cli.main import main

    data = write_ellipse_dataset(tmp_path / "data", 8, height=40, width=50)
    _disk_full_after(monkeypatch, 0)
    code = main(["train", "--data", str(data), "--label", "1", "--epochs", "1", "--size", "32",
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err


def test_full_disk_inside_safetensors_is_recognised(tmp_path, monkeypatch):
    """safetensors writes in Rust and reports ENOSPC as a SafetensorError with the OS error in its
    text (bindings/python/src/lib.rs: "Error while serializing: {e:?}"); it is a full disk too."""
    from safetensors import SafetensorError

    from nerveseg.models import create
    from nerveseg.training import checkpoint

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", full)
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(OutputError, match="No space left on device") as info:
        checkpoint.save_weights(create("sa_unet", **SMALL), path)
    assert info.value.errno == errno.ENOSPC and path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1

    def other(*args, **kwargs):  # any other failure is not turned into a full disk
        raise SafetensorError("Error while serializing: InvalidTensorView(...)")

    monkeypatch.setattr(checkpoint, "save_file", other)
    with pytest.raises(SafetensorError):
        checkpoint.save_weights(create("sa_unet", **SMALL), path)
