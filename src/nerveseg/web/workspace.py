"""The workspace: corrected cases saved as training pairs that ``nerveseg train`` reads.

Layout (the data folder of the README)::

    WORKSPACE/images/<stem>.png   8-bit grey frame
    WORKSPACE/masks/<stem>.png    palette PNG label map: 0 background, 1 nerve, 2 vessel
                                  (usgra-seg's layout; train with --label 1 for the nerve)
    WORKSPACE/manifest.csv        file, subject, device, region, side, split, source, case, frame, saved
    WORKSPACE/finetune/<job>/     fine-tuning runs started from the page

Stems are made by the server (``web_<case id>_f<frame>``). Every file is written atomically;
an existing pair is never replaced unless the caller says ``overwrite``.
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

from ..io_utils import atomic_path, atomic_write_csv, csv_values
from .cases import Case
from .images import label_png, png_bytes

MANIFEST_FIELDS = ("file", "subject", "device", "region", "side", "split", "source", "case", "frame", "saved")


class PairExists(Exception):
    def __init__(self, stem: str):
        self.stem = stem
        super().__init__(f"{stem} is already in the workspace")


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
        stem = self.stem(case, index)
        frame = case.frame(index)
        with self._lock:
            if not overwrite and ((self.images / f"{stem}.png").exists() or (self.masks / f"{stem}.png").exists()):
                raise PairExists(stem)
            # mask first, then image: a pair counts once both exist, so a crash leaves no
            # image without its mask for training to pick up
            with atomic_path(self.masks / f"{stem}.png") as tmp:
                tmp.write_bytes(label_png(frame.labels))
            with atomic_path(self.images / f"{stem}.png") as tmp:
                tmp.write_bytes(png_bytes(frame.image))
            rows = [r for r in self.read_manifest() if Path(r.get("file", "")).stem != stem]
            row = {
                "file": f"{stem}.png", "subject": case.tags.get("subject", ""), "device": "",
                "region": case.tags.get("region", ""), "side": case.tags.get("side", ""), "split": "",
                "source": case.name, "case": case.id, "frame": index, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            rows.append(row)
            fields = list(MANIFEST_FIELDS) + [k for r in rows for k in r if k not in MANIFEST_FIELDS]
            atomic_write_csv(self.manifest, rows, list(dict.fromkeys(fields)))
        case.saved[index] = stem
        return {"stem": stem, "image": f"images/{stem}.png", "mask": f"masks/{stem}.png", "manifest": "manifest.csv"}
