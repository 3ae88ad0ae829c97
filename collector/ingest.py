"""The collector's writes: idempotent by (run uid, observation seq), bulk inserts.

Synchronous (SQLAlchemy's async layer is asyncio-only); the app calls these from worker threads,
one at a time on SQLite (one writer), a few at once on PostgreSQL.  Every call is one
transaction: a batch is stored whole or not at all, so a collector killed mid-batch leaves no
half batch, and the volunteer's retry stores exactly what is missing.

Bulk path: a list of parameter dicts through ``INSERT ... ON CONFLICT (run_id, seq) DO
NOTHING``.  SQLAlchemy 2 sends such an executemany as multi-row VALUES pages ("insertmanyvalues")
on both psycopg 3 and sqlite3, which is the drivers' fast path short of COPY, and unlike COPY it
lets the database skip the rows a retry sends again.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import JSON, Table, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kzprobe.collector.wire import CloseRun, OpenRun
from kzprobe.model import Observation
from kzprobe.storage import Store
from kzprobe.storage.classifier import classifier_version
from kzprobe.storage.columns import OBS_COLUMNS
from kzprobe.storage.models import ObservationRow, RunRow, TargetRow, VerdictRow

_OBS_COLUMNS = OBS_COLUMNS
# Core tables: the ORM's bulk path splits a batch wherever the set of None columns changes (a dns
# row after a tcp row), i.e. nearly row by row; Core sends the list as multi-row VALUES pages.
_OBS = cast(Table, ObservationRow.__table__)
_TARGETS = cast(Table, TargetRow.__table__)
_VERDICTS = cast(Table, VerdictRow.__table__)
# The observation insert on SQLite, idempotent like the other dialects' (same unique index): plain
# columns as they are, then the JSON columns as SQLAlchemy's JSON type writes them (json.dumps;
# None is JSON null).
_JSON_COLS = tuple(c for c in _OBS_COLUMNS if isinstance(_OBS.c[c].type, JSON))
_PLAIN_COLS = tuple(c for c in _OBS_COLUMNS if c not in _JSON_COLS)
_plain_values = operator.attrgetter(*_PLAIN_COLS)
_json_values = operator.attrgetter(*_JSON_COLS)


def _json_text(value: Any) -> str:
    # Empty data and packets are common (a TCP step): skip the encoder for them.
    if value == {}:
        return "{}"
    if value == []:
        return "[]"
    return json.dumps(value)


_SQLITE_INSERT = (f"INSERT INTO observations (run_id, seq, {', '.join(_PLAIN_COLS + _JSON_COLS)}) "
                  f"VALUES ({', '.join('?' * (len(_OBS_COLUMNS) + 2))}) ON CONFLICT (run_id, seq) DO NOTHING")

#: Targets classified per query on close: bounds the collector's memory whatever the run's size.
CLASSIFY_CHUNK = 500


class Refused(Exception):
    """A request that is well-formed but not allowed (404 / 409); the message is one line."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True, slots=True)
class Ack:
    uid: str
    acked: int  # the highest seq stored for the run (0: none)
    stored: int = 0
    duplicates: int = 0
    state: str = "running"


@dataclass
class _RunRef:
    id: int
    submitter: str
    state: str


