"""Replay's control from the capture (helper answers), A/AAAA folding, DNS over TCP, rejected
certificates and captures that lost packets -- on small synthetic captures built with scapy."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from kzprobe.analysis import classify
from kzprobe.model import Observation
from kzprobe.replay import parsers
from kzprobe.replay.control import Reassembly
from kzprobe.replay.engine import FileReplay, Replayer

CLI, HELPER, SITE, RES = "100.64.1.1", "198.51.100.210", "203.0.113.5", "198.51.100.53"


def _write(path: Path, pkts: list[tuple[float, Any]]) -> None:
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
    for ts, p in pkts:
        raw = bytes(p)
        t = 1_700_000_000 + ts
        out += struct.pack("<IIII", int(t), round((t % 1) * 1e6), len(raw), len(raw)) + raw
    path.write_bytes(bytes(out))


def _replay(tmp_path: Path, pkts: list[tuple[float, Any]]) -> FileReplay:
    p = tmp_path / "c.pcap"
    _write(p, pkts)
    fr = Replayer().replay_file(str(p))
    assert fr.read.ok
    return fr


class Tcp:
    """One TCP connection, written packet by packet, with the sequence numbers kept right."""

    def __init__(self, cli: str, cport: int, srv: str, sport: int, cttl: int = 64, sttl: int = 61) -> None:
        self.c, self.cp, self.s, self.sp, self.cttl, self.sttl = cli, cport, srv, sport, cttl, sttl
        self.cseq, self.sseq = 1000, 50000

    def _ip(self, from_client: bool) -> Any:
        from scapy.layers.inet import IP

        return IP(src=self.c, dst=self.s, ttl=self.cttl) if from_client else IP(src=self.s, dst=self.c, ttl=self.sttl)

    def handshake(self) -> list[Any]:
        from scapy.layers.inet import TCP

        out = [self._ip(True) / TCP(sport=self.cp, dport=self.sp, flags="S", seq=self.cseq - 1),
               self._ip(False) / TCP(sport=self.sp, dport=self.cp, flags="SA", seq=self.sseq - 1, ack=self.cseq),
               self._ip(True) / TCP(sport=self.cp, dport=self.sp, flags="A", seq=self.cseq, ack=self.sseq)]
        return out

    def cli(self, data: bytes = b"", flags: str = "PA", skip: bool = False) -> Any:
        from scapy.layers.inet import TCP

        p = self._ip(True) / TCP(sport=self.cp, dport=self.sp, flags=flags, seq=self.cseq, ack=self.sseq) / data
        self.cseq += len(data) + (1 if "F" in flags else 0)
        return None if skip else p

    def srv(self, data: bytes = b"", flags: str = "PA") -> Any:
        from scapy.layers.inet import TCP

        p = self._ip(False) / TCP(sport=self.sp, dport=self.cp, flags=flags, seq=self.sseq, ack=self.cseq) / data
        self.sseq += len(data) + (1 if "F" in flags else 0)
        return p


def _control_answer(url: str, host: str, address: str) -> bytes:
    obs = [
        Observation(step="dns", target=url, domain=host, vantage="control", failure=None,
                    data={"resolver": "198.51.100.200:53", "transport": "udp", "qtype": "A+AAAA",
                          "addresses": [address], "responses": [{"rcode": "NOERROR", "addresses": [address]}]}),
        Observation(step="tcp", target=url, domain=host, vantage="control", address=address, port=443),
        Observation(step="tls", target=url, domain=host, vantage="control", address=address, port=443,
                    data={"sni": host, "cert_valid": True, "issuer": "lab CA", "padding": "x" * 6000}),
    ]
    body = json.dumps({"version": 1, "observations": [o.to_dict() for o in obs], "refused": []}).encode()
    return b"HTTP/1.1 200 \r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def _helper_flow(cport: int, url: str, host: str, address: str, *, lose_request: bool = False,
                 shuffle: bool = True) -> list[Any]:
    t = Tcp(CLI, cport, HELPER, 8080)
    req_body = json.dumps({"url": url, "addresses": [address]}).encode()
    head = (b"POST /v1/control HTTP/1.1\r\nHost: 198.51.100.210:8080\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(req_body))
    pkts = [*t.handshake(), t.cli(head, skip=lose_request), t.cli(req_body, skip=lose_request)]
    answer = _control_answer(url, host, address)
    segs = [t.srv(answer[i:i + 1400]) for i in range(0, len(answer), 1400)]
    if shuffle:  # out of order, with a retransmission of the first segment, as captures do
        segs = [segs[0], *segs[2:], segs[1], segs[0]]
    return [p for p in (*pkts, *segs, t.cli(flags="FA")) if p is not None]


def _udp_dns(q: bool, qname: str, qtype: str, txid: int, addr: str | None = None, rcode: int = 0,
             sport: int = 5353, server: str = RES) -> Any:
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, UDP

    if q:
        return IP(src=CLI, dst=server) / UDP(sport=sport, dport=53) / DNS(
            id=txid, rd=1, qd=DNSQR(qname=qname, qtype=qtype))
    an = [DNSRR(rrname=qname, type=qtype, rdata=addr)] if addr else []
    return IP(src=server, dst=CLI, ttl=61) / UDP(sport=53, dport=sport) / DNS(
        id=txid, qr=1, rcode=rcode, qd=DNSQR(qname=qname, qtype=qtype), an=an)


# --- unit pieces -----------------------------------------------------------------------------------
def test_reassembly_orders_segments_and_remembers_their_frames() -> None:
    r = Reassembly(100)
    assert r.add(105, b"fghij", 2, 1 << 20) == 0  # ahead of the gap: held
    assert r.add(100, b"abcde", 1, 1 << 20) == 10  # fills the gap, drains the held one
    assert r.add(103, b"dexyz", 3, 1 << 20) == 0  # old bytes only: a retransmission
    assert r.add(108, b"ijKLM", 4, 1 << 20) == 3  # overlaps: only the new tail counts
    assert bytes(r.data) == b"abcdefghijKLM" and not r.ooo
    assert r.frames_of(0, 5) == [1] and r.frames_of(4, 11) == [1, 2, 4]
    capped = Reassembly(0)
    assert capped.add(0, b"x" * 10, 1, 4) == 4 and capped.overflow


def test_http_messages_content_length_chunked_and_cut() -> None:
    stream = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    msgs = parsers.http_messages(stream, requests=False)
    assert [(m.body, m.complete) for m in msgs] == [(b"", True), (b"abc", True), (b"hello", True), (b"short", False)]
    reqs = parsers.http_messages(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\n\r\n", requests=True)
    assert [m.first_line for m in reqs] == ["GET / HTTP/1.1", "GET /b HTTP/1.1"]


@pytest.mark.parametrize(("after", "want"), [
    (b"", "nothing"),
    (b"\x15\x03\x03\x00\x02\x02\x30", "alert"),
    (b"\x14\x03\x03\x00\x01\x01\x17\x03\x03\x00\x13" + b"\x00" * 19, "alert"),  # TLS 1.3 encrypted alert
    (b"\x14\x03\x03\x00\x01\x01\x17\x03\x03\x00\x35" + b"\x00" * 53, "continued"),  # CCS + Finished
    (b"\x16\x03\x03\x00\x25\x10", "continued"),  # TLS 1.2 ClientKeyExchange
])
def test_what_a_tls_client_sent_after_its_hello(after: bytes, want: str) -> None:
    hello = b"\x16\x03\x01\x00\x08\x01\x00\x00\x04abcd"
    assert parsers.tls_client_after_hello(hello + after) == want
    assert parsers.tls_client_after_hello(hello[:7]) == "unknown"


# --- control from the capture ----------------------------------------------------------------------
def test_helper_answer_becomes_control_and_gives_ip_verdict(tmp_path: Path) -> None:
    """A site whose TCP connect is refused at the probe, while control connects: blocked/ip."""
    from scapy.layers.inet import IP, TCP

    pkts: list[Any] = [_udp_dns(True, "blocked.example", "A", 1), _udp_dns(True, "blocked.example", "AAAA", 2),
                       _udp_dns(False, "blocked.example", "A", 1, SITE), _udp_dns(False, "blocked.example", "AAAA", 2)]
    for cport in (41000, 41001):
        pkts += [IP(src=CLI, dst=SITE) / TCP(sport=cport, dport=443, flags="S", seq=7),
                 IP(src=SITE, dst=CLI, ttl=61) / TCP(sport=443, dport=cport, flags="RA", ack=8)]
    helper = _helper_flow(42000, "https://blocked.example/", "blocked.example", SITE)
    fr = _replay(tmp_path, [(i * 0.01, p) for i, p in enumerate(pkts + helper)])
    ctl = [o for o in fr.observations if o.vantage == "control"]
    assert [o.step for o in ctl] == ["dns", "tcp", "tls"]
    assert {o.target for o in ctl} == {"blocked.example"} and {o.source for o in ctl} == {"pcap"}
    first_resp = len(pkts) + 6  # handshake (3) + request (2) + the first answer segment
    assert ctl[0].packets and min(ctl[0].packets) == first_resp and len(ctl[0].packets) >= 5
    assert all(o.id is not None for o in ctl)
    # The A/AAAA pair is one lookup, and the helper's own flow is no target.
    (dns,) = [o for o in fr.observations if o.step == "dns" and o.vantage == "probe"]
    assert dns.data["qtype"] == "A+AAAA" and dns.failure is None
    verdicts = {v.target: v for v in classify(fr.observations)}
    assert set(verdicts) == {"blocked.example"}
    assert verdicts["blocked.example"].label == "blocked/ip"


def test_helper_answer_whose_request_was_lost(tmp_path: Path) -> None:
    """The endpoint is known from an earlier request line; the answer names its own target."""
    first = _helper_flow(42000, "https://a.example/", "a.example", SITE, shuffle=False)
    second = _helper_flow(42001, "https://b.example/", "b.example", SITE, lose_request=True)
    fr = _replay(tmp_path, [(i * 0.01, p) for i, p in enumerate(first + second)])
    assert sorted({o.target for o in fr.observations if o.vantage == "control"}) == ["a.example", "b.example"]
    assert any(f.kind == "capture_loss" for f in fr.findings)


def test_hostile_helper_answer_gives_a_finding_not_a_crash(tmp_path: Path) -> None:
    t = Tcp(CLI, 42000, HELPER, 8080)
    body = b"[" * 100_000
    pkts = [*t.handshake(), t.cli(b"POST /v1/control HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}"),
            t.srv(b"HTTP/1.1 200 \r\ncontent-length: %d\r\n\r\n" % len(body))]
    pkts += [t.srv(body[i:i + 1400]) for i in range(0, len(body), 1400)]
    fr = _replay(tmp_path, [(i * 0.001, p) for i, p in enumerate(pkts)])
    assert not [o for o in fr.observations if o.vantage == "control"]
    assert any(f.kind == "control_missing" for f in fr.findings)


# --- DNS -----------------------------------------------------------------------------------------
def test_a_and_aaaa_fold_like_the_live_probe(tmp_path: Path) -> None:
    pkts = [_udp_dns(True, "nx.example", "A", 1), _udp_dns(True, "nx.example", "AAAA", 2),
            _udp_dns(False, "nx.example", "A", 1, rcode=3), _udp_dns(False, "nx.example", "AAAA", 2, rcode=3),
            _udp_dns(True, "v4.example", "A", 3), _udp_dns(True, "v4.example", "AAAA", 4),
            _udp_dns(False, "v4.example", "AAAA", 4), _udp_dns(False, "v4.example", "A", 3, SITE)]
    fr = _replay(tmp_path, [(i * 0.01, p) for i, p in enumerate(pkts)])
    dns = {o.domain: o for o in fr.observations if o.step == "dns"}
    assert len([o for o in fr.observations if o.step == "dns"]) == 2
    assert (dns["nx.example"].failure, dns["nx.example"].data["qtype"]) == ("dns_nxdomain_error", "A+AAAA")
    v4 = dns["v4.example"]
    assert v4.failure is None and v4.data["addresses"] == [SITE] and v4.packets == [5, 6, 7, 8]
    assert [r["packet"] for r in v4.data["responses"]] == [8]  # the A query's, for the injection check


def test_unanswered_query_in_a_lossy_capture_is_not_a_timeout(tmp_path: Path) -> None:
    lonely = [_udp_dns(True, "quiet.example", "A", 9)]
    t = Tcp(CLI, 43000, SITE, 80)
    lossy = t.handshake()
    t.cli(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", skip=True)  # the capture lost the request
    lossy.append(t.srv(b"HTTP/1.1 200 OK\r\n\r\n"))
    late = [_udp_dns(True, "other.example", "A", 10)]  # keeps the capture going past the grace time
    fr = _replay(tmp_path, [(0.0, lonely[0]), *[(0.1 + i * 0.01, p) for i, p in enumerate(lossy)], (9.0, late[0])])
    assert not [o for o in fr.observations if o.domain == "quiet.example"]
    assert any(f.kind == "capture_loss" and f.domain == "quiet.example" for f in fr.findings)
    # Without the evidence of loss, the same silence is a timeout.
    fr = _replay(tmp_path, [(0.0, lonely[0]), (9.0, late[0])])
    (o,) = [o for o in fr.observations if o.domain == "quiet.example"]
    assert o.failure == "generic_timeout_error"


def test_dns_over_tcp_is_a_dns_observation(tmp_path: Path) -> None:
    from scapy.layers.dns import DNS, DNSQR, DNSRR

    t = Tcp(CLI, 44000, RES, 53)
    q = bytes(DNS(id=77, rd=1, qd=DNSQR(qname="t.example", qtype="A")))
    r = bytes(DNS(id=77, qr=1, qd=DNSQR(qname="t.example", qtype="A"), an=DNSRR(rrname="t.example", rdata=SITE)))
    pkts = [*t.handshake(), t.cli(struct.pack("!H", len(q)) + q), t.srv(struct.pack("!H", len(r)) + r),
            t.cli(flags="FA"), t.srv(flags="FA")]
    fr = _replay(tmp_path, [(i * 0.01, p) for i, p in enumerate(pkts)])
    (o,) = fr.observations
    assert (o.step, o.data["transport"], o.data["addresses"], o.failure) == ("dns", "tcp", [SITE], None)
    assert o.data["responses"][0]["packet"] == 5 and o.data["responses"][0]["ip_ttl"] == 61


# --- TLS: a client that rejects the certificate ------------------------------------------------------
def _mitm_flow(close_after: float, finished: bool) -> list[tuple[float, Any]]:
    from scapy.layers.tls.extensions import ServerName, TLS_Ext_ServerName
    from scapy.layers.tls.handshake import TLSClientHello
    from scapy.layers.tls.record import TLS

    t = Tcp(CLI, 45000, SITE, 443)
    ch = bytes(TLS(msg=[TLSClientHello(ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=b"m.example")])])]))
    flight = b"\x16\x03\x03\x00\x04\x02\x00\x00\x00" + b"\x17\x03\x03\x00\x40" + b"\x00" * 64
    pkts = [(0.0, p) for p in t.handshake()] + [(0.01, t.cli(ch)), (0.02, t.srv(flight))]
    if finished:
        pkts.append((0.03, t.cli(b"\x14\x03\x03\x00\x01\x01\x17\x03\x03\x00\x35" + b"\x00" * 0x35)))
    pkts += [(0.02 + close_after, t.cli(flags="FA")), (0.03 + close_after, t.srv(flags="FA"))]
    return pkts


@pytest.mark.parametrize(("close_after", "finished", "rejected"),
                         [(0.005, False, True), (2.0, False, False), (0.005, True, False)])
def test_client_abandoning_the_handshake_rejected_the_certificate(tmp_path: Path, close_after: float,
                                                                   finished: bool, rejected: bool) -> None:
    fr = _replay(tmp_path, [*_mitm_flow(close_after, finished), (9.0, _udp_dns(True, "z.example", "A", 1))])
    (tls,) = [o for o in fr.observations if o.step == "tls"]
    assert tls.failure is None
    assert (tls.data["outcome"] == "cert_rejected") is rejected
    assert (tls.data.get("cert_valid") is False) is rejected
    assert any(f.kind == "cert_rejected" for f in fr.findings) is rejected


@pytest.mark.parametrize(("field", "value", "said"), [
    ("data", [], "data"), ("addresses", 5, "addresses"), ("port", "443", "port"), ("step", "nonsense", "step"),
])
def test_type_wrong_helper_json_in_a_capture_is_rejected_with_its_reason(tmp_path: Path, field: str, value: Any,
                                                                          said: str) -> None:
    """The capture's helper answer goes through contract.from_wire, as the live client's does:
    a type-wrong field never raises; the target is inconclusive and the verdict says why."""
    from scapy.layers.inet import IP, TCP

    doc = json.loads(_control_answer("https://blocked.example/", "blocked.example", SITE).split(b"\r\n\r\n", 1)[1])
    if field == "addresses":
        doc["observations"][0]["data"]["addresses"] = value
    else:
        doc["observations"][1][field] = value
    body = json.dumps(doc).encode()
    answer = b"HTTP/1.1 200 \r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    t = Tcp(CLI, 42000, HELPER, 8080)
    req = json.dumps({"url": "https://blocked.example/", "addresses": [SITE]}).encode()
    helper = [*t.handshake(), t.cli(b"POST /v1/control HTTP/1.1\r\ncontent-length: %d\r\n\r\n%s" % (len(req), req)),
              *[t.srv(answer[i:i + 1400]) for i in range(0, len(answer), 1400)], t.cli(flags="FA")]
    pkts: list[Any] = [_udp_dns(True, "blocked.example", "A", 1), _udp_dns(False, "blocked.example", "A", 1, SITE),
                       IP(src=CLI, dst=SITE) / TCP(sport=41000, dport=443, flags="S", seq=7),
                       IP(src=SITE, dst=CLI, ttl=61) / TCP(sport=443, dport=41000, flags="RA", ack=8)]
    fr = _replay(tmp_path, [(i * 0.01, p) for i, p in enumerate(pkts + helper)])
    (ctl,) = [o for o in fr.observations if o.vantage == "control"]
    assert ctl.purpose == "rejected" and said in ctl.data["wire_error"]
    assert ctl.packets and min(ctl.packets) > len(pkts)  # evidence: the answer's frames
    assert any(f.kind == "control_rejected" and said in f.sentence for f in fr.findings)
    (v,) = classify(fr.observations)
    assert v.status == "inconclusive" and said in v.sentence, v.sentence
