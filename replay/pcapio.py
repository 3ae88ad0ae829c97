"""A streaming raw reader for packet captures, and a fast IP/TCP/UDP/ICMP header decoder.

Why not scapy: dissecting every packet with scapy runs at about 6k packets/s; this module reads
records with :mod:`struct` and decodes only the headers, which is what replay needs (TTL, IP-ID,
ports, flags, sequence numbers), an order of magnitude faster.  Payloads are not copied until
asked for.

API
---
``iter_packets(path, result=None) -> Iterator[Packet]``
    Every IPv4/IPv6 packet of a pcap or pcapng file (plain or gzip, detected by magic), in file
    order.  Frames that are not IP (ARP, LLDP, ...) are skipped but still counted, so
    ``Packet.number`` is the 1-based frame number Wireshark shows.  Pass a :class:`ReadResult`
    to learn, after the loop ends, the format, the link types seen, how many frames were read
    and -- for a damaged file -- where and why reading stopped.  Damage never raises: the
    iterator stops and ``result.error`` / ``result.error_offset`` / ``result.error_frame`` say
    where.  A file that is not a capture at all, or an unsupported link type, raises
    :class:`CaptureError` (its message names the file and the link type).

``iter_frames(path, result=None) -> Iterator[tuple[int, float, int, bytes]]``
    The raw records: (frame number, timestamp, link type, frame bytes).

``decode(number, ts, linktype, frame) -> Packet | None``
    Decode one frame.

:class:`Packet` (a named tuple; properties are computed on access):
    ``number, ts, version (4|6), src_b, dst_b (packed addresses), ttl (hop limit for IPv6),
    ip_id (None for IPv6), proto (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...), sport, dport,
    flags, seq, ack (TCP, else None/0), raw, poff, pend (the payload is raw[poff:pend]),
    icmp_type, icmp_code, inner``.  ``src`` / ``dst`` give text addresses, ``payload`` the
    L4 payload bytes, ``payload_len`` its length.  For ICMP / ICMPv6 errors (unreachable, time
    exceeded, ...) ``inner`` is a :class:`Quoted` header of the packet the error refers to.

Link types: Ethernet (1, with 802.1Q / QinQ), raw IP (101, 12, 14, 228, 229), Linux SLL (113),
SLL2 (276), BSD loopback (0, 108).
"""

from __future__ import annotations

import gzip
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple

# TCP flag bits.
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

LINKTYPE_NAMES = {
    0: "NULL", 1: "ETHERNET", 12: "RAW", 14: "RAW", 101: "RAW", 105: "IEEE802_11", 108: "LOOP",
    113: "LINUX_SLL", 127: "IEEE802_11_RADIOTAP", 228: "IPV4", 229: "IPV6", 276: "LINUX_SLL2",
}
SUPPORTED_LINKTYPES = frozenset({0, 1, 12, 14, 101, 108, 113, 228, 229, 276})

#: A record longer than this is corruption, not a packet (Wireshark uses the same bound).
MAX_RECORD = 262144 * 4
_CHUNK = 1 << 20


class CaptureError(Exception):
    """The file cannot be read as a capture at all; the message is a one-line explanation."""


class UnsupportedLinkType(CaptureError):
    pass


def linktype_name(lt: int) -> str:
    return f"{lt} ({LINKTYPE_NAMES.get(lt, 'unknown')})"


