"""``kzprobe lab run --collector`` for a multi-ISP scenario: a collector in the world namespace
backed by a throwaway PostgreSQL cluster, every volunteer uploading to it, and the collector's
verdicts compared with each volunteer's local ones, target by target (issue 12, acceptance 1; the
same path as tests/test_lab_collector.py).

The cluster listens on a Unix socket in the root namespace; the collector inside the world reaches
it through the socket's path (a path is not bound to a network namespace).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from typing import Any

from kzprobe.lab.multi import MultiLab
from kzprobe.lab.topology import LabError

PORT = 8790
KZ = [sys.executable, "-m", "kzprobe.cli"]


def start(m: MultiLab, db_url: str) -> tuple[str, dict[str, list[str]], dict[str, dict[str, str]]]:
    """One token per volunteer, the collector in the world; (its URL, each ISP's extra ``kzprobe run``
    options, each ISP's environment)."""
    extra: dict[str, list[str]] = {}
    env: dict[str, dict[str, str]] = {}
    url = f"http://{m.collector_address}:{PORT}"
    for c, (isp, chain) in enumerate(m.chains, 1):
        p = subprocess.run([*KZ, "collector", "--db", db_url, "token", "add", f"volunteer{c}"],
                           capture_output=True, text=True, timeout=120)
        if p.returncode:
            raise LabError(f"collector token add failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        tok = chain.state_dir / "collector-token"
        tok.touch(mode=0o600)
        tok.write_text(p.stdout.strip() + "\n")
        extra[isp.name] = ["--upload", url, "--upload-token-file", str(tok)]
        # The background upload's log goes under XDG_DATA_HOME: keep it in the chain's state.
        env[isp.name] = {"XDG_DATA_HOME": str(chain.state_dir / "xdg")}
    proc = m.world.popen("world", [*KZ, "collector", "--db", db_url, "--listen", f"{m.collector_address}:{PORT}"],
                         "collector")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if m.world.exec("world", ["curl", "-sf", "-m", "2", f"{url}/v1/health"], capture_output=True).returncode == 0:
            return url, extra, env
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    log = (m.world.state_dir / "collector.log").read_text(errors="replace").strip().splitlines()
    raise LabError(f"the collector did not start in the world: {(log or ['no log'])[-1]}")


def local_verdicts(m: MultiLab) -> dict[str, dict[str, tuple[Any, ...]]]:
    """Each volunteer's stored verdicts by ISP name and target: (status, mechanism, detail)."""
    out: dict[str, dict[str, tuple[Any, ...]]] = {}
    for isp, chain in m.chains:
        with sqlite3.connect(chain.state_dir / "run.db") as c:
            out[isp.name] = {t: (st, mech, d) for t, st, mech, d in
                             c.execute("SELECT target, status, mechanism, detail FROM verdicts")}
    return out


def collector_verdicts(db_url: str, networks: set[str], timeout: float = 120
                       ) -> dict[str, dict[str, tuple[Any, ...]]]:
    """The collector's verdicts by network and target, once every network's run is closed (the
    volunteers' background uploads have ended); LabError naming the missing ones otherwise."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        deadline = time.monotonic() + timeout
        done: set[str] = set()
        while time.monotonic() < deadline:
            with engine.connect() as c:
                done = {n for (n,) in c.execute(text("SELECT network_name FROM runs WHERE state != 'running'"))}
            if networks <= done:
                break
            time.sleep(0.3)
        else:
            raise LabError(f"uploads did not finish within {timeout:.0f}s: no closed run for "
                           f"{', '.join(sorted(networks - done))}")
        out: dict[str, dict[str, tuple[Any, ...]]] = {}
        with engine.connect() as c:
            for net, target, status, mech, detail in c.execute(text(
                    "SELECT r.network_name, v.target, v.status, v.mechanism, v.detail "
                    "FROM verdicts v JOIN runs r ON r.id = v.run_id")):
                out.setdefault(net, {})[target] = (status, mech, detail)
        return out
    finally:
        engine.dispose()


def annotate(rows: list[dict[str, Any]], local: dict[str, dict[str, tuple[Any, ...]]],
             remote: dict[str, dict[str, tuple[Any, ...]]]) -> None:
    """Add to each row the collector's verdict and whether it equals the volunteer's stored one (pure)."""
    for r in rows:
        mine, theirs = local.get(r["isp"], {}).get(r["target"]), remote.get(r["isp"], {}).get(r["target"])
        r["collector"] = None if theirs is None else dict(zip(("status", "mechanism", "detail"), theirs, strict=True))
        r["collector_match"] = mine is not None and mine == theirs
