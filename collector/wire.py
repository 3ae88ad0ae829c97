"""The collector's API bodies (version 1): parsing and validation, all or nothing.

Each body has a JSON Schema in ``collector/schemas`` (served at ``/v1/schemas/NAME``); this module
enforces the same constraints by hand (no schema library at run time) and a test checks the two
agree on good and bad examples.  Observations are decoded by the typed contract
(:func:`kzprobe.contract.from_wire`) plus what storage needs: a sequence number, the vantage and
source the volunteer recorded, and the column limits (PostgreSQL enforces them; SQLite would not).
Any failure raises :class:`BadBody` with a one-line reason naming the field.
"""

from __future__ import annotations

import itertools
import json
import uuid
from dataclasses import dataclass
from typing import Any, cast

from kzprobe.contract import WireError, from_wire
from kzprobe.model import CONTROL, PROBE, SOURCES, STEPS, Observation

API_VERSION = 1
MAX_BATCH = 5000
MAX_TARGETS = 100_000
MAX_SEQ = 2**31 - 1
RUN_STATES = ("done", "interrupted", "deadline", "failed")
#: Column limits of storage/models.py for the observation's plain columns.
_OBS_TEXT = {"target": 4096, "domain": 255, "address": 64, "failure": 200, "purpose": 16}
_OBS_TEXT_CHECKS = tuple((k, limit, k in ("address", "failure")) for k, limit in _OBS_TEXT.items())
_ABSENT = object()


