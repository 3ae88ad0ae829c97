"""Storage: every observation, verdict and trace, in SQLite by default (SQLAlchemy 2).

The API is synchronous on purpose.  SQLAlchemy's async layer is asyncio-only, and kzprobe runs
on trio; the probe engine therefore hands batches to one writer that calls these methods from a
worker thread (``trio.to_thread.run_sync``).  Each ``add_observations`` call commits, so a run
killed with ``kill -9`` keeps everything it had measured up to the last completed step.

Default database: ``$KZPROBE_DB`` if set, else ``$XDG_DATA_HOME/kzprobe/kzprobe.db`` (that is
``~/.local/share/kzprobe/kzprobe.db``).  ``--db`` takes a path or a SQLAlchemy URL.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, func, inspect, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from kzprobe import __version__
from kzprobe.model import Claim, Observation, Target, Verdict, now
from kzprobe.storage.classifier import classifier_version
from kzprobe.storage.columns import OBS_COLUMNS, VERDICT_COLUMNS
from kzprobe.storage.liveness import is_alive, process_identity
from kzprobe.storage.models import (
    HEAD_REVISION,
    SCHEMA_VERSION,
    Base,
    Meta,
    ObservationRow,
    RunRow,
    TargetRow,
    TraceRow,
    VerdictRow,
)
from kzprobe.storage.upgrade import revision_of, stamp

__all__ = ["SCHEMA_VERSION", "RunInfo", "StorageError", "Store", "default_db_path", "resolve_db_url"]


class StorageError(Exception):
    """A database that cannot be opened or used; the message is fit for a one-line CLI error."""


def default_db_path() -> Path:
    env = os.environ.get("KZPROBE_DB")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "kzprobe" / "kzprobe.db"


def resolve_db_url(db: str | os.PathLike[str] | None) -> str:
    """A path or SQLAlchemy URL -> a SQLAlchemy URL; creates the parent folder of a SQLite path."""
    if db is not None and "://" in str(db):
        url = str(db)
        # psycopg 3 is kzprobe's PostgreSQL driver (the `postgres` extra); SQLAlchemy would
        # otherwise pick psycopg2 for a bare postgresql:// URL.
        for bare in ("postgresql://", "postgres://"):
            if url.startswith(bare):
                return "postgresql+psycopg://" + url[len(bare):]
        return url
    path = Path(db) if db is not None else default_db_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{path}: cannot create its folder: {exc.strerror}") from None
    return f"sqlite:///{path.resolve()}"


@dataclass(frozen=True, slots=True)
class RunInfo:
    id: int
    source: str
    started: float
    ended: float | None
    state: str
    vantage: dict[str, Any]
    n_targets: int
    #: Targets whose measurement completed; the rest show as ``not_measured``.
    n_measured: int = 0
    pid: int | None = None
    heartbeat: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


# The model's dataclasses are the contract; the rows mirror them field for field (plus run_id),
# so the columns are derived rather than listed again in each direction.
_OBS_COLUMNS = OBS_COLUMNS
_VERDICT_COLUMNS = VERDICT_COLUMNS


def _observation(r: ObservationRow) -> Observation:
    o = Observation(**{f: getattr(r, f) for f in _OBS_COLUMNS})
    o.id, o.packets = r.id, list(r.packets or [])
    return o


def _verdict(r: VerdictRow) -> Verdict:
    v = Verdict(**{f: getattr(r, f) for f in _VERDICT_COLUMNS})
    v.observations, v.packets = list(r.observations or []), list(r.packets or [])
    return v


def _vantage_columns(vantage: dict[str, Any]) -> dict[str, str | None]:
    """The declared vantage's filterable keys, as the runs table's columns hold them."""
    def text(key: str, limit: int) -> str | None:
        value = vantage.get(key)
        return None if value is None or value == "" else str(value)[:limit]

    return {"network_name": text("network_name", 128), "asn": text("asn", 16), "country": text("country", 8)}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers (kzprobe verdicts, report) never block the writer of a running probe.
    cur.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across a process kill (the WAL is in the OS); only power loss can lose
    # the last transactions, which is acceptable for measurements and much faster.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class Store:
    """A kzprobe database.  Thread-safe in the sense SQLAlchemy sessions are: one writer."""

    def __init__(self, db: str | os.PathLike[str] | None = None) -> None:
        self.url = resolve_db_url(db)
        try:
            self.engine: Engine = create_engine(self.url)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            self._session = sessionmaker(self.engine, expire_on_commit=False)
            self._check_schema()
        except SQLAlchemyError as exc:
            raise StorageError(f"{self.url}: cannot open the database: {exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0]}") from None
        except ImportError as exc:  # the URL names a driver that is not installed
            name = getattr(exc, "name", None) or str(exc)
            hint = ("install kzprobe[postgres]" if self.url.startswith("postgres")
                    else f"install the Python package that provides {name!r}")
            from sqlalchemy.engine import make_url

            shown = make_url(self.url).render_as_string(hide_password=True)
            raise StorageError(f"{shown}: the database driver ({name}) is not installed: "
                               f"{hint}") from None

    def _check_schema(self) -> None:
        """Create a new database at the current schema; refuse an older or newer one."""
        with self.engine.begin() as conn:
            rev = revision_of(conn)
            if rev is None:
                Base.metadata.create_all(conn)
                stamp(conn, HEAD_REVISION)
                with Session(conn) as s:
                    s.merge(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                    s.flush()
                return
        if rev == HEAD_REVISION:
            self._check_columns()
            return
        if rev.startswith("schema-") or rev > HEAD_REVISION:
            raise StorageError(f"{self.url}: its schema ({rev}) is newer than this kzprobe's "
                               f"({HEAD_REVISION}); upgrade kzprobe")
        raise StorageError(f"{self.url}: its schema ({rev}) is older than this kzprobe's ({HEAD_REVISION}); "
                           f"run `kzprobe db upgrade --db {self.url}` first (nothing is lost)")

    def _check_columns(self) -> None:
        # A version that matches but a table without a column the code needs (a hand-edited or
        # half-migrated database) would otherwise fail later with a long traceback mid-run.
        live = inspect(self.engine)
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in live.get_columns(table.name)}
            missing = [c.name for c in table.columns if c.name not in have]
            if missing:
                raise StorageError(f"{self.url}: table {table.name} lacks column(s) {', '.join(missing)}; "
                                   "run `kzprobe db upgrade`")

    def session(self) -> Session:
        return self._session()

    def close(self) -> None:
        self.engine.dispose()

    # --- writing -------------------------------------------------------------------------------
    def new_run(
        self,
        *,
        source: str = "live",
        vantage: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        started: float | None = None,
        software: str = "kzprobe",
        software_version: str = __version__,
    ) -> int:
        with self._session.begin() as s:
            run = RunRow(
                source=source,
                software=software,
                software_version=software_version,
                started=started if started is not None else now(),
                vantage=vantage or {},
                options=options or {},
                state="running",
                **_vantage_columns(vantage or {}),
                heartbeat=now(),
                **process_identity(),
            )
            s.add(run)
            s.flush()
            return run.id

    def update_vantage(self, run_id: int, **fields: Any) -> None:
        with self._session.begin() as s:
            run = s.get(RunRow, run_id)
            if run is not None:
                run.vantage = {**run.vantage, **fields}
                for k, v in _vantage_columns(run.vantage).items():
                    setattr(run, k, v)

    def finish_run(self, run_id: int, state: str = "done", ended: float | None = None) -> None:
        with self._session.begin() as s:
            run = s.get(RunRow, run_id)
            if run is not None:
                run.state = state
                run.ended = ended if ended is not None else now()

    def claim_run(self, run_id: int) -> None:
        """Make this process the one measuring ``run_id`` again (``run --resume``)."""
        with self._session.begin() as s:
            run = s.get(RunRow, run_id)
            if run is not None:
                run.state, run.ended, run.heartbeat = "running", None, now()
                for k, v in process_identity().items():
                    setattr(run, k, v)

    def heartbeat(self, run_id: int) -> None:
        with self._session.begin() as s:
            run = s.get(RunRow, run_id)
            if run is not None:
                run.heartbeat = now()

    def add_targets(self, run_id: int, targets: Iterable[Target], *, pending: bool = False) -> None:
        """Add the run's targets, in probe order.  ``pending``: not measured yet (a live run marks
        each one with :meth:`mark_measured` when its measurement completes); otherwise (imports,
        captures) each target counts as measured now."""
        when = None if pending else now()
        with self._session.begin() as s:
            s.add_all(
                TargetRow(
                    run_id=run_id,
                    url=t.url,
                    domain=t.host,
                    category=t.category,
                    claim=t.claim.to_dict() if t.claim else None,
                    measured=when,
                    position=i,
                )
                for i, t in enumerate(targets)
            )

    def mark_measured(self, run_id: int, urls: Iterable[str]) -> None:
        wanted = list(urls)
        if not wanted:
            return
        with self._session.begin() as s:
            s.execute(update(TargetRow).where(TargetRow.run_id == run_id, TargetRow.url.in_(wanted),
                                              TargetRow.measured.is_(None)).values(measured=now()))

    def pending_targets(self, run_id: int) -> list[Target]:
        """The run's targets without a completed measurement, in the run's probe order."""
        return [t for t, measured in self.target_states(run_id) if measured is None]

    def discard_partial(self, run_id: int) -> int:
        """Delete the observations of targets whose measurement never completed (the process died
        or the deadline struck mid-target), so that a resumed run measures each of them once, from
        the start, rather than mixing two half measurements.  Returns how many were dropped."""
        with self._session.begin() as s:
            pending = select(TargetRow.url).where(TargetRow.run_id == run_id, TargetRow.measured.is_(None))
            res = s.execute(delete(ObservationRow).where(ObservationRow.run_id == run_id,
                                                         ObservationRow.target.in_(pending)))
            return int(getattr(res, "rowcount", 0) or 0)

    def add_observations(self, run_id: int, observations: list[Observation]) -> None:
        """Store and commit; assigns each observation its ``id``."""
        if not observations:
            return
        with self._session.begin() as s:
            rows = [ObservationRow(run_id=run_id, **{f: getattr(o, f) for f in _OBS_COLUMNS}) for o in observations]
            s.add_all(rows)
            s.flush()
            for o, row in zip(observations, rows, strict=True):
                o.id = row.id

    def set_verdicts(self, run_id: int, verdicts: Iterable[Verdict]) -> None:
        """Replace the run's verdicts (re-classifying a run is idempotent)."""
        with self._session.begin() as s:
            s.execute(delete(VerdictRow).where(VerdictRow.run_id == run_id))
            version = classifier_version()
            s.add_all(VerdictRow(run_id=run_id, classifier_version=version,
                                 **{f: getattr(v, f) for f in _VERDICT_COLUMNS}) for v in verdicts)

    def add_trace(self, run_id: int, target: str, result: dict[str, Any]) -> None:
        with self._session.begin() as s:
            s.add(TraceRow(run_id=run_id, target=target, result=result))

    # --- reading -------------------------------------------------------------------------------
    def runs(self) -> list[RunInfo]:
        with self._session() as s:
            counts: dict[int, tuple[int, int]] = {
                rid: (n, int(m or 0)) for rid, n, m in s.execute(
                    select(TargetRow.run_id, func.count(), func.count(TargetRow.measured)).group_by(TargetRow.run_id)
                ).all()
            }
            return [self._info(r, *counts.get(r.id, (0, 0))) for r in s.scalars(select(RunRow).order_by(RunRow.id))]

    @staticmethod
    def _info(r: RunRow, n: int, measured: int) -> RunInfo:
        if r.source != "live":  # imports and captures are whole once stored
            measured = n
        state = r.state
        # "running" is only true while its process lives; otherwise the run was killed (SIGKILL,
        # power loss, OOM) and never got to say so.
        if state == "running" and not is_alive(r.pid, r.host_boot, r.proc_start, r.heartbeat):
            state = "abandoned"
        return RunInfo(r.id, r.source, r.started, r.ended, state, r.vantage, n, measured, r.pid, r.heartbeat,
                       dict(r.options or {}))

    def run(self, run_id: int) -> RunInfo | None:
        with self._session() as s:
            r = s.get(RunRow, run_id)
            if r is None:
                return None
            n, m = s.execute(select(func.count(), func.count(TargetRow.measured))
                             .where(TargetRow.run_id == run_id)).one()
            return self._info(r, int(n), int(m or 0))

    def latest_run_id(self) -> int | None:
        with self._session() as s:
            return s.scalar(select(func.max(RunRow.id)))

    def target_states(self, run_id: int) -> list[tuple[Target, float | None]]:
        """The run's targets in probe order, each with when its measurement completed (or None)."""
        with self._session() as s:
            run = s.get(RunRow, run_id)
            # Only a live run measures target by target; an import or a capture is whole once stored.
            whole = run.started if run is not None and run.source != "live" else None
            rows = s.scalars(select(TargetRow).where(TargetRow.run_id == run_id)
                             .order_by(TargetRow.position, TargetRow.id))
            return [(Target(url=r.url, category=r.category, claim=Claim(**r.claim) if r.claim else None),
                     r.measured if r.measured is not None else whole) for r in rows]

    def targets(self, run_id: int) -> list[Target]:
        return [t for t, _ in self.target_states(run_id)]

    def observations(self, run_id: int, target: str | None = None) -> list[Observation]:
        with self._session() as s:
            q = select(ObservationRow).where(ObservationRow.run_id == run_id)
            if target is not None:
                q = q.where(ObservationRow.target == target)
            return [_observation(r) for r in s.scalars(q.order_by(ObservationRow.id))]

    def verdicts(self, run_id: int) -> list[Verdict]:
        with self._session() as s:
            rows = s.scalars(select(VerdictRow).where(VerdictRow.run_id == run_id).order_by(VerdictRow.id))
            return [_verdict(r) for r in rows]

    def traces(self, run_id: int) -> list[dict[str, Any]]:
        with self._session() as s:
            return [
                {"target": r.target, **r.result}
                for r in s.scalars(select(TraceRow).where(TraceRow.run_id == run_id).order_by(TraceRow.id))
            ]
