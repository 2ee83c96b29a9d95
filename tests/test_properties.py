"""Bad input tried by machine (issue 12): property-based tests that mutate valid PNG, JPEG, TIFF,
BMP, DICOM, LabelMe JSON, MP4/AVI, config.json and manifest.csv files -- truncation, bit flips,
wrong sizes and headers, huge declared dimensions, wrong dtypes, NaN/inf, empty and odd-shaped
arrays -- and check that every reader returns a valid result or raises InputError (ConfigError
for config.json) naming the file, each call within 5 s, and memory bounded (a subprocess reads
the huge-dimension files and its peak RSS is checked).

Seeded (``derandomize=True``) and bounded (``max_examples``), so the file runs in well under a
minute on 2 cores. The seed files and the check are shared with the longer coverage-guided run,
benchmarks/fuzz_readers.py; tests/fuzz_regressions/ holds every crash either one found (all
fixed), replayed by test_every_recorded_crash_is_fixed.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis: pip install -e '.[test]'")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fuzz_readers", ROOT / "benchmarks" / "fuzz_readers.py")
F = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_readers"] = F
_spec.loader.exec_module(F)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's warnings on the damaged files

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
TMP = Path(tempfile.mkdtemp(prefix="nerveseg-properties-"))
_SEEDS: dict[str, list[tuple[str, bytes]]] = {}


def seeds(reader: str) -> list[tuple[str, bytes]]:
    if reader not in _SEEDS:
        _SEEDS[reader] = F.READERS[reader].seeds()
    return _SEEDS[reader]


def run(reader: str, suffix: str, data: bytes, name: str = "input") -> str:
    """Write ``data`` and check ``reader`` on it (the Crash message is the failure)."""
    path = TMP / f"{name}{suffix}"
    path.write_bytes(data)
    try:
        return F.check(F.READERS[reader], path)
    except F.Crash as crash:  # an AssertionError, so hypothesis shrinks it and prints the example
        raise AssertionError(str(crash)) from None


# ------------------------------------------------------------------------------------------------
# byte-level mutations of every format's valid seeds

HUGE_U32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 65535, 65536, 100_000]
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"MM\x00*", b"BM", b"GIF89a", b"\x00\x00\x00\x18ftypmp42",
         b"RIFF\x00\x00\x00\x00AVI ", b"DICM", b"{", b"[", b"\xef\xbb\xbf", b"\x00" * 132, b"PK\x03\x04"]

OPS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just("u32"), st.floats(0, 1), st.sampled_from(HUGE_U32), st.sampled_from(["little", "big"])),
    st.tuples(st.just("header"), st.sampled_from(MAGIC)),
    st.tuples(st.just("empty"),),
)


def apply(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op in ops:
        pos = int(op[1] * len(buf)) if len(op) > 1 and isinstance(op[1], float) else 0
        kind = op[0]
        if kind == "truncate":
            del buf[pos:]
        elif kind == "flip" and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << op[2]
        elif kind == "overwrite":
            buf[pos:pos + len(op[2])] = op[2]
        elif kind == "insert":
            buf[pos:pos] = op[2]
        elif kind == "delete":
            del buf[pos:pos + op[2]]
        elif kind == "u32":
            buf[pos:pos + 4] = op[2].to_bytes(4, op[3])
        elif kind == "header":
            buf[: len(op[1])] = op[1]
        elif kind == "empty":
            buf = bytearray()
    return bytes(buf)


def _byte_fuzz(reader: str, max_examples: int):
    @settings(max_examples=max_examples, **SETTINGS)
    @given(index=st.integers(0, 50), ops=st.lists(OPS, min_size=1, max_size=4),
           suffix_index=st.integers(0, 3))
    def test(index, ops, suffix_index):
        pool = seeds(reader)
        suffix, data = pool[index % len(pool)]
        suffixes = F.READERS[reader].suffixes
        if suffix_index == 3:  # sometimes under another of the reader's endings (a renamed file)
            suffix = suffixes[index % len(suffixes)]
        run(reader, suffix, apply(data, ops))

    return test


test_image_bytes = _byte_fuzz("image", 120)
test_mask_bytes = _byte_fuzz("mask", 80)
test_dicom_bytes = _byte_fuzz("dicom", 80)
test_video_bytes = _byte_fuzz("video", 50)
test_labelme_bytes = _byte_fuzz("labelme", 60)
test_manifest_bytes = _byte_fuzz("manifest", 60)
test_config_bytes = _byte_fuzz("config", 40)


def test_seeds_are_valid():
    for name in F.READERS:
        for i, (suffix, data) in enumerate(seeds(name)):
            assert run(name, suffix, data, name=f"seed-{name}-{i}") == "ok", (name, i)


# ------------------------------------------------------------------------------------------------
# images: declared sizes and pixel arrays of every dtype and shape


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_with_header(width: int, height: int, depth: int, colour: int, interlace: int = 0, idat: bytes | None = None) -> bytes:
    """A PNG whose IHDR says anything (valid CRCs), with a small IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    idat = zlib.compress(b"\x00" * 64) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@settings(max_examples=80, **SETTINGS)
