"""The helper's HTTP face: a small ASGI app served by hypercorn's trio worker.

Why hypercorn rather than h11 by hand: hypercorn is already a dependency, runs on trio (so the
app and the probe engine share one event loop), and brings what a public-facing server needs
and is easy to get wrong by hand -- keep-alive and idle timeouts (a client dribbling its
headers is dropped after ``keep_alive_timeout``: hypercorn counts a connection as idle until a
full request head has arrived), a per-read timeout, header size limits, TLS termination and a
graceful shutdown.  What it leaves to us is small and lives here: routing, the token, the body
size / body time limits, the concurrency limiter and the per-request deadline -- and every one of
those answers with a JSON error.

Protocol (the client is :mod:`kzprobe.probes.control`):

* ``POST /v1/control`` ``{"url": URL, "addresses": [IP, ...]}`` -> ``200 {"version": 1,
  "observations": [Observation.to_dict(), ...], "refused": [{"address", "reason"}, ...]}``
* ``GET /v1/health`` -> ``{"ok": true, "version": 1, "kzprobe": VERSION}``
* errors: ``{"error": "<one line>", "code": "<short code>"}`` with 400 / 401 / 403 / 404 / 405 /
  408 / 413 / 415 / 500 / 503 / 504.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import signal
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import trio

from kzprobe import __version__
from kzprobe.helper.policy import Policy, PolicyError
from kzprobe.helper.service import ControlResult, ControlService, HelperEngine
from kzprobe.probes.engine import ProbeConfig

PROTOCOL_VERSION = 1
log = logging.getLogger("kzprobe.helper")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Measure = Callable[[str, list[str]], Awaitable[ControlResult]]


@dataclass
class Limits:
    max_body: int = 8 * 1024
    max_addresses: int = 8
    concurrency: int = 16
    #: Requests that may wait for a free slot, and for how long.  A probe runs dozens of targets
    #: at once and asks for control of each, so short bursts are normal and worth absorbing;
    #: beyond the queue the answer is 503 at once (a longer queue would only make clients time out).
    queue: int = 64
    queue_wait: float = 5.0
    #: Whole request (all steps for all addresses).  A measurement taking longer has hung.
    deadline: float = 30.0
    #: Time to receive the body once the request head is in (slow-loris on the body).
    body_timeout: float = 10.0
    #: Idle time allowed before a full request head arrives (slow-loris on the headers).
    header_timeout: float = 10.0


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def parse_request(body: bytes, max_addresses: int) -> tuple[str, list[str]]:
    """Validate a control request body; raises :class:`HttpError` (400) with the reason."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise HttpError(400, "bad_json", f"body is not valid JSON: {_one_line(str(exc), 120)}") from None
    if not isinstance(payload, dict):
        raise HttpError(400, "bad_request", "body must be a JSON object")
    url = payload.get("url")
    if not isinstance(url, str) or not url:
        raise HttpError(400, "bad_request", "'url' must be a non-empty string")
    raw = payload.get("addresses", [])
    if raw is None:
        raw = []
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise HttpError(400, "bad_request", "'addresses' must be a list of strings")
    if len(raw) > max_addresses:
        raise HttpError(400, "too_many_addresses", f"at most {max_addresses} addresses per request, got {len(raw)}")
    addresses: list[str] = []
    for a in raw:
        try:
            norm = str(ipaddress.ip_address(a.strip()))
        except ValueError:
            raise HttpError(400, "bad_address", f"not an IP address: {_one_line(a, 60)!r}") from None
        if norm not in addresses:
            addresses.append(norm)
    return url, addresses


