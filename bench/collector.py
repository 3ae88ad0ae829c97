"""Benchmark: observations uploaded through ``kzprobe collector`` against a direct SQLAlchemy bulk
insert of the same rows, into PostgreSQL and into SQLite, in the same run.

    python bench/collector.py [--n 1000000] [--uploaders 4] [--batch 1000] [--backend postgresql sqlite]

1. Writes ``--n`` synthetic, contract-valid observations into ``--uploaders`` volunteer SQLite
   databases (one run each), as ``kzprobe run`` would have stored them.
2. Direct: reads them back in batches and inserts them with SQLAlchemy Core (``session.execute(
   insert(ObservationRow.__table__), rows)``: the insertmanyvalues fast path) into a fresh database.
3. Collector: starts ``kzprobe collector`` on loopback backed by a fresh database and runs the
   uploaders in parallel processes (kzprobe's Uploader: read, JSON, HTTP, contract validation,
   ON CONFLICT insert), then checks that exactly ``--n`` observations arrived.
Prints observations/s for both, the ratio (collector / direct), and the peak RSS of the collector
process, of the uploaders and of the direct insert.  PostgreSQL is a throwaway cluster (initdb +
pg_ctl on a Unix socket, as an unprivileged user when run as root), with default durability.
Goals on this 2-core machine: ratio >= 0.5 and >= 5,000 observations/s into PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import resource
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from kzprobe.storage import Store
from kzprobe.storage.models import ObservationRow
from kzprobe.tests.support.collector import ENV, KZ, Collector, free_port

_COLS = ("run_id", "target", "step", "vantage", "source", "domain", "address", "port", "t_start", "t_end",
         "failure", "purpose", "attempt", "data", "packets")


def make_volunteer_db(path: Path, n: int, seed: int) -> None:
    store = Store(path)
    # Left "running": the timed upload is the observations' ingest; closing (the collector then
    # classifies the run) is timed separately after it.
    rid = store.new_run(vantage={"network_name": f"ISP{seed}", "asn": f"AS{64500 + seed}", "country": "KZ"})
    store.close()
    rows = []
    for i in range(n):
        site = f"https://site{(seed * 7919 + i) % 5000}.example/"
        host = site.split("/")[2]
        if i % 2:
            rows.append((rid, site, "dns", "probe", "live", host, None, None, i * 0.001, i * 0.001 + 0.05, None,
                         "measure", 0, json.dumps({"rcode": "NOERROR", "qtype": "A", "resolver": "198.51.100.53",
                                                   "addresses": ["203.0.113.7"]}), "[]"))
        else:
            rows.append((rid, site, "tcp", "probe", "live", host, "203.0.113.7", 443, i * 0.001, i * 0.001 + 0.02,
                         "generic_timeout_error" if i % 10 == 0 else None, "measure", 0, "{}", "[]"))
    with sqlite3.connect(path) as c:
        c.executemany(f"INSERT INTO observations ({', '.join(_COLS)}) VALUES ({', '.join('?' * len(_COLS))})", rows)


def read_batches(path: Path, batch: int) -> Iterator[list[dict[str, Any]]]:
    cols = [c for c in _COLS if c != "run_id"]
    with sqlite3.connect(path) as c:
        last = 0
        while True:
            rows = c.execute(f"SELECT id, {', '.join(cols)} FROM observations WHERE id > ? ORDER BY id LIMIT ?",
                             (last, batch)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            out = []
            for r in rows:
                d = dict(zip(cols, r[1:], strict=True))
                d["data"], d["packets"] = json.loads(d["data"]), json.loads(d["packets"])
                out.append(d)
            yield out


def direct(url: str, dbs: list[Path], batch: int) -> float:
    """Seconds to read every volunteer row and bulk-insert it with SQLAlchemy, one run per volunteer."""
    store = Store(url)
    t0 = time.perf_counter()
    for db in dbs:
        rid = store.new_run(vantage={})
        for rows in read_batches(db, batch):
            with store.session() as s, s.begin():
                s.execute(insert(ObservationRow.__table__), [{**r, "run_id": rid, "seq": None} for r in rows])
    elapsed = time.perf_counter() - t0
    store.close()
    return elapsed


def _upload_one(args: tuple[str, str, str, int]) -> tuple[int, int, int]:
    """(observations stored, peak RSS KiB, runs closed); a refused run fails the benchmark."""
    from kzprobe.collector.client import Options, Uploader

    db, url, token, batch = args
    store = Store(db)
    up = Uploader(store, Options(url=url, token=token, batch=batch, max_tries=20, max_delay=2.0))
    try:
        report = up.upload_all()
    finally:
        up.close()
        store.close()
    if report.problems:
        raise RuntimeError(f"{db}: {'; '.join(report.problems)}")
    return report.stored, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, report.closed


def _warm(_: int) -> None:
    import kzprobe.collector.client  # noqa: F401
    time.sleep(0.5)  # keep each worker busy so that every worker gets one


def vm_hwm_kib(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def via_collector(url: str, dbs: list[Path], batch: int, tmp: Path,
                  writers: int) -> tuple[float, int, int, int, float]:
    """(seconds, observations stored, collector peak RSS KiB, uploaders' peak RSS KiB, seconds to
    close every run, which makes the collector classify it)."""
    store = Store(url)  # creates the schema
    store.close()
    c = Collector(db=url, port=free_port(), log=tmp / f"collector-{time.time_ns()}.log")
    p = subprocess.run([*KZ, "collector", "--db", url, "token", "add", "bench"], capture_output=True, text=True,
                       env=ENV, check=True)
    token = p.stdout.strip()
    c.start("--writers", str(writers))
    assert c.proc is not None
    for db in dbs:  # a previous backend's pass closed them: the timed pass is ingest only
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE runs SET state = 'running', ended = NULL")
    try:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(len(dbs)) as pool:
            pool.map(_warm, range(len(dbs)))  # process start-up and imports are not ingest time
            t0 = time.perf_counter()
            done = pool.map(_upload_one, [(str(db), c.url, token, batch) for db in dbs])
            elapsed = time.perf_counter() - t0
            assert sum(c for _, _, c in done) == 0  # the runs are still open: nothing was closed yet
            print(f"  ingest through the collector: {sum(n for n, _, _ in done) / elapsed:.0f} obs/s "
                  f"({elapsed:.1f} s; collector peak RSS so far {vm_hwm_kib(c.proc.pid) / 1024:.0f} MiB)", flush=True)
            for db in dbs:
                with sqlite3.connect(db) as conn:
                    conn.execute("UPDATE runs SET state = 'done', ended = started + 60")
            t1 = time.perf_counter()
            closed = pool.map(_upload_one, [(str(db), c.url, token, batch) for db in dbs])
            close_s = time.perf_counter() - t1
        assert sum(n for n, _, _ in closed) == 0  # closing sent nothing again
        assert sum(c for _, _, c in closed) == len(dbs)  # ... and closed every run
        peak = vm_hwm_kib(c.proc.pid)
    finally:
        c.stop()
    return elapsed, sum(n for n, _, _ in done), peak, max(rss for _, rss, _ in done + closed), close_s


def count_rows(url: str) -> int:
    from sqlalchemy import func, select

    store = Store(url)
    try:
        with store.session() as s:
            return int(s.scalar(select(func.count()).select_from(ObservationRow)) or 0)
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--uploaders", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--writers", type=int, default=4, help="collector writer threads on PostgreSQL")
    ap.add_argument("--backend", nargs="+", default=["postgresql", "sqlite"], choices=["postgresql", "sqlite"])
    args = ap.parse_args()

    from kzprobe.storage.pgcluster import throwaway_cluster

    with tempfile.TemporaryDirectory(prefix="kzprobe-bench-") as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        per = [args.n // args.uploaders + (1 if i < args.n % args.uploaders else 0) for i in range(args.uploaders)]
        dbs = [tmp / f"volunteer{i}.db" for i in range(args.uploaders)]
        for i, (db, n) in enumerate(zip(dbs, per, strict=True)):
            make_volunteer_db(db, n, i)
        print(f"{args.n} observations in {args.uploaders} volunteer databases: {time.perf_counter() - t0:.1f} s",
              flush=True)
        results = []
        with contextlib.ExitStack() as stack:
            cluster = stack.enter_context(throwaway_cluster(durable=True)) if "postgresql" in args.backend else None
            for backend in args.backend:
                def fresh(tag: str, backend: str = backend) -> str:
                    if backend == "postgresql":
                        assert cluster is not None
                        return cluster.create_database(tag)
                    return f"sqlite:///{tmp / f'{tag}-{time.time_ns()}.db'}"

                d_url = fresh("direct")
                rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                d_s = direct(d_url, dbs, args.batch)
                d_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                print(f"  {backend}: direct insert {args.n / d_s:.0f} obs/s ({d_s:.1f} s)", flush=True)
                assert count_rows(d_url) == args.n
                c_url = fresh("collector")
                c_s, stored, c_rss, u_rss, close_s = via_collector(c_url, dbs, args.batch, tmp, args.writers)
                in_db = count_rows(c_url)
                assert stored == args.n == in_db, (stored, in_db)
                d_rate, c_rate = args.n / d_s, args.n / c_s
                results.append((backend, d_rate, c_rate))
                print(f"{backend:10s} direct SQLAlchemy insert: {d_rate:9.0f} obs/s ({d_s:6.1f} s, peak RSS "
                      f"{max(rss0, d_rss) / 1024:.0f} MiB)", flush=True)
                print(f"{backend:10s} via collector, {args.uploaders} uploaders: {c_rate:9.0f} obs/s ({c_s:6.1f} s; "
                      f"collector peak RSS {c_rss / 1024:.0f} MiB, uploader peak RSS {u_rss / 1024:.0f} MiB); "
                      f"ratio {c_rate / d_rate:.2f}; {in_db} stored, exactly once", flush=True)
                print(f"{backend:10s} closing the {len(dbs)} runs (the collector classifies them): {close_s:.1f} s",
                      flush=True)
        for backend, d_rate, c_rate in results:
            goal = " (goals: ratio >= 0.5, >= 5000 obs/s)" if backend == "postgresql" else ""
            print(f"summary {backend}: {c_rate:.0f} obs/s through the collector, ratio {c_rate / d_rate:.2f}{goal}")


if __name__ == "__main__":
    main()
