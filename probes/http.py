"""HTTP(S) step: a GET pinned to one measured address, through httpx on trio.

Pinning: the request goes to the address itself, with ``Host`` and the TLS ``sni_hostname``
extension set to the domain, so that we fetch from exactly the address under test.  Keep-alive
is off because httpcore pools by (scheme, address, port): a pooled connection opened with one
SNI must never carry a request for another name on the same address.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import trio

from kzprobe import errors as E
from kzprobe.analysis.fingerprints import Fingerprints
from kzprobe.model import STEP_HTTP, Observation, now

BODY_CAP = 512 * 1024
HEAD_BYTES = 1024
MAX_REDIRECTS = 10
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.I | re.S)

Resolve = Callable[[str], Awaitable[str | None]]


class Clients:
    """The run's two shared httpx clients: verifying (the measurement) and not (follow-ups)."""

    def __init__(self, verify: ssl.SSLContext, timeout: float, local_address: str | None = None) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        t = httpx.Timeout(timeout)
        headers = {"User-Agent": USER_AGENT, "Accept": "text/html,*/*;q=0.8"}
        self.verified = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(verify=verify, limits=limits, local_address=local_address),
            timeout=t, headers=headers, follow_redirects=False, trust_env=False)
        unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        self.unverified = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(verify=unverified, limits=limits, local_address=local_address),
            timeout=t, headers=headers, follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        await self.verified.aclose()
        await self.unverified.aclose()


def title_of(body: bytes) -> str:
    m = _TITLE.search(body)
    if not m:
        return ""
    return re.sub(r"\s+", " ", m.group(1).decode("utf-8", "replace")).strip()[:200]


def _pinned_url(url: str, address: str) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


async def fetch(clients: Clients, target: str, domain: str, url: str, address: str, timeout: float,
                fingerprints: Fingerprints, *, host: str | None = None, purpose: str = "measure",
                attempt: int = 0, vantage: str = "probe", resolve: Resolve | None = None) -> Observation:
    """GET ``url`` from ``address`` with Host/SNI = ``host`` (default: the URL's host)."""
    t0 = now()
    host = host or urlsplit(url).hostname or domain
    client = clients.verified if purpose == "measure" else clients.unverified
    data: dict[str, Any] = {"url": url, "host": host, "redirects": []}
    failure: str | None = None
    cur_url, cur_addr, cur_host = url, address, host
    try:
        with trio.fail_after(timeout * 3):
            for _ in range(MAX_REDIRECTS + 1):
                req = client.build_request("GET", _pinned_url(cur_url, cur_addr),
                                           headers={"Host": cur_host},
                                           extensions={"sni_hostname": cur_host})
                resp = await client.send(req, stream=True)
                # Recorded before the body: a body that then times out (throttling) still
                # shows that the server answered.
                data.update(status=resp.status_code, headers=dict(resp.headers.items()))
                try:
                    body = b""
                    truncated = False
                    async for chunk in resp.aiter_raw():
                        body += chunk
                        if len(body) >= BODY_CAP:
                            body, truncated = body[:BODY_CAP], True
                            break
                finally:
                    await resp.aclose()
                loc = resp.headers.get("location")
                if resp.is_redirect and loc:
                    nxt = urljoin(cur_url, loc)
                    data["redirects"].append(nxt)
                    nhost = urlsplit(nxt).hostname or cur_host
                    if nhost != cur_host:
                        new_addr = await resolve(nhost) if resolve else None
                        if new_addr is None:
                            break  # nowhere safe to follow: record the redirect itself
                        cur_addr, cur_host = new_addr, nhost
                    cur_url = nxt
                    continue
                break
        text = body.decode("utf-8", "replace")
        headers = {k: v for k, v in resp.headers.items()}
        match = fingerprints.blockpage(text, headers)
        data.update(
            status=resp.status_code,
            headers=headers,
            title=title_of(body),
            body_length=len(body),
            body_sha256=hashlib.sha256(body).hexdigest(),
            body_head=body[:HEAD_BYTES].decode("utf-8", "replace"),
            truncated=truncated,
            final_url=cur_url,
            blockpage=match.name if match else None,
        )
    except (httpx.HTTPError, trio.TooSlowError, OSError, ssl.SSLError, trio.BrokenResourceError) as exc:
        failure = E.failure_string(exc)
    return Observation(step=STEP_HTTP, target=target, domain=domain, address=address,
                       port=urlsplit(url).port or (443 if url.startswith("https") else 80),
                       t_start=t0, t_end=now(), failure=failure, purpose=purpose, attempt=attempt,
                       vantage=vantage, data=data)
