"""Collector test helpers: real `kzprobe collector` processes on loopback, volunteers' databases
with synthetic contract-valid observations, and the comparisons the fault tests make.
Used by tests/test_collector*.py and bench/collector.py."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from kzprobe.model import Observation, Target
from kzprobe.storage import Store

KZ = [sys.executable, "-m", "kzprobe.cli"]
ENV = {**os.environ, "NO_COLOR": "1"}
for _k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    ENV.pop(_k, None)


def kz(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KZ, *args], capture_output=True, text=True, timeout=timeout, env=env or ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Collector:
    db: str
    port: int
    proc: subprocess.Popen[str] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str) -> Collector:
        assert self.log is not None
        self.proc = subprocess.Popen([*KZ, "collector", "--db", self.db, "--listen", f"127.0.0.1:{self.port}",
                                      *extra], stdout=subprocess.DEVNULL, stderr=self.log.open("a"), text=True,
                                     env=ENV)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1, trust_env=False).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError("collector did not start: " + self.log.read_text())

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def add_token(db: str, name: str) -> str:
    p = kz("collector", "--db", db, "token", "add", name)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def token_file(tmp_path: Path, token: str, name: str = "token") -> str:
    f = tmp_path / name
    f.write_text(token + "\n")
    f.chmod(0o600)
    return str(f)


def volunteer_db(path: Path, runs: int = 1, per_run: int = 50, network: str = "KazNet", state: str = "done") -> Store:
    """A volunteer's database with synthetic but contract-valid observations."""
    store = Store(path)
    for _r in range(runs):
        rid = store.new_run(vantage={"network_name": network, "asn": "AS9198", "country": "KZ",
                                     "resolvers": ["198.51.100.53"]})
        urls = [f"https://site{i}.example/" for i in range(max(1, per_run // 4))]
        store.add_targets(rid, [Target(u) for u in urls])
        obs = []
        for i in range(per_run):
            u = urls[i % len(urls)]
            host = u.split("/")[2]
            if i % 2:
                obs.append(Observation("dns", u, host, t_start=i, t_end=i + 0.1,
                                       data={"rcode": "NOERROR", "addresses": ["203.0.113.7"], "qtype": "A"}))
            else:
                obs.append(Observation("tcp", u, host, address="203.0.113.7", port=443, t_start=i,
                                       t_end=i + 0.2, failure=None if i % 3 else "generic_timeout_error"))
        for k in range(0, len(obs), 500):
            store.add_observations(rid, obs[k:k + 500])
        if state != "running":
            store.finish_run(rid, state=state)
    return store


def local_ids(path: Path) -> dict[str, list[int]]:
    with sqlite3.connect(path) as c:
        out: dict[str, list[int]] = {}
        for uid, oid in c.execute("SELECT r.uid, o.id FROM observations o JOIN runs r ON r.id = o.run_id "
                                  "ORDER BY o.id"):
            out.setdefault(uid, []).append(oid)
        return out


def collected_seqs(db: str) -> dict[str, list[int]]:
    with sqlite3.connect(db) as c:
        out: dict[str, list[int]] = {}
        for uid, seq in c.execute("SELECT r.uid, o.seq FROM observations o JOIN runs r ON r.id = o.run_id "
                                  "ORDER BY o.run_id, o.seq"):
            out.setdefault(uid, []).append(seq)
        return out


def count(db: str, table: str) -> int:
    with sqlite3.connect(db) as c:
        return int(c.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


