"""Schema migrations: a database written by kzprobe 0.1.0 upgrades in place without loss, the
second upgrade is a no-op, and the migrations build exactly the models' schema (SQLite and a
real PostgreSQL)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from kzprobe.storage import StorageError, Store
from kzprobe.storage.models import HEAD_REVISION, Base
from kzprobe.storage.pgcluster import Cluster, ClusterUnavailable, throwaway_cluster, unavailable_reason
from kzprobe.storage.upgrade import alembic_config, script_head, upgrade

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "db" / "kzprobe-0.1.0.db"
PG_REASON = unavailable_reason()
TABLES = ("runs", "targets", "observations", "verdicts", "traces")


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl as an unprivileged user, Unix socket only),
    stopped when the module's tests are done; skipped with the reason where it cannot run."""
    if PG_REASON is not None:
        pytest.skip(f"no PostgreSQL: {PG_REASON}")
    try:
        with throwaway_cluster() as cluster:
            yield cluster
    except ClusterUnavailable as exc:
        pytest.skip(f"PostgreSQL cannot start here: {exc}")


def _dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as c:
        out = {}
        for t in TABLES:
            cols = [r[1] for r in c.execute(f"PRAGMA table_info({t})")]
            keep = [col for col in cols if col in _V1_COLUMNS[t]]
            out[t] = c.execute(f"SELECT {', '.join(keep)} FROM {t} ORDER BY id").fetchall()
        return out


# The 0.1.0 columns, spelled out here (from that release's models), so that the comparison does
# not depend on the code under test.
_V1_COLUMNS = {
    "runs": {"id", "source", "software", "software_version", "started", "ended", "state", "vantage", "options"},
    "targets": {"id", "run_id", "url", "domain", "category", "claim"},
    "observations": {"id", "run_id", "target", "step", "vantage", "source", "domain", "address", "port",
                     "t_start", "t_end", "failure", "purpose", "attempt", "data", "packets"},
    "verdicts": {"id", "run_id", "target", "domain", "status", "mechanism", "detail", "rule", "confidence",
                 "sentence", "observations", "packets"},
    "traces": {"id", "run_id", "target", "result"},
}


@pytest.fixture
def old_db(tmp_path: Path) -> Path:
    dst = tmp_path / "old.db"
    shutil.copy(FIXTURE, dst)
    return dst


def test_fixture_is_a_0_1_0_database() -> None:
    with sqlite3.connect(f"file:{FIXTURE}?mode=ro", uri=True) as c:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "alembic_version" not in tables
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("1",)
        assert c.execute("SELECT count(*) FROM observations").fetchone() == (10,)


def test_new_code_refuses_old_db_with_the_command_to_run(old_db: Path) -> None:
    with pytest.raises(StorageError, match="kzprobe db upgrade"):
        Store(old_db)


def test_upgrade_keeps_everything_and_is_a_noop_the_second_time(old_db: Path) -> None:
    before = _dump(old_db)
    cli = [sys.executable, "-m", "kzprobe.cli", "db", "upgrade", "--db", str(old_db)]
    first = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "upgraded from schema 0001 to " + HEAD_REVISION in first.stdout
    assert _dump(old_db) == before  # every 0.1.0 row and value, unchanged
    with sqlite3.connect(old_db) as c:
        schema1 = c.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
        runs = c.execute("SELECT uid, network_name, asn, country, vantage FROM runs ORDER BY id").fetchall()
        positions = c.execute("SELECT run_id, position FROM targets ORDER BY id").fetchall()
    assert len({r[0] for r in runs}) == 2 and all(len(r[0]) == 36 for r in runs)
    for _uid, net, asn, country, vantage in runs:  # the new columns carry the old JSON's values
        v = json.loads(vantage)
        assert (net, asn, country) == (v["network_name"], v["asn"], v["country"])
    assert positions == [(1, 0), (1, 1), (2, 0), (2, 1)]

    second = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "nothing to do" in second.stdout
    with sqlite3.connect(old_db) as c:
        assert c.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema1
    assert _dump(old_db) == before

    store = Store(old_db)  # the new code reads the old runs
    try:
        assert [len(store.observations(r.id)) for r in store.runs()] == [5, 5]
        assert [v.rule for v in store.verdicts(1)] == ["dns.nxdomain", "ok.http"]
        assert store.traces(2) == [{"target": "https://blocked.example/", "hop": 3}]
    finally:
        store.close()


def test_head_revision_matches_the_migrations() -> None:
    assert script_head() == HEAD_REVISION


def _diff_against_models(url: str) -> list[Any]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_migrations_from_scratch_equal_the_models_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert upgrade(url).after == HEAD_REVISION
    assert _diff_against_models(url) == []


def test_upgraded_old_db_equals_the_models(old_db: Path) -> None:
    upgrade(f"sqlite:///{old_db}")
    assert _diff_against_models(f"sqlite:///{old_db}") == []


@pytest.mark.postgres
def test_migrations_on_postgresql_from_0001_with_data(pg_cluster: Cluster) -> None:
    from alembic import command
    from sqlalchemy import text

    url = pg_cluster.create_database()
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")  # type: ignore[arg-type]
        conn.execute(text("INSERT INTO runs (source, software, software_version, started, state, vantage, options) "
                          "VALUES ('live', 'kzprobe', '0.1.0', 1.0, 'done', :v, '{}')"),
                     {"v": json.dumps({"network_name": "KazNet", "asn": "AS9198", "country": "KZ"})})
        conn.execute(text("INSERT INTO targets (run_id, url, domain, category) VALUES (1, 'http://a/', 'a', '')"))
    engine.dispose()
    result = upgrade(url)
    assert (result.before, result.after) == ("0001", HEAD_REVISION)
    assert upgrade(url).changed is False
    assert _diff_against_models(url) == []
    store = Store(url)
    try:
        [run] = store.runs()
        assert run.vantage["network_name"] == "KazNet" and run.n_targets == 1
    finally:
        store.close()


def test_upgrade_of_a_file_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"not sqlite at all" * 100)
    p = subprocess.run([sys.executable, "-m", "kzprobe.cli", "db", "upgrade", "--db", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.startswith("Error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
