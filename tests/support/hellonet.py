"""A two-namespace network where a kernel rule resets the Tor-like ClientHello (issue 15).

Used by tests/test_lab_hellos.py and to record fixtures/pcaps/hello-fingerprint.pcap::

    python -m kzprobe.tests.support.hellonet record fixtures/pcaps/hello-fingerprint        # as root
    python -m kzprobe.tests.support.hellonet record fixtures/pcaps/hello-fingerprint-drop drop

Layout: two namespaces joined by one veth pair and nothing else (no link to the root namespace,
no default route), lab addresses from 198.51.100.0/24:

================  ===========================================================================
client ns         198.51.100.1: runs the probe (tor-or://198.51.100.2:9001) and tcpdump
server ns         198.51.100.2: a TLS server on OpenSSL (socat OPENSSL-LISTEN, fork), RSA link
                  certificate with a random Tor-like name; INPUT rule ``-m string --algo bm
                  --hex-string |DPI_SIGNATURE|`` -> ``REJECT --reject-with tcp-reset`` (or DROP)
================  ===========================================================================

Why socat and not ``openssl s_server``: s_server serves one connection at a time, and a reset
ClientHello leaves its side of the connection open for ever (the hello never reaches it), so the
browser-like follow-up would queue behind it and time out.  socat forks per connection and still
speaks TLS through OpenSSL.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from kzprobe.probes.hellos import DPI_SIGNATURE, tor_sni

CLIENT_ADDR = "198.51.100.1"
SERVER_ADDR = "198.51.100.2"
OR_PORT = 9001
URL = f"tor-or://{SERVER_ADDR}:{OR_PORT}"


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def missing() -> str | None:
    """Why this network cannot be built here (None: it can)."""
    import os

    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "iptables", "socat", "tcpdump"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@dataclass
class HelloNet:
    client: str
    server: str
    tmp: Path

    def exec(self, ns: str, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], text=True, capture_output=True, **kw)

    def dpi(self, on: bool = True, action: str = "reset") -> None:
        """Add (or remove) the fingerprint rule on the server's INPUT chain: "reset" the Tor-like
        hello (REJECT with a TCP reset) or "drop" it (the client's retransmissions too)."""
        hexsig = "|" + DPI_SIGNATURE.hex() + "|"
        verdict = ["REJECT", "--reject-with", "tcp-reset"] if action == "reset" else ["DROP"]
        rule = ["-p", "tcp", "--dport", str(OR_PORT), "-m", "string", "--algo", "bm", "--hex-string", hexsig,
                "-j", *verdict]
        _run("ip", "netns", "exec", self.server, "iptables", "-A" if on else "-D", "INPUT", *rule)

    def probe(self, timeout: float = 3.0) -> list[dict[str, Any]]:
        """Measure tor-or://SERVER:9001 from the client namespace with kzprobe's engine; the observations."""
        code = (
            "import json, sys, trio\n"
            "from kzprobe.model import Target\n"
            "from kzprobe.probes.engine import Engine, ProbeConfig\n"
            "seen = []\n"
            "async def sink(o):\n"
            "    o.id = len(seen) + 1\n"
            "    seen.append(o.to_dict())\n"
            "async def main():\n"
            f"    async with Engine(ProbeConfig(system_resolver=False, timeout={timeout}), sink) as e:\n"
            f"        await e.measure(Target({URL!r}))\n"
            "trio.run(main)\n"
            "json.dump(seen, sys.stdout)\n"
        )
        out = self.exec(self.client, sys.executable, "-c", code, timeout=60)
        if out.returncode:
            raise RuntimeError(f"probe failed: {out.stderr.strip()[-2000:]}")
        got: list[dict[str, Any]] = json.loads(out.stdout)
        return got


def _wait_listening(net: HelloNet, deadline: float) -> None:
    while time.monotonic() < deadline:
        ss = net.exec(net.server, "ss", "-Htln", f"sport = :{OR_PORT}")
        if ss.stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError("the TLS server did not listen")


@contextlib.contextmanager
def hellonet(tmp: Path | None = None) -> Iterator[HelloNet]:
    """Build the network (unique namespace names per call) and tear it down, whatever happens."""
    tag = secrets.token_hex(3)
    client, server = f"kzhc{tag}", f"kzhs{tag}"
    tmpdir = Path(tmp) if tmp else Path(tempfile.mkdtemp(prefix="kzhello"))
    procs: list[subprocess.Popen[bytes]] = []
    created: list[str] = []
    try:
        for ns in (client, server):
            _run("ip", "netns", "add", ns)
            created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # Created inside the client namespace, the pair never touches the root namespace.
        _run("ip", "-n", client, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", server)
        _run("ip", "-n", client, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "veth0")
        _run("ip", "-n", server, "addr", "add", f"{SERVER_ADDR}/24", "dev", "veth1")
        _run("ip", "-n", client, "link", "set", "veth0", "up")
        _run("ip", "-n", server, "link", "set", "veth1", "up")
        # A Tor relay's link certificate: self-signed-style, random www.*.net name, RSA.
        ca = trustme.CA(key_type=trustme.KeyType.RSA)
        name = tor_sni().replace(".com", ".net")
        leaf = ca.issue_cert(name, key_type=trustme.KeyType.RSA)
        pem = tmpdir / "relay.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", server, "socat",
             f"OPENSSL-LISTEN:{OR_PORT},bind={SERVER_ADDR},reuseaddr,fork,cert={pem},verify=0",
             "SYSTEM:cat >/dev/null"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        net = HelloNet(client, server, tmpdir)
        _wait_listening(net, time.monotonic() + 10)
        yield net
    finally:
        for p in procs:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in created:
            # socat's forked children hold sockets in the namespace: end them first.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    import os
                    import signal

                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if tmp is None:
            shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def capture(net: HelloNet, out: Path) -> Iterator[None]:
    """tcpdump on the client's veth into ``out`` (pcap), stopped cleanly after the block."""
    # --immediate-mode: without it packets wait in the kernel's buffer, and those still there when
    # tcpdump is stopped are lost (a first recording ended in the middle of the second flow).
    proc = subprocess.Popen(["ip", "netns", "exec", net.client, "tcpdump", "-i", "veth0", "--immediate-mode", "-U",
                             "-s", "0", "-w", str(out), "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # tcpdump needs a moment before it sees packets
        yield
        time.sleep(1.0)  # let the last packets reach the file before tcpdump is stopped
    finally:
        proc.terminate()
        proc.wait(10)


def record(stem: Path, action: str = "reset") -> None:
    """Record STEM.pcap with the probe's tor-or measurement under the fingerprint rule ("reset" or
    "drop"), and STEM.expected.json with the verdict this construction must give."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with hellonet() as net:
        net.dpi(True, action)
        with capture(net, stem.with_suffix(".pcap")):
            obs = net.probe()
    sni = next(o["data"]["sni"] for o in obs if o["step"] == "tls")
    target = "-j REJECT --reject-with tcp-reset" if action == "reset" else "-j DROP"
    expected = {
        "recorded_with": f"python -m kzprobe.tests.support.hellonet record {stem} {action}",
        "construction": (f"client {CLIENT_ADDR} -- veth -- server {SERVER_ADDR}:{OR_PORT} (socat, OpenSSL, RSA); "
                         f"server INPUT: iptables -m string --algo bm --hex-string |{DPI_SIGNATURE.hex()}| "
                         f"{target}; probe: tor-or:// with a 3 s timeout (Tor-like hello, browser-like "
                         "follow-up, Tor-like again), all with SNI " + sni),
        "verdicts": {sni: {"status": "blocked", "mechanism": "dpi", "detail": "dpi.tls_fingerprint"}},
        "live_observations": [{k: o[k] for k in ("step", "purpose", "attempt", "failure")} |
                              {"hello": o["data"].get("hello")} for o in obs],
    }
    stem.with_suffix(".expected.json").write_text(json.dumps(expected, indent=2) + "\n", "utf-8")


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[0] != "record" or argv[2:] not in ([], ["reset"], ["drop"]):
        print("usage: python -m kzprobe.tests.support.hellonet record STEM [reset|drop]", file=sys.stderr)
        return 2
    why = missing()
    if why:
        print(f"hellonet: {why}", file=sys.stderr)
        return 1
    record(Path(argv[1]), *argv[2:])
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    raise SystemExit(main(sys.argv[1:]))
