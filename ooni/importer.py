"""OONI Web Connectivity measurement (a dict) -> kzprobe observations.

The mapping is pure: no I/O except :func:`read_measurements`, which only reads files.  It follows
OONI's data formats (ooni/spec df-000-base, df-002-dnst, df-005-tcpconnect, df-006-tlshandshake,
df-001-httpt, ts-017-web-connectivity) for Web Connectivity 0.4 and 0.5.

Choices that are not obvious from the brief:

* **One DNS observation per lookup, not per query.**  OONI's resolvers (netxlite ``LookupHost``)
  send A and AAAA together under one ``transaction_id`` and succeed when either answers; an AAAA
  ``dns_no_answer`` next to a working A is "no IPv6", not a failure.  kzprobe's live probe folds
  A and AAAA the same way (qtype ``A+AAAA``), so the classifier sees the same shape from both.  The
  per-query records are kept in ``data["queries"]`` so that export can write them back.
* **Redirect chains.**  Web Connectivity 0.5 follows redirects as separate steps tagged
  ``depth=N``.  A live kzprobe HTTP observation carries the final outcome of its redirect chain,
  so the depth-0 request becomes that: status, title and body of the last response, or the failure
  that broke the chain.  The steps at depth > 0 are kept with ``purpose="redirect"`` (the rules read
  only ``measure`` steps: their DNS answers are for other names and must not be compared with
  control's answer for the input's name).
* **Extension fields.**  Files written by ``kzprobe export`` carry a few ``x_kzprobe*`` keys for
  what OONI's format cannot say (a TLS handshake that completed although the certificate did not
  validate; the full body length when only the head was kept).  Real OONI files never have them.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from kzprobe import errors as E
from kzprobe.analysis.features import default_fingerprints, header, http_features
from kzprobe.contract import STEP_DATA, WireError, check
from kzprobe.model import (
    CONTROL,
    FOLLOWUP,
    MEASURE,
    REDIRECT,
    SOURCE_OONI,
    STEP_DNS,
    STEP_HTTP,
    STEP_TCP,
    STEP_TLS,
    Observation,
)

#: Tags written by ``kzprobe export`` (and read back here) for what OONI has no field for.
TAG_FOLLOWUP = "kzprobe_followup"
TAG_PURPOSE = "kzprobe_purpose="
TAG_ATTEMPT = "kzprobe_attempt="
TAG_DOMAIN = "kzprobe_domain="


SSL_CERT_FAILURES = frozenset({E.SSL_INVALID_HOSTNAME, E.SSL_UNKNOWN_AUTHORITY, E.SSL_INVALID_CERTIFICATE})

_KNOWN = frozenset({
    E.DNS_NXDOMAIN, E.DNS_SERVFAIL, E.DNS_REFUSED, E.DNS_NO_ANSWER, E.DNS_BOGON,
    E.CONNECTION_REFUSED, E.CONNECTION_RESET, E.CONNECTION_ABORTED, E.TIMEOUT, E.EOF,
    E.HOST_UNREACHABLE, E.NETWORK_UNREACHABLE, E.INTERRUPTED,
})

# OONI strings that have a kzprobe equivalent under another name.  The ``*_error`` forms are the
# legacy vocabulary that the test helper (oohelperd) still uses in ``test_keys.control``.
_ALIASES = {
    "android_dns_cache_no_data": E.DNS_NXDOMAIN,
    "dns_name_error": E.DNS_NXDOMAIN,
    "dns_nxdomain": E.DNS_NXDOMAIN,
    "dns_server_failure": E.DNS_SERVFAIL,
    "dns_refused": E.DNS_REFUSED,
    "dns_no_answer_error": E.DNS_NO_ANSWER,
    "connection_refused_error": E.CONNECTION_REFUSED,
    "connection_reset_error": E.CONNECTION_RESET,
    "connection_aborted_error": E.CONNECTION_ABORTED,
    "eof": E.EOF,
    "generic_timeout": E.TIMEOUT,
    "timeout": E.TIMEOUT,
    "host_unreachable_error": E.HOST_UNREACHABLE,
    "network_unreachable_error": E.NETWORK_UNREACHABLE,
}


class OoniFormatError(ValueError):
    """A measurement that cannot be mapped; the message is one line, without the location."""


def map_failure(failure: Any) -> str | None:
    """OONI failure string -> kzprobe's (errors.py); unknown ones keep their text after a prefix."""
    if failure is None or failure == "":
        return None
    s = str(failure).strip()
    if s in _KNOWN or s.startswith("ssl_") or s.startswith(E.UNKNOWN):
        return s[:200]
    if s in _ALIASES:
        return _ALIASES[s]
    return f"{E.UNKNOWN}: {s}"[:200]