@dataclass
class ReadResult:
    """What a read did: filled in while iterating, final once the iterator is exhausted."""

    path: str = ""
    format: str = ""
    compressed: bool = False
    frames: int = 0
    linktypes: set[int] = field(default_factory=set)
    #: Why reading stopped early (damage), or None if the file was read to its end.
    error: str | None = None
    #: Byte offset (in the uncompressed stream) where the damage starts.
    error_offset: int | None = None
    #: The frame number that could not be read (frames + 1).
    error_frame: int | None = None
    warnings: list[str] = field(default_factory=list)
    #: TLS key log text from pcapng Decryption Secrets Blocks (NSS key log format), in file order.
    tls_keylog: list[bytes] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        if self.error is None:
            return f"{self.path}: {self.frames} frames ({self.format}{', gzip' if self.compressed else ''})"
        return (f"{self.path}: stopped at byte {self.error_offset} (frame {self.error_frame}) after "
                f"{self.frames} good frames: {self.error}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "compressed": self.compressed,
            "frames": self.frames, "linktypes": sorted(self.linktypes), "error": self.error,
            "error_offset": self.error_offset, "error_frame": self.error_frame,
            "warnings": list(self.warnings),
        }


def _ntop(b: bytes) -> str:
    if len(b) == 4:
        return f"{b[0]}.{b[1]}.{b[2]}.{b[3]}"
    if len(b) == 16:
        return socket.inet_ntop(socket.AF_INET6, b)
    return ""


class Quoted(NamedTuple):
    """The header of the packet an ICMP error quotes (often only its first 8 L4 bytes)."""

    version: int
    src_b: bytes
    dst_b: bytes
    ttl: int
    ip_id: int | None
    proto: int
    sport: int | None
    dport: int | None
    seq: int | None

    @property
    def src(self) -> str:
        return _ntop(self.src_b)

    @property
    def dst(self) -> str:
        return _ntop(self.dst_b)


class Packet(NamedTuple):
    number: int
    ts: float
    version: int
    src_b: bytes
    dst_b: bytes
    ttl: int
    ip_id: int | None
    proto: int
    sport: int | None
    dport: int | None
    flags: int
    seq: int
    ack: int
    raw: bytes
    poff: int
    pend: int
    icmp_type: int | None
    icmp_code: int | None
    inner: Quoted | None

    @property
    def src(self) -> str:
        return _ntop(self.src_b)

    @property
    def dst(self) -> str:
        return _ntop(self.dst_b)

    @property
    def payload(self) -> bytes:
        return self.raw[self.poff:self.pend]

    @property
    def payload_len(self) -> int:
        return self.pend - self.poff


_new_packet = tuple.__new__
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBB")
_PORTS = struct.Struct("!HH")
_PORTS_SEQ = struct.Struct("!HHI")
_IP6 = struct.Struct("!IHBB16s16s")
_EXT6 = frozenset({0, 43, 60, 135, 139, 140})


def _ip6_walk(frame: bytes, off: int, end: int) -> tuple[int, int, int | None]:
    """Skip IPv6 extension headers: (next header, L4 offset, fragment offset or None)."""
    nh = frame[off + 6]
    p = off + 40
    frag: int | None = None
    for _ in range(8):
        if nh in _EXT6:
            if p + 2 > end:
                return 59, end, frag
            nh, p = frame[p], p + (frame[p + 1] + 1) * 8
        elif nh == 44:
            if p + 8 > end:
                return 59, end, frag
            frag = int.from_bytes(frame[p + 2:p + 4], "big") >> 3
            nh, p = frame[p], p + 8
        elif nh == 51:
            if p + 2 > end:
                return 59, end, frag
            nh, p = frame[p], p + (frame[p + 1] + 2) * 4
        else:
            break
    return nh, min(p, end), frag


def _quoted(frame: bytes, off: int, end: int) -> Quoted | None:
    """Decode the IP header (and first L4 bytes) quoted by an ICMP error."""
    if off + 20 > end:
        return None
    v = frame[off] >> 4
    if v == 4:
        vihl, _tos, _tl, ipid, _frag, ttl, proto, _ck, s, d = _IP4.unpack_from(frame, off)
        l4 = off + (vihl & 15) * 4
    elif v == 6 and off + 40 <= end:
        s, d = frame[off + 8:off + 24], frame[off + 24:off + 40]
        ttl = frame[off + 7]
        ipid = None
        proto, l4, _f = _ip6_walk(frame, off, end)
    else:
        return None
    sport = dport = seq = None
    if proto in (6, 17) and l4 + 4 <= end:
        sport, dport = _PORTS.unpack_from(frame, l4)
        if proto == 6 and l4 + 8 <= end:
            seq = int.from_bytes(frame[l4 + 4:l4 + 8], "big")
    return Quoted(v, s, d, ttl, ipid, proto, sport, dport, seq)


