"""A database of circumvention verdicts built directly (no probing): what the report's
circumvention section is tested on, in JSON and in the browser.

Three networks, two daily runs each.  The verdicts, their observations and their times are
written here from the PLAN below, so every expectation the tests hold comes from this file:

* Kazakhtelecom: the Tor relay is blocked only for the Tor-like ClientHello
  (dpi.tls_fingerprint), the proxy's CONNECT fails (dpi.proxy_connect), psiphon.ca gets
  NXDOMAIN, Opera's proxy host connects; on day 2 WhatsApp's endpoints fail from +600 s to
  +3610 s of the run and connect again at +7200 s (a time-boxed outage).
* Beeline KZ: the relay's OR port times out and its DirPort refuses (ip.*), the proxy and
  psiphon.ca work, Opera's proxy host times out; on day 2 WhatsApp's endpoints fail from +600 s
  and are never fine again (a lasting block).
* Алма ТВ: everything works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kzprobe.model import Observation, Target, Verdict
from kzprobe.storage import Store

DAY = 86400
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
NETS = [("Kazakhtelecom", "AS9198", "KZ"), ("Beeline KZ", "AS21299", "KZ"), ("Алма ТВ", "AS35104", "KZ")]

TOR_OR = "tor-or://128.31.0.39:9201"    # moria1, from the built-in tor list (data only)
TOR_DIR = "tor-dir://128.31.0.39:9231"
PROXY = "proxy+http://203.0.113.30:3128"
PSIPHON = "https://psiphon.ca/"
OPERA = "tcp://eu0.sec-tunnel.com:443"
WA = [f"tcp://e{i}.whatsapp.net:443" for i in (1, 2, 3, 4)]
#: (seconds into the run) when each WhatsApp endpoint is measured on day 2.
WA_AT = [0, 600, 3600, 7200]

# label -> (status, mechanism, detail, rule)
LABEL = {
    "ok": ("ok", None, None, "ok.tcp"),
    "fingerprint": ("blocked", "dpi", "dpi.tls_fingerprint", "dpi.tls_fingerprint"),
    "timeout": ("blocked", "ip", "ip.tcp_timeout", "ip.tcp_timeout"),
    "refused": ("blocked", "ip", "ip.tcp_refused", "ip.tcp_refused"),
    "connect": ("blocked", "dpi", "dpi.proxy_connect", "dpi.proxy_connect"),
    "nx": ("blocked", "dns", "dns.nxdomain", "dns.nxdomain"),
}
SENTENCE = {
    "fingerprint": "the Tor-like ClientHello was reset; the browser-like one completed (control completes both)",
    "timeout": "the TCP connection timed out while control connected",
    "refused": "the TCP connection was refused while control connected",
    "connect": "CONNECT example.com:443 through the proxy was reset while control's succeeded",
    "nx": "the resolver said NXDOMAIN while control resolved it",
}


def _wa_plan(net: int, day: int) -> list[str]:
    if day == 0 or net == 2:
        return ["ok"] * 4
    if net == 0:
        return ["ok", "timeout", "timeout", "ok"]  # fails from +600 s to +3610 s, fine again at +7200 s
    return ["ok", "timeout", "timeout", "timeout"]  # fails from +600 s, never fine again


def plan(net: int, day: int) -> dict[str, str]:
    p = {
        TOR_OR: ["fingerprint", "timeout", "ok"][net],
        TOR_DIR: ["ok", "refused", "ok"][net],
        PROXY: ["connect", "ok", "ok"][net],
        PSIPHON: ["nx", "ok", "ok"][net],
        OPERA: ["ok", "timeout", "ok"][net],
    }
    p.update(zip(WA, _wa_plan(net, day), strict=True))
    return p


def _observations(url: str, label: str, t: float) -> list[Observation]:
    host = Target(url).host
    kind = Target(url).kind
    port = Target(url).port

    def o(step: str, **kw: Any) -> Observation:
        kw.setdefault("address", host if kind != "url" else "203.0.113.40")
        kw.setdefault("port", port)
        return Observation(step, url, host, t_start=t, t_end=t + 10, **kw)

    obs: list[Observation] = []
    if kind == "url":
        nx = label == "nx"
        data = {"resolver": "100.64.0.53:53", "transport": "udp", "qtype": "A",
                "rcode": "NXDOMAIN" if nx else "NOERROR", "addresses": [] if nx else ["203.0.113.40"]}
        obs.append(o("dns", address=None, port=None, failure="dns_nxdomain_error" if nx else None, data=data))
        obs.append(o("dns", address=None, port=None, vantage="control",
                     data={**data, "rcode": "NOERROR", "addresses": ["203.0.113.40"]}))
        if label != "nx":
            obs.append(o("http", data={"status": 200, "title": "Psiphon"}))
        return obs
    if label in ("timeout", "refused"):
        fail = "generic_timeout_error" if label == "timeout" else "connection_refused"
        obs.append(o("tcp", failure=fail))
        obs.append(o("tcp", failure=fail, attempt=1))
    else:
        obs.append(o("tcp"))
    obs.append(o("tcp", vantage="control"))
    if kind == "tor-or" and label in ("fingerprint", "ok"):
        obs.append(o("tls", failure="connection_reset" if label == "fingerprint" else None,
                     data={"sni": "www.q7vbrmz2.com", "hello": "tor"}))
        obs.append(o("tls", purpose="followup", data={"sni": "www.q7vbrmz2.com", "hello": "browser"}))
        obs.append(o("tls", vantage="control", data={"sni": "www.q7vbrmz2.com", "hello": "tor"}))
    if kind == "tor-dir" and label == "ok":
        obs.append(o("http", data={"kind": "tor-dir", "status": 200, "body_length": 65536, "truncated": True}))
    if kind == "proxy+http" and label in ("connect", "ok"):
        obs.append(o("http", failure="connection_reset" if label == "connect" else None,
                     data={"method": "CONNECT", "connect_to": "example.com:443", "status": 200}))
        obs.append(o("http", vantage="control", data={"method": "CONNECT", "connect_to": "example.com:443",
                                                      "status": 200}))
    return obs


def build(db: Path | str) -> dict[str, Any]:
    """Write the database; return per (target, network) the counts and the latest verdict's
    rule, detail and observation ids, from PLAN alone."""
    store = Store(db)
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        for day in range(2):
            for n, (name, asn, cc) in enumerate(NETS):
                start = T0 + day * DAY + n * 60
                rid = store.new_run(vantage={"network_name": name, "asn": asn, "country": cc}, started=start)
                p = plan(n, day)
                store.add_targets(rid, [Target(u, "COMT" if "whatsapp" in u else "ANON") for u in p])
                verdicts = []
                for i, (url, label) in enumerate(p.items()):
                    at = start + (WA_AT[WA.index(url)] if url in WA else 30 * i)
                    obs = _observations(url, label, at)
                    store.add_observations(rid, obs)
                    status, mech, detail, rule = LABEL[label]
                    ids = [x.id for x in obs if x.id is not None]
                    sentence = SENTENCE.get(label, "reachable, as for control")
                    verdicts.append(Verdict(url, Target(url).host, status, rule, sentence, mech, detail, 0.9, ids))
                    cell = cells.setdefault((url, name), {"total": 0, "blocked": 0})
                    cell["total"] += 1
                    cell["blocked"] += status == "blocked"
                    cell.update(status=status, detail=detail, rule=rule, observations=ids, sentence=sentence)
                store.set_verdicts(rid, verdicts)
                store.finish_run(rid)
    finally:
        store.close()
    return {"cells": cells}
