"""The one feature-extraction layer: bytes -> the HTTP/TLS/DNS features the rules compare.

Live probes, the helper, pcap replay and the OONI importer all call these functions, so that the
same bytes give the same features whichever source saw them (a plain-HTTP capture and the live
response it recorded must not differ by title whitespace or body cap, or the rules would see a
"different page" that is only a different extractor).

Everything here is pure, bounded and never raises on hostile input:
- decompression stops at ``cap`` bytes of output (a decompression bomb costs at most the cap);
- the title is found with a few linear ``find`` scans (no backtracking regex);
- the ClientHello and request parsers bound-check every read.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kzprobe import errors as E
from kzprobe.analysis.fingerprints import Fingerprints
from kzprobe.model import STEP_DNS, Observation

try:  # br is optional at import time: without it, a br body is kept raw with a decode error.
    import brotli as _brotli
except ImportError:  # pragma: no cover - brotli is a runtime dependency
    _brotli = None

#: Decoded bodies are capped here (what the probe keeps; lengths past it are meaningless).
BODY_CAP = 512 * 1024
#: body_head: the first bytes of the decoded body, as text.
HEAD_BYTES = 1024
TITLE_MAX = 200
#: The raw bytes between <title> and </title> that are decoded at most (the title is cut to
#: TITLE_MAX characters anyway; a multi-megabyte "title" must not be decoded whole).
_TITLE_RAW_MAX = 4 * TITLE_MAX * 4
#: Gzip allows several concatenated members; a body of thousands of empty members is a cheap
#: CPU sink, so only this many are decoded.
_MAX_MEMBERS = 64
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Decoded:
    """A body after Content-Encoding decoding."""

    body: bytes
    #: The decoded body reached ``cap`` and was cut there.
    truncated: bool
    #: Content-Encoding as the server sent it (None when absent or identity).
    encoding: str | None
    #: Why decoding stopped early or was not possible (None when it went through).
    error: str | None


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup (headers arrive as plain dicts from every source)."""
    want = name.lower()
    for k, v in headers.items():
        if isinstance(k, str) and k.lower() == want:
            return v if isinstance(v, str) else str(v)
    return None


def _inflate(raw: bytes, wbits: int, cap: int) -> tuple[bytes, bool, str | None]:
    """zlib-family decoding bounded at ``cap`` bytes of output; gzip members are followed."""
    out = bytearray()
    data = raw
    for _ in range(_MAX_MEMBERS):
        d = zlib.decompressobj(wbits)
        try:
            while True:
                room = cap + 1 - len(out)
                out += d.decompress(data, room)
                if len(out) > cap:
                    return bytes(out[:cap]), True, None
                data = d.unconsumed_tail
                if not data or d.eof:
                    break
        except zlib.error as exc:
            return bytes(out), False, f"{_name(wbits)}: {exc}"
        if not d.eof:
            return bytes(out), False, f"{_name(wbits)}: stream ends early"
        data = d.unused_data
        # Another gzip member follows (RFC 1952 2.2); anything else after the end is ignored.
        if wbits < 16 + zlib.MAX_WBITS or not data.startswith(b"\x1f\x8b"):
            return bytes(out), False, None
    return bytes(out), False, f"{_name(wbits)}: more than {_MAX_MEMBERS} members"


def _name(wbits: int) -> str:
    return "gzip" if wbits > zlib.MAX_WBITS else "deflate"


def _unbrotli(raw: bytes, cap: int) -> tuple[bytes, bool, str | None]:
    if _brotli is None:  # pragma: no cover
        return raw[:cap], len(raw) > cap, "br: no brotli decoder installed"
    d = _brotli.Decompressor()
    out = bytearray()
    try:
        out += d.process(raw, output_buffer_limit=cap + 1)
        # With output_buffer_limit, the decoder holds the rest back until asked with empty input.
        while len(out) <= cap and not d.is_finished() and not d.can_accept_more_data():
            more = d.process(b"", output_buffer_limit=cap + 1 - len(out))
            if not more:
                break
            out += more
    except _brotli.error as exc:
        return bytes(out[:cap]), len(out) > cap, f"br: {exc or 'invalid stream'}"
    if len(out) > cap:
        return bytes(out[:cap]), True, None
    if not d.is_finished():
        return bytes(out), False, "br: stream ends early"
    return bytes(out), False, None