def parse_time(value: Any) -> float:
    """OONI's ``measurement_start_time`` ("YYYY-MM-DD HH:MM:SS", UTC) -> epoch seconds."""
    if not isinstance(value, str):
        raise OoniFormatError("measurement_start_time is missing")
    if len(value) == 19 and value[10] == " ":
        # OONI's own format, nearly every line of an archive: fromisoformat is C, strptime is not.
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ"):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    raise OoniFormatError(f"measurement_start_time {value!r} is not a date")


def split_endpoint(value: Any) -> tuple[str | None, int | None]:
    """'1.2.3.4:443' / '[::1]:443' -> (address, port)."""
    if not isinstance(value, str) or not value:
        return None, None
    m = re.fullmatch(r"\[(.+)\]:(\d+)", value) or re.fullmatch(r"([^:]+):(\d+)", value)
    if m:
        return m.group(1), int(m.group(2))
    return value, None


def _tags(entry: dict[str, Any]) -> list[str]:
    # Called a few dozen times per measurement (every step asks for its depth, purpose and
    # attempt): the common case, a list of strings or none, is returned without a copy.
    tags = entry.get("tags")
    if type(tags) is not list or not tags:
        return []
    if all(type(t) is str for t in tags):
        return tags
    return [str(t) for t in tags]


def _depth(entry: dict[str, Any]) -> int:
    for t in _tags(entry):
        if t.startswith("depth="):
            with contextlib.suppress(ValueError):
                return int(t[6:])
    return 0


def _purpose(entry: dict[str, Any]) -> str:
    tags = _tags(entry)
    if TAG_FOLLOWUP in tags:
        return FOLLOWUP
    for t in tags:
        if t.startswith(TAG_PURPOSE):
            return t[len(TAG_PURPOSE):]
    return REDIRECT if _depth(entry) > 0 else MEASURE


def _attempt(entry: dict[str, Any]) -> int:
    for t in _tags(entry):
        if t.startswith(TAG_ATTEMPT):
            with contextlib.suppress(ValueError):
                return int(t[len(TAG_ATTEMPT):])
    return 0


def _tagged_domain(entry: dict[str, Any]) -> str | None:
    for t in _tags(entry):
        if t.startswith(TAG_DOMAIN):
            return t[len(TAG_DOMAIN):]
    return None


def _times(entry: dict[str, Any], start: float) -> tuple[float, float]:
    """``t0`` (start) and ``t`` (end) are seconds since measurement_start_time; older files lack t0."""
    t = entry.get("t")
    t0 = entry.get("t0", t)
    end = start + float(t) if isinstance(t, int | float) else start
    begin = start + float(t0) if isinstance(t0, int | float) else end
    return begin, end


def _body_text(body: Any) -> str:
    """OONI bodies are strings, or {"format": "base64", "data": ...} when not UTF-8."""
    if isinstance(body, dict):
        data = body.get("data") or ""
        if body.get("format") == "base64":
            try:
                return base64.b64decode(data).decode("utf-8", "replace")
            except (ValueError, TypeError):
                return ""
        return str(data)
    return body if isinstance(body, str) else ""


