"""Cases: upload and segment a file, fetch its images, correct and re-measure, tag, save."""

from __future__ import annotations

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
from ..cases import keep_region, new_case_id, segment_upload
from ..dicom_results import dicom_download
from ..images import NERVE, label_png, overlay_png, png_bytes, read_label_png
from ..media import display_name, receive_upload
from ..state import Busy
from ..workspace import PairExists
from .common import ERRORS, case_json, errors, get_case, get_frame_index, measurement_json, png, state, summary_json

router = APIRouter(prefix="/api", tags=["cases"], responses=ERRORS)

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "the file itself as the request body (curl --data-binary @FILE); its type is decided "
                       "from its bytes, whatever its name",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
CASE = errors(404)  # an unknown case id or frame


def _spacing(mm_per_pixel: Optional[float], spacing: Optional[str]) -> Spacing | None:
    xy = None
    if spacing:
        try:
            xy = tuple(float(v) for v in spacing.split(","))
        except ValueError:
            raise ConfigError(f"spacing must be X,Y in mm per pixel, e.g. 0.06,0.06; got {spacing!r}") from None
    return spacing_from_user(mm_per_pixel, xy)


@router.post("/cases", status_code=201, response_model=schemas.Case, responses=errors(408, 413, 415), openapi_extra=UPLOAD_BODY,
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
    if st.limiter.full:  # refuse at once rather than after a long upload; nothing is reserved yet
        raise Busy()
    # the body first, then a slot: a client sending slowly holds its connection (the middleware
    # cuts off a stalled or crawling body), never one of the limiter's few places
    upload = await receive_upload(request.stream(), shown, st.upload_dir, case_id, limits,
                                  int(declared) if declared and declared.isdigit() else None)
    t_received = time.perf_counter()
    try:
        async with st.limiter.slot():
            predictor, label, run_dir = st.model.current_with_dir()
            case = await st.limiter.run(partial(
                segment_upload, upload.path, shown, predictor, options, kind_group=upload.kind.group, model_label=label,
                max_frames=s.max_frames, max_bytes=s.max_store_bytes, max_pixels=s.max_pixels, case_id=case_id,
                model_dir=run_dir))
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


@router.get("/cases/{case_id}", response_model=schemas.Case, responses=CASE, summary="A case with every frame's measurements")
def read_case(request: Request, case_id: str):
    return case_json(get_case(request, case_id))


@router.delete("/cases/{case_id}", status_code=204, responses=CASE, summary="Forget a case")
def delete_case(request: Request, case_id: str):
    get_case(request, case_id)
    state(request).store.remove(case_id)
    return Response(status_code=204)


# ------------------------------------------------------------------------------------------------
# images


# Every image below is made in the limiter's image pool (at most --workers at once; 503 beyond
# --max-queue): each costs memory in proportion to the frame's pixels.


def _timed(fn):
    def run():
        t0 = time.perf_counter()
        data = fn()
        return data, (time.perf_counter() - t0) * 1000
    return run


@router.get("/cases/{case_id}/frames/{index}/image.png", responses=CASE, summary="The frame as 8-bit grey PNG")
async def frame_image(request: Request, case_id: str, index: int):
    case = get_case(request, case_id)
    frame = case.frames[get_frame_index(case, index)]
    return png(*await state(request).limiter.run_image(_timed(lambda: png_bytes(frame.image))))


@router.get("/cases/{case_id}/frames/{index}/mask.png", responses=CASE,
            summary="The frame's mask: palette label map (0 background, 1 nerve, 2 vessel) or 0/255 nerve")
async def frame_mask(request: Request, case_id: str, index: int, format: Literal["labels", "binary"] = "labels",
                     download: bool = False):
    case = get_case(request, case_id)
    frame = case.frames[get_frame_index(case, index)]

    def encode() -> bytes:
        labels = frame.labels  # replaced, never changed in place: no copy needed
        return label_png(labels) if format == "labels" else png_bytes(((labels == NERVE) * 255).astype(np.uint8))

    name = f"{Path(case.name).stem}_f{index:05d}_mask.png" if download else None
    return png(await state(request).limiter.run_image(encode), filename=name)


@router.get("/cases/{case_id}/frames/{index}/overlay.png", responses=CASE,
            summary="The frame with the nerve (red) and vessels (blue) drawn on it, at display size: the frame's own "
                    "size up to 2048 pixels on its long side, shrunk to that beyond")
async def frame_overlay(request: Request, case_id: str, index: int):
    case = get_case(request, case_id)
    frame = case.frames[get_frame_index(case, index)]
    return png(*await state(request).limiter.run_image(_timed(lambda: overlay_png(frame.display, frame.labels))))


@router.get("/cases/{case_id}/frames/{index}/probability.png", responses=CASE,
            summary="A class's probability as 8-bit grey (255 = 1.0)")
async def frame_probability(request: Request, case_id: str, index: int, cls: str = "nerve"):
    case = get_case(request, case_id)
    frame = case.frames[get_frame_index(case, index)]
    k = case.class_index(cls)
    if k is None:
        raise HTTPException(404, f"the model has no class {cls!r}; it has {', '.join(case.classes)}")
    return png(await state(request).limiter.run_image(
        lambda: png_bytes(np.round(frame.prob[k].astype(np.float32) * 255).astype(np.uint8))))


@router.get("/cases/{case_id}/thumbnail.png", responses=CASE,
            summary="A small overlay of the first frame (drawn once, again only when its mask changes)")
async def case_thumbnail(request: Request, case_id: str):
    case = get_case(request, case_id)
    return png(await state(request).limiter.run_image(case.thumbnail))


# ------------------------------------------------------------------------------------------------
# corrections


MASK_BODY = {
    "requestBody": {
        "required": True,
        "description": "PNG of the frame's size: grey or palette, values 0/1/2 (background, nerve, vessel) or 0/255 (nerve)",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.put("/cases/{case_id}/frames/{index}/mask", response_model=schemas.Measurement, responses=errors(404, 408, 413),
            openapi_extra=MASK_BODY, summary="Replace a frame's mask with a corrected one; returns its new measurements")
async def put_mask(request: Request, case_id: str, index: int):
    st = state(request)
    case = get_case(request, case_id)
    frame = case.frames[get_frame_index(case, index)]
    # a label map of the frame's size compresses far below this; the decode itself is bounded
    # by the frame's size (read_label_png checks the header first)
    limit = st.settings.max_image_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the mask is larger than the server's limit of {limit / 2**20:g} MB",
                                headers={"Connection": "close"})
        chunks.append(chunk)
    data = b"".join(chunks)
    del chunks

    def apply() -> dict:  # decoding a mask of up to --max-megapixels pixels: off the event loop
        labels = read_label_png(data, f"mask for {case.name} frame {index}", frame.labels.shape)
        with case.lock:
            frame.set_labels(labels, edited=True)
            case.measure(index)
            return measurement_json(case, index)

    return await st.limiter.run_image(apply)


@router.post("/cases/{case_id}/frames/{index}/keep", response_model=schemas.KeepResult, responses=CASE,
             summary="'Click the nerve': keep the nerve region at (x, y), or the most likely one near it; drop the rest")
async def keep(request: Request, case_id: str, index: int, click: schemas.KeepRequest):
    st = state(request)
    case = get_case(request, case_id)
    frame = case.frames[get_frame_index(case, index)]

    def apply() -> dict:
        with case.lock:
            nerve = case.class_index("nerve") or 0
            try:  # the stored float16 probabilities, not a float32 copy of the whole frame
                labels, action = keep_region(frame.labels, frame.prob[nerve], click.y, click.x, case.threshold)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
            frame.set_labels(labels, edited=True)
            case.measure(index)
            return {"action": action, "measurement": measurement_json(case, index)}

    return await st.limiter.run_image(apply)


@router.post("/cases/{case_id}/frames/{index}/reset", response_model=schemas.Measurement, responses=CASE,
             summary="Put back the model's own mask")
async def reset(request: Request, case_id: str, index: int):
    case = get_case(request, case_id)
    frame = case.frames[get_frame_index(case, index)]

    def apply() -> dict:
        with case.lock:
            frame.set_labels(frame.predicted.copy(), edited=False)
            case.measure(index)
            return measurement_json(case, index)

    return await state(request).limiter.run_image(apply)


@router.post("/cases/{case_id}/scale", response_model=schemas.Case, responses=CASE,
             summary="Set the pixel size: a number, or a line over the depth ruler and its length in mm")
async def set_scale(request: Request, case_id: str, scale: schemas.ScaleRequest):
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

    def apply() -> dict:  # every frame re-measured
        case.set_spacing(spacing)
        return case_json(case)

    return await state(request).limiter.run_image(apply)


@router.put("/cases/{case_id}/tags", response_model=schemas.Case, responses=CASE,
            summary="Tag a case for the carpal tunnel screening: subject, wrist/forearm, side")
def set_tags(request: Request, case_id: str, tags: schemas.Tags):
    case = get_case(request, case_id)
    case.tags = {"subject": display_name(tags.subject, "") if tags.subject else "", "region": tags.region, "side": tags.side}
    return case_json(case)


@router.get("/cases/{case_id}/measurements.csv", responses=CASE, summary="The case's measurements as CSV")
def case_csv(request: Request, case_id: str):
    case = get_case(request, case_id)
    text = csv_text((f.row for f in case.frames), MEASUREMENT_FIELDS)  # the file name escaped for spreadsheets
    return Response(text, media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{Path(case.name).stem}_measurements.csv"'})


DICOM_ZIP = {
    200: {"description": "a zip of <stem>_seg.dcm (DICOM Segmentation; absent when no frame has a nerve or vessel "
                         "pixel), <stem>_sr.dcm (Comprehensive 3D SR, TID 1500) and, when there is something to say "
                         "(no calibration, no SEG), notes.txt; the notes are also in the X-Nerveseg-Notes header",
          "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
          "headers": {"X-Nerveseg-Notes": {"description": "the zip's notes.txt on one line ('; ' between notes), "
                                                          "ASCII; absent when there are none",
                                           "schema": {"type": "string"}}}},
    **CASE,
    409: {"model": schemas.Error, "description": "code not_dicom: the case was not uploaded from a DICOM file, so there "
                                                 "is no study to attach results to; code no_dicom_header: the server "
                                                 "did not keep the DICOM header (larger than 1 MB)"},
    422: {"model": schemas.Error, "description": "code missing_uids: the DICOM has no Study, Series or SOP Instance UID "
                                                 "(or SOP Class UID); code model_unknown: the model that segmented the "
                                                 "case cannot be identified; code bad_input: the header does not fit a "
                                                 "SEG or SR (what is wrong and how to fix it)"},
}


@router.get("/cases/{case_id}/dicom.zip", response_class=Response, responses=DICOM_ZIP,
            summary="The case's DICOM SEG and SR (one zip: the SR references the SEG) for a case uploaded from DICOM")
async def case_dicom(request: Request, case_id: str):
    """Made from the case's current masks (corrections included) and measurements by the library
    functions of `nerveseg segment --dicom-out`, referencing the uploaded image's UIDs. An
    uncalibrated image's SR has no area in mm² or perimeter in mm (X-Nerveseg-Notes says so)."""
    case = get_case(request, case_id)
    result = await state(request).limiter.run_image(dicom_download, case)
    headers = {"Content-Disposition": f'attachment; filename="{result.filename}"'}
    if result.notes:  # header values are Latin-1 at most: the notes' few other characters spelled out
        text = "; ".join(result.notes).replace("²", "^2")
        headers["X-Nerveseg-Notes"] = text.encode("ascii", "replace").decode("ascii")
    return Response(result.data, media_type="application/zip", headers=headers)


@router.post("/cases/{case_id}/save", response_model=schemas.SaveResult, responses=errors(404, 409),
             summary="Save frames as training pairs in the workspace (never overwrites unless asked)")
async def save_case(request: Request, case_id: str, body: schemas.SaveRequest = Body(default_factory=schemas.SaveRequest)):
    st = state(request)
    case = get_case(request, case_id)
    n = len(case.frames)
    indices = body.frames if body.frames is not None else list(range(n))
    if len(indices) > n:  # e.g. [0] * 300: never 300 rewrites of one pair under the workspace lock
        raise HTTPException(422, f"{len(indices)} frame indices for {case.name}, which has {n} frame(s); "
                                 "list each frame to save once")
    for i in indices:
        get_frame_index(case, i)
    indices = list(dict.fromkeys(indices))  # each pair written once, in the order given

    def apply() -> list[dict]:
        with case.lock:
            try:
                return st.workspace.save_frames(case, indices, overwrite=body.overwrite)
            except PairExists as exc:
                raise HTTPException(409, f"{case.name} frame {exc.index} is already in the workspace as {exc.stem}; "
                                         "save with overwrite to replace it (nothing was saved)") from None

    saved = await st.limiter.run_image(apply)
    return {"saved": saved, "workspace_pairs": len(st.workspace.pairs())}
