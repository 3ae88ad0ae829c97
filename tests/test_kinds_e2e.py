"""``kzprobe run --targets FILE --helper`` on the kind targets, end to end, in a network namespace.

One throwaway namespace (unique name, loopback and a veth pair within it: no link to the root namespace, no
route out)
holds every part, real ones: nginx serving a consensus file at /tor/status-vote/current/consensus
and example.com over TLS, a real HTTP CONNECT proxy and TCP endpoints (tests/support/kindserve.py),
two dnsmasq resolvers (the "ISP" one answers NXDOMAIN for blocked.test), ``kzprobe helper`` as
control, and iptables rules in the namespace that interfere only with the probe's source address
(127.0.0.2, ``--source-address``): the helper connects from 127.0.0.1 and sees every server.

Each expected verdict follows from the rule set up for it (see WORLD).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import trustme

from kzprobe.lab import nginx
from kzprobe.tests.support.loopnet import kzprobe_exe
from kzprobe.tests.support.schema import validator

pytestmark = [pytest.mark.lab, pytest.mark.slow]
if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "dnsmasq", "nginx")):
    pytest.skip("needs root, ip, iptables, dnsmasq and nginx (scripts/setup)", allow_module_level=True)

PROBE_SRC = "127.0.0.2"
PUBLIC_DNS, ISP_DNS = "127.0.20.53", "127.0.20.54"
TLS_BENIGN = "127.0.20.5"
CONSENSUS = "network-status-version 3\nvote-status consensus\nconsensus-method 33\nvalid-after 2026-11-29 12:00:00\n"

#: What each probe-side rule does to the probe (source 127.0.0.2) only.
IPTABLES = [
    "-d 127.0.20.4 -p tcp --dport 5222 -j REJECT --reject-with tcp-reset",  # endpoint refused
    "-d 127.0.20.4 -p tcp --dport 9443 -j DROP",  # bridge's SYN dropped
    "-d 127.0.20.7 -p tcp --dport 9030 -j DROP",  # directory dropped by address
    # DPI: the consensus request and the proxy's CONNECT are reset on their bytes.
    "-d 127.0.20.8 -p tcp --dport 9030 -m string --algo bm --string /tor/status-vote/ "
    "-j REJECT --reject-with tcp-reset",
    "-d 127.0.20.6 -p tcp --dport 3128 -m string --algo bm --string CONNECT -j REJECT --reject-with tcp-reset",
]

#: target -> (status, mechanism, detail, rule), from how the world is built.
WORLD: dict[str, tuple[str, str | None, str, str]] = {
    "tor-dir://127.0.20.1:9030": ("ok", None, "ok", "ok.http"),
    "tor-dir://127.0.20.7:9030": ("blocked", "ip", "ip.tcp_timeout", "ip.tcp"),
    "tor-dir://127.0.20.8:9030": ("blocked", "dpi", "dpi.http_reset", "dpi.tor_dir"),
    "tcp://chat.test:5222": ("ok", None, "ok", "ok.tcp"),
    "tcp://127.0.20.4:5222": ("blocked", "ip", "ip.tcp_refused", "ip.tcp"),
    "tcp://127.0.20.9:5222": ("down", None, "down", "down.everyone"),  # nothing listens
    "obfs4://127.0.20.2:9443": ("ok", None, "ok", "ok.tcp"),
    "obfs4://127.0.20.4:9443": ("blocked", "ip", "ip.tcp_timeout", "ip.tcp"),
    "udp-dns://chat.test": ("ok", None, "ok", "ok.dns"),
    "udp-dns://blocked.test": ("blocked", "dns", "dns.nxdomain", "dns.failure"),
    "proxy+http://127.0.20.3:3128": ("ok", None, "ok", "ok.proxy"),
    "proxy+http://127.0.20.6:3128": ("blocked", "dpi", "dpi.proxy_connect", "dpi.proxy_connect"),
}


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ns = "kzk" + secrets.token_hex(4)
        self.procs: list[subprocess.Popen[Any]] = []
        self.logs: list[IO[str]] = []
        self.ca = trustme.CA()
        self.ca_pem = str(tmp / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_pem)

    def exec(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def start(self, name: str, argv: list[str], ready: str | None = None) -> subprocess.Popen[Any]:
        log = open(self.tmp / f"{name}.log", "w")  # kept open for the process's life, closed by down()
        self.logs.append(log)
        p = subprocess.Popen(self.exec(*argv), stdout=log if ready is None else subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def up(self) -> None:
        _run("ip", "netns", "add", self.ns)
        _run(*self.exec("ip", "link", "set", "lo", "up"))
        # A route that is not loopback, so the run does not call itself a vantage with no network
        # (probes/runner.vantage_has_route): a veth pair with both ends in the namespace leads nowhere.
        _run(*self.exec("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"))
        _run(*self.exec("ip", "addr", "add", "100.64.0.1/30", "dev", "v0"))
        _run(*self.exec("ip", "link", "set", "v0", "up"))
        for rule in IPTABLES:
            _run(*self.exec("iptables", "-A", "OUTPUT", "-s", PROBE_SRC, *rule.split()))
        self._nginx()
        self._dnsmasq("public", PUBLIC_DNS, ["address=/chat.test/127.0.20.2", "address=/blocked.test/127.0.20.2"])
        self._dnsmasq("isp", ISP_DNS, ["address=/chat.test/127.0.20.2", "address=/blocked.test/"])
        p = self.start("kindserve", [sys.executable, "-m", "kzprobe.tests.support.kindserve",
                                     "--tcp", "127.0.20.2:5222", "--tcp", "127.0.20.4:5222", "--tcp", "127.0.20.2:9443",
                                     "--tcp", "127.0.20.4:9443", "--proxy", "127.0.20.3:3128",
                                     "--proxy", "127.0.20.6:3128", "--map", f"example.com={TLS_BENIGN}"], ready="ready")
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        self._wait_tcp([("127.0.20.1", 9030), ("127.0.20.8", 9030), (TLS_BENIGN, 443)])

    def _nginx(self) -> None:
        root = self.tmp / "www"
        f = root / "tor/status-vote/current/consensus"
        f.parent.mkdir(parents=True)
        f.write_text(CONSENSUS + "r relay AAAA BBBB 2026-11-29 12:00:00 198.51.100.1 9001 0\n" * 2000)
        leaf = self.ca.issue_cert("example.com")
        cert, key = self.tmp / "example.pem", self.tmp / "example.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        for extra in leaf.cert_chain_pems[1:]:
            extra.write_to_path(str(cert), append=True)
        leaf.private_key_pem.write_to_path(str(key))
        servers = [
            nginx._block([f"listen {a}:9030;" for a in ("127.0.20.1", "127.0.20.7", "127.0.20.8")]
                         + ["server_name _;", f"root {root};", "gzip off;"]),
            nginx._block([f"listen {TLS_BENIGN}:443 ssl;", "server_name example.com;", f"ssl_certificate {cert};",
                          f"ssl_certificate_key {key};", f"root {root};"]),
        ]
        prefix = self.tmp / "nginx"
        nginx.prepare(prefix, servers)
        self.start("nginx", nginx.argv(prefix))

    def _dnsmasq(self, name: str, address: str, lines: list[str]) -> None:
        conf = self.tmp / f"{name}.conf"
        conf.write_text("\n".join(["no-resolv", "no-hosts", "no-poll", "bind-interfaces", f"listen-address={address}",
                                   "except-interface=nonexistent", *lines]) + "\n")
        self.start(f"dns-{name}", ["dnsmasq", "--keep-in-foreground", "--user=root", "--pid-file=", "-C", str(conf)])

    def _wait_tcp(self, endpoints: list[tuple[str, int]]) -> None:
        script = ("import socket,sys,time\nfor h,p in [" + ",".join(f"('{h}',{p})" for h, p in endpoints) + "]:\n"
                  " for _ in range(100):\n  try: socket.create_connection((h,p),0.2).close(); break\n"
                  "  except OSError: time.sleep(0.05)\n else: sys.exit(f'{h}:{p} never listened')\n")
        subprocess.run(self.exec(sys.executable, "-c", script), check=True, timeout=30)

    def helper(self) -> str:
        p = self.start("helper", [*kzprobe_exe(), "helper", "--listen", "127.0.0.1:0", "--allow-private",
                                  "--resolver", f"{PUBLIC_DNS}:53", "--ca-bundle", self.ca_pem, "--timeout", "1.5",
                                  "--client-rate", "1000", "--control-sni", "example.com"], ready="listening")
        assert p.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            m = re.search(r"listening on (https?://\S+)", line)
            if m:
                # Keep reading so a full pipe never blocks the helper.
                threading.Thread(target=lambda: [None for _ in p.stdout or ()], daemon=True).start()
                return m.group(1).rstrip("/")
            if not line and p.poll() is not None:
                break
        raise AssertionError("kzprobe helper did not start")

    def probe(self, targets: list[str], db: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        tfile = db.with_suffix(".txt")
        tfile.write_text("\n".join(targets) + "\n")
        argv = [*kzprobe_exe(), "run", "--targets", str(tfile), "--no-system-resolver", "--resolver", f"{ISP_DNS}:53",
                "--ca-bundle", self.ca_pem, "--source-address", PROBE_SRC, "--db", str(db), "--format", "json",
                "--no-progress", "--timeout", "1.5", "--control-sni", "example.com", *extra]
        return subprocess.run(self.exec(*argv), capture_output=True, text=True, timeout=180,
                              env={**os.environ, "NO_COLOR": "1"})

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for log in self.logs:
            log.close()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("kinds"))
    try:
        w.up()
        yield w
    finally:
        w.down()


@pytest.fixture(scope="module")
def with_helper(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    helper = world.helper()
    out = world.probe(list(WORLD), tmp_path_factory.mktemp("run") / "kinds.db", "--helper", helper)
    assert out.returncode == 0, out.stderr[-2000:]
    env: dict[str, Any] = json.loads(out.stdout)
    return env


@pytest.mark.parametrize("target", list(WORLD))
def test_verdict_with_helper(with_helper: dict[str, Any], target: str) -> None:
    got = {v["target"]: v for v in with_helper["verdicts"]}[target]
    status, mechanism, detail, rule = WORLD[target]
    assert (got["status"], got["mechanism"], got["detail"], got["rule"]) == (status, mechanism, detail, rule), got
    if status in ("blocked", "down"):
        assert got["evidence"]["observations"], got


def test_output_is_the_shared_envelope(with_helper: dict[str, Any]) -> None:
    assert with_helper["command"] == "run"
    assert len(with_helper["verdicts"]) == len(WORLD)
    errors = list(validator("envelope.schema.json").iter_errors(with_helper))
    assert not errors, errors[0].message


def test_without_control_the_blocked_kinds_are_inconclusive(world: World, tmp_path: Path) -> None:
    """The same interference with no helper: no contrast, so never 'blocked'."""
    blocked = [t for t, (s, *_rest) in WORLD.items() if s == "blocked"]
    out = world.probe(blocked, tmp_path / "alone.db")
    assert out.returncode == 0, out.stderr[-2000:]
    got = {v["target"]: v for v in json.loads(out.stdout)["verdicts"]}
    assert {t: got[t]["status"] for t in blocked} == dict.fromkeys(blocked, "inconclusive")
