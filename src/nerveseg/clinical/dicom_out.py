"""Results into the clinical record: a DICOM Segmentation and a DICOM SR per DICOM input, and back.

``nerveseg segment ... --dicom-out`` writes, next to each DICOM input's masks:

* ``<stem>_seg.dcm``: a binary DICOM Segmentation (SEG) on the source image's pixel grid, one
  segment per class of the model that has pixels (nerve; vessel where the model has it), coded
  (SNOMED CT "Anatomical Structure" / "Nerve", "Blood Vessel"), with the algorithm identified
  (nerveseg's version, the model's name, its weights' SHA-256). A multi-frame (cine) file gets one
  SEG whose frames reference the source frames they segment.
* ``<stem>_sr.dcm``: a Comprehensive 3D SR holding a TID 1500 Measurement Report: one measurement
  group per row of measurements.csv (per image or frame, or per component), with the nerve's
  cross-sectional area (mm²) and perimeter (mm) only where the row has them -- the image is
  calibrated, nerveseg never guesses a scale --, circularity, flattening, the pixel size's source
  and the QC flags as coded qualitative evaluations. Each group references its SEG frame (segment
  and source image) or, where no nerve was found, the source image.

The values are measurements.csv's, as written there (rounded to the same digits), and the SEG's
pixels are the mask PNGs segment wrote: both are read back from the output folder, so the DICOM
results and the files next to them cannot disagree.

Choices (docs/CLINICAL.md "DICOM SEG and SR out"):

* **Empty masks.** A segment with no pixel in any frame is left out of the SEG (DICOM does not
  allow an empty segment in every version, and highdicom refuses one); with no pixel of any class
  there is no SEG at all. The SR is always written: a frame without a nerve gets a group that says
  so (QC flag ``no_nerve``) and references the source image.
* **Not DICOM.** An image file or video has no study to attach results to: a note says so and
  the batch goes on (its masks and measurements are written as usual).
* **Missing UIDs.** A DICOM file without Study, Series or SOP Instance UID (or SOP Class UID) is
  an :class:`~nerveseg.errors.InputError` for that file; nothing DICOM is written for it. Both
  documents are built in memory before either is written, and each is written atomically.
* **Codes.** Circularity, flattening, the QC flags and the pixel-size source have no standard
  code; they use the private coding scheme ``99NERVESEG`` (declared in the SR). SNOMED CT
  56459004 is "Foot" in the DICOM code tables, not the median nerve, and the shipped model
  segments peripheral nerves in general, so the segment is the generic "Nerve" (91728009).
* **Multi-frame sources without a frame of reference** (ordinary cine ultrasound): highdicom
  makes SEGs of single frames only there, so the SEG is built by highdicom for one frame and its
  per-frame functional groups are then written for every frame, indexed by segment number and
  Temporal Position Index (= source frame number), each referencing its source frame.

:func:`import_seg` goes the other way: a SEG (e.g. corrected in 3D Slicer or OHIF) and its source
image become a training pair ``images/<stem>.png`` + ``masks/<stem>.png`` (0 background,
1 nerve, 2 vessel); a cine loop becomes ``images/<stem>.dcm`` + ``masks/<stem>/frame_NNNNN.png``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from .. import __version__
from ..data.media import is_dicom, read_dicom, read_dicom_header
from ..data.spacing import finite_number
from ..errors import InputError
from ..io_utils import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from ..inference.planning import PlannedInput

__all__ = [
    "NERVESEG_SCHEME",
    "DicomResultWriter",
    "ImportedPair",
    "ModelIdentity",
    "attachable",
    "build_seg",
    "build_sr",
    "import_seg",
    "missing_uids",
    "model_identity",
    "write_dicom_results",
]

NERVESEG_SCHEME = "99NERVESEG"
"""Private coding scheme of the concepts DICOM has no code for (declared in every SR)."""

SEG_SUFFIX = "_seg.dcm"
SR_SUFFIX = "_sr.dcm"
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902

# the Type 2 attributes of the patient and study modules that highdicom copies from the source:
# an image that lacks them (the shipped example does) gets them empty, as Type 2 allows
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")

_QC_MEANINGS = {
    "no_nerve": "No nerve found",
    "multi_component": "Nerve mask has several components",
    "low_confidence": "Low mean probability inside the nerve mask",
    "touches_border": "Nerve mask touches the image border",
    "corrected": "Nerve mask corrected by hand",  # nerveseg serve: a clinician's correction, in place of low_confidence
}
_CALIBRATION_MEANINGS = {
    "us_region": "DICOM Sequence of Ultrasound Regions",
    "pixel_spacing": "DICOM Pixel Spacing",
    "user": "Pixel size given by the user",
    "none": "No calibration: no measurement in mm",
}


def _codes():
    from pydicom.sr.codedict import codes

    return codes


def _private(value: str, meaning: str):
    """A concept of the private scheme; values stay within Code Value's 16 characters (a longer
    one becomes Long Code Value, which highdicom's SR reader does not read)."""
    from pydicom.sr.coding import Code

    assert len(value) <= 16, value
    return Code(value, NERVESEG_SCHEME, meaning)


