"""kzprobe runs -> OONI Web Connectivity JSONL, observation JSONL, or a verdict CSV.

The ``ooni`` form is one Web Connectivity measurement per target (data_format_version 0.2.0,
test_keys as in ts-017), so OONI's tooling can read it and ``kzprobe import-ooni`` can read it
back to the same verdicts.  What OONI's format has no field for travels in tags
(``kzprobe_followup``, ``kzprobe_purpose=…``, ``kzprobe_attempt=N``, ``depth=N``) and in a few
``x_kzprobe*`` keys (see :mod:`kzprobe.ooni.importer`).

``test_keys.blocking`` / ``accessible`` are derived from kzprobe's verdict with OONI's meanings:

============================  ==============  ==========
kzprobe verdict               blocking        accessible
============================  ==============  ==========
ok                            false           true
down                          false           false
inconclusive                  null            null
blocked/dns (any detail)      "dns"           false
blocked/ip                    "tcp_ip"        false
blocked/dpi http_diff,        "http-diff"     false
blockpage
blocked/dpi (other: TLS/HTTP  "http-failure"  false
reset or timeout, MITM, …)
============================  ==============  ==========

kzprobe's own verdict is in ``test_keys.x_kzprobe_verdict``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from kzprobe import __version__
from kzprobe.model import (
    BLOCKED,
    CONTROL,
    DOWN,
    FOLLOWUP,
    INCONCLUSIVE,
    MEASURE,
    OK,
    STEP_DNS,
    STEP_HTTP,
    STEP_TCP,
    STEP_TLS,
    Observation,
    Verdict,
)
from kzprobe.ooni.importer import REDIRECT, SSL_CERT_FAILURES, TAG_ATTEMPT, TAG_DOMAIN, TAG_FOLLOWUP, TAG_PURPOSE

FORMATS = ("ooni", "jsonl", "csv")
CSV_COLUMNS = ("run_id", "target", "domain", "status", "mechanism", "detail", "rule", "confidence",
               "sentence", "observations")


def ooni_blocking(v: Verdict | None) -> tuple[str | bool | None, bool | None]:
    """kzprobe verdict -> OONI's (test_keys.blocking, test_keys.accessible)."""
    if v is None or v.status == INCONCLUSIVE:
        return None, None
    if v.status == OK:
        return False, True
    if v.status == DOWN:
        return False, False
    if v.status == BLOCKED:
        if v.mechanism == "dns":
            return "dns", False
        if v.mechanism == "ip":
            return "tcp_ip", False
        if v.detail in ("dpi.http_diff", "dpi.blockpage"):
            return "http-diff", False
        return "http-failure", False
    return None, None


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _endpoint(address: str | None, port: int | None) -> str:
    a = address or ""
    if ":" in a:
        a = f"[{a}]"
    return f"{a}:{port}" if port is not None else a


