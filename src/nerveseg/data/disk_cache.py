"""A preprocessed on-disk cache for training sets larger than memory.

``load_tensor_set`` decodes a split into RAM: right for usgra-seg's 204 frames (~50 MB at 256 px),
impossible for a cohort of cine loops (100,000 frames at 256 px are 26 GB as float32). This
module decodes and letterboxes a split **once** into flat files, and training reads them back as
memory-mapped arrays through a ``torch.utils.data.DataLoader`` with worker processes.

Layout of one cache entry, ``CACHE_DIR/<key>/``:

- ``images.f16``  (N, S, S) float16 letterboxed images in [0, 1] (half the bytes of float32; the
  rounding, at most 2^-11 relative, is far below an ultrasound frame's 8-bit quantisation)
- ``masks.u8``    (N, C, S, S) uint8, one channel per class
- ``stats.npy``   (N, 2) float32 per-image mean and SD (of the unpadded image, as in memory)
- ``meta.json``   format, size, labels, N, the stems, and the pairs that were skipped and why

The key is a SHA-256 of the preprocessing (format version, size, labels) and of every input file's
path, frame, size and modification time: any change to the data or the preprocessing makes a new
entry, and a run on the same data reuses the old one. An entry is built in a temporary folder and
renamed into place, so a killed build leaves nothing that looks finished, and two processes
building the same key (ranks on one node, nodes on a shared disk) cannot corrupt each other.

Reading keeps memory flat: files are written with ordinary writes (pages of a writable mapping
would count as this process's memory), and the reader drops its mapped pages from its resident
set every ``DROP_EVERY_BYTES`` read (``madvise(MADV_DONTNEED)``; the data stays in the OS page
cache, so a second epoch still reads from RAM when there is RAM to spare).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import InputError
from .cache import TensorSet
from .io import check_mask_not_empty, read_mask
from .media import read_frame
from .preprocess import image_stats, letterbox, letterbox_mask
from .samples import Sample

CACHE_FORMAT = 1
DROP_EVERY_BYTES = 256 << 20


def default_cache_dir() -> Path:
    """$NERVESEG_CACHE_DIR, else $XDG_CACHE_HOME/nerveseg, else ~/.cache/nerveseg."""
    if os.environ.get("NERVESEG_CACHE_DIR"):
        return Path(os.environ["NERVESEG_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nerveseg"


def _file_identity(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(samples: Sequence[Sample], size: int, labels: Sequence[int | str]) -> str:
    """Hex digest naming the entry for these samples under this preprocessing."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "size": size, "labels": [str(x) for x in labels]}).encode())
    for s in samples:
        try:
            ident = [_file_identity(s.image_path), s.frame, _file_identity(s.mask_path), s.stem]
        except OSError:  # a vanished file: keyed by name only, and reported when the entry is built
            ident = [str(s.image_path), s.frame, str(s.mask_path), s.stem]
        h.update(json.dumps(ident).encode())
    return h.hexdigest()[:32]


class DiskTensorSet:
    """A cache entry opened for reading: ``len``, ``stems`` and ``batch(indices)`` like a
    ``TensorSet``'s tensors, and ``dataset()`` for a DataLoader. Picklable (worker processes
    reopen the files themselves rather than inherit a mapping)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.meta = meta
        self.size, self.channels, self.n = int(meta["size"]), len(meta["labels"]), int(meta["n"])
        self.stems: list[str] = list(meta["stems"])
        self.stats = torch.from_numpy(np.load(self.folder / "stats.npy", allow_pickle=False))
        self._maps = None
        self._read_since_drop = 0

    def __len__(self) -> int:
        return self.n

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None  # each process maps the files itself
        return state

    def _open(self):
        if self._maps is None:
            maps = {}
            for name in ("images.f16", "masks.u8"):
                path = self.folder / name
                with path.open("rb") as f:
                    maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else None
            s, c = self.size, self.channels
            self._maps = maps
            self._images = np.frombuffer(maps["images.f16"], dtype=np.float16).reshape(self.n, s, s) if self.n else None
            self._masks = np.frombuffer(maps["masks.u8"], dtype=np.uint8).reshape(self.n, c, s, s) if self.n else None

    def _note_read(self, nbytes: int) -> None:
        self._read_since_drop += nbytes
        if self._read_since_drop >= DROP_EVERY_BYTES and hasattr(mmap, "MADV_DONTNEED"):
            for m in self._maps.values():
                if m is not None:
                    m.madvise(mmap.MADV_DONTNEED)
            self._read_since_drop = 0

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image (1, S, S) float32, masks (C, S, S) float32, stats (2,)."""
        self._open()
        image = torch.from_numpy(self._images[i].astype(np.float32))[None]
        masks = torch.from_numpy(self._masks[i].astype(np.float32))
        self._note_read(self.size * self.size * (2 + self.channels))
        return image, masks, self.stats[i]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = [self.item(int(i)) for i in indices]
        return tuple(torch.stack(parts) for parts in zip(*items))  # type: ignore[return-value]

    def dataset(self) -> "DiskDataset":
        return DiskDataset(self)

    def to_tensor_set(self) -> TensorSet:
        """The whole entry in memory (for small sets, and tests)."""
        images, masks, stats = self.batch(range(self.n)) if self.n else (
            torch.zeros(0, 1, self.size, self.size), torch.zeros(0, self.channels, self.size, self.size), torch.zeros(0, 2))
        return TensorSet(list(self.stems), images, masks, stats)