def _body_bytes(body: Any) -> bytes:
    if isinstance(body, dict) and body.get("format") == "base64":
        try:
            return base64.b64decode(body.get("data") or "")
        except (ValueError, TypeError):
            return b""
    return _body_text(body).encode("utf-8")


def flatten_headers(headers: Any, headers_list: Any = None) -> dict[str, str]:
    """OONI headers (name -> str | [str]) or headers_list ([[name, value]]) -> {name: value}."""
    out: dict[str, str] = {}
    if isinstance(headers_list, list) and headers_list:
        for pair in headers_list:
            if isinstance(pair, list | tuple) and len(pair) == 2:
                name, value = str(pair[0]), _body_text(pair[1]) if isinstance(pair[1], dict) else str(pair[1])
                out[name] = f"{out[name]}, {value}" if name in out else value
        return out
    if isinstance(headers, dict):
        for name, value in headers.items():
            if isinstance(value, list):
                out[str(name)] = ", ".join(str(v) for v in value)
            elif value is not None:
                out[str(name)] = str(value)
    return out


def describe_certificates(peer_certificates: Any) -> list[dict[str, Any]]:
    """peer_certificates ([{"format": "base64", "data": DER}]) -> kzprobe certificate dicts.

    ``der_b64`` is always kept; subject, issuer, SAN and validity are filled in when the
    ``cryptography`` package can parse the certificate."""
    out: list[dict[str, Any]] = []
    if not isinstance(peer_certificates, list):
        return out
    for cert in peer_certificates:
        b64 = cert.get("data") if isinstance(cert, dict) else cert if isinstance(cert, str) else None
        if not b64:
            continue
        info: dict[str, Any] = {"der_b64": b64}
        info.update(_parse_der(b64))
        out.append(info)
    return out


def _parse_der(b64: str) -> dict[str, Any]:
    try:
        from cryptography import x509
    except ImportError:  # optional: without it the DER is still kept
        return {}
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(b64))
    except (ValueError, TypeError):
        return {}
    info: dict[str, Any] = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "san": [],
    }
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        info["san"] = [str(v) for v in ext.value.get_values_for_type(x509.DNSName)] + [
            str(v) for v in ext.value.get_values_for_type(x509.IPAddress)
        ]
    except x509.ExtensionNotFound:
        pass
    return info


# --- the measurement ----------------------------------------------------------------------------------
@dataclass
class Imported:
    """One OONI measurement, ready to be stored as one kzprobe run."""

    input: str
    started: float
    vantage: dict[str, Any]
    options: dict[str, Any]
    software: str
    software_version: str
    runtime: float
    observations: list[Observation] = field(default_factory=list)

    @property
    def ooni_blocking(self) -> Any:
        return self.options.get("ooni_blocking")

    @property
    def has_control(self) -> bool:
        return any(o.vantage == CONTROL for o in self.observations)


