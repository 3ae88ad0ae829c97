"""Tiny parsers for the bytes a trace sends and receives: HTTP Host, TLS SNI, DNS names.

Hand-written rather than scapy layers because they run on every packet of a capture and in the
live sniffer callback, and because the trace needs only three facts (which domain, is it a
ServerHello, which HTTP status) that scapy's TLS dissector is slow and fragile at.
"""

from __future__ import annotations

import struct


def http_host(payload: bytes) -> str | None:
    """The Host header of an HTTP request, lower-cased, without port."""
    if not payload[:8].split(b" ", 1)[0].isalpha():
        return None
    head = payload.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            host = value.strip().decode("latin-1").lower()
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return None


def http_status(payload: bytes) -> int | None:
    if not payload.startswith(b"HTTP/"):
        return None
    parts = payload.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return None


def http_title(payload: bytes) -> str | None:
    low = payload.lower()
    i = low.find(b"<title>")
    if i < 0:
        return None
    j = low.find(b"</title>", i)
    raw = payload[i + 7 : j if j > 0 else i + 80]
    return raw.decode("utf-8", "replace").strip()[:60] or None


def tls_sni(payload: bytes) -> str | None:
    """The server_name of a TLS ClientHello (first record only), or None."""
    try:
        if len(payload) < 9 or payload[0] != 0x16 or payload[5] != 0x01:
            return None
        p = 9  # record header (5) + handshake type and length (4)
        p += 2 + 32  # client_version, random
        p += 1 + payload[p]  # session id
        (n,) = struct.unpack_from("!H", payload, p)
        p += 2 + n  # cipher suites
        p += 1 + payload[p]  # compression methods
        (ext_total,) = struct.unpack_from("!H", payload, p)
        p += 2
        end = min(len(payload), p + ext_total)
        while p + 4 <= end:
            etype, elen = struct.unpack_from("!HH", payload, p)
            p += 4
            if etype == 0:  # server_name
                q = p + 2
                while q + 3 <= p + elen:
                    ntype = payload[q]
                    (nlen,) = struct.unpack_from("!H", payload, q + 1)
                    if ntype == 0:
                        return payload[q + 3 : q + 3 + nlen].decode("ascii", "replace").lower()
                    q += 3 + nlen
                return None
            p += elen
    except (IndexError, struct.error):
        return None
    return None


def is_tls_server_hello(payload: bytes) -> bool:
    return len(payload) >= 6 and payload[0] == 0x16 and payload[1] == 0x03 and payload[5] == 0x02


def is_tls_alert(payload: bytes) -> bool:
    return len(payload) >= 5 and payload[0] == 0x15 and payload[1] == 0x03


def dns_qname(payload: bytes) -> str | None:
    """The first question's name of a DNS message."""
    try:
        if len(payload) < 12:
            return None
        (qd,) = struct.unpack_from("!H", payload, 4)
        if qd < 1:
            return None
        labels: list[str] = []
        p = 12
        while True:
            n = payload[p]
            if n == 0:
                break
            if n & 0xC0:
                return None
            labels.append(payload[p + 1 : p + 1 + n].decode("ascii", "replace"))
            p += 1 + n
        return ".".join(labels).lower() or None
    except IndexError:
        return None


def dns_is_response(payload: bytes) -> bool:
    return len(payload) >= 4 and bool(payload[2] & 0x80)


_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def dns_summary(payload: bytes) -> str:
    """"DNS NOERROR 1.2.3.4" -- rcode and the A records of a response."""
    if len(payload) < 12:
        return "DNS ?"
    rcode = _RCODES.get(payload[3] & 0x0F, str(payload[3] & 0x0F))
    addrs: list[str] = []
    try:
        qd, an = struct.unpack_from("!HH", payload, 4)
        p = 12
        for _ in range(qd):
            p = _skip_name(payload, p) + 4
        for _ in range(an):
            p = _skip_name(payload, p)
            rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", payload, p)
            p += 10
            if rtype == 1 and rdlen == 4:
                addrs.append(".".join(str(b) for b in payload[p : p + 4]))
            p += rdlen
    except (IndexError, struct.error):
        pass
    return " ".join(["DNS", rcode, *addrs])


def _skip_name(buf: bytes, p: int) -> int:
    while True:
        n = buf[p]
        if n == 0:
            return p + 1
        if n & 0xC0 == 0xC0:
            return p + 2
        p += 1 + n


def build_dns_query(qname: str, qid: int) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q = b"".join(bytes([len(label)]) + label.encode("ascii") for label in qname.strip(".").split("."))
    return header + q + b"\x00" + struct.pack("!HH", 1, 1)


def build_http_get(host: str) -> bytes:
    return (
        f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kzprobe-trace\r\nAccept: */*\r\n\r\n"
    ).encode("ascii")
