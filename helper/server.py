"""The helper's HTTP face: a small ASGI app served by hypercorn's trio worker.

Why hypercorn rather than h11 by hand: hypercorn is already a dependency, runs on trio (so the
app and the probe engine share one event loop), and brings what a public-facing server needs
and is easy to get wrong by hand -- keep-alive and idle timeouts (a client dribbling its
headers is dropped after ``keep_alive_timeout``: hypercorn counts a connection as idle until a
full request head has arrived), a per-read timeout, header size limits, TLS termination and a
graceful shutdown.  What it leaves to us is small and lives here: routing, the token, the body
size / body time limits, per-client limits, the concurrency limiter and the per-request
deadline -- and every one of those answers with a JSON error.  The connection cap is in
:mod:`kzprobe.helper.listen`; the limits, tokens and budgets themselves in :mod:`kzprobe.hardening`.

Protocol (the client is :mod:`kzprobe.probes.control`):

* ``POST /v1/control`` ``{"url": URL, "addresses": [IP, ...]}`` -> ``200 {"version": 1,
  "observations": [Observation.to_dict(), ...], "refused": [{"address", "reason"}, ...]}``
* ``GET /v1/health`` -> ``{"ok": true}``; with the token also ``"version"`` and ``"kzprobe"``.
* errors: ``{"error": "<one line>", "code": "<short code>"}`` with 400 / 401 / 403 / 404 / 405 /
  408 / 413 / 415 / 429 (with ``Retry-After``) / 500 (a bug in the helper, never the network) /
  503 / 504.

A measurement is cancelled as soon as its client goes away (``http.disconnect``: a closed
HTTP/1.1 connection, or an HTTP/2 stream reset), so abandoned requests free their slot at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import trio

from kzprobe import __version__
from kzprobe.hardening import (
    Budget,
    ConcurrencyLimiter,
    RateLimiter,
    TokenGuard,
    client_key,
    connection_cap,
    retry_after_header,
)
from kzprobe.hardening.asgi import (
    HttpError,
    Receive,
    Scope,
    Send,
    closes,
    header,
    json_response,
    read_body,
    serve_non_http,
)
from kzprobe.hardening.asgi import one_line as _one_line
from kzprobe.hardening.tokens import Auth
from kzprobe.helper.localnet import LocalNetworks, Network
from kzprobe.helper.policy import Policy, PolicyError
from kzprobe.helper.service import ControlResult, ControlService, HelperEngine
from kzprobe.probes.engine import ProbeConfig

PROTOCOL_VERSION = 1
#: Request headers, in total; the control protocol needs a few hundred bytes.
MAX_HEAD = 8 * 1024
#: Longest a 429 is held back before it is sent (s).
TARPIT = 1.0
#: How often a running measurement checks that its client is still connected (s).
GONE_POLL = 0.2
log = logging.getLogger("kzprobe.helper")

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
    #: Per client (address, IPv6 /64, or token): measurements at once, and a token bucket of
    #: requests (``client_rate`` per second sustained, ``client_burst`` at once).  A probe asks for
    #: control of each target once, a few at a time; these leave it room and stop one client from
    #: taking the whole helper.
    client_concurrency: int = 4
    client_rate: float = 4.0
    client_burst: int = 20
    #: Open client connections (kept below the fd limit, see hardening.connection_cap), and per client.
    max_connections: int = 1024
    client_connections: int = 64
    #: Per request: HTTP requests across redirects x addresses, body bytes downloaded in total,
    #: DNS answers (and addresses) returned per lookup.
    max_fetches: int = 16
    max_download: int = 1024 * 1024
    max_dns_answers: int = 16


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


@contextlib.contextmanager
def _one_error() -> Iterator[None]:
    """A nursery wraps our HttpError in a group: hand the route the HttpError itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        http = group.subgroup(HttpError)
        if http is None:
            raise
        leaf: BaseException = http
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from None


