"""LAB ONLY: a two-namespace world in which to attack a strict helper (tests and bench).

Topology (no link to the root namespace, no default route anywhere)::

    H "helper host"                                W "the internet"
    veth 203.0.113.1/24  <── veth ──>  203.0.113.100/24
    lo   127.0.0.1, 203.0.113.2/32                 lo: 198.51.100.10 honest site
    helper(s) on 203.0.113.1:8780/8781                 198.51.100.53 dnsmasq, the helper's resolver
                                                      198.51.100.54 dnsmasq with the 2,000 A records
    "admin pages" on 203.0.113.1:80,                   198.51.100.66-73 hostile servers
       203.0.113.2:80 and 127.0.0.1:80                 198.51.100.99 "internal" (the helper's --deny)
    route 198.51.100.0/24 via 203.0.113.100            198.51.100.12 shop.y.corp.lan (search domain)
                                                      198.51.100.150-249 client sources

203.0.113.1 plays the host's public address: globally routed as far as the helper can tell
(the helper gets ``--lab-public`` for both TEST-NETs, which makes them "public" in its policy),
and yet the admin page behind it must stay out of reach: only the local-address check refuses it.
``100.64.0.0/10`` (the 2,000 A records) is lab-public too but has no route at all, so a
measurement of it fails at once without a packet leaving.

Clients run in W through :class:`NetnsThread`: a thread that entered W's namespace with
setns(2), so every socket it (or a trio loop running in it) creates lives in W.

``python -m kzprobe.helper.attacklab serve ROLE STATE_DIR`` runs the servers of one side.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

HOST_PUBLIC = "203.0.113.1"
HOST_SECOND = "203.0.113.2"
WORLD_GW = "203.0.113.100"
HONEST = "198.51.100.10"
SHOP = "198.51.100.12"
DNS = "198.51.100.53"
MANY_DNS = "198.51.100.54"
HOSTILE = [f"198.51.100.{i}" for i in range(66, 74)]
INTERNAL = "198.51.100.99"
DENY = "198.51.100.96/28"
CLIENTS = [f"198.51.100.{i}" for i in range(150, 250)]
HELPER_PORT = 8780
HELPER_PORT_RESOLVER = 8781
TOKEN = "attack-lab-token-0123456789abcdef"
DOMAIN = "lab.example"
MANY = 2000
TITLE_BODY = 512 * 1024
#: What the helper must never touch: (address, port) pairs; port None = any port.
FORBIDDEN = [(HOST_PUBLIC, 80), (HOST_SECOND, 80), ("127.0.0.1", 80), (INTERNAL, None), (SHOP, None)]

CLONE_NEWNET = 0x40000000


def _run(argv: list[str], check: bool = True) -> str:
    p = subprocess.run(argv, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()}")
    return p.stdout


class NetnsThread:
    """A worker thread living in a network namespace; ``call(fn)`` runs ``fn`` there."""

    def __init__(self, ns: str) -> None:
        self.jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[tuple[bool, Any]]] | None] = queue.Queue()
        ready: queue.Queue[BaseException | None] = queue.Queue()
        self.thread = threading.Thread(target=self._main, args=(ns, ready), daemon=True)
        self.thread.start()
        err = ready.get()
        if err is not None:
            raise err

    def _main(self, ns: str, ready: queue.Queue[BaseException | None]) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
        except BaseException as exc:
            ready.put(exc)
            return
        ready.put(None)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, out = job
            try:
                out.put((True, fn()))
            except BaseException as exc:
                out.put((False, exc))

    def call(self, fn: Callable[[], T]) -> T:
        out: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self.jobs.put((fn, out))
        ok, value = out.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(5)


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)


@dataclass
class AttackLab:
    """Build with ``with AttackLab() as lab:``; everything is removed on exit."""

    helper_args: list[str] = field(default_factory=list)
    tag: str = field(default_factory=lambda: "hh" + secrets.token_hex(3))
    state: Path = field(init=False)
    procs: list[Process] = field(default_factory=list)
    world: NetnsThread | None = None

    @property
    def ns_h(self) -> str:
        return f"{self.tag}h"

    @property
    def ns_w(self) -> str:
        return f"{self.tag}w"

    def __enter__(self) -> AttackLab:
        self.state = Path(f"/run/kzprobe-attacklab/{self.tag}")
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- building --------------------------------------------------------------------------------
    def _build(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        h, w = self.ns_h, self.ns_w
        _run(["ip", "netns", "add", h])
        _run(["ip", "netns", "add", w])
        va, vb = f"{self.tag}a", f"{self.tag}b"
        _run(["ip", "link", "add", va, "netns", h, "type", "veth", "peer", "name", vb, "netns", w])
        for ns, cmds in ((h, [["link", "set", "lo", "up"], ["link", "set", va, "up"],
                              ["addr", "add", f"{HOST_PUBLIC}/24", "dev", va],
                              ["addr", "add", f"{HOST_SECOND}/32", "dev", "lo"],
                              ["route", "add", "198.51.100.0/24", "via", WORLD_GW]]),
                         (w, [["link", "set", "lo", "up"], ["link", "set", vb, "up"],
                              ["addr", "add", f"{WORLD_GW}/24", "dev", vb],
                              *[["addr", "add", f"{a}/32", "dev", "lo"]
                                for a in [HONEST, SHOP, DNS, MANY_DNS, INTERNAL, *HOSTILE, *CLIENTS]]])):
            for c in cmds:
                _run(["ip", "-n", ns, *c])
        # The helper host's resolver configuration (ip netns exec bind-mounts these files):
        # a search domain and an /etc/hosts entry for an internal name.
        etc = Path("/etc/netns") / h
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {DNS}\nsearch corp.lan\noptions timeout:1 attempts:1\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n10.0.0.7 files.corp.lan\n")
        hosts = [f"{HONEST} honest.{DOMAIN}", f"{HOSTILE[0]} hostile.{DOMAIN}", f"{HOST_SECOND} admin.{DOMAIN}",
                 f"{HOST_PUBLIC} self.{DOMAIN}", f"{INTERNAL} internal.{DOMAIN}", "10.0.0.5 db.corp.lan",
                 f"{SHOP} shop.y.corp.lan", f"{HONEST} shop.{DOMAIN}"]
        (self.state / "hosts").write_text("\n".join(hosts) + "\n")
        # The 2,000 A records live on their own server, as an attacker's zone would: the helper's
        # resolver relays to it.  (Served, and logged, by the resolver itself, every query for them
        # stalled the resolver for everybody: the bench then measured dnsmasq, not the helper.)
        many = [f"100.64.{i // 250}.{i % 250 + 1} many.{DOMAIN}" for i in range(MANY)]
        (self.state / "many").write_text("\n".join(many) + "\n")
        (self.state / "many.conf").write_text("\n".join([
            "no-resolv", "no-hosts", "no-poll", "bind-interfaces", f"listen-address={MANY_DNS}",
            "except-interface=nonexistent", "local-ttl=60", f"addn-hosts={self.state}/many",
            f"local=/many.{DOMAIN}/", "edns-packet-max=1232",
        ]) + "\n")
        (self.state / "dnsmasq.conf").write_text("\n".join([
            "no-resolv", "no-hosts", "no-poll", "bind-interfaces", f"listen-address={DNS}",
            "except-interface=nonexistent", "local-ttl=60", f"addn-hosts={self.state}/hosts",
            f"log-facility={self.state}/dnsmasq.log", "log-queries", "edns-packet-max=1232",
            # Authoritative for the lab's zones: unknown names are NXDOMAIN, not REFUSED.
            "local=/lab.example/", "local=/corp.lan/", "local=/y/", f"server=/many.{DOMAIN}/{MANY_DNS}",
        ]) + "\n")
        self.tcpdump = self.popen(h, "tcpdump", ["tcpdump", "-i", "any", "-nn", "-U", "-s", "128",
                                                 "-w", str(self.state / "helper.pcap")])
        for name in ("dnsmasq", "many"):
            self.popen(w, name, ["dnsmasq", "--keep-in-foreground", "--user=root", "--pid-file=",
                                 "-C", str(self.state / f"{name}.conf")])
        exe = [sys.executable, "-m", "kzprobe.helper.attacklab", "serve"]
        self.popen(w, "world-servers", [*exe, "world", str(self.state)], wait="ready")
        self.popen(h, "admin-servers", [*exe, "admin", str(self.state)], wait="ready")
        self.world = NetnsThread(w)
        for server in (DNS, MANY_DNS):
            self.world.call(lambda a=server: _wait_tcp(a, 53))  # type: ignore[misc]
        self.helper = self.start_helper(HELPER_PORT, self.helper_args)

    def start_helper(self, port: int, extra: list[str], name: str | None = None,
                     prefix: list[str] | None = None, token: bool = True) -> str:
        argv = [*(prefix or []), sys.executable, "-c", "from kzprobe.cli import main; main()", "helper",
                "--listen", f"{HOST_PUBLIC}:{port}",
                *(["--token", TOKEN] if token else []), "--lab-public", "198.51.100.0/24",
                "--lab-public", "203.0.113.0/24", "--lab-public", "100.64.0.0/10", "--deny", DENY,
                "--timeout", "2", "--deadline", "8", *extra]
        self.popen(self.ns_h, name or f"helper-{port}", argv, wait="listening on")
        return f"http://{HOST_PUBLIC}:{port}"

    def popen(self, ns: str, name: str, argv: list[str], wait: str | None = None,
              timeout: float = 20.0) -> Process:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        p = Process(name, proc)
        self.procs.append(p)
        seen = threading.Event()

        def drain() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                p.lines.append(line.rstrip("\n"))
                if wait and wait in line:
                    seen.set()
            seen.set()

        threading.Thread(target=drain, daemon=True).start()
        if wait and (not seen.wait(timeout) or proc.poll() is not None):
            raise RuntimeError(f"{name} did not start: {' | '.join(p.lines[-10:])}")
        return p

    def down(self) -> None:
        if self.world is not None:
            self.world.close()
        for p in reversed(self.procs):
            if p.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGINT if p.name == "tcpdump" else signal.SIGTERM)
                try:
                    p.proc.wait(5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.proc.pid, signal.SIGKILL)
                    p.proc.wait(5)
        for ns in (self.ns_h, self.ns_w):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / self.ns_h, ignore_errors=True)

    def remove_state(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)

    # --- evidence --------------------------------------------------------------------------------
    def stop_capture(self) -> None:
        p = self.tcpdump.proc
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
            p.wait(10)

    def packets(self) -> list[tuple[str, str, int | None]]:
        """(src, dst, dst port) of every IPv4 packet the helper's namespace saw (stops the capture)."""
        self.stop_capture()
        out = _run(["tcpdump", "-r", str(self.state / "helper.pcap"), "-nn", "-q"], check=False)
        rows: list[tuple[str, str, int | None]] = []
        pat = re.compile(r"IP (\d+\.\d+\.\d+\.\d+)(?:\.\d+)? > (\d+\.\d+\.\d+\.\d+)(?:\.(\d+))?:")
        for line in out.splitlines():
            m = pat.search(line)
            if m:
                rows.append((m.group(1), m.group(2), int(m.group(3)) if m.group(3) else None))
        return rows

    def forbidden_packets(self) -> list[tuple[str, str, int | None]]:
        return [r for r in self.packets() for addr, port in FORBIDDEN
                if r[1] == addr and (port is None or r[2] == port)]

    def requests(self, since: float, path_prefix: str = "/") -> list[tuple[float, str, str, str]]:
        """(time, server address, client port, path) of each request the world's servers received."""
        out = []
        for line in self.log("world"):
            parts = line.split()
            if len(parts) == 5 and parts[3] == "open" and float(parts[0]) >= since and parts[4].startswith(path_prefix):
                out.append((float(parts[0]), parts[1], parts[2], parts[4]))
        return out

    def closes(self, since: float, path: str) -> list[float]:
        """When each connection that asked for ``path`` (since ``since``) was closed."""
        opened: set[tuple[str, str]] = set()
        out = []
        for line in self.log("world"):
            parts = line.split()
            if float(parts[0]) < since:
                continue
            if parts[3] == "open" and parts[4] == path:
                opened.add((parts[1], parts[2]))
            elif parts[3] == "close" and (parts[1], parts[2]) in opened:
                out.append(float(parts[0]))
                opened.discard((parts[1], parts[2]))
        return out

    def log(self, name: str) -> list[str]:
        path = self.state / f"{name}.log"
        return path.read_text().splitlines() if path.exists() else []


