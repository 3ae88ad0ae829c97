"""Live TTL-limited sweeps: handcrafted handshakes, triggers with IP TTL = 1..N, what answers.

How a sweep runs.  Every probe (one TTL of one repetition of one domain) gets its own source
port, so answers are matched to probes by port and many TTLs run at once: a *batch* of TTLs is
sent together (SYNs at full TTL, then ACK + trigger with IP TTL = i as each SYN/ACK arrives),
then the tracer listens for ``timeout`` seconds.  A sweep stops after the batch in which the
server (or anything) answered the trigger, or at ``max_hops``.  Test and control sweeps and all
repetitions share the batches, so a trace takes about ``2 * timeout`` per batch, plus one second per extra
repetition (see :data:`REPETITION_SPACING`).

Packets are built with scapy (imported lazily: it costs a second) and sent on a raw IP socket;
answers are read from raw TCP/ICMP/UDP sockets and decoded by :mod:`kzprobe.replay.pcapio`.
They are then turned into :class:`HopResult` by the very code that reads captures
(:mod:`kzprobe.trace.pcap`), so a live sweep and a recorded one are judged the same way.

The kernel knows nothing of these connections and would answer the server's SYN/ACK with a
RST, tearing the handshake down.  A temporary iptables rule drops outbound RSTs from the probe's
port range to the target for the duration of the trace; it is removed in a ``finally`` and on
SIGTERM/SIGHUP (SIGINT already unwinds as KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from kzprobe.trace import pcap as pcapmod
from kzprobe.trace import wire
from kzprobe.trace.decide import HANDSHAKE_TIMEOUT, TERMINATING, HopResult, TraceResult, decide
from kzprobe.trace.pcap import Pkt

DEFAULT_PORTS = {"http": 80, "tls": 443, "dns": 53}
#: The iptables comment that marks our rule; the PID keeps concurrent traces apart.
RULE_TAG = "kzprobe-trace"


class TraceError(Exception):
    """A live trace that cannot run; the message is a one-line CLI error."""


# --- triggers ----------------------------------------------------------------------------------


def client_hello(domain: str) -> bytes:
    """A real ClientHello with SNI = ``domain``, as Python's OpenSSL would send it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=domain)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def trigger_payload(trigger: str, domain: str, qid: int = 0) -> bytes:
    if trigger == "http":
        return wire.build_http_get(domain)
    if trigger == "tls":
        return client_hello(domain)
    return wire.build_dns_query(domain, qid)


# --- the RST guard -----------------------------------------------------------------------------


def _rule_spec(address: str, lo: int, hi: int, tag: str) -> list[str]:
    return [
        "OUTPUT", "-p", "tcp", "-d", address, "--sport", f"{lo}:{hi}",
        "--tcp-flags", "RST", "RST", "-m", "comment", "--comment", tag, "-j", "DROP",
    ]


def rules_present(tag_prefix: str = RULE_TAG) -> list[str]:
    """Our rules currently in the OUTPUT chain (for tests and for a leftover check)."""
    ipt = shutil.which("iptables")
    if ipt is None:
        return []
    out = subprocess.run([ipt, "-w", "-S", "OUTPUT"], capture_output=True, text=True, check=False).stdout
    return [ln for ln in out.splitlines() if tag_prefix in ln]


