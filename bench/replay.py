"""Benchmark: ``kzprobe replay`` against ``tshark -T fields`` on the same generated capture.

    python bench/replay.py [--packets 1000000] [--keep DIR]

Generates a capture of at least ``--packets`` packets (mostly bulk TCP, with DNS, TLS and HTTP
flows mixed in, some of them censored: injected RSTs, an injected blockpage, a forged DNS answer)
with a small struct-based writer, then a 4x larger one, and for each times kzprobe and tshark
extracting frame.number, ip.ttl, ip.id, tcp.flags, dns.qry.name, dns.a,
tls.handshake.extensions_server_name and http.host.  Prints packets/s for both, the ratio, and
the peak RSS of each run (from /usr/bin/time -v, else getrusage of a wrapper process).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ETH = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_REC = struct.Struct("<IIII")
SYN, ACK, PSH, FIN, RST = 0x02, 0x10, 0x08, 0x01, 0x04


class Writer:
    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")  # closed in close()
        self.f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        self.parts: list[bytes] = []
        self.count = 0
        self.ts = 1_700_000_000.0

    def _rec(self, l3: bytes) -> None:
        self.ts += 0.0001
        frame = _ETH + l3
        sec = int(self.ts)
        self.parts.append(_REC.pack(sec, int((self.ts - sec) * 1e6), len(frame), len(frame)))
        self.parts.append(frame)
        self.count += 1
        if len(self.parts) > 20000:
            self.f.write(b"".join(self.parts))
            self.parts.clear()

    def tcp(self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
            payload: bytes = b"", ttl: int = 64, ipid: int = 0) -> None:
        tcp = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags, 64240, 0, 0)
        ip = _IP.pack(0x45, 0, 40 + len(payload), ipid & 0xFFFF, 0x4000, ttl, 6, 0, src, dst)
        self._rec(ip + tcp + payload)

    def udp(self, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, ttl: int = 64,
            ipid: int = 0) -> None:
        ip = _IP.pack(0x45, 0, 28 + len(payload), ipid & 0xFFFF, 0, ttl, 17, 0, src, dst)
        self._rec(ip + _UDP.pack(sport, dport, 8 + len(payload), 0) + payload)

    def close(self) -> None:
        self.f.write(b"".join(self.parts))
        self.f.close()


def client_hello(sni: str) -> bytes:
    name = sni.encode()
    sni_ext = struct.pack("!HHHBH", 0, len(name) + 5, len(name) + 3, 0, len(name)) + name
    body = b"\x03\x03" + b"\x11" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(sni_ext)) + sni_ext
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


SERVER_HELLO = b"\x16\x03\x03\x00\x31\x02\x00\x00\x2d\x03\x03" + b"\x22" * 40
BLOCKPAGE = ("HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><head><title>Blocked"
             "</title></head><body>Страница заблокирована</body></html>").encode()


def dns_msg(txid: int, qname: str, answer: str | None) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\x00\x00\x01\x00\x01"
    if answer is None:
        return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + q
    a = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04" + bytes(int(x) for x in answer.split("."))
    return struct.pack("!HHHHHH", txid, 0x8180, 1, 1, 0, 0) + q + a


def generate(path: Path, packets: int, seed: int = 1) -> int:
    rnd = random.Random(seed)
    w = Writer(path)
    bulk = b"\x17\x03\x03\x05\x70" + bytes(rnd.getrandbits(8) for _ in range(1395))
    client = bytes([198, 18, 0, 10])
    resolver = bytes([198, 18, 0, 53])
    port = 10000
    flow = 0
    while w.count < packets:
        flow += 1
        port = port + 1 if port < 65000 else 10000
        srv = bytes([203, 0, 113, 1 + flow % 200])
        kind = flow % 20
        txid = flow & 0xFFFF
        if kind < 8:  # DNS, one in 8 forged (two different answers)
            name = f"site{flow % 50}.example" if kind else f"blocked{flow % 5}.example"
            w.udp(client, resolver, port, 53, dns_msg(txid, name, None))
            if kind == 0:
                w.udp(resolver, client, 53, port, dns_msg(txid, name, "198.18.255.1"), ttl=250, ipid=0)
            w.udp(resolver, client, 53, port, dns_msg(txid, name, f"203.0.113.{1 + flow % 200}"), ttl=57,
                  ipid=flow)
            continue
        cseq, sseq = rnd.getrandbits(32), rnd.getrandbits(32)
        w.tcp(client, srv, port, 443 if kind != 9 else 80, cseq, 0, SYN)
        dport = 443 if kind != 9 else 80
        w.tcp(srv, client, dport, port, sseq, cseq + 1, SYN | ACK, ttl=52, ipid=0)
        w.tcp(client, srv, port, dport, cseq + 1, sseq + 1, ACK)
        if kind == 9:  # HTTP, half of them answered by an injected blockpage
            req = f"GET / HTTP/1.1\r\nHost: http{flow % 7}.example\r\n\r\n".encode()
            w.tcp(client, srv, port, dport, cseq + 1, sseq + 1, PSH | ACK, req)
            if flow % 40 == 9:
                w.tcp(srv, client, dport, port, sseq + 1, cseq + 1 + len(req), PSH | ACK | FIN, BLOCKPAGE,
                      ttl=121, ipid=4242)
            else:
                page = b"HTTP/1.1 200 OK\r\n\r\n<html><title>ok</title></html>"
                w.tcp(srv, client, dport, port, sseq + 1, cseq + 1 + len(req), PSH | ACK | FIN, page, ttl=52)
            w.tcp(client, srv, port, dport, cseq + 1 + len(req), sseq + 2, FIN | ACK)
            continue
        ch = client_hello("blocked-tls.example" if kind == 10 else f"cdn{flow % 50}.example")
        w.tcp(client, srv, port, dport, cseq + 1, sseq + 1, PSH | ACK, ch)
        if kind == 10:  # SNI-triggered injected RSTs
            for _ in range(3):
                w.tcp(srv, client, dport, port, sseq + 1, cseq + 1 + len(ch), RST | ACK, ttl=180, ipid=47000)
            continue
        w.tcp(srv, client, dport, port, sseq + 1, cseq + 1 + len(ch), PSH | ACK, SERVER_HELLO, ttl=52, ipid=1)
        s = sseq + 1 + len(SERVER_HELLO)
        n = 2000 if kind >= 12 else 20  # bulk transfers
        for i in range(n):
            w.tcp(srv, client, dport, port, s, cseq + 1 + len(ch), ACK, bulk, ttl=52, ipid=2 + i)
            s += len(bulk)
            if i % 2:
                w.tcp(client, srv, port, dport, cseq + 1 + len(ch), s, ACK)
        w.tcp(srv, client, dport, port, s, cseq + 1 + len(ch), FIN | ACK, ttl=52)
        w.tcp(client, srv, port, dport, cseq + 1 + len(ch), s + 1, FIN | ACK)
    w.close()
    return w.count


TSHARK_FIELDS = ["frame.number", "ip.ttl", "ip.id", "tcp.flags", "dns.qry.name", "dns.a",
                 "tls.handshake.extensions_server_name", "http.host"]


def measure(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of one command, its output discarded."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        if time_bin:
            cmd = [time_bin, "-f", "%M", "-o", tf.name, *argv]
        else:
            cmd = [sys.executable, "-c", "import resource,subprocess,sys;subprocess.run(sys.argv[2:],"
                   "stdout=subprocess.DEVNULL);open(sys.argv[1],'w').write(str(resource.getrusage("
                   "resource.RUSAGE_CHILDREN).ru_maxrss))", tf.name, *argv]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        rss = int((tf.read().strip().splitlines() or ["0"])[-1])
    return wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, default=None, help="write the captures here and keep them")
    ap.add_argument("--no-4x", action="store_true", help="skip the 4x run")
    args = ap.parse_args()
    tshark = shutil.which("tshark")
    kz = [sys.executable, "-m", "kzprobe.cli", "replay", "--format", "table"]
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="kzprobe-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [1] if args.no_4x else [1, 4]
    rows = []
    try:
        for mult in sizes:
            path = workdir / f"bench-{mult}x.pcap"
            t0 = time.perf_counter()
            n = generate(path, args.packets * mult)
            gen = time.perf_counter() - t0
            mb = path.stat().st_size / 1e6
            print(f"{mult}x: {n} packets, {mb:.0f} MB, generated in {gen:.1f} s", flush=True)
            kz_wall, kz_rss = measure([*kz, str(path)])
            print(f"  kzprobe replay : {kz_wall:7.2f} s  {n / kz_wall:10.0f} packets/s  "
                  f"peak RSS {kz_rss / 1024:.0f} MiB", flush=True)
            ts_wall = ts_rss = None
            if tshark:
                ts_wall, ts_rss = measure([tshark, "-n", "-r", str(path), "-T", "fields",
                                           *(x for f in TSHARK_FIELDS for x in ("-e", f))])
                print(f"  tshark -T fields: {ts_wall:7.2f} s  {n / ts_wall:10.0f} packets/s  peak RSS "
                      f"{ts_rss / 1024:.0f} MiB", flush=True)
                print(f"  ratio kzprobe/tshark: {ts_wall / kz_wall:.2f}x", flush=True)
            else:
                print("  tshark not found: no comparison")
            rows.append((mult, n, kz_wall, kz_rss, ts_wall))
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if len(rows) == 2:
        (_m1, _n1, _w1, r1, _t1), (_m4, _n4, _w4, r4, _t4) = rows
        print(f"kzprobe peak RSS: 1x {r1 / 1024:.0f} MiB, 4x {r4 / 1024:.0f} MiB (growth {(r4 - r1) / 1024:+.0f} MiB)")


if __name__ == "__main__":
    main()