@dataclass
class HelperApp:
    """The ASGI application.  ``measure`` does the work, so tests can drive the app without sockets."""

    measure: Measure
    token: str | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        self.limiter = trio.CapacityLimiter(self.limits.concurrency)
        self.waiting = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            return
        try:
            status, payload, headers = await self._route(scope, receive)
        except HttpError as exc:
            status, payload, headers = exc.status, {"error": exc.message, "code": exc.code}, exc.headers
            if status >= 500 or status == 403:
                log.warning("%s %s -> %d %s: %s", scope.get("method"), scope.get("path"), status, exc.code,
                            exc.message)
        except Exception:
            # A bug must cost one request, not the server.
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            status, payload, headers = 500, {"error": "internal error in the helper", "code": "internal"}, {}
        await self._respond(send, status, payload, headers)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _respond(self, send: Send, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        body = json.dumps(payload, ensure_ascii=False, default=str, separators=(",", ":")).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store")]
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any], dict[str, str]]:
        path, method = scope.get("path", ""), scope.get("method", "")
        if path == "/v1/health":
            if method != "GET":
                raise HttpError(405, "method_not_allowed", f"{method} not allowed on {path}", {"Allow": "GET"})
            return 200, {"ok": True, "version": PROTOCOL_VERSION, "kzprobe": __version__}, {}
        if path == "/v1/control":
            if method != "POST":
                raise HttpError(405, "method_not_allowed", f"{method} not allowed on {path}", {"Allow": "POST"})
            return await self._control(scope, receive)
        raise HttpError(404, "not_found", f"no such endpoint: {_one_line(path, 100)}")

    def _header(self, scope: Scope, name: bytes) -> str | None:
        for k, v in scope.get("headers", []):
            if k.lower() == name:
                return bytes(v).decode("latin-1")
        return None

    def _authorize(self, scope: Scope) -> None:
        if self.token is None:
            return
        auth = self._header(scope, b"authorization") or ""
        scheme, _, given = auth.partition(" ")
        # compare_digest: the token must not leak through response timing.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise HttpError(401, "unauthorized", "missing or wrong bearer token",
                            {"WWW-Authenticate": 'Bearer realm="kzprobe-helper"'})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        cap = self.limits.max_body
        declared = self._header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            raise HttpError(413, "too_large", f"request body over {cap} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            with trio.fail_after(self.limits.body_timeout):
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        raise HttpError(400, "disconnected", "client went away before the body was complete")
                    chunk = bytes(msg.get("body", b""))
                    size += len(chunk)
                    if size > cap:
                        raise HttpError(413, "too_large", f"request body over {cap} bytes")
                    chunks.append(chunk)
                    if not msg.get("more_body", False):
                        break
        except trio.TooSlowError:
            raise HttpError(408, "body_timeout",
                            f"request body not received within {self.limits.body_timeout:g} s") from None
        return b"".join(chunks)

    async def _admit(self) -> None:
        """Take a measurement slot, waiting in a bounded queue; 503 when that is not possible."""
        try:
            self.limiter.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        busy = HttpError(503, "busy", f"helper busy ({self.limits.concurrency} measurements running, "
                                      f"{self.waiting} waiting)", {"Retry-After": "1"})
        if self.waiting >= self.limits.queue:
            raise busy
        self.waiting += 1
        try:
            with trio.move_on_after(self.limits.queue_wait):
                await self.limiter.acquire()
                return
        finally:
            self.waiting -= 1
        raise busy

    async def _control(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any], dict[str, str]]:
        self._authorize(scope)
        ctype = (self._header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(415, "unsupported_media_type", "Content-Type must be application/json")
        body = await self._read_body(scope, receive)
        url, addresses = parse_request(body, self.limits.max_addresses)
        await self._admit()
        try:
            with trio.move_on_after(self.limits.deadline) as cs:
                result = await self.measure(url, addresses)
        except PolicyError as exc:
            status = 400 if exc.code == "bad_url" else 403
            raise HttpError(status, exc.code, str(exc)) from None
        finally:
            self.limiter.release()
        if cs.cancelled_caught:
            raise HttpError(504, "timeout", f"measurement did not finish within {self.limits.deadline:g} s")
        return 200, result.to_json(PROTOCOL_VERSION), {}


@dataclass
class HelperOptions:
    host: str = "127.0.0.1"
    port: int = 8780
    resolvers: list[str] = field(default_factory=list)
    ca_bundles: list[str] = field(default_factory=list)
    allow_private: bool = False
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    timeout: float = 5.0
    limits: Limits = field(default_factory=Limits)

    @property
    def bind(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def hypercorn_config(opts: HelperOptions) -> Any:
    from hypercorn.config import Config

    hc = Config()
    hc.bind = [opts.bind]
    hc.accesslog = None
    hc.errorlog = "-"
    hc.loglevel = "WARNING"  # our own ready line replaces hypercorn's "Running on ..."
    hc.include_server_header = False
    hc.keep_alive_timeout = opts.limits.header_timeout
    hc.read_timeout = math.ceil(opts.limits.header_timeout)
    hc.h11_max_incomplete_size = 16 * 1024
    hc.h2_max_concurrent_streams = max(1, opts.limits.concurrency)
    hc.graceful_timeout = 2.0
    hc.shutdown_timeout = 5.0
    if opts.tls_cert and opts.tls_key:
        hc.certfile, hc.keyfile = opts.tls_cert, opts.tls_key
    return hc


async def serve(opts: HelperOptions, *, ready: Callable[[str], None]) -> None:
    """Run until SIGINT or SIGTERM; calls ``ready(url)`` once the socket is listening."""
    from hypercorn.trio import serve as hypercorn_serve

    policy = Policy(allow_private=opts.allow_private)
    config = ProbeConfig(resolvers=list(opts.resolvers), system_resolver=not opts.resolvers,
                         ca_bundles=list(opts.ca_bundles), timeout=opts.timeout,
                         max_addresses=opts.limits.max_addresses, retries=0, dnscheck=False)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def shutdown_trigger() -> None:
            async for _ in signals:
                return

        async with HelperEngine(config, policy) as engine:
            service = ControlService(engine, policy)
            app = HelperApp(service.control, token=opts.token, limits=opts.limits)
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(partial(hypercorn_serve, cast(Any, app), hypercorn_config(opts),
                                                    shutdown_trigger=shutdown_trigger, mode="asgi"))
                ready(binds[0] if binds else opts.bind)
