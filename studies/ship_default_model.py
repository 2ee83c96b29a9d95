"""Ship a trained run or ensemble folder as the package's default model (src/nerveseg/pretrained/NAME).

Usage: python studies/ship_default_model.py RUN [--name nerveseg_nerves] [--tta | --no-tta] [--keep-largest nerve]
           [--cv-metrics RUN/cv_plain/metrics.json] [--card-data TEXT] [--card-limits TEXT] [--card-validation TEXT]

Copies config.json + model.safetensors (each member's, for an ensemble) and exports each one's
model.onnx, so the default backend never exports at run time. Every machine-specific value is
removed: the data folder (the images are not shipped), and an --init-from path. The inference
options (--tta, --keep-largest, --threshold, --low-confidence) are the ones chosen on cross-validation
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from nerveseg.config import RunConfig
from nerveseg.inference.onnx_backend import export_onnx, weights_sha256
from nerveseg.inference.onnx_session import load_torch_model
from nerveseg.io_utils import atomic_write_json

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nerveseg" / "pretrained"


def portable(config: RunConfig, tta: bool | None, keep_largest: tuple[str, ...] | None,
             threshold: float | None = None, low_confidence: float | None = None) -> RunConfig:
    config.data.data_dir = ""  # the data sets are named in docs/MODEL_CARD.md; the paths were this machine's
    if config.train.init_from not in (None, "default"):
        config.train.init_from = Path(config.train.init_from).name
    if tta is not None:
        config.inference.tta = tta
    if keep_largest is not None:
        config.inference.keep_largest = keep_largest
    if threshold is not None:
        config.inference.threshold = threshold
    if low_confidence is not None:
        config.inference.low_confidence = low_confidence
    return config


def ship_run(run: Path, dest: Path, tta=None, keep_largest=None, threshold=None, low_confidence=None,
             member_thresholds: dict[str, float] | None = None) -> None:
    """Copy ``run`` (a run, an ensemble or a routed model) into ``dest`` with a portable config and
    an ONNX graph per network; ``member_thresholds`` sets members' own cuts (a routed model moves each
    member's cut onto its own, RoutedPredictor)."""
    dest.mkdir(parents=True, exist_ok=True)
    config = portable(RunConfig.load(run / "config.json"), tta, keep_largest, threshold, low_confidence)
    atomic_write_json(dest / "config.json", config.to_dict())
    unknown = sorted(set(member_thresholds or {}) - set(config.members))
    if unknown:
        raise SystemExit(f"--member-threshold names {unknown}, which are not members of {run} ({config.members})")
    if config.router:  # a routed model: its router (weights and routes, no path) goes with it
        shutil.copytree(run / config.router, dest / config.router)
    if config.members:
        for member in config.members:
            ship_run(run / member, dest / member, threshold=(member_thresholds or {}).get(member))
        return
    shutil.copyfile(run / "model.safetensors", dest / "model.safetensors")
    export_onnx(load_torch_model(dest, config), dest / "model.onnx", 18, config=config,
                weights_hash=weights_sha256(dest / "model.safetensors"))


DATA_USGRA = "usgra-seg dataset, T. M. K., CC-BY 4.0: 204 peripheral-nerve ultrasound images, one machine, one examiner"
DATA_BOTH = (DATA_USGRA + "; mn-wrist images from the DL-UNet project (SasageyoOrg/dl-unet), GPL-3.0: 190 carpal-tunnel "
             "images of 75 patients, median nerve")
LIMITS_BOTH = ("trained on plexus, elbow, femoral and sciatic nerves (one machine) and the median nerve at the carpal tunnel "
               "inlet (one wrist data set, machine unknown); not on the forearm, other machines, children or pathology; "
               "check every outline")
LIMITS_ROUTED = ("; an anatomy router sends each image to the wrist model or the regional-anaesthesia model, and was "
                 "fitted and tested on these two data sets only: an image from another machine may go to the wrong "
                 "model (the route is named in measurements.csv and on the page)")