class DiskDataset(torch.utils.data.Dataset):
    def __init__(self, data: DiskTensorSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data.item(i)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields each step's global batch (indices into the set) in the order set by ``set_order``:
    the trainer draws the order from its per-epoch generator, so batches are the in-memory
    path's batches."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.order: list[int] = []

    def set_order(self, order: Sequence[int]) -> None:
        self.order = [int(i) for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.order), self.batch_size):
            yield self.order[start : start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)


def _write_entry(folder: Path, samples: Sequence[Sample], size: int, labels: Sequence[int | str],
                 allow_empty: bool, log) -> None:
    stems, stats, problems = [], [], []
    with (folder / "images.f16").open("wb") as fi, (folder / "masks.u8").open("wb") as fm:
        for k, sample in enumerate(samples):
            try:
                image = read_frame(sample.image_path, sample.frame)[0]
                channels = [read_mask(sample.mask_path, label=lab, image_shape=image.shape) for lab in labels]
                if not allow_empty:
                    check_mask_not_empty(channels[0], sample.mask_path, labels[0])
            except InputError as exc:
                problems.append({"path": str(exc.path) if exc.path else None, "problem": exc.problem, "fix": exc.fix})
                continue
            boxed, _ = letterbox(image, size)
            fi.write(np.ascontiguousarray(boxed, dtype=np.float16).tobytes())
            fm.write(np.stack([letterbox_mask(m, size) for m in channels]).astype(np.uint8).tobytes())
            stems.append(sample.stem)
            stats.append(image_stats(image))
            if log and (k + 1) % 5000 == 0:
                log(f"cache: {k + 1}/{len(samples)} frames decoded")
    np.save(folder / "stats.npy", np.asarray(stats, dtype=np.float32).reshape(-1, 2))
    meta = {"format": CACHE_FORMAT, "size": size, "labels": [str(x) if isinstance(x, str) else x for x in labels],
            "n": len(stems), "stems": stems, "problems": problems}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def load_disk_tensor_set(
    samples: Sequence[Sample],
    size: int,
    label: int | str | None | Sequence[int | str],
    cache_dir: str | Path | None = None,
    allow_empty: bool = False,
    log=None,
) -> tuple[DiskTensorSet, list[InputError]]:
    """The cache entry for ``samples`` (built now if absent) and the pairs it left out, with the
    same checks and skipped-pair reports as ``load_tensor_set``."""
    labels = list(label) if isinstance(label, (list, tuple)) else [label]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / cache_key(samples, size, labels)
    if not (folder / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".building", dir=root))
        try:
            if log:
                log(f"cache: decoding {len(samples)} frames into {folder}")
            _write_entry(tmp, samples, size, labels, allow_empty, log)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process finished the same entry first: theirs is as good
                if not (folder / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif log:
        log(f"cache: reusing {folder}")
    data = DiskTensorSet(folder)
    problems = [InputError(p["path"], p["problem"], p["fix"]) for p in data.meta.get("problems", [])]
    return data, problems
