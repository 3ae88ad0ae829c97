"""`kzprobe replay` over several files: one stored verdict per target, rotated captures joined,
bad files reported per file (issue 9, items 9 and 10)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from kzprobe.analysis import classify
from kzprobe.cli import main
from kzprobe.replay.engine import Replayer, group_rotated
from kzprobe.storage import Store

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pcaps"
KZ2014 = FIXTURES / "kz2014.pcapng"
SNI_RESET = FIXTURES / "method-sni-reset.pcap"

needs_fixtures = pytest.mark.skipif(not KZ2014.is_file() or not SNI_RESET.is_file(), reason="lab captures absent")


def _split(src: Path, out: Path, packets: int) -> list[Path]:
    """Rotate a capture the way a long tcpdump -C / -G run would: consecutive files.

    A pcapng's TLS secrets (Decryption Secrets Blocks) go into the first part, as in a capture
    rotated while it was written (editcap 4.0 will not rewrite a file holding them: they are
    taken out first and put back by hand)."""
    if not shutil.which("editcap"):
        pytest.skip("editcap (tshark) absent")
    out.mkdir()
    fmt = src.suffix.lstrip(".")
    secrets: list[bytes] = []
    if fmt == "pcapng":
        plain = out / "nosecrets.pcapng"
        secrets = _pcapng_without_secrets(src, plain)
        src = plain
    subprocess.run(["editcap", "-F", fmt, "-c", str(packets), str(src), str(out / f"part.{fmt}")], check=True)
    parts = sorted(out.glob(f"part_*.{fmt}"))
    assert len(parts) >= 3
    if secrets:
        blocks = _pcapng_blocks(parts[0].read_bytes())
        # After the section header and the interface descriptions: where editcap puts them.
        at = next(i for i, b in enumerate(blocks) if int.from_bytes(b[:4], "little") not in (0x0A0D0D0A, 1))
        parts[0].write_bytes(b"".join(blocks[:at] + secrets + blocks[at:]))
    return parts


def _pcapng_blocks(data: bytes) -> list[bytes]:
    out, p = [], 0
    while p < len(data):
        n = int.from_bytes(data[p + 4:p + 8], "little")
        out.append(data[p:p + n])
        p += n
    return out


def _pcapng_without_secrets(src: Path, dst: Path) -> list[bytes]:
    """Copy a (little-endian) pcapng without its Decryption Secrets Blocks; returns them."""
    blocks = _pcapng_blocks(src.read_bytes())
    dsb = [b for b in blocks if int.from_bytes(b[:4], "little") == 0x0A]
    dst.write_bytes(b"".join(b for b in blocks if int.from_bytes(b[:4], "little") != 0x0A))
    return dsb


def _sig(observations: list) -> list[tuple]:
    return sorted((o.step, o.target, o.vantage, o.purpose, o.failure or "", tuple(o.packets)) for o in observations)


@needs_fixtures
def test_rotated_capture_is_joined_into_one_run(tmp_path: Path) -> None:
    parts = _split(KZ2014, tmp_path / "rot", 250)
    # Any order on the command line: the files are ordered by their capture times.
    groups, errors = group_rotated([str(p) for p in reversed(parts)])
    assert not errors and groups == [[str(p) for p in parts]]
    # Separate captures are not joined, even recorded back to back (the lab records them so).
    every = sorted(str(p) for p in FIXTURES.glob("*.pcap*"))
    groups, errors = group_rotated([*every, *map(str, parts)])
    assert not errors and len(groups) == len(every) + 1
    assert [str(p) for p in parts] in groups
    assert sorted(g[0] for g in groups if len(g) == 1) == every
    whole = Replayer().replay_file(str(KZ2014))
    joined = Replayer().replay_run([str(p) for p in parts])
    # The same observations, packet numbers included (numbered as the files' concatenation).
    assert _sig(joined.observations) == _sig(whole.observations)
    assert joined.packets == whole.packets and joined.read.frames == whole.read.frames
    assert {v.target: v.label for v in classify(joined.observations)} == {
        v.target: v.label for v in classify(whole.observations)}
    # Replayed on their own, the parts lose flows cut at the file boundaries: joining matters.
    separate = [o for p in parts for o in Replayer().replay_file(str(p)).observations]
    assert _sig(separate) != _sig(whole.observations)


@needs_fixtures
def test_store_keeps_one_verdict_per_target(tmp_path: Path) -> None:
    # Two captures that both hold the same targets (the same run captured on two interfaces,
    # or a file given twice), plus a rotated one split in parts.
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    shutil.copy(SNI_RESET, a)
    shutil.copy(SNI_RESET, b)
    parts = _split(KZ2014, tmp_path / "rot", 300)
    db = tmp_path / "r.db"
    res = CliRunner().invoke(main, ["replay", str(a), str(b), *map(str, parts), "--store", "--db", str(db),
                                    "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output[res.output.index("{"):])
    assert len(doc["files"]) == 3  # a, b, and the joined parts
    store = Store(str(db))
    try:
        run_id = doc["run_id"]
        verdicts = store.verdicts(run_id)
        state = store.run(run_id)
    finally:
        store.close()
    targets = [v.target for v in verdicts]
    assert len(targets) == len(set(targets)), f"duplicate verdicts: {sorted(targets)}"
    expected_targets = {v.target for fr in (Replayer().replay_file(str(SNI_RESET)),
                                            Replayer().replay_file(str(KZ2014))) for v in classify(fr.observations)}
    assert set(targets) == expected_targets
    assert state is not None and state.state == "done"
    by_target = {v.target: v for v in verdicts}
    assert by_target["ratel.kz"].label == "blocked/dpi"


@needs_fixtures
def test_bad_files_are_reported_per_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"this is not a capture\n" * 4)
    cut = tmp_path / "cut.pcap"
    data = SNI_RESET.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 7])  # stops inside a record
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.pcap"
    res = CliRunner().invoke(main, ["replay", str(junk), str(cut), str(empty), str(missing), str(KZ2014)])
    out = res.output
    assert "Traceback" not in out
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert res.exit_code == 1
    lines = out.splitlines()
    for bad, why in ((junk, "not a pcap or pcapng file"), (empty, "empty"), (missing, "cannot open")):
        mine = [ln for ln in lines if str(bad) in ln and ln.startswith("error:")]
        assert len(mine) == 1 and why in mine[0], (bad, out)
    warn = [ln for ln in lines if ln.startswith("warning:") and str(cut) in ln]
    assert len(warn) == 1 and "truncated" in warn[0]
    # The good file and the readable part of the cut one are still replayed.
    assert "ratel.kz" in out and "bambuser.com" in out
    # In JSON, the cut file's verdicts are kept and its damage is a problem beside the unreadable files.
    res = CliRunner().invoke(main, ["replay", "--format", "json", str(junk), str(cut)])
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    where = {p["where"]: p["reason"] for p in doc["problems"]}
    assert set(where) == {str(junk), str(cut)} and "truncated" in where[str(cut)], where
    assert any(v["capture"]["file"] == str(cut) for v in doc["verdicts"]), doc["verdicts"]


def test_every_file_unreadable_is_one_line_each(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    a.write_bytes(b"\xd4\xc3\xb2\xa1")  # a pcap magic and nothing else
    b.write_bytes(b"junk")
    res = CliRunner().invoke(main, ["replay", str(a), str(b)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert sum(1 for ln in res.output.splitlines() if ln.startswith("error:")) == 2
    assert "none of the 2 files could be read" in res.output


@needs_fixtures
def test_internal_error_is_one_line_per_file_with_traceback_in_a_log(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from kzprobe.replay import flows

    bad = tmp_path / "bad.pcap"
    shutil.copy(SNI_RESET, bad)
    real = flows.on_tcp

    def on_tcp(st, p):  # type: ignore[no-untyped-def]
        if st.file == str(bad):
            raise KeyError("a bug met on these bytes")
        return real(st, p)

    monkeypatch.setattr(flows, "on_tcp", on_tcp)
    res = CliRunner().invoke(main, ["replay", str(bad), str(KZ2014)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert str(bad) in line and "KeyError" in line and "a bug met on these bytes" in line
    log = Path(line.rsplit("traceback in ", 1)[1])
    assert "Traceback" in log.read_text() and "KeyError" in log.read_text()
    log.unlink()
    assert "bambuser.com" in res.output  # the other file is still replayed
