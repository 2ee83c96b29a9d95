"""Fine-tuning from the page: ``nerveseg train --init-from MODEL --data WORKSPACE`` in a
background process, one job at a time, progress read from the run's history.csv.

When the run finishes, the old and the new model are both scored on the run's own validation
images (the workspace pairs that training held out, listed in the new run's config.json), at
the images' original resolution with :func:`nerveseg.evaluation.metrics.image_metrics`, so the
page can show the two side by side before the user switches models.

A small workspace still trains: a train/validation split needs two subjects (the library's
rule, which stays), so with one (say, the one case a clinician saved) the job runs with
``--val-fraction 0``: no held-out check, the last epoch kept, and the page says so. Each job
says what its validation figure is (:func:`plan_validation`): Dice on the held-out workspace
pairs, how many of them are the model's own masks saved uncorrected, or none at all.

The runner keeps the newest ``keep`` runs; older run folders in ``WORKSPACE/finetune/`` are
deleted when a run starts or ends (never the running one, nor the model in use).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

# the fine-tune command is built in the training layer from the library's configs (routers import it from here)
from ..training.finetune import finetune_command as finetune_command
from ..training.finetune import supports_init_from

LOG_TAIL = 4000
JOB_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")  # time.strftime("%Y%m%d-%H%M%S-") + 6 hex digits


class JobBusy(Exception):
    pass


def train_supports_init_from() -> bool:
    """Whether this nerveseg's ``train`` has ``--init-from`` (issue 10 adds it): read from the library's
    run configuration (:func:`nerveseg.training.finetune.supports_init_from`), not the CLI parser, so the
    web layer never imports the command line."""
    return supports_init_from()


def plan_validation(workspace: Path, corrected: dict[str, bool] | None = None) -> dict:
    """How a fine-tuning run on ``workspace`` can be checked: ``held_out`` (a train/validation
    split by subject is possible: two subjects or more, counted as the library counts them), the
    ``subjects``, ``pairs`` and ``uncorrected`` pairs (``corrected``: stem -> corrected by hand,
    from the workspace manifest), and a ``note`` for people."""
    from ..data.samples import discover_samples

    samples, _ = discover_samples(workspace)
    held_in = [s for s in samples if s.split != "test"]
    subjects = len({s.subject for s in held_in})
    corrected = corrected or {}
    uncorrected = sum(1 for s in held_in if not corrected.get(s.stem, True))
    plan = {"held_out": subjects >= 2, "subjects": subjects, "pairs": len(held_in), "uncorrected": uncorrected}
    if plan["held_out"]:
        plan["note"] = ("the run holds out some workspace pairs (whole subjects) and reports its Dice on them: an "
                        "estimate on your own saved cases, not the shipped model's validation")
    else:
        plan["note"] = ("no held-out check: the workspace holds pairs of one subject only (a split needs two), so the run "
                        "trains on every pair and keeps its last epoch; judge the new model on a new scan before using it")
    return plan


def _number(text: str | None) -> float | None:
    if text in ("", None):
        return None
    value = float(text)
    return value if math.isfinite(value) else None  # "nan": a run without validation; JSON has no NaN


def read_history(path: Path) -> list[dict]:
    """history.csv rows (epoch, train_loss, val_dice, lr, seconds) as numbers (None where empty or
    not finite); [] while absent."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    out = []
    for row in rows:
        try:
            out.append({k: _number(v) for k, v in row.items()})
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
    plan: dict = field(default_factory=dict)  # plan_validation() when the job started
    corrected: dict = field(default_factory=dict, repr=False)  # stem -> corrected by hand

    def validation(self) -> dict:
        """What ``best_val_dice`` means for this run: the plan, and once the run has written its
        config.json, the pairs it held out and how many of them are uncorrected."""
        out = {k: v for k, v in self.plan.items() if k != "uncorrected"}
        out.setdefault("held_out", None)
        try:
            stems = json.loads((self.out / "config.json").read_text(encoding="utf-8")).get("val_stems") or []
        except (OSError, ValueError, AttributeError):
            return out
        uncorrected = sum(1 for s in stems if not self.corrected.get(s, True))
        out.update(val_images=len(stems), val_uncorrected=uncorrected)
        if stems:
            out["note"] = (f"best validation Dice: on {len(stems)} workspace pair(s) the run held out"
                           + (f", {uncorrected} of them the model's own mask saved uncorrected (there the figure is the "
                              "model agreeing with itself)" if uncorrected else ", all corrected by hand"))
        return out

    def status(self) -> dict:
        history = read_history(self.out / "history.csv")
        done = int(max((r["epoch"] or 0) for r in history)) if history else 0  # epochs are 1-based
        val = [r["val_dice"] for r in history if r.get("val_dice") is not None and r["val_dice"] >= 0]
        return {
            "id": self.id, "state": self.state, "epochs": self.epochs, "epochs_done": min(done, self.epochs),
            "progress": min(1.0, done / self.epochs) if self.epochs else 0.0,
            "best_val_dice": max(val) if val else None, "validation": self.validation(), "history": history,
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
    """Starts at most one fine-tuning process at a time and watches it from a thread.

    ``keep``: the newest runs kept; when a run starts or ends, older run folders in
    ``runs_dir`` (those named like a job id, this server's or an earlier one's) are deleted with
    their jobs, except the running one and any folder ``protected()`` names (the model in use)."""

    def __init__(self, runs_dir: Path, compare: Callable[[Path, Path], dict] | None = None, keep: int = 5,
                 protected: Callable[[], Iterable[Path]] | None = None):
        self.runs_dir = Path(runs_dir)
        self.compare = compare
        self.keep = keep
        self.protected = protected or (lambda: ())
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state in ("running", "evaluating")), None)

    def prune(self) -> list[str]:
        """Delete the run folders beyond the newest ``keep`` (not running, not protected);
        returns their names."""
        with self._lock:
            return self._prune()

    def _prune(self) -> list[str]:
        active = self.active
        keep = {Path(p).resolve() for p in self.protected()}
        if active is not None:
            keep.add(active.out.resolve())
        try:
            folders = sorted((p for p in self.runs_dir.iterdir() if p.is_dir() and JOB_ID.match(p.name)),
                             key=lambda p: p.name, reverse=True)  # the id starts with the time: newest first
        except OSError:
            return []
        finished = [p for p in folders if active is None or p.name != active.id]
        gone = []
        for folder in finished[self.keep:]:
            if folder.resolve() in keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            self.jobs.pop(folder.name, None)
            gone.append(folder.name)
        return gone

    def start(self, base_model: Path, epochs: int, command: Sequence[str] | None = None,
              build: Callable[[Path], list[str]] | None = None, plan: dict | None = None,
              corrected: dict | None = None) -> Job:
        """Launch ``build(out_dir)`` (or ``command``) in the background; JobBusy while one runs.
        ``plan`` (:func:`plan_validation`) and ``corrected`` say what its validation means."""
        with self._lock:
            if self.active is not None:
                raise JobBusy(self.active.id)
            self._prune()
            job_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
            out = self.runs_dir / job_id
            out.parent.mkdir(parents=True, exist_ok=True)
            argv = list(command) if command is not None else build(out)
            out.mkdir()
            log_path = out / "train.log"
            job = Job(job_id, out, Path(base_model), epochs, argv, log_path=log_path, plan=dict(plan or {}),
                      corrected=dict(corrected or {}))
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
        try:
            self._wait(job)
        finally:
            self.prune()

    def _wait(self, job: Job) -> None:
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
        result["note"] = ("the run held out no validation images (the workspace has pairs of one subject only); no "
                          "comparison: judge the new model on a new scan before using it")
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