@given(width=st.sampled_from([0, 1, 3, 50, 7071, 2**16, 2**31 - 1, 2**32 - 1]) | st.integers(0, 2**32 - 1),
       height=st.sampled_from([0, 1, 40, 7071, 2**31 - 1]) | st.integers(0, 2**32 - 1),
       depth=st.sampled_from([0, 1, 2, 4, 8, 16, 3, 32]), colour=st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
       interlace=st.sampled_from([0, 1, 2]), suffix=st.sampled_from([".png", ".tif"]))
def test_png_declared_size_and_format(width, height, depth, colour, interlace, suffix):
    data = png_with_header(width, height, depth, colour, interlace)
    run("image", ".png", data)
    run("mask", ".png", data)
    run("dicom", ".dcm", data)  # a PNG named .dcm


def _array_tiff(array: np.ndarray) -> bytes | None:
    from PIL import Image

    try:
        image = Image.fromarray(array)
        buf = __import__("io").BytesIO()
        image.save(buf, format="TIFF")
        return buf.getvalue()
    except Exception:  # PIL has no mode for this dtype/shape: nothing to test
        return None


DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64, np.bool_, np.int8])


@settings(max_examples=100, **SETTINGS)
@given(array=hnp.arrays(DTYPES, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9)))
def test_tiff_of_any_dtype_shape_and_values(array):
    if array.dtype.kind == "f":  # NaN, inf, negative and > 1 values next to ordinary ones
        flat = array.reshape(-1)
        flat[: min(3, flat.size)] = [np.nan, np.inf, -1.0][: min(3, flat.size)]
    data = _array_tiff(array)
    assume(data is not None)
    outcome = run("image", ".tif", data)
    if array.dtype.kind == "f":
        assert outcome == "refused"  # NaN/inf have no grey level
    run("mask", ".tif", data)


@settings(max_examples=40, **SETTINGS)
@given(tag=st.sampled_from([256, 257, 258, 259, 262, 273, 277, 278, 279, 339]),
       value=st.sampled_from(HUGE_U32 + [2, 3, 5, 7, 32, 64]))
def test_tiff_with_a_wrong_tag(tag, value):
    """ImageWidth/Length, BitsPerSample, Compression, Photometric, StripOffsets, SamplesPerPixel,
    RowsPerStrip, StripByteCounts, SampleFormat rewritten in the IFD."""
    data = bytearray(F._pil(F._pixels(), "TIFF"))
    (offset,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, offset)
    for i in range(count):
        entry = offset + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == tag:
            struct.pack_into("<HII", data, entry + 2, 4, 1, value)  # LONG, one value
    run("image", ".tif", bytes(data))


@pytest.mark.parametrize("shape", [(1, 1), (1, 999), (999, 1), (1, 1, 3), (2, 2, 4), (3, 3, 2)])
def test_odd_shaped_images(shape):
    from PIL import Image

    array = F._pixels(shape)
    for fmt, suffix in (("PNG", ".png"), ("TIFF", ".tif"), ("BMP", ".bmp"), ("JPEG", ".jpg")):
        try:
            buf = __import__("io").BytesIO()
            Image.fromarray(array).save(buf, format=fmt)
        except Exception:
            continue
        assert run("image", suffix, buf.getvalue()) == "ok"


