"""The raw capture reader: formats, byte orders, link types, gzip, pcapng, damage."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest

from kzprobe.replay.engine import Replayer
from kzprobe.replay.pcapio import CaptureError, Packet, ReadResult, UnsupportedLinkType, iter_packets


def _ip_tcp(ttl: int = 64, ipid: int = 7, flags: str = "S", payload: bytes = b"", v6: bool = False) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    l3 = IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=ttl) if v6 else IP(
        src="198.51.100.1", dst="203.0.113.2", ttl=ttl, id=ipid)
    return bytes(l3 / TCP(sport=40000, dport=443, flags=flags, seq=1000, ack=5) / payload)


def _frame(linktype: int, ip: bytes, vlan: bool = False) -> bytes:
    et = b"\x86\xdd" if ip[0] >> 4 == 6 else b"\x08\x00"
    if linktype == 1:
        tag = b"\x81\x00\x00\x05" if vlan else b""
        return b"\x02" * 6 + b"\x04" * 6 + tag + et + ip
    if linktype == 113:
        return b"\x00\x00\x00\x01\x00\x06" + b"\x02" * 6 + b"\x00\x00" + et + ip
    if linktype == 276:
        return et + b"\x00\x00" + b"\x00\x00\x00\x02" + b"\x00\x01\x00\x06" + b"\x02" * 6 + b"\x00\x00" + ip
    return ip


def write_pcap(path: Path, frames: list[bytes], linktype: int = 1, endian: str = "<", ns: bool = False,
               t0: float = 1_700_000_000.0) -> bytes:
    magic = 0xA1B23C4D if ns else 0xA1B2C3D4
    out = bytearray(struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype))
    for i, f in enumerate(frames):
        ts = t0 + i * 0.25
        frac = round((ts % 1) * (1e9 if ns else 1e6))
        out += struct.pack(endian + "IIII", int(ts), frac, len(f), len(f)) + f
    path.write_bytes(bytes(out))
    return bytes(out)


def _block(e: str, btype: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(e + "II", btype, n) + body + struct.pack(e + "I", n)


def write_pcapng(path: Path, frames: list[tuple[int, bytes]], linktypes: list[int], endian: str = "<",
                 tsresol: int | None = None) -> None:
    e = endian
    out = _block(e, 0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    for lt in linktypes:
        opts = b""
        if tsresol is not None:
            opts = struct.pack(e + "HH", 9, 1) + bytes([tsresol]) + b"\x00" * 3 + struct.pack(e + "HH", 0, 0)
        out += _block(e, 1, struct.pack(e + "HHI", lt, 0, 0) + opts)
    unit = 10 ** (tsresol or 6)
    for i, (iface, f) in enumerate(frames):
        t = int((1_700_000_000 + i) * unit)
        out += _block(e, 6, struct.pack(e + "IIIII", iface, t >> 32, t & 0xFFFFFFFF, len(f), len(f)) + f)
    path.write_bytes(out)


def _read(path: Path) -> tuple[list[Packet], ReadResult]:
    res = ReadResult()
    return list(iter_packets(str(path), res)), res


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("ns", [False, True])
@pytest.mark.parametrize("linktype", [1, 101, 12, 228, 113, 276])
def test_pcap_byte_orders_resolutions_linktypes(tmp_path: Path, endian: str, ns: bool, linktype: int) -> None:
    frames = [_frame(linktype, _ip_tcp(ttl=50 + i, ipid=100 + i)) for i in range(3)]
    write_pcap(tmp_path / "a.pcap", frames, linktype, endian, ns)
    pkts, res = _read(tmp_path / "a.pcap")
    assert res.ok and res.format == "pcap" and res.frames == 3 and res.linktypes == {linktype}
    assert [p.number for p in pkts] == [1, 2, 3]
    assert [(p.ttl, p.ip_id, p.sport, p.dport, p.src, p.dst) for p in pkts] == [
        (50 + i, 100 + i, 40000, 443, "198.51.100.1", "203.0.113.2") for i in range(3)]
    assert pkts[1].ts == pytest.approx(1_700_000_000.25, abs=1e-6)


def test_ipv6_vlan_and_payload(tmp_path: Path) -> None:
    frames = [_frame(1, _ip_tcp(ttl=33, flags="PA", payload=b"hello", v6=True), vlan=True),
              _frame(1, _ip_tcp(flags="PA", payload=b"x" * 10), vlan=True),
              b"\xff" * 12 + b"\x08\x06" + b"\x00" * 28]  # ARP: skipped but counted
    write_pcap(tmp_path / "v.pcap", frames)
    pkts, res = _read(tmp_path / "v.pcap")
    assert res.frames == 3 and len(pkts) == 2
    p6, p4 = pkts
    assert (p6.version, p6.ttl, p6.ip_id, p6.src, p6.payload) == (6, 33, None, "2001:db8::1", b"hello")
    assert p4.payload == b"x" * 10 and p4.flags == 0x18 and p4.seq == 1000


def test_icmp_time_exceeded_quotes_inner_header(tmp_path: Path) -> None:
    from scapy.layers.inet import ICMP, IP, TCP

    inner = IP(src="198.51.100.1", dst="203.0.113.2", ttl=1, id=4242) / TCP(sport=40000, dport=80, seq=777)
    icmp = bytes(IP(src="100.64.0.1", dst="198.51.100.1") / ICMP(type=11, code=0) / bytes(inner)[:28])
    write_pcap(tmp_path / "i.pcap", [_frame(101, icmp)], 101)
    (p,), _ = _read(tmp_path / "i.pcap")
    assert p.proto == 1 and p.icmp_type == 11 and p.inner is not None
    q = p.inner
    assert (q.src, q.dst, q.ip_id, q.sport, q.dport, q.seq, q.ttl) == (
        "198.51.100.1", "203.0.113.2", 4242, 40000, 80, 777, 1)


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcapng_interfaces_linktypes_tsresol(tmp_path: Path, endian: str) -> None:
    frames = [(0, _frame(1, _ip_tcp(ttl=10))), (1, _frame(113, _ip_tcp(ttl=11))),
              (2, _frame(101, _ip_tcp(ttl=12))), (0, _frame(1, _ip_tcp(ttl=13)))]
    write_pcapng(tmp_path / "a.pcapng", frames, [1, 113, 101], endian, tsresol=9)
    pkts, res = _read(tmp_path / "a.pcapng")
    assert res.ok and res.format == "pcapng" and res.linktypes == {1, 113, 101}
    assert [p.ttl for p in pkts] == [10, 11, 12, 13]
    assert pkts[2].ts == pytest.approx(1_700_000_002.0)


def test_gzip_detected_by_magic(tmp_path: Path) -> None:
    raw = write_pcap(tmp_path / "plain.pcap", [_frame(1, _ip_tcp(ttl=77))])
    (tmp_path / "x.cap").write_bytes(gzip.compress(raw))  # name says nothing: magic decides
    pkts, res = _read(tmp_path / "x.cap")
    assert res.compressed and res.ok and [p.ttl for p in pkts] == [77]


def test_unsupported_linktype_is_a_clear_error(tmp_path: Path) -> None:
    write_pcap(tmp_path / "w.pcap", [b"\x00" * 40], linktype=105)
    with pytest.raises(UnsupportedLinkType, match=r"105 \(IEEE802_11\)"):
        _read(tmp_path / "w.pcap")
    frames = [(0, b"\x00" * 40), (1, _frame(101, _ip_tcp(ttl=9)))]
    write_pcapng(tmp_path / "w.pcapng", frames, [105, 101])
    pkts, res = _read(tmp_path / "w.pcapng")
    assert [p.ttl for p in pkts] == [9] and any("IEEE802_11" in w for w in res.warnings)


def test_not_a_capture(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hello world, not a capture")
    with pytest.raises(CaptureError, match="not a pcap"):
        _read(tmp_path / "t.txt")


def _five(tmp_path: Path) -> bytes:
    return write_pcap(tmp_path / "five.pcap", [_frame(1, _ip_tcp(ttl=60 + i)) for i in range(5)])


def test_truncated_pcap_gives_partial_result_and_location(tmp_path: Path) -> None:
    raw = _five(tmp_path)
    rec = (len(raw) - 24) // 5
    (tmp_path / "t.pcap").write_bytes(raw[: 24 + 3 * rec + 20])  # cut inside record 4's data
    pkts, res = _read(tmp_path / "t.pcap")
    assert [p.ttl for p in pkts] == [60, 61, 62]
    assert not res.ok and res.error_frame == 4 and res.error_offset == 24 + 3 * rec
    assert "truncated packet data" in (res.error or "")


def test_corrupt_record_length_stops_cleanly(tmp_path: Path) -> None:
    raw = bytearray(_five(tmp_path))
    rec = (len(raw) - 24) // 5
    struct.pack_into("<I", raw, 24 + 2 * rec + 8, 0x7FFFFFF0)  # record 3 caplen
    (tmp_path / "c.pcap").write_bytes(bytes(raw))
    pkts, res = _read(tmp_path / "c.pcap")
    assert len(pkts) == 2 and res.error_frame == 3 and "corrupt" in (res.error or "")


def test_truncated_gzip_and_pcapng(tmp_path: Path) -> None:
    raw = _five(tmp_path)
    (tmp_path / "g.pcap.gz").write_bytes(gzip.compress(raw)[:-30])
    pkts, res = _read(tmp_path / "g.pcap.gz")
    assert not res.ok and len(pkts) < 5
    write_pcapng(tmp_path / "n.pcapng", [(0, _frame(1, _ip_tcp(ttl=5 + i))) for i in range(3)], [1])
    data = (tmp_path / "n.pcapng").read_bytes()
    (tmp_path / "n2.pcapng").write_bytes(data[:-10])
    pkts, res = _read(tmp_path / "n2.pcapng")
    assert [p.ttl for p in pkts] == [5, 6] and res.error_frame == 3 and "truncated block" in (res.error or "")


def test_replay_reports_damage_and_keeps_partial_observations(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, TCP

    c, s = "198.51.100.1", "203.0.113.2"
    pk = [IP(src=c, dst=s, ttl=64) / TCP(sport=40000, dport=443, flags="S", seq=1),
          IP(src=s, dst=c, ttl=50) / TCP(sport=443, dport=40000, flags="SA", seq=9, ack=2),
          IP(src=c, dst=s, ttl=64) / TCP(sport=40001, dport=443, flags="S", seq=1)]
    raw = write_pcap(tmp_path / "r.pcap", [_frame(101, bytes(p)) for p in pk], 101)
    (tmp_path / "r2.pcap").write_bytes(raw[:-5])
    fr = Replayer().replay_file(str(tmp_path / "r2.pcap"))
    assert fr.read.error_frame == 3 and "stopped at byte" in fr.read.describe()
    assert [(o.step, o.failure) for o in fr.observations] == [("tcp", None)]


def _dns_answer(qname: str, addr: str, ttl: int, ipid: int, txid: int = 0x1234) -> bytes:
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, UDP

    return bytes(IP(src="100.64.0.53", dst="198.51.100.1", ttl=ttl, id=ipid) / UDP(sport=53, dport=5353)
                 / DNS(id=txid, qr=1, qd=DNSQR(qname=qname), an=DNSRR(rrname=qname, rdata=addr)))


def test_dns_injection_two_different_answers(tmp_path: Path) -> None:
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import IP, UDP

    q = bytes(IP(src="198.51.100.1", dst="100.64.0.53", ttl=64) / UDP(sport=5353, dport=53)
              / DNS(id=0x1234, rd=1, qd=DNSQR(qname="blocked.example")))
    ok = bytes(IP(src="198.51.100.1", dst="100.64.0.53") / UDP(sport=5354, dport=53)
               / DNS(id=7, qd=DNSQR(qname="fine.example")))
    frames = [q, _dns_answer("blocked.example", "198.18.0.1", 250, 0), _dns_answer("blocked.example",
              "203.0.113.80", 57, 31000), ok, _dns_answer("fine.example", "203.0.113.9", 57, 31001, txid=7)]
    frames[4] = frames[4].replace(b"\x00\x35\x14\xe9", b"\x00\x35\x14\xea")  # dport 5354
    write_pcap(tmp_path / "d.pcap", frames, 101)
    fr = Replayer().replay_file(str(tmp_path / "d.pcap"))
    dns = {o.domain: o for o in fr.observations if o.step == "dns"}
    o = dns["blocked.example"]
    assert o.data["addresses"] == ["198.18.0.1"] and len(o.data["responses"]) == 2
    assert [r["ip_ttl"] for r in o.data["responses"]] == [250, 57]
    assert o.data["injected"]["packet"] == 2 and o.data["injected"]["kind"] == "dns"
    assert o.packets == [1, 2, 3]
    assert "injected" not in dns["fine.example"].data and dns["fine.example"].failure is None
    from kzprobe.analysis import classify

    (v,) = [v for v in classify(fr.observations) if v.target == "blocked.example"]
    assert (v.status, v.mechanism) == ("blocked", "dns")
