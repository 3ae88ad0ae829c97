"""The measurement engine: step by step per target, many targets at once (trio).

For one target: DNS at every resolver (system, and each explicit one over UDP and TCP), then
for each resolved address: TCP, TLS with SNI = domain (https) and an HTTP GET pinned to that
address.  Each step yields its own observation, handed to ``sink`` as soon as it completes.

When a step fails in a way a censor would cause (reset, timeout, EOF), the engine makes the
follow-ups the classifier needs to tell *how* it is blocked, in Censored Planet's "sandwich"
order: the same address with a benign SNI / Host (``control_sni``), then the target again.
A failed handshake also gets the same address and SNI with another ClientHello
(:mod:`kzprobe.probes.hellos`: browser-like against the default or the Tor-like one), which tells
TLS-fingerprint DPI from a block on the name or the address.
Follow-ups cost nothing on the happy path, which is what keeps a thousand-target run fast.
"""

from __future__ import annotations

import contextvars
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

from kzprobe.analysis.bogons import is_ip
from kzprobe.analysis.facts import DNSCHECK, INTERFERENCE
from kzprobe.analysis.fingerprints import Fingerprints
from kzprobe.model import FOLLOWUP, MEASURE, PROBE, Observation, Target
from kzprobe.probes import chain, hellos, kinds
from kzprobe.probes import dns as dnsprobe
from kzprobe.probes import http as httpprobe
from kzprobe.probes import tcp as tcpprobe
from kzprobe.probes import tls as tlsprobe
from kzprobe.probes.certs import TrustStore

Sink = Callable[[Observation], Awaitable[None]]

#: The redirect Locations already followed in the current Engine.measure call (see Engine._follow).
_followed: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("kzprobe_followed", default=None)

#: A Tor relay's OR port (issue 15): measured by Engine._tor_or.
TOR_OR = "tor-or"



@dataclass
class ProbeConfig:
    resolvers: list[str] = field(default_factory=list)
    system_resolver: bool = True
    dns_tcp: bool = True
    ca_bundles: list[str] = field(default_factory=list)
    timeout: float = 5.0
    concurrency: int = 64
    control_sni: str = "example.com"
    dns_window: float = 0.3
    max_addresses: int = 4
    #: Re-measure a failed step once more after the follow-up (the sandwich).
    retries: int = 1
    dnscheck: bool = True
    fingerprints: list[str] = field(default_factory=list)
    #: Source address for TCP connects (None: the kernel's choice).
    source_address: str | None = None




