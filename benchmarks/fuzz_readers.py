"""Coverage-guided fuzzing of every nerveseg reader (issue 12): a file is either read into a valid
result or refused with an InputError (ConfigError for config.json) that names it -- never another
exception, a hang or a memory blow-up.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/fuzz_readers.py --seconds 25            # every reader
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/fuzz_readers.py --reader dicom --seconds 600
    python benchmarks/fuzz_readers.py --engine hypothesis --seconds 25                       # without atheris

Engines: ``atheris`` (libFuzzer's coverage-guided mutator over nerveseg, Pillow's Python plugins,
pydicom and skimage, instrumented at import; ``pip install atheris``) or ``hypothesis``
(random byte-level mutations of the same seeds, no coverage feedback) when atheris does not
install. Each reader runs in its own process (libFuzzer exits when it is done) with a per-input
time limit of 10 s and an RSS limit of 2 GB (both are failures, as a crash). It prints, per
reader, the inputs tried and the distinct crashes (exception type + the innermost nerveseg
frame); each crashing input is saved under ``--crashes`` (default benchmarks/fuzz_crashes/) so it
can become a regression test. Exit status 1 when any reader crashed.

The seed files and the checks (:data:`READERS`, :func:`check`) are shared with
tests/test_properties.py, which runs bounded, seeded property-based versions of the same
mutations in the test suite. Hand-made resource bombs (small files that are huge once read),
slow clients and numbers at the edges are benchmarks/reliability.py's: one fresh process per
case, its peak RSS measured.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 5.0  # one reader call; the property tests assert it, the fuzzer kills at 10 s


# ------------------------------------------------------------------------------------------------
# valid seed files, made here so the corpus needs no data on disk


def _png(array: np.ndarray) -> bytes:
    return _pil(array, "PNG")


def _pil(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _pixels(shape=(40, 50), seed=0, dtype=np.uint8, high=255) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * high).astype(dtype)


def image_seeds() -> list[tuple[str, bytes]]:
    from PIL import Image

    palette = Image.fromarray(_pixels(high=4)).convert("P")
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    return [
        (".png", _png(_pixels())),
        (".png", _png(_pixels(dtype=np.uint16, high=65535))),
        (".png", _png(_pixels((40, 50, 3)))),
        (".png", buf.getvalue()),
        (".jpg", _pil(_pixels((40, 50, 3)), "JPEG", quality=80)),
        (".tif", _pil(_pixels(dtype=np.uint16, high=65535), "TIFF")),
        (".tif", _pil(_pixels(dtype=np.float32, high=1.0), "TIFF")),
        (".tif", _pil(_pixels(), "TIFF", compression="tiff_deflate")),
        (".bmp", _pil(_pixels((40, 50, 3)), "BMP")),
    ]


def mask_seeds() -> list[tuple[str, bytes]]:
    mask = np.zeros((40, 50), np.uint8)
    mask[10:25, 15:35] = 1
    return [
        (".png", _png(mask)),
        (".png", _png(mask * 255)),
        (".tif", _pil(mask, "TIFF")),
        (".bmp", _pil(mask * 255, "BMP")),
        (".json", labelme_seeds()[0][1]),
    ]


def dicom_dataset(pixels: np.ndarray, frames: int | None = None, photometric: str = "MONOCHROME2", regions: bool = True):
    """An ultrasound DICOM data set (uncompressed) holding ``pixels`` ((F,) H, W (, 3))."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop = UltrasoundMultiFrameImageStorage if frames else UltrasoundImageStorage
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["nerveseg-fuzz", str(pixels.shape), str(frames)])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, meta.MediaStorageSOPInstanceUID, "US"
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    shape = pixels.shape[1:] if frames else pixels.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames:
        ds.NumberOfFrames = frames
        ds.FrameTime = 40.0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if regions:
        item = Dataset()
        item.RegionSpatialFormat, item.RegionDataType = 1, 1
        item.RegionLocationMinX0, item.RegionLocationMinY0 = 0, 0
        item.RegionLocationMaxX1, item.RegionLocationMaxY1 = int(shape[1]) - 1, int(shape[0]) - 1
        item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3
        item.PhysicalDeltaX = item.PhysicalDeltaY = 0.006
        ds.SequenceOfUltrasoundRegions = [item]
    ds.PixelData = pixels.tobytes()
    return ds


def dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_seeds() -> list[tuple[str, bytes]]:
    seeds = [
        (".dcm", dicom_bytes(dicom_dataset(_pixels()))),
        (".dcm", dicom_bytes(dicom_dataset(_pixels((3, 24, 32)), frames=3))),
        (".dcm", dicom_bytes(dicom_dataset(_pixels((24, 32, 3)), photometric="RGB", regions=False))),
        (".dcm", dicom_bytes(dicom_dataset(_pixels(dtype=np.uint16, high=4095)))),
    ]
    try:  # small compressed files that ship with pydicom: JPEG Baseline/Extended, JPEG-LS, JPEG 2000, RLE
        from pydicom.data import get_testdata_file

        for name in ("SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                     "MR_small_RLE.dcm", "JPGExtended.dcm", "SC_rgb_small_odd_jpeg.dcm"):
            path = get_testdata_file(name, download=False)  # the files in the wheel; never the network
            if path and Path(path).stat().st_size < 200_000:
                seeds.append((".dcm", Path(path).read_bytes()))
    except Exception:
        pass
    return seeds


def video_seeds() -> list[tuple[str, bytes]]:
    import av

    out = []
    for codec, suffix, fmt in (("mpeg4", ".mp4", "mp4"), ("mjpeg", ".avi", "avi")):
        buf = io.BytesIO()
        with av.open(buf, "w", format=fmt) as container:
            stream = container.add_stream(codec, rate=10)
            stream.width, stream.height = 32, 24
            stream.pix_fmt = "yuv420p" if codec == "mpeg4" else "yuvj420p"
            for i in range(4):
                frame = av.VideoFrame.from_ndarray(_pixels((24, 32, 3), seed=i), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        out.append((suffix, buf.getvalue()))
    return out


def labelme_seeds() -> list[tuple[str, bytes]]:
    doc = {
        "version": "5.2.1", "flags": {}, "imagePath": "a.png", "imageData": None,
        "imageHeight": 40, "imageWidth": 50,
        "shapes": [
            {"label": "nerve", "points": [[10, 10], [30, 12], [25, 30]], "shape_type": "polygon", "group_id": None, "flags": {}},
            {"label": "vessel", "points": [[5, 5], [12, 14]], "shape_type": "rectangle", "flags": {}},
            {"label": "nerve", "points": [[40, 20], [44, 20]], "shape_type": "circle", "flags": {}},
            {"label": "ruler", "points": [[0, 0], [49, 39]], "shape_type": "line", "flags": {}},
        ],
    }
    return [(".json", json.dumps(doc).encode())]


def manifest_seeds() -> list[tuple[str, bytes]]:
    text = "file,subject,device,region,side,split\na.png,s1,dev,wrist,left,train\nb.png,s1,dev,forearm,left,test\nc,s2,,,right,\n"
    return [(".csv", text.encode()), (".csv", ("\ufeff" + text).encode("utf-8"))]


def config_seeds() -> list[tuple[str, bytes]]:
    from nerveseg.config import ModelConfig, RunConfig

    plain = RunConfig().to_dict()
    multi = RunConfig(model=ModelConfig("sa_unet", {"features": [8, 16, 32, 64, 128], "out_channels": 2})).to_dict()
    multi["data"].update(label=None, labels=[1, 2], label_names=["nerve", "vessel"])
    multi["members"] = ["fold_0", "fold_1"]
    return [(".json", json.dumps(plain).encode()), (".json", json.dumps(multi).encode())]


# ------------------------------------------------------------------------------------------------
# the readers and what a valid result is


def _valid_image(out: Any) -> None:
    from nerveseg.data.io import MAX_IMAGE_PIXELS

    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.ndim == 2, (type(out), getattr(out, "shape", None))
    assert out.shape[0] > 0 and out.shape[1] > 0 and out.size <= MAX_IMAGE_PIXELS, out.shape
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0, (out.min(), out.max())


def _valid_mask(out: Any) -> None:
    from nerveseg.data.io import MAX_IMAGE_PIXELS

    assert isinstance(out, np.ndarray) and out.dtype == bool and out.ndim == 2, (type(out), getattr(out, "shape", None))
    assert out.shape[0] > 0 and out.shape[1] > 0 and out.size <= MAX_IMAGE_PIXELS, out.shape


def read_image(path: Path) -> None:
    from nerveseg.data.io import read_image as reader

    _valid_image(reader(path))


def read_mask(path: Path) -> None:
    from nerveseg.data.io import read_mask as reader

    _valid_mask(reader(path))
    if path.suffix == ".png":
        _valid_mask(reader(path, label=1))


def read_media(path: Path) -> None:
    """read_media, every frame iterated (a video is decoded lazily), spacing checked."""
    from nerveseg.data.media import read_media as reader

    media = reader(path)
    assert media.kind in ("image", "dicom", "video") and media.n_frames >= 0
    if media.spacing is not None:
        assert media.spacing.row_mm > 0 and media.spacing.col_mm > 0
        assert math.isfinite(media.spacing.row_mm) and math.isfinite(media.spacing.col_mm)
    n = 0
    for frame in media.frames():
        _valid_image(frame)
        n += 1
    assert n >= 0


def read_labelme(path: Path) -> None:
    from nerveseg.data.labelme import read_labelme_mask

    _valid_mask(read_labelme_mask(path))
    try:
        _valid_mask(read_labelme_mask(path, label="nerve"))
    except Exception as exc:  # "no shape labelled nerve" is a valid refusal; check() judges the type
        if "no shape labelled" not in str(exc):
            raise


def read_manifest(path: Path) -> None:
    from nerveseg.data.samples import read_manifest as reader

    out = reader(path)
    assert isinstance(out, dict)
    for stem, values in out.items():
        assert isinstance(stem, str) and stem and isinstance(values, dict)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())


def load_config(path: Path) -> None:
    from nerveseg.config import RunConfig

    config = RunConfig.load(path)
    assert isinstance(config, RunConfig)
    json.dumps(config.to_dict())  # what was loaded can be saved again


@dataclass(frozen=True)
class Reader:
    name: str
    call: Callable[[Path], None]
    seeds: Callable[[], list[tuple[str, bytes]]]
    suffixes: tuple[str, ...]  # the fuzzer's first byte picks one
    config: bool = False  # ConfigError instead of InputError


READERS: dict[str, Reader] = {r.name: r for r in (
    Reader("image", read_image, image_seeds, (".png", ".jpg", ".tif", ".bmp")),
    Reader("mask", read_mask, mask_seeds, (".png", ".tif", ".bmp", ".json")),
    Reader("dicom", read_media, dicom_seeds, (".dcm", "")),
    Reader("video", read_media, video_seeds, (".mp4", ".avi")),
    Reader("labelme", read_labelme, labelme_seeds, (".json",)),
    Reader("manifest", read_manifest, manifest_seeds, (".csv",)),
    Reader("config", load_config, config_seeds, (".json",), config=True),
)}


class Crash(Exception):
    """A reader did something it must not: another exception, a message without the file, too slow."""

    def __init__(self, reader: str, path: Path, what: str, exc: BaseException | None = None):
        self.reader, self.path, self.what = reader, path, what
        self.signature = what
        if exc is not None:
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if "nerveseg" in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside nerveseg"
            self.signature = f"{type(exc).__name__} at {where}"
            what = f"{what}: {type(exc).__name__}: {exc}"
        super().__init__(f"{reader} on {path}: {what}")


def check(reader: Reader, path: Path, time_limit: float = TIME_LIMIT_S) -> str:
    """Run ``reader`` on ``path``; return "ok" or "refused", raise Crash otherwise."""
    from nerveseg.errors import ConfigError, InputError

    allowed = ConfigError if reader.config else InputError
    t0 = time.perf_counter()
    try:
        reader.call(path)
        outcome = "ok"
    except allowed as exc:
        if str(path) not in str(exc):
            raise Crash(reader.name, path, f"message does not name the file: {exc}") from None
        outcome = "refused"
    except AssertionError as exc:
        raise Crash(reader.name, path, f"invalid result ({exc})", exc) from None
    except Exception as exc:
        raise Crash(reader.name, path, "unexpected exception", exc) from None
    elapsed = time.perf_counter() - t0
    if elapsed > time_limit:
        raise Crash(reader.name, path, f"took {elapsed:.1f} s (limit {time_limit} s)")
    return outcome


# ------------------------------------------------------------------------------------------------
# the fuzzing worker (one reader per process) and the driver


class Worker:
    def __init__(self, reader: Reader, crashes: Path, stats_path: Path):
        self.reader, self.crashes, self.stats_path = reader, crashes, stats_path
        folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        self.tmp = Path(tempfile.mkdtemp(prefix=f"nerveseg-fuzz-{reader.name}-", dir=folder))
        self.stats = {"reader": reader.name, "inputs": 0, "ok": 0, "refused": 0, "slowest_s": 0.0, "crashes": {}}
        self.last_flush = 0.0

    def one(self, data: bytes) -> None:
        suffixes = self.reader.suffixes
        suffix = suffixes[data[0] % len(suffixes)] if data else suffixes[0]
        path = self.tmp / f"input{suffix}"
        path.write_bytes(data[1:])
        self.stats["inputs"] += 1
        t0 = time.perf_counter()
        try:
            self.stats[check(self.reader, path, time_limit=10.0)] += 1
            elapsed = time.perf_counter() - t0
            if elapsed > self.stats["slowest_s"]:
                self.stats["slowest_s"] = round(elapsed, 3)
        except Crash as crash:
            known = self.stats["crashes"].setdefault(crash.signature, {"count": 0, "example": "", "message": str(crash)[:500]})
            known["count"] += 1
            if not known["example"]:
                self.crashes.mkdir(parents=True, exist_ok=True)
                name = f"{self.reader.name}-{hashlib.sha1(data).hexdigest()[:12]}{suffix or '.bin'}"
                (self.crashes / name).write_bytes(data[1:])
                known["example"] = str(self.crashes / name)
                print(f"\nCRASH {crash.signature}: {crash}", file=sys.stderr, flush=True)
        if time.monotonic() - self.last_flush > 2.0:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        self.stats_path.write_text(json.dumps(self.stats, indent=1))


def _seed_corpus(reader: Reader, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (suffix, data) in enumerate(reader.seeds()):
        index = reader.suffixes.index(suffix) if suffix in reader.suffixes else 0
        (folder / f"seed{i}").write_bytes(bytes([index]) + data)
    return folder


def run_worker(args: argparse.Namespace) -> None:
    import warnings

    warnings.simplefilter("ignore")
    reader = READERS[args.reader]
    worker = Worker(reader, Path(args.crashes), Path(args.stats))
    corpus = _seed_corpus(reader, worker.tmp / "corpus")
    if args.engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["nerveseg", "PIL", "pydicom", "skimage", "csv", "json"]):
            import nerveseg.config  # noqa: F401
            import nerveseg.data.io  # noqa: F401
            import nerveseg.data.labelme  # noqa: F401
            import nerveseg.data.media  # noqa: F401
            import nerveseg.data.samples  # noqa: F401
        for _, data in reader.seeds():  # warm the lazy imports inside the readers, instrumented
            with atheris.instrument_imports(include=["nerveseg", "PIL", "pydicom", "skimage"]):
                worker.one(bytes([0]) + data)
        atexit_flush(worker)
        Path(args.crashes).mkdir(parents=True, exist_ok=True)
        atheris.Setup([sys.argv[0], f"-max_total_time={args.seconds}", "-timeout=10", "-rss_limit_mb=2048",
                       "-max_len=262144", "-print_final_stats=1", f"-artifact_prefix={Path(args.crashes) / reader.name}-",
                       str(corpus)], worker.one)
        atheris.Fuzz()
    else:
        rng = np.random.default_rng(args.seed)
        seeds = [f.read_bytes() for f in sorted(corpus.iterdir())]
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            worker.one(mutate(seeds[rng.integers(len(seeds))], rng))
        worker.flush()


def atexit_flush(worker: Worker) -> None:
    import atexit

    atexit.register(worker.flush)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """libFuzzer's kind of byte mutation, without coverage (the hypothesis-less fallback)."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        op = int(rng.integers(7))
        pos = int(rng.integers(1, max(len(buf), 2)))
        if op == 0 and len(buf) > 1:
            del buf[pos:]
        elif op == 1 and len(buf) > 1:
            buf[min(pos, len(buf) - 1)] ^= 1 << int(rng.integers(8))
        elif op == 2:
            chunk = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
            buf[pos:pos + len(chunk)] = chunk
        elif op == 3:
            buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        elif op == 4:
            buf[pos:pos + 4] = int(rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 65535 * 65535 // 2])).to_bytes(4, "little")
        elif op == 5 and len(buf) > 8:
            a, b = sorted(int(x) for x in rng.integers(1, len(buf), 2))
            buf[pos:pos] = buf[a:b][:4096]
        elif op == 6 and len(buf) > 1:
            a = int(rng.integers(1, len(buf)))
            del buf[a:a + int(rng.integers(1, 64))]
    return bytes(buf)


def _replay(reader: Reader, artifact: Path) -> tuple[str, float]:
    """Run one saved input again, alone, in this process: (outcome or the crash, seconds)."""
    data = artifact.read_bytes()
    suffix = reader.suffixes[data[0] % len(reader.suffixes)] if data else reader.suffixes[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"replay{suffix}"
        path.write_bytes(data[1:])
        t0 = time.perf_counter()
        try:
            outcome = check(reader, path, time_limit=10.0)
        except Crash as crash:
            outcome = f"crash: {crash}"
        return outcome, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", choices=sorted(READERS), action="append", help="default: every reader")
    parser.add_argument("--seconds", type=int, default=25, help="fuzzing time per reader")
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    parser.add_argument("--crashes", default=str(ROOT / "benchmarks" / "fuzz_crashes"))
    parser.add_argument("--seed", type=int, default=0, help="hypothesis engine: the random seed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine == "auto":
        try:
            import atheris  # noqa: F401

            args.engine = "atheris"
        except ImportError:
            args.engine = "hypothesis"
    if args.worker:
        args.reader = args.reader[0]
        run_worker(args)
        return 0
    total_crashes = 0
    print(f"engine {args.engine}, {args.seconds} s per reader")
    print(f"{'reader':10} {'inputs':>8} {'read':>7} {'refused':>8} {'crashes':>8} {'slowest':>8}  seconds")
    for name in args.reader or sorted(READERS):
        with tempfile.TemporaryDirectory() as tmp:
            stats_path = Path(tmp) / "stats.json"
            cmd = [sys.executable, __file__, "--worker", "--reader", name, "--seconds", str(args.seconds),
                   "--engine", args.engine, "--crashes", args.crashes, "--stats", str(stats_path), "--seed", str(args.seed)]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds * 3 + 120)
            elapsed = time.monotonic() - t0
            stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {"inputs": 0, "ok": 0, "refused": 0, "crashes": {}}
            stats.setdefault("crashes", {})
            if proc.returncode != 0:  # libFuzzer's own findings: a timeout, the RSS limit, a signal
                tail = [line for line in proc.stderr.splitlines() if "ERROR: libFuzzer" in line or "==ERROR" in line]
                artifact = next((line.split("Test unit written to", 1)[1].strip() for line in proc.stderr.splitlines()
                                 if "Test unit written to" in line), "")
                signature = f"worker exit {proc.returncode}: {(tail or ['?'])[0][:120]}"
                replay = _replay(READERS[name], Path(artifact)) if artifact and Path(artifact).is_file() else None
                if replay is not None and replay[0] in ("ok", "refused") and "timeout" in signature:
                    # libFuzzer's timeout is wall-clock: a niced worker starved of CPU trips it too
                    stats.setdefault("not_reproduced", []).append(
                        f"{signature}; replayed alone: {replay[0]} in {replay[1]:.2f} s ({artifact})")
                else:
                    stats["crashes"][signature] = {"count": 1, "example": artifact,
                                                   "message": "" if replay is None else f"replay: {replay[0]}"}
        n_crashes = len(stats["crashes"])
        total_crashes += n_crashes
        print(f"{name:10} {stats['inputs']:>8} {stats['ok']:>7} {stats['refused']:>8} {n_crashes:>8} "
              f"{stats.get('slowest_s', 0):>7.2f}s  {elapsed:7.1f}")
        for signature, info in stats["crashes"].items():
            print(f"    {signature}  x{info['count']}  {info.get('example', '')}\n      {info.get('message', '')[:300]}")
        for line in stats.get("not_reproduced", []):
            print(f"    not a crash: {line}")
    print(f"distinct crashes: {total_crashes}")
    return 1 if total_crashes else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
