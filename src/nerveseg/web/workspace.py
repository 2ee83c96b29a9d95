"""The workspace: corrected cases saved as training pairs that ``nerveseg train`` reads.

Layout (the data folder of the README)::

    WORKSPACE/images/<stem>.png   8-bit grey frame
    WORKSPACE/masks/<stem>.png    palette PNG label map: 0 background, 1 nerve, 2 vessel
                                  (usgra-seg's layout; train with --label 1 for the nerve)
    WORKSPACE/manifest.csv        file, subject, device, region, side, split, source, case, frame, saved,
                                  corrected
    WORKSPACE/finetune/<job>/     fine-tuning runs started from the page

Stems are made by the server (``web_<case id>_f<frame>``). Every file is written atomically;
an existing pair is never replaced unless the caller says ``overwrite``. ``corrected`` is
``yes`` for a mask corrected by hand on the page and ``no`` for the model's own mask saved
unchanged (training on it teaches the model nothing new, and validating on it measures the
model against itself). ``subject`` is the case's CTS subject tag, else ``case-<case id>``: the
frames of one cine loop are one subject, so a train/validation split never puts near-identical
frames on both sides.
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

from ..io_utils import atomic_path, atomic_write_csv, csv_values
from .cases import Case
from .images import label_png, png_bytes

MANIFEST_FIELDS = ("file", "subject", "device", "region", "side", "split", "source", "case", "frame", "saved",
                   "corrected")


class PairExists(Exception):
    def __init__(self, stem: str, index: int | None = None):
        self.stem, self.index = stem, index
        super().__init__(f"{stem} is already in the workspace")


def subject_of(case: Case) -> str:
    return case.tags.get("subject") or f"case-{case.id}"


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.images = self.root / "images"
        self.masks = self.root / "masks"
        self.manifest = self.root / "manifest.csv"
        self.finetune = self.root / "finetune"
        self._lock = threading.Lock()
        for folder in (self.images, self.masks, self.finetune):
            folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def stem(case: Case, index: int) -> str:
        return f"web_{case.id}_f{index:05d}"

    def read_manifest(self) -> list[dict]:
        if not self.manifest.is_file():
            return []
        with self.manifest.open(newline="", encoding="utf-8-sig") as f:
            return [csv_values(row) for row in csv.DictReader(f)]  # rewritten by save: no quote added twice

    def pairs(self) -> list[str]:
        """Stems that have both an image and a mask."""
        return sorted(p.stem for p in self.images.glob("*.png") if (self.masks / p.name).is_file())

    def save(self, case: Case, index: int, overwrite: bool = False) -> dict:
        """Write one frame of a case as a training pair and its manifest row."""
        return self.save_frames(case, [index], overwrite)[0]

    def save_frames(self, case: Case, indices: list[int], overwrite: bool = False) -> list[dict]:
        """Write frames of a case as training pairs, each once, and the manifest once.

        Without ``overwrite`` nothing is written when any of the pairs exists (PairExists names
        the first). Indices must be valid and distinct (the router checks and deduplicates)."""
        stems = {index: self.stem(case, index) for index in indices}
        saved_at = time.strftime("%Y-%m-%dT%H:%M:%S")
        with self._lock:
            if not overwrite:
                for index, stem in stems.items():
                    if (self.images / f"{stem}.png").exists() or (self.masks / f"{stem}.png").exists():
                        raise PairExists(stem, index)
            new_rows = []
            for index, stem in stems.items():
                frame = case.frame(index)
                # mask first, then image: a pair counts once both exist, so a crash leaves no
                # image without its mask for training to pick up
                with atomic_path(self.masks / f"{stem}.png") as tmp:
                    tmp.write_bytes(label_png(frame.labels))
                with atomic_path(self.images / f"{stem}.png") as tmp:
                    tmp.write_bytes(png_bytes(frame.image))
                new_rows.append({
                    "file": f"{stem}.png", "subject": subject_of(case), "device": "",
                    "region": case.tags.get("region", ""), "side": case.tags.get("side", ""), "split": "",
                    "source": case.name, "case": case.id, "frame": index, "saved": saved_at,
                    "corrected": "yes" if frame.edited else "no",
                })
            written = set(stems.values())
            rows = [r for r in self.read_manifest() if Path(r.get("file", "")).stem not in written] + new_rows
            fields = list(MANIFEST_FIELDS) + [k for r in rows for k in r if k not in MANIFEST_FIELDS]
            atomic_write_csv(self.manifest, rows, list(dict.fromkeys(fields)))
        out = []
        for index, stem in stems.items():
            case.saved[index] = stem
            out.append({"stem": stem, "image": f"images/{stem}.png", "mask": f"masks/{stem}.png",
                        "manifest": "manifest.csv", "corrected": case.frames[index].edited})
        return out

    def corrected_stems(self) -> dict[str, bool]:
        """Stem -> whether its mask was corrected by hand (True when the manifest does not say:
        pairs put in the workspace by other means are taken as the user's own)."""
        return {Path(r.get("file", "")).stem: r.get("corrected", "") != "no" for r in self.read_manifest()}
