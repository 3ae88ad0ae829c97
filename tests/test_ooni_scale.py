"""The OONI archive import at scale: layout, filters, parallel and Dask runs, idempotence, kill -9.

The archive is built by ``bench/ooni_synth.py`` from the 20 real QA measurements, so what each
filter must keep is known from how it was built (country, network and start time are functions
of the measurement's index), not from kzprobe's output.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from kzprobe.cli import main
from kzprobe.ooni.archive import Filters
from kzprobe.ooni.pipeline import import_archive
from kzprobe.storage import Store

ROOT = Path(__file__).resolve().parent.parent
QA = ROOT.parent / "shared" / "ooni-qa"
pytestmark = pytest.mark.skipif(not QA.is_dir(), reason="needs ../shared/ooni-qa (the shared data folder)")


def _synth() -> Any:
    spec = importlib.util.spec_from_file_location("ooni_synth", ROOT / "bench" / "ooni_synth.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SYNTH = _synth()
N = 600
DAYS = 3


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    files = list(SYNTH.generate(root, N, days=DAYS, qa=QA, per_file=40))
    assert len(files) > 20  # hours x countries, several files each
    return root


def dump(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in id order: what 'identical imports' means."""
    st = Store(db)
    out = {}
    with st.engine.connect() as c:
        for table, order in (("runs", "id"), ("targets", "id"), ("observations", "id"), ("verdicts", "id"),
                             ("ooni_imports", "key")):
            out[table] = [tuple(r) for r in c.execute(text(f"SELECT * FROM {table} ORDER BY {order}"))]
    st.close()
    return out


def _import(db: Path, paths: list[Path], **kw: Any) -> Any:
    st = Store(db)
    try:
        return import_archive(paths, st, kw.pop("filters", Filters()), **kw)
    finally:
        st.close()