class BadBody(ValueError):
    """A body refused whole; ``reason`` is one line naming the field."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class OpenRun:
    uid: str
    software: str
    software_version: str
    classifier_version: str | None
    source: str
    started: float
    vantage: dict[str, Any]
    targets: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class CloseRun:
    ended: float
    state: str


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadBody(f"body is not valid JSON: {' '.join(str(exc).split())[:120]}") from None


def _kind(v: object) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _obj(v: Any, where: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise BadBody(f"{where} must be an object, not {_kind(v)}")
    extra = sorted(k for k in v if k not in allowed)
    if extra:
        raise BadBody(f"{where} has an unknown field {extra[0][:40]!r}")
    missing = sorted(required - v.keys())
    if missing:
        raise BadBody(f"{where}.{missing[0]} is missing")
    return v


def _str(v: Any, where: str, limit: int, *, null: bool = False, empty: bool = True) -> str | None:
    if v is None and null:
        return None
    if not isinstance(v, str):
        raise BadBody(f"{where} must be a string{' or null' if null else ''}, not {_kind(v)}")
    if len(v) > limit:
        raise BadBody(f"{where} is longer than {limit} characters")
    if not empty and not v:
        raise BadBody(f"{where} must not be empty")
    if "\x00" in v:
        raise BadBody(f"{where} contains a NUL character")
    return v


def _num(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v in (float("inf"), float("-inf")):
        raise BadBody(f"{where} must be a finite number, not {_kind(v)}")
    return float(v)


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadBody(f"{where} must be an integer, not {_kind(v)}")
    if not lo <= v <= hi:
        raise BadBody(f"{where} must be between {lo} and {hi}")
    return v


def parse_open(body: bytes) -> OpenRun:
    d = _obj(_json(body), "body", {"uid", "software", "software_version", "classifier_version", "source",
                                   "started", "vantage", "targets"}, {"uid", "software_version", "started"})
    raw_uid = _str(d["uid"], "uid", 36)
    try:
        uid = str(uuid.UUID(raw_uid or ""))
    except ValueError:
        raise BadBody("uid must be a UUID") from None
    source = d.get("source", "live")
    if source not in SOURCES:
        raise BadBody(f"source must be one of {', '.join(SOURCES)}")
    v = _obj(d.get("vantage", {}), "vantage", {"network_name", "asn", "country", "no_network", "control_configured"},
             set())
    vantage: dict[str, Any] = {
        "network_name": _str(v.get("network_name"), "vantage.network_name", 128, null=True),
        "asn": _str(v.get("asn"), "vantage.asn", 16, null=True),
        "country": _str(v.get("country"), "vantage.country", 8, null=True),
    }
    for flag in ("no_network", "control_configured"):  # the classifier's run context
        if flag in v:
            if not isinstance(v[flag], bool):
                raise BadBody(f"vantage.{flag} must be a boolean, not {_kind(v[flag])}")
            vantage[flag] = v[flag]
    raw_targets = d.get("targets", [])
    if not isinstance(raw_targets, list):
        raise BadBody(f"targets must be a list, not {_kind(raw_targets)}")
    if len(raw_targets) > MAX_TARGETS:
        raise BadBody(f"targets: at most {MAX_TARGETS} per run")
    targets: list[tuple[str, str]] = []
    for i, t in enumerate(raw_targets):
        t = _obj(t, f"targets[{i}]", {"url", "category"}, {"url"})
        targets.append((_str(t["url"], f"targets[{i}].url", 4096, empty=False) or "",
                        _str(t.get("category", ""), f"targets[{i}].category", 16) or ""))
    return OpenRun(uid=uid, software=_str(d.get("software", "kzprobe"), "software", 64, empty=False) or "",
                   software_version=_str(d["software_version"], "software_version", 32, empty=False) or "",
                   classifier_version=_str(d.get("classifier_version"), "classifier_version", 64, null=True),
                   source=source, started=_num(d["started"], "started"), vantage=vantage, targets=targets)


def parse_close(body: bytes) -> CloseRun:
    d = _obj(_json(body), "body", {"ended", "state"}, {"ended", "state"})
    if d["state"] not in RUN_STATES:
        raise BadBody(f"state must be one of {', '.join(RUN_STATES)}")
    return CloseRun(ended=_num(d["ended"], "ended"), state=d["state"])


def _observation(d: Any, where: str) -> tuple[int, Observation]:
    # A batch holds up to 5000 of these: the checks take the common (valid) case with plain type
    # and range tests and build a reason (f-strings, helpers) only when a field fails.
    if type(d) is not dict:
        raise BadBody(f"{where} must be an object, not {_kind(d)}")
    seq = d.get("seq")
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        _int(seq, f"{where}.seq", 1, MAX_SEQ)
    vantage, source = d.get("vantage", PROBE), d.get("source", "live")
    if vantage not in (PROBE, CONTROL):
        raise BadBody(f"{where}.vantage must be {PROBE!r} or {CONTROL!r}")
    if source not in SOURCES:
        raise BadBody(f"{where}.source must be one of {', '.join(SOURCES)}")
    if d.get("step") not in STEPS:
        raise BadBody(f"{where}.step must be one of {', '.join(STEPS)}")
    for key, limit, null in _OBS_TEXT_CHECKS:
        v = d.get(key, _ABSENT)
        if v is _ABSENT or (v is None and null):
            continue
        if type(v) is not str or len(v) > limit or "\x00" in v:
            _str(v, f"{where}.{key}", limit, null=null)
    port = d.get("port")
    if port is not None and (type(port) is not int or not 0 <= port <= 65535):
        _int(port, f"{where}.port", 0, 65535)
    attempt = d.get("attempt", 0)
    if type(attempt) is not int or not 0 <= attempt <= 1000:
        _int(attempt, f"{where}.attempt", 0, 1000)
    try:
        o = from_wire(d, source=source, vantage=vantage, where=where)
    except WireError as exc:
        raise BadBody(exc.reason) from None
    return cast(int, seq), o


def parse_batch(body: bytes) -> list[tuple[int, Observation]]:
    """``{"observations": [...]}`` -> [(seq, observation)], sorted by seq; refused whole on any error."""
    d = _obj(_json(body), "body", {"observations"}, {"observations"})
    items = d["observations"]
    if not isinstance(items, list):
        raise BadBody(f"observations must be a list, not {_kind(items)}")
    if not items:
        raise BadBody("observations must not be empty")
    if len(items) > MAX_BATCH:
        raise BadBody(f"observations: at most {MAX_BATCH} per batch, got {len(items)}")
    out = [_observation(x, f"observations[{i}]") for i, x in enumerate(items)]
    out.sort(key=lambda p: p[0])
    for (a, _), (b, _) in itertools.pairwise(out):
        if a == b:
            raise BadBody(f"observations: seq {a} appears twice in the batch")
    return out