# ------------------------------------------------------------------------------------------------
# The model that made the results
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelIdentity:
    """What identifies the algorithm in the SEG and SR: the model's name (its model_card.json
    name, else its folder's), architecture, the SHA-256 of its weights (of model.safetensors; for
    an ensemble, the SHA-256 of the members' "name hash" lines, in order, with the members listed)
    and nerveseg's version."""

    name: str
    arch: str
    weights_sha256: str
    members: tuple[tuple[str, str], ...] = ()
    version: str = __version__

    def parameters(self, threshold: float | None) -> dict[str, str]:
        params = {"model": self.name, "arch": self.arch, "weights_sha256": self.weights_sha256}
        if self.members:
            params["members"] = " ".join(f"{name}:{digest}" for name, digest in self.members)
        if threshold is not None:
            params["threshold"] = f"{threshold:g}"
        return params


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model_dir: str | Path) -> ModelIdentity:
    """The :class:`ModelIdentity` of a run or ensemble folder (what ``--model`` names)."""
    folder = Path(model_dir)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(folder / "config.json", f"cannot be read ({exc})", "pass a run folder from `nerveseg train`") from None
    name = folder.resolve().name
    try:
        card = json.loads((folder / "model_card.json").read_text(encoding="utf-8"))
        name = str(card.get("name") or name)
    except (OSError, ValueError, AttributeError):
        pass
    arch = str((config.get("model") or {}).get("arch", ""))
    members = tuple(config.get("members") or ())
    if members:
        hashes = []
        for member in members:
            weights = folder / member / "model.safetensors"
            if not weights.is_file():
                raise InputError(weights, "ensemble member weights are missing", "pass a complete ensemble folder")
            hashes.append((str(member), _file_sha256(weights)))
            if not arch:
                try:
                    arch = str(json.loads((folder / member / "config.json").read_text(encoding="utf-8"))["model"]["arch"])
                except (OSError, ValueError, KeyError, TypeError):
                    pass
        combined = hashlib.sha256("".join(f"{m} {h}\n" for m, h in hashes).encode("utf-8")).hexdigest()
        return ModelIdentity(name=name, arch=arch or "ensemble", weights_sha256=combined, members=tuple(hashes))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise InputError(weights, "model weights are missing", "pass a run folder from `nerveseg train`")
    return ModelIdentity(name=name, arch=arch, weights_sha256=_file_sha256(weights))


# ------------------------------------------------------------------------------------------------
# The source image
# ------------------------------------------------------------------------------------------------


def attachable_header(path: Path):
    """The DICOM header of ``path`` (no pixels) ready to be a SEG's/SR's source: InputError when
    a UID that attaches results to the study is missing; the Type 2 patient/study attributes it
    lacks are added empty (on a copy; the file is never changed)."""
    header = read_dicom_header(path)
    missing = missing_uids(header)
    if missing:
        raise InputError(path, f"has no {', '.join(missing)}, so its results cannot be attached to its study: no DICOM "
                               "SEG or SR written for it (its masks and measurements.csv rows were)",
                         "export the image from the scanner or PACS with its UIDs, then segment it again")
    return attachable(header)


def missing_uids(header) -> list[str]:
    """The UIDs a SEG/SR needs to attach to the source's study that ``header`` lacks (keywords)."""
    return [k for k in _REQUIRED_UIDS if not str(header.get(k, "") or "").strip()]


def attachable(header):
    """A copy of a header (with its UIDs: :func:`missing_uids`) with the Type 2 patient/study
    attributes it lacks added empty, ready to be a SEG's/SR's source (``nerveseg serve`` keeps
    an upload's header, not its file)."""
    header = copy.deepcopy(header)
    for keyword in _TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _n_frames(header) -> int:
    try:
        return max(1, int(str(header.get("NumberOfFrames", 1) or 1).strip()))
    except ValueError:
        return 1


def _is_multiframe_class(header) -> bool:
    from highdicom._standard_utils import is_multiframe_image

    try:
        return bool(is_multiframe_image(header))
    except Exception:  # an unknown SOP class: go by the frame count
        return _n_frames(header) > 1


# ------------------------------------------------------------------------------------------------
# Segments
# ------------------------------------------------------------------------------------------------


