"""targets/consensus.py and `kzprobe run --list tor --tor-consensus FILE` (issue 15, acceptance 2).

The fixture is a real consensus (fixtures/tor/README.md).  The expected counts were taken from
the file with grep/awk (the commands are in that README) and are re-derived here by a few
independent lines of regex, not by the parser under test.  The end-to-end run happens in a
network namespace of its own with only a loopback interface: the relays are real public
addresses, so nothing of the run can be allowed to leave.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kzprobe.cli import main
from kzprobe.targets import load_builtin
from kzprobe.targets.consensus import ConsensusError, guard_targets, parse, sample_guards

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tor" / "2018-06-01-00-00-00-consensus"
N_RELAYS, N_GUARDS, N_GUARDS_WITH_DIRPORT, N_IPV6 = 208, 79, 65, 37  # grep/awk, see fixtures/tor/README.md


def _independent_guards(path: Path) -> list[tuple[str, int, int]]:
    """(address, ORPort, DirPort) of every Guard+Running+Valid relay, by plain regex."""
    out = []
    r: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("r "):
            r = line.split()
        elif line.startswith("s ") and {"Guard", "Running", "Valid"} <= set(line.split()[1:]):
            out.append((r[6], int(r[7]), int(r[8])))
    return out


# --- the parser on the real document ----------------------------------------------------------------


def test_parser_counts_match_the_file() -> None:
    c = parse(FIXTURE)
    assert c.flavor == "ns"
    assert c.valid_after == "2018-06-01 00:00:00"
    assert len(c.relays) == N_RELAYS == len(re.findall(r"^r ", FIXTURE.read_text(), re.M))
    assert len(c.guards) == N_GUARDS == len(_independent_guards(FIXTURE))
    assert sum(1 for g in c.guards if g.dir_port) == N_GUARDS_WITH_DIRPORT
    assert sum(1 for r in c.relays if r.ipv6) == N_IPV6
    assert [(g.address, g.or_port, g.dir_port) for g in c.guards] == _independent_guards(FIXTURE)
    first = c.relays[0]  # "r seele AAoQ1DAR6kkoo19hBAX5K0QztNw ... 67.161.31.147 9001 0"
    assert (first.nickname, first.address, first.or_port, first.dir_port) == ("seele", "67.161.31.147", 9001, 0)
    assert first.fingerprint == "000A10D43011EA4928A35F610405F92B4433B4DC"
    assert "Guard" not in first.flags and {"Fast", "HSDir", "Running", "Stable", "V2Dir", "Valid"} == first.flags


def test_sample_is_deterministic_with_a_seed_and_follows_the_seed() -> None:
    c = parse(FIXTURE)
    a, b = sample_guards(c, 5, 7), sample_guards(c, 5, 7)
    assert a == b and len(a) == 5 and all(g.is_guard for g in a)
    assert sample_guards(c, 5, 8) != a
    # The documented draw: random.Random(SEED).sample over the guards' indices, kept in file order.
    guards = _independent_guards(FIXTURE)
    picked = sorted(random.Random(7).sample(range(len(guards)), 5))
    assert [(g.address, g.or_port, g.dir_port) for g in a] == [guards[i] for i in picked]
    assert len(sample_guards(c, 1000, 1)) == N_GUARDS  # fewer guards than asked: all of them


def test_guard_targets_are_tor_or_and_tor_dir_where_a_dirport_is_set() -> None:
    c = parse(FIXTURE)
    all_targets = guard_targets(c, 1000, 1)
    assert sum(t.kind == "tor-or" for t in all_targets) == N_GUARDS
    assert sum(t.kind == "tor-dir" for t in all_targets) == N_GUARDS_WITH_DIRPORT
    for t in all_targets:
        assert t.category == "ANON" and "sampled from the consensus valid after 2018-06-01 00:00:00" in t.notes


def test_microdescriptor_flavour_with_crlf_line_ends() -> None:
    md = FIXTURE.with_name("2015-09-15-18-00-00-microdesc-consensus-crlf")
    assert b"\r\n" in md.read_bytes()
    c = parse(md)
    assert c.flavor == "microdesc" and c.valid_after == "2015-09-15 18:00:00"
    assert len(c.relays) == 4 == md.read_text().count("\nr ")  # grep -c '^r ': 4 (see fixtures/tor/README.md)
    (g,) = c.guards
    # The guard, read off the file: the last r line before the one s line with all three flags.
    r_line = ""
    for ln in md.read_text().splitlines():
        if ln.startswith("r "):
            r_line = ln
        elif ln.startswith("s ") and {"Guard", "Running", "Valid"} <= set(ln.split()):
            break
    _, nick, _ident, _date, _time, ip, orp, dirp = r_line.split()
    assert (g.nickname, g.address, g.or_port, g.dir_port) == (nick, ip, int(orp), int(dirp))


# --- bad input: one line naming the file (and the line) -----------------------------------------------

HEAD = "network-status-version 3\nvote-status consensus\nvalid-after 2018-06-01 00:00:00\n"
R_OK = "r seele AAoQ1DAR6kkoo19hBAX5K0QztNw evtkDQeqgaEIuj55lP3MXloQYcI 2018-05-31 13:28:36 67.161.31.147 9001 0\n"


@pytest.mark.parametrize(("content", "line", "why"), [
    (b"", None, "empty; not a Tor consensus"),
    (b"root:x:0:0:root:/root:/bin/bash\n", 1, "not a Tor consensus"),
    (b"@type network-status-consensus-3 1.0\nrouter seele 1.2.3.4 9001 0 0\n", 2, "not a Tor consensus"),
    (b"network-status-version 3\nvote-status vote\n", 2, "a vote document, not a consensus"),
    (b"network-status-version 3\nvalid-after x\n", None, "no 'vote-status consensus' line"),
    (HEAD.encode() + R_OK.replace("67.161.31.147", "67.161.31.300").encode(), 4, "bad relay address '67.161.31.300'"),
    (HEAD.encode() + R_OK.replace("9001 0", "99999 0").encode(), 4, "bad ORPort '99999'"),
    (HEAD.encode() + R_OK.replace("9001 0", "9001 -1").encode(), 4, "bad DirPort '-1'"),
    (HEAD.encode() + R_OK.replace(" 0\n", "\n").encode(), 4, "'r' line has 8 fields, expected 9"),
    (HEAD.encode() + R_OK.replace("AAoQ1DAR6kkoo19hBAX5K0QztNw", "!!!").encode(), 4, "bad relay identity"),
    (HEAD.encode() + b"s Guard Running Valid\n", 4, "'s' line without a relay"),
    (b"network-status-version 3\n" + R_OK.encode(), 2, "relay before 'vote-status consensus'"),
    (HEAD.encode() + b"x" * 70_000 + b"\n", 4, "line longer than"),
    (HEAD.encode() + b"\x00\x01binary", 4, "binary data"),
    (HEAD.encode() + b"params caf\xe9\n", 4, "not UTF-8 (byte 0xe9)"),
])
def test_bad_consensus_is_one_line_naming_file_and_line(tmp_path: Path, content: bytes, line: int | None,
                                                       why: str) -> None:
    p = tmp_path / "bad-consensus"
    p.write_bytes(content)
    with pytest.raises(ConsensusError) as info:
        parse(p)
    msg = str(info.value)
    assert "\n" not in msg and why in msg, msg
    assert msg.startswith(f"{p}:{line}: " if line else f"{p}: "), msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_bytes_are_a_consensus_or_one_line_error(tmp_path: Path, data: st.DataObject) -> None:
    """Random bytes, and the real file's lines cut, swapped or garbled: never anything but a
    parsed consensus or one ConsensusError line."""
    lines = FIXTURE.read_bytes().splitlines(keepends=True)[:120]
    mutated = data.draw(st.lists(st.one_of(
        st.sampled_from(lines),
        st.sampled_from(lines).map(lambda b: b[: len(b) // 2]),
        st.binary(max_size=80),
        st.sampled_from(lines).map(lambda b: b.replace(b" ", b"  ", 1)),
    ), max_size=60))
    p = tmp_path / "fuzz"
    p.write_bytes(b"".join(mutated))
    try:
        c = parse(p)
    except ConsensusError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(p))
    else:
        assert all(r.address and 0 < r.or_port < 65536 for r in c.relays)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConsensusError, match="no such file"):
        parse(tmp_path / "nope")
    with pytest.raises(ConsensusError, match="is a directory"):
        parse(tmp_path)


def test_consensus_without_guards(tmp_path: Path) -> None:
    p = tmp_path / "c"
    p.write_text(HEAD + R_OK + "s Fast Running Valid\n", encoding="utf-8")
    c = parse(p)
    assert len(c.relays) == 1 and not c.guards
    with pytest.raises(ConsensusError, match="no relay with the Guard, Running and Valid flags"):
        guard_targets(c, 3, 1)


# --- the CLI: options, and bad input before anything is measured ---------------------------------------


@pytest.fixture()
def no_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad-input test that got as far as probing would reach real addresses: fail it instead."""
    from kzprobe.probes import runner

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the run went on to probe real addresses")

    monkeypatch.setattr(runner.Runner, "run", refuse)


