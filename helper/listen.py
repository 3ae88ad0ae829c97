"""Accepting connections with a cap: hypercorn's trio worker loop, plus a table of connections.

hypercorn's own ``serve`` accepts every connection the kernel hands it, so 1,100 idle
connections were enough to run the helper out of file descriptors (EMFILE), after which it could
not even open the sockets its measurements need.  This is the same loop (hypercorn's
``TCPServer`` serves each connection: HTTP/1.1, HTTP/2, TLS, its timeouts) with a
:class:`~kzprobe.hardening.ConnectionTable` in front: at the global cap, or at a client's share of
it, the oldest idle connection is closed to make room, and when none is idle the new connection
is closed at once (its fd given back immediately).
"""

from __future__ import annotations

import logging
import select
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from kzprobe.hardening import ConnectionTable, client_key

log = logging.getLogger("kzprobe.helper")


def _socket(stream: Any) -> Any:
    inner = getattr(stream, "transport_stream", stream)
    return getattr(inner, "socket", None)


def _peer(sock: Any) -> tuple[str, int] | None:
    try:
        name = sock.getpeername()
        return str(name[0]), int(name[1])
    except (OSError, AttributeError, IndexError, TypeError, ValueError):
        return None


class Connections:
    """The helper's open client connections, keyed by peer (host, port) as ASGI's scope["client"].

    Two jobs: the cap (a :class:`~kzprobe.hardening.ConnectionTable`, which evicts idle
    connections first), and telling the app that a client has gone away.  hypercorn reports a
    hang-up as http.disconnect only once it reads the EOF, and it pauses reading an HTTP/1.1
    connection with unconsumed data buffered; :meth:`gone` polls the socket itself (POLLRDHUP: the
    peer shut down its side, whether or not unread data is pending).
    """

    def __init__(self, cap: int, per_client: int) -> None:
        self.table = ConnectionTable(cap, per_client)
        self.sockets: dict[tuple[str, int], Any] = {}

    def _peer_of(self, scope: Any) -> tuple[str, int] | None:
        client = scope.get("client") if hasattr(scope, "get") else None
        if not client:
            return None
        try:
            return str(client[0]), int(client[1])
        except (TypeError, ValueError, IndexError):
            return None

    def busy(self, scope: Any, delta: int) -> None:
        peer = self._peer_of(scope)
        if peer is not None:
            self.table.busy(peer, delta)

    def gone(self, scope: Any) -> bool:
        peer = self._peer_of(scope)
        sock = self.sockets.get(peer) if peer is not None else None
        if sock is None:
            return False
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))
        except (OSError, ValueError):
            return True


async def serve_capped(app: Any, config: Any, conns: Connections, *,
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
        sock = _socket(stream)
        peer = _peer(sock)
        if peer is None:
            await trio.aclose_forcefully(stream)
            return
        scope = trio.CancelScope()
        if not conns.table.open(peer, client_key(peer[0]), scope.cancel):
            await trio.aclose_forcefully(stream)
            return
        conns.sockets[peer] = sock
        try:
            with scope:
                await TCPServer(wrapped, config, context, {}, stream)
        finally:
            conns.table.close(peer)
            conns.sockets.pop(peer, None)
            if scope.cancelled_caught:
                await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accept:
            accept.start_soon(lambda: trio.serve_listeners(handle, listeners, handler_nursery=connections))
            task_status.started(binds)
            await shutdown_trigger()
            accept.cancel_scope.cancel()
        # Graceful: keep-alive connections close after their current request; then a hard deadline.
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
