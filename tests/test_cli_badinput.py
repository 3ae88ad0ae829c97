"""Every bad input of issue 11, fed to every command that takes it, as a real process.

Each one must give: exit != 0 (or exit 0 with a warning where the rest of the input is kept),
one line on stderr naming the file / option / URL, no traceback, and no run left `running`.
Expected messages are what the input is (a NUL byte at offset 0, line 2 not UTF-8 ...), not
what kzprobe happened to print.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from kzprobe.storage import Store

QA = Path(__file__).resolve().parents[1].parent / "shared" / "ooni-qa"


def _exe() -> list[str]:
    exe = Path(sys.executable).with_name("kzprobe")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kzprobe.cli"]


@dataclass
class Case:
    name: str
    argv: Callable[[Path], list[str]]
    #: A substring the one stderr line must contain (the file, option or URL it is about).
    where: str
    ok: bool = False  # exit 0 with a warning: the rest of the input is kept
    stdin: bytes | None = None
    #: Lines that are not about the bad input (e.g. import-ooni's final count) are allowed.
    extra_lines: int = 0


def _write(tmp: Path, name: str, data: bytes) -> str:
    p = tmp / name
    p.write_bytes(data)
    return str(p)


def _db_lacking_column(tmp: Path) -> str:
    db = tmp / "old.db"
    Store(db).close()
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE verdicts DROP COLUMN sentence")
    con.commit()
    con.close()
    return str(db)


def _db_bad_version(tmp: Path) -> str:
    db = tmp / "abc.db"
    Store(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = 'abc'")
    con.commit()
    con.close()
    return str(db)


NO_NET = ["--no-system-resolver", "--no-progress", "--format", "jsonl"]

TARGET_CASES = [
    Case("dev-zero", lambda t: ["--targets", "/dev/zero"], "/dev/zero: binary file"),
    Case("missing", lambda t: ["--targets", str(t / "nope.txt")], "nope.txt: no such file"),
    Case("unknown-csv-header", lambda t: ["--targets", _write(t, "n.csv", b"https://a.example/,NEWS,News\n")],
         "n.csv:1: unknown CSV header"),
    Case("huge-bad-line", lambda t: ["--targets", _write(t, "l.txt", b"https://ok.example/\nhttps://"
                                                         + b"x" * 1_000_000 + b"/\n")],
         "l.txt:2: line longer than 8192", ok=True),
    Case("not-utf8-line", lambda t: ["--targets", _write(t, "u.txt", b"https://ok.example/\ncaf\xe9.example\n")],
         "u.txt:2: not UTF-8", ok=True),
]

RUN_OPTION_CASES = [
    Case("helper", lambda t: ["--helper", "notaurl"], "--helper"),
    Case("doh", lambda t: ["--doh", "ftp://x"], "--doh"),
    Case("source-address", lambda t: ["--source-address", "notanip"], "--source-address"),
    Case("ca-bundle", lambda t: ["--ca-bundle", _write(t, "ca.pem", b"not a certificate\n")], "ca.pem"),
    Case("fingerprints", lambda t: ["--fingerprints", _write(t, "fp.csv", b"name,pattern\nx,y\n")],
         "fp.csv:1: missing column"),
    Case("resolver", lambda t: ["--resolver", "not-an-ip"], "--resolver"),
]

DB_CASES = [
    Case("db-missing", lambda t: ["--db", str(t / "typo.db")], "typo.db: no such database"),
    Case("db-driver", lambda t: ["--db", "postgresql+pg8000://u:secret@db.invalid/k"], "install kzprobe[postgres]"),
    Case("db-lacks-column", lambda t: ["--db", _db_lacking_column(t)], "kzprobe db upgrade"),
    Case("db-bad-version", lambda t: ["--db", _db_bad_version(t)], "abc.db"),
]


def _matrix() -> list[tuple[str, str, Case]]:
    out = []
    for c in TARGET_CASES:
        out.append(("targets", c.name, c))
        if not c.ok:  # with a kept rest, `run` would go on to measure (covered by the targets command)
            out.append(("run", c.name, c))
    out += [("run", c.name, c) for c in RUN_OPTION_CASES]
    for c in DB_CASES:
        out += [("verdicts", c.name, c), ("report", c.name, c)]
        if c.name != "db-missing":  # run creates its database
            out.append(("run", c.name, c))
    return out


def _run(cmd: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "300"}
    return subprocess.run(cmd, input=stdin.decode() if stdin else None, capture_output=True, text=True,
                          timeout=60, env=env)


def _no_run_left_running(argv: list[str]) -> None:
    if "--db" not in argv:
        return
    db = argv[argv.index("--db") + 1]
    if "://" in db or not Path(db).is_file():
        return
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT id FROM runs WHERE state = 'running'").fetchall()
    except sqlite3.Error:
        rows = []
    con.close()
    assert not rows, f"run(s) {rows} left running in {db}"


@pytest.mark.parametrize(("command", "case"), [(cmd, c) for cmd, _n, c in _matrix()],
                         ids=[f"{cmd}-{n}" for cmd, n, _c in _matrix()])
def test_bad_input_is_one_line(command: str, case: Case, tmp_path: Path) -> None:
    argv = case.argv(tmp_path)
    extra = NO_NET if command == "run" else []
    if command == "run" and "--db" not in argv:
        argv += ["--db", str(tmp_path / "run.db")]
    if command == "targets" and "--format" not in argv:
        extra = ["--format", "jsonl"]
    p = _run([*_exe(), command, *argv, *extra], case.stdin)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    if case.ok:
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip(), "the good entries are kept"
    else:
        assert p.returncode != 0, p.stdout[-500:]
    assert len(lines) == 1 + case.extra_lines, lines
    assert case.where in lines[0], lines
    assert len(lines[0]) < 400, "a warning quotes a bounded part of the input"
    assert "secret" not in p.stderr, "a database password is never printed"
    _no_run_left_running(argv)


def test_targets_dash_reads_stdin(tmp_path: Path) -> None:
    p = _run([*_exe(), "targets", "--targets", "-", "--format", "jsonl"], b"https://a.example/\nb.example\n")
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["url"] for line in p.stdout.splitlines()] == ["https://a.example/", "https://b.example/"]


@pytest.mark.skipif(not QA.is_dir(), reason="../shared (ooni-qa) is not available")
@pytest.mark.parametrize("kind", ["deep", "not-utf8", "not-json"])
def test_import_ooni_bad_file_or_line_is_one_line_and_the_rest_is_kept(kind: str, tmp_path: Path) -> None:
    good = json.dumps(json.loads((QA / "cloudflareCAPTCHAWithHTTP.json").read_text("utf-8")))
    bad = {"deep": b"[" * 100_000 + b"]" * 100_000, "not-utf8": b'{"a": "caf\xe9"}', "not-json": b"{not json}"}[kind]
    f = tmp_path / "m.jsonl"
    f.write_bytes(good.encode() + b"\n" + bad + b"\n" + good.encode() + b"\n")
    db = tmp_path / "i.db"
    p = _run([*_exe(), "import-ooni", str(f), "--db", str(db), "--format", "jsonl", "--workers", "1",
              "--no-progress"])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    about = [line for line in p.stderr.splitlines() if f"{f}:2" in line]
    assert len(about) == 1, p.stderr
    assert len(p.stdout.splitlines()) >= 1, "the good lines are imported"
    _no_run_left_running(["--db", str(db)])
