"""ASGI plumbing shared by the internet-facing servers (the control helper, the collector).

Both had written it once each: the error type that becomes a JSON answer, header lookup, the
bounded and timed body read, and the Content-Length check in front of it.  One copy means one
place where a client's bytes are parsed before any route sees them.

Why the Content-Length parse is strict: the header arrives as bytes and is decoded as latin-1,
where ``"\\xb2"`` is ``"²"``; ``str.isdigit()`` accepts it (and Arabic-Indic digits, which
``int()`` even reads as a number) while ``int("²")`` raises.  RFC 9110 says ``1*DIGIT`` (ASCII),
and anything else is a 400 here -- never a traceback and a 500.  h11 and h2 reject such values
today, so this is the last line, not the only one.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ASCII_DIGITS = frozenset("0123456789")
#: More significant digits than this is more than any body limit (and int() of a few thousand
#: digits is refused by Python's int/str limit): such a length is treated as "too large".
_MAX_LENGTH_DIGITS = 18


class HttpError(Exception):
    """An answer to send instead of the route's: ``{"error": message, "code": code}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return {"error": self.message, "code": self.code}


def one_line(text: str, limit: int = 300) -> str:
    """Client-chosen text quoted in an answer or a log: one line, bounded."""
    return " ".join(text.split())[:limit]


def header(scope: Scope, name: bytes) -> str | None:
    """The first request header called ``name`` (lower-case bytes), decoded as latin-1."""
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return bytes(v).decode("latin-1")
    return None


def parse_content_length(value: str) -> int:
    """A Content-Length value as RFC 9110's ``1*DIGIT`` (ASCII digits, optional surrounding blanks).

    Raises :class:`HttpError` 400 for anything else.  A length of more than 18 significant digits
    comes back as ``10**18``: larger than any limit, and no int() of thousands of digits.
    """
    digits = value.strip(" \t")
    if not digits or not set(digits) <= _ASCII_DIGITS:
        raise HttpError(400, "bad_content_length", f"Content-Length is not a number: {one_line(value, 40)!r}")
    significant = digits.lstrip("0")
    if len(significant) > _MAX_LENGTH_DIGITS:
        return 10**_MAX_LENGTH_DIGITS
    return int(digits) if significant else 0


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length (None when absent); 400 when it is not a plain number."""
    value = header(scope, b"content-length")
    return None if value is None else parse_content_length(value)


async def read_body(scope: Scope, receive: Receive, limit: int, timeout: float, *, drain: int = 0) -> bytes:
    """Read the request body: at most ``limit`` bytes, all of it within ``timeout`` seconds.

    Raises :class:`HttpError`: 413 when the body (or its declared Content-Length) is over the
    limit, 408 when it does not arrive in time, 400 when the Content-Length is not a number or
    the client goes away first.

    ``drain``: up to this many bytes beyond ``limit`` are still read (and dropped) before the 413,
    so that a client still sending when the connection closes gets the 413's reason instead of a
    reset; past ``limit + drain`` the 413 comes at once.  When the time runs out, 408 wins.
    """
    hard = limit + drain
    too_large = HttpError(413, "too_large", f"request body over {limit} bytes")
    declared = declared_length(scope)
    if declared is not None and declared > hard:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout) as cs:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise HttpError(400, "disconnected", "client went away before the body was complete")
            chunk = bytes(msg.get("body", b""))
            size += len(chunk)
            if size > hard:
                raise too_large
            if size <= limit:
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
    if cs.cancelled_caught:
        raise HttpError(408, "body_timeout", f"request body not received within {timeout:g} s")
    if size > limit:
        raise too_large
    return b"".join(chunks)


def closes(scope: Scope, status: int) -> bool:
    """Should an answer with ``status`` end an HTTP/1 connection?  Every error does.

    An error is mostly answered before the request body was read (401, 429, 413 by the declared
    length), and a client such as httpx writes the body after the head.  hypercorn then ends the
    connection once the answer is out, without saying so; the client, told nothing, sends its next
    request on it and gets "server disconnected without sending a response" (seen in CI on the
    collector, after a run of 401s).  ``Connection: close`` says it.  HTTP/2 forbids the header,
    and its streams end on their own."""
    return status >= 400 and str(scope.get("http_version", "1.1")).startswith("1")


async def json_response(send: Send, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None,
                        *, close: bool = False) -> None:
    """Send ``payload`` as a complete JSON answer (never cached); ``headers`` are added as given;
    ``close`` (see :func:`closes`) ends the connection after it."""
    body = json.dumps(payload, ensure_ascii=False, default=str, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"cache-control", b"no-store")]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def serve_non_http(scope: Scope, receive: Receive, send: Send) -> bool:
    """Handle every scope that is not an HTTP request; True when done (the app returns at once).

    Lifespan events are acknowledged (neither server sets anything up there), WebSockets refused
    and unknown scope types ignored, as the ASGI spec allows.
    """
    kind = scope.get("type")
    if kind == "http":
        return False
    if kind == "lifespan":
        await lifespan(receive, send)
    elif kind == "websocket":
        await refuse_websocket(receive, send)
    return True


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer ASGI lifespan startup and shutdown (neither server has anything to set up there)."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def refuse_websocket(receive: Receive, send: Send) -> None:
    """Neither server speaks WebSocket: close with 1008 (policy violation)."""
    await receive()  # websocket.connect
    await send({"type": "websocket.close", "code": 1008})


__all__ = ["HttpError", "Message", "Receive", "Scope", "Send", "declared_length", "header", "json_response",
           "lifespan", "one_line", "parse_content_length", "read_body", "refuse_websocket", "serve_non_http"]
