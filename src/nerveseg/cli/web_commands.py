"""``nerveseg serve`` (the web page and API) and ``nerveseg demo`` (the shipped examples)."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

from .common import _positive_float


def _missing_web_dependencies() -> list[str]:
    import importlib.util

    return [name for module, name in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"))
            if importlib.util.find_spec(module) is None]


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket of ``serve``, bound before the model loads and before "open http://..."
    is printed: a port in use is then a one-line error naming the port and the fix (exit 2), not
    the address of whatever else listens there followed by uvicorn's raw errno and exit 3. The
    socket is handed to uvicorn, so nothing can take the port between the check and the start."""
    from ..errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use (another nerveseg serve, or another program); "
                              f"stop that server, or choose a free port: --port {port + 1 if port < 65535 else 8080}") from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"port {port} on {host} needs administrator rights (ports below 1024); "
                              "choose a port of 1024 or more: --port 8000") from None
        raise ConfigError(f"cannot listen on {host} port {port} ({exc.strerror or exc}); check --host and --port") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    missing = _missing_web_dependencies()
    if missing:
        raise ConfigError(f"nerveseg serve needs {' and '.join(missing)}: pip install 'nerveseg[web]'")
    import uvicorn

    from ..pretrained import resolve_model
    from ..web import ServeSettings, create_app
    from ..web.server import uvicorn_config

    settings = ServeSettings(
        model_dir=resolve_model(args.model),
        workspace=Path(args.workspace), host=args.host, port=args.port, token=args.token, no_auth=args.no_auth,
        backend=args.backend, device=args.device, max_image_mb=args.max_image_mb, max_video_mb=args.max_video_mb,
        max_frames=args.max_frames, max_cases=args.max_cases, max_store_mb=args.max_store_mb,
        workers=args.workers, max_queue=args.max_queue, finetune_epochs=args.finetune_epochs,
        max_megapixels=args.max_megapixels, body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
        max_connections=args.max_connections, keep_finetune_runs=args.keep_finetune_runs,
    )
    sock = _bind(settings.host, settings.port)
    try:
        print(f"nerveseg serve: loading the model from {settings.model_dir} ...", file=sys.stderr)
        app = create_app(settings)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"nerveseg serve: open http://{host}:{settings.port}/ (API: /docs); workspace {settings.workspace}"
              + ("; API calls need 'Authorization: Bearer <token>'" if settings.token else "")
              + ("; WARNING: no authentication, anyone on the network can use it" if settings.no_auth else ""),
              file=sys.stderr)
        uvicorn.Server(uvicorn_config(app, settings)).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    out = Path(args.out)
    demo = run_demo(out, model_dir=args.model, backend=args.backend, log=lambda m: print(m, file=sys.stderr))
    rows = demo.result.rows
    print(f"segmented {len(demo.inputs)} example files (usgra-seg dataset, T. M. K., CC-BY 4.0; mn-wrist images from the "
          f"DL-UNet project (SasageyoOrg/dl-unet), GPL-3.0) with the model in {demo.model_dir}:")
    for path in demo.inputs:
        mine = [r for r in rows if Path(r["file"]).name == path.name]
        if not mine:
            continue
        areas = [r["area_mm2"] if r["area_mm2"] != "" else r["area_px"] for r in mine]
        unit = "mm²" if mine[0]["area_mm2"] != "" else "px"
        # a routed model names the member each file went to: the reader sees the wrist went to the wrist model
        routes = sorted({r["model_route"] for r in mine if r.get("model_route")})
        route = f", model route {'/'.join(routes)}" if routes else ""
        if len(mine) == 1:
            print(f"  {path.name}: nerve CSA {areas[0]} {unit}, QC {mine[0]['qc_flags'] or 'ok'}{route}")
        else:
            values = [float(a) for a in areas]
            print(f"  {path.name}: {len(mine)} frames, nerve CSA {min(values):g}-{max(values):g} {unit}{route}")
    print(f"results in {out}/: measurements.csv, <name>_mask.png, <name>_overlay.png; the cine loop's "
          f"<name>_overlay.mp4 and <name>_csa.png")
    # the page shows only the files opened in it (README's quick start says the same)
    print(f"see, correct and measure them in the browser: nerveseg serve --workspace {out / 'workspace'}  "
          f"then open http://127.0.0.1:8000/ and drop the example files of {demo.inputs[0].parent} onto the page "
          f"(it starts empty; the masks you correct and save go to {out / 'workspace'})")
    return 0 if rows and not demo.result.problems else 1


SERVE_EXIT_CODES = """\
exit status:
  0  the server was started and stopped (Ctrl-C or SIGTERM: uvicorn finishes the requests in progress)
  2  it did not start: a bad option, the web extra missing (pip install 'nerveseg[web]'), the port in
     use or needing administrator rights (the message names the port and a free one), or a model that
     cannot be loaded
"""


def add_web_commands(sub) -> None:
    """Register ``serve`` and ``demo`` on the ``nerveseg`` subparsers."""
    p = sub.add_parser("serve", help="web page + REST API: see, correct and measure nerves in the browser",
                       epilog=SERVE_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="run folder (default: the shipped model, nerveseg_nerves; docs/MODEL_CARD.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only; another needs --token or --no-auth)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workspace", default="nerveseg-workspace",
                   help="folder for corrected cases (images/, masks/, manifest.csv) and fine-tuning runs")
    p.add_argument("--token", default=None, help="bearer token every API request must carry (at least 16 characters)")
    p.add_argument("--no-auth", action="store_true", help="allow a non-loopback --host without a token (not advised)")
    p.add_argument("--max-image-mb", type=_positive_float, default=50, help="upload limit for PNG/JPEG/TIFF/BMP")
    p.add_argument("--max-video-mb", type=_positive_float, default=500, help="upload limit for MP4/AVI and DICOM")
    p.add_argument("--max-frames", type=int, default=1000, help="most frames in one cine loop")
    p.add_argument("--max-cases", type=int, default=64, help="cases kept in memory (oldest evicted)")
    p.add_argument("--max-store-mb", type=_positive_float, default=1024, help="memory for cases (oldest evicted)")
    p.add_argument("--workers", type=int, default=1, help="segmentations at once (each uses every core)")
    p.add_argument("--max-queue", type=int, default=16, help="segmentations waiting; beyond that: 503 + Retry-After")
    p.add_argument("--finetune-epochs", type=int, default=10, help="default epochs of the page's fine-tune button")
    p.add_argument("--keep-finetune-runs", type=int, default=5,
                   help="fine-tuning runs kept in WORKSPACE/finetune/; older run folders are deleted when a run starts or ends")
    p.add_argument("--max-megapixels", type=_positive_float, default=40,
                   help="largest frame, in million pixels, checked from the file's header before decoding (413 beyond)")
    p.add_argument("--body-timeout", type=_positive_float, default=30,
                   help="seconds a request body may send nothing (or average under 1 KB/s after them) before 408")
    p.add_argument("--header-timeout", type=_positive_float, default=10,
                   help="seconds a connection has to send a request's headers before it is closed")
    p.add_argument("--max-connections", type=int, default=256,
                   help="connections and requests at once (uvicorn's limit_concurrency; 503 beyond)")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="segment the example files shipped with nerveseg (no data needed)")
    p.add_argument("--out", required=True, help="folder for masks, overlays, measurements.csv")
    p.add_argument("--model", default=None, help="run folder (default: the shipped model, nerveseg_nerves; docs/MODEL_CARD.md)")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto")
    p.set_defaults(func=cmd_demo)