class Engine:
    """Holds everything set up once per run (TLS contexts, httpx clients, fingerprints)."""

    def __init__(self, config: ProbeConfig, sink: Sink, *, vantage: str = PROBE) -> None:
        self.config = config
        self.sink = sink
        self.vantage = vantage
        self.trust = TrustStore(list(config.ca_bundles))
        self.fingerprints = Fingerprints.default(config.fingerprints)
        self._verify_ctx: ssl.SSLContext = self.trust.ssl_context()
        self.clients: httpprobe.Clients | None = None

    async def __aenter__(self) -> Engine:
        self.clients = httpprobe.Clients(self._verify_ctx, self.config.timeout, self.config.source_address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.clients is not None:
            with trio.CancelScope(shield=True):
                await self.clients.aclose()

    async def _emit(self, obs: Observation) -> Observation:
        obs.vantage = self.vantage
        await self.sink(obs)
        return obs

    # --- DNS ---------------------------------------------------------------------------------
    def _lookups(self, target: Target) -> list[Awaitable[Observation]]:
        cfg, domain = self.config, target.host
        out: list[Awaitable[Observation]] = []
        if cfg.system_resolver:
            out.append(dnsprobe.lookup_system(target.url, domain, cfg.timeout))
        for r in cfg.resolvers:
            out.append(dnsprobe.lookup(target.url, domain, r, "udp", cfg.timeout, cfg.dns_window))
            if cfg.dns_tcp and target.scheme != kinds.UDP_DNS:
                out.append(dnsprobe.lookup(target.url, domain, r, "tcp", cfg.timeout))
        return out

    async def quick_resolve(self, host: str) -> str | None:
        """For redirects to another host: the first address any configured resolver gives."""
        cfg = self.config
        if cfg.resolvers:
            obs = await dnsprobe.lookup(host, host, cfg.resolvers[0], "udp", cfg.timeout, 0)
        elif cfg.system_resolver:
            obs = await dnsprobe.lookup_system(host, host, cfg.timeout)
        else:
            return None
        addrs = obs.data.get("addresses") or []
        return str(addrs[0]) if addrs else None

    # --- per address ---------------------------------------------------------------------------
    async def _tls(self, target: Target, address: str, sni: str, purpose: str, attempt: int) -> Observation | None:
        cfg = self.config
        tcp, stream = await tcpprobe.connect(target.url, target.host, address, target.port if purpose != DNSCHECK
                                             else 443, cfg.timeout, purpose=purpose, attempt=attempt,
                                             source=cfg.source_address)
        # Follow-up and check connects are recorded too, under their purpose, for the evidence trail.
        await self._emit(tcp)
        if stream is None:
            return None
        obs = await tlsprobe.handshake(stream, target.url, target.host, address, tcp.port or 443, sni, cfg.timeout,
                                       self.trust, purpose=purpose, attempt=attempt)
        return await self._emit(obs)

    async def _http(self, target: Target, address: str, host: str | None, purpose: str, attempt: int
                    ) -> Observation:
        """The target URL from ``address`` (Host and SNI = ``host``, default the target's name)."""
        return await self._fetch(target, target.url, address, host=host, purpose=purpose, attempt=attempt)

    async def _fetch(self, target: Target, url: str, address: str, *, host: str | None = None,
                     sni: str | None = None, purpose: str = MEASURE, attempt: int = 0,
                     hop: int | None = None) -> Observation:
        """Any URL of the target's measurement (a redirect hop, a throttling follow-up) from ``address``."""
        assert self.clients is not None
        domain = (urlsplit(url).hostname or target.host) if hop else target.host
        obs = await httpprobe.fetch(self.clients, target.url, domain, url, address, self.config.timeout,
                                    self.fingerprints, host=host, sni=sni, purpose=purpose, attempt=attempt,
                                    hop=hop)
        return await self._emit(obs)

    def endpoint_refusal(self, address: str, port: int) -> str | None:
        """Why a redirect hop may not connect to ``address:port`` (None: it may).

        The probe follows wherever a page sends it, as a browser does; the helper overrides this
        with its policy, so a redirect cannot make it connect where a request may not.
        """
        return None

    async def _throttle_followup(self, target: Target, address: str) -> Observation:
        """The same URL from the same address with a benign SNI (https) or Host (http).

        Over https the Host stays the target's: only the SNI, which is all an on-path box sees,
        changes, so the same page comes back and the two rates compare like with like.
        """
        benign = self.config.control_sni
        if target.scheme == "https":
            return await self._fetch(target, target.url, address, host=target.host, sni=benign, purpose=FOLLOWUP)
        return await self._fetch(target, target.url, address, host=benign, purpose=FOLLOWUP)

    async def measure_address(self, target: Target, address: str, *, followups: bool = True) -> None:
        if kinds.handles(target.scheme):  # tor-dir, obfs4, tcp, udp-dns, proxy+http: probes/kinds.py
            await kinds.measure(self, target, address, followups=followups)
            return
        if target.scheme == TOR_OR:
            await self._tor_or(target, address, followups)
            return
        cfg = self.config
        https = target.scheme == "https"
        if https:
            tls = await self._tls(target, address, target.host, MEASURE, 0)
            if tls is None:
                await self._tcp_again(target, address, followups)
                return
            if tls.failure:
                if followups and tls.failure in INTERFERENCE:
                    await self._tls(target, address, cfg.control_sni, FOLLOWUP, 0)
                    await self._hello_followup(target, address, target.host, hellos.DEFAULT)
                    for i in range(cfg.retries):
                        again = await self._tls(target, address, target.host, MEASURE, i + 1)
                        if again is not None and again.ok:
                            tls = again
                            break
                if tls.failure:
                    return
        else:
            tcp, stream = await tcpprobe.connect(target.url, target.host, address, target.port, cfg.timeout,
                                                 source=cfg.source_address)
            await self._emit(tcp)
            if stream is None:
                for i in range(cfg.retries if followups else 0):
                    tcp, stream = await tcpprobe.connect(target.url, target.host, address, target.port, cfg.timeout,
                                                         attempt=i + 1, source=cfg.source_address)
                    await self._emit(tcp)
                    if stream is not None:
                        break
                if stream is None:
                    return
            await trio.aclose_forcefully(stream)
        http = await self._http(target, address, None, MEASURE, 0)
        if followups and http.failure in chain.CERT_FAILURES:
            await chain.peek(self, target, target.url, target.host, address, 0)
        if followups and httpprobe.is_slow(http):
            # A stalled or slow body: is it the name (throttling) or the path?
            await self._throttle_followup(target, address)
        elif followups and http.failure in INTERFERENCE:
            await self._http(target, address, cfg.control_sni, FOLLOWUP, 0)
        if followups and http.failure in INTERFERENCE:
            for i in range(cfg.retries):
                again = await self._http(target, address, None, MEASURE, i + 1)
                if again.ok:
                    http = again
                    break
        if http.ok and http.data.get("redirect_to"):
            await self._follow(target, http, followups)
        if not https and followups and cfg.dnscheck:
            # Does this address hold a certificate valid for the name?  Only successes count.
            await self._tls(target, address, target.host, DNSCHECK, 0)

    async def _tcp_again(self, target: Target, address: str, followups: bool) -> None:
        """The handshake's TCP connect failed: measure it again (a lone timeout is not evidence)."""
        cfg = self.config
        for i in range(cfg.retries if followups else 0):
            tcp, stream = await tcpprobe.connect(target.url, target.host, address, target.port, cfg.timeout,
                                                 attempt=i + 1, source=cfg.source_address)
            await self._emit(tcp)
            if stream is not None:
                await trio.aclose_forcefully(stream)
                break

    # --- ClientHello fingerprints (issue 15) -------------------------------------------------------
    async def _hello_tls(self, target: Target, address: str, sni: str, hello: str, purpose: str, attempt: int
                         ) -> Observation | None:
        """TCP, then a handshake with the ClientHello ``hello`` (probes/hellos.py); None when TCP failed."""
        cfg = self.config
        tcp, stream = await tcpprobe.connect(target.url, target.host, address, target.port, cfg.timeout,
                                             purpose=purpose, attempt=attempt, source=cfg.source_address)
        # The connect says which hello it carried: a hello follow-up's TCP step is otherwise the
        # twin of the benign-SNI follow-up's (same address, purpose and attempt).
        tcp.data["hello"] = hello
        await self._emit(tcp)
        if stream is None:
            return None
        obs = await tlsprobe.handshake(stream, target.url, target.host, address, target.port, sni, cfg.timeout,
                                       self.trust, purpose=purpose, attempt=attempt, hello=hello)
        return await self._emit(obs)

    async def _hello_followup(self, target: Target, address: str, sni: str, sent: str) -> Observation | None:
        """The same address and SNI with the other ClientHello: does the box read the fingerprint?"""
        return await self._hello_tls(target, address, sni, hellos.other(sent), FOLLOWUP, 0)

    async def _tor_or(self, target: Target, address: str, followups: bool) -> None:
        """``tor-or://IP:PORT``: TCP, then TLS as a Tor client makes it (Tor-like hello, a random
        www.*.com SNI).  Certificate validity is recorded, never a failure: relays' link
        certificates are self-signed with random names.  A handshake failed by interference gets
        the browser-like follow-up (same address, same SNI), then the Tor-like one again."""
        cfg = self.config
        sni = hellos.tor_sni()
        tls = await self._hello_tls(target, address, sni, hellos.TOR, MEASURE, 0)
        if tls is None:
            await self._tcp_again(target, address, followups)
            return
        if followups and tls.failure in INTERFERENCE:
            await self._hello_followup(target, address, sni, hellos.TOR)
            for i in range(cfg.retries):
                again = await self._hello_tls(target, address, sni, hellos.TOR, MEASURE, i + 1)
                if again is not None and again.ok:
                    break

    async def _follow(self, target: Target, http: Observation, followups: bool) -> None:
        """Follow a redirect of the target URL, once per distinct Location per measurement
        (the origin and a CDN edge redirecting to the same URL make one chain, not two)."""
        followed = _followed.get()
        where = str(http.data.get("redirect_to"))
        if followed is not None:
            if where in followed:
                return
            followed.add(where)
        await chain.follow(self, target, http, followups=followups)

    async def _measure_address(self, target: Target, address: str, followups: bool) -> None:
        await self.measure_address(target, address, followups=followups)

    # --- whole target ----------------------------------------------------------------------------
    async def measure(self, target: Target, extra_addresses: list[str] | None = None, *,
                      followups: bool = True, on_dns: Callable[[list[str]], None] | None = None,
                      allow: Callable[[str], bool] | None = None) -> list[str]:
        """Measure one target; returns the addresses it refused to touch (``allow`` said no).

        ``allow`` is how the control helper keeps from becoming an open proxy: an address it
        resolved or was handed is filtered *before* any connection is made.
        """
        # This task's context, inherited by the per-address tasks started below.
        token = _followed.set(set())
        try:
            return await self._measure(target, extra_addresses, followups=followups, on_dns=on_dns, allow=allow)
        finally:
            _followed.reset(token)

    async def _measure(self, target: Target, extra_addresses: list[str] | None, *, followups: bool,
                       on_dns: Callable[[list[str]], None] | None, allow: Callable[[str], bool] | None
                       ) -> list[str]:
        host = target.host
        refused: list[str] = []
        started: list[str] = []
        resolved: list[str] = []
        async with trio.open_nursery() as n:

            def start(addresses: list[str]) -> None:
                # IPv4 first: most censorship (and most lab networks) is v4; v6 when room is left.
                for a in sorted(addresses, key=lambda a: ":" in a):
                    if a in started or a in refused:
                        continue
                    if allow is not None and not allow(a):
                        refused.append(a)
                    elif len(started) < self.config.max_addresses:
                        started.append(a)
                        n.start_soon(self._measure_address, target, a, followups)

            if is_ip(host):
                resolved.append(host)
                start(resolved)
            else:
                # Each address is measured as soon as any resolver gives it: a slow resolver (TCP
                # DNS under load, a silent one) must not hold back the steps that can go ahead.
                async def lookup(coro: Awaitable[Observation]) -> None:
                    o = await self._emit(await coro)
                    new = [a for a in o.data.get("addresses", []) if a not in resolved]
                    resolved.extend(new)
                    start(new)

                async with trio.open_nursery() as dn:
                    for coro in self._lookups(target):
                        dn.start_soon(lookup, coro)
            extra = [a for a in extra_addresses or [] if a not in resolved]
            # Before the caller's extra addresses are touched: the helper refuses here.
            if on_dns is not None:
                on_dns(resolved + extra)
            start(extra)
        return refused


__all__ = ["Engine", "ProbeConfig", "Sink"]