def decode_ip(number: int, ts: float, frame: bytes, off: int) -> Packet | None:
    """Decode the IP packet starting at ``frame[off]``; None if it is not a sane IP packet."""
    flen = len(frame)
    if off + 20 > flen:
        return None
    v = frame[off] >> 4
    if v == 4:
        vihl, _tos, tlen, ipid, frag, ttl, proto, _ck, s, d = _IP4.unpack_from(frame, off)
        ihl = (vihl & 15) * 4
        if ihl < 20:
            return None
        # Trust the IP total length over the frame length: Ethernet pads short frames.
        end = off + tlen if 0 < tlen and off + tlen <= flen else flen
        l4 = off + ihl
        if frag & 0x1FFF:
            return _new_packet(Packet, (number, ts, 4, s, d, ttl, ipid, proto, None, None, 0, 0, 0,
                                        frame, min(l4, end), end, None, None, None))
    elif v == 6:
        if off + 40 > flen:
            return None
        plen = (frame[off + 4] << 8) | frame[off + 5]
        end = off + 40 + plen if 0 < plen and off + 40 + plen <= flen else flen
        ttl = frame[off + 7]
        s, d = frame[off + 8:off + 24], frame[off + 24:off + 40]
        ipid = None
        proto = frame[off + 6]
        if proto in (6, 17, 58):
            l4 = off + 40
        else:
            proto, l4, fr = _ip6_walk(frame, off, end)
            if fr:
                return _new_packet(Packet, (number, ts, 6, s, d, ttl, ipid, proto, None, None, 0, 0, 0,
                                            frame, l4, end, None, None, None))
    else:
        return None
    if proto == 6:
        if l4 + 20 > end:
            return _new_packet(Packet, (number, ts, v, s, d, ttl, ipid, proto, None, None, 0, 0, 0,
                                        frame, min(l4, end), end, None, None, None))
        sport, dport, seq, ack, doff, flags = _TCP.unpack_from(frame, l4)
        poff = l4 + (doff >> 4) * 4
        if poff > end:
            poff = end
        return _new_packet(Packet, (number, ts, v, s, d, ttl, ipid, 6, sport, dport, flags, seq, ack,
                                    frame, poff, end, None, None, None))
    if proto == 17:
        if l4 + 8 > end:
            return None
        sport, dport = _PORTS.unpack_from(frame, l4)
        return _new_packet(Packet, (number, ts, v, s, d, ttl, ipid, 17, sport, dport, 0, 0, 0,
                                    frame, l4 + 8, end, None, None, None))
    if proto == 1 or proto == 58:
        if l4 + 8 > end:
            return None
        itype, icode = frame[l4], frame[l4 + 1]
        inner = None
        if (proto == 1 and itype in (3, 4, 5, 11, 12)) or (proto == 58 and itype in (1, 2, 3, 4)):
            inner = _quoted(frame, l4 + 8, end)
        return _new_packet(Packet, (number, ts, v, s, d, ttl, ipid, proto, None, None, 0, 0, 0,
                                    frame, l4 + 8, end, itype, icode, inner))
    return _new_packet(Packet, (number, ts, v, s, d, ttl, ipid, proto, None, None, 0, 0, 0,
                                frame, min(l4, end), end, None, None, None))


