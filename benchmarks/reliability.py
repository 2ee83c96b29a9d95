"""Bounded reliability benchmark (issue 24): small hostile files and slow clients, each measured
for its outcome, time, peak memory and whether a traceback was printed.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/reliability.py                  # readers + CLI
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/reliability.py --web            # + the server
    python benchmarks/reliability.py --only mp4 --only labelme --json out.json

Every file is generated here (nothing is committed): the DICOM excess-frame bomb (header: one
512x512 frame; deflated pixel data: 300), an RGB 32-bit deflated 7000x7000 DICOM and its 5-frame
version (2.9 GB of zeros, written by streaming the deflate), a deflated DICOM of zeros that
inflates past ``MAX_DICOM_INFLATED_BYTES``, a 7000x7000 all-zero PNG, a 1001-frame 32x32 MP4,
LabelMe polygons of 20,000 and 200,000 vertices, and the extreme numbers (a DICOM whose region
says PhysicalDeltaX = 1e-170 and ``--mm-per-pixel 1e200``, both through ``nerveseg segment``).

Each case runs in a fresh Python process, so its peak RSS (``os.wait4``'s ru_maxrss) is its own;
each has a time limit (``--timeout``, 60 s). A reader case calls the reader the way ``segment``
and ``serve`` do and prints its result or the InputError; a CLI case runs ``python -m nerveseg
segment``. A "traceback" is any "Traceback (most recent call last)" in the process's output.

With ``--web``, ``nerveseg serve`` is started on a free loopback port (no token is needed on
loopback) and the same files are posted to ``POST /api/cases``, plus ``?mm_per_pixel=1e200``,
``POST /scale {"mm_per_pixel": 1e-320}`` and two slow-client cases: 17 uploads sending one byte a
second for 10 s, and 64 PUT bodies that send nothing for 10 s, while a normal upload and
``GET /api/health`` (and ``GET /``) are timed. Recorded: the HTTP status (a 5xx is a failure), the
time, the server's peak RSS so far (VmHWM) after each case with what the case added to it, and any
traceback in its log.

Targets: no case above 1.5 GB, no 5xx, no traceback; the exit status is 1 when one is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MB = 1500.0  # the target: no case above 1.5 GB
TRACEBACK = "Traceback (most recent call last)"


# ------------------------------------------------------------------------------------------------
# the hostile files
# ------------------------------------------------------------------------------------------------


def _dataset(rows: int, cols: int, frames: int | None, samples: int, bits: int, deflated: bool,
             delta_cm: float | None = None):
    """An ultrasound data set without pixel data (the caller adds or streams it)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["nerveseg-reliability", str((rows, cols, frames, bits))])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = UltrasoundImageStorage, meta.MediaStorageSOPInstanceUID, "US"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if delta_cm is not None:  # one calibrated region over the whole image (the standard's unit: cm)
        item = Dataset()
        item.RegionSpatialFormat, item.RegionDataType = 1, 1
        item.RegionLocationMinX0, item.RegionLocationMinY0 = 0, 0
        item.RegionLocationMaxX1, item.RegionLocationMaxY1 = cols - 1, rows - 1
        item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3
        item.PhysicalDeltaX = item.PhysicalDeltaY = delta_cm
        ds.SequenceOfUltrasoundRegions = [item]
    return ds


def write_deflated_dicom(path: Path, ds, chunks: Iterable[bytes], n_bytes: int) -> Path:
    """A Deflated Explicit VR Little Endian file whose pixel data (``n_bytes``, from ``chunks``)
    is deflated as it is generated: a 2.9 GB data set never exists in memory here."""
    from pydicom.filebase import DicomBytesIO, DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info

    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), ds.file_meta, enforce_standard=True)
        f.write(deflate.compress(body.getvalue()))
        f.write(deflate.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, n_bytes)))  # (7FE0,0010) OB
        for chunk in chunks:
            f.write(deflate.compress(chunk))
        f.write(deflate.flush())
    return path


def _zeros(n_bytes: int, chunk: int = 1 << 24) -> Iterable[bytes]:
    block = bytes(chunk)
    while n_bytes > 0:
        yield block[:min(chunk, n_bytes)]
        n_bytes -= chunk


