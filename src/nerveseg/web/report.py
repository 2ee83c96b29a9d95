"""The carpal tunnel screening of the tagged cases: ``nerveseg report`` on the server's cases.

The cases' tags become a manifest and their whole-frame measurements a measurements.csv, in a
temporary folder; :func:`nerveseg.clinical.screening.screen` pairs and flags them exactly as the
command line does, and :func:`write_screening_report` writes screening.csv and report.md.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..clinical.screening import Cutoffs, screen, write_screening_report
from ..inference.measure import MEASUREMENT_FIELDS
from ..io_utils import atomic_write_csv
from .cases import Case

CUTOFF_SOURCES = {
    "wrist_csa_mm2": "most used cut-off; published optimal cut-offs 8.5-14 mm² (AANEM guideline, Cartwright et al., "
                     "Muscle Nerve 2012;46:287-293; meta-analysis Tai et al., Ultrasound Med Biol 2012;38:1121-1128)",
    "wfr": "wrist-to-forearm ratio, Hobson-Webb et al., Clin Neurophysiol 2008;119:1353-1357",
    "delta_csa_mm2": "wrist minus forearm CSA, Klauser et al., Eur Radiol 2009;19:2507-2515",
}


def screening(cases: list[Case], cutoffs: Cutoffs = Cutoffs()) -> dict:
    """Rows of the screening table, the cut-offs with their sources, and the report files' text."""
    tagged = [c for c in cases if c.tags.get("region")]
    with tempfile.TemporaryDirectory(prefix="nerveseg-report-") as tmp:
        folder = Path(tmp)
        manifest = [{"file": f"{c.id}.png", "subject": c.tags.get("subject") or c.id, "region": c.tags["region"],
                     "side": c.tags.get("side", "")} for c in tagged]
        atomic_write_csv(folder / "manifest.csv", manifest, ("file", "subject", "region", "side"))
        rows = [{**f.row, "file": f"{c.id}.png", "component": ""} for c in tagged for f in c.frames]
        atomic_write_csv(folder / "measurements.csv", rows, MEASUREMENT_FIELDS)
        table = screen(folder / "manifest.csv", folder / "measurements.csv", cutoffs) if tagged else []
        write_screening_report(table, folder, cutoffs)
        report_md = (folder / "report.md").read_text(encoding="utf-8")
        screening_csv = (folder / "screening.csv").read_text(encoding="utf-8")
    names = {c.id: c.name for c in tagged}
    for row in table:  # a note names the case id's "file"; show the client's name too
        row["notes"] = "; ".join(_rename(n, names) for n in row["notes"].split("; ")) if row["notes"] else ""
    return {
        "rows": table,
        "cutoffs": {"wrist_csa_mm2": cutoffs.wrist_csa_mm2, "wfr": cutoffs.wfr, "delta_csa_mm2": cutoffs.delta_csa_mm2},
        "sources": CUTOFF_SOURCES,
        "n_tagged_cases": len(tagged),
        "report_md": report_md,
        "screening_csv": screening_csv,
        "note": "Decision support only, not a diagnosis: flags mark measurements at or above literature cut-offs.",
    }


def _rename(note: str, names: dict[str, str]) -> str:
    stem, sep, rest = note.partition(": ")
    return f"{names[stem]}: {rest}" if sep and stem in names else note
