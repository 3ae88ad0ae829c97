"""TCP step: one explicit connect to one address (no happy eyeballs: we measure *that* address)."""

from __future__ import annotations

import socket

import trio

from kzprobe import errors as E
from kzprobe.model import STEP_TCP, Observation, now


async def connect(target: str, domain: str, address: str, port: int, timeout: float, *,
                  purpose: str = "measure", attempt: int = 0, vantage: str = "probe",
                  source: str | None = None) -> tuple[Observation, trio.SocketStream | None]:
    """Connect; return the observation and, on success, the open stream (caller closes it)."""
    t0 = now()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    failure: str | None = None
    stream: trio.SocketStream | None = None
    try:
        if source:
            # A chosen source address (multi-homed vantage points, and the loopback tests,
            # which tell probe from control by it).
            await sock.bind((source, 0))
        with trio.fail_after(timeout):
            await sock.connect((address, port))
        stream = trio.SocketStream(sock)
    except (OSError, trio.TooSlowError) as exc:
        failure = E.failure_string(exc)
        sock.close()
    obs = Observation(step=STEP_TCP, target=target, domain=domain, address=address, port=port,
                      t_start=t0, t_end=now(), failure=failure, purpose=purpose, attempt=attempt,
                      vantage=vantage)
    return obs, stream