def _deflate_wbits(raw: bytes) -> int:
    """RFC 9110 says deflate is zlib-wrapped; some servers send raw deflate. Tell them apart."""
    if len(raw) >= 2 and raw[0] & 0x0F == 8 and ((raw[0] << 8) | raw[1]) % 31 == 0:
        return zlib.MAX_WBITS
    return -zlib.MAX_WBITS


def decode_body(raw: bytes, headers: Mapping[str, str], cap: int = BODY_CAP) -> Decoded:
    """Undo Content-Encoding (gzip, x-gzip, deflate, br; several in order), bounded at ``cap``.

    Never raises: a broken or unknown encoding gives what could be decoded (or the raw bytes for
    an unknown one) and ``error`` says why.  A body cut on the wire decodes as far as it goes.
    """
    sent = header(headers, "content-encoding")
    codings = [c.strip().lower() for c in (sent or "").split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    encoding = sent.strip() if sent and codings else None
    body = raw
    truncated = False
    error: str | None = None
    # Codings are listed in the order applied: undo them last first.
    for coding in reversed(codings[:4]):
        if coding in ("gzip", "x-gzip"):
            body, cut, error = _inflate(body, 16 + zlib.MAX_WBITS, cap)
        elif coding == "deflate":
            body, cut, error = _inflate(body, _deflate_wbits(body), cap)
        elif coding == "br":
            body, cut, error = _unbrotli(body, cap)
        else:
            error = f"unsupported content-encoding {coding!r}"
            break
        truncated = truncated or cut
        if error:
            break
    else:
        if len(codings) > 4:
            error = "more than 4 content-codings"
    if len(body) > cap:
        body, truncated = body[:cap], True
    return Decoded(body=body, truncated=truncated, encoding=encoding, error=error)


# --- text ------------------------------------------------------------------------------------------
_CHARSET = re.compile(rb"""charset\s*=\s*["']?\s*([A-Za-z0-9._:-]{1,40})""", re.I)


def charset_of(headers: Mapping[str, str], body: bytes = b"") -> str:
    """The body's charset: Content-Type's, else a <meta> in the first 1 KiB, else UTF-8."""
    candidates = []
    ctype = header(headers, "content-type")
    if ctype:
        m = _CHARSET.search(ctype.encode("latin-1", "replace")[:512])
        if m:
            candidates.append(m.group(1))
    m = _CHARSET.search(body[:HEAD_BYTES])  # bounded: the character class cannot backtrack far
    if m:
        candidates.append(m.group(1))
    for c in candidates:
        try:
            return codecs.lookup(c.decode("ascii")).name
        except (LookupError, UnicodeDecodeError):
            continue
    return "utf-8"


def text_of(body: bytes, charset: str = "utf-8") -> str:
    try:
        return body.decode(charset, "replace")
    except LookupError:  # pragma: no cover - charset_of only returns known codecs
        return body.decode("utf-8", "replace")


_WS = re.compile(r"\s+")
_NAME_END = frozenset(b" \t\r\n\f/>")


def title_of(body: bytes, charset: str = "utf-8") -> str:
    """The first ``<title>``'s text, whitespace collapsed, stripped, at most 200 characters.

    Linear in the body: ``bytes.find`` scans only, each position looked at a bounded number of
    times (a non-greedy regex over ``<title>`` repeated through 512 KiB took minutes).
    No closing tag means no title, as OONI's extractor has it.
    """
    low = body.lower()
    i = low.find(b"<title")
    while i >= 0 and i + 6 < len(low) and low[i + 6] not in _NAME_END:  # e.g. <titles>
        i = low.find(b"<title", i + 6)
    if i < 0:
        return ""
    gt = low.find(b">", i + 6)
    if gt < 0:
        return ""
    end = low.find(b"</title", gt + 1)
    if end < 0:
        return ""
    raw = body[gt + 1:min(end, gt + 1 + _TITLE_RAW_MAX)]
    return _WS.sub(" ", text_of(raw, charset)).strip()[:TITLE_MAX]


@lru_cache(maxsize=1)
def default_fingerprints() -> Fingerprints:
    return Fingerprints.default()


def http_features(status: int | None, headers: Mapping[str, str], raw_body: bytes, *,
                  truncated_on_wire: bool = False, fingerprints: Fingerprints | None = None) -> dict[str, Any]:
    """The HTTP step's byte-derived keys (contract.HttpData), from the raw (wire) body.

    ``truncated_on_wire``: the caller stopped reading the raw body at its own cap.
    ``status`` is accepted so that every caller passes the same things; fingerprints do not
    depend on it today.  ``decode_error`` is present only when decoding failed.
    """
    fps = fingerprints if fingerprints is not None else default_fingerprints()
    dec = decode_body(raw_body, headers)
    charset = charset_of(headers, dec.body)
    text = text_of(dec.body, charset)
    match = fps.blockpage(text, headers)
    out: dict[str, Any] = {
        "title": title_of(dec.body, charset),
        "body_length": len(dec.body),
        "body_sha256": hashlib.sha256(dec.body).hexdigest(),
        "body_head": text_of(dec.body[:HEAD_BYTES], charset),
        "truncated": dec.truncated or truncated_on_wire,
        "content_encoding": dec.encoding,
        "wire_bytes": len(raw_body),
        "blockpage": match.name if match else None,
    }
    if dec.error:
        out["decode_error"] = dec.error
    return out


def dns_blockpage(addresses: Iterable[str], fingerprints: Fingerprints | None = None) -> str | None:
    """The name of the first non-false-positive ``location_found=dns`` fingerprint an answer matches."""
    fps = fingerprints if fingerprints is not None else default_fingerprints()
    best = None
    for a in addresses:
        if not isinstance(a, str):
            continue
        for m in fps.match_dns(a):
            if not m.fingerprint.false_positive and (
                    best is None or m.fingerprint.confidence > best.fingerprint.confidence):
                best = m
    return best.name if best else None


# --- SNI and Host --------------------------------------------------------------------------------
def _handshake(buf: bytes, limit: int = 16384) -> bytes:
    """Concatenated handshake-record payloads at the start of a TLS stream (a ClientHello may span records)."""
    out = bytearray()
    p = 0
    while p + 5 <= len(buf) and len(out) < limit and buf[p] == 0x16:
        rlen = (buf[p + 3] << 8) | buf[p + 4]
        out += buf[p + 5:p + 5 + rlen]
        p += 5 + rlen
    return bytes(out)


def sni_of(client_hello: bytes) -> str | None:
    """The server_name of a TLS ClientHello at the start of a client's stream (lower-case, no final dot)."""
    if len(client_hello) < 6 or client_hello[0] != 0x16 or client_hello[1] != 0x03:
        return None
    hs = _handshake(client_hello)
    n = len(hs)
    if n < 4 or hs[0] != 0x01:
        return None

    def u16(p: int) -> int:
        return (hs[p] << 8) | hs[p + 1]

    p = 4 + 2 + 32  # handshake header, client_version, random
    if p + 1 > n:
        return None
    p += 1 + hs[p]  # session id
    if p + 2 > n:
        return None
    p += 2 + u16(p)  # cipher suites
    if p + 1 > n:
        return None
    p += 1 + hs[p]  # compression methods
    if p + 2 > n:
        return None
    ext_end = min(n, p + 2 + u16(p))
    p += 2
    while p + 4 <= ext_end:
        etype, elen, body = u16(p), u16(p + 2), p + 4
        if etype == 0 and body + 2 <= ext_end:
            q = body + 2
            lend = min(ext_end, body + 2 + u16(body))
            while q + 3 <= lend:
                nlen = u16(q + 1)
                if hs[q] == 0 and q + 3 + nlen <= lend:
                    name = hs[q + 3:q + 3 + nlen].decode("ascii", "replace").lower().rstrip(".")
                    return name or None
                q += 3 + nlen
            return None
        p = body + elen
    return None


_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"OPTIONS ", b"DELETE ", b"CONNECT ", b"PATCH ")


