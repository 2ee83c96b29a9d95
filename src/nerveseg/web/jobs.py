"""Fine-tuning from the page: ``nerveseg train --init-from MODEL --data WORKSPACE`` in a
background process, one job at a time, progress read from the run's history.csv.

When the run finishes, the old and the new model are both scored on the run's own validation
images (the workspace pairs that training held out, listed in the new run's config.json), at
the images' original resolution with :func:`nerveseg.evaluation.metrics.image_metrics`, so the
page can show the two side by side before the user switches models.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

LOG_TAIL = 4000


class JobBusy(Exception):
    pass


def train_supports_init_from() -> bool:
    """Whether this nerveseg's ``train`` has ``--init-from`` (issue 10 adds it)."""
    from ..cli.main import build_parser

    parser = build_parser()
    for action in parser._subparsers._group_actions:  # argparse keeps subparsers here
        train = action.choices.get("train")
        if train is not None:
            return any("--init-from" in a.option_strings for a in train._actions)
    return False


def finetune_command(base_model: Path, workspace: Path, out: Path, epochs: int, size: int) -> list[str]:
    return [sys.executable, "-m", "nerveseg", "train", "--init-from", str(base_model), "--data", str(workspace),
            "--out", str(out), "--epochs", str(epochs), "--size", str(size), "--label", "1", "--quiet"]


def read_history(path: Path) -> list[dict]:
    """history.csv rows (epoch, train_loss, val_dice, lr, seconds) as numbers; [] while absent."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    out = []
    for row in rows:
        try:
            out.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
        except ValueError:  # a row being written
            continue
    return out


@dataclass
class Job:
    id: str
    out: Path
    base_model: Path
    epochs: int
    command: list[str]
    started: float = field(default_factory=time.time)
    finished: float | None = None
    state: str = "running"  # running | evaluating | finished | failed | cancelled
    returncode: int | None = None
    error: str = ""
    comparison: dict | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None

    def status(self) -> dict:
        history = read_history(self.out / "history.csv")
        done = int(max((r["epoch"] or 0) for r in history)) if history else 0  # epochs are 1-based
        val = [r["val_dice"] for r in history if r.get("val_dice") is not None and r["val_dice"] >= 0]
        return {
            "id": self.id, "state": self.state, "epochs": self.epochs, "epochs_done": min(done, self.epochs),
            "progress": min(1.0, done / self.epochs) if self.epochs else 0.0,
            "best_val_dice": max(val) if val else None, "history": history,
            "started": self.started, "finished": self.finished, "seconds": round((self.finished or time.time()) - self.started, 1),
            "base_model": str(self.base_model), "run": str(self.out), "returncode": self.returncode,
            "error": self.error, "comparison": self.comparison, "log_tail": self.log_tail(),
        }

    def log_tail(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        data = self.log_path.read_bytes()[-LOG_TAIL:]
        return data.decode("utf-8", "replace")


class FinetuneRunner:
    """Starts at most one fine-tuning process at a time and watches it from a thread."""

    def __init__(self, runs_dir: Path, compare: Callable[[Path, Path], dict] | None = None):
        self.runs_dir = Path(runs_dir)
        self.compare = compare
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state in ("running", "evaluating")), None)

    def start(self, base_model: Path, epochs: int, command: Sequence[str] | None = None,
              build: Callable[[Path], list[str]] | None = None) -> Job:
        """Launch ``build(out_dir)`` (or ``command``) in the background; JobBusy while one runs."""
        with self._lock:
            if self.active is not None:
                raise JobBusy(self.active.id)
            job_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
            out = self.runs_dir / job_id
            out.parent.mkdir(parents=True, exist_ok=True)
            argv = list(command) if command is not None else build(out)
            out.mkdir()
            log_path = out / "train.log"
            job = Job(job_id, out, Path(base_model), epochs, argv, log_path=log_path)
            with log_path.open("wb") as log:
                # its own session, so cancelling ends it and its children; niced, so the page stays responsive
                job.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True, cwd=str(out))
            try:
                os.setpriority(os.PRIO_PROCESS, job.process.pid, 10)
            except (OSError, AttributeError):
                pass
            self.jobs[job_id] = job
        threading.Thread(target=self._watch, args=(job,), name=f"finetune-{job_id}", daemon=True).start()
        return job

    def _watch(self, job: Job) -> None:
        job.returncode = job.process.wait()
        if job.state == "cancelled":
            job.finished = time.time()
            return
        if job.returncode != 0:
            job.state, job.error = "failed", f"training exited with code {job.returncode}; see the log below"
            job.finished = time.time()
            return
        if self.compare is not None:
            job.state = "evaluating"
            try:
                job.comparison = self.compare(job.base_model, job.out)
            except Exception as exc:  # the run is kept; the page says why there are no figures
                job.comparison = {"error": f"{type(exc).__name__}: {exc}"}
        job.state, job.finished = "finished", time.time()

    def cancel(self, job_id: str) -> Job:
        job = self.jobs[job_id]
        if job.state == "running" and job.process is not None and job.process.poll() is None:
            job.state = "cancelled"
            try:
                os.killpg(job.process.pid, 15)
            except ProcessLookupError:
                pass
        return job

    def shutdown(self) -> None:
        for job in self.jobs.values():
            if job.process is not None and job.process.poll() is None:
                job.state = "cancelled"
                try:
                    os.killpg(job.process.pid, 15)
                except ProcessLookupError:
                    pass


def compare_on_validation(base_model: Path, new_run: Path, load_predictor: Callable[[Path], object]) -> dict:
    """Dice (mean over images) of the base and the new model on the new run's validation pairs."""
    from ..config import RunConfig
    from ..data.io import read_image, read_mask
    from ..evaluation.metrics import image_metrics

    config = RunConfig.load(new_run / "config.json")
    data = Path(config.data.data_dir)
    stems = list(config.val_stems)
    result = {"val_images": len(stems), "stems": stems, "label": config.data.label}
    if not stems:
        result["note"] = "the run held out no validation images (too few pairs in the workspace); no comparison"
        return result
    scores = {}
    for key, folder in (("old", base_model), ("new", new_run)):
        predictor = load_predictor(folder)
        dice = []
        for stem in stems:
            image = read_image(data / "images" / f"{stem}.png")
            truth = read_mask(data / "masks" / f"{stem}.png", label=config.data.label)
            dice.append(image_metrics(predictor.predict(image), truth)["dice"])
        scores[key] = {"model": str(folder), "dice_mean": float(np.mean(dice)), "dice": [float(d) for d in dice]}
    history = read_history(new_run / "history.csv")
    val = [r["val_dice"] for r in history if r.get("val_dice") is not None and r["val_dice"] >= 0]
    scores["new"]["best_val_dice_network_resolution"] = max(val) if val else None
    result.update(scores)
    return result


def job_json(job: Job) -> dict:
    return json.loads(json.dumps(job.status(), default=str))
