"""Service: health, the model and its switch, the workspace, the CTS report, fine-tuning."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import Response

from ... import __version__
from ...clinical.screening import Cutoffs
from .. import schemas
from ..jobs import JobBusy, finetune_command, job_json, plan_validation, train_supports_init_from
from ..report import screening
from .common import ERRORS, errors, state

router = APIRouter(prefix="/api", tags=["service"], responses=ERRORS)


@router.get("/health", response_model=schemas.Health, summary="Liveness (no token needed)")
def health(request: Request):
    st = state(request)
    return {"status": "ok", "version": __version__, "auth_required": st.settings.auth_required,
            "cases": len(st.store), "store_mb": round(st.store.nbytes / 2**20, 1)}


@router.get("/model", summary="The model in use: architecture, recipe, model card; the models on offer")
def model(request: Request):
    st = state(request)
    offers = [{"run": "original", "path": str(st.model.original)}]
    for job in st.runner.jobs.values():
        if job.state == "finished":
            offers.append({"run": job.id, "path": str(job.out), "comparison": job.comparison})
    return {**st.model.info, "in_use": str(st.model.run_dir), "offers": offers}


@router.post("/model", responses=errors(404), summary="Switch the session's model to the original or a finished fine-tuning run")
async def switch_model(request: Request, body: schemas.ModelSwitchRequest):
    st = state(request)
    if body.run == "original":
        target = st.model.original
    else:
        job = st.runner.jobs.get(body.run)
        if job is None or job.state != "finished":
            raise HTTPException(404, f"no finished fine-tuning run {body.run!r}; see GET /api/finetune")
        target = job.out
    info = await asyncio.to_thread(st.model.switch, Path(target))
    return {**info, "in_use": str(target)}


@router.get("/workspace", summary="The workspace folder and the training pairs it holds")
def workspace(request: Request):
    ws = state(request).workspace
    pairs = ws.pairs()
    corrected = ws.corrected_stems()
    uncorrected = sum(1 for p in pairs if not corrected.get(p, True))
    return {"root": str(ws.root), "pairs": len(pairs), "corrected": len(pairs) - uncorrected, "uncorrected": uncorrected,
            "stems": pairs[-50:],
            "train_command": f"nerveseg train --init-from default --data {ws.root} --label 1 --out RUN"}


def _cutoffs(wrist_csa: float, wfr: float, delta_csa: float) -> Cutoffs:
    return Cutoffs(wrist_csa_mm2=wrist_csa, wfr=wfr, delta_csa_mm2=delta_csa)


@router.get("/report", summary="Carpal tunnel screening of the tagged cases (as `nerveseg report`)")
def report(request: Request, wrist_csa: float = Query(10.0, gt=0), wfr: float = Query(1.4, gt=0),
           delta_csa: float = Query(2.0, gt=0)):
    return screening(state(request).store.list(), _cutoffs(wrist_csa, wfr, delta_csa))


@router.get("/report.md", summary="The screening report as Markdown")
def report_md(request: Request, wrist_csa: float = Query(10.0, gt=0), wfr: float = Query(1.4, gt=0),
              delta_csa: float = Query(2.0, gt=0)):
    text = screening(state(request).store.list(), _cutoffs(wrist_csa, wfr, delta_csa))["report_md"]
    return Response(text, media_type="text/markdown; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="screening_report.md"'})


@router.get("/report.csv", summary="The screening table as CSV")
def report_csv(request: Request, wrist_csa: float = Query(10.0, gt=0), wfr: float = Query(1.4, gt=0),
               delta_csa: float = Query(2.0, gt=0)):
    text = screening(state(request).store.list(), _cutoffs(wrist_csa, wfr, delta_csa))["screening_csv"]
    return Response(text, media_type="text/csv", headers={"Content-Disposition": 'attachment; filename="screening.csv"'})


@router.get("/finetune", summary="Fine-tuning jobs of this server (one runs at a time)")
def finetune_jobs(request: Request):
    st = state(request)
    return {"available": train_supports_init_from(), "pairs": len(st.workspace.pairs()),
            "jobs": [job_json(j) for j in st.runner.jobs.values()]}


@router.post("/finetune", status_code=202, responses=errors(409, 501), summary="Fine-tune the current model on the workspace's pairs in the background")
def start_finetune(request: Request, body: schemas.FinetuneRequest = Body(default_factory=schemas.FinetuneRequest)):
    st = state(request)
    pairs = len(st.workspace.pairs())
    if pairs < 1:
        raise HTTPException(409, "the workspace holds no corrected cases yet: save a corrected case first")
    if not train_supports_init_from():
        raise HTTPException(501, "this nerveseg's `train` has no --init-from yet, which fine-tuning needs; update nerveseg")
    epochs = body.epochs or st.settings.finetune_epochs
    base = st.model.run_dir
    size = st.model.predictor.config.preprocess.size
    corrected = st.workspace.corrected_stems()
    # one subject (one saved case, say) cannot be split into training and validation: such a
    # workspace trains without a held-out check, and the job says so, rather than failing
    plan = plan_validation(st.workspace.root, corrected)
    try:
        job = st.runner.start(base, epochs, plan=plan, corrected=corrected,
                              build=lambda out: finetune_command(base, st.workspace.root, out, epochs, size,
                                                                 held_out=plan["held_out"]))
    except JobBusy as exc:
        raise HTTPException(409, f"fine-tuning job {exc} is still running; one job at a time") from None
    return job_json(job)


@router.get("/finetune/{job_id}", responses=errors(404), summary="A fine-tuning job's progress, log tail and result")
def finetune_status(request: Request, job_id: str):
    job = state(request).runner.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no fine-tuning job {job_id!r}")
    return job_json(job)


@router.post("/finetune/{job_id}/cancel", responses=errors(404), summary="Stop a running fine-tuning job")
def finetune_cancel(request: Request, job_id: str):
    st = state(request)
    if job_id not in st.runner.jobs:
        raise HTTPException(404, f"no fine-tuning job {job_id!r}")
    return job_json(st.runner.cancel(job_id))