def _l3_offset(linktype: int, frame: bytes) -> int:
    """Offset of the IP header in a frame of this link type, or -1 if the frame is not IP."""
    if linktype == 1:
        off = 12
        n = len(frame)
        for _ in range(3):
            if off + 2 > n:
                return -1
            et = (frame[off] << 8) | frame[off + 1]
            if et == 0x0800 or et == 0x86DD:
                return off + 2
            if et in (0x8100, 0x88A8, 0x9100):
                off += 4
                continue
            return -1
        return -1
    if linktype in (101, 12, 14, 228, 229):
        return 0
    if linktype == 113:
        if len(frame) < 16:
            return -1
        et = (frame[14] << 8) | frame[15]
        return 16 if et in (0x0800, 0x86DD) else -1
    if linktype == 276:
        if len(frame) < 20:
            return -1
        et = (frame[0] << 8) | frame[1]
        return 20 if et in (0x0800, 0x86DD) else -1
    if linktype in (0, 108):
        return 4 if len(frame) >= 24 else -1
    return -1


def decode(number: int, ts: float, linktype: int, frame: bytes) -> Packet | None:
    """Decode one captured frame of the given link type; None if it is not IP."""
    if linktype == 1 and len(frame) > 14:
        et = (frame[12] << 8) | frame[13]
        off = 14 if et == 0x0800 or et == 0x86DD else _l3_offset(1, frame)
    else:
        off = _l3_offset(linktype, frame)
    if off < 0:
        return None
    return decode_ip(number, ts, frame, off)


