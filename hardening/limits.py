"""Per-client rate and concurrency limits, and the connection cap.

Why keyed tables are LRU-capped: the key is chosen by whoever connects (an address, a token), so
an attacker cycling through addresses must not grow the table without bound.  When the table is
full the least recently seen key is forgotten, which at worst gives that client a fresh bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import math
import resource
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Clock = Callable[[], float]


class Limited(Exception):
    """A limit said no; ``retry_after`` is in seconds (what goes into ``Retry-After``)."""

    def __init__(self, what: str, retry_after: float) -> None:
        super().__init__(what)
        self.what = what
        self.retry_after = retry_after


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` takes whole seconds; never 0 (that invites an immediate retry storm)."""
    return str(max(1, math.ceil(seconds)))


def client_key(address: str | None, token: str | None = None) -> str:
    """Who a request counts against.

    A token holder is one client wherever it connects from (a probe behind changing NATs); without
    a token, the address.  IPv6 is grouped by /64: one subscriber gets a whole /64 and could
    otherwise mint a fresh client per request.
    """
    if token:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return "addr:" + (address or "?")[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"addr:{ip.ipv4_mapped}"
        return f"addr:{ipaddress.IPv6Network((int(ip) >> 64 << 64, 64))}"
    return f"addr:{ip}"


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token bucket per key: ``rate`` per second sustained, ``burst`` at once."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 65536, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, key: str) -> _Bucket:
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            b = _Bucket(self.burst, now)
            self._buckets[key] = b
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
            b.stamp = now
        return b

    def take(self, key: str, cost: float = 1.0) -> float:
        """Spend ``cost``; 0 if allowed, else seconds until it would be (nothing is spent then)."""
        b = self._bucket(key)
        if b.tokens >= cost:
            b.tokens -= cost
            return 0.0
        return (cost - b.tokens) / self.rate

    def charge(self, key: str, cost: float) -> None:
        """Debit ``cost`` after the fact (the work turned out heavier than one request): the
        bucket may go below zero, down to one burst's worth, which pushes the next request back."""
        if cost > 0:
            b = self._bucket(key)
            b.tokens = max(-self.burst, b.tokens - cost)

    def peek(self, key: str, cost: float = 1.0) -> float:
        """Like :meth:`take` without spending: seconds until ``cost`` is available (0: now)."""
        b = self._bucket(key)
        return 0.0 if b.tokens >= cost else (cost - b.tokens) / self.rate


class ConcurrencyLimiter:
    """At most ``per_key`` requests in flight per key."""

    def __init__(self, per_key: int, *, max_keys: int = 65536) -> None:
        if per_key < 1:
            raise ValueError("per_key must be >= 1")
        self.per_key = per_key
        self.max_keys = max_keys
        self._active: dict[str, int] = {}

    def active(self, key: str) -> int:
        return self._active.get(key, 0)

    def try_acquire(self, key: str) -> bool:
        n = self._active.get(key, 0)
        if n >= self.per_key or (n == 0 and len(self._active) >= self.max_keys):
            return False
        self._active[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self._active.get(key, 0) - 1
        if n <= 0:
            self._active.pop(key, None)
        else:
            self._active[key] = n

    @contextlib.contextmanager
    def slot(self, key: str, retry_after: float = 1.0) -> Iterator[None]:
        if not self.try_acquire(key):
            raise Limited(f"more than {self.per_key} requests at once", retry_after)
        try:
            yield
        finally:
            self.release(key)


def fd_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(requested: int, reserve: int = 256, limit: int | None = None) -> int:
    """The connection cap actually used: ``requested``, but always ``reserve`` fds below the limit.

    Each measurement opens sockets of its own (TCP per address, DNS, redirects); running out of
    fds there would turn every measurement into a bogus failure, so client connections get only
    what is left after that reserve.
    """
    limit = fd_limit() if limit is None else limit
    return max(1, min(requested, limit - reserve))


class ConnectionGate:
    """Counts open client connections; ``try_enter`` is False at the cap (close the connection).

    The simple form; :class:`ConnectionTable` also evicts idle connections to make room.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0
        self.refused = 0

    def try_enter(self) -> bool:
        if self.open >= self.cap:
            self.refused += 1
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open = max(0, self.open - 1)


@dataclass
class _Conn:
    key: str
    close: Callable[[], None]
    busy: int = 0


class ConnectionTable:
    """Open connections under a cap, with eviction of idle ones and a per-client share.

    A flood of idle connections (held open, never sending a request) from many addresses would
    fill any fixed cap and lock honest clients out.  So at the cap a new connection evicts the
    oldest connection that has no request in flight (``close`` is called for it); only when every
    connection is busy is the new one refused.  Servers call ``busy(conn_id, +1/-1)`` around each
    request.
    """

    def __init__(self, cap: int, per_client: int) -> None:
        self.cap = cap
        self.per_client = per_client
        self._conns: OrderedDict[object, _Conn] = OrderedDict()
        self._by_key: dict[str, int] = {}
        self.refused = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._conns)

    def open(self, conn_id: object, key: str, close: Callable[[], None]) -> bool:
        if self._by_key.get(key, 0) >= self.per_client and not self._evict(key):
            self.refused += 1
            return False
        if len(self._conns) >= self.cap and not self._evict(None):
            self.refused += 1
            return False
        self._conns[conn_id] = _Conn(key, close)
        self._by_key[key] = self._by_key.get(key, 0) + 1
        return True

    def _evict(self, key: str | None) -> bool:
        for cid, c in self._conns.items():
            if c.busy == 0 and (key is None or c.key == key):
                self.evicted += 1
                self._forget(cid)
                c.close()
                return True
        return False

    def _forget(self, conn_id: object) -> None:
        c = self._conns.pop(conn_id, None)
        if c is not None:
            n = self._by_key.get(c.key, 0) - 1
            if n <= 0:
                self._by_key.pop(c.key, None)
            else:
                self._by_key[c.key] = n

    def close(self, conn_id: object) -> None:
        self._forget(conn_id)

    def busy(self, conn_id: object, delta: int) -> None:
        c = self._conns.get(conn_id)
        if c is not None:
            c.busy = max(0, c.busy + delta)
            # Recently used connections go to the back of the eviction order.
            self._conns.move_to_end(conn_id)