def response_head(head: bytes) -> tuple[int, dict[str, str]] | None:
    """``(status, headers)`` of an HTTP/1.x response head (its blank line excluded), or None when it
    is not one.  A proxy's answer to CONNECT, read live (probes/kinds.py) and from a capture
    (replay/tunnel.py) alike."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    code = parts[1] if len(parts) > 1 else ""
    # isascii: latin-1 text has digits int() refuses ("\xb2" is a superscript two).
    if not parts[0].startswith("HTTP/1.") or not (code.isascii() and code.isdigit() and len(code) == 3):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip():
            headers[name.strip()] = value.strip()
    return int(code), headers


def host_of(http_request: bytes) -> str | None:
    """The Host of an HTTP/1 request at the start of a client's stream: lower-case, no port, no final dot."""
    if not http_request.startswith(_METHODS):
        return None
    head = http_request[:8192].split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep or name.strip().lower() != b"host":
            continue
        host = value.strip().decode("latin-1").lower()
        if host.startswith("["):  # [v6]:port
            host = host[1:host.find("]")] if "]" in host else ""
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
        return host.rstrip(".") or None
    return None


# --- DNS -----------------------------------------------------------------------------------------
def fold_failure(failure_a: str | None, failure_aaaa: str | None, addresses: list[str]) -> str | None:
    """The failure of an A+AAAA lookup: none if any address came back; a missing AAAA alone is not a failure."""
    if addresses:
        return None
    if failure_a and failure_a != E.DNS_NO_ANSWER:
        return failure_a
    if failure_aaaa and failure_aaaa != E.DNS_NO_ANSWER:
        return failure_aaaa
    return E.DNS_NO_ANSWER