class Ingest:
    def __init__(self, store: Store) -> None:
        self.store = store
        dialect = store.engine.dialect.name
        self._insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
        self._runs: dict[str, _RunRef] = {}
        self._sqlite = dialect == "sqlite"

    # --- helpers -------------------------------------------------------------------------------
    def _run(self, s: Session, uid: str, submitter: str) -> _RunRef:
        ref = self._runs.get(uid)
        if ref is None:
            row = s.scalars(select(RunRow).where(RunRow.uid == uid)).first()
            if row is None:
                raise Refused(404, "no_such_run", f"no run {uid} (open it first)")
            ref = _RunRef(row.id, row.submitter or "", row.state)
            self._runs[uid] = ref
        if ref.submitter != submitter:
            # Same answer as an unknown run: a uid says nothing about other volunteers' runs.
            raise Refused(404, "no_such_run", f"no run {uid} (open it first)")
        return ref

    @staticmethod
    def _acked(s: Session, run_id: int) -> int:
        return int(s.scalar(select(func.coalesce(func.max(ObservationRow.seq), 0))
                            .where(ObservationRow.run_id == run_id)) or 0)

    # --- the three writes ----------------------------------------------------------------------
    def open_run(self, submitter: str, req: OpenRun) -> Ack:
        """Create the run, or return the existing one (a retried open is not a second run)."""
        for _ in range(2):
            try:
                with self.store.session() as s, s.begin():
                    row = s.scalars(select(RunRow).where(RunRow.uid == req.uid)).first()
                    if row is not None:
                        if row.submitter != submitter:
                            raise Refused(409, "uid_taken", f"run uid {req.uid} is already used")
                        return Ack(req.uid, self._acked(s, row.id), state=row.state)
                    run = RunRow(uid=req.uid, source=req.source, software=req.software,
                                 software_version=req.software_version, started=req.started, state="running",
                                 vantage=dict(req.vantage), options={"classifier_version": req.classifier_version},
                                 network_name=req.vantage.get("network_name"), asn=req.vantage.get("asn"),
                                 country=req.vantage.get("country"), submitter=submitter)
                    s.add(run)
                    s.flush()
                    if req.targets:
                        s.execute(insert(_TARGETS), [
                            {"run_id": run.id, "url": url, "domain": _host(url), "category": cat, "claim": None,
                             "position": i} for i, (url, cat) in enumerate(req.targets)])
                    return Ack(req.uid, 0)
            except IntegrityError:
                continue  # the same uid opened concurrently: the other request won; read its row
        raise Refused(409, "uid_taken", f"run uid {req.uid} is already used")

    def append(self, submitter: str, uid: str, batch: list[tuple[int, Observation]]) -> Ack:
        with self.store.session() as s, s.begin():
            ref = self._run(s, uid, submitter)
            seqs = [q for q, _ in batch]
            # A range on the (run_id, seq) index rather than an IN list of up to 5000 parameters
            # (a batch's seqs are contiguous but for the ones a retry already stored).
            present = set(s.scalars(select(ObservationRow.seq).where(
                ObservationRow.run_id == ref.id, ObservationRow.seq.between(min(seqs), max(seqs))))) if seqs else set()
            rows: list[Any] = [q for q, _ in batch if q not in present]
            if not self._sqlite:
                rows = [{"run_id": ref.id, "seq": q, **{f: getattr(o, f) for f in _OBS_COLUMNS}}
                        for q, o in batch if q not in present]
            if rows and ref.state != "running":
                raise Refused(409, "run_closed", f"run {uid} is closed; it takes no new observations")
            if rows and self._sqlite:
                # SQLite's hot path: the driver's executemany with plain tuples.  SQLAlchemy's
                # per-row parameter processing was half of the insert's time (bench/collector.py).
                s.connection().exec_driver_sql(_SQLITE_INSERT, [
                    (ref.id, q, *_plain_values(o), *[_json_text(v) for v in _json_values(o)])
                    for q, o in batch if q not in present])
            elif rows:
                if self._insert is not None:
                    stmt = self._insert(_OBS).on_conflict_do_nothing(index_elements=["run_id", "seq"])
                else:  # another dialect: a plain insert (the unique index still refuses duplicates)
                    stmt = insert(_OBS)
                s.execute(stmt, rows)
            return Ack(uid, self._acked(s, ref.id), stored=len(rows), duplicates=len(batch) - len(rows))

    def close_run(self, submitter: str, uid: str, req: CloseRun) -> tuple[Ack, int]:
        """Mark the run finished and classify it with this collector's classifier (idempotent)."""
        from kzprobe.analysis import Context, classify

        with self.store.session() as s, s.begin():
            ref = self._run(s, uid, submitter)
            run = s.get(RunRow, ref.id)
            assert run is not None
            version = classifier_version()
            if run.state != "running" and run.classifier_version == version:
                # A retried close (the answer to the first was lost, or the client timed out while
                # a big run was classified): the verdicts are there already; do not classify again.
                n_done = int(s.scalar(select(func.count()).where(VerdictRow.run_id == ref.id)) or 0)
                return Ack(uid, self._acked(s, ref.id), state=run.state), n_done
            ctx = Context(no_network=bool(run.vantage.get("no_network")),
                          control_configured=bool(run.vantage.get("control_configured")))
            listed = [t for t, in s.execute(select(TargetRow.url).where(TargetRow.run_id == ref.id)
                                             .order_by(TargetRow.position, TargetRow.id))]
            seen = set(listed)
            observed = [t for t, in s.execute(select(ObservationRow.target).where(ObservationRow.run_id == ref.id)
                                               .distinct())]
            targets = listed + sorted(t for t in observed if t not in seen)
            s.query(VerdictRow).filter(VerdictRow.run_id == ref.id).delete()
            n = 0
            for k in range(0, len(targets), CLASSIFY_CHUNK):
                chunk = targets[k:k + CLASSIFY_CHUNK]
                observations = []
                for r in s.scalars(select(ObservationRow).where(ObservationRow.run_id == ref.id,
                                                                 ObservationRow.target.in_(chunk))
                                   .order_by(ObservationRow.seq)):
                    o = Observation(**{f: getattr(r, f) for f in _OBS_COLUMNS})
                    o.id = r.id
                    observations.append(o)
                s.expunge_all()  # the rows are copied out: let them go
                rows = [{"run_id": ref.id, "classifier_version": version, "target": v.target, "domain": v.domain,
                         "status": v.status, "mechanism": v.mechanism, "detail": v.detail, "rule": v.rule,
                         "confidence": v.confidence, "sentence": v.sentence, "observations": list(v.observations),
                         "packets": list(v.packets)} for v in classify(observations, ctx, targets=chunk)]
                if rows:
                    s.execute(insert(_VERDICTS), rows)
                n += len(rows)
            run = s.get(RunRow, ref.id)
            assert run is not None
            if run.state == "running":
                run.state, run.ended = req.state, req.ended
            run.classifier_version = version
            ref.state = run.state
            return Ack(uid, self._acked(s, ref.id), state=run.state), n

    def status(self, submitter: str, uid: str) -> Ack:
        with self.store.session() as s:
            ref = self._run(s, uid, submitter)
            return Ack(uid, self._acked(s, ref.id), state=ref.state)


def _host(url: str) -> str:
    from kzprobe.model import Target

    return Target(url).host[:255]


__all__ = ["Ack", "Ingest", "Refused"]
