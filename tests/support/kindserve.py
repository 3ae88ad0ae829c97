"""Servers for the kind targets' tests: TCP endpoints that accept and hold, and a real HTTP CONNECT proxy.

Importable (threads, for the in-process probe tests on loopback) and runnable as a script inside a
test's network namespace (``python -m kzprobe.tests.support.kindserve --tcp 127.0.20.2:5222 --proxy
127.0.20.3:3128 --map example.com=127.0.20.5``), printing ``ready`` once every socket listens.

The proxy is a plain RFC 9110 CONNECT proxy: it reads the request head, answers ``200 Connection
established`` and relays bytes both ways.  It never resolves a name: ``--map NAME=IP`` is its whole
world (any other authority gets ``403``; ``NAME=IP:PORT`` also replaces the port asked for), so a
test can never make it reach beyond the addresses the test set up.  ``mode`` makes it misbehave
the way a broken or hostile proxy does.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
from collections.abc import Callable

#: The notice page of analysis/fingerprints.csv's kz_blockpage_zablokirovana.
BLOCKPAGE = ("<html><head><title>Blocked</title></head><body><h1>Страница заблокирована</h1>"
             "<p>Доступ к данному ресурсу ограничен по решению уполномоченного органа.</p></body></html>")


def _daemon(fn: Callable[..., None], *args: object) -> None:
    threading.Thread(target=fn, args=args, daemon=True).start()


def listen(addr: str, port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    return s


def _accept_loop(sock: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        _daemon(_guarded, handle, conn)


def _guarded(handle: Callable[[socket.socket], None], conn: socket.socket) -> None:
    try:
        handle(conn)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            conn.close()


def hold(conn: socket.socket) -> None:
    """A messaging endpoint or bridge: accept, then wait for the client to go (at most 30 s)."""
    conn.settimeout(30)
    with contextlib.suppress(OSError):
        while conn.recv(4096):
            pass


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class Proxy:
    """An HTTP CONNECT proxy.  ``mode``: "ok"; "forbid" (403 to every CONNECT); "garbage" (a reply
    that is not HTTP); "close" (closes after reading the request); "blockpage" (403 with the page
    Kazakh ISPs show, as an on-path box answering CONNECT in the proxy's place would)."""

    def __init__(self, names: dict[str, str], mode: str = "ok") -> None:
        self.names = names
        self.mode = mode
        self.requests: list[bytes] = []

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 16384:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        self.requests.append(head)
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        if self.mode == "close":
            return
        if self.mode == "garbage":
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
            return
        if self.mode == "blockpage":
            page = BLOCKPAGE.encode()
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html; charset=utf-8\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(page), page))
            return
        if len(parts) != 3 or parts[0] != "CONNECT" or self.mode == "forbid":
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        host, _, port = parts[1].rpartition(":")
        where = self.names.get(host.lower())
        if where is None or not port.isdigit():
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        ip, _, mapped = where.partition(":")
        try:
            upstream = socket.create_connection((ip, int(mapped or port)), timeout=5)
        except OSError:
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        conn.sendall(b"HTTP/1.1 200 Connection established\r\nProxy-Agent: kindserve\r\n\r\n")
        conn.settimeout(None)
        upstream.settimeout(None)
        t = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
        t.start()
        _pipe(conn, upstream)
        t.join(30)
        upstream.close()


def serve_tcp(sock: socket.socket) -> None:
    _daemon(_accept_loop, sock, hold)


def serve_proxy(sock: socket.socket, proxy: Proxy) -> None:
    _daemon(_accept_loop, sock, proxy.handle)


def _endpoint(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tcp", action="append", default=[], metavar="IP:PORT")
    ap.add_argument("--proxy", action="append", default=[], metavar="IP:PORT")
    ap.add_argument("--map", action="append", default=[], metavar="NAME=IP[:PORT]")
    args = ap.parse_args(argv)
    names = dict(m.split("=", 1) for m in args.map)
    for spec in args.tcp:
        serve_tcp(listen(*_endpoint(spec)))
    proxy = Proxy(names)
    for spec in args.proxy:
        serve_proxy(listen(*_endpoint(spec)), proxy)
    print("ready", flush=True)
    # Until the test kills us (or closes our stdin).
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.read()


if __name__ == "__main__":
    main()