def _segment_codes(name: str):
    """(category, property type) of a class: nerve and vessel by SNOMED CT, others private."""
    codes = _codes()
    lowered = name.lower()
    if lowered == "nerve":
        return codes.SCT.AnatomicalStructure, codes.SCT.Nerve
    if lowered in ("vessel", "vessels", "blood_vessel"):
        return codes.SCT.AnatomicalStructure, codes.SCT.BloodVessel
    return codes.SCT.AnatomicalStructure, _private(f"class_{name}"[:16], f"nerveseg class '{name}'")


# display colours as in the overlays: nerve red, vessel blue (CIELab via highdicom)
_DISPLAY_RGB = {"nerve": (255, 40, 40), "vessel": (40, 120, 255)}


def _segment_descriptions(present: Sequence[str], model: ModelIdentity, threshold: float | None,
                          corrected: bool = False):
    import highdicom as hd

    codes = _codes()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"nerveseg {model.name}"[:64], family=codes.cid7162.ArtificialIntelligence,
        version=model.version, source="nerveseg", parameters=model.parameters(threshold),
    )
    # a mask a clinician corrected (nerveseg serve) is "calculated with user assistance"
    kinds = hd.seg.SegmentAlgorithmTypeValues
    algorithm_type = kinds.SEMIAUTOMATIC if corrected else kinds.AUTOMATIC
    descriptions = []
    for number, name in enumerate(present, start=1):
        category, kind = _segment_codes(name)
        rgb = _DISPLAY_RGB.get(name.lower())
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=algorithm_type,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*rgb) if rgb else None,
        ))
    return descriptions


@dataclass
class SegFrames:
    """The SEG and where each (segment, 0-based source frame) lies in it (1-based SEG frame)."""

    dataset: Any
    segment_numbers: dict[str, int]
    frame_of: dict[tuple[int, int], int]


def _functional_group(seg, item, keyword: str):
    """``keyword``'s first item in a SEG frame's functional groups, or in the shared ones
    (highdicom shares what every frame has in common, e.g. the segment of a one-segment SEG)."""
    if keyword in item:
        return item[keyword].value[0]
    shared = seg.get("SharedFunctionalGroupsSequence")
    if shared and keyword in shared[0]:
        return shared[0][keyword].value[0]
    return None


