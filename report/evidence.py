"""The evidence behind a cell: its verdict, the observations step by step (probe and control side
by side), frame numbers for captures and a stored trace.  Also the two views read off the same
observations: TLS interception issuers and blockpages.

Only the cells the report shows evidence for are read (bounded), each by the
``(run_id, target)`` index, never the observations table as a whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, and_, select

from kzprobe.storage.models import ObservationRow

#: Per cell: more steps than this are summarised ("+N more"), to keep the file small.
MAX_STEPS = 80
BODY_SAMPLE = 360

_DATA_KEYS = {
    "dns": ("resolver", "transport", "qtype", "rcode", "addresses", "answers", "responses"),
    "tcp": (),
    "tls": ("sni", "hello", "version", "cipher", "alpn", "issuer", "cert_valid", "cert_failure", "certificates"),
    "http": ("url", "host", "method", "connect_to", "kind",
             "status", "title", "blockpage", "final_url", "redirect_to", "body_length",
             "truncated", "content_encoding", "wire_bytes", "speed_samples", "body_head", "hop"),
}


def _trim(step: str, data: dict[str, Any]) -> dict[str, Any]:
    """The keys an analyst reads, bounded (no DER blobs, a body sample, at most 40 speed samples)."""
    out: dict[str, Any] = {}
    for k in _DATA_KEYS.get(step, ()):
        if k not in data or data[k] in (None, "", [], {}):
            continue
        val = data[k]
        if k == "certificates" and isinstance(val, list):
            val = [{"subject": c.get("subject"), "issuer": c.get("issuer"), "not_after": c.get("not_after")}
                   for c in val[:6] if isinstance(c, dict)]
        elif k == "body_head":
            val = str(val)[:BODY_SAMPLE]
        elif k == "speed_samples" and isinstance(val, list):
            val = val[:: max(1, len(val) // 40)][:41]
        elif k == "answers" and isinstance(val, list):
            val = [{"type": a.get("type"), "data": a.get("data")} for a in val[:12] if isinstance(a, dict)]
        elif k == "responses" and isinstance(val, list):
            val = [{kk: r.get(kk) for kk in ("rcode", "addresses", "ip_ttl")} for r in val[:6] if isinstance(r, dict)]
        out[k] = val
    if step == "http" and isinstance(data.get("headers"), dict):
        hs = data["headers"]
        keep = {k: str(v)[:120] for k, v in hs.items() if k.lower() in ("server", "location", "content-type",
                                                                       "content-length", "via", "x-cache")}
        if keep:
            out["headers"] = keep
    return out


def _step(r: Any) -> dict[str, Any]:
    return {"id": r.id, "step": r.step, "vantage": r.vantage, "purpose": r.purpose, "attempt": r.attempt,
            "source": r.source, "domain": r.domain, "address": r.address, "port": r.port, "failure": r.failure,
            "ms": round(max(0.0, (r.t_end or 0) - (r.t_start or 0)) * 1000, 1),
            "packets": list(r.packets or [])[:20], "data": _trim(r.step, r.data or {})}


def observations_for(conn: Connection, run_id: int, target: str) -> list[dict[str, Any]]:
    o = ObservationRow.__table__
    q = (select(o).where(and_(o.c.run_id == run_id, o.c.target == target)).order_by(o.c.id).limit(MAX_STEPS + 1))
    return [_step(r) for r in conn.execute(q)]


def evidence(conn: Connection, verdict: dict[str, Any], target: str,
             traces: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Everything the evidence panel shows for one verdict."""
    steps = observations_for(conn, verdict["run_id"], target)
    more = len(steps) > MAX_STEPS
    ev = {
        "verdict": verdict["id"], "run": verdict["run_id"], "target": target, "domain": verdict["domain"],
        "status": verdict["status"], "mechanism": verdict["mechanism"], "detail": verdict["detail"],
        "rule": verdict["rule"], "confidence": round(float(verdict["confidence"] or 0), 2),
        "sentence": verdict.get("sentence") or "", "observations": list(verdict.get("observations") or []),
        "packets": list(verdict.get("packets") or [])[:50], "steps": steps[:MAX_STEPS], "more_steps": more,
        "traces": [trace_view(t) for t in traces if _trace_matches(t, verdict)],
    }
    return ev


def _trace_matches(t: dict[str, Any], verdict: dict[str, Any]) -> bool:
    name = str(t.get("target") or "").lower()
    dom = str(verdict.get("domain") or "").lower()
    return t.get("run_id") == verdict.get("run_id") and bool(name) and name in (dom, dom.removeprefix("www."))


def trace_view(t: dict[str, Any]) -> dict[str, Any]:
    """A stored trace, readable: where the censor sits and what that hop is."""
    hops = t.get("hops") or {}
    test = hops.get("test") or [] if isinstance(hops, dict) else []
    control = hops.get("control") or [] if isinstance(hops, dict) else []
    ttl = t.get("hop_ttl")
    # The endpoint's distance: the first TTL at which the control sweep got the server's answer.
    end = next((h.get("ttl") for h in control if isinstance(h, dict)
                and h.get("kind") not in ("icmp_time_exceeded", "silence", "handshake_timeout")), None)
    where = ""
    if t.get("result") == "censor_located" and isinstance(ttl, int):
        if ttl <= 1:
            where = "the first hop (the access network)"
        elif isinstance(end, int) and ttl >= end:
            where = "the endpoint"
        else:
            where = (f"a backbone hop: past the access network (hop 1), "
                     f"{'before the server (hop ' + str(end) + ')' if isinstance(end, int) else 'before the server'}")
    ev = t.get("evidence")
    sentence = ev.get("sentence") if isinstance(ev, dict) else (str(ev) if ev else "")
    return {
        "id": t.get("id"), "run": t.get("run_id"), "target": t.get("target"), "trigger": t.get("trigger"),
        "result": t.get("result"), "hop_ttl": ttl, "hop_address": t.get("hop_address"),
        "placement": t.get("placement"), "triggered_by": t.get("triggered_by"), "endpoint_ttl": end,
        "where": where, "rule": t.get("rule") or (ev.get("rule") if isinstance(ev, dict) else None),
        "sentence": sentence or "",
        "hops": _distinct_hops(test),
    }


def _distinct_hops(hops: list[Any]) -> list[dict[str, Any]]:
    """The test sweep, one line per distinct answer per TTL (repetitions say the same thing)."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for h in hops:
        if not isinstance(h, dict):
            continue
        row = {k: h.get(k) for k in ("ttl", "kind", "router", "responder", "detail")}
        key = tuple(row.values())
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out[:40]
