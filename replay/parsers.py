"""Bounded, exception-free parsers for the few application messages replay looks at.

Written by hand rather than with scapy or dnspython because they run on captured (possibly
truncated, possibly hostile) bytes: every read is bounds-checked, every loop is bounded, and a
malformed message gives None instead of an exception.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from kzprobe.analysis.features import sni_of

# --- TLS -----------------------------------------------------------------------------------------


def tls_handshake_bytes(buf: bytes, limit: int = 16384) -> bytes | None:
    """Concatenate the handshake-record fragments at the start of a TLS stream."""
    out = bytearray()
    p = 0
    n = len(buf)
    while p + 5 <= n and len(out) < limit:
        if buf[p] != 0x16:
            break
        rlen = (buf[p + 3] << 8) | buf[p + 4]
        out += buf[p + 5:p + 5 + rlen]
        p += 5 + rlen
    return bytes(out) if out else None


def client_hello_sni(buf: bytes) -> tuple[bool, str | None]:
    """(is this a TLS ClientHello?, its server_name) from the first bytes a client sent.

    The name comes from the feature layer's parser (:func:`kzprobe.analysis.features.sni_of`),
    the one every source uses.
    """
    if len(buf) < 6 or buf[0] != 0x16 or buf[1] != 0x03:
        return False, None
    hs = tls_handshake_bytes(buf)
    if not hs or hs[0] != 0x01:
        return False, None
    return True, sni_of(buf)


def tls_server_reply(buf: bytes) -> str:
    """What the server's first bytes are: "server_hello", "alert" or "other"."""
    if len(buf) >= 6 and buf[0] == 0x16 and buf[5] == 0x02:
        return "server_hello"
    if len(buf) >= 1 and buf[0] == 0x15:
        return "alert"
    return "other"


def tls_client_after_hello(buf: bytes) -> str:
    """What a TLS client sent after its ClientHello, from the start of its stream.

    "nothing", "alert" (a plaintext alert, or a TLS 1.3 record too short for a Finished: an
    encrypted alert), "continued" (its next flight: key exchange, CCS + Finished, data) or
    "unknown" (the ClientHello itself is not all there).
    """
    n = len(buf)
    if n < 9 or buf[0] != 0x16 or buf[5] != 0x01:
        return "unknown"
    need = 4 + ((buf[6] << 16) | (buf[7] << 8) | buf[8])  # the ClientHello handshake message
    p = 0
    got = 0
    while got < need:
        if p + 5 > n or buf[p] != 0x16:
            return "unknown"
        rlen = (buf[p + 3] << 8) | buf[p + 4]
        got += rlen
        p += 5 + rlen
    if got > need:  # more handshake messages in the same record: the client went on
        return "continued"
    for _ in range(4):
        if p >= n:
            return "nothing"
        if p + 5 > n:
            return "unknown"
        rtype = buf[p]
        rlen = (buf[p + 3] << 8) | buf[p + 4]
        if rtype == 0x15:
            return "alert"
        if rtype == 0x14:  # TLS 1.3 middlebox-compatibility CCS: look at what follows it
            p += 5 + rlen
            continue
        # An encrypted TLS 1.3 alert is 2 + 1 + 16 (AEAD tag) = 19 bytes; the shortest
        # Finished is 4 + 32 + 1 + 16 = 53.
        if rtype == 0x17 and rlen < 40:
            return "alert"
        return "continued"
    return "continued"


# --- HTTP ----------------------------------------------------------------------------------------
_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"OPTIONS ", b"DELETE ", b"CONNECT ", b"PATCH ")


def http_request(buf: bytes) -> tuple[str, str, str] | None:
    """(method, path, host) of an HTTP/1 request at the start of ``buf``."""
    if not buf.startswith(_METHODS):
        return None
    head = buf[:8192].split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    method = parts[0].decode("ascii", "replace")
    path = parts[1].decode("latin-1", "replace") if len(parts) > 1 else "/"
    host = ""
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"host":
            host = v.strip().decode("latin-1", "replace").lower()
            break
    return method, path, host


