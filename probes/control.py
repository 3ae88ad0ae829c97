"""The probe's side of control: ask a helper, or fall back to DNS-over-HTTPS.

Helper protocol (``kzprobe helper``): ``POST {helper}/v1/control`` with JSON
``{"url": URL, "addresses": [IP, ...]}`` (URL may be a kind target, e.g. ``tcp://HOST:PORT``; and
``Authorization: Bearer TOKEN`` when the helper
URL carries ``#token=...``).  The answer is ``{"observations": [Observation.to_dict(), ...]}``:
the helper measures with the very same engine, so control and probe speak one model.

DoH (RFC 8484) is implemented here over httpx rather than with dnspython's DoH support, which
would pull a second HTTP stack into the process.  With DoH, the genuineness of the probe's
addresses comes from the probe's own TLS handshake with SNI = domain (``cert_valid``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import dns.message
import dns.rcode
import dns.rdatatype
import httpx
import trio

from kzprobe import errors as E
from kzprobe.analysis.bogons import is_ip
from kzprobe.contract import WireError, observations_from_wire, rejected
from kzprobe.model import CONTROL, SOURCE_LIVE, STEP_DNS, Observation, Target, now
from kzprobe.probes.certs import TrustStore
from kzprobe.probes.engine import ProbeConfig, Sink
from kzprobe.probes.kinds import UDP_DNS

DOH_DEFAULTS = ("https://dns.google/dns-query", "https://cloudflare-dns.com/dns-query")
#: Consecutive connection failures after which a helper is no longer asked during this run.
DEAD_AFTER = 3
#: Requests in flight to one helper: its per-client limit (``kzprobe helper --client-concurrency``,
#: default 4).  Asking for more only earns 429s.
HELPER_CONCURRENCY = 4
#: Busy (503) or over a per-client limit (429): retries, each after the helper's Retry-After.
BUSY_RETRIES = 5


def _retry_after(value: str | None) -> float:
    try:
        return min(5.0, max(0.1, float(value or 1)))
    except ValueError:
        return 1.0


def _split_token(url: str) -> tuple[str, str | None]:
    base, _, frag = url.partition("#")
    token = frag[len("token="):] if frag.startswith("token=") else None
    return base.rstrip("/"), token


class ControlClient:
    def __init__(self, helpers: list[str], doh: list[str], config: ProbeConfig, sink: Sink,
                 trust: TrustStore) -> None:
        self.helpers = [_split_token(h) for h in helpers]
        self.doh = [d for spec in doh for d in (DOH_DEFAULTS if spec == "default" else (spec,))]
        self.config = config
        self.sink = sink
        self.notes: list[str] = []
        #: helper -> consecutive connection failures; a helper is skipped after DEAD_AFTER of them.
        self._failures: dict[str, int] = {}
        self._slots = trio.CapacityLimiter(HELPER_CONCURRENCY)
        # A helper request runs DNS, TCP, TLS and HTTP (up to 3 timeouts with redirects) on its side:
        # allow for all of it before giving up on the answer.
        self.client = httpx.AsyncClient(verify=trust.ssl_context(), trust_env=False,
                                        timeout=httpx.Timeout(config.timeout * 7, connect=config.timeout))

    @property
    def enabled(self) -> bool:
        return bool(self.helpers or self.doh)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.client.aclose()

    async def fetch(self, target: Target, addresses: list[str]) -> None:
        if target.scheme == UDP_DNS:
            addresses = []  # DNS only: control resolves the name itself and connects nowhere
        for base, token in self.helpers:
            if self._failures.get(base, 0) >= DEAD_AFTER:
                continue
            got = await self._helper(base, token, target, addresses)
            if got is not None:
                for o in got:
                    await self.sink(o)
                return
        if is_ip(target.host):
            # A DoH lookup of an address is a lookup of a name that does not exist: its NXDOMAIN
            # would read as "control cannot resolve the site" (down.everyone).  Kinds given by
            # address (tor-or, tor-dir, obfs4) have no DNS to compare.
            return
        for url in self.doh:
            got_doh = await self._doh(url, target)
            if got_doh is not None:
                await self.sink(got_doh)
                if got_doh.ok:
                    return

    async def _helper(self, base: str, token: str | None, target: Target, addresses: list[str]
                      ) -> list[Observation] | None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            body = {"url": target.url, "addresses": addresses}
            async with self._slots:
                r = await self.client.post(f"{base}/v1/control", json=body, headers=headers)
                for _ in range(BUSY_RETRIES):
                    if r.status_code not in (429, 503):
                        break
                    # Busy or over our share: the helper sheds load; wait as asked (bounded), retry.
                    await trio.sleep(_retry_after(r.headers.get("retry-after")))
                    r = await self.client.post(f"{base}/v1/control", json=body, headers=headers)
            payload: Any = r.json()
            self._failures[base] = 0
            if r.status_code != 200:
                why = payload.get("error") if isinstance(payload, dict) else None
                self._note(f"helper {base} refused {target.url}: {str(why or r.status_code)[:200]}")
                return None
            try:
                out = observations_from_wire(payload, source=SOURCE_LIVE, vantage=CONTROL)
            except WireError as exc:
                # All or nothing: one type-wrong field makes the whole answer untrustworthy.  The
                # target becomes inconclusive with this reason (rule control.rejected).
                self._note(f"helper {base} answer for {target.url} rejected: {exc.reason}")
                return [rejected(f"helper {base}: {exc.reason}", target=target.url, domain=target.host,
                                 source=SOURCE_LIVE)]
            for o in out:
                o.target = target.url
            return out
        except (httpx.HTTPError, ValueError, TypeError, OSError) as exc:
            failure = E.failure_string(exc)
            if failure in (E.CONNECTION_REFUSED, E.HOST_UNREACHABLE, E.NETWORK_UNREACHABLE):
                # No point asking a dead helper for every target; one refusal may be a restart.
                self._failures[base] = self._failures.get(base, 0) + 1
            self._note(f"helper {base} failed for {target.url}: {failure}")
            return None

    async def _doh(self, url: str, target: Target) -> Observation | None:
        t0 = now()
        addresses: list[str] = []
        answers: list[dict[str, Any]] = []
        failure: str | None = None
        rcode = None
        try:
            for rdtype in ("A", "AAAA"):
                q = dns.message.make_query(target.host, rdtype)
                q.id = 0  # RFC 8484 4.1: use 0 for cache friendliness
                r = await self.client.post(url, content=q.to_wire(),
                                           headers={"Content-Type": "application/dns-message",
                                                    "Accept": "application/dns-message"})
                r.raise_for_status()
                msg = dns.message.from_wire(r.content)
                if rdtype == "A":
                    rcode = dns.rcode.to_text(msg.rcode())
                    if msg.rcode() == dns.rcode.NXDOMAIN:
                        failure = E.DNS_NXDOMAIN
                        break
                for rrset in msg.answer:
                    for rd in rrset:
                        answers.append({"type": dns.rdatatype.to_text(rrset.rdtype), "data": rd.to_text(),
                                        "ttl": rrset.ttl, "name": rrset.name.to_text(omit_final_dot=True)})
                        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                            addresses.append(rd.to_text())
            if failure is None and not addresses:
                failure = E.DNS_NO_ANSWER
        except (httpx.HTTPError, OSError, ValueError, dns.exception.DNSException) as exc:
            self._note(f"DoH {url} failed for {target.host}: {E.failure_string(exc)}")
            return None
        host = urlsplit(url).hostname or url
        return Observation(step=STEP_DNS, target=target.url, domain=target.host, vantage=CONTROL, t_start=t0,
                           t_end=now(), failure=failure,
                           data={"resolver": url, "transport": "doh", "qtype": "A+AAAA", "rcode": rcode,
                                 "answers": answers, "addresses": addresses, "doh_host": host,
                                 "responses": [{"rcode": rcode, "addresses": addresses}]})

    def _note(self, msg: str) -> None:
        if len(self.notes) < 50:
            self.notes.append(msg)

