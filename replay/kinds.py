"""Target kinds beyond URLs in a capture: which flows and lookups measured ``tor-or://``,
``tor-dir://``, ``obfs4://``, ``tcp://``, ``udp-dns://`` and ``proxy+http://`` targets.

A URL target names itself on the wire (SNI, Host); a kind target does not: a ``tcp://`` target's
whole measurement is a connect, a Tor relay's handshake carries a random SNI, a ``udp-dns://``
target is lookups only.  Replay therefore has to be told the targets (``kzprobe replay --targets
/ --list``, or the lab's expected.json), and it also learns them from the capture itself: the
probe asks its control helper for every target by URL (replay/control.py).

Flows are mapped to kind targets by address and port (the address DNS gave the name, in the
capture, for ``tcp://NAME:PORT`` and ``proxy+http://NAME:PORT``); lookups by name.  The
observations get the target's URL, its host as domain, and the steps and data keys the live
probes emit (CONTRACTS.md "Observations of the new kinds"), so the one classifier judges them:

* ``tcp`` / ``obfs4``: connects that carried no data (the probe opens and closes);
* ``tor-or``: every flow to the OR port; a ClientHello other than the Tor-like one is the hello
  follow-up (purpose FOLLOWUP), as the live probe sends it;
* ``tor-dir``: every flow to the directory port; the HTTP step gets ``kind = "tor-dir"``;
* ``proxy+http``: every flow to the proxy (TCP, the CONNECT, the TLS through the tunnel);
* ``udp-dns``: the UDP lookups of the name; ``tcp://NAME`` / ``proxy+http://NAME`` get every
  lookup of their name too (the live engine resolves their host first).  A lookup of a name two
  targets share is evidence for both, so each gets it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from kzprobe.analysis.bogons import is_ip
from kzprobe.model import FOLLOWUP, KINDS, MEASURE, PROBE, STEP_DNS, STEP_HTTP, STEP_TCP, STEP_TLS, Observation, Target
from kzprobe.replay.state import FileState

TOR_OR, TOR_DIR, OBFS4, TCP, UDP_DNS, PROXY_HTTP = "tor-or", "tor-dir", "obfs4", "tcp", "udp-dns", "proxy+http"
#: Kinds whose measurement is a connect that sends nothing.
CONNECT_ONLY = (TCP, OBFS4)
CONSENSUS_PATH = "/tor/status-vote/current/consensus"
#: Kind targets one flow or lookup is given to at most.  A real run has one or two (tcp://NAME:443
#: and udp-dns://NAME); a capture's helper requests and DNS answers are chosen by whoever made it,
#: and must not multiply every flow by thousands of names on one address.
MAX_SHARED = 8


def is_kind(url: str) -> bool:
    return "://" in url and Target(url).kind in KINDS


def kind_targets(targets: Iterable[Target | str]) -> list[Target]:
    """The kind targets among ``targets`` (URL targets name themselves and are left alone)."""
    out: dict[str, Target] = {}
    for t in targets:
        t = t if isinstance(t, Target) else Target(t)
        try:
            usable = t.kind in KINDS and bool(t.host) and 0 < t.port
        except ValueError:  # a URL from the capture (a helper request) whose port or host does not parse
            usable = False
        if usable:
            out.setdefault(t.url, t)
    return list(out.values())


def _endpoints(st: FileState, targets: list[Target]) -> dict[tuple[str, int], list[Target]]:
    """(address, port) -> the kind targets measured there: IP hosts as written, names by the
    addresses the capture's DNS answers gave them."""
    by_name: dict[str, set[str]] = defaultdict(set)
    for addr, names in st.dns_names.items():
        for n in names:
            by_name[n.lower().rstrip(".")].add(addr)
    out: dict[tuple[str, int], list[Target]] = defaultdict(list)
    for t in targets:
        if t.kind == UDP_DNS:
            continue
        addrs = {t.host} if is_ip(t.host) else by_name.get(t.host, set())
        for a in addrs:
            here = out[(a, t.port)]
            if len(here) < MAX_SHARED * 2:  # (tcp/obfs4 take only connects: room for both sorts)
                here.append(t)
    return out


def _claims(t: Target, obs: Observation) -> bool:
    """Is this flow's observation part of how the live probe measures ``t``?"""
    if t.kind in CONNECT_ONLY:
        # The probe opens and closes: a flow that carried a ClientHello or a request to the same
        # address and port is another target's (an https:// URL on the endpoint's port).
        return obs.step == STEP_TCP and not str(obs.data.get("stopped", "")).startswith("after trigger")
    return obs.step in (STEP_TCP, STEP_TLS, STEP_HTTP)


