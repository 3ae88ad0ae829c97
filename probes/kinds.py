"""Probes for the target kinds beyond URLs: a Tor directory, an obfs4 bridge, a messaging endpoint
(TCP, or DNS only) and an HTTP proxy.  (``tor-or://`` is :mod:`kzprobe.probes.hellos`' business.)

Every kind is measured with the usual steps (dns/tcp/tls/http) and the usual probes, one
observation per step with its timing and OONI failure string, ``target`` = the kind's URL:

=================== ===========================================================================
``tor-dir://IP:P``  TCP, then ``GET /tor/status-vote/current/consensus``: status, headers and at
                    most :data:`DIR_CAP` bytes of body, through the shared feature layer
                    (``data["kind"] = "tor-dir"``).
``obfs4://IP:P``    TCP only.  No maintained Python obfs4 implementation exists (PyPI has
                    obfsproxy 0.2.13 of 2014: Python 2, obfs2/obfs3/ScrambleSuit, no obfs4), and
                    a half-made handshake would be fingerprintable itself; a completed TCP
                    connect is what OONI's ``tor`` experiment also calls "reachable" for bridges.
``tcp://HOST:P``    DNS (when HOST is a name, by the engine), then TCP.
``udp-dns://NAME``  DNS only, over UDP (the engine's lookups; no connection at all).
``proxy+http://H:P`` TCP, then ``CONNECT <benign>:443`` (an HTTP step: method, connect_to,
                    status; a refusal's page, at most 16 KiB, through the feature layer, so an
                    injected blockpage is recognised), then a TLS handshake through the tunnel
                    with SNI = benign (the run's ``--control-sni``), purpose MEASURE.
=================== ===========================================================================

Retries are the URLs': a failed TCP connect, or a step failed by interference (reset, timeout,
EOF), is measured once more (``ProbeConfig.retries``), because a lone timeout is not evidence.
The helper calls these with ``followups=False``: control measures once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from kzprobe import errors as E
from kzprobe.analysis.facts import INTERFERENCE
from kzprobe.analysis.features import http_features, response_head
from kzprobe.model import MEASURE, STEP_HTTP, Observation, Target, now
from kzprobe.probes import http as httpprobe
from kzprobe.probes import tcp as tcpprobe
from kzprobe.probes import tls as tlsprobe

if TYPE_CHECKING:
    from kzprobe.probes.engine import Engine

TOR_DIR, OBFS4, TCP, UDP_DNS, PROXY_HTTP = "tor-dir", "obfs4", "tcp", "udp-dns", "proxy+http"
#: The kinds measured here (``tor-or`` is measured by the TLS-fingerprint code).
SCHEMES = (TOR_DIR, OBFS4, TCP, UDP_DNS, PROXY_HTTP)
CONSENSUS_PATH = "/tor/status-vote/current/consensus"
#: Body bytes a directory fetch reads at most: enough for the consensus's header lines (its
#: valid-after time, the authorities' keys) without pulling megabytes through a censored link.
DIR_CAP = 64 * 1024
#: A CONNECT answer's head (status line and headers) longer than this is not a proxy's.
CONNECT_HEAD_CAP = 8 * 1024
#: Body bytes of a refusing CONNECT answer read at most: enough for an ISP's notice page (an
#: on-path box answering CONNECT with its blockpage), which the feature layer then recognises.
CONNECT_BODY_CAP = 16 * 1024
CONNECT_PORT = 443


def handles(scheme: str) -> bool:
    return scheme in SCHEMES


async def measure(engine: Engine, target: Target, address: str, *, followups: bool = True) -> None:
    """Measure one address of a kind target (DNS, when the host is a name, was the engine's)."""
    scheme = target.scheme
    if scheme == UDP_DNS:
        return  # DNS only: the lookups the engine made are the whole measurement
    if scheme in (TCP, OBFS4):
        stream = await reach(engine, target, address, followups=followups)
        if stream is not None:
            await trio.aclose_forcefully(stream)
    elif scheme == TOR_DIR:
        await _tor_dir(engine, target, address, followups)
    elif scheme == PROXY_HTTP:
        await _proxy(engine, target, address, followups)


async def reach(engine: Engine, target: Target, address: str, *, followups: bool = True, attempt: int = 0
                ) -> trio.SocketStream | None:
    """TCP to ``address:port``, measured again (up to ``retries`` times) when it fails.

    Returns the open stream (the caller closes it) or None.
    """
    return (await _reach(engine, target, address, followups=followups, attempt=attempt))[0]


async def _reach(engine: Engine, target: Target, address: str, *, followups: bool, attempt: int
                 ) -> tuple[trio.SocketStream | None, int]:
    """:func:`reach`, and the next TCP attempt number left free (a later connect must not reuse one)."""
    cfg = engine.config
    tries = 1 + (cfg.retries if followups else 0)
    for i in range(tries):
        tcp, stream = await tcpprobe.connect(target.url, target.host, address, target.port, cfg.timeout,
                                             attempt=attempt + i, source=cfg.source_address)
        await engine._emit(tcp)
        if stream is not None:
            return stream, attempt + i + 1
    return None, attempt + tries


# --- tor-dir ---------------------------------------------------------------------------------------
def consensus_url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{CONSENSUS_PATH}"


async def _tor_dir(engine: Engine, target: Target, address: str, followups: bool) -> None:
    stream = await reach(engine, target, address, followups=followups)
    if stream is None:
        return
    await trio.aclose_forcefully(stream)
    for attempt in range(1 + (engine.config.retries if followups else 0)):
        obs = await _dir_fetch(engine, target, address, attempt)
        if obs.failure not in INTERFERENCE:
            return


async def _dir_fetch(engine: Engine, target: Target, address: str, attempt: int) -> Observation:
    assert engine.clients is not None
    cfg = engine.config
    obs = await httpprobe.fetch(engine.clients, target.url, target.host, consensus_url(address, target.port),
                                address, cfg.timeout, engine.fingerprints, purpose=MEASURE, attempt=attempt,
                                cap=DIR_CAP)
    obs.data["kind"] = TOR_DIR
    return await engine._emit(obs)


# --- proxy+http ------------------------------------------------------------------------------------
async def _proxy(engine: Engine, target: Target, address: str, followups: bool) -> None:
    tries = 1 + (engine.config.retries if followups else 0)
    tcp_attempt = 0  # a connect retried before the first CONNECT has used attempt 1 already
    for attempt in range(tries):
        stream, tcp_attempt = await _reach(engine, target, address, followups=followups and attempt == 0,
                                           attempt=tcp_attempt)
        if stream is None:
            return
        connect, tunnel = await _connect(engine, target, address, stream, attempt)
        if tunnel is None:
            if connect.failure in INTERFERENCE:
                continue  # measured again: a lone reset or stall is not evidence
            return
        tls = await tlsprobe.handshake(tunnel, target.url, target.host, address, target.port,
                                       engine.config.control_sni, engine.config.timeout, engine.trust,
                                       purpose=MEASURE, attempt=attempt)
        await engine._emit(tls)
        if tls.failure not in INTERFERENCE:
            return


def connect_request(benign: str) -> bytes:
    authority = f"{benign}:{CONNECT_PORT}"
    return (f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {httpprobe.USER_AGENT}\r\n"
            "Proxy-Connection: keep-alive\r\n\r\n").encode("ascii")


#: ``(status, headers)`` of a CONNECT answer's head, or None (the feature layer's, shared with replay).
parse_head = response_head


async def _read_head(stream: trio.SocketStream) -> bytes:
    """The response head, byte by byte: nothing past the blank line may be taken from the tunnel
    (what follows a 200 is the TLS server's).  Raises EOFError on a close, ValueError past the cap."""
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        if len(head) >= CONNECT_HEAD_CAP:
            raise ValueError("CONNECT answer head too long")
        b = await stream.receive_some(1)
        if not b:
            raise EOFError("proxy closed before the end of its answer")
        head += b
    return bytes(head[:-4])


async def _read_body(stream: trio.SocketStream, headers: dict[str, str], deadline: float) -> tuple[bytes, bool]:
    """A refusal's body: Content-Length bytes (at most CONNECT_BODY_CAP), or until the close when the
    answer says ``Connection: close``; nothing otherwise (a keep-alive answer without a length would
    only be read by waiting).  Returns (body, cut short); never raises for what the peer does."""
    lower = {k.lower(): v for k, v in headers.items()}
    length = lower.get("content-length", "")
    want = int(length) if length.isascii() and length.isdigit() else None
    if want is None and lower.get("connection", "").lower() != "close":
        return b"", False
    limit = min(want if want is not None else CONNECT_BODY_CAP, CONNECT_BODY_CAP)
    body = bytearray()
    with trio.move_on_after(deadline):
        try:
            while len(body) < limit:
                chunk = await stream.receive_some(limit - len(body))
                if not chunk:
                    break
                body += chunk
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    cut = want is None or want > len(body)
    return bytes(body), cut


async def _connect(engine: Engine, target: Target, address: str, stream: trio.SocketStream, attempt: int
                   ) -> tuple[Observation, trio.SocketStream | None]:
    """``CONNECT benign:443`` on an open connection to the proxy; the tunnel when it answered 2xx.

    The stream is closed unless it is returned.
    """
    benign = engine.config.control_sni
    t0 = now()
    data: dict[str, Any] = {"method": "CONNECT", "connect_to": f"{benign}:{CONNECT_PORT}", "url": target.url,
                            "host": benign}
    failure: str | None = None
    tunnel: trio.SocketStream | None = None
    try:
        with trio.fail_after(engine.config.timeout):
            await stream.send_all(connect_request(benign))
            head = await _read_head(stream)
        parsed = parse_head(head)
        if parsed is None:
            failure = E.HTTP_MALFORMED
        else:
            status, headers = parsed
            data.update(status=status, headers=headers)
            if 200 <= status < 300:
                tunnel = stream
            else:
                # The answer's own page: a proxy's error, or an on-path box's blockpage.
                body, cut = await _read_body(stream, headers, engine.config.timeout)
                data.update(await _features(engine, status, headers, body, cut))
    except ValueError:
        failure = E.HTTP_MALFORMED
    except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        failure = E.failure_string(exc)
    if tunnel is None:
        await trio.aclose_forcefully(stream)
    obs = Observation(step=STEP_HTTP, target=target.url, domain=target.host, address=address, port=target.port,
                      t_start=t0, t_end=now(), failure=failure, purpose=MEASURE, attempt=attempt, data=data)
    return await engine._emit(obs), tunnel


async def _features(engine: Engine, status: int, headers: dict[str, str], body: bytes, cut: bool) -> dict[str, Any]:
    """The shared feature layer over the refusal's body (bounded, but CPU on untrusted bytes: off the loop)."""
    limiter = engine.clients.cpu if engine.clients is not None else None
    return await trio.to_thread.run_sync(
        lambda: http_features(status, headers, body, truncated_on_wire=cut, fingerprints=engine.fingerprints),
        limiter=limiter)


__all__ = ["CONSENSUS_PATH", "DIR_CAP", "SCHEMES", "connect_request", "consensus_url", "handles", "measure",
           "parse_head", "reach"]
