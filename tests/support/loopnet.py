"""The loopback test network: a censored "ISP" built from threads on 127.0.0.0/8, no root needed.

tests/conftest.py starts it once per session as the ``loopnet`` fixture.

Why threads and plain sockets rather than trio: kzprobe runs under trio in a *subprocess*; the
network must keep answering while a test blocks on that subprocess, and a handful of daemon
threads is the least machinery that does so.  Every address is on loopback, so nothing here can
ever send a packet off the host.

Layout (one HTTPS port and one HTTP port, the same on every address, so a target URL's port
holds whichever address a resolver hands out):

=================  ==========================================================================
127.0.0.53         "ISP resolver" (UDP+TCP): per-name behaviour, see ``ISP_ANSWERS``
127.0.0.54         "public resolver": every known name resolves to its genuine address
127.0.10.1         origin: valid certificate for every test name and for example.com
127.0.10.2         a CDN edge: another genuine address, valid certificate too
127.0.10.3         a parked server: certificate for another name, another page
127.0.10.4         a blockpage server (the ISP's notice page)
127.0.10.5         a slow origin: answers HTTP after ~1 s
127.0.10.6         full accept queue: SYNs are dropped, so connects time out
127.0.10.7         nothing listens: connection refused (down for everyone)
127.0.10.8         middlebox in front of the origin: reset / stall / blockpage / MITM by SNI or Host
127.0.10.9         an origin for the iptables "dropped SYN" case (root only)
127.0.10.10        tarpit: accepts and never answers (for long runs to interrupt)
127.0.10.11        a broken site: certificate from a CA nobody trusts (probe and control alike)
127.0.10.12        a blockpage server that compresses as nginx does (gzip on, chunked)
127.0.10.14        a slow path: a second middlebox that shapes every name for the censored source
127.0.10.13        a CDN edge whose valid chain has an intermediate and a leaf without SKI/AKI (gzip on)
127.0.10.15        an ISP redirector: certificate for another name, a 301 to the blockpage host
127.0.10.250       the address an injector forges (nothing listens)
=================  ==========================================================================

The origin also redirects as real sites do (http -> https -> www: ``REDIRECT_CHAINS``), and the
middlebox can throttle a name (forward, pacing the server's bytes at ``THROTTLE_RATE``).

The middlebox only interferes with clients whose source address is ``CENSORED_SOURCE``
(127.0.0.2, kzprobe's ``--source-address``): the control helper connects from 127.0.0.1 and sees
the genuine site, as a vantage outside the censored network would.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import trustme

ISP_DNS_ADDR = "127.0.0.53"
PUBLIC_DNS_ADDR = "127.0.0.54"
CENSORED_SOURCE = "127.0.0.2"

ORIGIN = "127.0.10.1"
CDN_EDGE = "127.0.10.2"
PARKED = "127.0.10.3"
BLOCKPAGE_SERVER = "127.0.10.4"
SLOW = "127.0.10.5"
BACKLOG_FULL = "127.0.10.6"
NOTHING = "127.0.10.7"
MIDDLEBOX = "127.0.10.8"
DROP_ORIGIN = "127.0.10.9"
TARPIT = "127.0.10.10"
BADCERT = "127.0.10.11"
GZIP_BLOCKPAGE = "127.0.10.12"
CDN_NOAKI = "127.0.10.13"
SLOWPATH = "127.0.10.14"
REDIRECTOR = "127.0.10.15"
FORGED = "127.0.10.250"
#: A bogon answer that is still safe to connect to: Linux routes 0.0.0.0 to the local host.
#: (10.x would be a real private address: a connect would leave loopback.)
BOGON = "0.0.0.0"

BLOCKPAGE_TEXT = "Страница заблокирована"
MITM_ORG = "Qaznet Trust Network"
SLOW_DELAY = 1.0
INJECT_DELAY = 0.05
#: Bytes per second the middlebox lets through for a throttled name, and the page it slows down.
THROTTLE_RATE = 16 * 1024
BIG_PAGE_BYTES = 48 * 1024
BIG_PAGES = frozenset({"throttle.test", "slowpath.test"})
TARPIT_NAMES = tuple(f"tarpit{i:02d}.test" for i in range(40))

# name -> (genuine address, what the ISP resolver does).  Actions:
#   ("a", ADDR)      answer ADDR              ("nx",)      NXDOMAIN
#   ("servfail",)    SERVFAIL                 ("silent",)  never answer
#   ("inject", ADDR) UDP: forged ADDR first, the genuine answer INJECT_DELAY later (TCP: genuine)
SITES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ok.test": (ORIGIN, ("a", ORIGIN)),
    "nx.test": (ORIGIN, ("nx",)),
    "servfail.test": (ORIGIN, ("servfail",)),
    "silent.test": (ORIGIN, ("silent",)),
    "poison.test": (ORIGIN, ("a", PARKED)),
    "bogon.test": (ORIGIN, ("a", BOGON)),
    "dnsblockpage.test": (ORIGIN, ("a", BLOCKPAGE_SERVER)),
    "injected.test": (ORIGIN, ("inject", FORGED)),
    "cdn.test": (ORIGIN, ("a", CDN_EDGE)),
    "slow.test": (SLOW, ("a", SLOW)),
    "tcptimeout.test": (BACKLOG_FULL, ("a", BACKLOG_FULL)),
    "down.test": (NOTHING, ("a", NOTHING)),
    "tlsreset.test": (MIDDLEBOX, ("a", MIDDLEBOX)),
    "tlsstall.test": (MIDDLEBOX, ("a", MIDDLEBOX)),
    "httpreset.test": (MIDDLEBOX, ("a", MIDDLEBOX)),
    "injectpage.test": (MIDDLEBOX, ("a", MIDDLEBOX)),
    "mitm.test": (MIDDLEBOX, ("a", MIDDLEBOX)),
    "dropped.test": (DROP_ORIGIN, ("a", DROP_ORIGIN)),
    "badcert.test": (BADCERT, ("a", BADCERT)),
    "gzblockpage.test": (ORIGIN, ("a", GZIP_BLOCKPAGE)),
    "noaki.test": (ORIGIN, ("a", CDN_NOAKI)),
    "redirect.test": (ORIGIN, ("a", ORIGIN)),
    "www.redirect.test": (MIDDLEBOX, ("a", MIDDLEBOX)),
    "okredirect.test": (ORIGIN, ("a", ORIGIN)),
    "www.okredirect.test": (ORIGIN, ("a", ORIGIN)),
    "throttle.test": (MIDDLEBOX, ("a", MIDDLEBOX)),
    "slowpath.test": (SLOWPATH, ("a", SLOWPATH)),
    # The middlebox answers this Host with a 302 to the ISP's notice page, served by nginx.
    "redirinject.test": (MIDDLEBOX, ("a", MIDDLEBOX)),
    "warning.test": (GZIP_BLOCKPAGE, ("a", GZIP_BLOCKPAGE)),
    # The ISP points this name at its redirector, which answers (behind a certificate for another
    # name) with a 301 to its blockpage host: only a peek that follows the redirect sees the page.
    "peekredirect.test": (ORIGIN, ("a", REDIRECTOR)),
    "blocked.isp.test": (BLOCKPAGE_SERVER, ("a", BLOCKPAGE_SERVER)),
    **{n: (TARPIT, ("a", TARPIT)) for n in TARPIT_NAMES},
}

#: Middlebox rules: name seen in the SNI (TLS) or Host (HTTP) -> action.
MIDDLEBOX_RULES: dict[str, str] = {
    "tlsreset.test": "rst",
    "tlsstall.test": "stall",
    "httpreset.test": "rst",
    "injectpage.test": "blockpage",
    "mitm.test": "mitm",
    # The last hop of redirect.test's chain (http -> https -> www) is reset by SNI.
    "www.redirect.test": "rst",
    "throttle.test": "throttle",
    "redirinject.test": "redirect",
}

#: name -> (the http:// URL's Location, the https:// URL's Location); "{https}" is the HTTPS port.
#: http -> https on the same name, then apex -> www, as many real sites do.
REDIRECT_CHAINS: dict[str, tuple[str, str]] = {
    "redirect.test": ("https://redirect.test:{https}/", "https://www.redirect.test:{https}/"),
    "okredirect.test": ("https://okredirect.test:{https}/", "https://www.okredirect.test:{https}/"),
}

SERVER_ADDRESSES = (ORIGIN, CDN_EDGE, PARKED, BLOCKPAGE_SERVER, SLOW, MIDDLEBOX, DROP_ORIGIN, TARPIT, BADCERT,
                    GZIP_BLOCKPAGE, CDN_NOAKI, SLOWPATH, REDIRECTOR)


# --- small socket helpers ------------------------------------------------------------------------
def _daemon(target: Callable[..., Any], *args: Any) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN: what a censor's reset looks like to the client."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _read_request(conn: socket.socket | ssl.SSLSocket, limit: int = 65536) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf and len(buf) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def host_of(request: bytes) -> str | None:
    for line in request.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            return value.strip().decode("latin-1").rsplit(":", 1)[0].lower() if b"]" not in value else None
    return None


def sni_of(hello: bytes) -> str | None:
    """The server_name in a TLS ClientHello (first record), parsed by hand: no library does it."""
    try:
        if len(hello) < 5 or hello[0] != 0x16:
            return None
        rec_len = struct.unpack("!H", hello[3:5])[0]
        body = hello[5 : 5 + rec_len]
        if body[0] != 0x01:
            return None
        p = 4 + 2 + 32  # handshake header, client_version, random
        p += 1 + body[p]  # session id
        p += 2 + struct.unpack("!H", body[p : p + 2])[0]  # cipher suites
        p += 1 + body[p]  # compression methods
        ext_end = p + 2 + struct.unpack("!H", body[p : p + 2])[0]
        p += 2
        while p + 4 <= ext_end:
            etype, elen = struct.unpack("!HH", body[p : p + 4])
            p += 4
            if etype == 0:  # server_name: list len, then (type, len, name)
                q = p + 2
                while q + 3 <= p + elen:
                    ntype, nlen = body[q], struct.unpack("!H", body[q + 1 : q + 3])[0]
                    if ntype == 0:
                        return body[q + 3 : q + 3 + nlen].decode("ascii").lower()
                    q += 3 + nlen
            p += elen
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


def _peek_first_bytes(conn: socket.socket, wait: float = 2.0) -> bytes:
    """Peek (without consuming) until a whole TLS record or HTTP header block is there.

    Peeking lets the middlebox hand the untouched stream to a TLS server (MITM) or a forwarder.
    """
    deadline = time.monotonic() + wait
    data = b""
    while time.monotonic() < deadline:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = conn.recv(65536, socket.MSG_PEEK)
        except (TimeoutError, OSError):
            return data
        if not data:
            return b""
        if data[0] == 0x16 and len(data) >= 5:
            if len(data) >= 5 + struct.unpack("!H", data[3:5])[0]:
                return data
        elif b"\r\n\r\n" in data:
            return data
        time.sleep(0.005)
    return data


@functools.lru_cache(maxsize=8)
def _big_text(host: str) -> str:
    """Words drawn from a per-host seed: the same page every time, and no compressor shrinks it
    to nothing (a throttled transfer must take a while)."""
    rng = random.Random(host)
    words = ["сайт", "news", "Алматы", "report", "данные", "archive", "page", "статья"]
    text: list[str] = []
    size = 0
    while size < BIG_PAGE_BYTES:
        text.append(rng.choice(words) + str(rng.randrange(10**6)))
        size += len(text[-1]) + 1
    return " ".join(text)


def page(host: str, body: str = "") -> bytes:
    # The title depends on the Host only, so every genuine address (origin, CDN edge) serves the
    # "same page" and control comparisons do not see a difference that is not there.
    if not body and host in BIG_PAGES:
        body = _big_text(host)
    html = (f"<html><head><title>{host} home</title></head><body><h1>Welcome to {host}</h1>"
            f"<p>{body or 'Genuine content. ' * 40}</p></body></html>")
    return html.encode()


def http_response(body: bytes, status: str = "200 OK", headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + body


def gzip_response(body: bytes) -> bytes:
    """What nginx's ``gzip on`` sends for HTML: gzip, chunked, no Content-Length."""
    import gzip

    packed = gzip.compress(body)
    chunks = b"".join(f"{len(packed[i:i + 4096]):x}\r\n".encode() + packed[i:i + 4096] + b"\r\n"
                      for i in range(0, len(packed), 4096))
    return (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\nVary: Accept-Encoding\r\n"
            b"Content-Encoding: gzip\r\n\r\n" + chunks + b"0\r\n\r\n")


