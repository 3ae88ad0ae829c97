"""Redirect chains in a capture: the flows that followed a redirect are hops of the target that
redirected, as the live probe records them (purpose REDIRECT, ``data["hop"]`` = k).

The live probe follows a redirect itself, hop by hop (:mod:`kzprobe.probes.chain`): a lookup of
the next name when it changes, then TCP, TLS and HTTP to it.  In a capture those steps are
flows and lookups of their own, named after the next hop's name: without this pass a chain that
breaks at hop 1 (a reset on www's SNI, an NXDOMAIN for www's name) is a separate, contrast-less
"target" while the target itself looks fetched (its 301).  A redirect is readable in the capture
when it came over plain HTTP, or over TLS with the capture's secrets (:mod:`.tlsdecrypt`).

What belongs to hop k: the probe's steps about the hop's name (its DNS lookups; its TCP, TLS and
HTTP flows on the hop URL's port) that started after the response that redirected there.  A list
that also names the next hop as a target of its own cannot be told apart from the chain here.
"""

from __future__ import annotations

from collections import defaultdict
from urllib.parse import urlsplit

from kzprobe.model import MEASURE, PEEK, PROBE, REDIRECT, STEP_DNS, STEP_HTTP, Observation
from kzprobe.replay.state import FileState

#: Hops followed, as the live probe (probes.chain.MAX_HOPS).
MAX_HOPS = 10


def link(st: FileState) -> None:
    """Re-attribute the flows that followed each target's redirect to that target's chain."""
    by_name: dict[str, list[Observation]] = defaultdict(list)  # the name a step was about -> steps
    starts: dict[str, Observation] = {}  # target -> its first redirect
    for o in st.out.observations:
        if o.vantage != PROBE or o.purpose not in (MEASURE, PEEK) or "hop" in o.data:
            continue
        by_name[o.domain or o.target].append(o)
        if o.step == STEP_HTTP and o.purpose == MEASURE and o.ok and o.data.get("redirect_to"):
            first = starts.get(o.target)
            if first is None or o.t_start < first.t_start:
                starts[o.target] = o
    taken: set[int] = set()
    for target, start in starts.items():
        _follow(by_name, target, start, taken)


def _follow(by_name: dict[str, list[Observation]], target: str, first: Observation, taken: set[int]) -> None:
    cur = first
    host = target
    seen = {str(first.data.get("url") or "")}
    for hop in range(1, MAX_HOPS + 1):
        url = cur.data.get("redirect_to")
        where = _where(url)
        if where is None or url in seen:
            return
        seen.add(str(url))
        nhost, port = where
        after = cur.t_end
        steps = [o for o in by_name.get(nhost, ()) if id(o) not in taken and o.t_start >= after
                 and o.target in (nhost, target)
                 and ((o.step == STEP_DNS and nhost != host) or (o.step != STEP_DNS and o.port == port))]
        if not steps:
            return
        for o in steps:
            taken.add(id(o))
            o.target = target
            if o.purpose == MEASURE:
                o.purpose = REDIRECT
            o.data["hop"] = hop
        host = nhost
        nxt = [o for o in steps if o.step == STEP_HTTP and o.purpose == REDIRECT and o.ok and o.data.get("redirect_to")]
        if not nxt:
            return
        cur = min(nxt, key=lambda o: o.t_start)


def _where(url: object) -> tuple[str, int] | None:
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    host = (parts.hostname or "").rstrip(".").lower()
    if parts.scheme not in ("http", "https") or not host:
        return None
    return host, port