# ------------------------------------------------------------------------------------------------
# DICOM: header fields and pixel data that disagree


DICOM_FIELD = st.one_of(
    st.tuples(st.just("Rows"), st.sampled_from([0, 1, 2, 23, 25, 4096, 65535])),
    st.tuples(st.just("Columns"), st.sampled_from([0, 1, 31, 33, 65535])),
    st.tuples(st.just("NumberOfFrames"), st.sampled_from(["0", "-1", "1", "2", "4", "999999999", "1e9", "abc", ""])),
    st.tuples(st.just("BitsAllocated"), st.sampled_from([0, 1, 8, 12, 16, 32, 64])),
    st.tuples(st.just("BitsStored"), st.sampled_from([0, 1, 7, 12, 16, 17, 33])),
    st.tuples(st.just("HighBit"), st.sampled_from([0, 7, 15, 31, 40])),
    st.tuples(st.just("PixelRepresentation"), st.sampled_from([0, 1, 2])),
    st.tuples(st.just("SamplesPerPixel"), st.sampled_from([0, 1, 2, 3, 4])),
    st.tuples(st.just("PlanarConfiguration"), st.sampled_from([0, 1, 5])),
    st.tuples(st.just("PhotometricInterpretation"), st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "CMYK", "HSV", "", "JUNK"])),
    st.tuples(st.just("FrameTime"), st.sampled_from([0.0, -40.0, 1e-300, float("nan"), float("inf")])),
    st.tuples(st.just("PhysicalDeltaX"), st.sampled_from([0.0, -0.1, 1e308, float("nan"), float("inf")])),
    st.tuples(st.just("PixelSpacing"), st.sampled_from([[0, 0], [-1, 1], [float("nan"), 1.0], [1e308, 1e308], [0.1]])),
    st.tuples(st.just("PixelData"), st.sampled_from(["empty", "short", "odd", "long"])),
    st.tuples(st.just("TransferSyntaxUID"), st.sampled_from(
        ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.3.4"])),
)


@settings(max_examples=120, **SETTINGS)
@given(base=st.integers(0, 3), fields=st.lists(DICOM_FIELD, min_size=1, max_size=4))
def test_dicom_header_fields(base, fields):
    import warnings

    from pydicom.uid import UID

    pixels = [F._pixels(), F._pixels((3, 24, 32)), F._pixels((24, 32, 3)), F._pixels(dtype=np.uint16, high=4095)][base]
    frames = 3 if base == 1 else None
    ds = F.dicom_dataset(pixels, frames=frames, photometric="RGB" if base == 2 else "MONOCHROME2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, value in fields:
            try:
                if name == "PhysicalDeltaX":
                    ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaX = value
                elif name == "PixelData":
                    raw = pixels.tobytes()
                    ds.PixelData = {"empty": b"", "short": raw[: len(raw) // 3], "odd": raw[:-1], "long": raw * 2}[value]
                elif name == "TransferSyntaxUID":
                    ds.file_meta.TransferSyntaxUID = UID(value)
                else:
                    setattr(ds, name, value)
            except Exception:  # pydicom refuses to hold the value at all
                assume(False)
        try:
            data = F.dicom_bytes(ds)
        except Exception:  # or to write it
            assume(False)
    run("dicom", ".dcm", data)
    run("dicom", "", data[128:])  # without its preamble, as an extension-less PACS export


@settings(max_examples=40, **SETTINGS)
@given(array=hnp.arrays(st.sampled_from([np.uint8, np.uint16, np.int16, np.uint32, np.int32]),
                        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12)))
def test_dicom_pixel_arrays_of_any_integer_dtype(array):
    run("dicom", ".dcm", F.dicom_bytes(F.dicom_dataset(array, regions=False)))


# ------------------------------------------------------------------------------------------------
# LabelMe, config.json, manifest.csv: structured documents with wrong values

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
SIZES = st.sampled_from([0, -1, 1, 40, 10**6, 10**9, 2**40, 40.0, 40.5, float("nan"), float("inf"), True, "40", None])
POINT = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 5.0, 1e15])
SHAPE = st.fixed_dictionaries(
    {"label": st.sampled_from(["nerve", "vessel", "", 1]) | JSON_VALUES,
     "points": st.lists(st.lists(POINT, min_size=0, max_size=3), max_size=6) | JSON_VALUES,
     "shape_type": st.sampled_from(["polygon", "rectangle", "circle", "line", "point", "mask", None, 3])},
)


@settings(max_examples=150, **SETTINGS)
@given(height=SIZES, width=SIZES, shapes=st.lists(SHAPE, max_size=4) | JSON_VALUES, drop=st.sampled_from([None, "imageHeight", "shapes"]))
def test_labelme_documents(height, width, shapes, drop):
    doc = {"version": "5.2.1", "imageHeight": height, "imageWidth": width, "shapes": shapes}
    if drop:
        del doc[drop]
    run("labelme", ".json", json.dumps(doc).encode())
    run("mask", ".json", json.dumps(doc).encode())


def _config_paths(d: dict, prefix=()):
    for key, value in d.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _config_paths(value, prefix + (key,))


CONFIG_PATHS = list(_config_paths(json.loads(F.config_seeds()[0][1])))


@settings(max_examples=150, **SETTINGS)
@given(changes=st.lists(st.tuples(st.sampled_from(CONFIG_PATHS), JSON_VALUES | SIZES, st.booleans()), min_size=1, max_size=3),
       seed=st.integers(0, 1))
def test_config_json_with_wrong_values(changes, seed):
    doc = json.loads(F.config_seeds()[seed][1])
    for path, value, delete in changes:
        node = doc
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if delete:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    run("config", ".json", json.dumps(doc).encode())


CELL = st.text(alphabet=st.characters(codec="utf-8"), max_size=8) | st.sampled_from(["test", "TRAIN", "a.png", "/", ".", "..", "a/b.dcm", " "])


@settings(max_examples=100, **SETTINGS)
@given(header=st.lists(st.sampled_from(["file", "File ", "subject", "split", "side", "", "file"]) | CELL, max_size=5),
       rows=st.lists(st.lists(CELL, max_size=6), max_size=6), bom=st.booleans(), newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_manifest_tables(header, rows, bom, newline):
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=newline)
    for row in [header] + rows:
        writer.writerow(row)
    text = ("\ufeff" if bom else "") + buf.getvalue()
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: not text a spreadsheet writes
        assume(False)
    run("manifest", ".csv", data)


# ------------------------------------------------------------------------------------------------
# memory: huge declared dimensions are refused before anything is allocated


def _huge_files(folder: Path) -> dict[str, tuple[str, Path]]:
    files = {}

    def put(name, reader, suffix, data):
        path = folder / f"{name}{suffix}"
        path.write_bytes(data)
        files[name] = (reader, path)

    put("png_60000x60000", "image", ".png", png_with_header(60000, 60000, 8, 0))
    put("png_7071x7071_empty_idat", "image", ".png", png_with_header(7071, 7071, 16, 6))
    put("png_bomb", "image", ".png", png_with_header(7000, 7000, 8, 0, idat=zlib.compress(b"\x00" * (7001 * 7000), 9)))
    jpeg = bytearray(F._pil(F._pixels((40, 50, 3)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    struct.pack_into(">HH", jpeg, sof + 5, 65500, 65500)
    put("jpeg_65500x65500", "image", ".jpg", bytes(jpeg))
    bmp = bytearray(F._pil(F._pixels(), "BMP"))
    struct.pack_into("<ii", bmp, 18, 2**30, 2**30)
    put("bmp_2^30", "image", ".bmp", bytes(bmp))
    ds = F.dicom_dataset(F._pixels((4, 4)))
    ds.Rows = ds.Columns = 65535
    put("dicom_65535x65535", "dicom", ".dcm", F.dicom_bytes(ds))
    ds = F.dicom_dataset(F._pixels((1, 4, 4)), frames=1)
    ds.NumberOfFrames = 999_999_999
    put("dicom_1e9_frames", "dicom", ".dcm", F.dicom_bytes(ds))
    ds = F.dicom_dataset(F._pixels((4, 4)))
    ds.Rows, ds.Columns = 7000, 7000  # under the pixel limit, 4 bytes of pixel data
    put("dicom_7000x7000_short", "dicom", ".dcm", F.dicom_bytes(ds))
    doc = json.loads(F.labelme_seeds()[0][1])
    doc.update(imageHeight=10**6, imageWidth=10**6)
    put("labelme_1e6x1e6", "labelme", ".json", json.dumps(doc).encode())
    doc["imageHeight"] = doc["imageWidth"] = 7000
    doc["shapes"] = [{"label": "nerve", "points": [[3500, 3500], [3500 + 1e300, 3500]], "shape_type": "circle"}]
    put("labelme_huge_circle", "labelme", ".json", json.dumps(doc).encode())
    video = bytearray(F.video_seeds()[0][1])
    entry = video.find(b"mp4v")
    if entry > 0:
        struct.pack_into(">HH", video, entry + 4 + 24, 65535, 65535)
    put("mp4_declared_65535", "video", ".mp4", bytes(video))
    return files


_MEMORY_PROBE = r"""
import json, resource, sys, time, tracemalloc, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
import fuzz_readers as F
from pathlib import Path
files = json.loads(sys.argv[2])
for reader in sorted({r for r, _ in files.values()}):  # warm the decoders, so only the huge files count
    suffix, data = F.READERS[reader].seeds()[0]
    seed = Path(sys.argv[3]) / f"seed-{reader}{suffix}"
    seed.write_bytes(data)
    F.check(F.READERS[reader], seed)
start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
for name, (reader, path) in files.items():
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        outcome = F.check(F.READERS[reader], Path(path))
    except F.Crash as crash:
        outcome = "CRASH " + str(crash)
    peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"name": name, "outcome": outcome, "traced_peak_mb": round(peak / 2**20, 1),
                      "seconds": round(time.perf_counter() - t0, 3)}), flush=True)
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) / 1024
print(json.dumps({"rss_growth_mb": round(grew, 1)}))
"""


def test_huge_declared_dimensions_are_refused_in_bounded_memory_and_time(tmp_path):
    """One subprocess reads every file: per file the peak of Python-traced memory (numpy arrays
    report to tracemalloc) and the time; for all of them the growth of the peak RSS (which also
    sees C allocations, Pillow's and FFmpeg's)."""
    import os

    files = _huge_files(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(ROOT / "benchmarks"),
                           json.dumps({k: [r, str(p)] for k, (r, p) in files.items()}), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    results, total = lines[:-1], lines[-1]
    report = json.dumps(lines, indent=1)
    assert len(results) == len(files), report
    assert not [r for r in results if r["outcome"].startswith("CRASH") or r["traced_peak_mb"] > 300 or r["seconds"] > 5], report
    assert total["rss_growth_mb"] < 600, report
    refused = {r["name"] for r in results if r["outcome"] == "refused"}
    for name in ("png_60000x60000", "jpeg_65500x65500", "bmp_2^30", "dicom_65535x65535", "dicom_1e9_frames", "labelme_1e6x1e6"):
        assert name in refused, report


# ------------------------------------------------------------------------------------------------
# every crash found so far, replayed


REGRESSIONS = sorted((ROOT / "tests" / "fuzz_regressions").glob("*"))


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_every_recorded_crash_is_fixed(path):
    reader = path.name.split("-")[0]
    suffix = "" if path.suffix == ".bin" else path.suffix
    assert run(reader, suffix, path.read_bytes(), name=f"regression-{path.stem}") in ("ok", "refused")


def test_regressions_are_recorded():
    assert len(REGRESSIONS) >= 8
    assert {p.name.split("-")[0] for p in REGRESSIONS} <= set(F.READERS)
