"""Per-request budgets: what one request may make the server do, and how much it may get back.

Why a context variable: the costs are incurred deep inside an HTTP client's hooks and streams,
which run in the request's own task or its children (trio copies the context into spawned
tasks), so the hook finds the right request's budget without any plumbing through the engine.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

#: OONI has no string for "the measuring side stopped on purpose"; netxlite's generic form for a
#: failure of its own making is ``unknown_failure: <text>``.  The text names the budget, so the
#: probe can tell it from anything the network did.
BUDGET_FAILURE = "unknown_failure: request budget exhausted"


class BudgetExceeded(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(f"{BUDGET_FAILURE} ({what})")
        self.what = what
        self.failure = f"{BUDGET_FAILURE} ({what})"


@dataclass
class Budget:
    """Limits for one request; ``used_*`` count what was spent."""

    fetches: int = 16
    bytes: int = 1024 * 1024
    dns_answers: int = 16
    used_fetches: int = 0
    used_bytes: int = 0
    #: Answers received (before trimming): a name with thousands of records costs work too.
    seen_answers: int = 0
    exhausted: list[str] = field(default_factory=list)

    def cost(self) -> float:
        """What the request cost, in units of a plain one-fetch request (for ``RateLimiter.charge``):
        each further HTTP request half a unit, each 256 KiB downloaded one, each 250 DNS answers one
        (thousands of records cost the resolver, and the system resolver's retry over TCP, real work)."""
        return (1.0 + 0.5 * max(0, self.used_fetches - 1) + self.used_bytes / (256 * 1024)
                + self.seen_answers / 250)

    def charge_fetch(self) -> None:
        if self.used_fetches >= self.fetches:
            self._exhaust(f"over {self.fetches} HTTP requests")
        self.used_fetches += 1

    def charge_bytes(self, n: int) -> None:
        self.used_bytes += n
        if self.used_bytes > self.bytes:
            self._exhaust(f"over {self.bytes} bytes downloaded")

    def _exhaust(self, what: str) -> None:
        if what not in self.exhausted:
            self.exhausted.append(what)
        raise BudgetExceeded(what)


_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("kzprobe_budget", default=None)


def current_budget() -> Budget | None:
    return _current.get()


@contextlib.contextmanager
def budget_scope(budget: Budget) -> Iterator[Budget]:
    reset = _current.set(budget)
    try:
        yield budget
    finally:
        _current.reset(reset)


def trim(items: Sequence[T], limit: int) -> list[T]:
    return list(items[:max(0, limit)])
