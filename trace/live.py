"""Live TTL-limited sweeps (being written)."""

from __future__ import annotations

from kzprobe.trace.decide import TraceResult


class TraceError(Exception):
    """A live trace that cannot run; the message is a one-line CLI error."""


def trace(host: str, address: str, **kw: object) -> TraceResult:
    raise TraceError("live tracing is not implemented yet")
