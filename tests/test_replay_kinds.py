"""Replay maps flows and lookups to the target kinds beyond URLs (replay/kinds.py, replay/tunnel.py):
each mapping with a case that holds and a near miss, on small synthetic captures built with scapy.

What each capture holds is written here, packet by packet; the verdicts expected follow from it and
from the rules' documented meaning (analysis/rules_kinds.py, rules_hellos.py), never from replay.
Control comes as in a live run's capture: the probe's POST /v1/control and the helper's answer.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kzprobe.analysis import classify
from kzprobe.model import FOLLOWUP, MEASURE, Observation, Verdict
from kzprobe.probes import hellos
from kzprobe.probes.certs import TrustStore
from kzprobe.replay.engine import FileReplay, Replayer
from kzprobe.tests.test_replay_control import CLI, HELPER, Tcp, _udp_dns, _write

SRV = "203.0.113.141"
#: A ServerHello record as far as replay reads one (type 22, handshake type 2).
SERVER_HELLO = b"\x16\x03\x03\x00\x2a\x02\x00\x00\x26\x03\x03" + b"\x11" * 32 + b"\x00\x13\x01\x00"
#: What a client sends after the server's flight when it goes on (a TLS 1.3 Finished-sized record).
CLIENT_FINISHED = b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x45" + b"\x22" * 0x45


def _hello(name: str, sni: str) -> bytes:
    """The ClientHello the probe sends with hello ``name`` (probes/hellos.py), from OpenSSL itself."""
    ctx = hellos.context(name, TrustStore([])) if name != "default" else ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def _helper(cport: int, url: str, obs: list[Observation]) -> list[Any]:
    """The probe asking its helper about ``url`` and the helper answering with ``obs``."""
    t = Tcp(CLI, cport, HELPER, 8080)
    req = json.dumps({"url": url, "addresses": []}).encode()
    head = (b"POST /v1/control HTTP/1.1\r\nHost: 198.51.100.210:8080\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(req))
    body = json.dumps({"version": 1, "observations": [o.to_dict() for o in obs], "refused": []}).encode()
    answer = b"HTTP/1.1 200 \r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    return [*t.handshake(), t.cli(head + req), t.srv(answer), t.cli(flags="FA"), t.srv(flags="FA")]


def _ctl(target: str, name: str, step: str, address: str | None = None, port: int | None = None,
         **data: Any) -> Observation:
    return Observation(step=step, target=target, domain=name, vantage="control", address=address, port=port,
                       data=dict(data))


def _tail() -> Any:
    """An unrelated packet well after the rest: the capture did not end on the flows under test
    (a flow still open at the end of a capture is cut by it, not failed)."""
    from scapy.layers.inet import IP, UDP

    return IP(src=CLI, dst="198.51.100.99") / UDP(sport=9, dport=9) / b"x"


def _replay(tmp_path: Path, pkts: list[Any], targets: Sequence[str] = (), gap: float = 0.01) -> FileReplay:
    p = tmp_path / "k.pcap"
    _write(p, [(i * gap, x) for i, x in enumerate(pkts)] + [(len(pkts) * gap + 20.0, _tail())])
    fr = Replayer(targets=targets).replay_file(str(p))
    assert fr.read.ok, fr.read.describe()
    return fr


def _verdict(fr: FileReplay, target: str) -> Verdict | None:
    return next((v for v in classify(fr.observations) if v.target == target), None)


def _connect(sport: int, cport: int, answered: bool = True, srv: str = SRV) -> list[Any]:
    """A connect that sends nothing (the probe of tcp:// and obfs4:// opens and closes)."""
    t = Tcp(CLI, cport, srv, sport)
    syn, synack, ack = t.handshake()
    if not answered:
        return [syn, syn]  # the SYN and its retransmission, never answered
    return [syn, synack, ack, t.cli(flags="FA"), t.srv(flags="FA")]


# --- tcp:// and obfs4:// ------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["tcp://203.0.113.141:5222", "obfs4://203.0.113.141:5222"])
def test_a_connect_to_the_endpoint_is_its_measurement(tmp_path: Path, url: str) -> None:
    fr = _replay(tmp_path, _connect(5222, 40001), targets=[url])
    (tcp,) = [o for o in fr.observations if o.step == "tcp"]
    assert (tcp.target, tcp.domain, tcp.purpose, tcp.failure) == (url, SRV, MEASURE, None)
    v = _verdict(fr, url)
    assert v is not None and (v.status, v.rule) == ("ok", "ok.tcp"), v
    assert tcp.id in v.observations and tcp.packets[0] in v.packets  # evidence: the connect's packets


def test_near_miss_a_syn_nobody_answers_is_not_ok(tmp_path: Path) -> None:
    url = "tcp://203.0.113.141:5222"
    ctl = [_ctl(url, SRV, "tcp", SRV, 5222)]
    fr = _replay(tmp_path, [*_helper(41000, url, ctl), *_connect(5222, 40001, answered=False)], targets=[url])
    (tcp,) = [o for o in fr.observations if o.step == "tcp" and o.vantage == "probe"]
    assert (tcp.target, tcp.failure) == (url, "generic_timeout_error")
    v = _verdict(fr, url)
    assert v is not None and (v.label, v.detail) == ("blocked/ip", "ip.tcp_timeout"), v


def test_near_miss_a_flow_that_carried_a_client_hello_is_not_a_tcp_targets(tmp_path: Path) -> None:
    """An https:// site on the endpoint's address and port: its flow sends a ClientHello, which the
    tcp:// probe never does, so it stays the site's (named by its SNI)."""
    url = "tcp://203.0.113.141:443"
    t = Tcp(CLI, 40002, SRV, 443)
    fr = _replay(tmp_path, [*t.handshake(), t.cli(_hello("default", "site.example")), t.srv(SERVER_HELLO),
                            t.cli(CLIENT_FINISHED), t.cli(flags="FA"), t.srv(flags="FA")], targets=[url])
    assert {o.target for o in fr.observations} == {"site.example"}
    assert _verdict(fr, url) is None


def test_without_the_target_list_a_connect_is_no_kind_target(tmp_path: Path) -> None:
    """Near miss of the mapping's input: nothing says 203.0.113.141:5222 was a tcp:// target (no
    --targets, no helper asked about it), so the flow stays an address, as before."""
    fr = _replay(tmp_path, _connect(5222, 40001))
    assert {o.target for o in fr.observations} == {SRV}


# --- tcp://NAME:PORT: the address by the capture's DNS ------------------------------------------------------
def test_a_named_endpoint_is_found_at_the_address_dns_gave_it(tmp_path: Path) -> None:
    url = "tcp://chat.example:5222"
    dns = [_udp_dns(True, "chat.example", "A", 7, sport=5301), _udp_dns(False, "chat.example", "A", 7, SRV, sport=5301)]
    other = "203.0.113.142"  # the same port on an address DNS never gave the name
    fr = _replay(tmp_path, [*dns, *_connect(5222, 40003), *_connect(5222, 40004, srv=other)], targets=[url])
    got = {(o.step, o.address): o.target for o in fr.observations}
    assert got[("tcp", SRV)] == url and got[("dns", None)] == url
    assert got[("tcp", other)] == other  # near miss: not the name's address
    v = _verdict(fr, url)
    assert v is not None and v.rule == "ok.tcp", v


# --- udp-dns:// ------------------------------------------------------------------------------------------------
def _lookup(name: str, txid: int, sport: int, addr: str | None, rcode: int = 0) -> list[Any]:
    return [_udp_dns(True, name, "A", txid, sport=sport),
            _udp_dns(False, name, "A", txid, addr, rcode=rcode, sport=sport)]


def test_udp_dns_target_is_the_lookups_of_its_name(tmp_path: Path) -> None:
    url = "udp-dns://chat.example"
    ctl = [_ctl(url, "chat.example", "dns", resolver="control", transport="udp", qtype="A+AAAA", addresses=[SRV],
                responses=[{"rcode": "NOERROR", "addresses": [SRV]}])]
    fr = _replay(tmp_path, [*_helper(41001, url, ctl), *_lookup("chat.example", 8, 5302, SRV),
                            *_lookup("other.example", 9, 5303, "203.0.113.150")])
    mine = [o for o in fr.observations if o.target == url and o.vantage == "probe"]
    assert [(o.step, o.data.get("addresses")) for o in mine] == [("dns", [SRV])]
    # Near miss: another name's lookup stays that name's.
    assert [o.target for o in fr.observations if o.domain == "other.example"] == ["other.example"]
    v = _verdict(fr, url)
    assert v is not None and (v.status, v.rule) == ("ok", "ok.dns"), v


def test_near_miss_udp_dns_target_whose_name_does_not_resolve(tmp_path: Path) -> None:
    url = "udp-dns://chat.example"
    ctl = [_ctl(url, "chat.example", "dns", resolver="control", transport="udp", qtype="A+AAAA", addresses=[SRV],
                responses=[{"rcode": "NOERROR", "addresses": [SRV]}])]
    fr = _replay(tmp_path, [*_helper(41001, url, ctl), *_lookup("chat.example", 8, 5302, None, rcode=3)])
    v = _verdict(fr, url)
    assert v is not None and (v.label, v.detail) == ("blocked/dns", "dns.nxdomain"), v


def test_a_name_two_kind_targets_share_gives_each_its_lookups(tmp_path: Path) -> None:
    tcp_url, dns_url = "tcp://chat.example:5222", "udp-dns://chat.example"
    fr = _replay(tmp_path, [*_lookup("chat.example", 8, 5302, SRV), *_connect(5222, 40005)], targets=[tcp_url, dns_url])
    lookups = {o.target: o.data.get("addresses") for o in fr.observations if o.step == "dns"}
    assert lookups == {tcp_url: [SRV], dns_url: [SRV]}
    assert [o.target for o in fr.observations if o.step == "tcp"] == [tcp_url]


# --- tor-or:// -------------------------------------------------------------------------------------------------
def _handshake(t: Tcp, hello: bytes, reset: bool) -> list[Any]:
    head = [*t.handshake(), t.cli(hello)]
    if reset:
        return [*head, t.srv(flags="R")]
    return [*head, t.srv(SERVER_HELLO), t.cli(CLIENT_FINISHED), t.cli(flags="FA"), t.srv(flags="FA")]


def _tor_or_capture(port: int) -> list[Any]:
    """The live probe's tor-or sequence to 203.0.113.101:9001: the Tor-like hello (reset), the
    browser-like follow-up with the same SNI (completes), the Tor-like hello again (reset)."""
    sni = "www.q7example.com"
    tor, browser = _hello("tor", sni), _hello("browser", sni)
    addr = "203.0.113.101"
    return [*_handshake(Tcp(CLI, 40010, addr, port), tor, True),
            *_handshake(Tcp(CLI, 40011, addr, port), browser, False),
            *_handshake(Tcp(CLI, 40012, addr, port), tor, True)]


def test_tor_or_flows_are_the_relays_with_the_browser_hello_as_follow_up(tmp_path: Path) -> None:
    url = "tor-or://203.0.113.101:9001"
    fr = _replay(tmp_path, _tor_or_capture(9001), targets=[url])
    tls = [o for o in fr.observations if o.step == "tls"]
    assert [(o.target, o.domain, o.data.get("hello"), o.purpose, o.failure) for o in tls] == [
        (url, "203.0.113.101", "tor", MEASURE, "connection_reset"),
        (url, "203.0.113.101", "browser", FOLLOWUP, None),
        (url, "203.0.113.101", "tor", MEASURE, "connection_reset")]
    assert [o.data.get("hello") for o in fr.observations if o.step == "tcp"] == ["tor", "browser", "tor"]
    v = _verdict(fr, url)
    assert v is not None and (v.label, v.detail) == ("blocked/dpi", "dpi.tls_fingerprint"), v
    assert "Tor-like ClientHello was reset" in v.sentence


def test_near_miss_another_port_of_the_relay_is_not_the_or_port(tmp_path: Path) -> None:
    url = "tor-or://203.0.113.101:9001"
    fr = _replay(tmp_path, _tor_or_capture(9002), targets=[url])
    assert _verdict(fr, url) is None
    assert {o.target for o in fr.observations} == {"www.q7example.com"}


# --- tor-dir:// ------------------------------------------------------------------------------------------------
CONSENSUS = "/tor/status-vote/current/consensus"


def _dir_fetch(t: Tcp, reset: bool) -> list[Any]:
    get = f"GET {CONSENSUS} HTTP/1.1\r\nHost: 203.0.113.121:9030\r\nAccept: */*\r\n\r\n".encode()
    head = [*t.handshake(), t.cli(get)]
    if reset:
        return [*head, t.srv(flags="R")]
    body = b"network-status-version 3\nvote-status consensus\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    return [*head, t.srv(resp), t.cli(flags="FA"), t.srv(flags="FA")]


def _dir_control(url: str) -> list[Observation]:
    return [_ctl(url, "203.0.113.121", "tcp", "203.0.113.121", 9030),
            _ctl(url, "203.0.113.121", "http", "203.0.113.121", 9030, status=200, kind="tor-dir",
                 url=f"http://203.0.113.121:9030{CONSENSUS}")]


def test_tor_dir_fetch_is_the_directorys_http_step(tmp_path: Path) -> None:
    url = "tor-dir://203.0.113.121:9030"
    fetch = _dir_fetch(Tcp(CLI, 40020, "203.0.113.121", 9030), False)
    fr = _replay(tmp_path, [*_helper(41002, url, _dir_control(url)), *fetch])
    (http,) = [o for o in fr.observations if o.step == "http" and o.vantage == "probe"]
    assert (http.target, http.data.get("kind"), http.data.get("status")) == (url, "tor-dir", 200)
    assert http.data.get("url") == f"http://203.0.113.121:9030{CONSENSUS}"
    v = _verdict(fr, url)
    assert v is not None and v.status == "ok", v


def test_near_miss_a_reset_consensus_fetch_is_not_ok(tmp_path: Path) -> None:
    url = "tor-dir://203.0.113.121:9030"
    fetch = _dir_fetch(Tcp(CLI, 40020, "203.0.113.121", 9030), True)
    fr = _replay(tmp_path, [*_helper(41002, url, _dir_control(url)), *fetch])
    v = _verdict(fr, url)
    assert v is not None and (v.label, v.rule, v.detail) == ("blocked/dpi", "dpi.tor_dir", "dpi.http_reset"), v


# --- proxy+http:// ---------------------------------------------------------------------------------------------
PROXY = "203.0.113.131"


def _proxy_flow(answer: bytes, tls: str) -> list[Any]:
    """CONNECT example.com:443 through the proxy; ``tls``: "ok" (the TLS server's flight comes back
    and the client goes on), "reset" (the ClientHello is answered by a RST) or "none" (no tunnel)."""
    t = Tcp(CLI, 40030, PROXY, 8080)
    req = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Connection: keep-alive\r\n\r\n"
    out = [*t.handshake(), t.cli(req), t.srv(answer)]
    if tls == "ok":
        out += [t.cli(_hello("default", "example.com")), t.srv(SERVER_HELLO), t.cli(CLIENT_FINISHED),
                t.cli(flags="FA"), t.srv(flags="FA")]
    elif tls == "reset":
        out += [t.cli(_hello("default", "example.com")), t.srv(flags="R")]
    else:
        out += [t.cli(flags="FA"), t.srv(flags="FA")]
    return out


def _proxy_control(url: str) -> list[Observation]:
    return [_ctl(url, PROXY, "tcp", PROXY, 8080),
            _ctl(url, PROXY, "http", PROXY, 8080, method="CONNECT", connect_to="example.com:443", status=200,
                 url=url, host="example.com"),
            _ctl(url, PROXY, "tls", PROXY, 8080, sni="example.com", cert_valid=True)]


ESTABLISHED = b"HTTP/1.0 200 Connection established\r\n\r\n"


def test_a_proxy_flow_is_tcp_connect_and_tls_through_the_tunnel(tmp_path: Path) -> None:
    url = "proxy+http://203.0.113.131:8080"
    helper = _helper(41003, url, _proxy_control(url))
    fr = _replay(tmp_path, [*helper, *_proxy_flow(ESTABLISHED, "ok")])
    probe = [o for o in fr.observations if o.vantage == "probe"]
    assert [(o.step, o.target) for o in probe] == [("tcp", url), ("http", url), ("tls", url)]
    http, tls = probe[1], probe[2]
    # As probes/kinds.py records a 2xx: status and headers, no page (what follows is the tunnel).
    assert {k: http.data.get(k) for k in ("method", "connect_to", "status", "host")} == {
        "method": "CONNECT", "connect_to": "example.com:443", "status": 200, "host": "example.com"}
    assert "body_length" not in http.data and "title" not in http.data
    assert (tls.data.get("sni"), tls.purpose, tls.failure) == ("example.com", MEASURE, None)
    # Evidence: the CONNECT (the proxy flow's 4th packet), the ClientHello into the tunnel (its 6th),
    # the ServerHello (its 7th).
    c = len(helper) + 4
    assert (http.packets[0], tls.packets) == (c, [c, c + 2, c + 3])
    v = _verdict(fr, url)
    assert v is not None and (v.status, v.rule) == ("ok", "ok.proxy"), v


def test_near_miss_tls_through_the_tunnel_reset_is_not_ok(tmp_path: Path) -> None:
    url = "proxy+http://203.0.113.131:8080"
    fr = _replay(tmp_path, [*_helper(41003, url, _proxy_control(url)), *_proxy_flow(ESTABLISHED, "reset")])
    (tls,) = [o for o in fr.observations if o.vantage == "probe" and o.step == "tls"]
    assert tls.failure == "connection_reset"
    v = _verdict(fr, url)
    assert v is not None and (v.label, v.rule, v.detail) == ("blocked/dpi", "dpi.proxy_tunnel",
                                                              "dpi.proxy_tls_reset"), v


def test_near_miss_a_refused_connect_has_no_tunnel(tmp_path: Path) -> None:
    url = "proxy+http://203.0.113.131:8080"
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nConnection: close\r\n\r\nforbidden"
    fr = _replay(tmp_path, [*_helper(41003, url, _proxy_control(url)), *_proxy_flow(refusal, "none")])
    probe = [o for o in fr.observations if o.vantage == "probe"]
    assert [o.step for o in probe] == ["tcp", "http"]
    assert probe[1].data.get("status") == 403 and probe[1].data.get("body_length") == 9
    v = _verdict(fr, url)
    assert v is not None and (v.status, v.rule) == ("inconclusive", "proxy.refused"), v


# --- the lab recording, and the command line ---------------------------------------------------------------
CIRC = Path(__file__).resolve().parents[1] / "fixtures" / "pcaps" / "kz2014-circumvention.pcapng"
needs_circ = pytest.mark.skipif(not CIRC.is_file(), reason="fixtures/pcaps/kz2014-circumvention.pcapng absent")


def _live(capture: Path) -> dict[str, tuple[str, str | None]]:
    doc = json.loads(capture.with_name("kz2014-circumvention.expected.json").read_text("utf-8"))
    return {d["target"]: (d["live_verdict"], d["live_detail"]) for d in doc["targets"] if "://" in d["target"]
            and not d["target"].startswith(("http://", "https://"))}


@needs_circ
def test_the_capture_names_its_kind_targets_through_the_helper_requests() -> None:
    """Without any target list, the probe's requests to its helper (POST /v1/control {"url": ...})
    name every kind target of the run, and the verdicts are the live run's (expected.json)."""
    live = _live(CIRC)
    assert len(live) == 15
    got = {v.target: (v.label, v.detail) for v in classify(Replayer().replay_file(str(CIRC)).observations)}
    assert {u: got.get(u) for u in live} == live


@needs_circ
def test_cli_targets_from_the_recordings_expected_json() -> None:
    from click.testing import CliRunner

    from kzprobe.cli import main

    exp = CIRC.with_name("kz2014-circumvention.expected.json")
    res = CliRunner().invoke(main, ["replay", "--targets", str(exp), "--format", "json", str(CIRC)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    got = {v["target"]: (v["status"] + (f"/{v['mechanism']}" if v.get("mechanism") else "")) for v in doc["verdicts"]}
    assert {u: got.get(u) for u in _live(CIRC)} == {u: lv for u, (lv, _d) in _live(CIRC).items()}


@pytest.mark.parametrize(("args", "said"), [
    (["--list", "nope"], "no built-in list 'nope'"),
    (["--targets", "{json}"], "not a lab recording's expected.json"),
    (["--targets", "{json}", "--list", "tor"], "--targets and --list are one or the other"),
])
def test_cli_bad_target_options_are_one_line(tmp_path: Path, args: list[str], said: str) -> None:
    from click.testing import CliRunner

    from kzprobe.cli import main

    bad = tmp_path / "x.expected.json"
    bad.write_text("{}")
    cap = tmp_path / "k.pcap"
    _write(cap, [(0.0, _tail())])
    res = CliRunner().invoke(main, ["replay", *[a.replace("{json}", str(bad)) for a in args], str(cap)])
    assert res.exit_code == 2 and said in res.output and "Traceback" not in res.output, res.output


@needs_circ
def test_the_tunnel_steps_cite_the_frames_tshark_sees() -> None:
    """Independent of replay's parsers: on the recorded open proxy (203.0.113.131:8080), the TLS step
    through the tunnel cites the CONNECT, the ClientHello and the ServerHello tshark finds there."""
    import shutil
    import subprocess

    if shutil.which("tshark") is None:
        pytest.skip("needs tshark")

    def frames(expr: str) -> list[int]:
        out = subprocess.run(["tshark", "-r", str(CIRC), "-d", "tcp.port==8080,http", "-Y",
                              f"ip.addr==203.0.113.131 && tcp.port==8080 && {expr}", "-T", "fields",
                              "-e", "frame.number"], capture_output=True, text=True, timeout=60, check=True)
        return [int(x) for x in out.stdout.split()]

    url = "proxy+http://203.0.113.131:8080"
    fr = Replayer().replay_file(str(CIRC))
    (tls,) = [o for o in fr.observations if o.target == url and o.vantage == "probe" and o.step == "tls"]
    want = [*frames('http.request.method == "CONNECT"'), *frames("tls.handshake.type == 1"),
            *frames("tls.handshake.type == 2")]
    assert len(want) == 3 and tls.packets == want


@pytest.mark.parametrize(("first_syn_before_end", "timed_out"), [(4.0, True), (1.0, False)])
def test_a_syn_retransmitted_until_the_capture_ends(tmp_path: Path, first_syn_before_end: float,
                                                    timed_out: bool) -> None:
    """The live probe's retry of a silent connect often runs into the end of the capture: its SYN
    retransmissions keep the flow looking alive.  A first SYN older than END_GRACE (3 s) with no
    answer has timed out; a recent one (the near miss) was cut by the capture, and says nothing."""
    url = "tcp://203.0.113.141:5222"
    syn, _again = _connect(5222, 40040, answered=False)
    end = 10.0
    t0 = end - first_syn_before_end
    pkts = [(t0, syn), (t0 + 0.5, syn), (end - 0.5, syn), (end, _tail())]
    p = tmp_path / "end.pcap"
    _write(p, pkts)
    fr = Replayer(targets=[url]).replay_file(str(p))
    got = [(o.target, o.failure) for o in fr.observations if o.step == "tcp"]
    assert got == ([(url, "generic_timeout_error")] if timed_out else [])


def test_a_flow_goes_to_a_bounded_number_of_kind_targets(tmp_path: Path) -> None:
    """A capture's helper requests (or --targets) naming thousands of kind targets at one address
    and port: each flow is given to at most MAX_SHARED of them, not multiplied by all."""
    from kzprobe.replay.kinds import MAX_SHARED

    many = [f"tcp://chat{i}.example:5222" for i in range(200)]
    dns = [p for i in range(200) for p in _lookup(f"chat{i}.example", 100 + i, 6000 + i, SRV)]
    fr = _replay(tmp_path, [*dns, *_connect(5222, 40050)], targets=many)
    tcp = [o for o in fr.observations if o.step == "tcp"]
    assert 1 <= len(tcp) <= MAX_SHARED and all(o.target in many for o in tcp)