@pytest.mark.parametrize(("args", "why"), [
    (["--list", "kz2014", "--tor-consensus", str(FIXTURE)], "--tor-consensus goes with --list tor"),
    (["--list", "tor", "--tor-sample", "3"], "--tor-sample needs --tor-consensus FILE"),
    (["--list", "tor", "--tor-consensus", str(FIXTURE), "--tor-sample", "0"], "--tor-sample"),
    (["--list", "tor", "--tor-consensus", "/nonexistent/consensus"], "/nonexistent/consensus: no such file"),
    (["--list", "tor", "--tor-consensus", "{tmp}/notes.txt"], "{tmp}/notes.txt:1: not a Tor consensus"),
    (["--list", "tor", "--tor-consensus", "{tmp}/vote"], "{tmp}/vote:2: a vote document, not a consensus"),
])
def test_run_rejects_bad_tor_options_in_one_line(tmp_path: Path, no_probing: None, args: list[str],
                                                 why: str) -> None:
    (tmp_path / "notes.txt").write_text("shopping list\n", encoding="utf-8")
    (tmp_path / "vote").write_text("network-status-version 3\nvote-status vote\n", encoding="utf-8")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    why = why.replace("{tmp}", str(tmp_path))
    res = CliRunner().invoke(main, ["run", "--db", str(tmp_path / "x.db"), "--no-progress", *args])
    assert res.exit_code in (1, 2), res.output
    assert why in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "x.db").exists()  # refused before a run was stored


