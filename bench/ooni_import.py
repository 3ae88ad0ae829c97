"""Benchmark: ``kzprobe import-ooni`` over a synthetic OONI archive, against a parse floor.

    python bench/ooni_import.py [--n 1000000] [--small 100000] [--workdir DIR] [--keep]

1. Generates archives of ``--small`` and ``--n`` measurements in OONI's layout
   (``bench/ooni_synth.py``: the 20 real QA measurements, renamed across inputs, networks,
   countries and 30 days).
2. The floor, measured in the same run on the same files: reading the cans (gzip) and
   ``json.loads`` of every line in one process, nothing else.  No importer can beat it per core.
3. ``kzprobe import-ooni DIR --db NEW.db --format jsonl`` as a separate process, for each size:
   wall time, measurements/s, and the peak RSS of the whole process tree (the writer plus its
   worker processes, sampled every 50 ms from /proc).

It prints the figures and the ratios: import rate / floor rate, and peak RSS at the large size /
at the small size (flat memory means about 1).  Goals on a 2-core machine: >= 2,000
measurements/s, RSS < 400 MB and flat from 100k to 1M.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _synth():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("ooni_synth", HERE / "ooni_synth.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tree_rss(pid: int) -> int:
    """RSS in bytes of ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
    return total


def timed(cmd: list[str], stdout: int = subprocess.PIPE
          ) -> tuple[float, float, int, subprocess.CompletedProcess[str]]:
    """(wall s, CPU s of the process and its children, peak RSS of its process tree in bytes, result).

    The tree is sampled from /proc every 50 ms; CPU comes from RUSAGE_CHILDREN (waited-for
    descendants included, so curl's processes under xargs count too)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, peak, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_import(kzprobe: list[str], archive: Path, db: Path) -> tuple[float, int, str]:
    """(seconds, peak tree RSS, kzprobe's summary line)."""
    elapsed, _, peak, p = timed([*kzprobe, "import-ooni", str(archive), "--db", str(db), "--format", "jsonl",
                                 "--no-progress"], stdout=subprocess.DEVNULL)
    err = p.stderr.strip()
    if p.returncode != 0:
        sys.exit(f"kzprobe import-ooni failed ({p.returncode}): {err[-500:]}")
    return elapsed, peak, err.splitlines()[-1] if err else ""


def parse_floor(archive: Path) -> tuple[int, float]:
    """(lines, seconds) to gunzip and json.loads every line, in one process."""
    n = 0
    t0 = time.perf_counter()
    for f in sorted(archive.rglob("*.jsonl.gz")):
        with gzip.open(f, "rb") as fh:
            for line in fh:
                json.loads(line)
                n += 1
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the archives and databases")
    args = ap.parse_args()
    synth = _synth()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kzprobe-bench-ooni-"))
    work.mkdir(parents=True, exist_ok=True)
    venv_kz = HERE.parent / ".venv" / "bin" / "kzprobe"
    kzprobe = [str(venv_kz)] if venv_kz.exists() else [sys.executable, "-m", "kzprobe.cli"]
    print(f"machine: {os.cpu_count()} cores; work dir {work}")
    rows = []
    try:
        for n in sorted({args.small, args.n}):
            archive = work / f"archive-{n}"
            if not archive.exists():
                t0 = time.perf_counter()
                files = sum(1 for _ in synth.generate(archive, n))
                print(f"generated {n:,} measurements in {files:,} files in {time.perf_counter() - t0:.0f} s")
            lines, floor_s = parse_floor(archive)
            db = work / f"import-{n}.db"
            for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                p.unlink(missing_ok=True)
            secs, peak, summary = run_import(kzprobe, archive, db)
            rows.append((n, lines / floor_s, n / secs, peak))
            print(f"{n:>9,}: import {n / secs:8,.0f} msmt/s ({secs:.0f} s), peak RSS {peak / 2**20:6.0f} MiB; "
                  f"floor (gunzip + json.loads, 1 process) {lines / floor_s:8,.0f} lines/s; "
                  f"ratio import/floor {n / secs / (lines / floor_s):.2f}  [{summary}]")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if len(rows) == 2:
        (s_n, _, _, s_rss), (l_n, _, l_rate, l_rss) = rows
        print(f"RSS {l_n:,} / {s_n:,}: {l_rss / s_rss:.2f} (flat is ~1.0); "
              f"goals: >= 2,000 msmt/s ({'met' if l_rate >= 2000 else 'NOT met'}), "
              f"RSS < 400 MiB ({'met' if l_rss < 400 * 2**20 else 'NOT met'})")


if __name__ == "__main__":
    main()
