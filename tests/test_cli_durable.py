"""Runs that survive anything: SIGKILL and SIGTERM at random moments, then ``--resume``.

Over the loopback test network (tests/conftest.py).  The expected outcome comes from an
uninterrupted run of the same list, and from how the network is built (which names it serves
and how), never from what an interrupted run happened to print.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kzprobe.storage import Store

# Names whose outcome does not depend on timing (no timeouts raced against each other); a few of
# each kind so that a run lasts a few seconds at --concurrency 4.
NAMES = ("ok.test", "nx.test", "poison.test", "cdn.test", "down.test", "tlsreset.test", "httpreset.test",
         "injectpage.test", "mitm.test", "bogon.test", "dnsblockpage.test", "badcert.test",
         "servfail.test")
KILLS = 10


def _cmd(net: Any, lib: Any, db: Path, *extra: str) -> list[str]:
    cmd = [*lib.kzprobe_exe(), "run", "--no-system-resolver", "--ca-bundle", str(net.ca_pem), "--db", str(db),
           "--format", "json", "--no-progress", "--timeout", "1.5", "--concurrency", "4",
           "--source-address", lib.CENSORED_SOURCE, "--resolver", net.isp.spec, "--resolver", net.public.spec]
    return cmd + list(extra)


def _env() -> dict[str, str]:
    env = {**os.environ, "NO_COLOR": "1"}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(k, None)
    return env


def _targets_file(net: Any, tmp: Path) -> Path:
    f = tmp / "targets.txt"
    f.write_text("".join(net.url(n) + "\n" for n in NAMES), encoding="utf-8")
    return f


def _run_exists(db: Path) -> bool:
    if not db.exists():
        return False
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT count(*) FROM targets").fetchone()[0] > 0
        finally:
            con.close()
    except sqlite3.Error:
        return False


def _statuses(store: Store, rid: int) -> dict[str, tuple[str, str | None]]:
    return {v.target: (v.status, v.detail) for v in store.verdicts(rid)}


def _attempt_keys(store: Store, rid: int) -> Counter[tuple[Any, ...]]:
    """One key per step of one measurement: the same key twice means a target measured twice."""
    keys: Counter[tuple[Any, ...]] = Counter()
    for o in store.observations(rid):
        d = o.data or {}
        keys[(o.target, o.step, o.vantage, o.purpose, o.attempt, o.address, o.port, d.get("resolver"),
              d.get("transport"), d.get("qtype"), d.get("hop"), d.get("hello"), o.domain)] += 1
    return keys


@pytest.fixture(scope="module")
def baseline(loopnet: Any, loopnet_lib: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any],
                                                                                                 float, Counter[Any]]:
    tmp = tmp_path_factory.mktemp("durable-baseline")
    db = tmp / "base.db"
    t0 = time.monotonic()
    p = subprocess.run(_cmd(loopnet, loopnet_lib, db, "--targets", str(_targets_file(loopnet, tmp))),
                       capture_output=True, text=True, timeout=120, env=_env())
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    store = Store(db)
    rid = store.latest_run_id()
    assert rid is not None
    keys = _attempt_keys(store, rid)
    assert max(keys.values()) == 1, "the key must tell steps apart within one measurement"
    return _statuses(store, rid), took, Counter(k[0] for k in keys)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_runs_resume_to_the_uninterrupted_result(sig: signal.Signals, baseline: tuple[dict[str, Any], float,
                                                                                              Counter[Any]],
                                                        loopnet: Any, loopnet_lib: Any, tmp_path: Path) -> None:
    expected, took, _ = baseline
    assert set(expected) == {loopnet.url(n) for n in NAMES}
    rng = random.Random(int(sig) * 7919)
    targets = _targets_file(loopnet, tmp_path)
    for i in range(KILLS):
        db = tmp_path / f"k{i}.db"
        proc = subprocess.Popen(_cmd(loopnet, loopnet_lib, db, "--targets", str(targets)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env())
        try:
            deadline = time.monotonic() + 30
            while not _run_exists(db):  # the run's rows exist: from here on it must survive anything
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(rng.uniform(0, took * 0.9))
            proc.send_signal(sig)
            _out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert "Traceback" not in err, err[-3000:]
        store = Store(db)
        rid = store.latest_run_id()
        assert rid is not None
        info = store.run(rid)
        assert info is not None
        if info.state == "done":  # the signal landed after every target was measured
            assert info.n_measured == len(NAMES) and _statuses(store, rid) == expected
            continue
        want = "abandoned" if sig == signal.SIGKILL else "interrupted"
        assert info.state == want, (i, info.state, err[-2000:])
        assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), (i, proc.returncode)
        store.close()
        # Even with every target measured, a run killed before it was written up needs --resume.
        p = subprocess.run(_cmd(loopnet, loopnet_lib, db, "--resume"), capture_output=True, text=True,
                           timeout=120, env=_env())
        assert p.returncode == 0, (i, p.stderr[-2000:])
        out = json.loads(p.stdout)
        assert out["run"]["id"] == rid and out["run"]["state"] == "done" and out["run"]["not_measured"] == 0
        store = Store(db)
        assert store.latest_run_id() == rid, "--resume appends to the same run"
        info = store.run(rid)
        assert info is not None and info.state == "done" and info.n_measured == len(NAMES)
        assert _statuses(store, rid) == expected, i
        keys = _attempt_keys(store, rid)
        twice = [k for k, n in keys.items() if n > 1]
        assert not twice, (i, twice[:3])
        store.close()


def test_deadline_run_says_what_was_not_measured(loopnet: Any, loopnet_lib: Any, tmp_path: Path) -> None:
    # Tarpit targets never answer TLS: none can complete within a 1 s deadline.
    f = tmp_path / "tarpit.txt"
    f.write_text("".join(loopnet.url(n) + "\n" for n in loopnet_lib.TARPIT_NAMES[:6]), encoding="utf-8")
    db = tmp_path / "d.db"
    p = subprocess.run(_cmd(loopnet, loopnet_lib, db, "--targets", str(f), "--deadline", "1", "--timeout", "8"),
                       capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == 3, p.stderr
    assert "6 of 6 target(s) not measured" in p.stderr
    out = json.loads(p.stdout)
    assert out["run"]["state"] == "deadline"
    assert {v["status"] for v in out["verdicts"]} == {"not_measured"}
    assert out["counts"] == {"not_measured": 6}
    # Never exported as a measurement.
    e = subprocess.run([*loopnet_lib.kzprobe_exe(), "export", "--db", str(db), "--format", "ooni"],
                       capture_output=True, text=True, timeout=60)
    assert e.returncode == 0, e.stderr
    assert e.stdout.strip() == ""


def test_order_is_the_list_order_or_the_seed(tmp_path: Path) -> None:
    """--shuffle SEED is reproducible and differs from the list order; without it the list order."""
    from click.testing import CliRunner

    from kzprobe.cli import main

    f = tmp_path / "t.txt"
    names = [f"https://site{i}.example/" for i in range(30)]
    f.write_text("\n".join(names) + "\n", encoding="utf-8")
    import random as _r

    shuffled = list(names)
    _r.Random(42).shuffle(shuffled)
    assert shuffled != names
    # The stored order is what a resume follows: check it through the run's target rows.
    for extra, want in (([], names), (["--shuffle", "42"], shuffled)):
        db = tmp_path / f"o{len(extra)}.db"
        res = CliRunner().invoke(main, ["run", "--targets", str(f), "--db", str(db), "--no-progress",
                                        "--no-system-resolver", "--deadline", "1", "--timeout", "0.1",
                                        "--format", "jsonl", *extra])
        assert res.exit_code in (0, 3), res.output
        store = Store(db)
        rid = store.latest_run_id()
        assert rid is not None
        assert [t.url for t in store.targets(rid)] == want


def test_internal_error_is_one_line_with_a_log_and_the_run_failed(tmp_path: Path) -> None:
    """A bug (here: the store breaking under the writer) is one line naming a log that holds the
    traceback; the run is marked failed, not left running."""
    f = tmp_path / "t.txt"
    f.write_text("https://a.example/\n", encoding="utf-8")
    db = tmp_path / "f.db"
    code = ("import sys\nfrom kzprobe.storage import Store\n"
            "def broken(self, run_id, urls):\n    raise RuntimeError('simulated bug in the writer')\n"
            "Store.mark_measured = broken\nfrom kzprobe.cli import main\nmain()\n")
    p = subprocess.run([sys.executable, "-c", code, "run", "--targets", str(f), "--db", str(db), "--no-progress",
                        "--no-system-resolver", "--timeout", "0.2", "--format", "jsonl"], capture_output=True,
                       text=True, timeout=60, env={**_env(), "XDG_STATE_HOME": str(tmp_path / "state")})
    assert p.returncode == 70, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "internal error: RuntimeError: simulated bug in the writer" in lines[0], lines
    log = Path(lines[0].split("traceback in ", 1)[1].split(";", 1)[0])
    assert log.is_file() and log.is_relative_to(tmp_path / "state")
    assert "Traceback" in log.read_text("utf-8") and "simulated bug" in log.read_text("utf-8")
    store = Store(db)
    rid = store.latest_run_id()
    assert rid is not None
    info = store.run(rid)
    assert info is not None and info.state == "failed"
