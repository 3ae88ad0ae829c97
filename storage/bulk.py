"""Bulk writes for imports: one transaction per batch, ``executemany`` inserts.

The ORM's unit of work costs tens of microseconds per object; an OONI archive import writes
millions of rows, so this path uses Core inserts with ``RETURNING`` (SQLAlchemy's
"insertmanyvalues" batches them into multi-row statements on SQLite and PostgreSQL alike) and
builds the parameters from plain dicts that worker processes prepared.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Connection, func, insert, select

from kzprobe.model import Target
from kzprobe.storage.classifier import classifier_version
from kzprobe.storage.columns import OBS_COLUMNS
from kzprobe.storage.models import ObservationRow, OoniImportRow, RunRow, TargetRow, VerdictRow

if TYPE_CHECKING:
    from kzprobe.ooni.pipeline import Row
    from kzprobe.storage import Store


def _run_uid(key: str) -> str:
    # The same OONI measurement gets the same run uid in every database that imports it, so
    # collectors and analysts merging imports recognise it.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "ooni-measurement:" + key))


def _vantage(v: dict[str, Any]) -> dict[str, str | None]:
    """OONI's probe_* keys as the runs table's filterable vantage columns."""
    def text(key: str, limit: int) -> str | None:
        value = v.get(key)
        return None if value is None or value == "" else str(value)[:limit]

    return {"network_name": text("probe_network_name", 128), "asn": text("probe_asn", 16),
            "country": text("probe_cc", 8)}


class OoniWriter:
    """The single writer of an OONI import."""

    def __init__(self, store: Store) -> None:
        self.engine = store.engine

    def write(self, rows: list[Row]) -> list[tuple[int, Row, list[dict[str, Any]]]]:
        """Store the rows not stored before; returns ``(run id, row, verdicts with real ids)`` for
        each of them."""
        if not rows:
            return []
        unique: dict[str, Row] = {}
        for r in rows:
            unique.setdefault(r.key, r)
        with self.engine.begin() as conn:
            known = set(conn.execute(select(OoniImportRow.key).where(OoniImportRow.key.in_(list(unique)))).scalars())
            fresh = [r for k, r in unique.items() if k not in known]
            if not fresh:
                return []
            run_ids = self._insert(conn, RunRow, [
                {"source": "ooni", "software": r.software, "software_version": r.software_version,
                 "started": r.started, "ended": r.ended, "state": "done", "vantage": r.vantage,
                 "options": r.options, "uid": _run_uid(r.key), **_vantage(r.vantage)} for r in fresh])
            self._plain(conn, TargetRow, [
                {"run_id": rid, "url": r.input, "domain": r.domain or Target(url=r.input).host, "category": "",
                 "claim": None, "measured": r.ended, "position": 0}
                for rid, r in zip(run_ids, fresh, strict=True)])
            obs_ids = self._observations(conn, [(rid, o) for rid, r in zip(run_ids, fresh, strict=True)
                                                for o in r.observations])
            verdicts: list[list[dict[str, Any]]] = []
            version = classifier_version()
            verdict_params: list[dict[str, Any]] = []
            offset = 0
            for rid, r in zip(run_ids, fresh, strict=True):
                mine = obs_ids[offset:offset + len(r.observations)]
                offset += len(r.observations)
                vs = [{**v, "observations": [mine[p - 1] for p in v["observations"] if 0 < p <= len(mine)]}
                      for v in r.verdicts]
                verdicts.append(vs)
                verdict_params.extend({**v, "run_id": rid, "classifier_version": version} for v in vs)
            self._plain(conn, VerdictRow, verdict_params)
            self._plain(conn, OoniImportRow, [{"key": r.key, "run_id": rid}
                                              for rid, r in zip(run_ids, fresh, strict=True)])
        return list(zip(run_ids, fresh, verdicts, strict=True))

    def _observations(self, conn: Connection, rows: list[tuple[int, tuple[Any, ...]]]) -> list[int]:
        """Observations as prepared by the workers (JSON columns already encoded)."""
        if not rows:
            return []
        if conn.dialect.name != "sqlite":
            return self._insert(conn, ObservationRow, [
                {"run_id": rid, **{c: (json.loads(v) if c in ("data", "packets") else v)
                                   for c, v in zip(OBS_COLUMNS, values, strict=True)}}
                for rid, values in rows])
        # The hot path (tens of thousands of rows a second): the driver's executemany with the
        # workers' tuples as they are; SQLAlchemy's per-row parameter processing would double the
        # writer's time.  Same ids, locking and failure behaviour as _insert.
        start = (conn.execute(select(func.max(ObservationRow.id))).scalar() or 0) + 1
        cols = ", ".join(("id", "run_id", *OBS_COLUMNS))
        marks = ", ".join("?" * (len(OBS_COLUMNS) + 2))
        conn.exec_driver_sql(f"INSERT INTO observations ({cols}) VALUES ({marks})",
                             [(start + i, rid, *values) for i, (rid, values) in enumerate(rows)])
        return list(range(start, start + len(rows)))

    def _insert(self, conn: Connection, model: Any, params: list[dict[str, Any]]) -> list[int]:
        """Insert ``params`` and return their ids, in order, with one ``executemany``."""
        if not params:
            return []
        if conn.dialect.name == "postgresql":
            # PostgreSQL's RETURNING keeps parameter order in SQLAlchemy's batched form.
            return list(conn.execute(insert(model).returning(model.id, sort_by_parameter_order=True), params).scalars())
        # SQLite: with RETURNING and ordering, SQLAlchemy falls back to one statement per row.
        # Ids are allocated here instead; the batch's transaction holds SQLite's write lock from
        # its first insert, and a concurrent writer that slipped in before it makes the insert fail
        # on the primary key (the whole batch rolls back, nothing half-written), never duplicate.
        start = (conn.execute(select(func.max(model.id))).scalar() or 0) + 1
        ids = list(range(start, start + len(params)))
        self._plain(conn, model, [{**p, "id": i} for p, i in zip(params, ids, strict=True)])
        return ids

    def _plain(self, conn: Connection, model: Any, params: list[dict[str, Any]]) -> None:
        """``executemany`` of ``params`` (all with the same keys).  On SQLite straight through the
        driver, JSON columns encoded as SQLAlchemy's JSON type would (``json.dumps``): the Core
        path's per-row parameter processing was a third of the writer's time.  Columns left out
        get NULL, so every non-nullable column must be given."""
        if not params:
            return
        if conn.dialect.name != "sqlite":
            conn.execute(insert(model), params)
            return
        table = model.__table__
        cols = list(params[0])
        is_json = [isinstance(table.c[c].type, JSON) for c in cols]
        sql = f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        conn.exec_driver_sql(sql, [
            tuple(json.dumps(p[c]) if j and p[c] is not None else p[c] for c, j in zip(cols, is_json, strict=True))
            for p in params])