def _seg_frame_map(seg) -> dict[tuple[int, int], int]:
    frame_of = {}
    for number, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        segment = int(_functional_group(seg, item, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        derivation = _functional_group(seg, item, "DerivationImageSequence")
        source = derivation.SourceImageSequence[0] if derivation is not None else {}
        frame = int(source.get("ReferencedFrameNumber", 1) or 1)
        frame_of[(segment, frame - 1)] = number
    return frame_of


def build_seg(header, masks: np.ndarray, class_names: Sequence[str], model: ModelIdentity,
              threshold: float | None = None, path: Path | None = None, corrected: bool = False) -> SegFrames | None:
    """A binary SEG of ``masks`` (bool ``(frames, rows, cols, classes)``) on the source ``header``'s
    grid, one segment per class with pixels; None when no class has any pixel. Empty frames of a
    segment are left out (highdicom's default, allowed by the standard). ``corrected``: the masks
    were corrected by hand, so the segments' algorithm type is SEMIAUTOMATIC, not AUTOMATIC."""
    import highdicom as hd

    masks = np.asarray(masks, dtype=bool)
    present = [i for i in range(masks.shape[-1]) if masks[..., i].any()]
    if not present:
        return None
    names = [class_names[i] for i in present]
    stack = masks[..., present]
    descriptions = _segment_descriptions(names, model, threshold, corrected)
    common = dict(
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="nerveseg", manufacturer_model_name=f"nerveseg {model.name}"[:64],
        software_versions=model.version, device_serial_number=model.weights_sha256[:16],
        content_label="NERVESEG", content_description=f"nerveseg {model.name}: {', '.join(names)}"[:64],
        series_description="nerveseg segmentation (research use, check every outline)",
    )
    multiframe = _is_multiframe_class(header)
    try:
        if not multiframe or "SharedFunctionalGroupsSequence" in header:
            seg = hd.seg.Segmentation(source_images=[header], pixel_array=stack.astype(np.uint8), **common)
        else:
            seg = _seg_of_frames(header, stack, common)
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(path, f"a DICOM SEG cannot be made for this image ({type(exc).__name__}: {exc})",
                         "report it with the file's header (dcmdump); its masks and measurements were written") from exc
    if "PatientOrientation" not in seg:  # General Image: Type 2C, needed when no plane orientation is given
        seg.PatientOrientation = header.get("PatientOrientation", "")
    return SegFrames(seg, {name: n for n, name in enumerate(names, start=1)}, _seg_frame_map(seg))


def _seg_of_frames(header, stack: np.ndarray, common: dict):
    """The SEG of a multi-frame image without functional groups (cine ultrasound): highdicom
    builds it for one frame, then its per-frame functional groups are written for every frame
    and segment with pixels (segment-major), indexed by segment number and Temporal Position
    Index (= the source frame number), each referencing its source frame."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.pixels import pack_bits
    from pydicom.tag import Tag
    from pydicom.uid import SecondaryCaptureImageStorage

    n_frames, rows, cols, n_segments = stack.shape
    template_source = copy.deepcopy(header)
    template_source.SOPClassUID = SecondaryCaptureImageStorage  # a single-frame view of the source
    for keyword in ("NumberOfFrames", "FrameIncrementPointer", "FrameOfReferenceUID", "PixelData"):
        if keyword in template_source:
            delattr(template_source, keyword)
    seg = hd.seg.Segmentation(source_images=[template_source], pixel_array=np.ones((1, rows, cols, n_segments), np.uint8),
                              **common)
    template = seg.PerFrameFunctionalGroupsSequence[0]
    shared = seg.SharedFunctionalGroupsSequence[0]
    for keyword in ("SegmentIdentificationSequence", "DerivationImageSequence"):
        # highdicom shares what its one frame has in every frame (the segment of a one-segment
        # SEG): here each frame gets its own, so it moves to the per-frame groups
        if keyword not in template and keyword in shared:
            setattr(template, keyword, copy.deepcopy(shared[keyword].value))
            delattr(shared, keyword)
    items, frames = [], []
    for segment in range(n_segments):
        for frame in range(n_frames):
            if not stack[frame, :, :, segment].any():
                continue
            item = copy.deepcopy(template)
            item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber = frame + 1
            content = item.FrameContentSequence[0]
            content.DimensionIndexValues = [segment + 1, frame + 1]
            content.TemporalPositionIndex = frame + 1
            item.SegmentIdentificationSequence[0].ReferencedSegmentNumber = segment + 1
            items.append(item)
            frames.append(stack[frame, :, :, segment])
    seg.PerFrameFunctionalGroupsSequence = items
    temporal = Dataset()
    temporal.DimensionOrganizationUID = seg.DimensionIndexSequence[0].DimensionOrganizationUID
    temporal.DimensionIndexPointer = Tag("TemporalPositionIndex")
    temporal.FunctionalGroupPointer = Tag("FrameContentSequence")
    temporal.DimensionDescriptionLabel = "Temporal Position Index"
    seg.DimensionIndexSequence.append(temporal)
    seg.NumberOfFrames = len(frames)
    seg.PixelData = pack_bits(np.stack(frames).astype(np.uint8))
    _restore_class(seg, header.SOPInstanceUID, header.SOPClassUID)
    return seg


def _restore_class(dataset, instance_uid: str, class_uid: str) -> None:
    """Every reference to ``instance_uid`` gets its real SOP Class UID back."""
    for element in dataset:
        if element.VR != "SQ":
            continue
        for item in element.value:
            if item.get("ReferencedSOPInstanceUID") == instance_uid:
                item.ReferencedSOPClassUID = class_uid
            _restore_class(item, instance_uid, class_uid)


# ------------------------------------------------------------------------------------------------
# The SR
# ------------------------------------------------------------------------------------------------


_number = finite_number  # a measurements.csv cell as a finite float, or None


def _calibration_kind(row: dict) -> str:
    source = str(row.get("spacing_source") or "")
    if not source or _number(row.get("area_mm2")) is None:
        return "none"
    if source.startswith("user"):
        return "user"
    if "UltrasoundRegions" in source:
        return "us_region"
    return "pixel_spacing"


def _qc_flags(row: dict) -> list[str]:
    return [flag for flag in str(row.get("qc_flags") or "").split(";") if flag]


def build_sr(header, rows: Sequence[dict], seg: SegFrames | None, model: ModelIdentity,
             threshold: float | None = None, nerve_class: str = "nerve"):
    """The Comprehensive 3D SR (TID 1500) of one input's measurement ``rows``."""
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    codes = _codes()
    no_units = codes.UCUM.NoUnits
    parameters = [f"{k}={v}" for k, v in model.parameters(threshold).items()]
    algorithm = hd.sr.AlgorithmIdentification(name=f"nerveseg {model.name}"[:64], version=model.version,
                                              parameters=parameters)
    multiframe = _is_multiframe_class(header)
    qc_name = _private("qc_flag", "nerveseg quality-control flag")
    calibration_name = _private("pixel_size_src", "Pixel size source")
    nerve_segment = seg.segment_numbers.get(nerve_class) if seg is not None else None
    groups = []
    for row in rows:
        frame = int(_number(row.get("frame")) or 0)
        component = str(row.get("component") or "").strip()
        frame_numbers = [frame + 1] if multiframe else None
        label = nerve_class + (f" component {component}" if component else "") + (f", frame {frame + 1}" if multiframe else "")
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label)
        measurements = []
        area, perimeter = _number(row.get("area_mm2")), _number(row.get("perimeter_mm"))
        circularity, flattening = _number(row.get("circularity")), _number(row.get("flattening"))
        has_nerve = int(_number(row.get("area_px")) or 0) > 0
        if has_nerve and area is not None:
            measurements.append(hd.sr.Measurement(name=codes.SCT.Area, value=area, unit=codes.UCUM.SquareMillimeter))
        if has_nerve and perimeter is not None:
            measurements.append(hd.sr.Measurement(name=codes.SCT.Perimeter, value=perimeter, unit=codes.UCUM.Millimeter))
        if circularity is not None:
            measurements.append(hd.sr.Measurement(
                name=_private("circularity", "Circularity (4 pi area / perimeter^2)"), value=circularity, unit=no_units))
        if flattening is not None:
            measurements.append(hd.sr.Measurement(
                name=_private("flattening", "Flattening (major / minor axis)"), value=flattening, unit=no_units))
        kind = _calibration_kind(row)
        evaluations = [hd.sr.QualitativeEvaluation(calibration_name, _private(kind, _CALIBRATION_MEANINGS[kind]))]
        evaluations += [hd.sr.QualitativeEvaluation(qc_name, _private(flag, _QC_MEANINGS.get(flag, flag)))
                        for flag in _qc_flags(row)]
        common = dict(tracking_identifier=tracking, finding_type=codes.SCT.Nerve, algorithm_id=algorithm,
                      measurements=measurements or None, qualitative_evaluations=evaluations)
        seg_frame = seg.frame_of.get((nerve_segment, frame)) if nerve_segment is not None else None
        if has_nerve and seg_frame is not None:
            source = hd.sr.SourceImageForSegmentation.from_source_image(header, referenced_frame_numbers=frame_numbers)
            reference = hd.sr.ReferencedSegmentationFrame(
                sop_class_uid=seg.dataset.SOPClassUID, sop_instance_uid=seg.dataset.SOPInstanceUID,
                frame_number=seg_frame, segment_number=nerve_segment, source_image=source)
            # a SEG frame belongs to one segment: the frame number is the reference (PS3.3
            # C.17.3.3: Referenced Segment Number shall not be present with Referenced Frame Number)
            for item in reference[0].ReferencedSOPSequence:
                if "ReferencedSegmentNumber" in item and "ReferencedFrameNumber" in item:
                    del item.ReferencedSegmentNumber
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=reference, finding_category=codes.SCT.AnatomicalStructure, **common))
        else:
            source = hd.sr.SourceImageForMeasurementGroup.from_source_image(header, referenced_frame_numbers=frame_numbers)
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                source_images=[source], finding_category=codes.SCT.AnatomicalStructure, **common))
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(model), name="nerveseg", manufacturer_name="nerveseg", model_name=model.name[:64],
            serial_number=model.weights_sha256[:16]),
    ))
    report = hd.sr.MeasurementReport(observation_context=observer, procedure_reported=codes.SCT.ImagingProcedure,
                                     imaging_measurements=groups)
    evidence = [header] + ([seg.dataset] if seg is not None else [])
    scheme = CodingSchemeIdentificationItem(
        designator=NERVESEG_SCHEME, name="nerveseg measurement and quality-control concepts",
        responsible_organization="nerveseg (docs/CLINICAL.md)")
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="nerveseg", is_complete=True, is_final=False,
        is_verified=False, coding_schemes=[scheme], series_description="nerveseg nerve measurements (research use)",
        manufacturer_model_name=f"nerveseg {model.name}"[:64], software_versions=model.version,
        device_serial_number=model.weights_sha256[:16],
    )


