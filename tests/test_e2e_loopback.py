"""End-to-end ``kzprobe run`` against the loopback test network (issue 2: no control helper).

Two resolvers play the parts of the ISP's (per-name misbehaviour) and a public one (always
right); where a verdict needs a contrast, the public resolver's TLS-validated answer is it.
Every case is one target of one ``kzprobe run`` subprocess, so the whole matrix costs one
measurement round; the expected verdicts come from how the network was built (conftest), never
from kzprobe's own output.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kzprobe.model import FOLLOWUP, MEASURE, PROBE
from kzprobe.storage import Store

# name, scheme -> (status, mechanism, detail).  detail None: not part of the contract.
CASES: dict[tuple[str, str], tuple[str, str | None, str | None]] = {
    ("ok.test", "https"): ("ok", None, None),
    ("ok.test", "http"): ("ok", None, None),
    # NXDOMAIN at the ISP; the public resolver's answer validates by TLS: that is the contrast.
    ("nx.test", "https"): ("blocked", "dns", "dns.nxdomain"),
    # The ISP points at a server whose certificate is for another name; public gives the origin.
    ("poison.test", "https"): ("blocked", "dns", None),
    # SYNs dropped everywhere and no control at all: a lone failure is never "blocked".
    ("tcptimeout.test", "https"): ("inconclusive", None, None),
    ("tlsreset.test", "https"): ("blocked", "dpi", "dpi.tls_reset"),
    ("tlsstall.test", "https"): ("blocked", "dpi", "dpi.tls_timeout"),
    ("httpreset.test", "http"): ("blocked", "dpi", "dpi.http_reset"),
    # Beyond issue 2's list: an ISP answer unlike the public one that validates by TLS (a CDN)
    # is fine, and a chain from the national interception CA needs no control to be named.
    ("cdn.test", "https"): ("ok", None, None),
    ("mitm.test", "https"): ("blocked", "dpi", "dpi.tls_mitm"),
    ("servfail.test", "https"): ("blocked", "dns", "dns.servfail"),
}


def _urls(net: Any) -> list[str]:
    return [net.url(name, scheme) for name, scheme in CASES]


@pytest.fixture(scope="module")
def two_resolvers(loopnet: Any, loopnet_lib: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = loopnet_lib.run_kzprobe(loopnet, _urls(loopnet), tmp_path_factory.mktemp("e2e") / "two.db")
    assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def isp_only(loopnet: Any, loopnet_lib: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = loopnet_lib.run_kzprobe(loopnet, [loopnet.url("nx.test"), loopnet.url("tlsreset.test")],
                                  tmp_path_factory.mktemp("e2e") / "isp.db", resolvers=(loopnet.isp.spec,))
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize(("name", "scheme"), list(CASES), ids=[f"{s}-{n}" for n, s in CASES])
def test_verdict(two_resolvers: Any, loopnet: Any, name: str, scheme: str) -> None:
    status, mechanism, detail = CASES[(name, scheme)]
    v = two_resolvers.verdicts[loopnet.url(name, scheme)]
    assert (v["status"], v["mechanism"]) == (status, mechanism), v
    if detail is not None:
        assert v["detail"] == detail, v
    assert v["domain"] == name
    assert v["evidence"]["sentence"]
    assert 0 < v["confidence"] <= 1


def test_connect_timeout_is_never_blocked(two_resolvers: Any, loopnet: Any) -> None:
    """The failure really was a connect timeout, seen twice (sandwich), and still not blocked."""
    url = loopnet.url("tcptimeout.test")
    store = Store(two_resolvers.db)
    tcp = [o for o in store.observations(store.latest_run_id() or 0, url) if o.step == "tcp"]
    assert len(tcp) >= 2
    assert {o.failure for o in tcp} == {"generic_timeout_error"}
    assert two_resolvers.verdicts[url]["status"] != "blocked"


def test_nxdomain_at_the_only_resolver_is_inconclusive(isp_only: Any, loopnet: Any) -> None:
    v = isp_only.verdicts[loopnet.url("nx.test")]
    assert (v["status"], v["mechanism"]) == ("inconclusive", None), v
    # The follow-up on the same address is contrast enough for DPI, even with a single resolver.
    v = isp_only.verdicts[loopnet.url("tlsreset.test")]
    assert (v["status"], v["mechanism"], v["detail"]) == ("blocked", "dpi", "dpi.tls_reset"), v


def test_middlebox_saw_the_triggers(two_resolvers: Any, loopnet: Any) -> None:
    """The DPI verdicts come from *our* middlebox acting on the probe's SNI / Host, and the
    follow-up with the benign name went through it untouched."""
    seen = set(loopnet.middlebox.seen)
    for name, action in (("tlsreset.test", "rst"), ("tlsstall.test", "stall"), ("httpreset.test", "rst")):
        assert ("127.0.0.2", name, action) in seen
    assert ("127.0.0.2", "example.com", "forward") in seen


def test_evidence_points_at_stored_observations(two_resolvers: Any, loopnet: Any) -> None:
    store = Store(two_resolvers.db)
    rid = store.latest_run_id()
    assert rid is not None
    by_id = {o.id: o for o in store.observations(rid)}
    for url, v in two_resolvers.verdicts.items():
        ids = v["evidence"]["observations"]
        if v["status"] != "ok" or ids:
            assert ids, v
        for i in ids:
            assert i in by_id, (url, i)
            assert by_id[i].target == url
    # The DPI evidence is the reset handshake *and* the benign follow-up that completed.
    tls = [by_id[i] for i in two_resolvers.verdicts[loopnet.url("tlsreset.test")]["evidence"]["observations"]]
    assert any(o.step == "tls" and o.purpose == MEASURE and o.failure == "connection_reset"
               and o.data.get("sni") == "tlsreset.test" and o.vantage == PROBE for o in tls)
    assert any(o.step == "tls" and o.purpose == FOLLOWUP and o.ok and o.data.get("sni") == "example.com"
               for o in tls)
    http = [by_id[i] for i in two_resolvers.verdicts[loopnet.url("httpreset.test", "http")]["evidence"]["observations"]]
    assert any(o.step == "http" and o.failure == "connection_reset" for o in http)
    assert any(o.step == "http" and o.purpose == FOLLOWUP and o.ok and o.data.get("host") == "example.com"
               for o in http)
    nx = [by_id[i] for i in two_resolvers.verdicts[loopnet.url("nx.test")]["evidence"]["observations"]]
    assert nx and all(o.step == "dns" and o.failure == "dns_nxdomain_error"
                      and o.data.get("resolver") == loopnet.isp.spec for o in nx)


def test_verdicts_command_shows_the_same(two_resolvers: Any, loopnet_lib: Any) -> None:
    p = subprocess.run([*loopnet_lib.kzprobe_exe(), "verdicts", "--db", str(two_resolvers.db), "--format", "json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    stored = {v["target"]: v for v in json.loads(p.stdout)["verdicts"]}
    assert stored.keys() == two_resolvers.verdicts.keys()
    for url, v in two_resolvers.verdicts.items():
        for key in ("status", "mechanism", "detail", "rule", "confidence", "evidence"):
            assert stored[url][key] == v[key], (url, key)


# --- durability ----------------------------------------------------------------------------------
def _start_long_run(net: Any, lib: Any, db: Path) -> subprocess.Popen[str]:
    """A run over tarpit targets (TLS never answers): it lasts far longer than the test waits."""
    targets = db.with_suffix(".txt")
    targets.write_text("".join(net.url(n) + "\n" for n in lib.TARPIT_NAMES), encoding="utf-8")
    cmd = [*lib.kzprobe_exe(), "run", "--targets", str(targets), "--no-system-resolver", "--ca-bundle",
           str(net.ca_pem), "--db", str(db), "--format", "json", "--no-progress", "--timeout", "8",
           "--source-address", lib.CENSORED_SOURCE, "--resolver", net.isp.spec, "--resolver", net.public.spec]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _count_observations(db: Path) -> int:
    """Read as another process would, while the run is writing (WAL lets readers in)."""
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute("SELECT count(*) FROM observations").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _wait_for_observations(proc: subprocess.Popen[str], db: Path, limit: float = 15.0) -> int:
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < limit:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        n = _count_observations(db)
        if n and time.monotonic() - t0 > 1.0:
            return n
        time.sleep(0.1)
    raise AssertionError(f"no observation committed after {limit} s")


def test_kill_9_keeps_committed_observations(loopnet: Any, loopnet_lib: Any, tmp_path: Path) -> None:
    db = tmp_path / "killed.db"
    proc = _start_long_run(loopnet, loopnet_lib, db)
    try:
        seen = _wait_for_observations(proc, db)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    store = Store(db)
    rid = store.latest_run_id()
    assert rid is not None
    info = store.run(rid)
    assert info is not None and info.state == "abandoned"  # it never got to finish, and its process is gone
    obs = store.observations(rid)
    assert len(obs) >= seen
    assert {o.step for o in obs} >= {"dns"}
    assert all(o.target in {loopnet.url(n) for n in loopnet_lib.TARPIT_NAMES} for o in obs)
    # A killed run is still readable: verdicts are classified from what was stored.
    p = subprocess.run([*loopnet_lib.kzprobe_exe(), "verdicts", "--db", str(db), "--format", "json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    vs = json.loads(p.stdout)["verdicts"]
    assert len(vs) == len(loopnet_lib.TARPIT_NAMES)
    assert not [v for v in vs if v["status"] == "blocked"]


@pytest.fixture(scope="module")
def interrupted(loopnet: Any, loopnet_lib: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[subprocess.Popen[str], str, Path, int]:
    """One run interrupted by SIGINT (what Ctrl-C sends) once it has committed observations."""
    db = tmp_path_factory.mktemp("sigint") / "interrupted.db"
    proc = _start_long_run(loopnet, loopnet_lib, db)
    try:
        seen = _wait_for_observations(proc, db)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc, err, db, seen


def test_ctrl_c_keeps_observations(interrupted: tuple[subprocess.Popen[str], str, Path, int]) -> None:
    _proc, _err, db, seen = interrupted
    store = Store(db)
    rid = store.latest_run_id()
    assert rid is not None
    assert len(store.observations(rid)) >= seen


def test_ctrl_c_exits_130_and_marks_the_run_interrupted(
        interrupted: tuple[subprocess.Popen[str], str, Path, int], loopnet_lib: Any) -> None:
    proc, err, db, _seen = interrupted
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    store = Store(db)
    rid = store.latest_run_id()
    assert rid is not None
    info = store.run(rid)
    assert info is not None and info.state == "interrupted"
    assert len(store.verdicts(rid)) == len(loopnet_lib.TARPIT_NAMES)