def fold_pair(a: Observation, aaaa: Observation) -> Observation:
    """One observation for an A and an AAAA lookup of the same name; ``responses`` stay the A query's."""
    da, dq = a.data, aaaa.data
    addresses = list(dict.fromkeys([*(da.get("addresses") or []), *(dq.get("addresses") or [])]))
    data: dict[str, Any] = {**da, "qtype": "A+AAAA",
                            "answers": [*(da.get("answers") or []), *(dq.get("answers") or [])],
                            "addresses": addresses}
    if "injected" not in data and dq.get("injected"):
        data["injected"] = dq["injected"]
    return Observation(step=STEP_DNS, target=a.target, domain=a.domain, vantage=a.vantage, source=a.source,
                       address=a.address, port=a.port, t_start=min(a.t_start, aaaa.t_start),
                       t_end=max(a.t_end, aaaa.t_end), failure=fold_failure(a.failure, aaaa.failure, addresses),
                       purpose=a.purpose, attempt=a.attempt, data=data,
                       packets=sorted({*a.packets, *aaaa.packets}), id=a.id)


def fold_dns(observations: Iterable[Observation], window: float = 1.0) -> list[Observation]:
    """Fold each A lookup with the AAAA lookup of the same name by the same resolver made within
    ``window`` seconds, as a stub resolver asks both at once.  Other observations pass unchanged,
    in their order (a folded pair takes the A lookup's place)."""
    obs = list(observations)
    groups: dict[tuple[Any, ...], list[Observation]] = defaultdict(list)
    for o in obs:
        if o.step == STEP_DNS and o.data.get("qtype") in ("A", "AAAA"):
            key = (o.target, o.vantage, o.source, o.purpose, o.domain,
                   str(o.data.get("resolver")), str(o.data.get("transport")))
            groups[key].append(o)
    replaced: dict[int, Observation | None] = {}
    for group in groups.values():
        aaaa = [o for o in group if o.data.get("qtype") == "AAAA"]
        for o in group:
            if o.data.get("qtype") != "A":
                continue
            mate = min((q for q in aaaa if abs(q.t_start - o.t_start) <= window),
                       key=lambda q: abs(q.t_start - o.t_start), default=None)
            if mate is None:
                continue
            aaaa.remove(mate)
            replaced[id(o)] = fold_pair(o, mate)
            replaced[id(mate)] = None
    out = []
    for o in obs:
        if id(o) not in replaced:
            out.append(o)
        elif (merged := replaced[id(o)]) is not None:
            out.append(merged)
    return out


