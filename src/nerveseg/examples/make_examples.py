"""Regenerate the example files shipped in this folder from the usgra-seg dataset.

    python -m nerveseg.examples.make_examples --data ../shared/data/usgra-seg

Writes, next to this file:

* ``usgra_NNNN.png``: three usgra-seg frames as 8-bit grey PNG (the luminance nerveseg reads
  from the RGB originals, so the model sees the same pixels);
* ``usgra_0053_calibrated.dcm``: frame 0053 as an ultrasound DICOM (Deflated Explicit VR Little Endian) with one calibrated
  Sequence of Ultrasound Regions item. **The calibration (0.075 mm per pixel) is made up for
  the demonstration**: usgra-seg gives no pixel size; the file only shows how nerveseg turns a
  scanner's calibration into mm²;
* ``usgra_0045_cine.mp4``: a 10-frame H.264 cine loop made from frame 0045 by shifting a
  fixed window by 3 px right and 1 px down per frame (a probe sliding slowly).

The images are "usgra-seg dataset, T. M. K., CC-BY 4.0" (see ATTRIBUTION.md); the generated
files are derived from them under the same licence. Nothing written contains a path of the
machine that made it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from nerveseg.data.io import read_image

HERE = Path(__file__).resolve().parent
FRAMES = ("0045", "0053", "0067")
DICOM_FRAME = "0053"
CINE_FRAME = "0045"
DEMO_MM_PER_PIXEL = 0.075
CINE_FRAMES = 10
CINE_STEP = (1, 3)  # rows, columns per frame
CINE_SIZE = (480, 496)  # rows, columns of the moving window (even, for yuv420p)


def grey_u8(path: Path) -> np.ndarray:
    return np.round(read_image(path) * 255).astype(np.uint8)


def write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG", optimize=True)


def write_dicom(pixels: np.ndarray, path: Path, frame: str = DICOM_FRAME, source: str = "usgra-seg",
                attribution: str = "usgra-seg dataset, T. M. K., CC-BY 4.0", mm_per_pixel: float = DEMO_MM_PER_PIXEL) -> None:
    """Single-frame US Image Storage, MONOCHROME2 8-bit, one calibrated 2-D tissue region."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import DeflatedExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian  # zlib: a third of the size, read by pydicom itself
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    # Fixed UIDs derived from the content, so regenerating gives the same file.
    # (the usgra-seg file keeps the UIDs it was first made with)
    key = [DICOM_FRAME] if source == "usgra-seg" else [source, frame]
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["nerveseg example", *key])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["nerveseg example study", *key[:-1]])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["nerveseg example series", *key[:-1]])
    ds.Modality = "US"
    ds.PatientName = f"Example^{source}"
    ds.PatientID = f"{source}-{frame}"
    ds.ImageComments = (f"{attribution}, frame {frame}. DEMONSTRATION "
                        f"calibration {mm_per_pixel} mm/pixel: not the real pixel size.")
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2-D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = pixels.shape[1] - 1, pixels.shape[0] - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = mm_per_pixel / 10.0
    ds.SequenceOfUltrasoundRegions = Sequence([region])
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)


# mn-wrist (the median nerve at the carpal tunnel inlet): one frame of each of two patients, one as a
# DICOM with a demonstration calibration (the data set gives no pixel size; 0.065 mm/pixel is a
# plausible value for a 3 cm deep wrist scan over 468 rows, not the real one)
WRIST_ATTRIBUTION = "mn-wrist images from the DL-UNet project (SasageyoOrg/dl-unet), GPL-3.0"
WRIST_FRAMES = ("Pz010-001",)  # Pz002-001 is shipped as the DICOM
WRIST_DICOM_FRAME = "Pz002-001"
WRIST_MM_PER_PIXEL = 0.065


def write_cine(pixels: np.ndarray, path: Path) -> None:
    import av

    rows, cols = CINE_SIZE
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = cols, rows
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "30", "preset": "medium"}
        for k in range(CINE_FRAMES):
            r0, c0 = k * CINE_STEP[0], k * CINE_STEP[1]
            window = pixels[r0:r0 + rows, c0:c0 + cols]
            rgb = np.repeat(window[..., None], 3, axis=2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    container.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the usgra-seg folder (images/NNNN.png)")
    parser.add_argument("--wrist-data", default=None, help="the mn-wrist folder (images/PzNNN-MMM.png); "
                        "default: mn-wrist beside --data")
    parser.add_argument("--out", default=str(HERE), help="where to write (default: this package folder)")
    args = parser.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    for stem in FRAMES:
        write_png(grey_u8(data / "images" / f"{stem}.png"), out / f"usgra_{stem}.png")
    write_dicom(grey_u8(data / "images" / f"{DICOM_FRAME}.png"), out / f"usgra_{DICOM_FRAME}_calibrated.dcm")
    write_cine(grey_u8(data / "images" / f"{CINE_FRAME}.png"), out / f"usgra_{CINE_FRAME}_cine.mp4")
    wrist = Path(args.wrist_data) if args.wrist_data else data.parent / "mn-wrist"
    for stem in WRIST_FRAMES:
        write_png(grey_u8(wrist / "images" / f"{stem}.png"), out / f"wrist_{stem}.png")
    write_dicom(grey_u8(wrist / "images" / f"{WRIST_DICOM_FRAME}.png"), out / f"wrist_{WRIST_DICOM_FRAME}_calibrated.dcm",
                frame=WRIST_DICOM_FRAME, source="mn-wrist", attribution=WRIST_ATTRIBUTION, mm_per_pixel=WRIST_MM_PER_PIXEL)
    for p in sorted(out.iterdir()):
        if p.suffix in (".png", ".dcm", ".mp4"):
            print(f"{p.name}: {p.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
