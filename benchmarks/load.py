"""Load test of ``nerveseg serve`` on this machine's loopback only; bounded, stops by itself.

    python benchmarks/load.py [--requests 1000] [--clients 8] [--bad-fraction 0.05] [--out FILE.json]

Starts ``python -m nerveseg serve`` on 127.0.0.1 (a free port, a temporary workspace, the
shipped model, default limits), then:

1. **single**: one client uploads a 534x512 PNG ``--single`` times and fetches its overlay; the
   server time (``Server-Timing`` of the upload + of the overlay) is "segmented and drawn";
2. **load**: ``--clients`` threads send ``--requests`` uploads in all (534x512 PNGs from the
   shipped examples; ``--bad-fraction`` of them bad: truncated, text behind a .png name,
   corrupt pixel data, empty), each with HTTP keep-alive.

Reports throughput, p50/p95 latency (client side, and server time of the good uploads), status
counts (bad uploads must get 4xx, good ones 201, and no 5xx at all) and the server's resident
memory (VmRSS) before and after. Every request goes to 127.0.0.1; the run stops after the
requests or ``--time-limit`` seconds, whichever comes first, and then stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import httpx
except ImportError:  # the test extra installs httpx2 (the same client API) rather than httpx
    import httpx2 as httpx

HOST = "127.0.0.1"  # loopback only, by construction
MAX_REQUESTS, MAX_CLIENTS, MAX_SECONDS = 5000, 32, 1800


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def server_ms(response: httpx.Response, key: str = "total") -> float | None:
    timing = response.headers.get("server-timing", "")
    for part in timing.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name == key or (key == "any" and dur):
            return float(dur)
    return None


def payloads() -> tuple[list[bytes], list[tuple[str, bytes]]]:
    from nerveseg.examples import examples_dir

    folder = examples_dir()
    good = [(folder / n).read_bytes() for n in ("usgra_0045.png", "usgra_0053.png", "usgra_0067.png")]
    bad = [
        ("truncated.png", good[0][: len(good[0]) // 3]),
        ("notes.png", b"this is a text file with a .png name\n" * 50),
        ("corrupt.png", good[1][:64] + bytes(4096)),
        ("empty.png", b""),
    ]
    return good, bad


def start_server(workspace: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nerveseg", "serve", "--host", HOST, "--port", str(port), "--workspace", str(workspace)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode(errors='replace')}")
        try:
            if httpx.get(f"http://{HOST}:{port}/api/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("server did not start within 120 s")


def single(base: str, image: bytes, n: int) -> dict:
    totals, uploads, overlays = [], [], []
    with httpx.Client(base_url=base, timeout=60) as c:
        for i in range(n + 2):
            r = c.post("/api/cases", params={"name": "single.png"}, content=image)
            r.raise_for_status()
            o = c.get(f"/api/cases/{r.json()['id']}/frames/0/overlay.png")
            if i < 2:
                continue  # warm-up
            up, ov = server_ms(r), server_ms(o, "encode")
            uploads.append(up)
            overlays.append(ov)
            totals.append(up + ov)
    return {"n": n, "server_ms_p50": round(statistics.median(totals), 1), "server_ms_p95": round(percentile(totals, 0.95), 1),
            "server_ms_min": round(min(totals), 1), "upload_segment_measure_ms_p50": round(statistics.median(uploads), 1),
            "overlay_png_ms_p50": round(statistics.median(overlays), 1)}


def load(base: str, good: list[bytes], bad: list[tuple[str, bytes]], requests: int, clients: int,
         bad_fraction: float, time_limit: float) -> dict:
    every = max(1, round(1 / bad_fraction)) if bad_fraction > 0 else 0
    plan = [("bad", *bad[(i // every) % len(bad)]) if every and i % every == every - 1 else ("good", "frame.png", good[i % len(good)])
            for i in range(requests)]
    lock = threading.Lock()
    next_index = [0]
    results: list[dict] = []
    stop_at = time.time() + time_limit

    def worker():
        with httpx.Client(base_url=base, timeout=120) as c:
            while time.time() < stop_at:
                with lock:
                    if next_index[0] >= len(plan):
                        return
                    kind, name, body = plan[next_index[0]]
                    next_index[0] += 1
                t0 = time.perf_counter()
                try:
                    r = c.post("/api/cases", params={"name": name}, content=body)
                    status, srv = r.status_code, server_ms(r)
                except httpx.HTTPError as exc:
                    status, srv = f"error: {type(exc).__name__}", None
                with lock:
                    results.append({"kind": kind, "status": status, "ms": (time.perf_counter() - t0) * 1000, "server_ms": srv})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    for r in results:
        statuses[f"{r['kind']} {r['status']}"] = statuses.get(f"{r['kind']} {r['status']}", 0) + 1
    good_ms = [r["ms"] for r in results if r["kind"] == "good" and r["status"] == 201]
    server = [r["server_ms"] for r in results if r["kind"] == "good" and r["server_ms"] is not None]
    return {
        "requests_sent": len(results), "planned": requests, "clients": clients, "seconds": round(elapsed, 1),
        "throughput_rps": round(len(results) / elapsed, 2), "statuses": dict(sorted(statuses.items())),
        "latency_ms_p50": round(percentile(good_ms, 0.5), 1), "latency_ms_p95": round(percentile(good_ms, 0.95), 1),
        "server_ms_p50": round(percentile(server, 0.5), 1), "server_ms_p95": round(percentile(server, 0.95), 1),
        "five_xx": sum(1 for r in results if isinstance(r["status"], int) and r["status"] >= 500),
        "bad_not_4xx": sum(1 for r in results if r["kind"] == "bad" and not (isinstance(r["status"], int) and 400 <= r["status"] < 500)),
        "good_not_201": sum(1 for r in results if r["kind"] == "good" and r["status"] != 201),
        "stopped_by_time_limit": len(results) < requests,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument("--single", type=int, default=20, help="sequential uploads for the server-time figure")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds; the load phase stops then")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if not (1 <= args.requests <= MAX_REQUESTS and 1 <= args.clients <= MAX_CLIENTS and 0 < args.time_limit <= MAX_SECONDS):
        parser.error(f"bounded: 1-{MAX_REQUESTS} requests, 1-{MAX_CLIENTS} clients, time limit up to {MAX_SECONDS} s")
    if not 0 <= args.bad_fraction < 1:
        parser.error("--bad-fraction must be in [0, 1)")
    good, bad = payloads()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="nerveseg-load-") as tmp:
        proc = start_server(Path(tmp) / "ws", port)
        base = f"http://{HOST}:{port}"
        try:
            rss_start = rss_mb(proc.pid)
            single_result = single(base, good[0], args.single)
            rss_before = rss_mb(proc.pid)
            load_result = load(base, good, bad, args.requests, args.clients, args.bad_fraction, args.time_limit)
            rss_after = rss_mb(proc.pid)
            health = httpx.get(f"{base}/api/health").json()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "loadavg_at_end": os.getloadavg(), "single": single_result, "load": load_result,
        "server_rss_mb": {"after_start": round(rss_start, 1), "before_load": round(rss_before, 1), "after_load": round(rss_after, 1)},
        "store_at_end": health,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    ok = load_result["five_xx"] == 0 and load_result["bad_not_4xx"] == 0 and load_result["good_not_201"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
