"""Cases: upload and segment a file, fetch its images, correct and re-measure, tag, save."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from ...errors import ConfigError, InputError
from ...inference.calibration import MAX_MM_PER_PIXEL, MIN_MM_PER_PIXEL, Spacing, in_range, spacing_from_user
from ...inference.measure import MEASUREMENT_FIELDS, POSTPROCESS_MODES
from ...inference.segment import SegmentOptions
from ...io_utils import csv_text
from .. import schemas
from ..cases import Case, keep_region, new_case_id, segment_upload
from ..images import NERVE, label_png, overlay_png, png_bytes, read_label_png, thumbnail_png
from ..media import display_name, receive_upload
from ..workspace import PairExists
from .common import case_json, get_case, get_frame_index, measurement_json, png, state, summary_json

router = APIRouter(prefix="/api", tags=["cases"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "the file itself as the request body (curl --data-binary @FILE); its type is decided "
                       "from its bytes, whatever its name",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
ERRORS = {400: {"model": schemas.Error}, 404: {"model": schemas.Error}, 413: {"model": schemas.Error},
          415: {"model": schemas.Error}, 422: {"model": schemas.Error}, 503: {"model": schemas.Error}}


def _spacing(mm_per_pixel: Optional[float], spacing: Optional[str]) -> Spacing | None:
    xy = None
    if spacing:
        try:
            xy = tuple(float(v) for v in spacing.split(","))
        except ValueError:
            raise ConfigError(f"spacing must be X,Y in mm per pixel, e.g. 0.06,0.06; got {spacing!r}") from None
    return spacing_from_user(mm_per_pixel, xy)


@router.post("/cases", status_code=201, response_model=schemas.Case, responses=ERRORS, openapi_extra=UPLOAD_BODY,
             summary="Upload a file (image, DICOM, cine loop) and segment every frame")
async def create_case(
    request: Request,
    name: str = Query("", max_length=255, description="the file's name, shown on the page (never used as a path)"),
    mm_per_pixel: Optional[float] = Query(None, gt=0, description="pixel size in mm (wins over DICOM calibration)"),
    spacing: Optional[str] = Query(None, description="X,Y pixel size in mm for non-square pixels"),
    threshold: Optional[float] = Query(None, gt=0, lt=1, description="probability cut (default: the model's, 0.5 unless chosen on cross-validation)"),
    postprocess: Literal[POSTPROCESS_MODES] = Query("none"),
    min_area: int = Query(0, ge=0, description="drop components smaller than this many pixels"),
    temporal_smoothing: float = Query(0.0, ge=0, lt=1, description="cine loops: weight of the previous frames"),
):
    st = state(request)
    t0 = time.perf_counter()
    options = SegmentOptions(threshold=threshold, spacing=_spacing(mm_per_pixel, spacing), postprocess=postprocess,
                             min_area_px=min_area, temporal_smoothing=temporal_smoothing)
    case_id = new_case_id()
    shown = display_name(name, f"upload-{case_id[:6]}")
    if request.headers.get("content-type", "").startswith("multipart/"):
        raise InputError(shown, "the file was sent as a form (multipart)",
                         "send the file itself as the request body: curl --data-binary @FILE -H 'Content-Type: application/octet-stream'")
    declared = request.headers.get("content-length")
    s = st.settings
    limits = {"image": s.max_image_bytes, "dicom": s.max_video_bytes, "video": s.max_video_bytes}
    async with st.limiter.slot():
        upload = await receive_upload(request.stream(), shown, st.upload_dir, case_id, limits,
                                      int(declared) if declared and declared.isdigit() else None)
        t_received = time.perf_counter()
        try:
            predictor, label = st.model.current()
            case = await st.limiter.run(partial(
                segment_upload, upload.path, shown, predictor, options, kind_group=upload.kind.group, model_label=label,
                max_frames=s.max_frames, max_bytes=s.max_store_bytes, case_id=case_id))
        finally:
            upload.path.unlink(missing_ok=True)
    st.store.add(case)
    body = case_json(case)
    total = (time.perf_counter() - t0) * 1000
    headers = {"Server-Timing": f"receive;dur={(t_received - t0) * 1000:.1f}, segment;dur={case.seconds * 1000:.1f}, "
                                f"total;dur={total:.1f}", "Location": f"/api/cases/{case.id}"}
    return JSONResponse(body, status_code=201, headers=headers)


@router.get("/cases", response_model=list[schemas.CaseSummary], summary="Cases held by the server, newest last")
def list_cases(request: Request):
    return [summary_json(c) for c in state(request).store.list()]


@router.get("/cases/{case_id}", response_model=schemas.Case, responses=ERRORS, summary="A case with every frame's measurements")
def read_case(request: Request, case_id: str):
    return case_json(get_case(request, case_id))


@router.delete("/cases/{case_id}", status_code=204, responses=ERRORS, summary="Forget a case")
def delete_case(request: Request, case_id: str):
    get_case(request, case_id)
    state(request).store.remove(case_id)
    return Response(status_code=204)


# ------------------------------------------------------------------------------------------------
# images


@router.get("/cases/{case_id}/frames/{index}/image.png", responses=ERRORS, summary="The frame as 8-bit grey PNG")
def frame_image(request: Request, case_id: str, index: int):
    case = get_case(request, case_id)
    t0 = time.perf_counter()
    data = png_bytes(case.frames[get_frame_index(case, index)].image)
    return png(data, (time.perf_counter() - t0) * 1000)


@router.get("/cases/{case_id}/frames/{index}/mask.png", responses=ERRORS,
            summary="The frame's mask: palette label map (0 background, 1 nerve, 2 vessel) or 0/255 nerve")
def frame_mask(request: Request, case_id: str, index: int, format: Literal["labels", "binary"] = "labels",
               download: bool = False):
    case = get_case(request, case_id)
    frame = case.frames[get_frame_index(case, index)]
    with case.lock:
        labels = frame.labels.copy()
    data = label_png(labels) if format == "labels" else png_bytes(((labels == NERVE) * 255).astype(np.uint8))
    name = f"{Path(case.name).stem}_f{index:05d}_mask.png" if download else None
    return png(data, filename=name)


@router.get("/cases/{case_id}/frames/{index}/overlay.png", responses=ERRORS,
            summary="The frame with the nerve (red) and vessels (blue) drawn on it")
def frame_overlay(request: Request, case_id: str, index: int):
    case = get_case(request, case_id)
    t0 = time.perf_counter()
    frame = case.frames[get_frame_index(case, index)]
    with case.lock:
        data = overlay_png(frame.image, frame.labels)
    return png(data, (time.perf_counter() - t0) * 1000)


@router.get("/cases/{case_id}/frames/{index}/probability.png", responses=ERRORS,
            summary="A class's probability as 8-bit grey (255 = 1.0)")
def frame_probability(request: Request, case_id: str, index: int, cls: str = "nerve"):
    case = get_case(request, case_id)
    frame = case.frames[get_frame_index(case, index)]
    k = case.class_index(cls)
    if k is None:
        raise HTTPException(404, f"the model has no class {cls!r}; it has {', '.join(case.classes)}")
    return png(png_bytes(np.round(frame.prob[k].astype(np.float32) * 255).astype(np.uint8)))


@router.get("/cases/{case_id}/thumbnail.png", responses=ERRORS, summary="A small overlay of the first frame")
def case_thumbnail(request: Request, case_id: str):
    case = get_case(request, case_id)
    return png(thumbnail_png(case.frames[0].image, case.frames[0].labels))


# ------------------------------------------------------------------------------------------------
# corrections


MASK_BODY = {
    "requestBody": {
        "required": True,
        "description": "PNG of the frame's size: grey or palette, values 0/1/2 (background, nerve, vessel) or 0/255 (nerve)",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.put("/cases/{case_id}/frames/{index}/mask", response_model=schemas.Measurement, responses=ERRORS,
            openapi_extra=MASK_BODY, summary="Replace a frame's mask with a corrected one; returns its new measurements")
async def put_mask(request: Request, case_id: str, index: int):
    st = state(request)
    case = get_case(request, case_id)
    get_frame_index(case, index)
    limit = st.settings.max_image_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the mask is larger than the server's limit of {limit / 2**20:g} MB")
        chunks.append(chunk)
    frame = case.frames[index]
    labels = read_label_png(b"".join(chunks), f"mask for {case.name} frame {index}", frame.labels.shape)

    def apply() -> dict:
        with case.lock:
            frame.labels = labels
            frame.edited = True
            case.measure(index)
            return measurement_json(case, index)

    return await asyncio.to_thread(apply)


@router.post("/cases/{case_id}/frames/{index}/keep", response_model=schemas.KeepResult, responses=ERRORS,
             summary="'Click the nerve': keep the nerve region at (x, y), or the most likely one near it; drop the rest")
async def keep(request: Request, case_id: str, index: int, click: schemas.KeepRequest):
    st = state(request)
    case = get_case(request, case_id)
    frame = case.frames[get_frame_index(case, index)]

    def apply() -> dict:
        with case.lock:
            try:
                labels, action = keep_region(frame.labels, case.nerve_prob(frame), click.y, click.x, case.threshold)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
            frame.labels, frame.edited = labels, True
            case.measure(index)
            return {"action": action, "measurement": measurement_json(case, index)}

    return await asyncio.to_thread(apply)


@router.post("/cases/{case_id}/frames/{index}/reset", response_model=schemas.Measurement, responses=ERRORS,
             summary="Put back the model's own mask")
def reset(request: Request, case_id: str, index: int):
    case = get_case(request, case_id)
    frame = case.frames[get_frame_index(case, index)]
    with case.lock:
        frame.labels, frame.edited = frame.predicted.copy(), False
        case.measure(index)
        return measurement_json(case, index)


@router.post("/cases/{case_id}/scale", response_model=schemas.Case, responses=ERRORS,
             summary="Set the pixel size: a number, or a line over the depth ruler and its length in mm")
def set_scale(request: Request, case_id: str, scale: schemas.ScaleRequest):
    case = get_case(request, case_id)
    if scale.mm_per_pixel is not None:
        spacing = spacing_from_user(scale.mm_per_pixel)
        spacing = Spacing(spacing.row_mm, spacing.col_mm, "user mm per pixel (web page)")
    else:
        if None in (scale.x0, scale.y0, scale.x1, scale.y1, scale.length_mm):
            raise ConfigError("give mm_per_pixel, or x0, y0, x1, y1 (the line, in image pixels) and length_mm")
        pixels = float(np.hypot(scale.x1 - scale.x0, scale.y1 - scale.y0))
        if pixels < 5:
            raise ConfigError(f"the scale line is {pixels:.1f} pixels long; draw it along the ruler over a known length")
        size = scale.length_mm / pixels
        if not in_range(size):  # e.g. a line of 1e300 px: say what the line gave, not Spacing's field names
            raise ConfigError(f"the scale line gives {size:g} mm per pixel ({scale.length_mm:g} mm over {pixels:g} px), "
                              f"outside {MIN_MM_PER_PIXEL:g}-{MAX_MM_PER_PIXEL:g} mm; draw it along the ruler over a "
                              "known length and give that length in mm")
        spacing = Spacing(size, size, f"user scale line: {scale.length_mm:g} mm over {pixels:.1f} px (square pixels assumed)")
    case.set_spacing(spacing)
    return case_json(case)


@router.put("/cases/{case_id}/tags", response_model=schemas.Case, responses=ERRORS,
            summary="Tag a case for the carpal tunnel screening: subject, wrist/forearm, side")
def set_tags(request: Request, case_id: str, tags: schemas.Tags):
    case = get_case(request, case_id)
    case.tags = {"subject": display_name(tags.subject, "") if tags.subject else "", "region": tags.region, "side": tags.side}
    return case_json(case)


@router.get("/cases/{case_id}/measurements.csv", responses=ERRORS, summary="The case's measurements as CSV")
def case_csv(request: Request, case_id: str):
    case = get_case(request, case_id)
    text = csv_text((f.row for f in case.frames), MEASUREMENT_FIELDS)  # the file name escaped for spreadsheets
    return Response(text, media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{Path(case.name).stem}_measurements.csv"'})


@router.post("/cases/{case_id}/save", response_model=schemas.SaveResult, responses={**ERRORS, 409: {"model": schemas.Error}},
             summary="Save frames as training pairs in the workspace (never overwrites unless asked)")
def save_case(request: Request, case_id: str, body: schemas.SaveRequest = Body(default_factory=schemas.SaveRequest)):
    st = state(request)
    case = get_case(request, case_id)
    indices = body.frames if body.frames is not None else list(range(len(case.frames)))
    for i in indices:
        get_frame_index(case, i)
    saved = []
    with case.lock:
        for i in indices:
            try:
                saved.append(st.workspace.save(case, i, overwrite=body.overwrite))
            except PairExists as exc:
                raise HTTPException(409, f"{case.name} frame {i} is already in the workspace as {exc.stem}; "
                                         "save with overwrite to replace it") from None
    return {"saved": saved, "workspace_pairs": len(st.workspace.pairs())}