class _Writer:
    """Builds one measurement's test_keys from one target's observations."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.tid = 0

    def _next(self) -> int:
        self.tid += 1
        return self.tid

    def _common(self, o: Observation) -> dict[str, Any]:
        tags: list[str] = []
        if o.purpose == FOLLOWUP:
            tags.append(TAG_FOLLOWUP)
        elif o.purpose == REDIRECT:
            tags.append(f"depth={int(o.data.get('depth') or 1)}")
        elif o.purpose != MEASURE:
            tags.append(f"{TAG_PURPOSE}{o.purpose}")
        if o.purpose != REDIRECT:
            tags.append("depth=0")
        if o.attempt:
            tags.append(f"{TAG_ATTEMPT}{o.attempt}")
        tags.append(f"{TAG_DOMAIN}{o.domain}")
        return {
            "t0": round(o.t_start - self.started, 6),
            "t": round(o.t_end - self.started, 6),
            "tags": tags,
        }

    # --- probe steps ---------------------------------------------------------------------------------
    def queries(self, o: Observation) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """-> (queries, duplicate responses)."""
        transport = str(o.data.get("transport") or "system")
        resolver = str(o.data.get("resolver") or "")
        engine = "getaddrinfo" if transport == "system" else transport
        base = {
            "engine": engine,
            "hostname": o.domain,
            "resolver_hostname": None,
            "resolver_port": None,
            "resolver_address": "" if engine == "getaddrinfo" else resolver,
            "transaction_id": self._next(),
            **self._common(o),
        }
        per_query = o.data.get("queries")
        if not isinstance(per_query, list) or not per_query:
            # A live observation: one query (the live probe folds A and AAAA into one too).
            qtype = str(o.data.get("qtype") or "A")
            per_query = [{"qtype": "ANY" if "+" in qtype else qtype, "failure": o.failure,
                          "answers": o.data.get("answers") or [
                              {"type": "AAAA" if ":" in a else "A", "data": a, "ttl": None}
                              for a in o.data.get("addresses") or []]}]
        out = []
        for pq in per_query:
            out.append({**base, "query_type": pq.get("qtype"), "failure": pq.get("failure"),
                        "answers": [_answer(a) for a in pq.get("answers") or []] or None})
        dups = []
        responses = o.data.get("responses") or []
        for r in responses[1:]:
            qtype = r.get("qtype") or per_query[0].get("qtype")
            dups.append({**base, "query_type": qtype, "failure": None if r.get("addresses") else (
                "dns_nxdomain_error" if r.get("rcode") == "NXDOMAIN" else "dns_no_answer"),
                "answers": [_answer({"type": "AAAA" if ":" in a else "A", "data": a}) for a in r.get("addresses") or []]
                or None})
        return out, dups

    def tcp(self, o: Observation) -> dict[str, Any]:
        return {"ip": o.address, "port": o.port, "status": {"failure": o.failure, "success": o.failure is None},
                "transaction_id": self._next(), **self._common(o)}

    def tls(self, o: Observation) -> dict[str, Any]:
        d = o.data
        failure = o.failure
        entry: dict[str, Any] = {}
        if failure is None and d.get("cert_valid") is False:
            # OONI would have aborted the handshake on the certificate; kzprobe completed it and
            # validated apart.  Say both: OONI's failure, and that the handshake did complete.
            failure = d.get("cert_failure") if d.get("cert_failure") in SSL_CERT_FAILURES else "ssl_invalid_certificate"
            entry["x_kzprobe_handshake_completed"] = True
        entry.update({
            "network": "tcp",
            "address": _endpoint(o.address, o.port),
            "cipher_suite": d.get("cipher"),
            "failure": failure,
            "negotiated_protocol": d.get("alpn"),
            "no_tls_verify": d.get("cert_valid") is None and o.failure is None,
            "peer_certificates": [{"format": "base64", "data": c["der_b64"]}
                                  for c in d.get("certificates") or [] if c.get("der_b64")] or None,
            "server_name": d.get("sni") or o.domain,
            "tls_version": d.get("version"),
            "transaction_id": self._next(),
            **self._common(o),
        })
        return entry

    def request(self, o: Observation) -> dict[str, Any]:
        d = o.data
        url = str(d.get("url") or o.target)
        host = str(d.get("host") or urlsplit(url).hostname or o.domain)
        hops = d.get("hops") if isinstance(d.get("hops"), list) and d.get("hops") else None
        headers = d.get("headers") or {}
        body = str(d.get("body_head") or "")
        failure = o.failure
        status = d.get("status")
        x: dict[str, Any] = {"body_length": d.get("body_length"), "body_sha256": d.get("body_sha256"),
                             "title": d.get("title") or "", "blockpage": d.get("blockpage")}
        if hops:
            # An imported redirect chain: write its first hop as OONI had it; the later hops are
            # their own (depth > 0) entries, from which import rebuilds the chain's outcome.
            url, status, headers, body, failure = str(hops[0].get("url") or url), hops[0].get("status"), {}, "", None
            x = {}
        resp = {
            "body": body,
            "body_is_truncated": bool(d.get("truncated")) or (
                isinstance(d.get("body_length"), int) and d["body_length"] > len(body.encode("utf-8"))),
            "code": status or 0,
            "headers": dict(headers),
            "headers_list": [[k, v] for k, v in headers.items()],
        }
        if x:
            resp["x_kzprobe"] = x
        return {
            "network": "tcp",
            "address": _endpoint(o.address, o.port) if o.address else None,
            "alpn": None,
            "failure": failure,
            "request": {
                "body": "", "body_is_truncated": False, "method": "GET", "url": url,
                "headers": {"Host": host}, "headers_list": [["Host", host]],
                "tor": {"exit_ip": None, "exit_name": None, "is_tor": False}, "x_transport": "tcp",
            },
            "response": resp if (status or body or headers) else None,
            "transaction_id": self._next(),
            **self._common(o),
        }

    # --- control ---------------------------------------------------------------------------------------
    def control(self, obs: list[Observation]) -> dict[str, Any] | None:
        if not obs:
            return None
        c: dict[str, Any] = {"tcp_connect": {}, "tls_handshake": {}, "http_request": None, "dns": None,
                             "quic_handshake": {}, "http3_request": None, "ip_info": {}}
        dns = [o for o in obs if o.step == STEP_DNS]
        if dns:
            addrs = list(dict.fromkeys(a for o in dns if o.ok for a in o.data.get("addresses") or []))
            ok = any(o.ok for o in dns)
            c["dns"] = {"failure": None if ok else dns[0].failure, "addrs": addrs}
        for o in obs:
            if o.step == STEP_TCP:
                key = _endpoint(o.address, o.port)
                prev = c["tcp_connect"].get(key)
                if prev is None or not prev["status"]:
                    c["tcp_connect"][key] = {"status": o.ok, "failure": o.failure}
            elif o.step == STEP_TLS:
                key = _endpoint(o.address, o.port)
                failure = o.failure or (o.data.get("cert_failure") if o.data.get("cert_valid") is False else None)
                prev = c["tls_handshake"].get(key)
                if prev is None or not prev["status"]:
                    c["tls_handshake"][key] = {"server_name": o.data.get("sni") or o.domain,
                                               "status": failure is None, "failure": failure}
        http = [o for o in obs if o.step == STEP_HTTP]
        if http:
            o = next((h for h in http if h.ok), http[0])
            c["http_request"] = {
                "body_length": o.data.get("body_length") if o.data.get("body_length") is not None else -1,
                "failure": o.failure,
                "title": o.data.get("title") or "",
                "headers": o.data.get("headers") or {},
                "status_code": o.data.get("status") or -1,
            }
        return c


def _answer(a: dict[str, Any]) -> dict[str, Any]:
    t = str(a.get("type") or "A")
    out: dict[str, Any] = {"answer_type": t, "ttl": a.get("ttl"), "asn": 0, "as_org_name": ""}
    key = {"A": "ipv4", "AAAA": "ipv6"}.get(t, "hostname")
    out[key] = a.get("data")
    return out


def measurement(
    target: str,
    observations: list[Observation],
    verdict: Verdict | None,
    *,
    run_id: int,
    started: float,
    ended: float | None,
    vantage: dict[str, Any],
    options: dict[str, Any],
) -> dict[str, Any]:
    """One OONI Web Connectivity measurement for one target of a run."""
    w = _Writer(started)
    queries: list[dict[str, Any]] = []
    dups: list[dict[str, Any]] = []
    tcp, tls, requests = [], [], []
    probe = [o for o in observations if o.vantage != CONTROL]
    for o in probe:
        if o.step == STEP_DNS:
            q, d = w.queries(o)
            queries.extend(q)
            dups.extend(d)
        elif o.step == STEP_TCP:
            tcp.append(w.tcp(o))
        elif o.step == STEP_TLS:
            tls.append(w.tls(o))
        elif o.step == STEP_HTTP:
            requests.append(w.request(o))
    control = w.control([o for o in observations if o.vantage == CONTROL])
    blocking, accessible = ooni_blocking(verdict)
    measure_dns = [o for o in probe if o.step == STEP_DNS and o.purpose == MEASURE]
    measure_http = [o for o in probe if o.step == STEP_HTTP and o.purpose == MEASURE]
    test_keys: dict[str, Any] = {
        "agent": "redirect",
        "client_resolver": vantage.get("resolver_ip"),
        "queries": queries,
        "x_dns_duplicate_responses": dups or None,
        "tcp_connect": tcp,
        "tls_handshakes": tls,
        "requests": requests,
        "control": control,
        "control_failure": None if control is not None else (
            options.get("control_failure") or "unknown_failure: no control measurement"),
        "dns_experiment_failure": next((o.failure for o in measure_dns if o.failure), None)
        if measure_dns and not any(o.ok for o in measure_dns) else None,
        "http_experiment_failure": measure_http[0].failure if measure_http else None,
        "blocking": blocking,
        "accessible": accessible,
        "x_kzprobe_verdict": verdict.to_dict() if verdict else None,
        "x_kzprobe_run": run_id,
    }
    return {
        "annotations": {"engine_name": "kzprobe", "engine_version": __version__},
        "data_format_version": "0.2.0",
        "input": target,
        "measurement_start_time": _ts(started),
        "test_start_time": _ts(started),
        "probe_asn": vantage.get("probe_asn") or "AS0",
        "probe_cc": vantage.get("probe_cc") or "ZZ",
        "probe_ip": "127.0.0.1",
        "probe_network_name": vantage.get("probe_network_name") or "",
        "report_id": options.get("report_id") or "",
        "resolver_asn": vantage.get("resolver_asn") or "AS0",
        "resolver_ip": vantage.get("resolver_ip") or "",
        "resolver_network_name": vantage.get("resolver_network_name") or "",
        "software_name": "kzprobe",
        "software_version": __version__,
        "test_helpers": {},
        "test_keys": test_keys,
        "test_name": "web_connectivity",
        "test_runtime": round((ended or started) - started, 6),
        "test_version": "0.5.0",
    }


def run_measurements(
    targets: list[str],
    observations: Iterable[Observation],
    verdicts: Iterable[Verdict],
    *,
    run_id: int,
    started: float,
    ended: float | None,
    vantage: dict[str, Any],
    options: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """One measurement per target (targets with observations but no target row are included too)."""
    by_target: dict[str, list[Observation]] = {t: [] for t in targets}
    for o in observations:
        by_target.setdefault(o.target, []).append(o)
    vs = {v.target: v for v in verdicts}
    for target, obs in by_target.items():
        yield measurement(target, obs, vs.get(target), run_id=run_id, started=started, ended=ended,
                          vantage=vantage, options=options)


def dumps(m: dict[str, Any]) -> str:
    return json.dumps(m, ensure_ascii=False, separators=(",", ":"), sort_keys=False)


def observation_lines(run_id: int, observations: Iterable[Observation]) -> Iterator[str]:
    for o in observations:
        yield dumps({**o.to_dict(), "run_id": run_id})


def verdict_csv(rows: Iterable[tuple[int, Verdict]], header: bool = True) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(CSV_COLUMNS)
    for run_id, v in rows:
        w.writerow([run_id, v.target, v.domain, v.status, v.mechanism or "", v.detail or "", v.rule,
                    f"{v.confidence:.2f}", v.sentence, " ".join(str(i) for i in v.observations)])
    return buf.getvalue()