def make_files(folder: Path) -> dict[str, Path]:
    """Every file of the benchmark, by name."""
    import av
    from PIL import Image

    files: dict[str, Path] = {}
    frame = (np.arange(512 * 512) % 251).astype(np.uint8).tobytes()  # not zeros: compresses ~270:1 as the issue's
    files["dicom_excess_frames"] = write_deflated_dicom(folder / "excess_frames.dcm", _dataset(512, 512, 1, 1, 8, True),
                                                        [frame] * 300, 300 * len(frame))
    size = 7000 * 7000 * 3 * 4
    files["dicom_rgb32_7000"] = write_deflated_dicom(folder / "rgb32_7000.dcm", _dataset(7000, 7000, None, 3, 32, True),
                                                     _zeros(size), size)
    files["dicom_rgb32_7000_x5"] = write_deflated_dicom(folder / "rgb32_7000_x5.dcm", _dataset(7000, 7000, 5, 3, 32, True),
                                                        _zeros(5 * size), 5 * size)
    size = 1024 * 1024 * 1000
    files["dicom_deflated_zeros"] = write_deflated_dicom(folder / "zeros_1000x1024x1024.dcm",
                                                         _dataset(1024, 1024, 1000, 1, 8, True), _zeros(size), size)
    Image.fromarray(np.zeros((7000, 7000), np.uint8)).save(folder / "zeros_7000.png", optimize=True)
    files["png_7000_zeros"] = folder / "zeros_7000.png"

    path = folder / "loop_1001.mp4"
    base = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(1001):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, i, axis=0), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    files["mp4_1001_frames"] = path

    for n in (20_000, 200_000):
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        points = np.round(np.c_[256 + 200 * np.cos(t), 256 + 200 * np.sin(t)], 3).tolist()
        path = folder / f"polygon_{n // 1000}k.json"
        path.write_text(json.dumps({"imageHeight": 512, "imageWidth": 512, "imagePath": "a.png",
                                    "shapes": [{"label": "nerve", "points": points, "shape_type": "polygon"}]}))
        files[f"labelme_{n // 1000}k_vertices"] = path

    ds = _dataset(64, 64, None, 1, 8, False, delta_cm=1e-170)
    ds.PixelData = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8).tobytes()
    ds.save_as(folder / "delta_1e-170.dcm", enforce_file_format=True)
    files["dicom_delta_1e-170"] = folder / "delta_1e-170.dcm"
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((128, 128)) * 255).astype(np.uint8)).save(folder / "good.png")
    files["good_png"] = folder / "good.png"
    return files


