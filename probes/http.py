"""HTTP(S) step: one GET pinned to one measured address, through httpx on trio.

Pinning: the request goes to the address itself, with ``Host`` and the TLS ``sni_hostname``
extension set to the names asked for, so that we fetch from exactly the address under test.
Keep-alive is off because httpcore pools by (scheme, address, port): a pooled connection opened
with one SNI must never carry a request for another name on the same address.

One request per step: a redirect is recorded (``redirect_to``) and the engine follows it as a
chain of its own DNS/TCP/TLS/HTTP steps (:mod:`kzprobe.probes.chain`), so a failure at a later
hop is seen with its step and failure string.

The body is read raw (as it came off the wire: what a throttling middlebox slows down), sampled
every 250 ms, and handed to the shared feature layer (:func:`kzprobe.analysis.features.http_features`),
which decodes Content-Encoding and extracts title, length, hash and blockpage the same way for
every source.
"""

from __future__ import annotations

import os
import ssl
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import trio

from kzprobe import errors as E
from kzprobe.analysis.facts import MIN_SAMPLE_SPAN
from kzprobe.analysis.features import BODY_CAP, http_features
from kzprobe.analysis.fingerprints import Fingerprints
from kzprobe.model import MEASURE, REDIRECT, STEP_HTTP, Observation, now

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
#: Raw body bytes read at most (the decoded body is capped by the feature layer at the same size).
WIRE_CAP = BODY_CAP
#: OONI's throttling methodology samples the bytes received every 250 ms.
SAMPLE_INTERVAL = 0.25
#: Seconds the body may take after the headers, in units of the step timeout.  Past it the
#: transfer is cut: a throttled body must not hold a probe for minutes.
BODY_TIMEOUTS = 3.0
#: A body that took at least SLOW_MIN_SPAN seconds at under SLOW_RATE bytes/s is slow, and gets a
#: benign-name follow-up on the same address.  ~0.8 Mbit/s: an order of magnitude under a
#: broadband page load (OONI calls a 10x drop "extreme throttling"); a body too small to take
#: SLOW_MIN_SPAN is never slow (its rate is latency, not bandwidth).  The span is the one the
#: classifier needs before it trusts a rate (two samples).
SLOW_RATE = 100 * 1024
SLOW_MIN_SPAN = MIN_SAMPLE_SPAN
FEATURE_THREADS = 2

#: Purposes whose request verifies the certificate (what a browser would do).
_VERIFIED = frozenset({MEASURE, REDIRECT})


class Clients:
    """The run's two shared httpx clients: verifying (the measurement) and not (follow-ups)."""

    def __init__(self, verify: ssl.SSLContext, timeout: float, local_address: str | None = None) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        t = httpx.Timeout(timeout)
        headers = {"User-Agent": USER_AGENT, "Accept": "text/html,*/*;q=0.8"}
        #: Feature extraction threads at once: more would only fight the event loop for the GIL.
        self.cpu = trio.CapacityLimiter(FEATURE_THREADS)
        self.verified = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(verify=verify, limits=limits, local_address=local_address),
            timeout=t, headers=headers, follow_redirects=False, trust_env=False)
        unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        keylog = os.environ.get("SSLKEYLOGFILE")
        if keylog:
            # Only when asked, as browsers and curl do: the HTTP steps' TLS secrets, so that a
            # capture of this run can be read (kzprobe lab record puts them in its pcapng).
            for ctx in (verify, unverified):
                ctx.keylog_filename = keylog
        self.unverified = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(verify=unverified, limits=limits, local_address=local_address),
            timeout=t, headers=headers, follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        await self.verified.aclose()
        await self.unverified.aclose()


def _pinned_url(url: str, address: str) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def default_port(url: str) -> int:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return port or (443 if parts.scheme == "https" else 80)


def is_slow(obs: Observation) -> bool:
    """The body stalled (timed out after the headers) or came in at under SLOW_RATE."""
    d = obs.data
    if obs.step != STEP_HTTP or not d.get("status"):
        return False
    if obs.failure == E.TIMEOUT:
        return True
    samples = d.get("speed_samples") or []
    if obs.failure or not samples:
        return False
    t, n = samples[-1]
    return bool(t >= SLOW_MIN_SPAN and n / t < SLOW_RATE)