def accepts_gzip(request: bytes) -> bool:
    for line in request.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"accept-encoding":
            return b"gzip" in value.lower()
    return False


def blockpage_body() -> bytes:
    return (f"<html><head><title>Blocked</title></head><body><h1>{BLOCKPAGE_TEXT}</h1>"
            "<p>Доступ к данному ресурсу ограничен по решению уполномоченного органа.</p></body></html>").encode()


# --- servers -------------------------------------------------------------------------------------
class Listener:
    """A TCP listening socket with an accept loop; ``handle(conn, peer)`` runs in its own thread."""

    def __init__(self, sock: socket.socket, handle: Callable[[socket.socket, tuple[str, int]], None]) -> None:
        self.sock = sock
        self.handle = handle
        self.closed = False

    def start(self) -> None:
        _daemon(self._loop)

    def _loop(self) -> None:
        while not self.closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            _daemon(self._guarded, conn, peer)

    def _guarded(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            self.handle(conn, peer)
        except (OSError, ssl.SSLError, ValueError):
            pass  # a client that goes away mid-answer is the normal case here
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


def _server_ctx(cert: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass
class WebBehaviour:
    ctx: ssl.SSLContext | None
    delay: float = 0.0
    body: Callable[[str], bytes] = page
    #: nginx's ``gzip on``: compress when the client accepts it.
    gzip: bool = False
    #: Host -> Location: answer 301 instead of the page.
    redirects: dict[str, str] = field(default_factory=dict)


def serve_web(conn: socket.socket, b: WebBehaviour) -> None:
    """One HTTP(S) exchange: optional TLS, read the request, (wait), answer, close."""
    conn.settimeout(10)
    stream: socket.socket | ssl.SSLSocket = conn
    if b.ctx is not None:
        stream = b.ctx.wrap_socket(conn, server_side=True)
    req = _read_request(stream)
    if not req:
        return
    if b.delay:
        time.sleep(b.delay)
    host = host_of(req) or "unknown"
    if host in b.redirects:
        stream.sendall(http_response(b"<html><body>Moved</body></html>", "301 Moved Permanently",
                                     {"Location": b.redirects[host]}))
    elif b.gzip and accepts_gzip(req):
        stream.sendall(gzip_response(b.body(host)))
    else:
        stream.sendall(http_response(b.body(host)))
    with contextlib.suppress(OSError, ssl.SSLError):
        if isinstance(stream, ssl.SSLSocket):
            stream.unwrap()


def _pipe(src: socket.socket, dst: socket.socket, rate: int | None = None) -> None:
    try:
        while True:
            chunk = src.recv(1024 if rate else 65536)
            if not chunk:
                break
            dst.sendall(chunk)
            if rate:
                # A shaper with no burst allowance: each KiB waits its turn, idle time earns nothing.
                time.sleep(len(chunk) / rate)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@dataclass
class Middlebox:
    """A userspace on-path box: decides on the first client bytes, then acts or forwards."""

    backend: str
    rules: dict[str, str]
    mitm_ctx: ssl.SSLContext
    censored: frozenset[str] = frozenset({CENSORED_SOURCE})
    held: list[socket.socket] = field(default_factory=list)
    seen: list[tuple[str, str | None, str]] = field(default_factory=list)

    def handle(self, conn: socket.socket, peer: tuple[str, int], port: int) -> None:
        first = _peek_first_bytes(conn)
        if not first:
            return  # a bare TCP connect (kzprobe's TCP step): nothing to inspect
        name = sni_of(first) if first[0] == 0x16 else host_of(first)
        # "*": what to do with every name (a path that is slow whatever is asked for).
        default = self.rules.get("*", "forward")
        action = self.rules.get(name or "", default) if peer[0] in self.censored else "forward"
        self.seen.append((peer[0], name, action))
        if action == "rst":
            conn.recv(65536)  # consume what was sent, as an on-path box sees it go by
            reset(conn)
        elif action == "stall":
            # Swallow and never answer, keeping the socket open (the client must time out).
            conn.settimeout(60)
            with contextlib.suppress(OSError):
                while conn.recv(65536):
                    pass
        elif action == "blockpage":
            conn.recv(65536)
            conn.sendall(http_response(blockpage_body()))
        elif action == "mitm":
            serve_web(conn, WebBehaviour(self.mitm_ctx))
        elif action == "redirect":
            conn.recv(65536)
            conn.sendall(http_response(b"", "302 Found", {"Location": f"http://warning.test:{port}/?reason=blocked"}))
        elif action == "throttle":
            self.forward(conn, port, rate=THROTTLE_RATE)
        else:
            self.forward(conn, port)

    def forward(self, conn: socket.socket, port: int, rate: int | None = None) -> None:
        """Splice to the backend; with ``rate``, the server's bytes are paced (a policer)."""
        up = socket.create_connection((self.backend, port), timeout=5)
        up.settimeout(None)
        conn.settimeout(None)
        t = _daemon(_pipe, up, conn, rate)
        _pipe(conn, up)
        t.join(15)
        up.close()


class DnsServer:
    """A resolver on UDP and TCP, answering from ``table``: name -> action (see ``SITES``)."""

    def __init__(self, addr: str, table: dict[str, tuple[str, ...]]) -> None:
        self.addr = addr
        self.table = table
        self.port = 0
        self.udp: socket.socket | None = None
        self.tcp: socket.socket | None = None
        self.queries: list[tuple[str, str, str]] = []

    def bind(self) -> None:
        for _ in range(50):
            port = random.randint(20000, 60000)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                u.bind((self.addr, port))
                t.bind((self.addr, port))
            except OSError:
                u.close()
                t.close()
                continue
            t.listen(64)
            self.udp, self.tcp, self.port = u, t, port
            return
        raise RuntimeError(f"no free port on {self.addr}")

    @property
    def spec(self) -> str:
        return f"{self.addr}:{self.port}"

    def start(self) -> None:
        self.bind()
        _daemon(self._udp_loop)
        _daemon(self._tcp_loop)

    def close(self) -> None:
        for s in (self.udp, self.tcp):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()

    def answers(self, query: dns.message.Message, transport: str) -> list[tuple[float, dns.message.Message]]:
        """(delay, response) pairs: none for silence, two for an injection."""
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        self.queries.append((name, dns.rdatatype.to_text(q.rdtype), transport))
        action = self.table.get(name, ("nx",))

        def reply(addr: str | None = None, rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> dns.message.Message:
            r = dns.message.make_response(query)
            r.flags |= dns.flags.RA
            r.set_rcode(rcode)
            if addr is not None and q.rdtype == dns.rdatatype.A:
                r.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", addr))
            return r

        kind = action[0]
        if kind == "silent":
            return []
        if kind == "nx":
            return [(0.0, reply(rcode=dns.rcode.NXDOMAIN))]
        if kind == "servfail":
            return [(0.0, reply(rcode=dns.rcode.SERVFAIL))]
        if kind == "inject" and transport == "udp":
            genuine = self.table.get(f"__genuine__{name}", ("a", ORIGIN))[1]
            return [(0.0, reply(action[1])), (INJECT_DELAY, reply(genuine))]
        if kind == "inject":
            return [(0.0, reply(self.table.get(f"__genuine__{name}", ("a", ORIGIN))[1]))]
        return [(0.0, reply(action[1]))]

    def _udp_loop(self) -> None:
        assert self.udp is not None
        while True:
            try:
                wire, peer = self.udp.recvfrom(4096)
            except OSError:
                return
            try:
                query = dns.message.from_wire(wire)
            except Exception:
                continue
            for delay, resp in self.answers(query, "udp"):
                data = resp.to_wire()
                if delay:
                    threading.Timer(delay, self._sendto, (data, peer)).start()
                else:
                    self._sendto(data, peer)

    def _sendto(self, data: bytes, peer: Any) -> None:
        assert self.udp is not None
        with contextlib.suppress(OSError):
            self.udp.sendto(data, peer)

    def _tcp_loop(self) -> None:
        assert self.tcp is not None
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            _daemon(self._tcp_conn, conn)

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            while True:
                head = _recv_exact(conn, 2)
                if not head:
                    return
                wire = _recv_exact(conn, struct.unpack("!H", head)[0])
                query = dns.message.from_wire(wire)
                out = self.answers(query, "tcp")
                if not out:
                    # Silent: hold the connection without answering (the client must time out).
                    while conn.recv(4096):
                        pass
                    return
                for _, resp in out:
                    data = resp.to_wire()
                    conn.sendall(struct.pack("!H", len(data)) + data)
        except (OSError, ValueError, struct.error):
            return
        finally:
            conn.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return buf


# --- the whole network ---------------------------------------------------------------------------
@dataclass
class LoopNet:
    tmp: Path
    ca: trustme.CA
    ca_pem: Path
    mitm_ca: trustme.CA
    isp: DnsServer
    public: DnsServer
    https_port: int
    http_port: int
    middlebox: Middlebox
    listeners: list[Listener]
    held: list[socket.socket]

    def url(self, name: str, scheme: str = "https") -> str:
        port = self.https_port if scheme == "https" else self.http_port
        return f"{scheme}://{name}:{port}/"

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
        for s in self.held:
            with contextlib.suppress(OSError):
                s.close()
        self.isp.close()
        self.public.close()


def _bind_all(addresses: list[str], backlog: dict[str, int]) -> tuple[int, int, dict[tuple[str, int], socket.socket]]:
    """Find one HTTPS port and one HTTP port free on every address, and bind them all."""
    for _ in range(50):
        ports = random.sample(range(20000, 60000), 2)
        socks: dict[tuple[str, int], socket.socket] = {}
        try:
            for a in addresses:
                for p in ports:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    socks[(a, p)] = s
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((a, p))
                    s.listen(backlog.get(a, 128))
        except OSError:
            for s in socks.values():
                s.close()
            continue
        return ports[0], ports[1], socks
    raise RuntimeError("no free port pair on the loopback addresses")


def _fill_accept_queue(addr: str, port: int) -> list[socket.socket]:
    """Connect until the (never accepted) queue is full: from then on the kernel drops SYNs."""
    held = []
    for _ in range(8):
        c = socket.socket()
        c.settimeout(0.3)
        try:
            c.connect((addr, port))
        except OSError:
            c.close()
            return held
        held.append(c)
    raise RuntimeError(f"accept queue of {addr}:{port} never filled")


def _noaki_ctx(ca: trustme.CA, tmp: Path, name: str) -> ssl.SSLContext:
    """A server chain as some CDNs serve it: leaf (no SKI, no AKI) <- intermediate <- the lab CA."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root_key: Any = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    root = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    start, end = dt.datetime.now(dt.UTC) - dt.timedelta(days=1), dt.datetime.now(dt.UTC) + dt.timedelta(days=90)
    ikey, lkey = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    iname = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lab CDN Intermediate")])
    inter = (x509.CertificateBuilder().subject_name(iname).issuer_name(root.subject).public_key(ikey.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(ikey.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                            critical=False)
             .sign(root_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(iname).public_key(lkey.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ikey, hashes.SHA256()))
    assert not any(isinstance(e.value, x509.AuthorityKeyIdentifier | x509.SubjectKeyIdentifier)
                   for e in leaf.extensions)
    chain, key = tmp / f"{name}.chain.pem", tmp / f"{name}.key"
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, inter)))
    key.write_bytes(lkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(chain), str(key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def build_loopnet(tmp: Path) -> LoopNet:
    ca = trustme.CA()
    mitm_ca = trustme.CA(organization_name=MITM_ORG)
    ca_pem = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    names = [*sorted(SITES), "example.com"]
    good = _server_ctx(ca.issue_cert(*names))
    parked = _server_ctx(ca.issue_cert("parked.example.net"))
    mitm = _server_ctx(mitm_ca.issue_cert(*names, organization_name=MITM_ORG))
    # A self-run CA that neither the probe nor the helper trusts: broken for everyone, not intercepted.
    broken = _server_ctx(trustme.CA(organization_name="Self-signed Hosting").issue_cert("badcert.test"))

    isp_table: dict[str, tuple[str, ...]] = {}
    public_table: dict[str, tuple[str, ...]] = {}
    for name, (genuine, action) in SITES.items():
        isp_table[name] = action
        isp_table[f"__genuine__{name}"] = ("a", genuine)
        public_table[name] = ("a", genuine)
    public_table["example.com"] = ("a", ORIGIN)
    isp = DnsServer(ISP_DNS_ADDR, isp_table)
    public = DnsServer(PUBLIC_DNS_ADDR, public_table)
    isp.start()
    public.start()

    https_port, http_port, socks = _bind_all([*SERVER_ADDRESSES, BACKLOG_FULL], {BACKLOG_FULL: 0})
    middlebox = Middlebox(backend=ORIGIN, rules=dict(MIDDLEBOX_RULES), mitm_ctx=mitm)
    slowpath = Middlebox(backend=ORIGIN, rules={"*": "throttle"}, mitm_ctx=mitm)
    held: list[socket.socket] = []
    listeners: list[Listener] = []

    def web(b_https: WebBehaviour, b_http: WebBehaviour) -> dict[int, Callable[[socket.socket, Any], None]]:
        return {https_port: lambda c, _p: serve_web(c, b_https), http_port: lambda c, _p: serve_web(c, b_http)}

    def tarpit(conn: socket.socket, _peer: Any) -> None:
        conn.settimeout(120)
        while conn.recv(65536):
            pass

    chains_http = {n: http_loc.format(https=https_port) for n, (http_loc, _) in REDIRECT_CHAINS.items()}
    chains_https = {n: https_loc.format(https=https_port) for n, (_, https_loc) in REDIRECT_CHAINS.items()}
    noaki = _noaki_ctx(ca, tmp, "noaki.test")
    handlers: dict[str, dict[int, Callable[[socket.socket, Any], None]]] = {
        ORIGIN: web(WebBehaviour(good, redirects=chains_https), WebBehaviour(None, redirects=chains_http)),
        CDN_EDGE: web(WebBehaviour(good), WebBehaviour(None)),
        DROP_ORIGIN: web(WebBehaviour(good), WebBehaviour(None)),
        PARKED: web(WebBehaviour(parked, body=lambda h: page("parked.example.net", "This domain is parked.")),
                    WebBehaviour(None, body=lambda h: page("parked.example.net", "This domain is parked."))),
        BLOCKPAGE_SERVER: web(WebBehaviour(parked, body=lambda h: blockpage_body()),
                              WebBehaviour(None, body=lambda h: blockpage_body())),
        SLOW: web(WebBehaviour(good, delay=SLOW_DELAY), WebBehaviour(None, delay=SLOW_DELAY)),
        MIDDLEBOX: {p: (lambda c, peer, p=p: middlebox.handle(c, peer, p)) for p in (https_port, http_port)},
        SLOWPATH: {p: (lambda c, peer, p=p: slowpath.handle(c, peer, p)) for p in (https_port, http_port)},
        TARPIT: {https_port: tarpit, http_port: tarpit},
        BADCERT: web(WebBehaviour(broken), WebBehaviour(None)),
        GZIP_BLOCKPAGE: web(WebBehaviour(parked, body=lambda h: blockpage_body(), gzip=True),
                            WebBehaviour(None, body=lambda h: blockpage_body(), gzip=True)),
        CDN_NOAKI: web(WebBehaviour(noaki, gzip=True), WebBehaviour(None, gzip=True)),
        REDIRECTOR: web(WebBehaviour(parked, redirects={"peekredirect.test": f"http://blocked.isp.test:{http_port}/"}),
                        WebBehaviour(None, redirects={"peekredirect.test": f"http://blocked.isp.test:{http_port}/"})),
    }
    for (addr, port), s in socks.items():
        if addr == BACKLOG_FULL:
            held.append(s)
            held.extend(_fill_accept_queue(addr, port))
            continue
        listener = Listener(s, handlers[addr][port])
        listener.start()
        listeners.append(listener)
    return LoopNet(tmp=tmp, ca=ca, ca_pem=ca_pem, mitm_ca=mitm_ca, isp=isp, public=public, https_port=https_port,
                   http_port=http_port, middlebox=middlebox, listeners=listeners, held=held)


# --- running kzprobe -----------------------------------------------------------------------------
def kzprobe_exe() -> list[str]:
    exe = Path(sys.executable).with_name("kzprobe")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("kzprobe")
    if found:
        return [found]
    return [sys.executable, "-c", "from kzprobe.cli import main; main()"]


@dataclass
class RunOutput:
    returncode: int
    stdout: str
    stderr: str
    db: Path
    verdicts: dict[str, dict[str, Any]]


def run_kzprobe(net: LoopNet, urls: list[str], db: Path, *extra: str, resolvers: tuple[str, ...] | None = None,
                timeout: float = 1.5, wait: float = 90.0) -> RunOutput:
    """One ``kzprobe run`` over the loopback network; verdicts keyed by target URL."""
    import json

    targets = db.with_suffix(".txt")
    targets.write_text("\n".join(urls) + "\n", encoding="utf-8")
    res = resolvers if resolvers is not None else (net.isp.spec, net.public.spec)
    cmd = [*kzprobe_exe(), "run", "--targets", str(targets), "--no-system-resolver", "--ca-bundle", str(net.ca_pem),
           "--db", str(db), "--format", "json", "--no-progress", "--timeout", str(timeout),
           "--source-address", CENSORED_SOURCE]
    for r in res:
        cmd += ["--resolver", r]
    cmd += list(extra)
    env = {**os.environ, "NO_COLOR": "1"}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(k, None)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=wait, env=env)
    verdicts: dict[str, dict[str, Any]] = {}
    if p.returncode == 0:
        verdicts = {v["target"]: v for v in json.loads(p.stdout)["verdicts"]}
    return RunOutput(p.returncode, p.stdout, p.stderr, db, verdicts)


@contextlib.contextmanager
def helper_process(net: LoopNet, listen: str, timeout: float) -> Iterator[str | None]:
    """``kzprobe helper`` as a subprocess on ``listen`` (a loopback address), resolving with the
    public resolver; yields its URL once it says it listens (None if it never does)."""
    import re

    cmd = [*kzprobe_exe(), "helper", "--listen", f"{listen}:0", "--allow-private", "--ca-bundle", str(net.ca_pem),
           "--resolver", net.public.spec, "--timeout", str(timeout)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = threading.Event()
    url: list[str] = []

    def drain() -> None:
        # Keep reading for the helper's whole life so a full pipe never blocks it.
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"listening on (https?://\S+)", line)
            if m and not url:
                url.append(m.group(1).rstrip("/"))
                found.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not found.is_set() and proc.poll() is None:
        found.wait(0.1)
    try:
        yield url[0] if url else None
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