def measurement_to_observations(m: Any) -> Imported:
    """Map one OONI Web Connectivity measurement; raises :class:`OoniFormatError` when it cannot."""
    if not isinstance(m, dict):
        raise OoniFormatError(f"a measurement is a JSON object, not {type(m).__name__}")
    test_name = m.get("test_name")
    if test_name != "web_connectivity":
        raise OoniFormatError(f"test_name is {test_name!r}; only web_connectivity is supported")
    url = m.get("input")
    if not isinstance(url, str) or not urlsplit(url).hostname:
        raise OoniFormatError(f"input {url!r} is not a URL")
    tk = m.get("test_keys")
    if not isinstance(tk, dict):
        raise OoniFormatError("test_keys is missing")
    start = parse_time(m.get("measurement_start_time"))
    host = (urlsplit(url).hostname or "").lower()
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    b = _Builder(target=url, host=host, start=start)
    try:
        b.learn_names(_list(tk, "tls_handshakes"), _list(tk, "requests"))
        b.queries(_list(tk, "queries"), _list(tk, "x_dns_duplicate_responses"))
        b.tcp(_list(tk, "tcp_connect"))
        b.tls(_list(tk, "tls_handshakes"))
        b.requests(_list(tk, "requests"))
        control = tk.get("control")
        control_failure = tk.get("control_failure")
        if isinstance(control, dict) and not control_failure:
            b.control(control, url)
        for o in b.out:
            # The one contract every source meets: a type-wrong value that slipped through the
            # mapping (an x_kzprobe title that is a number, a TTL that is a string) stops here.
            check(o.data, STEP_DATA[o.step], f"{o.step} data")
    except WireError as exc:
        raise OoniFormatError(f"malformed test_keys: {exc.reason}") from None
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        # A field of the wrong type somewhere deep in test_keys: one line, not a traceback.
        raise OoniFormatError(f"malformed test_keys: {type(exc).__name__}: {exc}") from None
    options: dict[str, Any] = {
        "report_id": m.get("report_id"),
        "input": url,
        "test_name": test_name,
        "test_version": m.get("test_version"),
        "ooni_blocking": tk.get("blocking"),
        "ooni_accessible": tk.get("accessible"),
    }
    if m.get("measurement_uid"):
        options["measurement_uid"] = m["measurement_uid"]
    if control_failure or not isinstance(control, dict):
        options["control_failure"] = control_failure or "no control in the measurement"
    runtime = m.get("test_runtime")
    return Imported(
        input=url,
        started=start,
        vantage={k: m.get(k) for k in ("probe_cc", "probe_asn", "probe_network_name", "resolver_ip", "resolver_asn")},
        options=options,
        software=str(m.get("software_name") or "unknown"),
        software_version=str(m.get("software_version") or ""),
        runtime=float(runtime) if isinstance(runtime, int | float) else 0.0,
        observations=b.out,
    )


def _location(e: dict[str, Any]) -> str | None:
    resp = e.get("response")
    if not isinstance(resp, dict):
        return None
    loc = header(flatten_headers(resp.get("headers"), resp.get("headers_list")), "location")
    url = (e.get("request") or {}).get("url")
    return urljoin(str(url or ""), loc) if loc else None