def _device_uid(model: ModelIdentity) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["nerveseg", model.name, model.weights_sha256])


# ------------------------------------------------------------------------------------------------
# One input
# ------------------------------------------------------------------------------------------------


def _read_mask_png(path: Path, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise InputError(path, "mask written by segment is missing, so no DICOM SEG/SR was made",
                         "run segment again for this input (without --resume)")
    with Image.open(path) as image:
        mask = np.asarray(image) != 0
    if mask.ndim != 2 or mask.shape != shape:
        raise InputError(path, f"mask is {mask.shape}, the DICOM image {shape}", "run segment again for this input")
    return mask


def output_masks(out: Path, name: str, class_names: Sequence[str], n_frames: int, multi: bool,
                 shape: tuple[int, int]) -> np.ndarray:
    """The masks segment wrote for input ``name`` as bool ``(frames, rows, cols, classes)``."""
    masks = np.zeros((n_frames, *shape, len(class_names)), dtype=bool)
    for c, cls in enumerate(class_names):
        for frame in range(n_frames):
            if multi:
                folder = f"{name}_masks" if c == 0 else f"{name}_{cls}_masks"
                path = out / folder / f"frame_{frame:05d}.png"
            else:
                path = out / (f"{name}_mask.png" if c == 0 else f"{name}_{cls}_mask.png")
            masks[frame, :, :, c] = _read_mask_png(path, shape)
    return masks


@dataclass
class DicomResult:
    seg: Path | None
    sr: Path
    segments: list[str]
    notes: list[str] = field(default_factory=list)


def _save(dataset, tmp: Path) -> None:
    dataset.save_as(tmp, enforce_file_format=True)


def write_dicom_results(source: str | Path, name: str, out: str | Path, rows: Sequence[dict],
                        class_names: Sequence[str], model: ModelIdentity, threshold: float | None = None) -> DicomResult:
    """Write ``<name>_seg.dcm`` (when a class has pixels) and ``<name>_sr.dcm`` into ``out`` for the
    DICOM file ``source``, from the masks and ``rows`` segment wrote for it.

    Both documents are built before either is written, and each is written atomically (a
    temporary file in the same folder, moved into place), so a failure leaves no partial file.

    Raises
    ------
    InputError
        ``source`` is not DICOM, lacks a UID, or its masks are missing or of another size.
    """
    source, out = Path(source), Path(out)
    if not is_dicom(source):
        raise InputError(source, "is not DICOM, so there is no study to attach a DICOM SEG/SR to",
                         "segment the DICOM image itself to get them; its masks and measurements are written as usual")
    header = attachable_header(source)
    n_frames = _n_frames(header)
    multi = n_frames != 1  # as segment writes them: frame folders for a multi-frame file
    shape = (int(header.Rows), int(header.Columns))
    masks = output_masks(out, name, class_names, n_frames, multi, shape)
    seg = build_seg(header, masks, class_names, model, threshold, path=source)
    rows = [r for r in rows]
    try:
        sr = build_sr(header, rows, seg, model, threshold, nerve_class=class_names[0])
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom refusing something in the header
        raise InputError(source, f"a DICOM SR cannot be made for this image ({type(exc).__name__}: {exc})",
                         "report it with the file's header (dcmdump); its masks and measurements were written") from exc
    seg_path, sr_path = out / f"{name}{SEG_SUFFIX}", out / f"{name}{SR_SUFFIX}"
    with atomic_path(sr_path) as sr_tmp:
        _save(sr, sr_tmp)
        if seg is not None:
            with atomic_path(seg_path) as seg_tmp:
                _save(seg.dataset, seg_tmp)
        else:
            seg_path.unlink(missing_ok=True)  # an earlier run's SEG of masks that are gone
    notes = []
    if not any(_number(r.get("area_mm2")) is not None for r in rows):
        notes.append(f"{source}: not calibrated (no DICOM ultrasound region or Pixel Spacing, no --mm-per-pixel), so "
                     f"{sr_path.name} holds no area in mm² or perimeter in mm: circularity, flattening and QC flags only")
    if seg is None:
        notes.append(f"{source}: no nerve{' or other class' if len(class_names) > 1 else ''} found in any frame: no SEG "
                     f"written (DICOM SEG has no empty segments); {sr_path.name} says no nerve was found")
    else:
        left_out = [c for c in class_names if c not in seg.segment_numbers]
        if left_out:
            notes.append(f"{source}: no {', '.join(left_out)} pixel in any frame: left out of {seg_path.name} "
                         "(DICOM SEG has no empty segments)")
    return DicomResult(seg_path if seg is not None else None, sr_path, list(seg.segment_numbers) if seg else [], notes)


class DicomResultWriter:
    """``segment_files``'s ``on_input`` hook for ``--dicom-out``: after each input's masks and rows
    are written, its SEG and SR (:func:`write_dicom_results`).

    A non-DICOM input gets a note (``not_dicom``); an input whose DICOM results cannot be made
    (missing UIDs, ...) an ``error:`` line and an entry in ``problems``; the batch goes on either
    way. A resumed input whose SR exists is left as it is."""

    def __init__(self, out: str | Path, model: ModelIdentity, class_names: Sequence[str],
                 threshold: float | None = None, log: Callable[[str], None] = print):
        self.out = Path(out)
        self.model = model
        self.class_names = list(class_names)
        self.threshold = threshold
        self.log = log
        self.written: list[DicomResult] = []
        self.not_dicom: list[Path] = []
        self.problems: list[InputError] = []
        self.kept: list[Path] = []

    def __call__(self, item: "PlannedInput", rows: Sequence[dict], resumed: bool = False) -> None:
        path = Path(item.path)
        if not is_dicom(path):
            self.not_dicom.append(path)
            self.log(f"note: {path}: not DICOM, so there is no study to attach a DICOM SEG/SR to; its masks and "
                     "measurements are written as usual")
            return
        if resumed and (self.out / f"{item.name}{SR_SUFFIX}").is_file():
            self.kept.append(path)
            return
        try:
            result = write_dicom_results(path, item.name, self.out, rows, self.class_names, self.model, self.threshold)
        except InputError as exc:
            self.problems.append(exc)
            self.log(f"error: {exc}")
            return
        self.written.append(result)
        for note in result.notes:
            self.log(f"note: {note}")

    def summary(self) -> str:
        segs = sum(1 for r in self.written if r.seg is not None)
        parts = [f"DICOM results: {segs} SEG and {len(self.written)} SR file(s) written"]
        if self.kept:
            parts.append(f"{len(self.kept)} kept from the earlier run")
        if self.not_dicom:
            parts.append(f"{len(self.not_dicom)} non-DICOM input(s) have none (no study to attach them to)")
        if self.problems:
            parts.append(f"{len(self.problems)} DICOM input(s) failed (listed above as error:)")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# Back: a SEG to a training pair
# ------------------------------------------------------------------------------------------------

_NERVE_CODES = {("SCT", "91728009")}
_VESSEL_CODES = {("SCT", "59820001"), ("SCT", "51114001"), ("SCT", "29092000")}  # blood vessel, artery, vein
LABEL_VALUES = {"nerve": 1, "vessel": 2}


@dataclass
class ImportedPair:
    """What :func:`import_seg` wrote: the image, the mask(s), the segments used and warnings."""

    image: Path
    masks: list[Path]
    segments: dict[int, str]
    warnings: list[str] = field(default_factory=list)


def _segment_class(description) -> str | None:
    """"nerve", "vessel" or None for a SEG segment, by its property type code, else its label."""
    try:
        code = description.SegmentedPropertyTypeCodeSequence[0]
        key = (str(code.CodingSchemeDesignator).upper(), str(code.CodeValue))
    except (AttributeError, IndexError):
        key = None
    if key in _NERVE_CODES:
        return "nerve"
    if key in _VESSEL_CODES:
        return "vessel"
    label = str(description.get("SegmentLabel", "")).lower()
    if "nerve" in label:
        return "nerve"
    if any(word in label for word in ("vessel", "artery", "vein")):
        return "vessel"
    return None


def _find_source(uid: str, sources: Iterable[str | Path]) -> Path | None:
    candidates: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            candidates += sorted(p for p in source.rglob("*") if p.is_file() and is_dicom(p))
        elif source.is_file():
            candidates.append(source)
    for candidate in candidates:
        try:
            if str(read_dicom_header(candidate).get("SOPInstanceUID", "")) == uid:
                return candidate
        except InputError:
            continue
    return None


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _image_png(frame: np.ndarray) -> np.ndarray:
    """A [0, 1] grey frame as 8-bit when that is exact (8-bit DICOM), else 16-bit."""
    scaled = frame.astype(np.float64) * 255.0
    if np.allclose(scaled, np.round(scaled), atol=1e-3):
        return np.round(scaled).astype(np.uint8)
    return np.round(frame.astype(np.float64) * 65535.0).astype(np.uint16)


def _check_free(folder: Path, stem: str, keep: str, what: str) -> None:
    if not folder.is_dir():
        return
    others = [p for p in folder.iterdir() if p.stem == stem and p.name != keep]
    if others:
        raise InputError(others[0], f"already holds the {what} of '{stem}', so a second one would make the pair "
                                    "ambiguous", "remove it, or pass --stem NAME for the imported pair")


def import_seg(seg_path: str | Path, data_dir: str | Path, sources: Sequence[str | Path],
               stem: str | None = None) -> ImportedPair:
    """Turn a DICOM SEG and its source image into a training pair in ``data_dir``.

    The source image is found among ``sources`` (files or folders, searched recursively) by the
    SOP Instance UID the SEG references. A single frame gives ``images/<stem>.png`` (8-bit when
    the DICOM is, else 16-bit) and ``masks/<stem>.png``; a multi-frame (cine) source gives
    ``images/<stem>.dcm`` (a copy) and ``masks/<stem>/frame_NNNNN.png`` for every frame the SEG
    labels. Mask values: 0 background, 1 nerve, 2 vessel (segments are recognised by their
    property type code -- SNOMED CT nerve, blood vessel, artery, vein -- else by a label holding
    "nerve", "vessel", "artery" or "vein"; others are left out with a warning); where a nerve and
    a vessel overlap the nerve wins (warned). ``stem`` defaults to the source file's stem.
    """
    import highdicom as hd

    seg_path, data_dir = Path(seg_path), Path(data_dir)
    if not seg_path.is_file():
        raise InputError(seg_path, "no such file", "check the path of the DICOM SEG")
    try:
        seg = hd.seg.segread(seg_path)
    except Exception as exc:
        raise InputError(seg_path, f"is not a readable DICOM Segmentation ({type(exc).__name__}: {exc})",
                         "give a DICOM SEG file (Modality SEG), e.g. one written by `segment --dicom-out` or 3D Slicer") from None
    references = seg.get_source_image_uids()
    if len(references) != 1:
        raise InputError(seg_path, f"references {len(references)} source images; import-seg takes the SEG of one image "
                                   "or one cine loop", "export one SEG per image")
    _, _, source_uid = references[0]
    source = _find_source(str(source_uid), sources)
    if source is None:
        raise InputError(seg_path, f"its source image (SOP Instance UID {source_uid}) is not among "
                                   f"{', '.join(map(str, sources)) or 'the sources given'}",
                         "pass the image (or a folder holding it) with --source")
    header = read_dicom_header(source)
    stem = stem or source.stem
    warnings: list[str] = []
    classes: dict[int, str] = {}
    for number in seg.segment_numbers:
        cls = _segment_class(seg.get_segment_description(number))
        if cls is None:
            label = seg.get_segment_description(number).get("SegmentLabel", "")
            warnings.append(f"segment {number} ('{label}') is neither nerve nor vessel: left out")
        else:
            classes[number] = cls
    if not classes:
        raise InputError(seg_path, "holds no nerve or vessel segment",
                         "label the segments 'nerve' / 'vessel' (or code them as SNOMED CT Nerve / Blood Vessel)")
    numbers = sorted(classes)
    multi = _is_multiframe_class(header) and _n_frames(header) > 1
    try:
        if _is_multiframe_class(header):
            pixels = seg.get_pixels_by_source_frame(
                str(source_uid), source_frame_numbers=list(range(1, _n_frames(header) + 1)), segment_numbers=numbers,
                assert_missing_frames_are_empty=True, ignore_spatial_locations=True)
        else:
            pixels = seg.get_pixels_by_source_instance(
                [str(source_uid)], segment_numbers=numbers, assert_missing_frames_are_empty=True,
                ignore_spatial_locations=True)
    except Exception as exc:
        raise InputError(seg_path, f"its frames cannot be matched to {source.name} ({type(exc).__name__}: {exc})",
                         "export the SEG from the viewer again") from None
    pixels = np.asarray(pixels)
    pixels = pixels >= 0.5 if pixels.dtype.kind == "f" else pixels != 0  # fractional: at least half
    labels = np.zeros(pixels.shape[:3], dtype=np.uint8)
    for order in ("vessel", "nerve"):  # the nerve last: it wins where both are set
        for index, number in enumerate(numbers):
            if classes[number] == order:
                labels[pixels[..., index]] = LABEL_VALUES[order]
    nerve = np.zeros(pixels.shape[:3], bool)
    vessel = np.zeros(pixels.shape[:3], bool)
    for index, number in enumerate(numbers):
        (nerve if classes[number] == "nerve" else vessel)[...] |= pixels[..., index]
    overlap = int((nerve & vessel).sum())
    if overlap:
        warnings.append(f"{overlap} pixel(s) are both nerve and vessel: labelled nerve (1)")
    images, masks = data_dir / "images", data_dir / "masks"
    if multi:
        image_path = images / f"{stem}.dcm"
        _check_free(images, stem, image_path.name, "image")
        _check_free(masks, stem, stem, "mask")
        labelled = [f for f in range(labels.shape[0]) if labels[f].any()]
        if not labelled:
            raise InputError(seg_path, "labels no pixel in any frame", "correct the segmentation and export it again")
        mask_paths = [masks / stem / f"frame_{f:05d}.png" for f in labelled]
        for f, path in zip(labelled, mask_paths):
            _save_png(labels[f], path)
        with atomic_path(image_path) as tmp:
            shutil.copyfile(source, tmp)
    else:
        image_path, mask_path = images / f"{stem}.png", masks / f"{stem}.png"
        _check_free(images, stem, image_path.name, "image")
        _check_free(masks, stem, mask_path.name, "mask")
        frames, _, _ = read_dicom(source)
        if frames[0].shape != labels[0].shape:
            raise InputError(seg_path, f"is {labels[0].shape}, its source image {frames[0].shape}",
                             "export the SEG on the image's own pixel grid")
        _save_png(labels[0], mask_path)
        _save_png(_image_png(frames[0]), image_path)
        mask_paths = [mask_path]
    if "nerve" not in classes.values():
        warnings.append("no nerve segment: the mask holds vessels only")
    return ImportedPair(image_path, mask_paths, {n: classes[n] for n in numbers}, warnings)
