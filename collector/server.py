"""Serving the collector app with hypercorn's trio worker (the helper's pattern)."""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import trio

from kzprobe.collector.app import CollectorApp, Limits
from kzprobe.collector.ingest import Ingest
from kzprobe.collector.tokens import Verifier
from kzprobe.storage import Store


@dataclass
class CollectorOptions:
    db: str
    host: str = "127.0.0.1"
    port: int = 8790
    log_addresses: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    limits: Limits = field(default_factory=Limits)

    @property
    def bind(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def hypercorn_config(opts: CollectorOptions) -> Any:
    from hypercorn.config import Config

    hc = Config()
    hc.bind = [opts.bind]
    hc.accesslog = None  # an access log would hold client addresses; ours logs them only if asked
    hc.errorlog = "-"
    hc.loglevel = "WARNING"
    hc.include_server_header = False
    hc.keep_alive_timeout = opts.limits.header_timeout
    hc.read_timeout = math.ceil(opts.limits.header_timeout)
    hc.h11_max_incomplete_size = 16 * 1024
    hc.graceful_timeout = 2.0
    hc.shutdown_timeout = 5.0
    if opts.tls_cert and opts.tls_key:
        hc.certfile, hc.keyfile = opts.tls_cert, opts.tls_key
    return hc


def make_app(store: Store, opts: CollectorOptions) -> CollectorApp:
    limits = opts.limits
    if store.engine.dialect.name == "sqlite":
        limits.writers = 1  # SQLite has one writer; more threads would only wait on its lock
    return CollectorApp(Ingest(store), Verifier(store.session), limits=limits, log_addresses=opts.log_addresses)


async def serve(opts: CollectorOptions, store: Store, *, ready: Callable[[str], None]) -> None:
    """Run until SIGINT or SIGTERM; calls ``ready(url)`` once the socket is listening."""
    from hypercorn.trio import serve as hypercorn_serve

    app = make_app(store, opts)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def shutdown_trigger() -> None:
            async for _ in signals:
                return

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn_serve, cast(Any, app), hypercorn_config(opts),
                                                shutdown_trigger=shutdown_trigger, mode="asgi"))
            ready(binds[0] if binds else opts.bind)
