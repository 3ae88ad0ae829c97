"""The lab's slow web server: the sites whose server must answer late (``server_delay``), over
HTTP and HTTPS, from one asyncio process.  Every other site is nginx's (lab/nginx.py); nginx
cannot wait before answering, and the HTTP injector's race needs a real server that loses.

Run as ``python -m kzprobe.lab.webserver CONFIG.json`` inside a lab namespace.  It binds each
site's address separately (never 0.0.0.0).  Bodies are the same generated pages as nginx serves,
gzip-compressed when the client accepts it.

HTTPS picks the certificate by SNI.  An unknown SNI (the probe's follow-up handshake with
``example.com``) still completes with a default certificate: that follow-up exists to show the
address itself is reachable, so the server must not be the one refusing it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from kzprobe.lab.pages import page

MAX_HEAD = 16384


class Server:
    def __init__(self, config: dict[str, Any]) -> None:
        self.sites: dict[str, dict[str, Any]] = config["sites"]
        self.default: dict[str, Any] | None = config.get("default_site")
        self.contexts: dict[str, ssl.SSLContext] = {}
        for name, (cert, key) in config.get("certs", {}).items():
            self.contexts[name] = self._context(cert, key)
        cert, key = config["default_cert"]
        self.default_context = self._context(cert, key)
        self.default_context.sni_callback = self._pick

    @staticmethod
    def _context(cert: str, key: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def _pick(self, sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        ctx = self.contexts.get((name or "").lower())
        if ctx is not None:
            sslobj.context = ctx

    def site_for(self, host: str) -> dict[str, Any] | None:
        host = host.split(":", 1)[0].strip().lower().rstrip(".")
        return self.sites.get(host) or self.default

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=15)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError,
                ssl.SSLError):
            writer.close()
            return
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, _target, _ = ([*lines[0].split(" "), "", "", ""])[:3]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            site = self.site_for(headers.get("host", ""))
            if site is None:
                status, body = "404 Not Found", page("Not found", "not-found", 1, content="<p>No such site.</p>")
                delay = 0.0
            else:
                status = "200 OK"
                body = page(site["title"], site.get("domain", ""), int(site.get("size", 0)),
                            content=site.get("content", ""))
                delay = float(site.get("delay", 0.0))
            if delay:
                await asyncio.sleep(delay)
            extra = ""
            if "gzip" in headers.get("accept-encoding", ""):
                # As nginx's gzip on does it, so a slow site is not the one uncompressed page.
                body, extra = gzip.compress(body, 5), "Content-Encoding: gzip\r\nVary: Accept-Encoding\r\n"
            resp = (
                f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n{extra}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nServer: kzprobe-lab\r\n\r\n"
            ).encode() + (body if method != "HEAD" else b"")
            writer.write(resp)
            await writer.drain()
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        finally:
            try:
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), timeout=5)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
                pass


async def serve(config: dict[str, Any]) -> None:
    server = Server(config)
    servers = []
    for addr in config["listen"]:
        servers.append(await asyncio.start_server(server.handle, addr, 80, reuse_address=True))
        servers.append(
            await asyncio.start_server(
                server.handle, addr, 443, ssl=server.default_context, reuse_address=True,
                ssl_handshake_timeout=15,
            )
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = config.get("ready_file")
    if ready:
        Path(ready).write_text("ready\n")
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(args[0]).read_text())
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
