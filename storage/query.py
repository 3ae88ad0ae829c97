"""Analysts' queries across runs: filter by declared vantage and time, group verdicts by vantage.

Plain SQL on the runs table's vantage columns (indexed), so the same query serves a volunteer's
SQLite file and a collector's PostgreSQL.  "Latest" is per (vantage, target): the verdict of the
most recent matching run that has one for that target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from kzprobe.model import Verdict
from kzprobe.storage import Store
from kzprobe.storage.models import ObservationRow, RunRow, VerdictRow

_VERDICT_FIELDS = tuple(f.name for f in dataclasses.fields(Verdict))


def parse_when(text: str) -> float:
    """``YYYY-MM-DD`` or an ISO 8601 date-time (UTC unless it says otherwise) -> epoch seconds."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r}: expected a date (2026-11-29) or an ISO date-time (2026-11-29T10:00)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@dataclass(frozen=True, slots=True)
class RunFilter:
    network: str | None = None
    asn: str | None = None
    country: str | None = None
    since: float | None = None
    until: float | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))

    def apply(self, q: Any) -> Any:
        if self.network is not None:
            q = q.where(func.lower(RunRow.network_name) == self.network.lower())
        if self.asn is not None:
            asn = self.asn.upper().removeprefix("AS")
            q = q.where(func.upper(RunRow.asn).in_([asn, f"AS{asn}"]))
        if self.country is not None:
            q = q.where(func.upper(RunRow.country) == self.country.upper())
        if self.since is not None:
            q = q.where(RunRow.started >= self.since)
        if self.until is not None:
            q = q.where(RunRow.started < self.until)
        return q


@dataclass(frozen=True, slots=True)
class Vantage:
    network: str | None
    asn: str | None
    country: str | None

    def label(self) -> str:
        parts = [self.network or "unnamed network", self.asn or "", self.country or ""]
        return " / ".join(p for p in parts if p)

    def to_dict(self) -> dict[str, str | None]:
        return {"network_name": self.network, "asn": self.asn, "country": self.country}


@dataclass(frozen=True, slots=True)
class RunSummary:
    id: int
    uid: str
    vantage: Vantage
    started: float
    ended: float | None
    state: str
    submitter: str | None
    observations: int
    verdicts: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "uid": self.uid, **self.vantage.to_dict(), "started": self.started,
                "ended": self.ended, "state": self.state, "submitter": self.submitter,
                "observations": self.observations, "verdicts": self.verdicts}


def runs(store: Store, f: RunFilter) -> list[RunSummary]:
    with store.session() as s:
        rows = s.scalars(f.apply(select(RunRow)).order_by(RunRow.started, RunRow.id)).all()
        ids = [r.id for r in rows]
        n_obs: dict[int, int] = {}
        n_ver: dict[int, int] = {}
        if ids:
            for table, counts in ((ObservationRow, n_obs), (VerdictRow, n_ver)):
                q = select(table.run_id, func.count()).where(table.run_id.in_(ids)).group_by(table.run_id)
                counts.update((int(k), int(v)) for k, v in s.execute(q))
        return [RunSummary(r.id, r.uid, Vantage(r.network_name, r.asn, r.country), r.started, r.ended, r.state,
                           r.submitter, n_obs.get(r.id, 0), n_ver.get(r.id, 0)) for r in rows]


@dataclass
class VantageVerdicts:
    vantage: Vantage
    runs: list[int]
    #: target -> (verdict, run id, run start, classifier version): the latest matching run's.
    verdicts: dict[str, tuple[Verdict, int, float, str | None]]


def verdicts_by_vantage(store: Store, f: RunFilter) -> list[VantageVerdicts]:
    """The latest verdict per target for each declared vantage among the matching runs."""
    out: dict[Vantage, VantageVerdicts] = {}
    with store.session() as s:
        q = f.apply(select(VerdictRow, RunRow.network_name, RunRow.asn, RunRow.country, RunRow.started)
                    .join(RunRow, RunRow.id == VerdictRow.run_id))
        for v, net, asn, country, started in s.execute(q.order_by(RunRow.started, RunRow.id, VerdictRow.id)):
            key = Vantage(net, asn, country)
            group = out.setdefault(key, VantageVerdicts(key, [], {}))
            if v.run_id not in group.runs:
                group.runs.append(v.run_id)
            verdict = Verdict(**{name: getattr(v, name) for name in _VERDICT_FIELDS})
            verdict.observations, verdict.packets = list(v.observations or []), list(v.packets or [])
            group.verdicts[v.target] = (verdict, v.run_id, started, v.classifier_version)  # later runs win
    return sorted(out.values(), key=lambda g: (g.vantage.country or "", g.vantage.network or "", g.vantage.asn or ""))