def model_card(cv_metrics: Path, config: RunConfig, cv_folds: int | None = None, members_held_out: bool = False,
               name: str = "nerveseg_nerves", data: str = DATA_BOTH, limits: str = LIMITS_BOTH) -> dict:
    """The summary `nerveseg serve` shows (web/model_slot.py), from the cross-validation metrics."""
    import json

    m = json.loads(cv_metrics.read_text())
    classes = m.get("classes") or {"nerve": m}
    figures = "; ".join(
        f"{name} Dice {c['dice']['mean']:.3f} ± {c['dice']['sd']:.3f}, {100 * c['zero_overlap_rate']:.1f}% complete misses"
        for name, c in classes.items()
    )
    if config.members and members_held_out:  # fold models: the ensemble itself was cross-validated
        how = f"{len(config.members)}-fold cross-validation of these members"
    elif config.members:  # models of one recipe, each trained on every image with its own seed
        how = (f"{len(config.members)} models of one recipe (training seeds differ), each saw every image; the recipe, "
               f"as a {len(config.members)}-model ensemble cut at {config.inference.threshold:.2f}, was cross-validated on {cv_folds or '?'} held-out fold(s) "
               "of a 5-fold split by image")
    else:  # one model on all images: the figures are its recipe's, from fold models that never saw the image
        how = (f"these weights saw every image; their recipe was cross-validated on {cv_folds or '?'} held-out "
               "fold(s) of a 5-fold split by image")
    by_source = m.get("by_source") or {}
    if by_source:  # several data folders: each one's figure, as the model card reports them
        # folds are made within each data set, grouped by patient where it names them (mn-wrist's manifest.csv)
        how = how.replace("split by image", "split made within each data set, by patient where it names them")
        figures = "; ".join(f"{source}: nerve Dice {c['dice']['mean']:.3f} ± {c['dice']['sd']:.3f} ({c['n_images']} images), "
                            f"{100 * c['zero_overlap_rate']:.1f}% complete misses" for source, c in by_source.items())
    return {
        "name": name,
        "data": data,
        "validation": f"{how}, each image scored by a fold model that never saw it "
                      f"({m['n_images']} images): {figures} (docs/MODEL_CARD.md)",
        "limits": limits,
        "use": "Not a medical device. Research and decision support only.",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--name", default="nerveseg_nerves")
    parser.add_argument("--card-validation", default=None,
                        help="the model card's validation line as text, when no --cv-metrics covers the shipped recipe")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--keep-largest", default=None, help="comma list of class names; '' for none")
    parser.add_argument("--threshold", type=float, default=None, help="the probability cut chosen on cross-validation")
    parser.add_argument("--member-threshold", action="append", default=[], metavar="NAME=CUT",
                        help="a member's own probability cut (a routed model's member, chosen by nested CV for its anatomy)")
    parser.add_argument("--low-confidence", type=float, default=None,
                        help="the low_confidence QC flag's cut chosen on cross-validation (studies/qc_flags_cv.py)")
    parser.add_argument("--cv-metrics", default=None, help="metrics.json of `evaluate --subset cv`: writes model_card.json")
    parser.add_argument("--cv-folds", type=int, default=None, help="how many held-out folds those metrics cover (a single model)")
    args = parser.parse_args()
    dest = PACKAGE / args.name
    if dest.exists():
        shutil.rmtree(dest)
    keep = None if args.keep_largest is None else tuple(c for c in args.keep_largest.split(",") if c)
    member_thresholds = {}
    for item in args.member_threshold:
        name, _, cut = item.partition("=")
        try:
            member_thresholds[name] = float(cut)
        except ValueError:
            parser.error(f"--member-threshold {item!r}: give NAME=CUT, e.g. wrist=0.75")
    ship_run(Path(args.run), dest, args.tta, keep, args.threshold, args.low_confidence, member_thresholds)
    if args.cv_metrics:
        config = RunConfig.load(dest / "config.json")
        # fold models (each held images out) or models trained on every image (seeds of one recipe)
        held_out = bool(config.members) and all(RunConfig.load(dest / m / "config.json").val_stems for m in config.members)
        atomic_write_json(dest / "model_card.json", model_card(Path(args.cv_metrics), config, args.cv_folds, held_out,
                                                               name=args.name))
    elif args.card_validation:
        routed = bool(RunConfig.load(dest / "config.json").router)
        atomic_write_json(dest / "model_card.json", {"name": args.name, "data": DATA_BOTH, "validation": args.card_validation,
                                                     "limits": LIMITS_BOTH + (LIMITS_ROUTED if routed else ""),
                                                     "use": "Not a medical device. Research and decision support only."})
    for path in sorted(dest.rglob("*")):
        if path.is_file():
            path.chmod(0o644)
            print(f"{path.relative_to(PACKAGE)}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
