"""What the analyst asked the report for (no database import here: ``kzprobe --help`` and the
command's option parsing stay light)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Filters:
    """What the analyst asked for; empty means everything."""

    runs: tuple[int, ...] = ()
    since: float | None = None
    until: float | None = None
    networks: tuple[str, ...] = ()
    asns: tuple[str, ...] = ()
    countries: tuple[str, ...] = ()
    #: Domains of a target list (``--list``); empty = every target.
    domains: frozenset[str] = frozenset()
    list_name: str | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.runs:
            out["run"] = list(self.runs)
        if self.since is not None:
            out["since"] = iso(self.since)
        if self.until is not None:
            out["until"] = iso(self.until)
        for k, v in (("network", self.networks), ("asn", self.asns), ("country", self.countries)):
            if v:
                out[k] = list(v)
        if self.list_name:
            out["list"] = self.list_name
        return out


def iso(ts: float | None) -> str | None:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ts is not None else None


def norm_asn(a: Any) -> str:
    s = str(a or "").strip().upper()
    return s if not s or s.startswith("AS") else f"AS{s}"
