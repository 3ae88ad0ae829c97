"""End-to-end ``kzprobe run --helper`` on the loopback network (issue 3, acceptance 1).

The probe sits "inside" the censored network: it queries only the ISP resolver and connects from
127.0.0.2, the source the middlebox interferes with.  The control helper runs as its own process
on 127.0.0.60, resolves with the public resolver and connects from 127.0.0.1, so it sees the
genuine sites.  One ``kzprobe run`` measures the whole matrix; the expected verdicts are written
from how the network was built, not from kzprobe's output.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kzprobe.storage import Store

# (name, scheme) -> (status, mechanism, detail); detail None: not part of the contract.
CASES: dict[tuple[str, str], tuple[str, str | None, str | None]] = {
    ("ok.test", "https"): ("ok", None, None),
    ("nx.test", "https"): ("blocked", "dns", "dns.nxdomain"),
    # 0.0.0.0: a bogon the probe can safely connect to (it stays on this host).  On a loopback
    # network the genuine answer is a bogon too, so the rule may name it plain poisoning.
    ("bogon.test", "https"): ("blocked", "dns", None),
    ("dnsblockpage.test", "http"): ("blocked", "dns", "dns.blockpage"),
    # Over HTTPS the blockpage server's certificate is for another name, so no page is fetched:
    # still DNS (the answer is unlike control's and does not validate), whatever the detail.
    ("dnsblockpage.test", "https"): ("blocked", "dns", None),
    ("servfail.test", "https"): ("blocked", "dns", "dns.servfail"),
    # Silence over UDP and TCP alike: two timeouts, while control resolves.
    ("silent.test", "https"): ("blocked", "dns", "dns.timeout"),
    ("injected.test", "https"): ("blocked", "dns", "dns.injected"),
    ("tlsreset.test", "https"): ("blocked", "dpi", "dpi.tls_reset"),
    ("tlsstall.test", "https"): ("blocked", "dpi", "dpi.tls_timeout"),
    ("httpreset.test", "http"): ("blocked", "dpi", "dpi.http_reset"),
    ("injectpage.test", "http"): ("blocked", "dpi", "dpi.blockpage"),
    ("mitm.test", "https"): ("blocked", "dpi", "dpi.tls_mitm"),
    # The ISP resolver gives a CDN edge, control the origin; the edge's certificate validates.
    ("cdn.test", "https"): ("ok", None, None),
    ("slow.test", "https"): ("ok", None, None),
    ("down.test", "https"): ("down", None, None),
    # SYNs dropped for everyone (full accept queue): control times out too, so down, not blocked/ip.
    ("tcptimeout.test", "https"): ("down", None, None),
    # A certificate nobody trusts, served to probe and control alike: broken for everyone.
    ("badcert.test", "https"): ("down", None, None),
}

#: Cases where kzprobe is wrong today (see the reasons); strict, so fixing the bug turns them red.
KNOWN_BUGS: dict[tuple[str, str], str] = {}

HELPER_ADDR = "127.0.0.60"
TIMEOUT = 2.0


@pytest.fixture(scope="module")
def helper(loopnet: Any, loopnet_lib: Any) -> Iterator[str]:
    """``kzprobe helper`` as a subprocess; its URL once it says it listens."""
    cmd = [*loopnet_lib.kzprobe_exe(), "helper", "--listen", f"{HELPER_ADDR}:0", "--allow-private",
           "--ca-bundle", str(loopnet.ca_pem), "--resolver", loopnet.public.spec, "--timeout", str(TIMEOUT)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def drain() -> None:
        # Keep reading for the helper's whole life so a full pipe never blocks it.
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"listening on (https?://\S+)", line)
            if m and not url:
                url.append(m.group(1).rstrip("/"))
                found.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not found.is_set() and proc.poll() is None:
        found.wait(0.1)
    try:
        if not url:
            pytest.skip("kzprobe helper did not start: " + "".join(lines)[-500:].strip())
        yield url[0]
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def with_helper(loopnet: Any, loopnet_lib: Any, helper: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    urls = [loopnet.url(name, scheme) for name, scheme in CASES]
    out = loopnet_lib.run_kzprobe(loopnet, urls, tmp_path_factory.mktemp("control") / "helper.db",
                                  "--helper", helper, resolvers=(loopnet.isp.spec,), timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize(("name", "scheme"), [
    pytest.param(n, s, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[(n, s)])) if (n, s) in KNOWN_BUGS
    else (n, s) for n, s in CASES], ids=[f"{s}-{n}" for n, s in CASES])
def test_verdict_with_helper(with_helper: Any, loopnet: Any, name: str, scheme: str) -> None:
    status, mechanism, detail = CASES[(name, scheme)]
    v = with_helper.verdicts[loopnet.url(name, scheme)]
    assert (v["status"], v["mechanism"]) == (status, mechanism), v
    if detail is not None:
        assert v["detail"] == detail, v
    assert v["evidence"]["sentence"]


def test_control_was_measured_from_outside(with_helper: Any, loopnet: Any) -> None:
    """Control observations are stored, and the helper reached the sites the probe could not."""
    store = Store(with_helper.db)
    rid = store.latest_run_id()
    assert rid is not None
    obs = store.observations(rid)
    control = [o for o in obs if o.vantage == "control"]
    assert {o.target for o in control} == {loopnet.url(n, s) for n, s in CASES}
    # The helper resolved nx.test with the public resolver, and its connections passed the middlebox.
    nx = [o for o in control if o.target == loopnet.url("nx.test") and o.step == "dns" and o.ok]
    assert nx and "127.0.10.1" in nx[0].data["addresses"]
    seen = set(loopnet.middlebox.seen)
    assert ("127.0.0.1", "tlsreset.test", "forward") in seen
    assert ("127.0.0.2", "tlsreset.test", "rst") in seen


def test_mitm_evidence_names_the_national_ca(with_helper: Any, loopnet: Any, loopnet_lib: Any) -> None:
    v = with_helper.verdicts[loopnet.url("mitm.test")]
    assert loopnet_lib.MITM_ORG in v["evidence"]["sentence"]


def test_no_helper_and_no_doh_is_inconclusive(loopnet: Any, loopnet_lib: Any, tmp_path: Path) -> None:
    """The NXDOMAIN case is blocked/dns with a helper (above); with control unreachable it must not be."""
    out = loopnet_lib.run_kzprobe(loopnet, [loopnet.url("nx.test")], tmp_path / "nocontrol.db",
                                  "--helper", "http://127.0.0.61:1", "--doh", "https://127.0.0.62:1/dns-query",
                                  resolvers=(loopnet.isp.spec,), timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    v = out.verdicts[loopnet.url("nx.test")]
    assert (v["status"], v["mechanism"]) == ("inconclusive", None), v


# --- blocked/ip: SYNs from the probe dropped (root: iptables on lo) ----------------------------------
@contextlib.contextmanager
def _drop_syns(src: str, dst: str, port: int) -> Iterator[None]:
    tag = f"kzprobe-test-{os.getpid()}"
    spec = ["INPUT", "-i", "lo", "-s", src, "-d", dst, "-p", "tcp", "--dport", str(port), "--syn",
            "-m", "comment", "--comment", tag, "-j", "DROP"]
    subprocess.run(["iptables", "-w", "-I", *spec], check=True, capture_output=True, timeout=30)
    try:
        yield
    finally:
        # Remove every copy, even if something inserted it twice.
        for _ in range(5):
            if subprocess.run(["iptables", "-w", "-D", *spec], capture_output=True, timeout=30).returncode:
                break


def test_dropped_connect_is_blocked_ip(loopnet: Any, loopnet_lib: Any, helper: str, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (iptables)")
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed")
    probe = subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True, text=True, timeout=30)
    if probe.returncode:
        pytest.skip(f"iptables unusable here: {probe.stderr.strip()[:200]}")
    url = loopnet.url("dropped.test")
    with _drop_syns(loopnet_lib.CENSORED_SOURCE, loopnet_lib.DROP_ORIGIN, loopnet.https_port):
        out = loopnet_lib.run_kzprobe(loopnet, [url], tmp_path / "dropped.db", "--helper", helper,
                                      resolvers=(loopnet.isp.spec,), timeout=TIMEOUT)
    leftover = subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True, text=True, timeout=30)
    assert f"kzprobe-test-{os.getpid()}" not in leftover.stdout
    assert out.returncode == 0, out.stderr
    v = out.verdicts[url]
    assert (v["status"], v["mechanism"]) == ("blocked", "ip"), v
    store = Store(out.db)
    obs = store.observations(store.latest_run_id() or 0, url)
    assert [o.failure for o in obs if o.step == "tcp" and o.vantage == "probe"] == ["generic_timeout_error"] * 2
    assert any(o.ok for o in obs if o.step == "tcp" and o.vantage == "control")