@contextlib.contextmanager
def rst_guard(address: str, lo: int, hi: int) -> Iterator[str]:
    """Drop outbound RSTs from ports lo..hi to ``address`` while the block runs; always undo."""
    ipt = shutil.which("iptables")
    if ipt is None:
        raise TraceError("iptables is needed to stop the kernel from resetting the probe's connections")
    tag = f"{RULE_TAG}-{os.getpid()}"
    spec = _rule_spec(address, lo, hi, tag)
    done = subprocess.run([ipt, "-w", "-I", *spec], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TraceError(f"cannot add the iptables rule: {done.stderr.strip() or done.returncode}")

    def remove() -> None:
        # Delete until gone: a rule added twice (should not happen) must not survive either.
        for _ in range(8):
            r = subprocess.run([ipt, "-w", "-D", *spec], capture_output=True, check=False)
            if r.returncode != 0:
                break

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield tag
    finally:
        remove()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- sending and receiving ---------------------------------------------------------------------


@dataclass
class _Probe:
    domain: str
    ttl: int
    rep: int
    sport: int
    isn: int
    ip_id: int
    sent_trigger: bool = False


@dataclass
class _Log:
    """Every packet sent or received, numbered in the order it happened."""

    pkts: list[Pkt] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, p: Pkt) -> Pkt:
        with self.lock:
            p.num = len(self.pkts) + 1
            self.pkts.append(p)
        return p


class _Receiver(threading.Thread):
    """Reads inbound TCP, ICMP and UDP from raw sockets into the log, filtered to the trace."""

    def __init__(self, log: _Log, client: str, address: str, lo: int, hi: int) -> None:
        super().__init__(daemon=True, name="kzprobe-trace-rx")
        self.log, self.client, self.address, self.lo, self.hi = log, client, address, lo, hi
        self.stop = threading.Event()
        self.socks = [socket.socket(socket.AF_INET, socket.SOCK_RAW, proto) for proto in (6, 1, 17)]
        self.on_packet: Any = None

    def run(self) -> None:
        from kzprobe.replay.pcapio import decode_ip

        while not self.stop.is_set():
            ready, _, _ = select.select(self.socks, [], [], 0.05)
            for s in ready:
                try:
                    data = s.recv(65535)
                except OSError:
                    continue
                p = decode_ip(0, time.time(), data, 0)
                if p is None or p.version != 4 or p.dst != self.client:
                    continue
                rec = pcapmod.to_pkt(p)
                if rec.proto == 1:
                    if rec.quoted is None or rec.quoted[1] != self.address:
                        continue
                    if not (self.lo <= rec.quoted[3] <= self.hi):
                        continue
                elif not (self.lo <= rec.dport <= self.hi):
                    continue
                self.log.add(rec)
                if self.on_packet is not None:
                    self.on_packet(rec)

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=2)
        for s in self.socks:
            s.close()


def _source_address(address: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((address, 9))
        except OSError as exc:
            raise TraceError(f"no route to {address}: {exc.strerror}") from None
        return str(s.getsockname()[0])


class _Sender:
    def __init__(self, log: _Log, client: str, address: str, port: int) -> None:
        self.log, self.client, self.address, self.port = log, client, address, port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)

    def tcp(self, sport: int, flags: str, seq: int, ack: int, ttl: int, ip_id: int, payload: bytes = b"") -> None:
        from scapy.layers.inet import IP, TCP

        pkt = IP(src=self.client, dst=self.address, ttl=ttl, id=ip_id, flags="DF") / TCP(
            sport=sport, dport=self.port, flags=flags, seq=seq, ack=ack, window=64240
        )
        raw = bytes(pkt / payload) if payload else bytes(pkt)
        self.log.add(Pkt(num=0, src=self.client, dst=self.address, proto=6, ttl=ttl, ip_id=ip_id,
                         sport=sport, dport=self.port, flags=flags, seq=seq, ack=ack, payload=payload))
        self.sock.sendto(raw, (self.address, 0))

    def udp(self, sport: int, ttl: int, ip_id: int, payload: bytes) -> None:
        from scapy.layers.inet import IP, UDP

        ip = IP(src=self.client, dst=self.address, ttl=ttl, id=ip_id)
        raw = bytes(ip / UDP(sport=sport, dport=self.port) / payload)
        self.log.add(Pkt(num=0, src=self.client, dst=self.address, proto=17, ttl=ttl, ip_id=ip_id,
                         sport=sport, dport=self.port, payload=payload))
        self.sock.sendto(raw, (self.address, 0))

    def close(self) -> None:
        self.sock.close()