# --- ClientHello / ServerHello fingerprints --------------------------------------------------------
def _hello_body(buf: bytes, msg_type: int) -> bytes | None:
    """The handshake message body (after its 4-byte header) at the start of a TLS stream, if of ``msg_type``."""
    if len(buf) < 6 or buf[0] != 0x16 or buf[1] != 0x03:
        return None
    hs = _handshake(buf)
    if len(hs) < 4 or hs[0] != msg_type:
        return None
    return hs[4:4 + ((hs[1] << 16) | (hs[2] << 8) | hs[3])]


def _grease(cid: int) -> bool:
    return (cid & 0x0F0F) == 0x0A0A and (cid >> 8) == (cid & 0xFF)


def cipher_suites(client_hello: bytes) -> list[int] | None:
    """The cipher suite ids a ClientHello (a client's stream from its first byte) offers, in order."""
    body = _hello_body(client_hello, 0x01)
    if body is None or len(body) < 35:
        return None
    p = 2 + 32
    p += 1 + body[p]  # session id
    if p + 2 > len(body):
        return None
    n = (body[p] << 8) | body[p + 1]
    raw = body[p + 2:p + 2 + n]
    if len(raw) != n or n % 2:
        return None
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, n, 2)]


def hello_fingerprint(client_hello: bytes) -> str | None:
    """Which of the probe's ClientHellos this is: "tor", "browser" or None (another client).

    "tor": a run of Tor's cipher list (``probes.hellos.TOR_SIGNATURES``: 2012-2013's, which a
    byte-matching DPI box keys on, or the one of 2008 to May 2012) at a suite boundary.
    "browser": the TLS 1.2 suites begin in Chrome's order (``probes.hellos.BROWSER_CIPHERS``),
    GREASE values skipped.
    """
    from kzprobe.probes.hellos import BROWSER, BROWSER_CIPHERS, TOR, TOR_SIGNATURES

    suites = cipher_suites(client_hello)
    if not suites:
        return None
    wire = b"".join(c.to_bytes(2, "big") for c in suites)
    for signature in TOR_SIGNATURES:
        at = wire.find(signature)
        while at >= 0:
            if at % 2 == 0:
                return TOR
            at = wire.find(signature, at + 1)
    tls12 = [c for c in suites if not _grease(c) and c >> 8 != 0x13 and c != 0x00FF]
    head = [cid for cid, _ in BROWSER_CIPHERS[:4]]
    if tls12[:len(head)] == head:
        return BROWSER
    return None


_VERSIONS = {0x0304: "TLSv1.3", 0x0303: "TLSv1.2", 0x0302: "TLSv1.1", 0x0301: "TLSv1", 0x0300: "SSLv3"}


def server_hello(server_stream: bytes) -> tuple[str | None, int | None]:
    """(negotiated version as OpenSSL names it, cipher suite id) from a ServerHello at the start of a
    server's stream; (None, None) when there is none.  TLS 1.3's version is in supported_versions."""
    body = _hello_body(server_stream, 0x02)
    if body is None or len(body) < 35:
        return None, None
    version = (body[0] << 8) | body[1]
    p = 2 + 32
    p += 1 + body[p]
    if p + 3 > len(body):
        return None, None
    cipher = (body[p] << 8) | body[p + 1]
    p += 3  # cipher suite, compression method
    if p + 2 <= len(body):
        end = min(len(body), p + 2 + ((body[p] << 8) | body[p + 1]))
        p += 2
        while p + 4 <= end:
            etype, elen = (body[p] << 8) | body[p + 1], (body[p + 2] << 8) | body[p + 3]
            if etype == 0x002B and elen == 2 and p + 6 <= end:
                version = (body[p + 4] << 8) | body[p + 5]
            p += 4 + elen
    return _VERSIONS.get(version), cipher