@dataclass
class HelperApp:
    """The ASGI application.  ``measure`` does the work, so tests can drive the app without sockets."""

    measure: Measure
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    #: :class:`kzprobe.helper.listen.Connections` when served by serve_capped: marks connections
    #: busy (not evictable) and tells whether a client hung up.
    connections: Any = None

    def __post_init__(self) -> None:
        self.limiter = trio.CapacityLimiter(self.limits.concurrency)
        self.waiting = 0
        self.guard = TokenGuard(self.token) if self.token is not None else None
        self.rates = RateLimiter(self.limits.client_rate, self.limits.client_burst)
        self.per_client = ConcurrencyLimiter(self.limits.client_concurrency)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await serve_non_http(scope, receive, send):
            return
        if self.connections is not None:
            self.connections.busy(scope, +1)
        try:
            await self._serve_http(scope, receive, send)
        finally:
            if self.connections is not None:
                self.connections.busy(scope, -1)

    async def _serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            head = sum(len(k) + len(v) for k, v in scope.get("headers", []))
            if head > MAX_HEAD:
                # h11's incomplete-size limit only applies while a head is still arriving: one that
                # comes in a single write is parsed whatever its size.
                raise HttpError(431, "header_too_large", f"request headers over {MAX_HEAD} bytes")
            status, payload, headers = await self._route(scope, receive)
        except HttpError as exc:
            status, payload, headers = exc.status, exc.payload(), exc.headers
            if status >= 500 or status == 403:
                log.warning("%s %s -> %d %s: %s", scope.get("method"), scope.get("path"), status, exc.code,
                            exc.message)
        except Exception:
            # A bug must cost one request, not the server.
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            status, payload, headers = 500, {"error": "internal error in the helper", "code": "internal"}, {}
        await json_response(send, status, payload, headers, close=closes(scope, status))

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any], dict[str, str]]:
        path, method = scope.get("path", ""), scope.get("method", "")
        if path == "/v1/health":
            if method != "GET":
                raise HttpError(405, "method_not_allowed", f"{method} not allowed on {path}", {"Allow": "GET"})
            # Liveness for anyone; what runs here (the version) only for the token holder.
            if self.guard is not None and header(scope, b"authorization") is not None:
                if self.guard.check(self._address(scope), header(scope, b"authorization")).ok:
                    return 200, {"ok": True, "version": PROTOCOL_VERSION, "kzprobe": __version__}, {}
            return 200, {"ok": True}, {}
        if path == "/v1/control":
            if method != "POST":
                raise HttpError(405, "method_not_allowed", f"{method} not allowed on {path}", {"Allow": "POST"})
            return await self._control(scope, receive)
        raise HttpError(404, "not_found", f"no such endpoint: {_one_line(path, 100)}")

    def _address(self, scope: Scope) -> str:
        client = scope.get("client")
        return client_key(str(client[0]) if client else None)

    def _authorize(self, scope: Scope) -> str:
        """Check the token; returns the client key the request counts against."""
        address = self._address(scope)
        if self.guard is None:
            return address
        result = self.guard.check(address, header(scope, b"authorization"))
        if result.status is Auth.LOCKED:
            raise HttpError(429, "too_many_failures", "too many wrong tokens from this client",
                            {"Retry-After": retry_after_header(result.retry_after)})
        if not result.ok:
            raise HttpError(401, "unauthorized", "missing or wrong bearer token",
                            {"WWW-Authenticate": 'Bearer realm="kzprobe-helper"'})
        assert self.token is not None
        return client_key(None, self.token)

    def _limit(self, key: str) -> None:
        wait = self.rates.take(key)
        if wait > 0:
            raise HttpError(429, "rate_limited", "too many requests from this client",
                            {"Retry-After": retry_after_header(wait)})
        if not self.per_client.try_acquire(key):
            raise HttpError(429, "too_many_requests",
                            f"more than {self.limits.client_concurrency} requests at once from this client",
                            {"Retry-After": "1"})

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
        try:
            key = self._authorize(scope)
            self._limit(key)
        except HttpError as exc:
            if exc.status == 429:
                # Tarpit: a client that ignores Retry-After and asks again at once would otherwise
                # make the helper spend its time answering 429s.  Waiting costs a sleeping task.
                await trio.sleep(min(TARPIT, float(exc.headers.get("Retry-After", "1"))))
            raise
        try:
            status, payload, headers = await self._limited_control(scope, receive, key)
        finally:
            self.per_client.release(key)
        return status, payload, headers

    def _charge(self, key: str, result: ControlResult | None) -> None:
        # A request that made the helper follow 16 redirects or download a megabyte is not one
        # request's worth of work: the client's bucket pays the difference.
        if result is not None:
            self.rates.charge(key, result.cost - 1.0)

    async def _limited_control(self, scope: Scope, receive: Receive, key: str
                               ) -> tuple[int, dict[str, Any], dict[str, str]]:
        ctype = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(415, "unsupported_media_type", "Content-Type must be application/json")
        body = await read_body(scope, receive, self.limits.max_body, self.limits.body_timeout)
        url, addresses = parse_request(body, self.limits.max_addresses)
        gone = False
        result: ControlResult | None = None
        # The deadline covers the wait for a slot as well: it is the client's whole wait.
        with trio.move_on_after(self.limits.deadline + self.limits.queue_wait) as outer, _one_error():
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    # After the body, the only message left is http.disconnect: the client closed
                    # the connection (HTTP/1.1) or reset the stream (HTTP/2).  Nobody is waiting
                    # for the answer any more, so stop measuring for them.
                    nonlocal gone
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    log.info("client went away (disconnect): measurement cancelled")
                    gone = True
                    nursery.cancel_scope.cancel()

                async def poll_gone() -> None:
                    # Second opinion from the socket: hypercorn turns a hang-up into http.disconnect
                    # only when it reads the EOF, and it pauses reading an HTTP/1.1 connection that
                    # has unconsumed data buffered (a pipelined request behind this one).
                    nonlocal gone
                    while not self.connections.gone(scope):
                        await trio.sleep(GONE_POLL)
                    log.info("client hung up: measurement cancelled")
                    gone = True
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                if self.connections is not None:
                    nursery.start_soon(poll_gone)
                try:
                    await self._admit()
                    try:
                        with trio.move_on_after(self.limits.deadline):
                            result = await self.measure(url, addresses)
                    finally:
                        self.limiter.release()
                except PolicyError as exc:
                    status = 400 if exc.code == "bad_url" else 403
                    raise HttpError(status, exc.code, str(exc)) from None
                finally:
                    nursery.cancel_scope.cancel()
        self._charge(key, result)
        if result is None and not gone:
            self.rates.charge(key, 2.0)  # a request that ran into the deadline held a slot all along
        if gone:
            raise HttpError(499, "client_gone", "client closed the request")
        if result is None or outer.cancelled_caught:
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
    deny: list[Network] = field(default_factory=list)
    lab_public: list[Network] = field(default_factory=list)
    #: The benign name a proxy target is asked to CONNECT to (``--control-sni``).
    control_sni: str = "example.com"

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
    hc.ssl_handshake_timeout = min(opts.limits.header_timeout, 10.0)
    # A request head (request line + headers) must fit in 8 KiB, as in nginx's default; the
    # control protocol needs a few hundred bytes.
    hc.h11_max_incomplete_size = 8 * 1024
    hc.h2_max_inbound_frame_size = 16 * 1024
    hc.h2_max_concurrent_streams = max(1, min(opts.limits.concurrency, opts.limits.client_concurrency * 2))
    hc.graceful_timeout = 2.0
    hc.shutdown_timeout = 5.0
    hc.backlog = 128
    if opts.tls_cert and opts.tls_key:
        hc.certfile, hc.keyfile = opts.tls_cert, opts.tls_key
    return hc


