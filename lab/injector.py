"""On-path injectors, run with scapy inside a router namespace.

``python -m kzprobe.lab.injector CONFIG.json``.  Two modes:

* ``dns``: watch queries crossing the router and answer first with a forged A record.  The query
  is *not* dropped, so the real answer still arrives, later: that double answer is what an
  on-path injector looks like from the client (and what the probe's "responses" list records).
* ``http``: watch HTTP requests crossing the router; for a listed Host, send the client a
  forged blockpage with the server's address and the right sequence numbers, then a RST, racing
  the real server's response.  The request still reaches the server.

Both only *add* packets, like the passive taps real injectors are built on; they sniff the
interface that faces the volunteer, so each packet is seen once.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any


def _matches(name: str, domains: dict[str, Any]) -> str | None:
    name = name.lower().rstrip(".")
    for d in domains:
        if name == d or name.endswith("." + d):
            return d
    return None


def run(config: dict[str, Any]) -> None:
    from scapy.config import conf
    from scapy.layers.dns import DNS, DNSRR
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.packet import Raw
    from scapy.sendrecv import sniff

    mode = config["mode"]
    rules: dict[str, Any] = config["rules"]
    out = conf.L3socket()

    def on_dns(pkt: Any) -> None:
        if not pkt.haslayer(DNS) or pkt[DNS].qr != 0 or not pkt[DNS].qd:
            return
        q = pkt[DNS].qd
        qname = q.qname.decode() if isinstance(q.qname, bytes) else str(q.qname)
        domain = _matches(qname, rules)
        if domain is None or q.qtype != 1:
            return
        ip, udp = pkt[IP], pkt[UDP]
        forged = (
            IP(src=ip.dst, dst=ip.src, ttl=64)
            / UDP(sport=udp.dport, dport=udp.sport)
            / DNS(id=pkt[DNS].id, qr=1, aa=0, rd=pkt[DNS].rd, ra=1, qd=q,
                  an=DNSRR(rrname=q.qname, type="A", ttl=300, rdata=rules[domain]))
        )
        out.send(forged)

    def on_http(pkt: Any) -> None:
        if not pkt.haslayer(Raw) or not pkt.haslayer(TCP):
            return
        payload = bytes(pkt[Raw].load)
        if payload[:8].split(b" ", 1)[0] not in (b"GET", b"POST", b"HEAD", b"PUT"):
            return
        host = ""
        for line in payload.split(b"\r\n")[1:]:
            if line.lower().startswith(b"host:"):
                host = line[5:].decode("latin-1").strip().split(":", 1)[0]
                break
        domain = _matches(host, rules)
        if domain is None:
            return
        ip, tcp = pkt[IP], pkt[TCP]
        body = rules[domain].encode()
        resp = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        seq, ack = tcp.ack, tcp.seq + len(payload)
        base = IP(src=ip.dst, dst=ip.src, ttl=64)
        out.send(base / TCP(sport=tcp.dport, dport=tcp.sport, flags="PA", seq=seq, ack=ack) / resp)
        out.send(base / TCP(sport=tcp.dport, dport=tcp.sport, flags="RA", seq=seq + len(resp), ack=ack))

    handler, bpf = (on_dns, "udp dst port 53") if mode == "dns" else (on_http, "tcp dst port 80")
    ready = config.get("ready_file")

    def started() -> None:
        if ready:
            Path(ready).write_text("ready\n")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sniff(iface=config["iface"], filter=bpf, prn=handler, store=False, started_callback=started)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    run(json.loads(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