@dataclass
class HttpResponse:
    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def http_response(buf: bytes) -> HttpResponse:
    """Status line and headers of what a server sent; tolerates a missing status line (injected raw
    HTML pages).  The body is as sent: the feature layer decodes it and extracts its features."""
    status = None
    headers: dict[str, str] = {}
    body = buf
    if buf.startswith(b"HTTP/"):
        head, sep, rest = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) > 1 and parts[1][:3].isdigit():
            status = int(parts[1][:3])
        for line in lines[1:64]:
            k, _, v = line.partition(b":")
            if k:
                headers[k.strip().decode("latin-1", "replace")] = v.strip().decode("latin-1", "replace")
        body = rest if sep else b""
    return HttpResponse(status, headers, body)


# --- DNS -----------------------------------------------------------------------------------------
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
QTYPES = {1: "A", 28: "AAAA", 255: "ANY", 5: "CNAME", 15: "MX", 16: "TXT", 2: "NS", 65: "HTTPS"}


@dataclass
class DnsMessage:
    txid: int
    response: bool
    rcode: str
    qname: str
    qtype: str
    answers: list[dict[str, object]]
    addresses: list[str]


def _name(msg: bytes, p: int) -> tuple[str, int] | None:
    """Read a (possibly compressed) name at p: (name, offset after it in the original place)."""
    labels: list[str] = []
    n = len(msg)
    after = -1
    jumps = 0
    total = 0
    while True:
        if p >= n:
            return None
        ln = msg[p]
        if ln == 0:
            p += 1
            break
        if ln & 0xC0 == 0xC0:
            if p + 1 >= n or jumps > 16:
                return None
            if after < 0:
                after = p + 2
            p = ((ln & 0x3F) << 8) | msg[p + 1]
            jumps += 1
            continue
        if ln & 0xC0 or p + 1 + ln > n:
            return None
        labels.append(msg[p + 1:p + 1 + ln].decode("ascii", "replace"))
        total += ln + 1
        if total > 255:
            return None
        p += 1 + ln
    return ".".join(labels).lower(), (after if after >= 0 else p)


def dns_message(msg: bytes) -> DnsMessage | None:
    if len(msg) < 12:
        return None
    txid = (msg[0] << 8) | msg[1]
    flags = (msg[2] << 8) | msg[3]
    qd = (msg[4] << 8) | msg[5]
    an = (msg[6] << 8) | msg[7]
    p = 12
    qname, qtype = "", ""
    for i in range(min(qd, 4)):
        got = _name(msg, p)
        if got is None or got[1] + 4 > len(msg):
            return None
        name, p = got
        if i == 0:
            qname = name
            qtype = QTYPES.get((msg[p] << 8) | msg[p + 1], str((msg[p] << 8) | msg[p + 1]))
        p += 4
    answers: list[dict[str, object]] = []
    addresses: list[str] = []
    for _ in range(min(an, 64)):
        got = _name(msg, p)
        if got is None or got[1] + 10 > len(msg):
            break
        name, p = got
        rtype = (msg[p] << 8) | msg[p + 1]
        ttl = int.from_bytes(msg[p + 4:p + 8], "big")
        rdlen = (msg[p + 8] << 8) | msg[p + 9]
        rd = msg[p + 10:p + 10 + rdlen]
        p += 10 + rdlen
        if len(rd) != rdlen:
            break
        data: str
        if rtype == 1 and rdlen == 4:
            data = socket.inet_ntop(socket.AF_INET, rd)
            addresses.append(data)
        elif rtype == 28 and rdlen == 16:
            data = socket.inet_ntop(socket.AF_INET6, rd)
            addresses.append(data)
        elif rtype == 5:
            cn = _name(msg, p - rdlen)
            data = cn[0] if cn else ""
        else:
            data = rd.hex()
        answers.append({"type": QTYPES.get(rtype, str(rtype)), "name": name, "data": data, "ttl": ttl})
    return DnsMessage(txid, bool(flags & 0x8000), RCODES.get(flags & 0xF, str(flags & 0xF)),
                      qname, qtype, answers, addresses)