# ------------------------------------------------------------------------------------------------
# one case = one fresh process
# ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    case: str
    how: str
    outcome: str
    seconds: float
    peak_mb: float
    traceback: bool
    ok: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str, float, float, float]:
    """Run ``cmd``: (exit status or None when killed at ``timeout``, output, wall s, CPU s, peak RSS MB)."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        status = None
        while True:
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(code)
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                _, code, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = status if status is not None else -9  # reaped here; keep Popen from waiting again
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return status, text, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def reader_child(kind: str, path: str) -> None:
    """In the child process: read ``path`` as ``segment``/``serve`` would, print the outcome."""
    from nerveseg.errors import InputError

    try:
        if kind == "labelme":
            from nerveseg.data.labelme import read_labelme_mask

            mask = read_labelme_mask(path)
            print(f"read: mask of {mask.sum():,} px")
        else:
            from nerveseg.data.media import read_media

            media = read_media(path, max_frames=1000)  # the server's default --max-frames
            n = sum(1 for _ in media.frames())
            first = next(media.frames())
            print(f"read: {n} frame(s) of {first.shape[1]}x{first.shape[0]}")
    except InputError as exc:
        print(f"refused: {exc.problem} -- {exc.fix}")


def reader_case(name: str, kind: str, path: Path, timeout: float, expect: str) -> Result:
    status, text, wall, cpu, peak = _run([sys.executable, __file__, "--child", kind, str(path)], timeout, _env())
    lines = [line for line in text.splitlines() if line.startswith(("read:", "refused:"))]
    outcome = lines[-1] if lines else (f"killed after {timeout:.0f} s" if status is None else f"exit {status}")
    result = Result(name, "reader", outcome, round(wall, 2), round(peak), TRACEBACK in text, extra={"cpu_s": round(cpu, 2)})
    result.ok = not result.traceback and peak <= LIMIT_MB and status == 0 and outcome.startswith(expect)
    return result


def cli_case(name: str, args: list[str], timeout: float, expect_status: Iterable[int], folder: Path) -> Result:
    status, text, wall, cpu, peak = _run([sys.executable, "-m", "nerveseg", *args], timeout, _env())
    text = text.replace(str(folder) + os.sep, "")  # file names, not the temporary folder
    said = [line.strip() for line in text.splitlines()
            if line.startswith(("error:", "segmented", "nerveseg segment: error")) or "pixel size of" in line]
    unique = list(dict.fromkeys(said))  # a line printed twice is shown once, with its count
    said = [line + (f" (x{said.count(line)})" if said.count(line) > 1 else "") for line in unique]
    outcome = f"exit {status}: " + ("; ".join(said) if said else " ".join(text.strip().splitlines()[-1:]))
    result = Result(name, "nerveseg " + " ".join(a if os.sep not in a else Path(a).name for a in args), outcome,
                    round(wall, 2), round(peak), TRACEBACK in text, extra={"cpu_s": round(cpu, 2)})
    result.ok = not result.traceback and peak <= LIMIT_MB and status in set(expect_status)
    return result


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------


class Server:
    """``nerveseg serve`` on a free loopback port, its log in a file."""

    def __init__(self, workspace: Path, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = log
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "nerveseg", "serve", "--port", str(self.port),
                                      "--workspace", str(workspace)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)

    def wait_ready(self, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.request("GET", "/api/health", timeout=2)[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.5)
        return False

    def request(self, method: str, url: str, body: bytes | None = None, timeout: float = 60,
                headers: dict | None = None) -> tuple[int, bytes, float]:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, url, body=body, headers={"Content-Type": "application/octet-stream", **(headers or {})})
            response = conn.getresponse()
            return response.status, response.read(), time.perf_counter() - t0
        finally:
            conn.close()

    def peak_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def tracebacks(self) -> int:
        self.log.flush()
        return self.log_path.read_text("utf-8", "replace").count(TRACEBACK)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:120].decode("utf-8", "replace")
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])[:200]
    if isinstance(data, dict) and "frames" in data:
        return f"case of {len(data['frames'])} frame(s)"
    return str(data)[:120]


def _slow_body(port: int, method: str, url: str, length: int, byte_every_s: float | None, seconds: float,
               out: list, index: int) -> None:
    """A client that sends its headers, then one body byte every ``byte_every_s`` (None: none)."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=seconds + 30) as s:
            s.sendall(f"{method} {url} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
                      f"Content-Length: {length}\r\n\r\n".encode())
            sent = 0
            while time.perf_counter() - t0 < seconds and sent < length:
                time.sleep(byte_every_s or 0.2)
                if byte_every_s:
                    s.sendall(b"\x89")
                    sent += 1
            s.settimeout(30)
            head = s.recv(200).decode("latin-1")
        out[index] = (int(head.split()[1]) if head.startswith("HTTP/") else f"closed ({head[:20]!r})", time.perf_counter() - t0)
    except OSError as exc:  # the server closing a crawling connection is an answer too
        out[index] = (f"{type(exc).__name__}", time.perf_counter() - t0)


def _timed_during(server: Server, good: bytes, case_id: str | None, clients: Callable[[list], list[threading.Thread]],
                  n: int) -> tuple[list, dict]:
    """Start ``n`` slow clients, wait 2 s, time a normal upload, GET /api/health and GET /."""
    answers: list = [None] * n
    threads = clients(answers)
    for t in threads:
        t.start()
    time.sleep(2)
    timed = {}
    for label, method, url, body in (("upload", "POST", "/api/cases?name=good.png", good),
                                     ("health", "GET", "/api/health", None), ("page", "GET", "/", None)):
        try:
            status, reply, seconds = server.request(method, url, body, timeout=30)
            timed[label] = (status, round(seconds, 2), _detail(reply) if status >= 400 else "")
        except OSError as exc:
            timed[label] = (type(exc).__name__, None, "")
    for t in threads:
        t.join(60)
    return answers, timed


