"""The typed contract for ``Observation.data``, and the one decoder for observations from the wire.

Observations cross a trust boundary whenever they arrive as JSON: a helper's answer, a helper
exchange found in a capture, an OONI file, an upload to the collector.  The rules read
``data["addresses"]`` as a list of strings, ``data["headers"]`` as a mapping and so on; a value of
another type there used to raise inside the classifier (a traceback, a run left ``running``).
:func:`from_wire` checks every key the rules read against the TypedDicts below and raises
:class:`WireError`, whose ``reason`` is one line naming the field, the expected type and the type
found (never the value: it may be huge or hostile).

The TypedDicts are the documentation of the keys (``total=False``: every source fills what it
can); the checker reads their annotations, so documentation and validation cannot drift apart.
Keys not listed are kept as they are (JSON-able extras such as ``queries`` from OONI).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypedDict, Union, get_args, get_origin, get_type_hints, is_typeddict

from kzprobe.model import (
    CONTROL,
    MEASURE,
    PURPOSES,
    REJECTED,
    STEP_DNS,
    STEP_HTTP,
    STEP_TCP,
    STEP_TLS,
    STEPS,
    Observation,
    now,
)


class WireError(ValueError):
    """An observation from the wire that does not fit the contract; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- the contract --------------------------------------------------------------------------------
class Injected(TypedDict, total=False):
    """A packet judged injected (pcap evidence): rules read kind and quote packet and reason."""

    kind: str  # "rst" | "fin" | "blockpage" | "dns"
    packet: int | None
    reason: str
    pre_trigger: int | None


class DnsAnswer(TypedDict, total=False):
    type: str
    name: str
    data: str
    ttl: int | None


class DnsResponse(TypedDict, total=False):
    rcode: str | None
    addresses: list[str]
    ip_ttl: int | None
    ip_id: int | None
    delay: float | None
    packet: int | None
    qtype: str | None
    duplicate: bool


class Common(TypedDict, total=False):
    #: Redirect hop (0 = the target URL; 1..10 for purpose REDIRECT).
    hop: int
    depth: int  # OONI's name for hop, kept by the importer
    injected: Injected
    #: Set on a control observation standing for a rejected answer (purpose REJECTED).
    wire_error: str


class DnsData(Common, total=False):
    resolver: str
    transport: str
    qtype: str
    rcode: str | None
    answers: list[DnsAnswer]
    addresses: list[str]
    responses: list[DnsResponse]
    #: A DNS-located fingerprint that an answer matched (features.dns_blockpage).
    blockpage: str | None
    doh_host: str


class TcpData(Common, total=False):
    #: The connect of a ClientHello connection (issue 15): which hello it went on to send.
    hello: str


class Certificate(TypedDict, total=False):
    subject: str
    issuer: str
    san: list[str]
    not_before: str
    not_after: str
    der_b64: str


class TlsData(Common, total=False):
    sni: str | None
    version: str | None
    cipher: str | None
    alpn: str | None
    certificates: list[Certificate]
    cert_valid: bool | None
    cert_failure: str | None
    issuer: str | None
    #: Which ClientHello was sent: "default" (absent), "browser" or "tor" (issue 15).
    hello: str


class HttpData(Common, total=False):
    url: str
    host: str
    status: int | None
    headers: dict[str, str]
    redirects: list[str]
    final_url: str
    #: The absolute Location of a 3xx (the next hop's URL).
    redirect_to: str | None
    # From analysis.features.http_features (decoded body, bounded):
    title: str | None
    body_length: int | None
    body_sha256: str | None
    body_head: str | None
    truncated: bool
    content_encoding: str | None
    wire_bytes: int | None
    decode_error: str
    blockpage: str | None
    #: [[t, n], ...]: seconds since the response headers, cumulative wire bytes of the body.
    speed_samples: list[list[float]]
    #: Kind targets (issue 15): "tor-dir" on a directory fetch; a proxy's CONNECT step has
    #: method "CONNECT" and connect_to "HOST:443" (its answer's status in ``status``).
    kind: str
    method: str
    connect_to: str


STEP_DATA: dict[str, type] = {STEP_DNS: DnsData, STEP_TCP: TcpData, STEP_TLS: TlsData, STEP_HTTP: HttpData}