# --- HTTP/1.1 message streams (the control helper's exchanges) ------------------------------------
@dataclass
class HttpMessage:
    """One HTTP/1 message found in a reassembled stream, with its byte span in that stream."""

    start: int
    end: int
    first_line: str
    headers: dict[str, str]
    body: bytes
    complete: bool


def _dechunk(buf: bytes, p: int, limit: int) -> tuple[bytes, int, bool]:
    """Decode a chunked body starting at p: (body, offset after it, complete?)."""
    out = bytearray()
    n = len(buf)
    for _ in range(100_000):  # bounded: a hostile stream of empty-looking chunks ends here
        eol = buf.find(b"\r\n", p, min(n, p + 1024))
        if eol < 0:
            return bytes(out), n, False
        size_s = buf[p:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_s, 16)
        except ValueError:
            return bytes(out), n, False
        p = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", p - 2, min(n, p + 8192))  # trailers, then the blank line
            return bytes(out), (end + 4 if end >= 0 else n), end >= 0
        if size < 0 or p + size > n or len(out) + size > limit:
            out += buf[p:min(n, p + size)]
            return bytes(out), n, False
        out += buf[p:p + size]
        p += size + 2
    return bytes(out), n, False


def http_messages(buf: bytes, *, requests: bool, limit: int = 1 << 24, max_messages: int = 256
                  ) -> list[HttpMessage]:
    """Every HTTP/1 message in a reassembled one-direction stream, in order.

    Bodies are delimited by Content-Length or chunked encoding; a response with neither runs to
    the end of the stream (HTTP/1.0 style).  A message cut by the end of the stream comes back
    with ``complete=False`` and what was there.  Never raises on malformed input.
    """
    out: list[HttpMessage] = []
    p = 0
    n = len(buf)
    while p < n and len(out) < max_messages:
        hend = buf.find(b"\r\n\r\n", p, min(n, p + 65536))
        if hend < 0:
            break
        lines = buf[p:hend].split(b"\r\n")
        first = lines[0].decode("latin-1", "replace")
        if requests and not buf.startswith(_METHODS, p):
            break
        if not requests and not first.startswith("HTTP/"):
            break
        headers: dict[str, str] = {}
        for line in lines[1:128]:
            k, _, v = line.partition(b":")
            if k:
                headers[k.strip().decode("latin-1", "replace").lower()] = v.strip().decode("latin-1", "replace")
        body_at = hend + 4
        te = headers.get("transfer-encoding", "").lower()
        cl = headers.get("content-length", "").strip()
        code = first.split(" ", 2)[1][:3] if not requests and first.count(" ") else ""
        if code.startswith("1") or code in ("204", "304"):  # no body, by definition (RFC 9112 6.3)
            body, q, complete = b"", body_at, True
        elif "chunked" in te:
            body, q, complete = _dechunk(buf, body_at, limit)
        elif cl.isascii() and cl.isdigit():  # latin-1 "\xb2" is a digit int() refuses
            size = int(cl)
            q = body_at + size
            body, complete = buf[body_at:min(n, q, body_at + limit)], q <= n
            q = min(q, n)
        elif requests:
            body, q, complete = b"", body_at, True
        else:
            body, q, complete = buf[body_at:body_at + limit], n, True
        out.append(HttpMessage(p, q, first, headers, body, complete))
        if not complete or q <= p:
            break
        p = q
    return out


def dns_stream(buf: bytes, max_messages: int = 64) -> list[DnsMessage]:
    """DNS messages in a TCP stream (RFC 7766: each one prefixed by its 2-byte length)."""
    out: list[DnsMessage] = []
    p = 0
    while p + 2 <= len(buf) and len(out) < max_messages:
        ln = (buf[p] << 8) | buf[p + 1]
        if ln < 12 or p + 2 + ln > len(buf):
            break
        msg = dns_message(buf[p + 2:p + 2 + ln])
        if msg is None:
            break
        out.append(msg)
        p += 2 + ln
    return out
