"""Blockpage fingerprints, in ooni/blocking-fingerprints' CSV format.

Columns: name, scope, location_found, pattern_type, pattern, confidence_no_fp,
expected_countries, source, exp_url, notes.  ``location_found`` is ``body``, ``dns`` or
``header.<name>``; ``pattern_type`` is ``full``, ``prefix``, ``contains`` or ``regexp``.
Rows whose scope is ``fp`` are *known false positives*: they are reported when they match but
never make a verdict, because the same words appear on ordinary sites' own error pages.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REQUIRED = ("name", "scope", "location_found", "pattern_type", "pattern")
#: location_found of rows matched against DNS answers (addresses), not against HTTP responses.
LOCATION_DNS = "dns"


class FingerprintError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Fingerprint:
    name: str
    scope: str
    location: str
    pattern_type: str
    pattern: str
    confidence: int = 5
    countries: str = ""
    notes: str = ""

    @property
    def false_positive(self) -> bool:
        return self.scope == "fp"

    def matches(self, value: str) -> bool:
        if self.pattern_type == "full":
            return value == self.pattern
        if self.pattern_type == "prefix":
            return value.startswith(self.pattern)
        if self.pattern_type == "contains":
            return self.pattern in value
        if self.pattern_type == "regexp":
            return re.search(self.pattern, value) is not None
        return False


@dataclass(frozen=True, slots=True)
class Match:
    fingerprint: Fingerprint
    location: str

    @property
    def name(self) -> str:
        return self.fingerprint.name


class Fingerprints:
    def __init__(self, rows: Iterable[Fingerprint]) -> None:
        self.rows = list(rows)
        self._dns = [r for r in self.rows if r.location == LOCATION_DNS]
        self._body = [r for r in self.rows if r.location == "body"]
        self._headers = [r for r in self.rows if r.location.startswith("header.")]

    @classmethod
    def default(cls, extra: Iterable[str | Path] = ()) -> Fingerprints:
        text = resources.files("kzprobe.analysis").joinpath("fingerprints.csv").read_text("utf-8")
        rows = parse(text, "fingerprints.csv")
        for path in extra:
            p = Path(path)
            try:
                rows.extend(parse(p.read_text("utf-8"), str(p)))
            except OSError as exc:
                raise FingerprintError(f"{p}: {exc.strerror}") from None
        return cls(rows)

    def match_body(self, body: str) -> list[Match]:
        return [Match(r, "body") for r in self._body if r.matches(body)]

    def match_headers(self, headers: Mapping[str, str]) -> list[Match]:
        lower = {k.lower(): v for k, v in headers.items()}
        out = []
        for r in self._headers:
            value = lower.get(r.location.split(".", 1)[1].lower())
            if value is not None and r.matches(value):
                out.append(Match(r, r.location))
        return out

    def match_dns(self, address: str) -> list[Match]:
        return [Match(r, LOCATION_DNS) for r in self._dns if r.matches(address)]

    def blockpage(self, body: str, headers: Mapping[str, str] | None = None) -> Match | None:
        """The strongest non-false-positive match, if any."""
        found = [m for m in self.match_body(body) + self.match_headers(headers or {})
                 if not m.fingerprint.false_positive]
        return max(found, key=lambda m: m.fingerprint.confidence, default=None)


def parse(text: str, where: str) -> list[Fingerprint]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise FingerprintError(f"{where}:1: missing column(s) {', '.join(missing)}")
    rows = []
    for lineno, rec in enumerate(reader, start=2):
        ptype = (rec.get("pattern_type") or "").strip()
        if ptype not in ("full", "prefix", "contains", "regexp"):
            raise FingerprintError(f"{where}:{lineno}: unknown pattern_type {ptype!r}")
        if ptype == "regexp":
            try:
                re.compile(rec["pattern"])
            except re.error as exc:
                raise FingerprintError(f"{where}:{lineno}: bad regexp: {exc}") from None
        try:
            conf = int(rec.get("confidence_no_fp") or 5)
        except ValueError:
            raise FingerprintError(f"{where}:{lineno}: confidence_no_fp is not a number") from None
        rows.append(
            Fingerprint(
                name=rec["name"].strip(),
                scope=(rec.get("scope") or "").strip(),
                location=rec["location_found"].strip(),
                pattern_type=ptype,
                pattern=rec["pattern"],
                confidence=conf,
                countries=rec.get("expected_countries") or "",
                notes=rec.get("notes") or "",
            )
        )
    return rows