def _wait_tcp(addr: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((addr, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- servers (run as ``python -m kzprobe.helper.attacklab serve ROLE STATE``) -------------------------
def _page(title: str, body: str = "") -> bytes:
    return f"<!doctype html><html><head><title>{title}</title></head><body>{body}</body></html>".encode()


_LOCATIONS = {
    "scheme-only-ip": "http:127.0.0.1/",
    "scheme-only-host": "https:host",
    "port": f"http://honest.{DOMAIN}:99999/",
    "idna": f"http://xn--caf\u00e9.{DOMAIN}/",
    "ipv6-broken": "http://[::1/",
    "admin": f"http://{HOST_SECOND}/",
    "self": f"http://self.{DOMAIN}/",
    "loopback": "http://127.0.0.1/",
    "internal": f"http://{INTERNAL}/",
    "honest": f"http://honest.{DOMAIN}/",
}


async def _serve_world(state: Path) -> None:
    import trio

    log = (state / "world.log").open("a", buffering=1)

    async def handler(stream: trio.SocketStream) -> None:
        local = stream.socket.getsockname()[0]
        peer = stream.socket.getpeername()[1]
        try:
            with trio.move_on_after(5):
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 16384:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            path = line.split(" ")[1] if line.count(" ") >= 2 else "/"
            log.write(f"{time.time():.3f} {local} {peer} open {path}\n")
            await _respond(stream, local, path)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            log.write(f"{time.time():.3f} {local} {peer} close\n")
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _respond(stream: trio.SocketStream, local: str, path: str) -> None:
        async def send(status: str, headers: list[str], body: bytes = b"") -> None:
            await stream.send_all((f"HTTP/1.1 {status}\r\n" + "".join(h + "\r\n" for h in headers)
                                   + "\r\n").encode("utf-8", "surrogateescape") + body)

        if local == INTERNAL:
            await send("200 OK", [f"Content-Length: {len(_page('INTERNAL'))}", "Connection: close"], _page("INTERNAL"))
        elif local == SHOP:
            await send("200 OK", ["Content-Length: " + str(len(_page("INTRANET SHOP"))), "Connection: close"],
                       _page("INTRANET SHOP"))
        elif path == "/title":
            # The CPU attack: <title> repeated, streamed.
            await send("200 OK", ["Content-Type: text/html", "Connection: close"])
            chunk = b"<title>" * 4096
            sent = 0
            while sent < TITLE_BODY:
                await stream.send_all(chunk)
                sent += len(chunk)
        elif path == "/endless":
            await send("200 OK", ["Content-Type: text/html", "Connection: close"])
            chunk = b"x" * 65536
            while True:
                await stream.send_all(chunk)
        elif path == "/drip":
            await send("200 OK", ["Content-Type: text/html", "Connection: close"])
            while True:
                await stream.send_all(b"x")
                await trio.sleep(0.5)
        elif path == "/hold":
            # Answer nothing, and notice when the helper gives up (EOF), so the close is logged.
            while await stream.receive_some(4096):
                pass
        elif path == "/big":
            body = b"<html><title>big</title>" + b"y" * (TITLE_BODY - 24)
            await send("200 OK", [f"Content-Length: {len(body)}", "Connection: close"], body)
        elif path.startswith("/loop/"):
            n = int(path.rsplit("/", 1)[1] or 0) if path.rsplit("/", 1)[1].isdigit() else 0
            await send("302 Found", [f"Location: /loop/{n + 1}", "Content-Length: 0", "Connection: close"])
        elif path.startswith("/loc/"):
            kind = path[len("/loc/"):]
            if kind == "no-colon":
                await send("302 Found", [f"Location http://honest.{DOMAIN}/", "Content-Length: 0"])
            elif kind == "nul":
                await send("302 Found", ["Location: http://honest.lab.example/\x00", "Content-Length: 0"])
            else:
                await send("302 Found", [f"Location: {_LOCATIONS.get(kind, '/')}", "Content-Length: 0",
                                         "Connection: close"])
        else:
            body = _page("Honest page", "hello")
            await send("200 OK", ["Content-Type: text/html", f"Content-Length: {len(body)}", "Connection: close"],
                       body)

    async with trio.open_nursery() as n:
        for addr in [HONEST, SHOP, INTERNAL, *HOSTILE]:
            listeners = await trio.open_tcp_listeners(80, host=addr)
            n.start_soon(trio.serve_listeners, handler, listeners)
        print("ready", flush=True)


async def _serve_admin(state: Path) -> None:
    import trio

    log = (state / "admin.log").open("a", buffering=1)

    async def handler(stream: trio.SocketStream) -> None:
        log.write(f"{time.time():.3f} {stream.socket.getsockname()[0]} admin hit\n")
        body = _page("ADMIN", "secret operator page")
        with contextlib.suppress(Exception):
            await stream.send_all(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                                  .encode() + body)
            await stream.aclose()

    async with trio.open_nursery() as n:
        for addr in (HOST_PUBLIC, HOST_SECOND, "127.0.0.1"):
            listeners = await trio.open_tcp_listeners(80, host=addr)
            n.start_soon(trio.serve_listeners, handler, listeners)
        print("ready", flush=True)


def _main(argv: list[str]) -> None:
    import trio

    if len(argv) != 3 or argv[0] != "serve" or argv[1] not in ("world", "admin"):
        raise SystemExit("usage: python -m kzprobe.helper.attacklab serve world|admin STATE_DIR")
    state = Path(argv[2])
    trio.run(_serve_world if argv[1] == "world" else _serve_admin, state)


@contextlib.contextmanager
def in_world(lab: AttackLab) -> Iterator[NetnsThread]:
    assert lab.world is not None
    yield lab.world


if __name__ == "__main__":
    _main(sys.argv[1:])