def test_expected_counts_and_parallel_equals_single(archive: Path, tmp_path: Path) -> None:
    one = _import(tmp_path / "one.db", [archive], workers=1, batch=64)
    two = _import(tmp_path / "two.db", [archive], workers=2, batch=64)
    assert one.imported == two.imported == N and one.problems == 0
    # 20 QA templates: by construction 7 of them are ok (see test_ooni_import's table).
    assert dump(tmp_path / "one.db") == dump(tmp_path / "two.db")
    assert sum(n for k, n in one.by_network.items() if k.startswith("AS9198 ")) == \
        sum(1 for i in range(N) if SYNTH.NETWORKS[(i // 7) % len(SYNTH.NETWORKS)][1] == "AS9198")


def test_reimport_is_a_no_op(archive: Path, tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    first = _import(db, [archive], workers=1)
    before = {k: len(v) for k, v in dump(db).items()}
    again = _import(db, [archive], workers=2)
    assert first.imported == N and again.imported == 0 and again.duplicates == N
    assert {k: len(v) for k, v in dump(db).items()} == before


@pytest.mark.parametrize("kw", [
    {"countries": frozenset({"KZ"})},
    {"asns": frozenset({"AS21299", "AS8193"})},
    {"since": datetime(2024, 2, 2, tzinfo=UTC), "until": datetime(2024, 2, 3, 6, tzinfo=UTC)},
    {"countries": frozenset({"KZ"}), "since": datetime(2024, 2, 2, 12, tzinfo=UTC)},
    {"test": "tor"},
])
def test_filters_keep_what_the_archive_was_built_with(archive: Path, tmp_path: Path, kw: dict[str, Any]) -> None:
    f = Filters(**kw)
    expected = 0
    for i in range(N):
        t, cc, _ = SYNTH.measurement([("x", "")], i, N, DAYS)
        _, asn, _ = SYNTH.NETWORKS[(i // 7) % len(SYNTH.NETWORKS)]
        expected += bool((not f.countries or cc in f.countries) and (not f.asns or asn in f.asns)
                         and (not f.since or t >= f.since) and (not f.until or t < f.until)
                         and f.test == "web_connectivity")
    s = _import(tmp_path / "f.db", [archive], filters=f, workers=1)
    assert s.imported == expected
    assert s.problems == 0


def test_dask_local_cluster_rows_equal_single_process(archive: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    _import(tmp_path / "single.db", [archive], workers=1)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  host="127.0.0.1") as cluster:
        s = _import(tmp_path / "dask.db", [archive], scheduler=cluster.scheduler_address)
    assert s.imported == N
    assert dump(tmp_path / "dask.db") == dump(tmp_path / "single.db")


def test_bad_lines_are_reported_and_skipped(tmp_path: Path) -> None:
    m = json.loads((QA / "successWithHTTPS.json").read_text())
    good = json.dumps(m)
    kz = json.dumps({**m, "probe_cc": "KZ"})
    d = tmp_path / "raw" / "20240212" / "20" / "IT" / "webconnectivity"
    d.mkdir(parents=True)
    f = d / "2024021220_IT_webconnectivity.n0.0.jsonl.gz"
    nested = "[" * 100000 + "]" * 100000
    with gzip.open(f, "wt") as fh:
        fh.write("\n".join([good, "{oops", nested, kz, ""]))
    cut = d / "2024021220_IT_webconnectivity.n0.1.jsonl.gz"
    cut.write_bytes(f.read_bytes()[:-40])  # a can that breaks off
    res = CliRunner().invoke(main, ["import-ooni", str(tmp_path), "--db", str(tmp_path / "k.db"),
                                    "--format", "jsonl"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert f"{f}:2: not JSON" in res.stderr
    assert f"{f}:3: nested too deeply" in res.stderr
    assert f"{cut}:" in res.stderr and "cannot read past here" in res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    # The good line and the KZ copy of it from the first can; the second can's lines repeat them.
    assert len(lines) == 2 and {v["status"] for v in lines} == {"ok"}


def _count(db: Path) -> int:
    """Measurements committed so far, read with a bare sqlite3 connection (fast enough to poll)."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as c:
            return int(c.execute("SELECT count(*) FROM ooni_imports").fetchone()[0])
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_kill_9_then_rerun_equals_one_clean_import(tmp_path: Path) -> None:
    root = tmp_path / "big"
    list(SYNTH.generate(root, 3000, days=2, qa=QA, per_file=200))
    clean = tmp_path / "clean.db"
    _import(clean, [root], workers=1)
    db = tmp_path / "killed.db"
    cmd = [sys.executable, "-m", "kzprobe.cli", "import-ooni", str(root), "--db", str(db), "--format", "jsonl",
           "--workers", "2", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while _count(db) < 200 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the import finished before it could be killed; make the archive larger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _count(db)
    assert 0 < done < 3000
    res = CliRunner().invoke(main, ["import-ooni", str(root), "--db", str(db), "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    assert f"already stored {done}" in res.stderr
    assert dump(db) == dump(clean)


def test_parquet_out_holds_the_same_rows_as_the_database(archive: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    db = tmp_path / "k.db"
    _import(db, [archive], workers=1)
    out = tmp_path / "pq"
    res = CliRunner().invoke(main, ["import-ooni", str(archive), "--out", str(out), "--workers", "2",
                                    "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    verdicts = pq.read_table(out / "verdicts").to_pylist()
    observations = pq.read_table(out / "observations")
    rows = dump(db)
    assert len(verdicts) == len(rows["verdicts"]) == N
    assert observations.num_rows == len(rows["observations"])
    st = Store(db)
    with st.engine.connect() as c:
        stored = sorted(c.execute(text(
            "SELECT k.key, v.status, v.rule FROM verdicts v JOIN ooni_imports k ON k.run_id = v.run_id")))
    st.close()
    assert sorted((v["key"], v["status"], v["rule"]) for v in verdicts) == stored
    # Evidence positions point at observations of the same measurement.
    seqs: dict[str, int] = {}
    for key, seq in zip(observations.column("key").to_pylist(), observations.column("seq").to_pylist(), strict=True):
        seqs[key] = max(seqs.get(key, 0), seq)
    assert all(0 < p <= seqs[v["key"]] for v in verdicts for p in v["evidence"])
