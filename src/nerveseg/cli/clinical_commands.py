"""``nerveseg report`` and ``import-seg``: the carpal tunnel screening report, and corrected DICOM
SEG files back into training pairs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import _positive_float


def cmd_import_seg(args: argparse.Namespace) -> int:
    from ..clinical.dicom_out import import_seg
    from ..errors import InputError

    if args.stem and len(args.segs) > 1:
        raise ConfigError("--stem names one pair; give one SEG with it")
    failed = 0
    for seg in args.segs:
        try:
            pair = import_seg(seg, args.out, args.source, stem=args.stem)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        for warning in pair.warnings:
            print(f"warning: {seg}: {warning}", file=sys.stderr)
        masks = pair.masks[0] if len(pair.masks) == 1 else f"{len(pair.masks)} frame masks in {pair.masks[0].parent}"
        print(f"{seg}: wrote {pair.image} and {masks} ({', '.join(f'{n} {c}' for n, c in pair.segments.items())})")
    if failed:
        print(f"nerveseg import-seg: {failed} SEG file(s) not imported (listed above as error:); exit status 1",
              file=sys.stderr)
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    import os

    from ..clinical.screening import Cutoffs, screen, write_screening_report

    cutoffs = Cutoffs(wrist_csa_mm2=args.wrist_csa, wfr=args.wfr, delta_csa_mm2=args.delta_csa)
    rows = screen(args.manifest, args.measurements, cutoffs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seg_dir = Path(args.measurements).parent
    overlays = {
        p.name[: -len("_overlay.png")]: os.path.relpath(p, out) for p in sorted(seg_dir.glob("*_overlay.png"))
    }
    write_screening_report(rows, out, cutoffs, overlays)
    flagged = sum(1 for r in rows if r["any_flag"])
    print(f"{len(rows)} subject/side pair(s), {flagged} with a flag; wrote {out}/screening.csv and report.md "
          "(decision support only)")
    return 0


def add_import_seg(sub) -> None:
    p = sub.add_parser("import-seg", help="a DICOM SEG (e.g. corrected in 3D Slicer/OHIF) + its image -> a training pair",
                       description="Write images/<stem>.png and masks/<stem>.png (0 background, 1 nerve, 2 vessel) "
                                   "into a data folder from a DICOM SEG and its source image; a cine loop gives "
                                   "images/<stem>.dcm and masks/<stem>/frame_NNNNN.png. Train with --labels 1,2 "
                                   "--label-names nerve,vessel (or --label 1 for the nerve).")
    p.add_argument("segs", nargs="+", metavar="SEG.dcm", help="DICOM Segmentation file(s)")
    p.add_argument("--source", nargs="+", required=True, metavar="PATH",
                   help="the source image(s) or folders holding them (found by the SOP Instance UID the SEG references)")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="data folder (images/, masks/ are made)")
    p.add_argument("--stem", default=None, help="name of the pair (default: the source image's file name)")
    p.set_defaults(func=cmd_import_seg)



def add_report(sub) -> None:
    p = sub.add_parser("report", help="carpal tunnel screening: wrist/forearm CSA, WFR, delta-CSA (decision support)")
    p.add_argument("--manifest", required=True, help="CSV with file, subject, region (wrist/forearm), side")
    p.add_argument("--measurements", required=True, help="measurements.csv from `nerveseg segment` (calibrated)")
    p.add_argument("--wrist-csa", type=_positive_float, default=10.0, help="wrist CSA cut-off, mm² (published 8.5-14)")
    p.add_argument("--wfr", type=_positive_float, default=1.4, help="wrist-to-forearm ratio cut-off")
    p.add_argument("--delta-csa", type=_positive_float, default=2.0, help="wrist minus forearm CSA cut-off, mm²")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)
