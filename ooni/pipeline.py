"""The OONI import pipeline: raw lines -> (workers) compact rows -> (one writer) the database.

Three stages, each bounded so that memory stays flat whatever the archive's size:

1. **Read** (:mod:`kzprobe.ooni.archive`): files are streamed line by line and cut into batches
   of ``batch`` lines; at most ``2 × workers`` batches are in flight.
2. **Parse and classify** (:func:`process_batch`, in worker processes, or on Dask workers):
   ``json.loads``, the exact filters, :func:`~kzprobe.ooni.importer.measurement_to_observations`
   and the classifier.  Each measurement leaves the worker as a :class:`Row` of plain values, so
   the single writer does no per-measurement Python work beyond building insert parameters.
3. **Write** (:class:`Writer`): one transaction per batch with ``executemany`` inserts.  A
   measurement's key (its ``measurement_uid``; else ``report_id`` + ``input``; else the hash of
   its bytes) goes into ``ooni_imports`` in the same transaction, so a re-import, or the import
   re-run after ``kill -9``, skips exactly what was committed and nothing else.

Results are written in the order the batches were read, whatever order the workers finish in, so
ids are deterministic: a parallel import, a Dask import and a single-process import of the same
files give the same rows.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kzprobe.ooni.archive import Filters, LinePrefilter, Source, discover, read_lines
from kzprobe.storage.columns import OBS_COLUMNS, VERDICT_COLUMNS

#: Measurements per batch: large enough that a transaction's fixed cost is amortised, small
#: enough that a batch's rows (about 40 KB of Python objects a measurement) stay a few MB.
BATCH = 200
#: Below this many bytes of input, worker processes cost more to start than they save.
SMALL_INPUT = 4 * 1024 * 1024


@dataclass(slots=True)
class Row:
    """One imported measurement, as plain values (cheap to pickle, ready to insert)."""

    key: str
    where: str
    input: str
    started: float
    ended: float
    vantage: dict[str, Any]
    options: dict[str, Any]
    software: str
    software_version: str
    #: Observation column values in ``OBS_COLUMNS`` order, with ``data`` and ``packets`` already
    #: JSON-encoded (in the worker, so the single writer does not); ids come from the writer.
    observations: list[tuple[Any, ...]]
    #: Verdict column values; ``observations`` holds 1-based positions in the list above.
    verdicts: list[dict[str, Any]]
    #: The input's host (the target's ``domain``), computed in the worker.
    domain: str = ""


@dataclass(slots=True)
class BatchResult:
    rows: list[Row] = field(default_factory=list)
    #: (PATH:LINE, reason)
    problems: list[tuple[str, str]] = field(default_factory=list)
    #: Lines parsed and dropped by the exact filters.
    filtered: int = 0


# --- stage 2: in the worker --------------------------------------------------------------------------------
def _key(m: dict[str, Any], raw: bytes) -> str:
    uid = m.get("measurement_uid")
    if isinstance(uid, str) and uid:
        return "uid:" + uid
    rid, inp = m.get("report_id"), m.get("input")
    if isinstance(rid, str) and rid and isinstance(inp, str):
        return f"rid:{rid} {inp}"
    # Neither (QA files, hand-made files): the measurement is its bytes.
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


_JSON_COLUMNS = frozenset({"data", "packets"})


_OBS_GET = operator.attrgetter(*OBS_COLUMNS)
_JSON_AT = tuple(i for i, c in enumerate(OBS_COLUMNS) if c in _JSON_COLUMNS)
# json.dumps with its defaults (exactly what SQLAlchemy's JSON type would store), minus the
# cycle check: the values are fresh trees built by the importer.  Same bytes, less CPU.
_encode = json.JSONEncoder(check_circular=False).encode


def _obs_values(o: Any) -> tuple[Any, ...]:
    values = list(_OBS_GET(o))
    for i in _JSON_AT:
        v = values[i]
        values[i] = "[]" if v == [] else _encode(v)
    return tuple(values)


def process_batch(lines: list[tuple[str, int, bytes]], filters: Filters) -> BatchResult:
    """Parse, filter, map and classify one batch of ``(file, line number, raw line)``."""
    from kzprobe.analysis import Context, classify
    from kzprobe.model import Target
    from kzprobe.ooni.importer import OoniFormatError, measurement_to_observations

    out = BatchResult()
    context = Context(control_configured=True)
    for name, lineno, raw in lines:
        where = f"{name}:{lineno}"
        try:
            parsed = _loads(raw)
        except ValueError as exc:
            reason = f"not JSON: {exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            out.problems.append((where, reason))
            continue
        items = list(enumerate(parsed, 1)) if isinstance(parsed, list) else [(0, parsed)]
        for i, m in items:
            w = f"{where}:{i}" if i else where
            if not isinstance(m, dict):
                out.problems.append((w, f"a measurement is a JSON object, not {type(m).__name__}"))
                continue
            if filters.test and m.get("test_name") != filters.test:
                out.filtered += 1
                continue
            try:
                imp = measurement_to_observations(m)
            except OoniFormatError as exc:
                out.problems.append((w, str(exc)))
                continue
            except RecursionError:
                out.problems.append((w, "nested too deeply"))
                continue
            if not filters.keep(m, imp.started):
                out.filtered += 1
                continue
            for n, o in enumerate(imp.observations, 1):
                o.id = n
            verdicts = classify(imp.observations, context, targets=[imp.input])
            raw_key = raw if not i else json.dumps(m, sort_keys=True).encode()
            out.rows.append(Row(
                key=_key(m, raw_key), where=w, input=imp.input, started=imp.started,
                ended=imp.started + imp.runtime, vantage=imp.vantage, options={**imp.options, "file": w},
                software=imp.software, software_version=imp.software_version,
                observations=[_obs_values(o) for o in imp.observations],
                verdicts=[{c: getattr(v, c) for c in VERDICT_COLUMNS} for v in verdicts],
                domain=Target(url=imp.input).host,
            ))
    return out


def process_source(name: str, filters: Filters, batch: int = BATCH) -> list[BatchResult]:
    """Read one whole file and process it (the unit of work on a Dask worker)."""
    results: list[BatchResult] = []
    for lines, problems, skipped in _batches([Source(name)], filters.line_prefilter(), batch):
        r = process_batch(lines, filters) if lines else BatchResult()
        r.problems[:0] = problems
        r.filtered += skipped
        results.append(r)
    return results


# --- stage 1: reading ------------------------------------------------------------------------------------------
def _batches(sources: Iterable[Source], prefilter: LinePrefilter, size: int
             ) -> Iterator[tuple[list[tuple[str, int, bytes]], list[tuple[str, str]], int]]:
    """``(lines, problems, lines skipped by the prefilter)`` per batch of ``size`` lines; batches
    span files (an hourly can of a small country holds a handful of measurements, and a
    transaction per can would dominate)."""
    lines: list[tuple[str, int, bytes]] = []
    problems: list[tuple[str, str]] = []
    skipped = 0
    for src in sources:
        for n, item in read_lines(src, prefilter):
            if isinstance(item, str):
                problems.append((f"{src.name}:{n}" if n else src.name, item))
                continue
            lines.append((src.name, n, item))
            if len(lines) >= size:
                yield lines, problems, prefilter.skipped - skipped
                skipped = prefilter.skipped
                lines, problems = [], []
    if lines or problems or prefilter.skipped > skipped:
        yield lines, problems, prefilter.skipped - skipped


# --- stage 3: the single writer ----------------------------------------------------------------------------
@dataclass
class Summary:
    """What an import did, for people (a table) and machines (JSON)."""

    imported: int = 0
    duplicates: int = 0
    filtered: int = 0
    problems: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_network: Counter[str] = field(default_factory=Counter)
    by_day: Counter[str] = field(default_factory=Counter)

    def add(self, row: Row, verdicts: list[dict[str, Any]]) -> None:
        self.imported += 1
        for v in verdicts:
            label = v["status"] + (f"/{v['mechanism']}" if v.get("mechanism") else "")
            self.by_status[label] += 1
        asn = row.vantage.get("probe_asn") or "?"
        name = row.vantage.get("probe_network_name") or ""
        self.by_network[f"{asn} {name}".strip()] += 1
        self.by_day[datetime.fromtimestamp(row.started, UTC).strftime("%Y-%m-%d")] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "imported": self.imported, "duplicates": self.duplicates, "filtered": self.filtered,
            "problems": self.problems, "by_status": dict(self.by_status.most_common()),
            "by_network": dict(self.by_network.most_common()), "by_day": dict(sorted(self.by_day.items())),
        }


OnRow = Callable[[int, Row, list[dict[str, Any]]], None]
OnProblem = Callable[[str, str], None]
OnProgress = Callable[[int], None]


def import_archive(paths: Iterable[str | Path], store: Any, filters: Filters, *, workers: int | None = None,
                   scheduler: str | None = None, batch: int = BATCH, on_row: OnRow | None = None,
                   on_problem: OnProblem | None = None, on_progress: OnProgress | None = None) -> Summary:
    """Import every measurement under ``paths`` into ``store`` (a :class:`~kzprobe.storage.Store`,
    or any object with the writer's ``write(rows)``, e.g. :class:`~kzprobe.ooni.parquet.ParquetSink`);
    see the module docstring."""
    from kzprobe.storage.bulk import OoniWriter

    summary = Summary()
    writer = store if hasattr(store, "write") else OoniWriter(store)
    sources: list[Source] = []
    for item in discover(paths, filters):
        if isinstance(item, Source):
            sources.append(item)
        else:
            summary.problems += 1
            if on_problem:
                on_problem(*item)

    def consume(result: BatchResult) -> None:
        for where, reason in result.problems:
            summary.problems += 1
            if on_problem:
                on_problem(where, reason)
        summary.filtered += result.filtered
        stored = writer.write(result.rows)
        summary.duplicates += len(result.rows) - len(stored)
        for run_id, row, vs in stored:
            summary.add(row, vs)
            if on_row:
                on_row(run_id, row, vs)
        if on_progress:
            on_progress(len(result.rows) + result.filtered)

    if scheduler:
        for result in _dask_results(scheduler, sources, filters, batch):
            consume(result)
        return summary
    n = workers if workers is not None else (os.cpu_count() or 1)
    if workers is None and n > 1 and _input_size(sources) < SMALL_INPUT:
        n = 1
    for result in _local_results(sources, filters, batch, n):
        consume(result)
    return summary


def _input_size(sources: list[Source]) -> int:
    total = 0
    for s in sources:
        if s.is_url or s.name == "-":
            return SMALL_INPUT  # unknown: assume big
        try:
            total += os.path.getsize(s.name)
        except OSError:
            pass
        if total >= SMALL_INPUT:
            break
    return total


def _local_results(sources: list[Source], filters: Filters, batch: int, workers: int) -> Iterator[BatchResult]:
    prefilter = filters.line_prefilter()
    if workers <= 1:
        for lines, problems, skipped in _batches(sources, prefilter, batch):
            r = process_batch(lines, filters) if lines else BatchResult()
            r.problems[:0] = problems
            r.filtered += skipped
            yield r
        return
    import multiprocessing

    # forkserver: workers start from a clean process, not a fork of one holding a database
    # connection and the progress bar's thread.
    ctx = multiprocessing.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: deque[tuple[Future[BatchResult] | None, list[tuple[str, str]], int]] = deque()
        for lines, problems, skipped in _batches(sources, prefilter, batch):
            fut = pool.submit(process_batch, lines, filters) if lines else None
            pending.append((fut, problems, skipped))
            # In submission order (deterministic ids), with a bounded number in flight.
            while len(pending) > 2 * workers:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())


def _result(fut: Future[BatchResult] | None, problems: list[tuple[str, str]], skipped: int) -> BatchResult:
    r = fut.result() if fut is not None else BatchResult()
    r.problems[:0] = problems
    r.filtered += skipped
    return r


def _dask_results(scheduler: str, sources: list[Source], filters: Filters, batch: int) -> Iterator[BatchResult]:
    try:
        from distributed import Client
    except ImportError:
        raise ImportError("--scheduler needs Dask: install kzprobe[scale]") from None
    with Client(scheduler) as client:
        futures = client.map(process_source, [s.name for s in sources], filters=filters, batch=batch, pure=False)
        # Gathered in file order so ids match a single-process import; the cluster works ahead.
        for fut in futures:
            yield from fut.result()
            fut.release()
