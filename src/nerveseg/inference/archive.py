"""One measurements table from the jobs that segmented an archive (``nerveseg collect``).

``nerveseg segment ... --shard I/N`` jobs share an output folder and each writes its own
``measurements.shard-I-of-N.csv`` (and ``segment.shard-I-of-N.json``: its inputs and problems).
:func:`collect` joins them into ``measurements.csv`` with the rows sorted by (relative path or
file, frame, component), so the table is byte-for-byte the same whether one job or N did the work,
and whether a job was interrupted and resumed. It also says which inputs are missing (a job that
has not run or not finished) and which failed, and never invents a row for either.

How inputs are found, named and split between jobs lives in ``segment.py`` (``plan_inputs``,
``shard_of``); this module only reads what the jobs wrote.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, InputError
from ..io_utils import atomic_write_json, csv_values
from .planning import shard_file_names
from .segment import write_measurements

_SHARD_TABLE = re.compile(r"^measurements\.shard-(\d+)-of-(\d+)\.csv$")


@dataclass
class CollectResult:
    table: Path
    rows: int = 0
    inputs: int = 0  # inputs with rows in the table
    shards: int = 1
    missing: list[str] = field(default_factory=list)  # planned inputs without rows and without a failure
    failed: list[dict] = field(default_factory=list)  # {"file", "error"} reported by the jobs
    problems: list[str] = field(default_factory=list)  # about the jobs: not run, not finished, disagreeing

    @property
    def complete(self) -> bool:
        return not (self.missing or self.failed or self.problems)


def _read_table(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with path.open("r", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, restval="")
            # a line with more cells than the header (a damaged table) keeps only its named cells
            # csv_values: the names as segment planned them, not as escaped for spreadsheets
            rows = [csv_values({k: v for k, v in row.items() if k is not None}) for row in reader]
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot be read ({exc})",
                         "run the job that wrote it again with --resume (it rewrites its table)") from None


def _read_status(path: Path) -> dict | None:
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot be read ({exc})", "run the job that wrote it again with --resume") from None
    return status if isinstance(status, dict) else None


def _int_or(text, default: int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def row_key(row: dict) -> tuple:
    """The collected table's order: relative path (archive runs) or file, then frame, then
    component (the whole-mask row first), then the whole row -- a total order, so the result
    cannot depend on which job's table a row came from."""
    return (row.get("relpath") or "", row.get("file") or "", _int_or(row.get("frame"), 0),
            _int_or(row.get("component"), -1), tuple(str(v) for v in row.values()))


def find_tables(out: Path) -> tuple[int, dict[int, Path]]:
    """(N, {I: table}) of the shard tables in ``out``; (1, {0: measurements.csv}) without any."""
    by_count: dict[int, dict[int, Path]] = {}
    for path in out.glob("measurements.shard-*-of-*.csv"):
        match = _SHARD_TABLE.match(path.name)
        if match:
            by_count.setdefault(int(match[2]), {})[int(match[1])] = path
    if len(by_count) > 1:
        splits = ", ".join(f"{n} jobs ({len(t)} tables)" for n, t in sorted(by_count.items()))
        raise ConfigError(f"{out} holds the tables of different splits: {splits}; delete the "
                          "measurements.shard-*-of-N.csv (and segment.shard-*-of-N.json) of the split you gave up, "
                          "or finish it, then collect again")
    if by_count:
        count, tables = next(iter(by_count.items()))
        return count, tables
    single = out / "measurements.csv"
    if not single.is_file():
        raise InputError(out, "holds no measurements table (measurements.csv or measurements.shard-I-of-N.csv)",
                         "run `nerveseg segment ... --out` into this folder first")
    return 1, {0: single}