def web_cases(files: dict[str, Path], folder: Path, timeout: float) -> list[Result]:
    server = Server(folder / "workspace", folder / "serve.log")
    results: list[Result] = []
    try:
        if not server.wait_ready():
            tail = server.log_path.read_text("utf-8", "replace")[-500:]
            return [Result("serve", "nerveseg serve", f"did not start: {tail}", 0, 0, TRACEBACK in tail, ok=False)]
        tracebacks, peak_before = server.tracebacks(), server.peak_mb()

        def record(name: str, how: str, outcome: str, status, seconds: float, note: str = "") -> None:
            # the server's peak RSS is its peak so far; a case misses the target when it raised it past the limit
            nonlocal tracebacks, peak_before
            now, peak = server.tracebacks(), server.peak_mb()
            five = isinstance(status, int) and status >= 500
            too_big = peak > LIMIT_MB and peak > peak_before + 1
            results.append(Result(name, how, outcome, round(seconds, 2), round(peak), now > tracebacks,
                                  ok=not five and now == tracebacks and not too_big and status is not None, note=note,
                                  extra={"peak_rise_mb": round(max(peak - peak_before, 0))}))
            tracebacks, peak_before = now, peak

        def upload(name: str, path: Path, query: str = "", case_timeout: float = timeout) -> str | None:
            try:
                status, body, seconds = server.request("POST", f"/api/cases?name={path.name}{query}", path.read_bytes(),
                                                       timeout=case_timeout)
                record(name, f"POST /api/cases{query}", f"{status}: {_detail(body)}", status, seconds)
                return json.loads(body).get("id") if status == 201 else None
            except OSError as exc:
                record(name, f"POST /api/cases{query}", f"no answer within {case_timeout:.0f} s ({type(exc).__name__})",
                       None, case_timeout, note="the server went on working after the client gave up")
                return None

        good_id = upload("good_png", files["good_png"])
        for name in ("dicom_excess_frames", "dicom_rgb32_7000", "dicom_rgb32_7000_x5", "dicom_deflated_zeros",
                     "png_7000_zeros", "dicom_delta_1e-170"):
            case_id = upload(name, files[name])
            if name == "png_7000_zeros" and case_id:  # the display endpoints of a huge image
                for what in ("thumbnail.png", "frames/0/overlay.png"):
                    try:
                        status, body, seconds = server.request("GET", f"/api/cases/{case_id}/{what}", timeout=timeout)
                        record(f"{name} {what}", f"GET .../{what}", f"{status}: {len(body):,} bytes" if status == 200
                               else f"{status}: {_detail(body)}", status, seconds)
                    except OSError as exc:
                        record(f"{name} {what}", f"GET .../{what}", type(exc).__name__, None, timeout)
        upload("mm_per_pixel_1e200", files["good_png"], "&mm_per_pixel=1e200")
        if good_id:
            try:
                status, body, seconds = server.request("POST", f"/api/cases/{good_id}/scale",
                                                       json.dumps({"mm_per_pixel": 1e-320}).encode(), timeout=timeout,
                                                       headers={"Content-Type": "application/json"})
                record("scale_1e-320", "POST /api/cases/ID/scale", f"{status}: {_detail(body)}", status, seconds)
                status, body, seconds = server.request("POST", f"/api/cases/{good_id}/frames/0/reset", b"", timeout=timeout)
                record("reset after scale_1e-320", "POST .../frames/0/reset", f"{status}: {_detail(body)}", status, seconds)
            except OSError as exc:
                record("scale_1e-320", "POST /api/cases/ID/scale", type(exc).__name__, None, timeout)

        good = files["good_png"].read_bytes()

        def trickle(answers: list) -> list[threading.Thread]:
            return [threading.Thread(target=_slow_body, args=(server.port, "POST", "/api/cases?name=slow.png", 10, 1.0,
                                                              10, answers, i)) for i in range(len(answers))]

        answers, timed = _timed_during(server, good, good_id, trickle, 17)
        record("17 uploads at 1 byte/s", "POST /api/cases x17, 10 s each",
               _slow_outcome(answers, timed), _worst(answers, timed), max(a[1] for a in answers if a))

        if good_id:
            def silent(answers: list) -> list[threading.Thread]:
                return [threading.Thread(target=_slow_body, args=(server.port, "PUT", f"/api/cases/{good_id}/frames/0/mask",
                                                                  1000, None, 10, answers, i)) for i in range(len(answers))]

            answers, timed = _timed_during(server, good, good_id, silent, 64)
            record("64 silent PUT bodies", "PUT .../mask x64, nothing sent for 10 s",
                   _slow_outcome(answers, timed), _worst(answers, timed), max(a[1] for a in answers if a))

        # last: on a server without the frame-count check this keeps its CPU busy after we give up
        upload("mp4_1001_frames", files["mp4_1001_frames"], case_timeout=min(timeout, 30))
    finally:
        server.stop()
    return results


