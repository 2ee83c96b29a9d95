"""Request and response models: the OpenAPI schema at /openapi.json is the API's contract."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field


class Error(BaseModel):
    detail: str = Field(description="what is wrong and how to fix it, naming the file")
    code: str


class Measurement(BaseModel):
    """One frame's whole-mask measurements (the columns of measurements.csv)."""

    frame: int
    area_px: int
    area_mm2: Optional[float] = None
    perimeter_mm: Optional[float] = None
    perimeter_px: Optional[float] = None
    circularity: Optional[float] = None
    flattening: Optional[float] = None
    centroid_row: Optional[float] = None
    centroid_col: Optional[float] = None
    n_components: int
    confidence: Optional[float] = None
    spacing_mm: Optional[str] = None
    spacing_source: Optional[str] = None
    qc_flags: list[str]
    vessel_area_px: Optional[int] = None
    edited: bool = False
    saved_as: Optional[str] = None


class Tags(BaseModel):
    subject: str = Field("", max_length=64)
    region: Literal["", "wrist", "forearm"] = ""
    side: Literal["", "left", "right"] = ""


class CaseSummary(BaseModel):
    id: str
    name: str
    kind: Literal["image", "dicom", "video"]
    n_frames: int
    fps: Optional[float] = None
    width: int
    height: int
    classes: list[str]
    qc_flags: list[str] = Field(description="every flag seen in any frame")
    calibrated: bool
    tags: Tags
    model: str
    server_ms: float = Field(description="server time to read, segment and measure the file")
    saved_frames: int = Field(description="frames saved to the workspace as training pairs")
    edited_frames: int = Field(0, description="frames whose mask was corrected by hand")
    model_route: str = Field("", description="which model of a routed model (one per anatomy) drew it, e.g. 'wrist'; "
                                             "empty for a single model or an ensemble")


class Case(CaseSummary):
    threshold: float
    postprocess: str
    warnings: list[str]
    frames: list[Measurement]


class KeepRequest(BaseModel):
    x: int = Field(description="column of the click, image pixels")
    y: int = Field(description="row of the click, image pixels")


class KeepResult(BaseModel):
    action: str
    measurement: Measurement


class ScaleRequest(BaseModel):
    """Either mm_per_pixel, or a line drawn over the depth ruler and its length in mm."""

    mm_per_pixel: Optional[float] = Field(None, gt=0, lt=100)
    x0: Optional[float] = None
    y0: Optional[float] = None
    x1: Optional[float] = None
    y1: Optional[float] = None
    length_mm: Optional[float] = Field(None, gt=0, lt=10000)


class SaveRequest(BaseModel):
    frames: Optional[list[int]] = Field(None, description="frame indices, each saved once (no more entries than the "
                                                          "case has frames); default: every frame (one for an image)")
    overwrite: bool = Field(False, description="replace a pair this case saved before")


class SavedPair(BaseModel):
    stem: str
    image: str
    mask: str
    manifest: str
    corrected: bool = Field(description="the mask was corrected by hand; false: the model's own mask, saved unchanged "
                                        "(manifest.csv column corrected = no)")


class SaveResult(BaseModel):
    saved: list[SavedPair]
    workspace_pairs: int


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    auth_required: bool
    cases: int
    store_mb: float


class FinetuneRequest(BaseModel):
    epochs: Optional[int] = Field(None, ge=1, le=500)


class ModelSwitchRequest(BaseModel):
    run: str = Field(description="'original' or the id of a finished fine-tuning job")