# --- the trace ---------------------------------------------------------------------------------


def trace(
    host: str,
    address: str,
    *,
    trigger: str = "tls",
    port: int | None = None,
    control_domain: str = "example.com",
    max_hops: int = 30,
    repeat: int = 3,
    timeout: float = 2.0,
    batch: int = 8,
    first_ttl: int = 1,
) -> TraceResult:
    """Run the test and the control sweep toward ``address`` and decide."""
    if os.geteuid() != 0:
        raise TraceError("live tracing needs root (raw sockets and an iptables rule); use --from-pcap offline")
    if host == control_domain:
        raise TraceError(f"the control domain must differ from the target ({host})")
    port = port or DEFAULT_PORTS[trigger]
    client = _source_address(address)
    domains = [host, control_domain]
    n = len(domains) * repeat * (max_hops - first_ttl + 1)
    lo = random.randrange(33000, 60000 - n)
    hi = lo + n - 1
    ports = iter(range(lo, hi + 1))
    log = _Log()
    try:
        sender = _Sender(log, client, address, port)
        rx = _Receiver(log, client, address, lo, hi)
    except PermissionError:
        raise TraceError("raw sockets need root (CAP_NET_RAW)") from None
    probes: list[_Probe] = []
    guard = rst_guard(address, lo, hi) if trigger != "dns" else contextlib.nullcontext("")
    try:
        with guard:
            rx.start()
            payloads = {d: trigger_payload(trigger, d) for d in domains}
            active = set(domains)
            ttl = first_ttl
            while active and ttl <= max_hops:
                ttls = list(range(ttl, min(max_hops, ttl + batch - 1) + 1))
                todo = [
                    _Probe(d, t, r, next(ports), random.getrandbits(32), random.randrange(1, 65535))
                    for r in range(repeat)
                    for d in sorted(active)
                    for t in ttls
                ]
                probes += todo
                if trigger == "dns":
                    _run_dns_batch(sender, todo, trigger, timeout)
                else:
                    _run_tcp_batch(sender, rx, log, todo, payloads, timeout)
                for d in list(active):
                    if _answered(log, client, address, port, trigger, d, [p for p in todo if p.domain == d]):
                        active.discard(d)
                ttl = ttls[-1] + 1
    finally:
        rx.close()
        sender.close()
    sweeps = {d: _hops(log, client, address, port, trigger, d, [p for p in probes if p.domain == d]) for d in domains}
    return decide(
        sweeps[host],
        sweeps[control_domain],
        target=host,
        address=address,
        trigger=trigger,
        test_domain=host,
        control_domain=control_domain,
    )


#: Seconds between repetitions inside a batch.  Linux routers send at most a burst of 6 ICMP
#: errors to one destination and then one per second (net.ipv4.icmp_ratelimit); spacing the
#: repetitions keeps a router's ICMP from being mistaken for silence, also when traces run
#: back to back.
REPETITION_SPACING = 1.0


def _rounds(todo: list[_Probe]) -> list[tuple[float, list[_Probe]]]:
    reps = sorted({p.rep for p in todo})
    return [(i * REPETITION_SPACING, [p for p in todo if p.rep == r]) for i, r in enumerate(reps)]