class _Body:
    """The raw body as it arrives, with OONI-style speed samples ([[t, n], ...])."""

    def __init__(self, cap: int = WIRE_CAP) -> None:
        self.cap = cap
        self.raw = bytearray()
        self.wire = 0
        self.samples: list[list[float | int]] = []
        self.cut = False
        self.t0 = trio.current_time()

    def sample(self) -> None:
        self.samples.append([round(trio.current_time() - self.t0, 3), self.wire])

    async def sampler(self) -> None:
        k = 1
        while True:
            await trio.sleep_until(self.t0 + k * SAMPLE_INTERVAL)
            self.sample()
            k += 1

    async def read(self, resp: httpx.Response, deadline: float) -> BaseException | None:
        """Read until the end, the cap or the deadline; returns what stopped it early, if anything."""
        err: BaseException | None = None
        async with trio.open_nursery() as n:
            n.start_soon(self.sampler)
            try:
                with trio.fail_after(deadline):
                    async for chunk in resp.aiter_raw():
                        # Whole chunks (at most one past the cap): wire_bytes is then exactly
                        # what the feature layer was given, as for the same bytes in a capture.
                        self.wire += len(chunk)
                        self.raw += chunk
                        if len(self.raw) >= self.cap:
                            self.cut = True
                            break
            except Exception as exc:  # whatever a server's body makes the stack raise: this step's failure
                err = exc
            finally:
                n.cancel_scope.cancel()
        self.sample()
        return err


async def fetch(clients: Clients, target: str, domain: str, url: str, address: str, timeout: float,
                fingerprints: Fingerprints, *, host: str | None = None, sni: str | None = None,
                purpose: str = MEASURE, attempt: int = 0, vantage: str = "probe",
                hop: int | None = None, cap: int = WIRE_CAP) -> Observation:
    """GET ``url`` from ``address`` with Host = ``host`` and SNI = ``sni`` (both default to the URL's host).

    ``cap``: raw body bytes read at most (a Tor directory fetch reads only the consensus's head)."""
    t0 = now()
    host = host or urlsplit(url).hostname or domain
    sni = sni or host
    verify = purpose in _VERIFIED
    client = clients.verified if verify else clients.unverified
    data: dict[str, Any] = {"url": url, "host": host, "redirects": []}
    if sni != host:
        data["sni"] = sni
    if hop is not None:
        data["hop"] = hop
    failure: str | None = None
    try:
        req = client.build_request("GET", _pinned_url(url, address), headers={"Host": host},
                                   extensions={"sni_hostname": sni})
        with trio.fail_after(timeout * 2):
            resp = await client.send(req, stream=True)
        headers = dict(resp.headers.items())
        # Recorded before the body: a body that then stalls (throttling) still shows that the
        # server answered.
        data.update(status=resp.status_code, headers=headers, final_url=url)
        body = _Body(cap)
        try:
            err = await body.read(resp, timeout * BODY_TIMEOUTS)
        finally:
            with trio.CancelScope(shield=True):
                await resp.aclose()
        data["speed_samples"] = body.samples
        # Decoding and matching are bounded (the cap) but are CPU work on untrusted bytes: off the loop.
        feats = await trio.to_thread.run_sync(
            lambda: http_features(resp.status_code, headers, bytes(body.raw),
                                  truncated_on_wire=body.cut or err is not None, fingerprints=fingerprints),
            limiter=clients.cpu)
        data.update(feats)
        loc = resp.headers.get("location")
        if resp.is_redirect and loc:
            try:
                nxt = urljoin(url, loc)
            except ValueError:
                nxt = None
            if nxt:
                data["redirect_to"] = nxt
                data["redirects"] = [nxt]
        if err is not None:
            failure = E.failure_string(err)
    except (httpx.HTTPError, trio.TooSlowError, OSError, ssl.SSLError, trio.BrokenResourceError) as exc:
        failure = E.failure_string(exc)
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        # A name or URL the HTTP stack cannot encode (from a redirect): this step's failure --
        # for a hop, netxlite's string for a Location that cannot be followed.
        failure = E.HTTP_INVALID_REDIRECT if hop else E.failure_string(exc)
    return Observation(step=STEP_HTTP, target=target, domain=domain, address=address,
                       port=default_port(url), t_start=t0, t_end=now(), failure=failure, purpose=purpose,
                       attempt=attempt, vantage=vantage, data=data)


__all__ = ["Clients", "default_port", "fetch", "is_slow"]
