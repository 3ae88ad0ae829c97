"""Issue 15, acceptance 1: the ``kz2014-circumvention`` lab scenario.

Three layers, as for the other lab methods:
1. the scenario's format, the rule text and the Tor-like certificates, as pure functions (no root);
2. the world and the middleboxes at the packet level with clients that are not kzprobe: the two
   ClientHellos of kzprobe.probes.hellos against the OR ports, curl through the proxies, plain TCP
   and DNS for the messaging endpoints, the outage's rule added and removed by hand;
3. ``kzprobe lab run --scenario kz2014-circumvention`` end to end: every verdict as the scenario
   builds it, and the outage seen only by the measurements inside its window (by their timestamps).
Expected values come from the scenario (which method acts on which target), never from kzprobe.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kzprobe.lab import rules
from kzprobe.lab.endpoint_servers import consensus_file, served_consensus
from kzprobe.lab.endpoints import BENIGN_ADDRESS
from kzprobe.lab.scenario import ScenarioError, load, parse

SCENARIO = "kz2014-circumvention"
LAB_TOOLS = ("ip", "iptables", "nft", "tc", "dnsmasq", "nginx", "openssl", "tinyproxy")
needs_lab = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in LAB_TOOLS),
    reason=f"the lab needs root and {', '.join(LAB_TOOLS)} (scripts/setup installs them)",
)


# -- 1. format, rules, certificates (pure) ---------------------------------------------------------
def test_scenario_endpoints_and_outage() -> None:
    sc = load(SCENARIO)
    kinds = {e.scheme for e in sc.endpoints}
    assert kinds == {"tor-or", "tor-dir", "obfs4", "tcp", "udp-dns", "proxy+http"}
    fp = [e for e in sc.endpoints if "tls-fingerprint" in e.methods]
    assert fp and all(e.scheme == "tor-or" and e.expect == "blocked/dpi" and e.detail == "dpi.tls_fingerprint"
                      for e in fp)
    # A relay outside the rule: the near miss (same server software, no method, ok).
    assert any(e.scheme == "tor-or" and not e.methods and e.expect == "ok" for e in sc.endpoints)
    dropped = [e for e in sc.endpoints if e.scheme == "tor-dir" and "ip-drop" in e.methods]
    assert dropped and all(e.expect == "blocked/ip" and e.detail == "ip.tcp_timeout" for e in dropped)
    (o,) = sc.outages
    assert o.method == "ip-drop" and o.expect == "blocked/ip"
    by_target = {e.target: e for e in sc.endpoints}
    # Outside its window every target of the outage is reachable; inside, something it does not
    # name is measured too (the window's near miss).
    assert all(by_target[t].expect == "ok" for t in o.targets)
    assert set(o.measure) - set(o.targets)
    assert sc.expected()["tor-or://203.0.113.101:9001"] == "blocked/dpi"


REPORT = Path(__file__).resolve().parents[2] / "shared" / "report" / "freedom-on-the-net-2014-kazakhstan.txt"


@pytest.mark.skipif(not REPORT.is_file(), reason=f"needs {REPORT} (the shared data folder)")
def test_quotes_are_the_reports_words() -> None:
    def norm(t: str) -> str:
        return " ".join(t.translate(str.maketrans("’‘“”", "''\"\"")).split())

    text = norm(REPORT.read_text(encoding="utf-8"))
    sc = load(SCENARIO)
    quotes = [(s.domain, s.quote) for s in sc.sites] + [(e.target, e.quote) for e in sc.endpoints] \
        + [(o.name, o.quote) for o in sc.outages]
    assert sum(1 for _, q in quotes if q) >= 6
    for where, q in quotes:
        if q:
            assert norm(q) in text, where


def _raw(**endpoint: Any) -> dict[str, Any]:
    return {
        "scenario": {"name": "x"},
        "site": [{"domain": "a.kz", "address": "203.0.113.10", "expect": "ok", "reason": "control"}],
        "endpoint": [{"expect": "ok", "reason": "r"} | endpoint],
    }


@pytest.mark.parametrize(("endpoint", "message"), [
    ({"target": "tor-or://203.0.113.101"}, "a port is required"),
    ({"target": "udp-dns://x.example.net:53"}, "udp-dns takes a name and no port"),
    ({"target": "tcp://e1.whatsapp.net:443"}, "'address' must be an IPv4 address"),
    ({"target": "tcp://e1.whatsapp.net:443", "address": "8.8.8.8"}, "must be inside 203.0.113.0/24"),
    ({"target": "tor-or://203.0.113.10:9001"}, "is a [[site]]'s"),
    ({"target": "tor-dir://203.0.113.121:80", "method": "tls-fingerprint"}, "tls-fingerprint applies to tor-or"),
    ({"target": "tor-or://203.0.113.101:9001", "method": "sni-reset"}, "unknown method 'sni-reset'"),
    ({"target": "tor-or://203.0.113.101:9001", "method": "tls-fingerprint", "hop": "world"}, "cannot run at hop"),
    ({"target": "gopher://203.0.113.101:70"}, "scheme must be one of"),
    ({"target": "tor-or://203.0.113.101:9001", "expect": "blocked"}, "'expect' must be one of"),
    ({"target": "tor-or://203.0.113.101:9001", "colour": "red"}, "unknown key(s) colour"),
])
def test_bad_endpoint_is_one_clear_line(endpoint: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse(_raw(**endpoint), Path("x.toml"))
    text = str(err.value)
    assert message in text and text.startswith("x.toml: [[endpoint]] #1") and "\n" not in text


def test_bad_outage() -> None:
    raw = _raw(target="tcp://203.0.113.151:443")
    raw["outage"] = [{"targets": ["tcp://203.0.113.9:443"], "expect": "blocked/ip", "reason": "r"}]
    with pytest.raises(ScenarioError, match=r"\[\[outage\]\] #1 .*'targets' must list"):
        parse(raw, Path("x.toml"))
    raw["outage"] = [{"targets": ["tcp://203.0.113.151:443"], "expect": "blocked/ip", "reason": "r",
                      "method": "tls-fingerprint"}]
    with pytest.raises(ScenarioError, match="'method' must be one of ip-drop, ip-reject"):
        parse(raw, Path("x.toml"))
    raw["bogus"] = {}
    with pytest.raises(ScenarioError, match=r"unknown table\(s\) bogus"):
        parse(raw, Path("x.toml"))


def test_rule_text() -> None:
    sc = load(SCENARIO)
    signature = bytes.fromhex("c00ac0140088008700390038")
    argv = rules.tls_fingerprint_rules(sc.endpoints, signature, "100.64.4.2")
    fp = [e for e in sc.endpoints if "tls-fingerprint" in e.methods]
    assert len(argv) == 2 * len(fp)
    for e, (tee, reject) in zip(fp, zip(argv[::2], argv[1::2], strict=True), strict=True):
        match = ["-d", e.address, "-p", "tcp", "--dport", str(e.port), "-m", "string", "--algo", "bm",
                 "--hex-string", "|c0 0a c0 14 00 88 00 87 00 39 00 38|"]
        assert tee == ["-A", "FORWARD", *match, "-j", "TEE", "--gateway", "100.64.4.2"]
        assert reject == ["-A", "FORWARD", *match, "-j", "REJECT", "--reject-with", "tcp-reset"]
    with pytest.raises(ValueError, match="1-128 bytes"):
        rules.dpi_hex(b"x" * 129)
    nft = rules.endpoint_nft_rules(sc.endpoints)
    assert "table inet kzlab_ep" in nft
    for e in sc.endpoints:
        line = f"ip daddr {e.address} counter drop"
        assert (line in nft) == ("ip-drop" in e.methods), e.target
    (o,) = sc.outages
    out = rules.outage_nft_rules(o, sc.endpoints)
    addresses = {e.address for e in sc.endpoints if e.target in o.targets}
    assert set(re.findall(r"ip daddr (\S+) counter drop", out)) == addresses
    assert "table inet kzlab_outage" in out


def test_benign_address_is_the_dns_one() -> None:
    from kzprobe.lab import services

    assert BENIGN_ADDRESS == services.DEFAULT_ADDRESS
    lines = services.auth_dns_lines(load(SCENARIO))
    assert "host-record=e1.whatsapp.net,203.0.113.151" in lines


def test_endpoint_names_in_the_lab_dns() -> None:
    from kzprobe.lab import services

    raw = _raw(target="tcp://chat.example.net:443", address="203.0.113.171", method="dns-nxdomain",
               expect="blocked/dns")
    raw["endpoint"].append({"target": "udp-dns://chat.example.net", "address": "203.0.113.171",
                            "method": "dns-nxdomain", "expect": "blocked/dns", "reason": "r"})
    sc = parse(raw, Path("x.toml"))
    assert "host-record=chat.example.net,203.0.113.171" in services.auth_dns_lines(sc)
    assert services.isp_dns_lines(sc).count("address=/chat.example.net/") == 1
    raw["endpoint"][1]["address"] = "203.0.113.172"
    with pytest.raises(ScenarioError, match="is given two addresses"):
        parse(raw, Path("x.toml"))


def test_served_consensus_drops_the_archive_annotation() -> None:
    doc = b"network-status-version 3\nvote-status consensus\n"
    assert served_consensus(b"@type network-status-consensus-3 1.0\n" + doc) == doc
    assert served_consensus(doc) == doc


def test_tor_link_certificate(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import padding

    cert_p, _key_p, chain_p = map(Path, _tor_link(tmp_path))
    link = x509.load_pem_x509_certificate(cert_p.read_bytes())
    identity = x509.load_pem_x509_certificate(chain_p.read_bytes())
    cn = link.subject.rfc4514_string()
    assert re.fullmatch(r"CN=www\.[a-z2-7]{8,20}\.net", cn), cn
    assert re.fullmatch(r"CN=www\.[a-z2-7]{8,20}\.com", link.issuer.rfc4514_string())
    assert identity.subject == identity.issuer == link.issuer
    assert len(link.extensions) == 0
    life = link.not_valid_after_utc - link.not_valid_before_utc
    assert dt.timedelta(days=5) <= life <= dt.timedelta(days=30)
    assert link.not_valid_before_utc <= dt.datetime.now(dt.UTC) <= link.not_valid_after_utc
    assert link.not_valid_before_utc.time() == dt.time(0, 0)
    # The identity key signed the link certificate.
    identity.public_key().verify(link.signature, link.tbs_certificate_bytes,  # type: ignore[union-attr,call-arg]
                                 padding.PKCS1v15(), link.signature_hash_algorithm)  # type: ignore[arg-type]


def _tor_link(d: Path) -> list[str]:
    from kzprobe.lab.pki import tor_link

    return tor_link(d, "relay", random.Random(7))


def _present(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- 2. the world and the middleboxes, without kzprobe ----------------------------------------------
_HANDSHAKE = r"""
import json, socket, ssl, sys
from cryptography import x509
from kzprobe.probes.certs import TrustStore
from kzprobe.probes.hellos import context
out = []
for spec in sys.argv[2:]:
    addr, port, hello = spec.split(",")
    ctx = context(hello, TrustStore([sys.argv[1]], include_default=False))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    r = {"address": addr, "port": int(port), "hello": hello}
    try:
        with socket.create_connection((addr, int(port)), timeout=2) as s:
            with ctx.wrap_socket(s, server_hostname="www.example.com") as t:
                der = t.getpeercert(binary_form=True)
                c = x509.load_der_x509_certificate(der)
                r |= {"ok": True, "cipher": t.cipher()[0], "subject": c.subject.rfc4514_string(),
                      "issuer": c.issuer.rfc4514_string()}
    except ConnectionResetError:
        r |= {"ok": False, "error": "reset"}
    except (TimeoutError, socket.timeout):
        r |= {"ok": False, "error": "timeout"}
    except (OSError, ssl.SSLError) as exc:
        r |= {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    out.append(r)
print(json.dumps(out))
"""

_RESOLVE = "import json, socket, sys; print(json.dumps([socket.gethostbyname(n) for n in sys.argv[1:]]))"
_CONNECT = r"""
import json, socket, sys
out = {}
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.5).close()
        out[spec] = "ok"
    except TimeoutError:
        out[spec] = "timeout"
    except OSError as exc:
        out[spec] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Any]:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in LAB_TOOLS):
        pytest.skip(f"the lab needs root and {', '.join(LAB_TOOLS)}")
    if not _present("kzprobe.probes.hellos"):
        pytest.skip("tls-fingerprint matches kzprobe.probes.hellos.DPI_SIGNATURE, which is not in yet")
    from kzprobe.lab import Lab

    lab = Lab(SCENARIO, instance="kzlc" + os.urandom(2).hex())
    request.addfinalizer(lab.down)
    lab.up()
    yield lab