def collect(out_dir: str | Path, planned: Sequence[str | Path] | None = None, log=print,
            failed: Sequence[InputError] = ()) -> CollectResult:
    """Join the jobs' tables in ``out_dir`` into ``out_dir/measurements.csv`` (sorted by
    :func:`row_key`, written atomically) and, when there are cine loops, their videos files into
    ``videos.json``; write ``collect.json`` (counts, missing and failed inputs) and return it all.

    With shards, every table of the split must come from the same N; a job whose table is absent
    or whose status file says it did not finish is reported, as is an input two jobs both
    segmented (its first job's rows are kept) and jobs that were given different inputs.
    ``planned``: the inputs ("file" column as segment writes it) the table should cover -- by
    default those the jobs' status files list; without either, missing inputs cannot be told.
    ``failed``: problems found when listing ``planned`` (reported with the jobs' own)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise InputError(out, "no such output folder", "give the --out folder of `nerveseg segment`")
    count, tables = find_tables(out)
    result = CollectResult(table=out / "measurements.csv", shards=count)
    statuses: dict[int, dict] = {}
    for index in range(count):
        table_name, _, status_name = shard_file_names((index, count))
        status = _read_status(out / status_name)
        if status is not None:
            statuses[index] = status
        job = f"job {index}/{count}" if count > 1 else "the segment run"
        again = f"`nerveseg segment ... --shard {index}/{count} --resume`" if count > 1 else "`nerveseg segment ... --resume`"
        if index not in tables:
            result.problems.append(f"{job} wrote no table ({table_name}): it has not run or has not finished an "
                                   f"input; run {again}")
        elif status is not None and not status.get("finished", False):
            result.problems.append(f"{job} has not finished (it was stopped or is still running); run {again}")
    digests = {(s.get("plan") or {}).get("sha256") for s in statuses.values()}
    if len(digests) > 1:
        result.problems.append("the jobs were not given the same inputs (or the archive changed between their starts), "
                               "so some inputs may belong to no job; run every job again with the same inputs and --resume")

    rows: list[dict] = []
    source: dict[str, int] = {}  # file -> the job whose rows are kept
    duplicates: set[str] = set()
    headers: dict[tuple[str, ...], int] = {}
    for index in sorted(tables):
        header, table_rows = _read_table(tables[index])
        if table_rows:  # (an empty table has only the fixed columns)
            headers.setdefault(tuple(header), index)
        for row in table_rows:
            name = row.get("file") or ""
            if source.setdefault(name, index) == index:
                rows.append(row)
            else:
                duplicates.add(name)
    if len(headers) > 1:
        result.problems.append(f"jobs {', '.join(str(i) for i in sorted(headers.values()))} wrote different columns: "
                               "were they run with different models or options? The table holds the union")
    for name in sorted(duplicates):
        result.problems.append(f"{name}: segmented by more than one job (job {source[name]}'s rows kept); "
                               "were the jobs given different --shard N?")
    rows.sort(key=row_key)
    write_measurements(result.table, rows)
    result.rows = len(rows)
    segmented = {r.get("file") or "" for r in rows}
    result.inputs = len(segmented)

    failed_by_file: dict[str, dict] = {}
    for problem in failed:
        name = "" if problem.path is None else str(problem.path)
        failed_by_file.setdefault(name, {"file": name, "error": str(problem)})
    for status in statuses.values():
        for problem in status.get("problems") or []:
            if isinstance(problem, dict):
                name = str(problem.get("file", ""))
                failed_by_file.setdefault(name, {"file": name, "error": str(problem.get("error", ""))})
    result.failed = [failed_by_file[k] for k in sorted(failed_by_file) if k not in segmented]
    if planned is not None:
        wanted = [str(p) for p in planned]
    else:
        wanted = [str(p) for s in statuses.values() for p in s.get("inputs") or []]
    result.missing = sorted(set(wanted) - segmented - set(failed_by_file))

    videos = []
    for index in range(count):
        path = out / shard_file_names((index, count))[1]
        if path.is_file():
            try:
                entries = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                result.problems.append(f"{path}: cannot be read; its loops' frame rates are not in videos.json")
                continue
            videos += [e for e in entries if isinstance(e, dict) and str(e.get("file")) in segmented]
    if videos:
        videos.sort(key=lambda e: str(e.get("file")))
        atomic_write_json(out / "videos.json", videos)
    atomic_write_json(out / "collect.json", {
        "table": result.table.name, "shards": count, "rows": result.rows, "inputs": result.inputs,
        "complete": result.complete, "missing": result.missing, "failed": result.failed, "problems": result.problems,
    })
    for problem in result.problems:
        log(f"warning: {problem}")
    for entry in result.failed:
        log(f"error: {entry['error']}")
    for name in result.missing:
        log(f"missing: {name}: no rows yet (its job has not reached it)")
    return result
