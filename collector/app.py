"""The collector's ASGI app (API version 1).  Protocol:

* ``POST /v1/runs`` (open_run.json) -> ``200 {"uid", "acked", "state"}``: opens the run, or
  returns the existing one with the highest sequence number already stored (``acked``);
* ``POST /v1/runs/{uid}/observations`` (batch.json) -> ``200 {"uid", "acked", "stored",
  "duplicates"}``: idempotent by (uid, seq); a batch is stored whole or refused whole;
* ``POST /v1/runs/{uid}/close`` (close_run.json) -> ``200 {"uid", "acked", "state", "verdicts"}``;
* ``GET /v1/runs/{uid}`` -> ``{"uid", "acked", "state"}``; ``GET /v1/health``;
  ``GET /v1/schemas/NAME.json``: the JSON Schemas of the bodies;
* errors: ``{"error": "<one line>", "code": "<short code>"}`` with 400 (bad body), 401 (missing,
  unknown or revoked token), 404, 405, 408, 409, 413 (body too large), 415, 500, 503
  (``Retry-After``: the writer queue is full).

Authorization: ``Bearer kzp_...`` (``kzprobe collector token add NAME``); runs are attributed to
the token's name.  Client addresses are not logged unless ``log_addresses`` is set.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import trio

from kzprobe import __version__
from kzprobe.collector.ingest import Ingest, Refused
from kzprobe.collector.tokens import Verifier
from kzprobe.collector.wire import API_VERSION, BadBody, parse_batch, parse_close, parse_open
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
from kzprobe.hardening.limits import RateLimiter, client_key, retry_after_header

log = logging.getLogger("kzprobe.collector")

_RUN_PATH = re.compile(r"^/v1/runs/([0-9a-f-]{36})(/observations|/close)?$")
SCHEMAS = ("open_run.json", "batch.json", "close_run.json")


@dataclass
class Limits:
    #: A batch of 5000 observations with 1 KiB body heads is ~8 MiB.
    max_body: int = 16 * 1024 * 1024
    #: Worker threads writing at once (1 for SQLite: it has one writer).
    writers: int = 1
    #: Requests that may wait for a writer; beyond, 503 with Retry-After.
    queue: int = 64
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    #: Wrong tokens per client (memory only) before answering 401 unchecked; refilled over auth_lockout s.
    auth_failures: int = 10
    auth_lockout: float = 60.0


@dataclass
class CollectorApp:
    ingest: Ingest
    verifier: Verifier
    limits: Limits = field(default_factory=Limits)
    log_addresses: bool = False

    def __post_init__(self) -> None:
        self.writers = trio.CapacityLimiter(self.limits.writers)
        self.waiting = 0
        # The helper's hardening layer: wrong tokens cost a client (by address, /64 for IPv6) from a
        # bucket of `auth_failures` refilled over `auth_lockout` s; empty, it is refused unchecked.
        self._failures = RateLimiter(rate=self.limits.auth_failures / self.limits.auth_lockout,
                                     burst=self.limits.auth_failures)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await serve_non_http(scope, receive, send):
            return
        try:
            status, payload, headers = await self._route(scope, receive)
        except HttpError as exc:
            status, payload, headers = exc.status, exc.payload(), exc.headers
        except Exception:
            log.exception("internal error on %s %s", scope.get("method"), _one_line(scope.get("path", ""), 80))
            status, payload, headers = 500, {"error": "internal error in the collector", "code": "internal"}, {}
        if self.log_addresses:
            client = scope.get("client") or ("?", 0)
            log.info("%s %s %s -> %d", client[0], scope.get("method"), _one_line(scope.get("path", ""), 80), status)
        await json_response(send, status, payload, headers, close=closes(scope, status))

    # --- plumbing ------------------------------------------------------------------------------
    async def _authorize(self, scope: Scope) -> str:
        client = client_key(str((scope.get("client") or ("?", 0))[0]))  # in memory only, for the lockout
        unauthorized = HttpError(401, "unauthorized", "missing, unknown or revoked token",
                                 {"WWW-Authenticate": 'Bearer realm="kzprobe-collector"'})
        if self._failures.peek(client) > 0:
            raise unauthorized
        scheme, _, given = (header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise unauthorized
        # scrypt takes tens of ms: never on the event loop.
        name = await trio.to_thread.run_sync(self.verifier.name_of, given.strip())
        if name is None:
            self._failures.take(client)  # only a wrong guess costs; the table is LRU-bounded
            raise unauthorized
        return name

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        ctype = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
        # Up to the cap again is read and dropped rather than answered at once: a client still
        # sending when the connection closes gets a reset instead of the 413 reason.
        body = await read_body(scope, receive, self.limits.max_body, self.limits.body_timeout,
                               drain=self.limits.max_body)
        if ctype != "application/json":
            raise HttpError(415, "unsupported_media_type", "Content-Type must be application/json")
        return body

    async def _work(self, write: Callable[[Any], Any], parse: Callable[[bytes], Any] | None = None,
                    body: bytes = b"") -> Any:
        """Parse ``body`` in a worker thread (CPU on untrusted bytes never runs on the event loop),
        then ``write(parsed)`` in another, at most ``writers`` at once."""
        if self.waiting >= self.limits.queue:
            raise HttpError(503, "busy", "collector busy; retry later", {"Retry-After": retry_after_header(2)})
        self.waiting += 1
        try:
            parsed = await trio.to_thread.run_sync(parse, body) if parse is not None else None
            return await trio.to_thread.run_sync(write, parsed, limiter=self.writers)
        except BadBody as exc:
            raise HttpError(400, "bad_body", exc.reason) from None
        except Refused as exc:
            raise HttpError(exc.status, exc.code, exc.message) from None
        finally:
            self.waiting -= 1

    # --- routes --------------------------------------------------------------------------------
    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any], dict[str, str]]:
        path, method = scope.get("path", ""), scope.get("method", "")

        def only(allowed: str) -> None:
            if method != allowed:
                raise HttpError(405, "method_not_allowed", f"{method} not allowed on {_one_line(path, 80)}",
                                {"Allow": allowed})

        if path == "/v1/health":
            only("GET")
            return 200, {"ok": True, "version": API_VERSION, "kzprobe": __version__}, {}
        if path.startswith("/v1/schemas/"):
            only("GET")
            name = path.rsplit("/", 1)[1]
            if name not in SCHEMAS:
                raise HttpError(404, "not_found", f"no schema {_one_line(name, 60)!r}; there are {', '.join(SCHEMAS)}")
            return 200, json.loads(resources.files("kzprobe.collector").joinpath("schemas", name).read_text()), {}
        if path == "/v1/runs":
            only("POST")
            who = await self._authorize(scope)
            body = await self._read_body(scope, receive)
            ack = await self._work(lambda req: self.ingest.open_run(who, req), parse_open, body)
            log.info("run %s opened by %s", ack.uid, who)
            return 200, {"uid": ack.uid, "acked": ack.acked, "state": ack.state}, {}
        m = _RUN_PATH.match(path)
        if m is None:
            raise HttpError(404, "not_found", f"no such endpoint: {_one_line(path, 100)}")
        uid, action = m.group(1), m.group(2)
        if action is None:
            only("GET")
            who = await self._authorize(scope)
            ack = await self._work(lambda _: self.ingest.status(who, uid))
            return 200, {"uid": uid, "acked": ack.acked, "state": ack.state}, {}
        only("POST")
        who = await self._authorize(scope)
        body = await self._read_body(scope, receive)
        if action == "/observations":
            ack = await self._work(lambda batch: self.ingest.append(who, uid, batch), parse_batch, body)
            return 200, {"uid": uid, "acked": ack.acked, "stored": ack.stored, "duplicates": ack.duplicates}, {}
        ack, n = await self._work(lambda req: self.ingest.close_run(who, uid, req), parse_close, body)
        log.info("run %s closed by %s (%s, %d verdicts)", uid, who, ack.state, n)
        return 200, {"uid": uid, "acked": ack.acked, "state": ack.state, "verdicts": n}, {}
