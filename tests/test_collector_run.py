"""`kzprobe run --upload URL`: the run never waits on the collector, and what it measured arrives
once, with the collector's verdicts equal to the volunteer's (loopback simulator)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from kzprobe.tests.support.collector import (
    Collector,
    add_token,
    collected_seqs,
    free_port,
    kz,
    local_ids,
    token_file,
)
from kzprobe.tests.support.loopnet import LoopNet

NAMES = ("ok.test", "nx.test", "tlsreset.test")


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    c = Collector(db=str(tmp_path / "collector.db"), port=free_port(), log=tmp_path / "collector.log")
    yield c
    c.stop()


def _wait_closed(db: str, network: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(db) as c:
                if c.execute("SELECT count(*) FROM runs WHERE state != 'running' AND network_name = ?",
                             (network,)).fetchone()[0]:
                    return
        except sqlite3.OperationalError:
            pass
        time.sleep(0.2)
    raise AssertionError("the background upload did not finish")


@pytest.mark.slow
def test_run_upload_in_background_and_after_the_collector_was_down(
        tmp_path: Path, collector: Collector, loopnet: LoopNet, loopnet_lib: ModuleType,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # the background upload's log goes there
    tok = add_token(collector.db, "alice")
    tokf = token_file(tmp_path, tok)
    urls = [loopnet.url(n) for n in NAMES]
    # 1. The collector is down: the run finishes as fast as without --upload, and keeps everything.
    down_db = tmp_path / "down.db"
    t0 = time.monotonic()
    out = loopnet_lib.run_kzprobe(loopnet, urls, down_db, "--upload", collector.url, "--upload-token-file", tokf)
    assert out.returncode == 0, out.stderr
    assert "in the background" in out.stderr
    assert time.monotonic() - t0 < 60
    # 2. The collector comes up; a later upload sends what was measured while it was down.
    collector.start()
    p = kz("upload", "--db", str(down_db), "--token-file", tokf, collector.url)
    assert p.returncode == 0, p.stderr
    assert collected_seqs(collector.db) == local_ids(down_db)
    # 3. With the collector up, `run --upload` alone gets the run there (token from the environment).
    monkeypatch.setenv("KZPROBE_UPLOAD_TOKEN", tok)
    up_db = tmp_path / "up.db"
    out = loopnet_lib.run_kzprobe(loopnet, urls, up_db, "--upload", collector.url, "--network-name", "LoopISP")
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(collected_seqs(collector.db)) < 2:
        time.sleep(0.2)
    want = {**local_ids(down_db), **local_ids(up_db)}
    while time.monotonic() < deadline and collected_seqs(collector.db) != want:
        time.sleep(0.2)
    assert collected_seqs(collector.db) == want
    _wait_closed(collector.db, "LoopISP")
    # The collector's own classification of the uploaded observations agrees with the volunteer's.
    with sqlite3.connect(collector.db) as c:
        [(run_id,)] = c.execute("SELECT id FROM runs WHERE network_name = 'LoopISP'").fetchall()
        theirs = {t: (s, m, d) for t, s, m, d in c.execute(
            "SELECT target, status, mechanism, detail FROM verdicts WHERE run_id = ?", (run_id,))}
    with sqlite3.connect(up_db) as c:  # the volunteer's verdicts as stored
        mine = {t: (st, m, d) for t, st, m, d in c.execute("SELECT target, status, mechanism, detail FROM verdicts")}
    assert {t: v["status"] for t, v in out.verdicts.items()} == {t: v[0] for t, v in mine.items()}
    assert theirs == mine and len(mine) == len(NAMES)