def _chain_order(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests without ``depth`` tags (Web Connectivity 0.4) -> tagged copies, when they form a chain.

    OONI lists a redirect chain's requests newest first; each older one's Location must be the
    next one's URL, else the list is not taken for a chain (and is left as it was)."""
    if len(entries) < 2 or any(t.startswith("depth=") for e in entries for t in _tags(e)):
        return entries
    chain = list(reversed(entries))
    for here, nxt in pairwise(chain):
        if _location(here) != (nxt.get("request") or {}).get("url"):
            return entries
    return [{**e, "tags": [*_tags(e), f"depth={i}"]} for i, e in enumerate(chain)]


def _list(tk: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = tk.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise OoniFormatError(f"test_keys.{key} is not a list of objects")
    return value


def _answer_data(a: dict[str, Any]) -> str:
    for key in ("ipv4", "ipv6", "hostname", "hostname_target"):
        if a.get(key):
            return str(a[key])
    return ""


def _rcode(failure: str | None) -> str | None:
    return {
        None: "NOERROR",
        E.DNS_NO_ANSWER: "NOERROR",
        E.DNS_NXDOMAIN: "NXDOMAIN",
        E.DNS_SERVFAIL: "SERVFAIL",
        E.DNS_REFUSED: "REFUSED",
    }.get(failure)


@dataclass
class _Builder:
    target: str
    host: str
    start: float
    out: list[Observation] = field(default_factory=list)
    #: transaction_id -> the name that transaction was about (TCP records have no name).
    names: dict[Any, str] = field(default_factory=dict)

    def _obs(self, step: str, entry: dict[str, Any] | None, domain: str, **kw: Any) -> Observation:
        t0, t1 = _times(entry or {}, self.start)
        purpose = _purpose(entry) if entry is not None else MEASURE
        o = Observation(step=step, target=self.target, domain=domain, source=SOURCE_OONI, t_start=t0, t_end=t1,
                        purpose=purpose, attempt=_attempt(entry or {}), **kw)
        if entry is not None and _depth(entry):
            # "hop" is the contract's name (model.REDIRECT); "depth" is OONI's, kept for export.
            o.data["depth"] = o.data["hop"] = _depth(entry)
        self.out.append(o)
        return o

    def learn_names(self, tls: list[dict[str, Any]], requests: list[dict[str, Any]]) -> None:
        """transaction_id -> name, from TLS server names and request URLs."""
        for e in tls:
            if e.get("transaction_id") is not None and e.get("server_name"):
                self.names.setdefault(e["transaction_id"], str(e["server_name"]))
        for e in requests:
            host = urlsplit(str((e.get("request") or {}).get("url") or "")).hostname
            if e.get("transaction_id") is not None and host:
                self.names.setdefault(e["transaction_id"], host)

    # --- DNS ---------------------------------------------------------------------------------------
    def queries(self, queries: list[dict[str, Any]], duplicates: list[dict[str, Any]]) -> None:
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for q in queries:
            key = (q.get("transaction_id"), q.get("engine"), q.get("resolver_address"), q.get("hostname"),
                   _depth(q), tuple(_tags(q)))
            groups.setdefault(key, []).append(q)
        for group in groups.values():
            self._lookup(group, duplicates)

    def _lookup(self, group: list[dict[str, Any]], duplicates: list[dict[str, Any]]) -> None:
        first = group[0]
        engine = str(first.get("engine") or "")
        resolver = str(first.get("resolver_address") or "")
        if engine in ("getaddrinfo", "system", "android_dns_cache") or not resolver:
            resolver, transport = "system", "system"
        else:
            transport = engine
        hostname = str(first.get("hostname") or self.host)
        per_query: list[dict[str, Any]] = []
        answers: list[dict[str, Any]] = []
        for q in group:
            qa = [{"type": str(a.get("answer_type") or ""), "name": hostname, "data": _answer_data(a),
                   "ttl": a.get("ttl")} for a in (q.get("answers") or []) if isinstance(a, dict)]
            answers.extend(qa)
            per_query.append({"qtype": q.get("query_type"), "failure": map_failure(q.get("failure")), "answers": qa,
                              "t0": q.get("t0"), "t": q.get("t")})
        addresses = list(dict.fromkeys(a["data"] for a in answers if a["type"] in ("A", "AAAA") and a["data"]))
        if (any(pq["failure"] is None for pq in per_query) and addresses) or all(
                pq["failure"] is None for pq in per_query):
            failure = None
        else:
            # Prefer the A query's failure: an AAAA "no answer" says little about the name.
            a_fail = [pq["failure"] for pq in per_query if pq["qtype"] == "A" and pq["failure"]]
            others = [pq["failure"] for pq in per_query if pq["failure"] and pq["failure"] != E.DNS_NO_ANSWER]
            failure = (a_fail or others or [pq["failure"] for pq in per_query if pq["failure"]])[0]
        qtypes = [str(pq["qtype"]) for pq in per_query]
        qtype = qtypes[0] if len(qtypes) == 1 else "A+AAAA" if sorted(qtypes) == ["A", "AAAA"] else "+".join(qtypes)
        responses = self._responses(per_query, group, duplicates, failure, addresses)
        o = self._obs(STEP_DNS, first, hostname, failure=failure, data={
            "resolver": resolver, "transport": transport, "qtype": qtype, "rcode": _rcode(failure),
            "answers": answers, "addresses": addresses, "responses": responses, "queries": per_query,
        })
        if o.purpose == MEASURE and hostname != self.host and o.data.get("depth") is None:
            # A lookup of another name at depth 0 (e.g. a CNAME chase): keep it out of the comparison.
            o.purpose = REDIRECT
            o.data["hop"] = 0

    def _responses(self, per_query: list[dict[str, Any]], group: list[dict[str, Any]],
                   duplicates: list[dict[str, Any]], failure: str | None, addresses: list[str]
                   ) -> list[dict[str, Any]]:
        """Every response seen for the lookup: the first, then duplicates (injection evidence).

        As in the live probe, these are the A query's responses when it has duplicates, so that
        an AAAA answer is never compared with an A answer."""
        by_qtype: dict[str, list[dict[str, Any]]] = {}
        for q, pq in zip(group, per_query, strict=True):
            qt = str(pq["qtype"])
            by_qtype[qt] = [{"qtype": qt, "rcode": _rcode(pq["failure"]),
                             "addresses": [a["data"] for a in pq["answers"] if a["type"] in ("A", "AAAA")]}]
            for d in duplicates:
                if (d.get("hostname") == q.get("hostname") and d.get("query_type") == q.get("query_type")
                        and d.get("resolver_address") == q.get("resolver_address")
                        and d.get("engine") == q.get("engine")
                        and d.get("transaction_id", q.get("transaction_id")) == q.get("transaction_id")):
                    f = map_failure(d.get("failure"))
                    by_qtype[qt].append({"qtype": qt, "rcode": _rcode(f), "duplicate": True, "addresses": [
                        _answer_data(a) for a in (d.get("answers") or [])
                        if isinstance(a, dict) and a.get("answer_type") in ("A", "AAAA")]})
        with_dups = [r for r in by_qtype.values() if len(r) > 1]
        if with_dups:
            differing = [r for r in with_dups if len({tuple(sorted(x["addresses"])) for x in r}) > 1]
            return (differing or with_dups)[0]
        return [{"rcode": _rcode(failure), "addresses": addresses}]

    # --- TCP ---------------------------------------------------------------------------------------
    def tcp(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            status = e.get("status") or {}
            failure = map_failure(status.get("failure"))
            if failure is None and status.get("success") is False:
                failure = f"{E.UNKNOWN}: tcp connect failed"
            domain = _tagged_domain(e) or self.names.get(e.get("transaction_id")) or self.host
            port = e.get("port")
            self._obs(STEP_TCP, e, domain, address=e.get("ip"), port=int(port) if port is not None else None,
                      failure=failure)

    # --- TLS ---------------------------------------------------------------------------------------
    def tls(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            address, port = split_endpoint(e.get("address"))
            failure = map_failure(e.get("failure"))
            sni = str(e.get("server_name") or "")
            certs = describe_certificates(e.get("peer_certificates"))
            data: dict[str, Any] = {
                "sni": sni, "version": e.get("tls_version"), "cipher": e.get("cipher_suite"),
                "alpn": e.get("negotiated_protocol"), "certificates": certs,
                "issuer": certs[0].get("issuer", "") if certs else "",
                "cert_valid": None, "cert_failure": None,
            }
            if failure in SSL_CERT_FAILURES:
                # In OONI a certificate failure aborts the handshake, so the failure stays.
                data["cert_valid"], data["cert_failure"] = False, failure
                if e.get("x_kzprobe_handshake_completed"):
                    # ...unless kzprobe wrote it: its probe completes the handshake and validates apart.
                    failure = None
            elif failure is None and not e.get("no_tls_verify"):
                data["cert_valid"] = True
            domain = _tagged_domain(e) or sni or self.host
            self._obs(STEP_TLS, e, domain, address=address, port=port, failure=failure, data=data)

    # --- HTTP --------------------------------------------------------------------------------------
    def _http_data(self, e: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        req = e.get("request") or {}
        resp = e.get("response") or {}
        url = str(req.get("url") or self.target)
        req_headers = flatten_headers(req.get("headers"), req.get("headers_list"))
        host = next((v for k, v in req_headers.items() if k.lower() == "host"), "") or (urlsplit(url).hostname or "")
        headers = flatten_headers(resp.get("headers"), resp.get("headers_list"))
        body = resp.get("body")
        raw = _body_bytes(body)
        xk = resp.get("x_kzprobe")
        x: dict[str, Any] = xk if isinstance(xk, dict) else {}
        code = resp.get("code")
        failure = map_failure(e.get("failure"))
        # OONI stores the body decoded (Content-Encoding undone; text as UTF-8, anything else as
        # base64): decode nothing again, and read a text body as the UTF-8 it now is.
        as_stored = {k: v for k, v in headers.items() if k.lower() not in ("content-encoding", "content-type")}
        if not isinstance(body, dict):
            as_stored["Content-Type"] = "text/html; charset=utf-8"
        elif header(headers, "content-type"):
            as_stored["Content-Type"] = str(header(headers, "content-type"))
        status = int(code) if isinstance(code, int) and not isinstance(code, bool) and code > 0 else None
        feats = http_features(status, as_stored, raw, truncated_on_wire=bool(resp.get("body_is_truncated")),
                              fingerprints=default_fingerprints())
        feats["content_encoding"] = header(headers, "content-encoding")
        feats["wire_bytes"] = None  # OONI does not say how many bytes came on the wire
        data: dict[str, Any] = {"url": url, "host": host, "status": status, "headers": headers, **feats}
        for key in ("title", "body_length", "body_sha256"):
            if key in x:
                data[key] = x[key]  # kzprobe's export: computed on the full body, only the head was kept
        if data["blockpage"] is None and x.get("blockpage"):
            # Matched by kzprobe on the full body, of which only the head was exported.
            data["blockpage"] = x["blockpage"]
        location = header(headers, "location")
        if status is not None and 300 <= status < 400 and location:
            data["redirect_to"] = urljoin(url, location)
        return data, failure

    def requests(self, entries: list[dict[str, Any]]) -> None:
        by_depth = sorted(_chain_order(entries), key=_depth)
        chain_end = self._chain_end(by_depth)
        for e in by_depth:
            data, failure = self._http_data(e)
            address, port = split_endpoint(e.get("address"))
            domain = _tagged_domain(e) or (urlsplit(data["url"]).hostname or self.host)
            purpose = _purpose(e)
            if purpose == MEASURE and _depth(e) == 0 and chain_end is not None and chain_end[0] is not e:
                end, end_failure = chain_end
                hops = [{"url": data["url"], "status": data["status"], "address": address}]
                for r in by_depth:
                    if r is not e and _depth(r) > 0 and _purpose(r) == REDIRECT:
                        d, _ = self._http_data(r)
                        hops.append({"url": d["url"], "status": d["status"], "address": split_endpoint(
                            r.get("address"))[0]})
                data["hops"] = hops
                data["redirects"] = [h["url"] for h in hops[1:]]
                final: dict[str, Any] = {"status": None, "headers": {}, "title": "", "body_length": None,
                                         "body_sha256": None, "body_head": "", "truncated": False,
                                         "blockpage": None}
                if end is not None:
                    final, _ = self._http_data(end)
                for key in ("status", "headers", "title", "body_length", "body_sha256", "body_head",
                            "truncated", "blockpage"):
                    data[key] = final[key]
                # The folded request stands for the chain's outcome, not for its first 3xx.
                data.pop("redirect_to", None)
                failure = end_failure
            self._obs(STEP_HTTP, e, domain, address=address, port=port, failure=failure, data=data)

    def _chain_end(self, by_depth: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None] | None:
        """Where the redirect chain started by the depth-0 request ended: (last request, failure).

        None when there is no chain (no request at depth > 0 and no failed step after it)."""
        deeper = [r for r in by_depth if _depth(r) > 0 and _purpose(r) == REDIRECT]
        max_req = max((_depth(r) for r in deeper), default=0)
        # Steps (TCP/TLS/DNS) at a depth beyond the last request: the chain broke there.
        broken = [o for o in self.out if o.purpose == REDIRECT and (o.data.get("depth") or 0) > max_req and o.failure]
        if broken:
            last = max(broken, key=lambda o: o.data.get("depth") or 0)
            return (None, last.failure)
        if not deeper:
            return None
        end = max(deeper, key=_depth)
        return (end, map_failure(end.get("failure")))

    # --- control -----------------------------------------------------------------------------------
    def control(self, c: dict[str, Any], url: str) -> None:
        dns = c.get("dns")
        if isinstance(dns, dict):
            addrs = [str(a) for a in (dns.get("addrs") or [])]
            failure = map_failure(dns.get("failure"))
            self._obs(STEP_DNS, None, self.host, vantage=CONTROL, failure=failure, data={
                "resolver": "control", "transport": "helper", "qtype": "A+AAAA", "rcode": _rcode(failure),
                "answers": [{"type": "AAAA" if ":" in a else "A", "name": self.host, "data": a, "ttl": None}
                            for a in addrs],
                "addresses": addrs, "responses": [{"rcode": _rcode(failure), "addresses": addrs}],
            })
        for endpoint, st in (c.get("tcp_connect") or {}).items():
            address, port = split_endpoint(endpoint)
            failure = map_failure(st.get("failure"))
            if failure is None and st.get("status") is False:
                failure = f"{E.UNKNOWN}: control tcp connect failed"
            self._obs(STEP_TCP, None, self.host, vantage=CONTROL, address=address, port=port, failure=failure)
        for endpoint, st in (c.get("tls_handshake") or {}).items():
            address, port = split_endpoint(endpoint)
            failure = map_failure(st.get("failure"))
            if failure is None and st.get("status") is False:
                failure = f"{E.UNKNOWN}: control tls handshake failed"
            data: dict[str, Any] = {"sni": str(st.get("server_name") or self.host),
                                    "cert_valid": True if st.get("status") else None, "cert_failure": None}
            if failure in SSL_CERT_FAILURES:
                data["cert_valid"], data["cert_failure"] = False, failure
            self._obs(STEP_TLS, None, data["sni"], vantage=CONTROL, address=address, port=port,
                      failure=failure, data=data)
        http = c.get("http_request")
        if isinstance(http, dict):
            failure = map_failure(http.get("failure"))
            code, length = http.get("status_code"), http.get("body_length")
            self._obs(STEP_HTTP, None, self.host, vantage=CONTROL, failure=failure, data={
                "url": url, "host": self.host,
                "status": code if isinstance(code, int) and code > 0 else None,
                "headers": flatten_headers(http.get("headers")),
                "title": http.get("title") or "",
                "body_length": length if isinstance(length, int) and length >= 0 else None,
            })


# --- reading files ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Problem:
    """A file or line that could not be read: ``where`` is PATH or PATH:LINE."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def _files(paths: Iterable[str | Path]) -> Iterator[Path | Problem]:
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                yield Problem(str(p), "no .json or .jsonl files in this folder")
            yield from found
        elif p.exists():
            yield p
        else:
            yield Problem(str(p), "no such file or folder")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def read_measurements(paths: Iterable[str | Path]) -> Iterator[tuple[str, Imported] | Problem]:
    """Every measurement in ``paths`` (files or folders, recursively), mapped, with its location.

    A bad file or line yields a :class:`Problem` and reading goes on with the rest."""
    for item in _files(paths):
        if isinstance(item, Problem):
            yield item
            continue
        try:
            text = _read_text(item)
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
            yield Problem(str(item), f"cannot read: {getattr(exc, 'strerror', None) or exc}")
            continue
        lines: list[tuple[str, Any]] = []
        whole: Any = None
        if not item.name.endswith((".jsonl", ".jsonl.gz")):
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                whole = None
        if whole is not None:
            items = whole if isinstance(whole, list) else [whole]
            lines = [(str(item) if len(items) == 1 else f"{item}:{i}", m) for i, m in enumerate(items, 1)]
        else:
            # JSONL (also accepted in a .json file: OONI's own tools write one measurement per line).
            if not text.strip():
                yield Problem(str(item), "empty file")
                continue
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    lines.append((f"{item}:{n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    yield Problem(f"{item}:{n}", f"not JSON: {exc.msg} at column {exc.colno}")
        for where, m in lines:
            try:
                yield where, measurement_to_observations(m)
            except OoniFormatError as exc:
                yield Problem(where, str(exc))