def _py(lab: Any, code: str, *args: str) -> Any:
    p = lab.exec("volunteer", [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@needs_lab
def test_or_ports_reset_only_the_tor_like_hello(lab: Any) -> None:
    relays = [e for e in lab.scenario.endpoints if e.scheme == "tor-or"]
    specs = [f"{e.address},{e.port},{h}" for e in relays for h in ("tor", "browser", "tor")]
    got = _py(lab, _HANDSHAKE, str(lab.ca_path), *specs)
    for r in got:
        e = next(x for x in relays if x.address == r["address"])
        if "tls-fingerprint" in e.methods and r["hello"] == "tor":
            assert r == {**r, "ok": False, "error": "reset"}, r
            continue
        assert r["ok"], r
        # Tor's link certificate: www.<random>.net issued by www.<random>.com.
        assert re.fullmatch(r"CN=www\.[a-z2-7]+\.net", r["subject"]), r
        assert re.fullmatch(r"CN=www\.[a-z2-7]+\.com", r["issuer"]), r
        if r["hello"] == "tor":
            assert r["cipher"] == "ECDHE-RSA-AES256-SHA", r  # Tor's first suite an RSA relay can take
    # The DPI box's counters: the match fired once per Tor-like hello to a listed relay, and the
    # server got each hello's copy (it is not stuck on a half-open connection: the browser-like
    # hello after it completed, above).
    table = lab.exec("bb2", ["iptables", "-w", "-L", "FORWARD", "-v", "-x", "-n"], capture_output=True,
                     text=True).stdout
    for e in relays:
        lines = [ln for ln in table.splitlines() if e.address in ln and "STRING match" in ln]
        if "tls-fingerprint" in e.methods:
            assert [int(ln.split()[0]) for ln in lines] == [2, 2], table
        else:
            assert not lines, table


@needs_lab
def test_directories_and_proxies(lab: Any) -> None:
    def curl(*args: str, out: str = "%{http_code}") -> str:
        p = lab.exec("volunteer", ["curl", "-s", "-m", "2", "-o", "/dev/null", "-w", out,
                                   "--cacert", str(lab.ca_path), *args], capture_output=True, text=True)
        return p.stdout

    for e in lab.scenario.endpoints:
        if e.scheme == "tor-dir":
            url = f"http://{e.address}:{e.port}/tor/status-vote/current/consensus"
            if "ip-drop" in e.methods:
                assert curl(url) == "000", e.target
                continue
            p = lab.exec("volunteer", ["curl", "-s", "-m", "2", url], capture_output=True)
            assert p.stdout.startswith(b"network-status-version 3\n"), p.stdout[:100]
            fixture = consensus_file()
            if fixture is not None:  # the real consensus, as served (no archive annotation)
                assert fixture.read_bytes().endswith(p.stdout) and len(p.stdout) > 50_000
            assert curl(f"http://{e.address}:{e.port}/") == "404"
        elif e.scheme == "proxy+http":
            # CONNECT example.com:443 and a verified TLS handshake + GET through the tunnel.
            code = curl("-x", f"http://{e.address}:{e.port}", "https://example.com/")
            assert code == ("000" if e.methods else "200"), (e.target, code)
            # Only 443 may be tunnelled, as on open proxies.
            if not e.methods:
                assert curl("-x", f"http://{e.address}:{e.port}", "-p", "http://example.com:80/",
                            out="%{http_connect}") == "403"


@needs_lab
def test_messaging_endpoints_and_the_outage_rule(lab: Any) -> None:
    (o,) = lab.scenario.outages
    by_target = {e.target: e for e in lab.scenario.endpoints}
    tcp = [t for t in o.measure if by_target[t].scheme == "tcp"]
    specs = [t.split("://", 1)[1] for t in tcp]
    assert set(_py(lab, _CONNECT, *specs).values()) == {"ok"}
    names = [by_target[t] for t in o.measure if by_target[t].scheme == "udp-dns"]
    from kzprobe.lab.topology import run

    run(["ip", "netns", "exec", lab.ns_name(o.hop), "nft", "-f", "-"],
        input=rules.outage_nft_rules(o, lab.scenario.endpoints))
    try:
        during = _py(lab, _CONNECT, *specs)
        resolved = _py(lab, _RESOLVE, *[e.host for e in names])
    finally:
        run(["ip", "netns", "exec", lab.ns_name(o.hop), "nft", "delete", "table", "inet", rules.OUTAGE_TABLE])
    assert during == {s: ("timeout" if t in o.targets else "ok") for t, s in zip(tcp, specs, strict=True)}
    assert resolved == [e.address for e in names]  # the ISP resolver still answers inside the window
    assert set(_py(lab, _CONNECT, *specs).values()) == {"ok"}


# -- 3. kzprobe lab run, end to end -------------------------------------------------------------------
def _probes_present() -> bool:
    return _present("kzprobe.probes.hellos") and _present("kzprobe.probes.kinds")


@needs_lab
@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.skipif(not _probes_present(),
                    reason="the probes of issue 15's kinds (probes/kinds.py, probes/hellos.py) are not in yet")
def test_lab_run_end_to_end(request: pytest.FixtureRequest) -> None:
    from kzprobe.lab import destroy
    from kzprobe.lab.core import list_namespaces
    from kzprobe.tests.support.schema import validator

    inst = "kzlcr" + os.urandom(2).hex()
    request.addfinalizer(lambda: destroy(inst))
    p = subprocess.run([sys.executable, "-m", "kzprobe.cli", "lab", "run", "--scenario", SCENARIO, "--format", "json",
                        "--instance", inst], capture_output=True, text=True, timeout=280)
    assert p.stdout, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    validator("envelope.schema.json").validate(doc)
    report = doc["lab"]
    rows = report["results"]
    sc = load(SCENARIO)
    (o,) = sc.outages
    wrong = [(r["target"], r.get("round"), r["expect"], r["expect_detail"], r["got"], r["got_detail"],
              (r["verdict"] or {}).get("rule")) for r in rows if not r["match"]]
    assert not wrong, wrong
    assert p.returncode == 0 and report["ok"] is True
    main = [r for r in rows if r["round"] == "before"]
    assert [r["target"] for r in main] == [s.url for s in sc.sites] + [e.target for e in sc.endpoints]
    # The fingerprint verdicts name the hello that was blocked and point at their evidence.
    for r in main:
        if r["expect_detail"] == "dpi.tls_fingerprint":
            v = r["verdict"]
            assert v["rule"] == "dpi.tls_fingerprint" and v["evidence"]["observations"], v
            assert re.search(r"Tor-like", v["evidence"]["sentence"]), v
    # The outage: seen inside its window only, by the measurements' own timestamps.
    (w,) = report["windows"]
    opened, closed = w["opened"], w["closed"]
    assert closed - opened >= o.hold
    for t in o.measure:
        per_round = {r["round"]: r for r in rows if r["target"] == t}
        assert set(per_round) == {"before", "during", "after"}, t
        before, during, after = per_round["before"], per_round["during"], per_round["after"]
        assert before["measured"][1] < opened < during["measured"][0], t
        assert during["measured"][1] < closed < after["measured"][0], t
        inside = t in o.targets
        assert during["got"] == ("blocked/ip" if inside else "ok"), during
        assert before["got"] == after["got"] == "ok", (before, after)
        if inside:
            assert during["got_detail"] == "ip.tcp_timeout", during
    assert not [ns for ns in list_namespaces() if ns.startswith(inst + "-")]
