"""``nerveseg segment`` and ``collect``: masks, overlays and measurements of files, folders, lists
and archives split into jobs, and joining the jobs' tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from .common import _positive_float, _spacing_xy

COLLECT_HELP = """\
Join the measurements tables that `nerveseg segment` jobs wrote into OUT (measurements.shard-I-of-N.csv,
or one job's measurements.csv) into OUT/measurements.csv, sorted by relative path (or file), frame and
component: the same bytes however the work was split or resumed. Also writes OUT/videos.json and
OUT/collect.json (missing inputs, failed inputs, jobs that have not run or not finished).

exit status:
  0  the table is complete: every job finished and every input has its rows
  1  the table was written, but inputs are missing or failed, or a job has not finished (listed)
  2  nothing was collected: no table in OUT, or tables of different splits (N)
"""


SEGMENT_EXIT_CODES = """\
exit status:
  0  every input was segmented (or, with --resume, was already complete)
  1  all inputs were tried, and at least one could not be segmented: unreadable, missing,
     of an unknown type, or a folder inside an input folder (each is reported as "error: ...";
     the others' results are written); with --dicom-out also a DICOM input whose SEG/SR could
     not be made (e.g. it lacks its Study/Series/SOP Instance UID)
  2  nothing or not everything was tried: a bad option or model, or a result could not be
     written (full disk, read-only folder; the results finished before are intact, run again
     with --resume)
  130 interrupted (Ctrl-C); --resume continues
"""


def cmd_segment(args: argparse.Namespace) -> int:
    from ..inference import segment_files
    from ..inference.calibration import spacing_from_user
    from ..inference.onnx_backend import load_predictor
    from ..inference.planning import parse_shard, plan_inputs
    from ..inference.segment import SegmentOptions
    from ..pretrained import resolve_model

    if not args.inputs and args.list is None:
        raise ConfigError("give the inputs: files or folders, or --list FILE.csv")
    shard = parse_shard(args.shard)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.collect_only:  # no model: the inputs are listed only to tell which are missing
        from ..inference.archive import collect

        items, problems = plan_inputs(args.inputs, Path(args.out), recursive=args.recursive, list_file=args.list, log=log)
        return _report_collect(collect(args.out, planned=[it.path for it in items], log=log, failed=problems))
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    predictor = load_predictor(model_dir, backend=args.backend, device=args.device, intra_op_num_threads=args.threads)
    options = SegmentOptions(
        threshold=args.threshold,
        low_confidence=args.low_confidence,
        spacing=spacing_from_user(args.mm_per_pixel, args.spacing),
        postprocess=args.postprocess,
        min_area_px=args.min_area,
        per_component=args.per_component,
        labelme=args.labelme,
        temporal_smoothing=args.temporal_smoothing,
    )
    dicom = None
    if args.dicom_out:  # a DICOM SEG + SR next to each DICOM input's masks (docs/CLINICAL.md)
        from ..clinical.dicom_out import DicomResultWriter, model_identity
        from ..inference.segment import with_model_threshold

        dicom = DicomResultWriter(args.out, model_identity(model_dir), getattr(predictor, "class_names", ["nerve"]),
                                  threshold=with_model_threshold(options, predictor).threshold, log=log)
    result = segment_files(args.inputs, predictor, args.out, options, log=log, resume=args.resume,
                           recursive=args.recursive, list_file=args.list, shard=shard, on_input=dicom)
    n_inputs = len({row["file"] for row in result.rows})
    resumed = f" ({len(result.skipped)} already complete, kept)" if result.skipped else ""
    job = f" (job {shard[0]}/{shard[1]}: {result.planned} input(s) of the whole)" if shard[1] > 1 else ""
    print(f"segmented {n_inputs} input(s){resumed}{job} with the model in {model_dir}: {len(result.rows)} measurement "
          f"row(s), {len(result.problems)} problem(s); "
          + (f"wrote {result.table}" if result.table else f"wrote nothing ({args.out} not created)"))
    if dicom is not None:
        print(dicom.summary())
    if shard[1] > 1:
        print(f"when every job has finished: nerveseg collect {args.out}")
    if result.problems:
        print(f"nerveseg segment: {len(result.problems)} input(s) not segmented (listed above as error:); "
              "exit status 1", file=sys.stderr)
    if dicom is not None and dicom.problems:
        print(f"nerveseg segment: {len(dicom.problems)} DICOM input(s) without SEG/SR (listed above as error:); "
              "exit status 1", file=sys.stderr)
    return 1 if result.problems or (dicom is not None and dicom.problems) else 0


def cmd_collect(args: argparse.Namespace) -> int:
    from ..inference.archive import collect

    return _report_collect(collect(args.out, log=lambda m: print(m, file=sys.stderr)))


def _report_collect(result) -> int:
    jobs = f" of {result.shards} jobs" if result.shards > 1 else ""
    print(f"collected {result.inputs} input(s){jobs}: {result.rows} row(s) in {result.table}; {len(result.missing)} "
          f"missing, {len(result.failed)} failed, {len(result.problems)} job problem(s) (collect.json lists them)")
    return 0 if result.complete else 1


def add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment images, DICOM or cine loops; write masks, overlays, measurements.csv",
                       epilog=SEGMENT_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image, DICOM or video files, or folders of them (sub-folders are "
                   "searched with --recursive, else reported; other files are reported)")
    p.add_argument("--recursive", action="store_true",
                   help="search input folders and their sub-folders; results mirror the tree: ROOT/a/b/case.png -> "
                        "OUT/a/b/case_mask.png (paths relative to the folder given, or to the deepest folder holding "
                        "all the folders given), and measurements get a relpath column")
    p.add_argument("--list", default=None, metavar="FILE.csv",
                   help="segment the files in a CSV with a column 'path' (or a text file, one path per line); relative "
                        "paths are read from the list's folder, and results mirror them below --out as with --recursive; "
                        "bad lines are reported and the rest go on")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="job I (0-based) of N sharing --out: segments only the inputs whose name hashes to I (needs no "
                        "coordination; give every job the same inputs) and writes measurements.shard-I-of-N.csv; "
                        "then `nerveseg collect OUT`. 0/1 (default): all inputs, measurements.csv. See docs/SCALE.md")
    p.add_argument("--collect-only", action="store_true",
                   help="segment nothing: join the jobs' tables in --out into measurements.csv (as `nerveseg collect`) "
                        "and report which of the inputs given are missing")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the network (torch and onnxruntime; default: theirs). With N jobs on one "
                        "machine, give each cores/N")
    p.add_argument("--model", default=None, help="run folder from `nerveseg train` (default: the shipped model, nerveseg_nerves; docs/MODEL_CARD.md)")
    p.add_argument("--out", required=True)
    p.add_argument("--mm-per-pixel", type=_positive_float, default=None, help="isotropic pixel size in mm (overrides DICOM)")
    p.add_argument("--spacing", type=_spacing_xy, default=None, help="X,Y pixel size in mm (overrides DICOM)")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability cut for the masks (default: the model's, config.json inference.threshold, 0.5 "
                        "unless chosen on cross-validation)")
    p.add_argument("--low-confidence", type=float, default=None,
                   help="flag measurements whose mean probability inside the mask is under this (default: the "
                        "model's, config.json inference.low_confidence, chosen on cross-validation)")
    p.add_argument("--postprocess", choices=("none", "largest", "min_area", "ellipse"), default="none")
    p.add_argument("--min-area", type=int, default=0, help="drop components smaller than this many pixels")
    p.add_argument("--per-component", action="store_true", help="one measurement row per component")
    p.add_argument("--labelme", action="store_true", help="also write <stem>.json LabelMe polygons (correct and retrain)")
    p.add_argument("--temporal-smoothing", type=float, default=0.0, help="cine loops: weight of previous frames (0-0.9)")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto: onnxruntime when installed (fastest on CPU), else torch")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true",
                   help="skip inputs whose outputs in --out are complete (their rows in measurements.csv and every "
                        "mask/overlay file, or a loop's overlay video); the rest are segmented and measurements.csv "
                        "ends with every input's rows. Use the same inputs and options as the interrupted run "
                        "(and the same --shard: each job resumes its own table)")
    p.add_argument("--dicom-out", action="store_true",
                   help="also write, for each DICOM input, <stem>_seg.dcm (DICOM Segmentation, one segment per class "
                        "found) and <stem>_sr.dcm (DICOM SR, TID 1500: CSA and perimeter in mm where calibrated, "
                        "circularity, flattening, QC flags); non-DICOM inputs get a note (no study to attach to). "
                        "See docs/CLINICAL.md")
    p.set_defaults(func=cmd_segment)



def add_collect(sub) -> None:
    p = sub.add_parser("collect", help="join the measurements tables of `segment --shard` jobs into one measurements.csv",
                       description=COLLECT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the --out folder the segment jobs shared")
    p.set_defaults(func=cmd_collect)