def _shape(t: Target, obs: Observation) -> None:
    """The target's URL and host, and the data keys the live probe of its kind records."""
    obs.target, obs.domain = t.url, t.host
    if t.kind == TOR_OR and obs.step in (STEP_TCP, STEP_TLS) and obs.data.get("hello") not in (None, "tor"):
        obs.purpose = FOLLOWUP  # the browser-like hello to the same port: probes/engine.py's follow-up
    elif t.kind == TOR_DIR and obs.step == STEP_HTTP and obs.data.get("method") != "CONNECT":
        obs.data["kind"] = TOR_DIR
        host = f"[{obs.address}]" if ":" in str(obs.address) else obs.address
        if str(obs.data.get("url", "")).endswith(CONSENSUS_PATH):
            obs.data["url"] = f"http://{host}:{obs.port}{CONSENSUS_PATH}"
    elif t.kind == PROXY_HTTP and obs.step == STEP_HTTP and obs.data.get("method") == "CONNECT":
        obs.data["url"] = t.url


def claim_flows(st: FileState, targets: list[Target]) -> set[int]:
    """Give the flows' pending observations to the kind targets measured at their address and
    port; returns the ids (``id()``) of the observations claimed (named: naming leaves them be)."""
    if not targets:
        return set()
    eps = _endpoints(st, targets)
    claimed: set[int] = set()
    extra: list[tuple[Observation, bool]] = []
    for obs, _unnamed in st.pending:
        if obs.vantage != PROBE or obs.address is None or obs.port is None:
            continue
        mine = [t for t in eps.get((obs.address, obs.port), []) if _claims(t, obs)][:MAX_SHARED]
        for i, t in enumerate(mine):
            o = obs if i == 0 else _copy(obs)
            _shape(t, o)
            claimed.add(id(o))
            if i:
                extra.append((o, False))
    st.pending.extend(extra)
    return claimed


def _copy(obs: Observation) -> Observation:
    return Observation(step=obs.step, target=obs.target, domain=obs.domain, source=obs.source, address=obs.address,
                       port=obs.port, t_start=obs.t_start, t_end=obs.t_end, failure=obs.failure,
                       purpose=obs.purpose, vantage=obs.vantage, data=dict(obs.data), packets=list(obs.packets))


def claim_lookups(st: FileState, targets: list[Target]) -> None:
    """The probe's lookups of a kind target's name become that target's DNS steps (a copy for
    each target beyond the first that resolves the name).  A lookup no kind target takes keeps
    its name as target, as before."""
    by_name: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        if t.kind == UDP_DNS or (t.kind in (TCP, PROXY_HTTP) and not is_ip(t.host)):
            by_name[t.host].append(t)
    if not by_name:
        return
    attempts: Counter[tuple[str, str]] = Counter()
    # Names a URL target was measured under (its flows are named by SNI / Host) keep their lookups.
    measured = {o.target for o in st.out.observations if o.step != STEP_DNS and o.vantage == PROBE}
    for obs in list(st.out.observations):
        if obs.step != STEP_DNS or obs.vantage != PROBE or obs.purpose != MEASURE:
            continue
        mine = [t for t in by_name.get(obs.domain.lower().rstrip("."), [])
                if t.kind != UDP_DNS or obs.data.get("transport", "udp") == "udp"][:MAX_SHARED]  # udp-dns: UDP only
        keep = obs.target in measured
        for i, t in enumerate(mine):
            o = _copy(obs) if i or keep else obs
            o.target, o.domain = t.url, t.host
            o.attempt = attempts[(t.url, STEP_DNS)]
            attempts[(t.url, STEP_DNS)] += 1
            if i or keep:
                st.emit(o)


def targets_of_expected(path: str) -> list[Target] | None:
    """The targets a lab recording's ``NAME.expected.json`` lists (``kzprobe lab record`` writes
    it beside the capture), or None when the file is not one."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    rows = doc.get("targets") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        return None
    return [Target(r["target"]) for r in rows if isinstance(r, dict) and isinstance(r.get("target"), str)]


def helper_targets(st: FileState) -> list[Target]:
    """The kind targets the probe asked its control helper about (named in the capture)."""
    return [Target(u) for u in st.helper_kind_urls]


__all__ = ["claim_flows", "claim_lookups", "helper_targets", "is_kind", "kind_targets", "targets_of_expected"]
