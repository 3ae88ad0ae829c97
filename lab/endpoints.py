"""Scenario entries beyond web sites: ``[[endpoint]]`` (Tor relays and directories, bridges,
proxies, messaging endpoints) and ``[[outage]]`` (a blocking rule that holds only for a window of
the run).  Parsed here, next to lab/scenario.py, so that web sites keep their own simple format.

An endpoint is one target of a new kind (``tor-or://``, ``tor-dir://``, ``obfs4://``, ``tcp://``,
``udp-dns://``, ``proxy+http://``, see CONTRACTS/issue 15), the server the world runs for it, and
how the censor treats it.  Expected verdicts come from the scenario, as for sites.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kzprobe.lab.scenario import EXPECTATIONS, ROUTERS, SITE_NET, ScenarioError

#: scheme -> the server the world runs for it by default.
SCHEMES: dict[str, str] = {
    "tor-or": "tor-or",         # openssl s_server with a Tor-like link certificate
    "tor-dir": "tor-dir",       # nginx serving a consensus at /tor/status-vote/current/consensus
    "obfs4": "tcp",             # a bridge's port: TCP reachability only
    "tcp": "tcp",               # a messaging endpoint: a TCP listener
    "udp-dns": "none",          # DNS only: the name is in the lab's DNS, nothing listens
    "proxy+http": "http-proxy",  # tinyproxy, an HTTP CONNECT proxy
}
SERVERS = ("tor-or", "tor-dir", "http-proxy", "tcp", "none")

#: Methods an endpoint may name -> (hops where it can run, default hop).
#: ``tls-fingerprint``: iptables string match on the Tor-like ClientHello's cipher list
#: (kzprobe.probes.hellos.DPI_SIGNATURE); ``ip-drop``/``ip-reject``: nftables by address;
#: ``dns-nxdomain``: the ISP resolver's override for the endpoint's name.
METHODS: dict[str, tuple[tuple[str, ...], str]] = {
    "tls-fingerprint": (ROUTERS, "bb2"),
    "ip-drop": (ROUTERS, "bb1"),
    "ip-reject": (ROUTERS, "bb1"),
    "dns-nxdomain": (("isp",), "isp"),
}
#: Methods an outage may apply for its window.
OUTAGE_METHODS = ("ip-drop", "ip-reject")

#: What the lab's DNS answers for example.com, the probe's benign name (lab/services.py's
#: DEFAULT_ADDRESS; services imports this module's users, so the value is repeated, and
#: tests/test_lab_circumvention.py checks they agree).  A scenario with a CONNECT proxy serves
#: example.com there: the proxy's tunnel has to reach something.
BENIGN_ADDRESS = "203.0.113.254"

_KEYS = {"target", "label", "address", "server", "method", "methods", "hop", "expect", "detail", "reason",
         "quote", "category"}
_OUTAGE_KEYS = {"name", "date", "targets", "measure", "method", "hop", "expect", "detail", "hold", "reason",
                "quote"}
_DETAIL = re.compile(r"^[a-z]+(\.[a-z0-9_]+)+$")
_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    target: str
    scheme: str
    #: The host as written: an IPv4 address or a name (then ``address`` is what the lab DNS answers).
    host: str
    #: None for udp-dns (a name, no port).
    port: int | None
    address: str
    server: str
    methods: tuple[str, ...]
    hop: str
    expect: str
    reason: str
    detail: str = ""
    quote: str = ""
    label: str = ""
    category: str = ""

    @property
    def name(self) -> str:
        """The DNS name of the endpoint ("" when the target is an address)."""
        return "" if self.host == self.address else self.host

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "label": self.label, "address": self.address, "port": self.port,
                "server": self.server, "methods": list(self.methods), "hop": self.hop, "expect": self.expect,
                "reason": self.reason} | ({"detail": self.detail} if self.detail else {})


@dataclass(frozen=True, slots=True)
class Outage:
    """A rule that holds only for a window of the run (e.g. 13 February 2014 in Almaty).

    ``lab run`` measures ``measure`` before the window (the main run), inside it (the rule in
    place) and after it (the rule removed); inside, the ``targets`` must come out as ``expect``
    and every other measured endpoint as its own expectation."""

    name: str
    targets: tuple[str, ...]
    measure: tuple[str, ...]
    method: str
    hop: str
    expect: str
    reason: str
    detail: str = ""
    date: str = ""
    quote: str = ""
    #: Seconds the rule stays in place at least (the window is never shorter, however fast the
    #: measurement inside it).
    hold: float = 0.0


def parse_endpoints(entries: object, path: Path, site_addresses: set[str]) -> tuple[Endpoint, ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ScenarioError(f"{path}: [[endpoint]] must be an array of tables")
    out: list[Endpoint] = []
    seen: dict[str, str] = {}       # target -> where
    by_name: dict[str, str] = {}    # DNS name -> address
    listeners: dict[tuple[str, int], str] = {}
    for i, e in enumerate(entries, 1):
        where = f"{path}: [[endpoint]] #{i}"
        if not isinstance(e, dict):
            raise ScenarioError(f"{where}: must be a table")
        ep = _parse_endpoint(e, where)
        where = f"{where} ({ep.target})"
        if ep.target in seen:
            raise ScenarioError(f"{where}: target appears twice")
        seen[ep.target] = where
        if ep.address in site_addresses:
            raise ScenarioError(f"{where}: address {ep.address} is a [[site]]'s (its web server listens there)")
        if ep.name:
            if by_name.setdefault(ep.name, ep.address) != ep.address:
                raise ScenarioError(f"{where}: {ep.name} is given two addresses ({by_name[ep.name]}, {ep.address})")
        if ep.port is not None and ep.server != "none":
            key = (ep.address, ep.port)
            if key in listeners:
                raise ScenarioError(f"{where}: {ep.address}:{ep.port} already served for {listeners[key]}")
            listeners[key] = ep.target
        out.append(ep)
    # Address-level methods act on every port of the address: all endpoints there must agree.
    ip_methods = {"ip-drop", "ip-reject"}
    for a in out:
        for b in out:
            if a.address == b.address and ip_methods & set(a.methods) != ip_methods & set(b.methods):
                raise ScenarioError(f"{path}: {a.target} and {b.target} share {a.address} but not its ip-* method")
    return tuple(out)


def _parse_endpoint(e: dict[str, Any], where: str) -> Endpoint:
    target = e.get("target")
    if not isinstance(target, str):
        raise ScenarioError(f"{where}: 'target' is required (e.g. tor-or://203.0.113.101:9001)")
    where = f"{where} ({target})"
    unknown = set(e) - _KEYS
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    parts = urlsplit(target)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise ScenarioError(f"{where}: scheme must be one of {', '.join(SCHEMES)}")
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        raise ScenarioError(f"{where}: bad port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ScenarioError(f"{where}: only SCHEME://HOST:PORT (udp-dns://NAME) is allowed")
    if scheme == "udp-dns":
        if port is not None:
            raise ScenarioError(f"{where}: udp-dns takes a name and no port")
    elif port is None:
        raise ScenarioError(f"{where}: a port is required")
    is_ip = _is_ip(host)
    if not is_ip and not _NAME.match(host):
        raise ScenarioError(f"{where}: {host!r} is neither an IPv4 address nor a host name")
    if scheme == "udp-dns" and is_ip:
        raise ScenarioError(f"{where}: udp-dns needs a name")
    if scheme in ("tor-or", "tor-dir", "obfs4") and not is_ip:
        raise ScenarioError(f"{where}: {scheme} targets are addresses (IP:PORT)")
    address = str(e.get("address", host if is_ip else ""))
    if is_ip and address != host:
        raise ScenarioError(f"{where}: 'address' must be the target's own address {host}")
    _check_address(address, where)
    server = str(e.get("server", SCHEMES[scheme]))
    if server not in SERVERS:
        raise ScenarioError(f"{where}: 'server' must be one of {', '.join(SERVERS)}")
    if scheme == "udp-dns" and server != "none":
        raise ScenarioError(f"{where}: udp-dns endpoints have no server (add a tcp:// endpoint for the listener)")
    raw = e.get("methods", e.get("method", []))
    methods = (raw,) if isinstance(raw, str) else tuple(raw) if isinstance(raw, list) else None
    if methods is None or any(not isinstance(m, str) for m in methods):
        raise ScenarioError(f"{where}: 'methods' must be a list of method names")
    methods = tuple(m for m in methods if m != "none")
    hop = str(e.get("hop", ""))
    for m in methods:
        if m not in METHODS:
            raise ScenarioError(f"{where}: unknown method {m!r} (known: {', '.join(METHODS)})")
        allowed, default = METHODS[m]
        hop = hop or default
        if hop not in allowed:
            raise ScenarioError(f"{where}: method {m!r} cannot run at hop {hop!r} (allowed: {allowed})")
    if "tls-fingerprint" in methods and scheme != "tor-or":
        raise ScenarioError(f"{where}: tls-fingerprint applies to tor-or targets")
    if "dns-nxdomain" in methods and is_ip:
        raise ScenarioError(f"{where}: dns-nxdomain needs a target given by name")
    expect, detail, reason = _expectation(e, where, "dpi.tls_fingerprint", " (say why, in the source's words)")
    return Endpoint(
        target=target, scheme=scheme, host=host, port=port, address=address, server=server, methods=methods,
        hop=hop, expect=expect, reason=reason, detail=detail, quote=str(e.get("quote", "")).strip(),
        label=str(e.get("label", "")), category=str(e.get("category", "")),
    )


def _expectation(e: dict[str, Any], where: str, detail_example: str, reason_hint: str = ""
                 ) -> tuple[str, str, str]:
    """An entry's ``expect``, ``detail`` and ``reason`` (stripped), each checked: what [[endpoint]]
    and [[outage]] tables both say about the verdict they expect."""
    expect = e.get("expect")
    if expect not in EXPECTATIONS:
        raise ScenarioError(f"{where}: 'expect' must be one of {', '.join(EXPECTATIONS)}, got {expect!r}")
    detail = e.get("detail", "")
    if not isinstance(detail, str) or (detail and not _DETAIL.match(detail)):
        raise ScenarioError(f"{where}: 'detail' must be a verdict detail such as {detail_example!r}")
    reason = e.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ScenarioError(f"{where}: 'reason' is required{reason_hint}")
    return str(expect), detail, reason.strip()


def parse_outages(entries: object, path: Path, endpoints: tuple[Endpoint, ...]) -> tuple[Outage, ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ScenarioError(f"{path}: [[outage]] must be an array of tables")
    known = {ep.target: ep for ep in endpoints}
    out = []
    for i, e in enumerate(entries, 1):
        where = f"{path}: [[outage]] #{i}"
        if not isinstance(e, dict):
            raise ScenarioError(f"{where}: must be a table")
        unknown = set(e) - _OUTAGE_KEYS
        if unknown:
            raise ScenarioError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        name = str(e.get("name", f"outage-{i}"))
        where = f"{where} ({name})"
        targets = e.get("targets")
        if not isinstance(targets, list) or not targets or any(t not in known for t in targets):
            raise ScenarioError(f"{where}: 'targets' must list [[endpoint]] targets of this scenario")
        measure = e.get("measure", targets)
        if not isinstance(measure, list) or any(t not in known for t in measure):
            raise ScenarioError(f"{where}: 'measure' must list [[endpoint]] targets of this scenario")
        if not set(targets) <= set(measure):
            raise ScenarioError(f"{where}: every outage target must be measured in the window too")
        method = e.get("method", "ip-drop")
        if method not in OUTAGE_METHODS:
            raise ScenarioError(f"{where}: 'method' must be one of {', '.join(OUTAGE_METHODS)}")
        allowed, default = METHODS[method]
        hop = str(e.get("hop", default))
        if hop not in allowed:
            raise ScenarioError(f"{where}: method {method!r} cannot run at hop {hop!r} (allowed: {allowed})")
        for t in targets:
            if known[t].scheme == "udp-dns":
                raise ScenarioError(f"{where}: {t}: an address drop cannot act on a DNS-only target")
        expect, detail, reason = _expectation(e, where, "ip.tcp_timeout")
        try:
            hold = float(e.get("hold", 0.0))
        except (TypeError, ValueError):
            raise ScenarioError(f"{where}: 'hold' must be a number of seconds") from None
        if not 0 <= hold <= 600:
            raise ScenarioError(f"{where}: 'hold' must be 0-600 seconds")
        out.append(Outage(name=name, targets=tuple(targets), measure=tuple(measure), method=str(method), hop=hop,
                          expect=expect, reason=reason, detail=detail, date=str(e.get("date", "")),
                          quote=str(e.get("quote", "")).strip(), hold=hold))
    return tuple(out)


def world_addresses(endpoints: tuple[Endpoint, ...]) -> list[str]:
    """Addresses the world holds for endpoints (on its loopback, as for sites)."""
    out = list(dict.fromkeys(e.address for e in endpoints))
    if any(e.server == "http-proxy" for e in endpoints):
        out.append(BENIGN_ADDRESS)
    return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _check_address(address: str, where: str) -> None:
    if not _is_ip(address):
        raise ScenarioError(f"{where}: 'address' must be an IPv4 address (what the lab DNS answers for the name)")
    # .254 is example.com's (the benign name's) address in the lab's DNS.
    if ipaddress.IPv4Address(address) not in SITE_NET or address in ("203.0.113.0", "203.0.113.254", "203.0.113.255"):
        raise ScenarioError(f"{where}: address {address} must be inside {SITE_NET} (not .0, .254, .255)")
