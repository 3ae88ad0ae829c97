"""The hardening layer shared by kzprobe's internet-facing services (the control helper, the collector).

Small building blocks; nothing here knows about HTTP frameworks, routes or the probe engine, so
any server can call them around its own request handling.  Apart from the ASGI body read, everything
is synchronous, O(1) per call and bounded in memory (keyed tables are LRU-capped): a flood of
distinct clients cannot grow them without limit.

Clients (:mod:`kzprobe.hardening.limits`)
    ``client_key(address, token=None) -> str``
        Who a request counts against: the token's fingerprint when a valid token is used, else the
        address (IPv4 /32, IPv6 /64 -- one subscriber usually holds a whole /64).
    ``RateLimiter(rate, burst, max_keys=)`` and ``.take(key) -> float``
        Token bucket per key; ``take`` returns 0 when allowed, else the seconds to wait (the
        ``Retry-After`` value; ``retry_after_header(seconds)`` formats it).  ``.charge(key, cost)``
        debits after the fact what a request turned out to cost beyond its first unit.
    ``ConcurrencyLimiter(per_key, max_keys=)`` and ``.try_acquire(key) -> bool`` / ``.release(key)``
        (or ``with limiter.slot(key)``, raising :class:`Limited`): in-flight requests per key.
    ``connection_cap(requested, reserve=) -> int``
        A connection cap strictly below RLIMIT_NOFILE minus ``reserve`` fds for everything else
        (outgoing measurement sockets, DNS, logs).  ``ConnectionGate(cap)``: ``try_enter()`` /
        ``leave()`` around each accepted connection; over the cap, close it at once.
        ``ConnectionTable(cap, per_client)``: ``open(conn_id, key, close) -> bool`` / ``close(conn_id)``
        / ``busy(conn_id, +1|-1)``; at the cap (or the client's share) the oldest *idle* connection is
        evicted (its ``close`` callback runs), so held-open idle connections cannot lock others out.

Tokens (:mod:`kzprobe.hardening.tokens`)
    ``new_token() -> str`` (32 random bytes, URL-safe), ``token_problem(token) -> str | None``
    (why a configured token is too weak: under ``MIN_TOKEN_BYTES`` = 16 bytes, whitespace).
    ``TokenGuard(token, failures=RateLimiter)`` and ``.check(client, authorization) -> Auth``:
    constant-time comparison of SHA-256 digests (equal length whatever was sent), and failed
    attempts rate-limited per client: once a client is over its failure budget, ``check`` answers
    ``Auth.LOCKED`` with a retry time *without comparing at all*, so guessing is throttled.

Budgets (:mod:`kzprobe.hardening.budget`)
    ``Budget(fetches=, bytes=, dns_answers=)``: what one request may cost.  ``charge_fetch()``,
    ``charge_bytes(n)`` raise :class:`BudgetExceeded` (its ``failure`` is an OONI-style string);
    ``cost()`` is what the request used, in plain-request units (feed it to ``RateLimiter.charge``);
    ``trim(seq, limit)`` cuts what goes back to the client.  ``current_budget()`` / ``budget_scope(b)``
    carry the request's budget through a context variable, so hooks deep in an HTTP client (which
    run in the request's task or its children) charge the right request.

ASGI plumbing (:mod:`kzprobe.hardening.asgi`; imports trio, so it is not re-exported here)
    ``HttpError(status, code, message, headers)``: the one error a route raises; ``json_response``
    sends it (or any payload) as ``{"error", "code"}`` JSON.  ``header(scope, name)``,
    ``parse_content_length(value)`` (ASCII ``1*DIGIT`` only, else 400), and
    ``read_body(scope, receive, limit, timeout, drain=0)``: the bounded, timed body read (413 over
    the limit or its declared length, 408 too slow, 400 bad length or client gone).

Errors (:mod:`kzprobe.hardening.scrub`)
    ``scrub(text) -> str``: removes IP addresses, host:port endpoints, URLs and file paths, as
    OONI's netxlite scrubber does before an error string leaves the machine.
    ``scrub_failure(failure) -> str | None``: keeps OONI failure strings as they are and reduces
    ``unknown_failure: ...`` to a scrubbed, bounded text without Python type names or errno dumps.
"""

from kzprobe.hardening.budget import Budget, BudgetExceeded, budget_scope, current_budget, trim
from kzprobe.hardening.limits import (
    ConcurrencyLimiter,
    ConnectionGate,
    ConnectionTable,
    Limited,
    RateLimiter,
    client_key,
    connection_cap,
    retry_after_header,
)
from kzprobe.hardening.scrub import scrub, scrub_failure
from kzprobe.hardening.tokens import MIN_TOKEN_BYTES, Auth, TokenGuard, new_token, token_problem

__all__ = [
    "MIN_TOKEN_BYTES",
    "Auth",
    "Budget",
    "BudgetExceeded",
    "ConcurrencyLimiter",
    "ConnectionGate",
    "ConnectionTable",
    "Limited",
    "RateLimiter",
    "TokenGuard",
    "budget_scope",
    "client_key",
    "connection_cap",
    "current_budget",
    "new_token",
    "retry_after_header",
    "scrub",
    "scrub_failure",
    "token_problem",
    "trim",
]
