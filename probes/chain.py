"""Redirect chains: each hop measured step by step, as the target itself is.

A page that redirects (http -> https, apex -> www, a CDN, a login wall) is only reachable if
every hop is.  Following redirects inside one HTTP request would hide *which* step of *which*
hop broke, so the engine follows the chain itself: hop k >= 1 gets its own DNS (only when the
name changes, with the engine's own resolvers), TCP, TLS (https) and HTTP observations, with
purpose REDIRECT and ``data["hop"] = k``.  A failure ends the chain where it happened, recorded
with its step and failure string; a failure a censor would cause is measured once more first (the
sandwich retry), because one timeout is not evidence.

The address of a hop is what the first configured resolver answered (system first, then the
``--resolver`` list in order): the view a user of this network gets.  Control (the helper) runs
this very code, so both vantages record their chains the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio

from kzprobe import errors as E
from kzprobe.analysis.bogons import is_ip
from kzprobe.analysis.facts import INTERFERENCE
from kzprobe.model import PEEK, REDIRECT, STEP_DNS, STEP_HTTP, Observation, Target
from kzprobe.probes import tcp as tcpprobe
from kzprobe.probes import tls as tlsprobe

if TYPE_CHECKING:
    from kzprobe.probes.engine import Engine

#: Hops followed after the target URL (browsers allow ~20; OONI's Web Connectivity 10).
MAX_HOPS = 10


def _mark(o: Observation, hop: int, purpose: str = REDIRECT) -> Observation:
    o.purpose = purpose
    o.data["hop"] = hop
    return o


def _hop_url(url: object) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a URL the chain can follow, else None."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
        port = parts.port or (443 if parts.scheme == "https" else 80)  # raises on a bad port
        host.encode("idna")
    except (ValueError, UnicodeError):
        return None
    if parts.scheme not in ("http", "https") or not host or not 0 < port < 65536:
        return None
    return parts.scheme, host, port


async def resolve(engine: Engine, target: Target, url: str, host: str, hop: int, purpose: str = REDIRECT
                  ) -> str | None:
    """Look ``host`` up at every resolver of the run (recorded); the first resolver's first address."""
    if is_ip(host):
        return host
    lookups = engine._lookups(Target(url))
    answers: list[Observation | None] = [None] * len(lookups)

    async def one(i: int, coro: Awaitable[Observation]) -> None:
        o = await coro
        o.target, o.domain = target.url, host
        answers[i] = await engine._emit(_mark(o, hop, purpose))

    async with trio.open_nursery() as n:
        for i, coro in enumerate(lookups):
            n.start_soon(one, i, coro)
    for o in answers:
        if o is not None and o.step == STEP_DNS:
            addrs = sorted((str(a) for a in o.data.get("addresses") or []), key=lambda a: ":" in a)
            if addrs:
                return addrs[0]
    return None


async def _once(engine: Engine, target: Target, url: str, scheme: str, host: str, address: str, port: int,
                hop: int, attempt: int) -> Observation:
    """TCP, TLS (https) and HTTP of one hop; returns the last observation made."""
    cfg = engine.config
    tcp, stream = await tcpprobe.connect(target.url, host, address, port, cfg.timeout, attempt=attempt,
                                         source=cfg.source_address)
    await engine._emit(_mark(tcp, hop))
    if stream is None:
        return tcp
    if scheme == "https":
        tls = await tlsprobe.handshake(stream, target.url, host, address, port, host, cfg.timeout, engine.trust,
                                       attempt=attempt)
        await engine._emit(_mark(tls, hop))
        if tls.failure:
            return tls
    else:
        await trio.aclose_forcefully(stream)
    return await engine._fetch(target, url, address, host=host, purpose=REDIRECT, attempt=attempt, hop=hop)


async def follow(engine: Engine, target: Target, first: Observation, *, followups: bool) -> None:
    """Follow ``first``'s redirect (an HTTP observation of the target URL) hop by hop."""
    url = first.data.get("redirect_to")
    seen = {str(first.data.get("url"))}
    host, address = target.host, first.address or ""
    for hop in range(1, MAX_HOPS + 1):
        where = _hop_url(url)
        if where is None or url in seen:
            return  # nothing followable, or a loop: the chain ends at the last response
        assert isinstance(url, str)
        seen.add(url)
        scheme, nhost, port = where
        if nhost != host or not address:
            found = await resolve(engine, target, url, nhost, hop)
            if found is None:
                return  # the DNS step says why
            host, address = nhost, found
        if engine.endpoint_refusal(address, port):
            return  # the helper's policy: never connect where it may not
        last = await _once(engine, target, url, scheme, host, address, port, hop, 0)
        for i in range(engine.config.retries if followups else 0):
            if last.ok or last.failure not in INTERFERENCE:
                break
            last = await _once(engine, target, url, scheme, host, address, port, hop, i + 1)
        if last.step == STEP_HTTP and last.failure in CERT_FAILURES and followups:
            # What is served behind the bad certificate (a blockpage?), as at hop 0.
            await peek(engine, target, url, host, address, hop)
        if not last.ok or last.step != STEP_HTTP:
            return
        url = last.data.get("redirect_to")


#: Certificate validation failures: the GET is made again without validation (a PEEK).
CERT_FAILURES = frozenset({E.SSL_INVALID_HOSTNAME, E.SSL_UNKNOWN_AUTHORITY, E.SSL_INVALID_CERTIFICATE})


async def peek(engine: Engine, target: Target, url: str, host: str, address: str, hop: int) -> None:
    """GET ``url`` from ``address`` without validating the certificate, and follow its redirects
    the same way (purpose PEEK throughout, ``data["hop"]`` counting on from ``hop``).

    An ISP's blockpage is often a redirect to the blockpage host, served behind a certificate
    that is not the site's: a peek that stopped at the 302 would miss the page itself.  Each hop
    is one unvalidated GET (its DNS recorded when the name changes); nothing here counts as the
    site being reachable.
    """
    seen: set[str] = set()
    for k in range(hop, MAX_HOPS + 1):
        seen.add(url)
        o = await engine._fetch(target, url, address, host=host if k else None, purpose=PEEK,
                                hop=k or None)
        nxt = o.data.get("redirect_to")
        where = _hop_url(nxt)
        if not o.ok or where is None or nxt in seen or k == MAX_HOPS:
            return
        assert isinstance(nxt, str)
        _scheme, nhost, port = where
        if nhost != host:
            found = await resolve(engine, target, nxt, nhost, k + 1, PEEK)
            if found is None:
                return
            address = found
        if engine.endpoint_refusal(address, port):
            return
        url, host = nxt, nhost