# --- file reading --------------------------------------------------------------------------------
class _Stream:
    """Buffered reads from a (possibly gzip) stream, tracking the absolute offset."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.read = f.read1 if isinstance(f, gzip.GzipFile) else f.read
        self.buf = b""
        self.pos = 0
        self.base = 0  # stream offset of buf[0]

    def fill(self, need: int) -> bool:
        """Make ``need`` bytes available from pos; False at EOF (what is there stays)."""
        avail = len(self.buf) - self.pos
        if avail >= need:
            return True
        parts = [self.buf[self.pos:]]
        self.base += self.pos
        self.pos = 0
        while avail < need:
            try:
                # read1 on gzip: a truncated stream raises only after everything before the
                # cut has been returned, so the partial result keeps every whole record.
                chunk = self.read(max(_CHUNK, need - avail))
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                self.buf = b"".join(parts)
                raise _Damage(f"decompression failed: {exc}") from None
            if not chunk:
                break
            parts.append(chunk)
            avail += len(chunk)
        self.buf = b"".join(parts)
        return avail >= need

    @property
    def offset(self) -> int:
        return self.base + self.pos

    @property
    def avail(self) -> int:
        return len(self.buf) - self.pos


class _Damage(Exception):
    pass


def _open(path: str, result: ReadResult) -> IO[bytes]:
    try:
        f: IO[bytes] = open(path, "rb")  # closed by iter_frames
    except OSError as exc:
        raise CaptureError(f"{path}: cannot open: {exc.strerror}") from None
    magic = f.read(2)
    f.seek(0)
    if magic == b"\x1f\x8b":
        result.compressed = True
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return f


_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6, 0), b"\xa1\xb2\xc3\xd4": (">", 1e-6, 0),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9, 0), b"\xa1\xb2\x3c\x4d": (">", 1e-9, 0),
    # Kuznetzov's modified pcap: 8 more bytes per record header.
    b"\x34\xcd\xb2\xa1": ("<", 1e-6, 8), b"\xa1\xb2\xcd\x34": (">", 1e-6, 8),
}


def iter_frames(path: str, result: ReadResult | None = None) -> Iterator[tuple[int, float, int, bytes]]:
    """Yield (frame number, timestamp, link type, frame bytes) for every record."""
    res = result if result is not None else ReadResult()
    res.path = str(path)
    f = _open(str(path), res)
    try:
        s = _Stream(f)
        try:
            if not s.fill(4):
                raise CaptureError(f"{path}: empty or too short to be a capture")
        except _Damage as exc:
            raise CaptureError(f"{path}: {exc}") from None
        head = s.buf[:4]
        try:
            if head in _PCAP_MAGICS:
                res.format = "pcap"
                yield from _pcap(s, res, *_PCAP_MAGICS[head])
            elif head == b"\x0a\x0d\x0d\x0a":
                res.format = "pcapng"
                yield from _pcapng(s, res)
            else:
                raise CaptureError(f"{path}: not a pcap or pcapng file (magic {head.hex()})")
        except _Damage as exc:
            _damage(res, str(exc), s.offset)
    finally:
        f.close()


def _damage(res: ReadResult, why: str, offset: int) -> None:
    res.error = why
    res.error_offset = offset
    res.error_frame = res.frames + 1


def _pcap(s: _Stream, res: ReadResult, e: str, tsres: float, extra: int) -> Iterator[tuple[int, float, int, bytes]]:
    if not s.fill(24):
        raise CaptureError(f"{res.path}: truncated pcap global header")
    _vmaj, _vmin, _zone, _sig, snaplen, network = struct.unpack_from(e + "HHiIII", s.buf, s.pos + 4)
    lt = network & 0x03FFFFFF
    if lt not in SUPPORTED_LINKTYPES:
        raise UnsupportedLinkType(f"{res.path}: unsupported link type {linktype_name(lt)}; kzprobe reads "
                                  "Ethernet, raw IP, Linux SLL/SLL2 and loopback captures")
    res.linktypes.add(lt)
    s.pos += 24
    limit = max(snaplen, MAX_RECORD)
    hlen = 16 + extra
    hdr = struct.Struct(e + "IIII")
    number = 0
    while True:
        if s.avail < hlen and not s.fill(hlen):
            if s.avail:
                raise _Damage(f"truncated record header ({s.avail} of {hlen} bytes)")
            return
        sec, frac, caplen, _origlen = hdr.unpack_from(s.buf, s.pos)
        if caplen > limit:
            raise _Damage(f"record length {caplen} exceeds the maximum {limit}: corrupt record header")
        end = s.pos + hlen + caplen
        if end > len(s.buf):
            if not s.fill(hlen + caplen):
                raise _Damage(f"truncated packet data ({s.avail - hlen} of {caplen} bytes)")
            end = s.pos + hlen + caplen
        frame = s.buf[s.pos + hlen:end]
        s.pos = end
        number += 1
        res.frames = number
        yield number, sec + frac * tsres, lt, frame


_PNG_SHB, _PNG_IDB, _PNG_EPB, _PNG_SPB, _PNG_PB, _PNG_DSB = 0x0A0D0D0A, 1, 6, 3, 2, 0x0A
#: A Decryption Secrets Block's type for a TLS key log ("TLSK").
_DSB_TLS = 0x544C534B
#: Key log bytes kept per file (a line is ~180 bytes).
_DSB_CAP = 16 << 20


def _pcapng(s: _Stream, res: ReadResult) -> Iterator[tuple[int, float, int, bytes]]:
    e = "<"
    ifaces: list[tuple[int, float, int, int]] = []  # (linktype, ts unit, ts offset, snaplen)
    number = 0
    while True:
        if not s.fill(12):
            if s.avail:
                raise _Damage(f"truncated block header ({s.avail} of 12 bytes)")
            return
        btype_raw = s.buf[s.pos:s.pos + 4]
        if btype_raw == b"\x0a\x0d\x0d\x0a":
            bom = s.buf[s.pos + 8:s.pos + 12]
            if bom == b"\x4d\x3c\x2b\x1a":
                e = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                e = ">"
            else:
                raise _Damage(f"section header with a bad byte-order magic {bom.hex()}")
            ifaces = []
        btype, blen = struct.unpack_from(e + "II", s.buf, s.pos)
        if blen < 12 or blen % 4 or blen > MAX_RECORD + 4096:
            raise _Damage(f"block of type 0x{btype:x} has an impossible length {blen}")
        if not s.fill(blen):
            raise _Damage(f"truncated block of type 0x{btype:x} ({s.avail} of {blen} bytes)")
        p = s.pos
        buf = s.buf
        (trail,) = struct.unpack_from(e + "I", buf, p + blen - 4)
        if trail != blen:
            raise _Damage(f"block of type 0x{btype:x}: trailing length {trail} != {blen}")
        body, bend = p + 8, p + blen - 4
        if btype == _PNG_IDB:
            if bend - body < 8:
                raise _Damage("interface description block too short")
            lt, _r, snap = struct.unpack_from(e + "HHI", buf, body)
            unit, tsoff = 1e-6, 0
            o = body + 8
            while o + 4 <= bend:
                code, olen = struct.unpack_from(e + "HH", buf, o)
                if code == 0:
                    break
                if code == 9 and olen >= 1 and o + 5 <= bend:
                    r = buf[o + 4]
                    unit = 2.0 ** -(r & 0x7F) if r & 0x80 else 10.0 ** -r
                elif code == 14 and olen >= 8 and o + 12 <= bend:
                    (tsoff,) = struct.unpack_from(e + "q", buf, o + 4)
                o += 4 + ((olen + 3) & ~3)
            ifaces.append((lt, unit, tsoff, snap))
            res.linktypes.add(lt)
            if lt not in SUPPORTED_LINKTYPES:
                res.warnings.append(f"interface {len(ifaces) - 1} has unsupported link type "
                                    f"{linktype_name(lt)}; its packets are skipped")
        elif btype in (_PNG_EPB, _PNG_PB):
            if bend - body < 20:
                raise _Damage("packet block too short")
            if btype == _PNG_EPB:
                iid, tshi, tslo, caplen, _orig = struct.unpack_from(e + "IIIII", buf, body)
            else:
                iid, _drops, tshi, tslo, caplen, _orig = struct.unpack_from(e + "HHIIII", buf, body)
            if iid >= len(ifaces):
                raise _Damage(f"packet block refers to interface {iid}, which was never described")
            if body + 20 + caplen > bend:
                raise _Damage(f"packet block: captured length {caplen} overruns the block")
            number += 1
            res.frames = number
            lt, unit, tsoff, _snap = ifaces[iid]
            if lt in SUPPORTED_LINKTYPES:
                yield number, ((tshi << 32) | tslo) * unit + tsoff, lt, buf[body + 20:body + 20 + caplen]
        elif btype == _PNG_DSB:
            # Secrets for decrypting the capture's TLS (editcap --inject-secrets tls,FILE).
            if bend - body >= 8:
                stype, slen = struct.unpack_from(e + "II", buf, body)
                kept = sum(len(b) for b in res.tls_keylog)
                if stype == _DSB_TLS and body + 8 + slen <= bend and kept + slen <= _DSB_CAP:
                    res.tls_keylog.append(bytes(buf[body + 8:body + 8 + slen]))
        elif btype == _PNG_SPB:
            if not ifaces:
                raise _Damage("simple packet block before any interface description")
            (orig,) = struct.unpack_from(e + "I", buf, body)
            lt, _unit, _tsoff, snap = ifaces[0]
            caplen = min(orig, bend - body - 4, snap or orig)
            number += 1
            res.frames = number
            if lt in SUPPORTED_LINKTYPES:
                yield number, 0.0, lt, buf[body + 4:body + 4 + caplen]
        s.pos = p + blen
    # unreachable


def iter_packets(path: str, result: ReadResult | None = None) -> Iterator[Packet]:
    """Yield every IP packet of the capture at ``path`` (see the module docstring)."""
    res = result if result is not None else ReadResult()
    _decode_ip = decode_ip
    _l3 = _l3_offset
    for number, ts, lt, frame in iter_frames(path, res):
        if lt == 1 and len(frame) > 34 and frame[12] == 8 and frame[13] == 0:
            pkt = _decode_ip(number, ts, frame, 14)  # the common case, inlined
        else:
            off = _l3(lt, frame)
            if off < 0:
                continue
            pkt = _decode_ip(number, ts, frame, off)
        if pkt is not None:
            yield pkt