class WireObservation(TypedDict, total=False):
    """``Observation.to_dict()`` as sent on the wire; ``source``, ``vantage`` and ``id`` are the receiver's."""

    step: str
    target: str
    domain: str
    address: str | None
    port: int | None
    t_start: float
    t_end: float
    failure: str | None
    purpose: str
    attempt: int
    data: dict[str, Any]
    packets: list[int]


_REQUIRED = ("step", "target", "domain")


# --- the checker ---------------------------------------------------------------------------------
def _kind(v: object) -> str:
    """JSON's name for the type of ``v`` (what a sender would recognise)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list | tuple):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _want(tp: Any) -> str:
    if tp is Any:
        return "anything"
    if tp is type(None):
        return "null"
    if tp is str:
        return "a string"
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if is_typeddict(tp) or tp is dict or get_origin(tp) is dict:
        return "an object"
    if get_origin(tp) is list:
        return "a list"
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_want(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


#: Lists longer than this are refused: the classifier reads every element (so every element must
#: be checked), and no real observation comes near it (replay cites a few packets per step).
_MAX_ITEMS = 100_000


#: A compiled check: None when the value fits, else the reason without its leading path, e.g.
#: ``".answers[3].ttl must be an integer, not str"`` (containers prepend their part on the way out,
#: so no path string is built for values that fit).
Checker = Callable[[Any], str | None]
_CHECKERS: dict[Any, Checker] = {}


def _checker(tp: Any) -> Checker:
    """The check for ``tp``, built once per type: the OONI importer checks every step of millions
    of measurements, and walking ``typing`` introspection per value cost more than the mapping."""
    found = _CHECKERS.get(tp)
    if found is None:
        found = _CHECKERS[tp] = _compile(tp)
    return found


def _ok(_v: Any) -> str | None:
    return None


def _compile(tp: Any) -> Checker:
    if tp is Any:
        return _ok
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        arms = [_checker(a) for a in get_args(tp)]
        want = _want(tp)

        def union(v: Any) -> str | None:
            for arm in arms:
                if arm(v) is None:
                    return None
            return f" must be {want}, not {_kind(v)}"
        return union
    if tp is type(None):
        return lambda v: None if v is None else f" must be null, not {_kind(v)}"
    if tp is bool:
        return lambda v: None if isinstance(v, bool) else f" must be a boolean, not {_kind(v)}"
    if tp is int:
        return lambda v: (None if isinstance(v, int) and not isinstance(v, bool)
                          else f" must be an integer, not {_kind(v)}")
    if tp is float:
        def number(v: Any) -> str | None:
            if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v in (_INF, -_INF):
                return f" must be a finite number, not {_kind(v)}"
            return None
        return number
    if tp is str:
        return lambda v: None if isinstance(v, str) else f" must be a string, not {_kind(v)}"
    if origin is Literal:
        allowed, want = get_args(tp), _want(tp)
        return lambda v: None if v in allowed else f" must be {want}"
    if origin is list:
        (item_tp,) = get_args(tp)
        item = _checker(item_tp)

        def listed(v: Any) -> str | None:
            if not isinstance(v, list):
                return f" must be a list, not {_kind(v)}"
            if len(v) > _MAX_ITEMS:
                return f" has more than {_MAX_ITEMS} items"
            if item is _ok:
                return None
            for i, x in enumerate(v):
                e = item(x)
                if e is not None:
                    return f"[{i}]{e}"
            return None
        return listed
    if origin is dict or tp is dict:
        args = get_args(tp)
        value = _checker(args[1] if args else Any)

        def mapping(v: Any) -> str | None:
            if not isinstance(v, dict):
                return f" must be an object, not {_kind(v)}"
            for k, x in v.items():
                if not isinstance(k, str):
                    return " has a key that is not a string"
                e = value(x)
                if e is not None:
                    return f".{k}{e}"
            return None
        return mapping
    if is_typeddict(tp):
        fields = [(k, _checker(k_tp)) for k, k_tp in _hints(tp).items()]

        def typed(v: Any) -> str | None:
            if not isinstance(v, dict):
                return f" must be an object, not {_kind(v)}"
            for k, chk in fields:
                if k in v:
                    e = chk(v[k])
                    if e is not None:
                        return f".{k}{e}"
            return None
        return typed
    raise TypeError(f"contract: no checker for {tp!r}")  # pragma: no cover - a bug in this file


_INF = float("inf")


def _errors(v: Any, tp: Any, path: str) -> Iterator[str]:
    """The first mismatch (as a one-line reason) of ``v`` against ``tp``, if any."""
    e = _checker(tp)(v)
    if e is not None:
        yield path + e


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(tp: type) -> dict[str, Any]:
    if tp not in _HINTS:
        _HINTS[tp] = get_type_hints(tp)
    return _HINTS[tp]


def check(value: Any, tp: Any, path: str) -> None:
    """Raise :class:`WireError` if ``value`` does not fit ``tp`` (a type from this module)."""
    for e in _errors(value, tp, path):
        raise WireError(e)


def from_wire(obj: object, *, source: str, vantage: str, where: str = "observation") -> Observation:
    """One observation from JSON; raises :class:`WireError` (one-line ``reason``) on a type-wrong field.

    ``source`` and ``vantage`` are the receiver's to say (a helper cannot claim to be the probe),
    and ``id`` is never taken from the wire.  ``where`` prefixes the reason (e.g.
    ``observations[3]``).
    """
    check(obj, WireObservation, where)
    assert isinstance(obj, dict)
    for k in _REQUIRED:
        if k not in obj:
            raise WireError(f"{where}.{k} is missing")
    step = obj["step"]
    if step not in STEPS:
        raise WireError(f"{where}.step must be one of {', '.join(STEPS)}")
    purpose = obj.get("purpose", MEASURE)
    if purpose not in PURPOSES:
        raise WireError(f"{where}.purpose must be one of {', '.join(PURPOSES)}")
    data = obj.get("data", {})
    check(data, STEP_DATA[step], f"{where}.data")
    return Observation(
        step=step, target=obj["target"], domain=obj["domain"], vantage=vantage, source=source,
        address=obj.get("address"), port=obj.get("port"),
        t_start=float(obj.get("t_start", 0.0)), t_end=float(obj.get("t_end", 0.0)),
        failure=obj.get("failure"), purpose=purpose, attempt=obj.get("attempt", 0),
        data=dict(data), packets=list(obj.get("packets", [])),
    )


def observations_from_wire(payload: object, *, source: str, vantage: str) -> list[Observation]:
    """``{"observations": [...]}`` (the helper's answer) -> observations; all or nothing."""
    if not isinstance(payload, dict):
        raise WireError(f"the answer must be an object, not {_kind(payload)}")
    items = payload.get("observations", [])
    if not isinstance(items, list):
        raise WireError(f"observations must be a list, not {_kind(items)}")
    out = [from_wire(d, source=source, vantage=vantage, where=f"observations[{i}]") for i, d in enumerate(items)]
    for i, o in enumerate(out):
        # Only the receiver marks an answer rejected (a stored record may carry the mark: the
        # collector takes those through from_wire; a helper's answer never does).
        if o.purpose == REJECTED:
            raise WireError(f"observations[{i}].purpose {REJECTED!r} is not a helper's to send")
    return out


def rejected(reason: str, *, target: str, domain: str, source: str, vantage: str = CONTROL,
             who: str = "") -> Observation:
    """The observation that stands for a rejected answer: the rules make the target inconclusive.

    Every caller of :func:`from_wire` that drops an answer records this instead, so that the
    verdict says what was wrong rather than "no control".
    """
    t = now()
    data: dict[str, Any] = {"wire_error": reason[:300]}
    if who:
        data["from"] = who
    return Observation(step=STEP_HTTP, target=target, domain=domain, vantage=vantage, source=source,
                       t_start=t, t_end=t, purpose=REJECTED, data=data)


__all__ = [
    "STEP_DATA", "Certificate", "DnsAnswer", "DnsData", "DnsResponse", "HttpData", "Injected", "TcpData",
    "TlsData", "WireError", "WireObservation", "check", "from_wire", "observations_from_wire", "rejected",
]
