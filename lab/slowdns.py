"""A deliberately slow authoritative DNS server (dnspython), for the ``dns-injection`` sites only.

``python -m kzprobe.lab.slowdns CONFIG.json``.  An on-path injector only wins its race when the
real answer takes longer than the injector does, as it does for a far-away authoritative server.
Real deployments get that from distance; this kernel has no netem to fake distance, so the one
server that answers for injected names waits ``delay`` seconds before answering.  Every other name
is served by dnsmasq.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any


def serve(config: dict[str, Any]) -> None:
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    records: dict[str, str] = {k.lower().rstrip(".") + ".": v for k, v in config["records"].items()}
    delay = float(config.get("delay", 0.3))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config["address"], 53))
    lock = threading.Lock()

    def answer(data: bytes, peer: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # a malformed query gets no answer, as from any server
            return
        resp = dns.message.make_response(query)
        resp.flags |= 0x0400  # AA: this server is the zone's authority
        q = query.question[0]
        name = q.name.to_text().lower()
        if name not in records:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        elif q.rdtype == dns.rdatatype.A:
            resp.answer.append(dns.rrset.from_text(name, 300, "IN", "A", records[name]))
        time.sleep(delay)
        with lock:
            sock.sendto(resp.to_wire(), peer)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if config.get("ready_file"):
        Path(config["ready_file"]).write_text("ready\n")
    while True:
        data, peer = sock.recvfrom(4096)
        threading.Thread(target=answer, args=(data, peer), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    serve(json.loads(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
