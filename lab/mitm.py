"""A TLS interception proxy for the DPI hop, like the one behind Kazakhstan's "national certificate".

``python -m kzprobe.lab.mitm CONFIG.json``.  The router's nat table redirects a site's port-443
flows here; the proxy completes the client's handshake with a certificate for the requested SNI
issued by the lab's interception CA ("Qaznet Trust Network", the name of the real one), then
opens its own TLS connection to the original destination (SO_ORIGINAL_DST) and relays bytes.
A client that does not trust that CA sees an unknown-authority failure; one that does sees the
site, through the middlebox.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import struct
import sys
from pathlib import Path
from typing import Any

SO_ORIGINAL_DST = 80


def original_dst(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


class Proxy:
    def __init__(self, config: dict[str, Any]) -> None:
        self.contexts: dict[str, ssl.SSLContext] = {}
        for name, (cert, key) in config["certs"].items():
            self.contexts[name] = self._context(cert, key)
        cert, key = config["default_cert"]
        self.server_ctx = self._context(cert, key)
        self.server_ctx.sni_callback = self._pick
        self.sni: dict[int, str] = {}
        self.upstream = ssl.create_default_context()
        # The interceptor does not care whether the real server's certificate is valid; real ones
        # often do not either.
        self.upstream.check_hostname = False
        self.upstream.verify_mode = ssl.CERT_NONE

    @staticmethod
    def _context(cert: str, key: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx

    def _pick(self, sslobj: Any, name: str | None, _: ssl.SSLContext) -> None:
        self.sni[id(sslobj)] = name or ""
        ctx = self.contexts.get((name or "").lower())
        if ctx is not None:
            sslobj.context = ctx

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sslobj = writer.get_extra_info("ssl_object")
        name = self.sni.pop(id(sslobj), "") if sslobj is not None else ""
        try:
            addr, port = original_dst(sock)
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(addr, port, ssl=self.upstream, server_hostname=name or None),
                timeout=10,
            )
        except (OSError, ssl.SSLError, TimeoutError):
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))

    @staticmethod
    async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        finally:
            try:
                w.close()
            except (OSError, RuntimeError):
                pass


async def serve(config: dict[str, Any]) -> None:
    proxy = Proxy(config)
    server = await asyncio.start_server(
        proxy.handle, "0.0.0.0", int(config["port"]), ssl=proxy.server_ctx, reuse_address=True,
        ssl_handshake_timeout=15,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.get("ready_file"):
        Path(config["ready_file"]).write_text("ready\n")
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    asyncio.run(serve(json.loads(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