#: How often the host's own addresses are re-read (DHCP renewals, floating IPs).
LOCAL_REFRESH = 10.0


async def _refresh_local(local: LocalNetworks) -> None:
    while True:
        await trio.sleep(LOCAL_REFRESH)
        nets = await trio.to_thread.run_sync(_read_local)
        local.nets = nets


def _read_local() -> frozenset[Network]:
    from kzprobe.helper.localnet import read_local_networks

    return read_local_networks()


async def serve(opts: HelperOptions, *, ready: Callable[[str], None]) -> None:
    """Run until SIGINT or SIGTERM; calls ``ready(url)`` once the socket is listening."""
    from kzprobe.helper.listen import Connections, serve_capped

    local = LocalNetworks(await trio.to_thread.run_sync(_read_local))
    policy = Policy(allow_private=opts.allow_private, deny=tuple(opts.deny), local=local,
                    lab_public=tuple(opts.lab_public))
    lim = opts.limits
    config = ProbeConfig(resolvers=list(opts.resolvers), system_resolver=not opts.resolvers,
                         ca_bundles=list(opts.ca_bundles), timeout=opts.timeout,
                         max_addresses=lim.max_addresses, retries=0, dnscheck=False,
                         control_sni=opts.control_sni)
    budget = Budget(fetches=lim.max_fetches, bytes=lim.max_download, dns_answers=lim.max_dns_answers)
    cap = connection_cap(lim.max_connections)
    if cap < lim.max_connections:
        log.warning("connection cap lowered to %d to stay below the file-descriptor limit", cap)
    conns = Connections(cap, min(cap, lim.client_connections))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def shutdown_trigger() -> None:
            async for _ in signals:
                return

        async with HelperEngine(config, policy) as engine:
            service = ControlService(engine, policy, budget)
            app = HelperApp(service.control, token=opts.token, limits=lim, connections=conns)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_refresh_local, local)

                async def run_server(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
                    await serve_capped(cast(Any, app), hypercorn_config(opts), conns,
                                       shutdown_trigger=shutdown_trigger, task_status=task_status)
                    # Returned after a signal and a graceful close: stop the refresher too.
                    nursery.cancel_scope.cancel()

                binds = await nursery.start(run_server)
                ready(binds[0] if binds else opts.bind)