def _slow_outcome(answers: list, timed: dict) -> str:
    counts: dict = {}
    for a in answers:
        counts[a[0] if a else "none"] = counts.get(a[0] if a else "none", 0) + 1
    slow = ", ".join(f"{k} x{v}" for k, v in counts.items())
    during = "; ".join(f"{k} {v[0]} in {v[1]} s" + (f" ({v[2]})" if v[2] else "") for k, v in timed.items())
    return f"slow clients got {slow}; meanwhile {during}"


def _worst(answers: list, timed: dict):
    statuses = [a[0] for a in answers if a] + [v[0] for v in timed.values()]
    ints = [s for s in statuses if isinstance(s, int)]
    return max(ints) if ints else None


# ------------------------------------------------------------------------------------------------


READER_CASES = [  # name, reader, expected outcome
    ("dicom_excess_frames", "media", "read"),
    ("dicom_rgb32_7000", "media", "refused"),
    ("dicom_rgb32_7000_x5", "media", "refused"),
    ("dicom_deflated_zeros", "media", "refused"),
    ("png_7000_zeros", "media", "read"),
    ("mp4_1001_frames", "media", "refused"),
    ("labelme_20k_vertices", "labelme", "read"),
    ("labelme_200k_vertices", "labelme", ""),
]


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def table(results: list[Result]) -> str:
    lines = ["| case | through | outcome | s | peak RSS MB | traceback | ok |", "| --- | --- | --- | ---: | ---: | --- | --- |"]
    for r in results:
        outcome = r.outcome.replace("|", "/").replace("\n", " ")
        if len(outcome) > 400:
            outcome = outcome[:397] + "..."
        peak = f"{r.peak_mb:.0f}" + (f" (+{r.extra['peak_rise_mb']})" if "peak_rise_mb" in r.extra else "")
        lines.append(f"| {r.case} | {r.how} | {outcome} | {r.seconds:.2f} | {peak} | "
                     f"{'yes' if r.traceback else 'no'} | {'yes' if r.ok else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--web", action="store_true", help="also start `nerveseg serve` and post the files to it")
    parser.add_argument("--only", action="append", help="cases whose name contains this (repeatable)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per case")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        reader_child(*args.child)
        return 0

    def wanted(name: str) -> bool:
        return not args.only or any(o in name for o in args.only)

    t_start = time.perf_counter()
    print(f"{machine()}; {dt.date.today().isoformat()}", flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="nerveseg-reliability-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        files = make_files(folder)
        print(f"generated {len(files)} files in {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{p.name} {p.stat().st_size / 1024:,.0f} KB" for p in files.values()), flush=True)
        for name, kind, expect in READER_CASES:
            if wanted(name):
                results.append(reader_case(name, kind, files[name], args.timeout, expect))
                print(f"  {name}: {results[-1].outcome[:150]} ({results[-1].seconds} s, {results[-1].peak_mb} MB)", flush=True)
        out = folder / "out"
        cli = [
            ("dicom_delta_1e-170", ["segment", str(files["dicom_delta_1e-170"]), "--out", str(out / "a")], (0, 1)),
            ("mm_per_pixel_1e200", ["segment", str(files["good_png"]), "--out", str(out / "b"), "--mm-per-pixel", "1e200"], (1, 2)),
            ("segment batch: 4 DICOM bombs + 1 good", ["segment", *(str(files[n]) for n in (
                "dicom_excess_frames", "dicom_rgb32_7000", "dicom_rgb32_7000_x5", "dicom_deflated_zeros", "good_png")),
                "--out", str(out / "c")], (1,)),
        ]
        for name, cli_args, statuses in cli:
            if wanted(name):
                results.append(cli_case(name, cli_args, args.timeout * 2, statuses, folder))
                print(f"  {name}: {results[-1].outcome[:200]} ({results[-1].seconds} s, {results[-1].peak_mb} MB)", flush=True)
        if args.web:
            for r in web_cases(files, folder, args.timeout):
                r.case = f"web: {r.case}"
                results.append(r)
                print(f"  {r.case}: {r.outcome[:200]} ({r.seconds} s, {r.peak_mb} MB)", flush=True)
    print(f"\n{table(results)}\n\n{sum(not r.ok for r in results)} case(s) missed a target; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "date": dt.date.today().isoformat(),
                                               "results": [asdict(r) for r in results]}, indent=1))
    return 1 if any(not r.ok for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
