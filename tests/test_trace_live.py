"""Live `kzprobe trace` against a tiny namespace chain with a real kernel censor.

    client ns --- r1 --- r2 --- server ns
    198.51.100.2   .1  .5  .6   203.0.113.1 | 203.0.113.10

No link to the root namespace, no route out.  The server ns runs a real HTTP server (port 80)
and a TLS server (port 443, trustme certificate).  The censor is netfilter on r2's FORWARD
chain: `-m string` on "Host: blocked.test" (HTTP) and on "blocked.test" (the SNI bytes of the
ClientHello), with REJECT --reject-with tcp-reset or DROP.

Where the tracer must land: a trigger with TTL 2 expires *at* r2 (ICMP from 198.51.100.6,
before FORWARD runs); with TTL 3 it passes r2's FORWARD chain and is blocked.  The RST r2 sends
starts at TTL 64 and arrives with 63, one hop less than the server's SYN/ACK (62): so the
censor is r2, TTL 2, in-path.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kzprobe.trace.decide import consolidate

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, raw sockets)"),
]

PY = sys.executable
R2_ADDR = "198.51.100.6"
SERVER = "203.0.113.10"

SERVER_SCRIPT = textwrap.dedent(
    """
    import ssl, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html><title>lab server</title>ok</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass

    cert, key = sys.argv[1], sys.argv[2]
    http = ThreadingHTTPServer(("0.0.0.0", 80), H)
    tls = ThreadingHTTPServer(("0.0.0.0", 443), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    print("ready", flush=True)
    tls.serve_forever()
    """
)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def nsx(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check)


class Chain:
    def __init__(self, tmp: Path) -> None:
        p = "kzt" + secrets.token_hex(2)
        self.prefix = p
        self.c, self.r1, self.r2, self.s = f"{p}-c", f"{p}-r1", f"{p}-r2", f"{p}-s"
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []

    @property
    def namespaces(self) -> list[str]:
        return [self.c, self.r1, self.r2, self.s]

    def build(self) -> None:
        p = self.prefix
        for ns in self.namespaces:
            sh("ip", "netns", "add", ns)
            nsx(ns, "ip", "link", "set", "lo", "up")
        links = [
            (self.c, f"{p}c0", "198.51.100.2/30", self.r1, f"{p}a0", "198.51.100.1/30"),
            (self.r1, f"{p}a1", "198.51.100.5/30", self.r2, f"{p}b0", "198.51.100.6/30"),
            (self.r2, f"{p}b1", "203.0.113.1/24", self.s, f"{p}s0", "203.0.113.10/24"),
        ]
        for ns_a, if_a, addr_a, ns_b, if_b, addr_b in links:
            sh("ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
            nsx(ns_a, "ip", "addr", "add", addr_a, "dev", if_a)
            nsx(ns_b, "ip", "addr", "add", addr_b, "dev", if_b)
            nsx(ns_a, "ip", "link", "set", if_a, "up")
            nsx(ns_b, "ip", "link", "set", if_b, "up")
        nsx(self.c, "ip", "route", "add", "default", "via", "198.51.100.1")
        nsx(self.r1, "ip", "route", "add", "default", "via", "198.51.100.6")
        nsx(self.r2, "ip", "route", "add", "198.51.100.0/30", "via", "198.51.100.5")
        nsx(self.s, "ip", "route", "add", "default", "via", "203.0.113.1")
        for ns in (self.r1, self.r2):
            nsx(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._servers()

    def _servers(self) -> None:
        import trustme

        ca = trustme.CA()
        leaf = ca.issue_cert("blocked.test", "allowed.test", "example.com")
        cert, key = self.tmp / "cert.pem", self.tmp / "key.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        script = self.tmp / "server.py"
        script.write_text(SERVER_SCRIPT)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.s, PY, str(script), str(cert), str(key)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line

    def censor(self, action: str) -> None:
        """String-match censor on r2's FORWARD chain: action is 'reset' or 'drop'."""
        target = ["REJECT", "--reject-with", "tcp-reset"] if action == "reset" else ["DROP"]
        nsx(self.r2, "iptables", "-F", "FORWARD")
        for dport, needle in (("80", "Host: blocked.test"), ("443", "blocked.test")):
            nsx(self.r2, "iptables", "-A", "FORWARD", "-p", "tcp", "--dport", dport,
                "-m", "string", "--algo", "bm", "--string", needle, "-j", *target)

    def teardown(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=5)
        for ns in self.namespaces:
            # Deleting a namespace deletes its veth ends and netfilter rules with it.
            sh("ip", "netns", "delete", ns, check=False)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    c = Chain(tmp_path_factory.mktemp("kztchain"))
    try:
        c.build()
        yield c
    finally:
        c.teardown()
    leftover = sh("ip", "netns", "list").stdout
    assert c.prefix not in leftover


def run_trace(chain: Chain, domain: str, trigger: str, max_hops: int = 5) -> dict:
    code = textwrap.dedent(
        f"""
        import json
        from kzprobe.trace.live import trace
        from kzprobe.trace.decide import consolidate
        r = trace({domain!r}, {SERVER!r}, trigger={trigger!r}, max_hops={max_hops}, repeat=2, timeout=0.8)
        out = r.to_dict()
        out["control"] = {{t: h.kind for t, h in consolidate(r.control_hops).items()}}
        out["test"] = {{t: h.kind for t, h in consolidate(r.test_hops).items()}}
        print(json.dumps(out))
        """
    )
    done = nsx(chain.c, PY, "-c", code, check=False)
    assert done.returncode == 0, done.stderr
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


def rules_in(ns: str) -> str:
    return nsx(ns, "iptables", "-S", "OUTPUT").stdout


@pytest.mark.parametrize("trigger", ["http", "tls"])
def test_reset_censor_named_in_path(chain: Chain, trigger: str) -> None:
    chain.censor("reset")
    out = run_trace(chain, "blocked.test", trigger)
    assert out["result"] == "censor_located", out
    assert (out["hop_ttl"], out["hop_address"]) == (2, R2_ADDR)
    assert out["placement"] == "in-path"
    assert out["triggered_by"] == "domain"
    assert out["test"]["3"] == "rst"
    # The control domain passes: ICMP from r1 and r2, then the server itself answers.
    want = "server_hello" if trigger == "tls" else "response"
    assert (out["control"]["1"], out["control"]["2"]) == ("icmp_time_exceeded", "icmp_time_exceeded")
    assert out["control"]["3"] == want
    assert "kzprobe-trace" not in rules_in(chain.c)


def test_drop_censor_is_silence_in_path(chain: Chain) -> None:
    chain.censor("drop")
    out = run_trace(chain, "blocked.test", "tls")
    assert out["result"] == "censor_located", out
    assert (out["hop_ttl"], out["hop_address"]) == (2, R2_ADDR)
    assert out["placement"] == "in-path"
    assert out["triggered_by"] == "domain"
    assert [out["test"][str(t)] for t in range(3, 6)] == ["silence"] * 3
    assert out["control"]["3"] == "server_hello"


def test_unblocked_domain_none_observed(chain: Chain) -> None:
    chain.censor("reset")
    out = run_trace(chain, "allowed.test", "http")
    assert out["result"] == "none_observed", out
    assert out["hop_address"] is None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_rst_rule_removed_when_interrupted(chain: Chain, sig: signal.Signals) -> None:
    chain.censor("drop")
    # A long listening window keeps the trace inside the guarded block while we interrupt it.
    code = (
        "from kzprobe.trace.live import trace\n"
        f"trace('blocked.test', {SERVER!r}, trigger='tls', max_hops=4, repeat=1, timeout=30)\n"
    )
    proc = subprocess.Popen(["ip", "netns", "exec", chain.c, PY, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while "kzprobe-trace" not in rules_in(chain.c):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the RST rule never appeared"
            time.sleep(0.1)
        proc.send_signal(sig)
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "kzprobe-trace" not in rules_in(chain.c)


def test_not_root_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from kzprobe.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    r = CliRunner().invoke(main, ["trace", "blocked.test", "--address", SERVER])
    assert r.exit_code == 1
    assert "needs root" in r.output and "Traceback" not in r.output


def test_consolidate_is_importable_without_scapy() -> None:
    # `kzprobe --help` must not pull scapy in; the trace command's module chain neither.
    done = subprocess.run(
        [PY, "-c", "import sys, kzprobe.trace.cli, kzprobe.trace.live; print('scapy' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert done.stdout.strip() == "False"
    assert consolidate([]) == {}
