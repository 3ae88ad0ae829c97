"""The collector end to end: real `kzprobe collector` processes on loopback, real uploads.

Faults (kill -9 of either side, a collector down while measuring) must leave every observation
stored exactly once; bad input (401 / 413 / 400) must store nothing.  Expected contents come from
the local database the test wrote, never from the collector's answers.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kzprobe.tests.support.collector import (
    ENV,
    KZ,
    Collector,
    add_token,
    collected_seqs,
    count,
    free_port,
    kz,
    local_ids,
    token_file,
    volunteer_db,
)


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    c = Collector(db=str(tmp_path / "collector.db"), port=free_port(), log=tmp_path / "collector.log")
    yield c
    c.stop()


# --- happy path and idempotency ---------------------------------------------------------------
def test_upload_stores_everything_once_and_attributes_to_the_token_name(tmp_path: Path,
                                                                        collector: Collector) -> None:
    tok = add_token(collector.db, "alice")
    collector.start()
    vol = tmp_path / "vol.db"
    volunteer_db(vol, runs=2, per_run=40).close()
    p = kz("upload", "--db", str(vol), "--token-file", token_file(tmp_path, tok), collector.url)
    assert p.returncode == 0, p.stderr
    assert collected_seqs(collector.db) == local_ids(vol)
    again = kz("upload", "--db", str(vol), "--token-file", token_file(tmp_path, tok), collector.url)
    assert again.returncode == 0 and "0 observation(s) stored" in again.stderr
    assert count(collector.db, "observations") == 80
    with sqlite3.connect(collector.db) as c:
        rows = c.execute("SELECT submitter, network_name, state, vantage, classifier_version FROM runs").fetchall()
        assert {r[0] for r in rows} == {"alice"} and {r[1] for r in rows} == {"KazNet"}
        assert {r[2] for r in rows} == {"done"}
        assert all("resolvers" not in json.loads(r[3]) for r in rows)  # addresses stay home
        assert all(r[4] for r in rows)
        assert c.execute("SELECT count(*) FROM verdicts WHERE classifier_version IS NULL").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM verdicts").fetchone()[0] == 20  # 10 targets x 2 runs
    st = kz("upload", "--db", str(vol), "--status", collector.url)
    assert st.returncode == 0 and "0 observation(s) and 0 run(s) not yet closed" in st.stderr
    assert collector.log is not None
    logged = [line for line in collector.log.read_text().splitlines() if "listening on" not in line]
    assert logged and not any("127.0.0.1" in line for line in logged)  # no client address logged


def test_log_addresses_logs_them(tmp_path: Path, collector: Collector) -> None:
    collector.start("--log-addresses")
    assert httpx.get(f"{collector.url}/v1/health", trust_env=False).status_code == 200
    assert collector.log is not None
    time.sleep(0.2)
    logged = [line for line in collector.log.read_text().splitlines() if "listening on" not in line]
    assert any("127.0.0.1 GET /v1/health -> 200" in line for line in logged), logged


def _obs_json(seq: int, **over: Any) -> dict[str, Any]:
    d = {"seq": seq, "step": "dns", "target": "https://a.example/", "domain": "a.example", "t_start": 1.0,
         "t_end": 1.1, "data": {"rcode": "NOERROR", "addresses": ["203.0.113.1"]}}
    d.update(over)
    return d


def test_retried_batch_is_not_stored_twice(tmp_path: Path, collector: Collector) -> None:
    tok = add_token(collector.db, "bob")
    collector.start()
    h = {"authorization": f"Bearer {tok}", "content-type": "application/json"}
    uid = str(uuid.uuid4())
    with httpx.Client(base_url=collector.url, headers=h, trust_env=False) as c:
        opened = c.post("/v1/runs", json={"uid": uid, "software_version": "0.1.0", "started": 1.0})
        assert opened.status_code == 200 and opened.json()["acked"] == 0
        batch = {"observations": [_obs_json(i) for i in (1, 2, 3)]}
        first = c.post(f"/v1/runs/{uid}/observations", json=batch)
        second = c.post(f"/v1/runs/{uid}/observations", json=batch)
        assert (first.json()["stored"], second.json()["stored"], second.json()["duplicates"]) == (3, 0, 3)
        reopened = c.post("/v1/runs", json={"uid": uid, "software_version": "0.1.0", "started": 1.0})
        assert reopened.json()["acked"] == 3
        closed = [c.post(f"/v1/runs/{uid}/close", json={"ended": 2.0, "state": "done"}) for _ in range(2)]
        assert [r.json()["verdicts"] for r in closed] == [1, 1]  # one target; a retried close is not a second set
        late = c.post(f"/v1/runs/{uid}/observations", json={"observations": [_obs_json(4)]})
        assert late.status_code == 409  # a closed run takes no new observations ...
        assert c.post(f"/v1/runs/{uid}/observations", json=batch).json()["duplicates"] == 3  # ... but retries pass
    assert count(collector.db, "observations") == 3 and count(collector.db, "runs") == 1
    assert count(collector.db, "verdicts") == 1


# --- bad input: 401 / 413 / 400, nothing stored -------------------------------------------------
def test_bad_input_is_refused_and_nothing_is_stored(tmp_path: Path, collector: Collector) -> None:
    tok = add_token(collector.db, "carol")
    revoked = add_token(collector.db, "mallory")
    assert kz("collector", "--db", collector.db, "token", "revoke", "mallory").returncode == 0
    collector.start("--max-body", "1")
    uid = str(uuid.uuid4())
    good = {"authorization": f"Bearer {tok}", "content-type": "application/json"}
    with httpx.Client(base_url=collector.url, trust_env=False) as c:
        open_body = {"uid": uid, "software_version": "0.1.0", "started": 1.0}
        for auth in (None, "Bearer nope", f"Bearer {tok[:-1]}x", f"Bearer {revoked}", f"Basic {tok}"):
            hdr = {"content-type": "application/json", **({"authorization": auth} if auth else {})}
            r = c.post("/v1/runs", json=open_body, headers=hdr)
            assert r.status_code == 401, (auth, r.text)
        assert count(collector.db, "runs") == 0
        assert c.post("/v1/runs", json=open_body, headers=good).status_code == 200

        def refused(body: bytes, status: int) -> str:
            r = c.post(f"/v1/runs/{uid}/observations", content=body, headers=good)
            assert r.status_code == status, r.text
            reason = r.json()["error"]
            assert "\n" not in reason and len(reason) < 300
            return str(reason)

        assert "not valid JSON" in refused(b'{"observations": [', 400)
        # One type-wrong field in the middle of a batch: the whole batch is refused.
        batch = [_obs_json(i) for i in range(1, 11)]
        batch[5]["data"] = {"addresses": "203.0.113.1"}  # typed by contract.py
        assert "observations[5].data.addresses" in refused(json.dumps({"observations": batch}).encode(), 400)
        batch[5] = _obs_json(6, port="443")
        assert "observations[5].port" in refused(json.dumps({"observations": batch}).encode(), 400)
        batch[5] = {**_obs_json(6), "seq": True}
        assert "seq" in refused(json.dumps({"observations": batch}).encode(), 400)
        batch[5] = _obs_json(6, vantage="helper")
        assert "vantage" in refused(json.dumps({"observations": batch}).encode(), 400)
        batch[5] = _obs_json(6, failure="x" * 201)
        assert "failure" in refused(json.dumps({"observations": batch}).encode(), 400)
        batch[5] = _obs_json(5)  # the same seq twice
        assert "twice" in refused(json.dumps({"observations": batch}).encode(), 400)
        big = [_obs_json(i, data={"rcode": "NOERROR", "body_head": "x" * 900}) for i in range(1, 1500)]
        assert "over" in refused(json.dumps({"observations": big}).encode(), 413)
        assert count(collector.db, "observations") == 0
        # ... and a bad open: unknown vantage key (an address would otherwise be stored).
        r = c.post("/v1/runs", json={**open_body, "uid": str(uuid.uuid4()), "vantage": {"ip": "198.51.100.9"}},
                   headers=good)
        assert r.status_code == 400 and "unknown field" in r.json()["error"]
        assert count(collector.db, "runs") == 1
        # Another volunteer cannot write into carol's run, nor learn that it exists.
        other = add_token(collector.db, "dave")
        r = c.post(f"/v1/runs/{uid}/observations", json={"observations": [_obs_json(1)]},
                   headers={**good, "authorization": f"Bearer {other}"})
        assert r.status_code == 404
    assert count(collector.db, "observations") == 0


def test_type_wrong_data_key_refuses_the_batch_via_the_contract() -> None:
    from kzprobe.collector.wire import BadBody, parse_batch

    batch = [_obs_json(i) for i in range(1, 4)]
    batch[1]["data"] = {"rcode": "NOERROR", "addresses": [1, 2]}
    with pytest.raises(BadBody, match=r"observations\[1\]\.data\.addresses"):
        parse_batch(json.dumps({"observations": batch}).encode())


def test_token_cli_lists_names_and_never_stores_the_token(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    tok = add_token(db, "erin")
    assert tok.startswith("kzp_")
    dup = kz("collector", "--db", db, "token", "add", "erin")
    assert dup.returncode == 1 and "already" in dup.stderr
    listed = kz("collector", "--db", db, "token", "list")
    assert "erin" in listed.stdout and "active" in listed.stdout and tok not in listed.stdout
    raw = Path(db).read_bytes() + (Path(db + "-wal").read_bytes() if Path(db + "-wal").exists() else b"")
    assert tok.encode() not in raw and tok.split("_")[2].encode() not in raw
    assert kz("collector", "--db", db, "token", "revoke", "erin").returncode == 0
    assert "revoked" in kz("collector", "--db", db, "token", "list").stdout
    bad = kz("collector", "--db", db, "token", "add", "bad name")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1


# --- faults: kill -9 on either side, collector down while measuring ---------------------------
def _upload_proc(vol: Path, tokf: str, url: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*KZ, "upload", "--db", str(vol), "--token-file", tokf, "--batch", "100",
                             "--max-delay", "0.5", "--tries", "60", *extra, url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for_rows(db: str, at_least: int, proc: subprocess.Popen[str], timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            n = count(db, "observations")
        except sqlite3.OperationalError:
            n = 0
        if n >= at_least:
            return n
        assert proc.poll() is None, "upload finished before the fault could be injected"
        time.sleep(0.01)
    raise AssertionError("upload made no progress")


@pytest.mark.slow
def test_kill9_collector_mid_upload_then_restart(tmp_path: Path, collector: Collector) -> None:
    tok = add_token(collector.db, "alice")
    collector.start()
    vol = tmp_path / "vol.db"
    volunteer_db(vol, runs=2, per_run=3000).close()
    up = _upload_proc(vol, token_file(tmp_path, tok), collector.url)
    seen = _wait_for_rows(collector.db, 300, up)
    collector.kill9()
    assert 0 < seen < 6000
    time.sleep(1.0)  # the uploader meets a dead collector and backs off
    collector.start()
    _out, err = up.communicate(timeout=240)
    assert up.returncode == 0, err
    assert collected_seqs(collector.db) == local_ids(vol)  # every id once, none missing, none extra
    assert count(collector.db, "observations") == 6000


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_kill9_uploader_mid_upload_then_upload_again(tmp_path: Path, collector: Collector, sig: int) -> None:
    tok = add_token(collector.db, "alice")
    collector.start()
    vol = tmp_path / "vol.db"
    volunteer_db(vol, runs=1, per_run=6000).close()
    tokf = token_file(tmp_path, tok)
    up = _upload_proc(vol, tokf, collector.url)
    _wait_for_rows(collector.db, 500, up)
    up.send_signal(sig)
    _out, err = up.communicate(timeout=30)
    if sig == signal.SIGINT:  # Ctrl-C: one line, no traceback
        assert up.returncode != 0 and "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    partial = count(collector.db, "observations")
    assert 0 < partial < 6000
    p = kz("upload", "--db", str(vol), "--token-file", tokf, collector.url)
    assert p.returncode == 0, p.stderr
    assert collected_seqs(collector.db) == local_ids(vol)
    assert count(collector.db, "observations") == 6000


def test_measured_while_collector_down_uploads_later(tmp_path: Path, collector: Collector) -> None:
    tok = add_token(collector.db, "alice")
    vol = tmp_path / "vol.db"
    volunteer_db(vol, runs=1, per_run=30).close()
    tokf = token_file(tmp_path, tok)
    down = kz("upload", "--db", str(vol), "--token-file", tokf, "--tries", "2", "--max-delay", "0.1", collector.url)
    assert down.returncode == 75 and "nothing is lost" in down.stderr
    st = kz("upload", "--db", str(vol), "--status", collector.url)
    assert "0/30 acknowledged" in st.stdout
    collector.start()
    up = kz("upload", "--db", str(vol), "--token-file", tokf, collector.url)
    assert up.returncode == 0, up.stderr
    assert collected_seqs(collector.db) == local_ids(vol)


def test_token_only_from_file_or_environment(tmp_path: Path, collector: Collector) -> None:
    vol = tmp_path / "vol.db"
    volunteer_db(vol, runs=1, per_run=4).close()
    p = kz("upload", "--db", str(vol), collector.url)
    assert p.returncode == 2 and "--token-file" in p.stderr
    tok = add_token(collector.db, "frank")
    collector.start()
    p = kz("upload", "--db", str(vol), collector.url, env={**ENV, "KZPROBE_UPLOAD_TOKEN": tok})
    assert p.returncode == 0, p.stderr
    assert count(collector.db, "observations") == 4


# --- the same on PostgreSQL ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[Any]:
    from kzprobe.storage.pgcluster import ClusterUnavailable, throwaway_cluster, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL: {reason}")
    try:
        with throwaway_cluster() as cluster:
            yield cluster
    except ClusterUnavailable as exc:
        pytest.skip(f"PostgreSQL cannot start here: {exc}")


def _pg_seqs(url: str) -> dict[str, list[int]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as c:
            out: dict[str, list[int]] = {}
            for uid, seq in c.execute(text("SELECT r.uid, o.seq FROM observations o JOIN runs r ON r.id = o.run_id "
                                           "ORDER BY o.run_id, o.seq")):
                out.setdefault(uid, []).append(seq)
            return out
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.slow
def test_postgresql_collector_kill9_mid_upload(tmp_path: Path, pg_cluster: Any) -> None:
    url = pg_cluster.create_database()
    c = Collector(db=url, port=free_port(), log=tmp_path / "collector.log")
    tok = add_token(url, "alice")
    c.start()
    try:
        vol = tmp_path / "vol.db"
        volunteer_db(vol, runs=2, per_run=3000).close()
        up = _upload_proc(vol, token_file(tmp_path, tok), c.url)
        deadline = time.monotonic() + 60
        while sum(map(len, _pg_seqs(url).values())) < 500:
            assert time.monotonic() < deadline and up.poll() is None
            time.sleep(0.05)
        c.kill9()
        time.sleep(1.0)
        c.start()
        _out, err = up.communicate(timeout=240)
        assert up.returncode == 0, err
        assert _pg_seqs(url) == local_ids(vol)
        again = kz("upload", "--db", str(vol), "--token-file", token_file(tmp_path, tok), c.url)
        assert again.returncode == 0 and "0 observation(s) stored" in again.stderr
        assert _pg_seqs(url) == local_ids(vol)
    finally:
        c.stop()
