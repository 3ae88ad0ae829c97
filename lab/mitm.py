"""A TLS interception proxy for the DPI hop, like the one behind Kazakhstan's "national certificate".

``python -m kzprobe.lab.mitm CONFIG.json``.  The router's nat table redirects a site's port-443
flows here.  The proxy peeks at the ClientHello (MSG_PEEK, so nothing is consumed) and reads the
SNI.  For a listed name it completes the client's handshake with a certificate issued by the lab's
interception CA ("Qaznet Trust Network", the name of the real one), opens its own TLS connection
to the original destination (SO_ORIGINAL_DST) and relays.  Any other SNI is relayed untouched, as
the 2019 Kazakh interception did for names outside its list, so that a follow-up handshake with
a benign SNI shows the address itself is fine.

A thread per connection, not asyncio: peeking and then wrapping the same socket is simple with
plain sockets, and the lab's load is a handful of connections.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kzprobe.replay.parsers import client_hello_sni

SO_ORIGINAL_DST = 80


def original_dst(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


def _relay(a: Any, b: Any, idle: float = 30.0) -> None:
    """Copy both ways until either side closes, from one thread.

    One thread per connection, not one per direction: an SSL object must not be read in one thread
    while another writes to it (OpenSSL does not support that, and it stalls the first flight).
    """
    for s in (a, b):
        s.setblocking(False)
    try:
        while True:
            ready, _, _ = select.select([a, b], [], [], idle)
            if not ready:
                return
            for src in ready:
                dst = b if src is a else a
                while True:
                    try:
                        data = src.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                        break
                    if not data:
                        return
                    dst.setblocking(True)
                    dst.sendall(data)
                    dst.setblocking(False)
                    if not (isinstance(src, ssl.SSLSocket) and src.pending()):
                        break
    except (OSError, ssl.SSLError):
        return


class Proxy:
    def __init__(self, config: dict[str, Any]) -> None:
        self.contexts: dict[str, ssl.SSLContext] = {}
        for name, (cert, key) in config["certs"].items():
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self.contexts[name] = ctx
        self.upstream = ssl.create_default_context()
        # The interceptor does not care whether the real server's certificate is valid.
        self.upstream.check_hostname = False
        self.upstream.verify_mode = ssl.CERT_NONE

    def handle(self, client: socket.socket) -> None:
        client.settimeout(15)
        try:
            addr, port = original_dst(client)
            hello = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                hello = client.recv(16384, socket.MSG_PEEK)
                if not hello or len(hello) >= 5 + struct.unpack("!H", hello[3:5] or b"\0\0")[0]:
                    break
                time.sleep(0.01)
            name = client_hello_sni(hello)[1] if hello else None
            ctx = self.contexts.get(name or "")
            upstream = socket.create_connection((addr, port), timeout=10)
            if ctx is None:
                a, b = client, upstream
            else:
                a = ctx.wrap_socket(client, server_side=True)
                b = self.upstream.wrap_socket(upstream, server_hostname=name)
            _relay(a, b)
            for s in (a, b):
                s.close()
        except (OSError, ssl.SSLError):
            pass
        finally:
            client.close()


def serve(config: dict[str, Any]) -> None:
    proxy = Proxy(config)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(config["port"])))
    srv.listen(128)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if config.get("ready_file"):
        Path(config["ready_file"]).write_text("ready\n")
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=proxy.handle, args=(conn,), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    serve(json.loads(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
