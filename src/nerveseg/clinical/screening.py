"""Carpal tunnel syndrome screening from median-nerve CSA: wrist CSA, wrist-to-forearm ratio
(WFR) and delta-CSA, flagged against configurable published cut-offs.

Decision support only: the flags say whether a measurement crosses a literature cut-off, not
whether a patient has carpal tunnel syndrome. Cut-off sources (see docs/CLINICAL.md):

* wrist CSA >= 10 mm^2: the most used cut-off; published optimal cut-offs range ~8.5-14 mm^2
  (AANEM evidence-based guideline, Cartwright et al., Muscle Nerve 2012;46:287-293;
  meta-analysis Tai et al., Ultrasound Med Biol 2012;38:1121-1128).
* WFR >= 1.4: Hobson-Webb et al., Clin Neurophysiol 2008;119:1353-1357.
* delta-CSA (wrist - forearm) >= 2 mm^2: Klauser et al., Eur Radiol 2009;19:2507-2515.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..data.samples import read_manifest
from ..errors import ConfigError, InputError
from ..io_utils import atomic_write_csv, atomic_write_text, csv_value, csv_values

SCREENING_FIELDS = (
    "subject", "side", "wrist_csa_mm2", "forearm_csa_mm2", "wfr", "delta_csa_mm2",
    "n_wrist", "n_forearm", "wrist_csa_flag", "wfr_flag", "delta_csa_flag", "any_flag", "notes",
)


@dataclass(frozen=True)
class Cutoffs:
    wrist_csa_mm2: float = 10.0
    wfr: float = 1.4
    delta_csa_mm2: float = 2.0
    wrist_regions: tuple[str, ...] = ("wrist", "carpal tunnel", "inlet", "pisiform")
    forearm_regions: tuple[str, ...] = ("forearm", "proximal forearm", "pronator quadratus")

    def __post_init__(self) -> None:
        for name, option in (("wrist_csa_mm2", "--wrist-csa"), ("wfr", "--wfr"), ("delta_csa_mm2", "--delta-csa")):
            value = getattr(self, name)
            # an infinite cut-off would never flag anything, silently; NaN compares false with everything
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"screening cut-off {name} ({option}) must be a finite number > 0, not {value!r}; "
                                  f"the defaults are wrist CSA 10 mm², WFR 1.4, delta-CSA 2 mm²")


def _region_kind(region: str, cutoffs: Cutoffs) -> str | None:
    r = region.strip().lower()
    if r in cutoffs.wrist_regions:
        return "wrist"
    if r in cutoffs.forearm_regions:
        return "forearm"
    return None


def _stem(name: str) -> str:
    return Path(name).stem


def _float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# What a reader of the report should know about a measurement that went into it: the QC flags of
# measurements.csv, a mask corrected by hand (the web page's "corrected"), a pixel size from a
# scale line drawn by hand. Without them a WFR of 0.56 (forearm larger than wrist) stands unexplained.
_NOTE_FLAGS = (
    ("multi_component", "several regions measured together"),
    ("touches_border", "nerve touches the image border"),
    ("low_confidence", "low model confidence"),
    ("corrected", "mask corrected by hand"),
)
_NOTE_SCALE_LINE = "pixel size from a scale line drawn by hand"


def _row_notes(row: dict) -> list[str]:
    flags = set((row.get("qc_flags") or "").split(";"))
    notes = [text for flag, text in _NOTE_FLAGS if flag in flags]
    if (row.get("spacing_source") or "").startswith("user scale line"):
        notes.append(_NOTE_SCALE_LINE)
    return notes


def _file_notes(stem: str, rows_notes: list[list[str]]) -> str | None:
    """One note for a file: what applied to its frames, with how many when not all of them."""
    counts: dict[str, int] = {}
    for notes in rows_notes:
        for note in notes:
            counts[note] = counts.get(note, 0) + 1
    if not counts:
        return None
    n = len(rows_notes)
    parts = [note if k == n else f"{note} ({k} of {n} frames)" for note, k in counts.items()]
    return f"{stem}: {', '.join(parts)}"


def screen(manifest_path: str | Path, measurements_path: str | Path, cutoffs: Cutoffs = Cutoffs()) -> list[dict]:
    """Pair wrist and forearm measurements of the same subject and side and flag them.

    Several images (or cine frames) of one site are averaged (mean CSA, their count reported).
    Measurements without a calibrated area (area_mm2 empty) or flagged ``no_nerve`` are left out
    and said in ``notes``; a pair missing either site gets empty ratios. The notes also carry,
    per file, the QC flags of the measurements used (several regions, touching the border, low
    confidence), masks corrected by hand and pixel sizes from a hand-drawn scale line.
    """
    # cells escaped for spreadsheets ("'=a.png") match their names again (see io_utils.csv_cell)
    manifest = {csv_value(stem): {k: csv_value(v) for k, v in info.items()}
                for stem, info in read_manifest(manifest_path).items()}
    try:
        with open(measurements_path, newline="", encoding="utf-8") as f:
            measurements = [csv_values(row) for row in csv.DictReader(f)]
    except OSError as exc:
        raise InputError(measurements_path, f"cannot read ({exc})", "pass the measurements.csv written by `nerveseg segment`") from None
    if measurements and not {"file", "area_mm2"} <= set(measurements[0]):
        raise InputError(measurements_path, "missing the columns file and area_mm2", "use the measurements.csv of `nerveseg segment`")
    areas: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    notes: dict[tuple[str, str], list[str]] = defaultdict(list)
    used_notes: dict[tuple[str, str], dict[str, list[list[str]]]] = defaultdict(dict)  # key -> stem -> per row
    for row in measurements:
        if row.get("component") not in (None, "", "0", "all"):
            continue  # per-component rows: the whole-mask row carries the CSA
        info = manifest.get(_stem(row["file"]))
        if info is None:
            continue
        kind = _region_kind(info.get("region", ""), cutoffs)
        if kind is None:
            continue
        key = (info.get("subject") or _stem(row["file"]), (info.get("side") or "").lower())
        area = _float(row.get("area_mm2"))
        if "no_nerve" in (row.get("qc_flags") or ""):
            notes[key].append(f"{_stem(row['file'])}: no nerve found, left out")
        elif area is None:
            notes[key].append(f"{_stem(row['file'])}: no calibration (area in pixels only), left out")
        else:
            areas[(key[0], key[1], kind)].append(area)
            used_notes[key].setdefault(_stem(row["file"]), []).append(_row_notes(row))
    for key, by_file in used_notes.items():
        notes[key].extend(n for n in (_file_notes(stem, rows) for stem, rows in by_file.items()) if n)
    keys = sorted({(s, side) for (s, side, _) in areas} | set(notes))
    report = []
    for subject, side in keys:
        wrist, forearm = areas.get((subject, side, "wrist"), []), areas.get((subject, side, "forearm"), [])
        w = sum(wrist) / len(wrist) if wrist else None
        fa = sum(forearm) / len(forearm) if forearm else None
        wfr = w / fa if w is not None and fa else None
        delta = w - fa if w is not None and fa is not None else None
        flags = {
            "wrist_csa_flag": None if w is None else w >= cutoffs.wrist_csa_mm2,
            "wfr_flag": None if wfr is None else wfr >= cutoffs.wfr,
            "delta_csa_flag": None if delta is None else delta >= cutoffs.delta_csa_mm2,
        }
        note = list(notes.get((subject, side), []))
        if w is None:
            note.append("no wrist measurement")
        if fa is None:
            note.append("no forearm measurement")
        report.append({
            "subject": subject, "side": side,
            "wrist_csa_mm2": w, "forearm_csa_mm2": fa, "wfr": wfr, "delta_csa_mm2": delta,
            "n_wrist": len(wrist), "n_forearm": len(forearm), **flags,
            "any_flag": any(v for v in flags.values() if v is not None),
            "notes": "; ".join(note),
        })
    return report


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def write_screening_report(rows: list[dict], out_dir: str | Path, cutoffs: Cutoffs = Cutoffs(),
                           overlays: dict[str, str] | None = None) -> None:
    """``screening.csv`` and a readable ``report.md`` (with overlay links when given)."""
    out = Path(out_dir)
    atomic_write_csv(out / "screening.csv", ({k: _cell(r[k]) for k in SCREENING_FIELDS} for r in rows), SCREENING_FIELDS)
    lines = [
        "# Median nerve CSA screening report",
        "",
        "**Decision support only, not a diagnosis.** Flags mark measurements at or above literature cut-offs;",
        "carpal tunnel syndrome is a clinical diagnosis confirmed by nerve conduction studies.",
        "",
        f"Cut-offs: wrist CSA >= {cutoffs.wrist_csa_mm2:g} mm² (published 8.5-14 mm²; Cartwright 2012, Tai 2012), "
        f"WFR >= {cutoffs.wfr:g} (Hobson-Webb 2008), delta-CSA >= {cutoffs.delta_csa_mm2:g} mm² (Klauser 2009).",
        "",
        "| subject | side | wrist CSA (mm²) | forearm CSA (mm²) | WFR | delta-CSA (mm²) | flags | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        flags = [name for name, key in (("wrist CSA", "wrist_csa_flag"), ("WFR", "wfr_flag"), ("delta-CSA", "delta_csa_flag")) if r[key]]
        lines.append(
            f"| {r['subject']} | {r['side']} | {_cell(r['wrist_csa_mm2'])} (n={r['n_wrist']}) | "
            f"{_cell(r['forearm_csa_mm2'])} (n={r['n_forearm']}) | {_cell(r['wfr'])} | {_cell(r['delta_csa_mm2'])} | "
            f"{', '.join(flags) or '-'} | {r['notes']} |"
        )
    if overlays:
        lines += ["", "## Overlays", ""]
        for name, path in sorted(overlays.items()):
            lines.append(f"**{name}**  \n![{name}]({path})\n")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