def test_targets_command_shows_the_sample() -> None:
    res = CliRunner().invoke(main, ["targets", "--list", "tor", "--tor-consensus", str(FIXTURE),
                                    "--tor-sample", "4", "--shuffle", "7", "--format", "json"])
    assert res.exit_code == 0, res.output
    urls = [t["url"] for t in json.loads(res.stdout)["targets"]]
    guards = _independent_guards(FIXTURE)
    picked = [guards[i] for i in sorted(random.Random(7).sample(range(len(guards)), 4))]
    expect = [t.url for t in load_builtin("tor")]
    for addr, orp, dirp in picked:
        expect.append(f"tor-or://{addr}:{orp}")
        if dirp:
            expect.append(f"tor-dir://{addr}:{dirp}")
    assert urls == expect


# --- end to end, in a namespace with no route out ---------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root (a network namespace)")
def test_run_list_tor_with_consensus_in_an_isolated_namespace(tmp_path: Path) -> None:
    ns = "kzcl" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        # Only loopback, no route: nothing the run does can reach a real relay.
        links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert [ln.split(":")[1].strip() for ln in links.splitlines()] == ["lo"]
        routes = subprocess.run(["ip", "-n", ns, "route", "show", "table", "all"], capture_output=True, text=True,
                                check=True).stdout
        assert "default" not in routes and "via" not in routes
        db = tmp_path / "tor.db"
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "kzprobe.cli", "run", "--list", "tor",
             "--tor-consensus", str(FIXTURE), "--tor-sample", "5", "--shuffle", "7", "--no-system-resolver",
             "--db", str(db), "--format", "json", "--no-progress", "--timeout", "1", "--deadline", "60"],
            capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert "5 guard(s) sampled from" in proc.stderr and "79 guards of 208 relays" in proc.stderr
    out = json.loads(proc.stdout)
    measured = [v["target"] for v in out["verdicts"]]
    guards = _independent_guards(FIXTURE)
    picked = [guards[i] for i in sorted(random.Random(7).sample(range(len(guards)), 5))]
    expect = {t.url for t in load_builtin("tor")}
    for addr, orp, dirp in picked:
        expect.add(f"tor-or://{addr}:{orp}")
        if dirp:
            expect.add(f"tor-dir://{addr}:{dirp}")
    assert set(measured) == expect and len(measured) == len(expect)
    # No network at all: nothing can be called blocked (precision first), and the run says why.
    assert {v["status"] for v in out["verdicts"]} == {"inconclusive"}
    assert "has no network" in proc.stderr