def _run_tcp_batch(
    sender: _Sender, rx: _Receiver, log: _Log, todo: list[_Probe], payloads: dict[str, bytes], timeout: float
) -> None:
    by_port = {p.sport: p for p in todo}
    pending: dict[int, tuple[int, int]] = {}
    cond = threading.Condition()

    def on_packet(rec: Pkt) -> None:
        if rec.proto == 6 and "S" in rec.flags and "A" in rec.flags and rec.dport in by_port:
            with cond:
                pending[rec.dport] = (rec.seq, rec.ack)
                cond.notify()

    rx.on_packet = on_packet
    try:
        start = time.monotonic()
        rounds = _rounds(todo)
        deadline: dict[int, float] = {}
        left: set[int] = set()
        while rounds or (left and time.monotonic() < max(deadline[sp] for sp in left)):
            now = time.monotonic()
            while rounds and start + rounds[0][0] <= now:
                for p in rounds.pop(0)[1]:
                    sender.tcp(p.sport, "S", p.isn, 0, 64, random.randrange(1, 65535))
                    deadline[p.sport] = now + timeout
                    left.add(p.sport)
            with cond:
                cond.wait(timeout=0.05)
                ready = [(sp, pending.pop(sp)) for sp in list(pending) if sp in left]
            for sp, (srv_seq, ack) in ready:
                left.discard(sp)
                p = by_port[sp]
                if ack != (p.isn + 1) & 0xFFFFFFFF:
                    continue
                seq, ackn = (p.isn + 1) & 0xFFFFFFFF, (srv_seq + 1) & 0xFFFFFFFF
                sender.tcp(sp, "A", seq, ackn, 64, random.randrange(1, 65535))
                sender.tcp(sp, "PA", seq, ackn, p.ttl, p.ip_id, payloads[p.domain])
                p.sent_trigger = True
            left = {sp for sp in left if time.monotonic() < deadline[sp]}
        time.sleep(timeout)
    finally:
        rx.on_packet = None


def _run_dns_batch(sender: _Sender, todo: list[_Probe], trigger: str, timeout: float) -> None:
    start = time.monotonic()
    for offset, group in _rounds(todo):
        time.sleep(max(0.0, start + offset - time.monotonic()))
        for p in group:
            sender.udp(p.sport, p.ttl, p.ip_id, trigger_payload(trigger, p.domain, qid=p.isn & 0xFFFF))
            p.sent_trigger = True
    time.sleep(timeout)


def _conn_packets(pkts: list[Pkt], client: str, sport: int) -> list[Pkt]:
    return [q for q in pkts if q.proto != 1 and ((q.src == client and q.sport == sport) or q.dport == sport)]


def _hops(
    log: _Log, client: str, address: str, port: int, trigger: str, domain: str, probes: list[_Probe]
) -> list[HopResult]:
    with log.lock:
        pkts = list(log.pkts)
    if trigger == "dns":
        ports = {p.sport for p in probes}
        mine = [q for q in pkts if (q.sport in ports or q.dport in ports) or (q.quoted and q.quoted[3] in ports)]
        hops = pcapmod._dns_hops(mine, client, address, domain)
        by_ttl = {p.sport: p for p in probes}
        for h in hops:
            h.packets = []
        return _renumber(hops, by_ttl)
    icmps: dict[int, list[Pkt]] = {}
    for q in pkts:
        if q.proto == 1 and q.quoted is not None:
            icmps.setdefault(q.quoted[3], []).append(q)
    hops = []
    for p in probes:
        seq = _conn_packets(pkts, client, p.sport)
        got = list(pcapmod._probes_of_connection(seq, icmps.get(p.sport, []), client, domain))
        if not p.sent_trigger or not got or got[0] is None:
            hops.append(HopResult(ttl=p.ttl, kind=HANDSHAKE_TIMEOUT, repetition=p.rep))
            continue
        h = got[0]
        h.repetition = p.rep
        h.packets = []  # live packets have no capture numbers
        hops.append(h)
    return sorted(hops, key=lambda h: (h.ttl, h.repetition))


def _renumber(hops: list[HopResult], probes: dict[int, _Probe]) -> list[HopResult]:
    return sorted(hops, key=lambda h: (h.ttl, h.repetition))


def _answered(
    log: _Log, client: str, address: str, port: int, trigger: str, domain: str, probes: list[_Probe]
) -> bool:
    """Did any probe of this batch get a terminating answer (so the sweep can stop)?"""
    hops = _hops(log, client, address, port, trigger, domain, probes)
    return any(h.kind in TERMINATING for h in hops)
