"""HTTPS downloads in a capture: what ciphertext shows of throttling (rates by SNI, a client giving up)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kzprobe.tests.test_replay_control import CLI, SITE, Tcp, _replay, _udp_dns

SERVER_FLIGHT = b"\x16\x03\x03\x00\x04\x02\x00\x00\x00"  # a ServerHello record (enough for replay)
FINISHED = b"\x14\x03\x03\x00\x01\x01\x17\x03\x03\x00\x35" + b"\x00" * 0x35  # CCS + the client's Finished


def _hello(sni: str) -> bytes:
    from scapy.layers.tls.extensions import ServerName, TLS_Ext_ServerName
    from scapy.layers.tls.handshake import TLSClientHello
    from scapy.layers.tls.record import TLS

    return bytes(TLS(msg=[TLSClientHello(ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=sni.encode())])])]))


def _download(cport: int, sni: str, t0: float, seconds: float, nbytes: int = 160_000, *,
              client_quits: bool = False) -> list[tuple[float, Any]]:
    """A TLS flow whose server sends ``nbytes`` of application data spread over ``seconds``."""
    t = Tcp(CLI, cport, SITE, 443)
    out: list[tuple[float, Any]] = [(t0, p) for p in t.handshake()]
    out += [(t0 + 0.01, t.cli(_hello(sni))), (t0 + 0.02, t.srv(SERVER_FLIGHT)), (t0 + 0.025, t.cli(FINISHED))]
    chunks = nbytes // 1400
    for i in range(chunks):
        ts = t0 + 0.03 + seconds * i / chunks
        if client_quits and i == chunks // 2:
            out.append((ts, t.cli(flags="FA")))
        out.append((ts, t.srv(b"\x17" * 1400)))
    if not client_quits:
        out += [(t0 + 0.04 + seconds, t.cli(flags="FA")), (t0 + 0.05 + seconds, t.srv(flags="FA"))]
    return out


def test_sni_throttling_shows_as_a_rate_unlike_the_benign_followup(tmp_path: Path) -> None:
    pkts = [(0.0, _udp_dns(True, "slow.example", "A", 1)), (0.01, _udp_dns(False, "slow.example", "A", 1, SITE))]
    pkts += _download(41000, "slow.example", 1.0, seconds=8.0)
    pkts += _download(41001, "example.com", 12.0, seconds=0.2)
    fr = _replay(tmp_path, sorted(pkts, key=lambda x: x[0]))
    (tls,) = [o for o in fr.observations if o.step == "tls" and o.purpose == "measure"]
    xf = tls.data["transfer"]
    assert xf["bytes"] >= 150_000 and 7.5 < xf["seconds"] < 8.5 and len(xf["samples"]) >= 30
    (f,) = [f for f in fr.findings if f.kind == "tls_throttled"]
    assert "SNI slow.example" in f.sentence and "SNI example.com" in f.sentence and f.domain == "slow.example"


def test_same_rate_for_both_names_is_no_finding(tmp_path: Path) -> None:
    pkts = [(0.0, _udp_dns(True, "slow.example", "A", 1)), (0.01, _udp_dns(False, "slow.example", "A", 1, SITE))]
    pkts += _download(41000, "slow.example", 1.0, seconds=8.0)
    pkts += _download(41001, "example.com", 12.0, seconds=6.0)
    fr = _replay(tmp_path, sorted(pkts, key=lambda x: x[0]))
    assert not [f for f in fr.findings if f.kind == "tls_throttled"]


def test_client_giving_up_mid_download(tmp_path: Path) -> None:
    pkts = _download(41000, "slow.example", 1.0, seconds=8.0, client_quits=True)
    fr = _replay(tmp_path, pkts)
    (f,) = [f for f in fr.findings if f.kind == "tls_abandoned"]
    assert "while the server was still sending" in f.sentence
    # A client that closes at once while the server's last records cross its FIN did not give up.
    fr = _replay(tmp_path, _download(41000, "fast.example", 1.0, seconds=0.3, client_quits=True))
    assert not [f for f in fr.findings if f.kind == "tls_abandoned"]
