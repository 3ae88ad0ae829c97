"""Accepting connections with a cap: hypercorn's trio worker loop, plus a gate per connection.

hypercorn's own ``serve`` accepts every connection the kernel hands it, so 1,100 idle
connections were enough to run the helper out of file descriptors (EMFILE), after which it could
not even open the sockets its measurements need.  This is the same loop (hypercorn's
``TCPServer`` serves each connection: HTTP/1.1, HTTP/2, TLS, its timeouts) with a
:class:`~kzprobe.hardening.ConnectionGate` in front: over the global cap, or over the per-client
share of it, a new connection is closed at once -- the fd is given back immediately, and the
connections already being served are untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from kzprobe.hardening import ConnectionGate, client_key

log = logging.getLogger("kzprobe.helper")


def _peer(stream: Any) -> str | None:
    inner = getattr(stream, "transport_stream", stream)
    try:
        return str(inner.socket.getpeername()[0])
    except (OSError, AttributeError, IndexError):
        return None


class ClientGate:
    """The global connection gate, plus at most ``per_client`` connections per client key."""

    def __init__(self, cap: int, per_client: int) -> None:
        self.gate = ConnectionGate(cap)
        self.per_client = per_client
        self.by_client: dict[str, int] = {}

    def try_enter(self, key: str) -> bool:
        if self.by_client.get(key, 0) >= self.per_client:
            self.gate.refused += 1
            return False
        if not self.gate.try_enter():
            return False
        self.by_client[key] = self.by_client.get(key, 0) + 1
        return True

    def leave(self, key: str) -> None:
        self.gate.leave()
        n = self.by_client.get(key, 0) - 1
        if n <= 0:
            self.by_client.pop(key, None)
        else:
            self.by_client[key] = n


async def serve_capped(app: Any, config: Any, gate: ClientGate, *,
                       shutdown_trigger: Callable[[], Awaitable[None]],
                       task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.trio.tcp_server import TCPServer
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.utils import repr_socket_addr, wrap_app

    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    sockets = config.create_sockets()
    listeners: list[Any] = []
    binds: list[str] = []
    ssl_context = config.create_ssl_context()
    for sock in sockets.secure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SSLListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                                          ssl_context, https_compatible=True))
        binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")

    async def handle(stream: Any) -> None:
        key = client_key(_peer(stream))
        if not gate.try_enter(key):
            await trio.aclose_forcefully(stream)
            return
        try:
            await TCPServer(wrapped, config, context, {}, stream)
        finally:
            gate.leave(key)

    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accept:
            accept.start_soon(lambda: trio.serve_listeners(handle, listeners, handler_nursery=connections))
            task_status.started(binds)
            await shutdown_trigger()
            accept.cancel_scope.cancel()
        # Graceful: keep-alive connections close after their current request; then a hard deadline.
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
