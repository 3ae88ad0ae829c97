"""Fuzzing the capture parser and the replay engine: mutated and truncated captures never crash
nor hang; they give a (partial) result and, when damaged, say where."""

from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kzprobe.replay.engine import Replayer
from kzprobe.replay.pcapio import CaptureError

CENTRACE = Path(__file__).resolve().parents[1].parent / "shared" / "real-pcaps" / "centrace"


def _seed() -> bytes:
    """A small real capture when available (TCP, ICMP quoting, HTTP), else a synthetic one."""
    p = CENTRACE / "103.93.208.20_bisexual.org_bisexual.org.pcap"
    if p.is_file():
        return p.read_bytes()[:6000]
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
    ip = bytes.fromhex("4500002800010000400600007f0000017f000002"
                       "9c40005000000001000000005002200000000000")
    for i in range(20):
        out += struct.pack("<IIII", i, 0, len(ip), len(ip)) + ip
    return bytes(out)


SEED = _seed()


def _replay_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.pcap"
        path.write_bytes(data)
        try:
            fr = Replayer().replay_file(str(path))
        except CaptureError as exc:
            assert str(exc)  # a clean one-line reason
            return
        assert fr.read.frames >= 0
        if fr.read.error:
            assert fr.read.error_offset is not None and fr.read.error_frame == fr.read.frames + 1
        for o in fr.observations:
            o.to_dict()


mutations = st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutations, st.integers(0, len(SEED)))
def test_mutated_and_truncated_captures(muts: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEED)
    for pos, val in muts:
        data[pos] = val
    _replay_bytes(bytes(data[:cut]))


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=400), st.sampled_from([b"\xd4\xc3\xb2\xa1", b"\x0a\x0d\x0d\x0a", b"\x1f\x8b"]))
def test_random_bytes_after_a_magic(tail: bytes, magic: bytes) -> None:
    _replay_bytes(magic + tail)


@settings(max_examples=40, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 5999))
def test_truncated_gzip(cut: int) -> None:
    _replay_bytes(gzip.compress(SEED)[:cut])


HELPER_SEED_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "pcaps" / "method-dns-nxdomain.pcap"
HELPER_SEED = HELPER_SEED_FILE.read_bytes() if HELPER_SEED_FILE.is_file() else SEED
#: Where the helper's first JSON answer sits in the capture: mutations aim there, so that the
#: HTTP/JSON decoding of control (and the classifier reading its result) is what gets fuzzed.
_AT = max(0, HELPER_SEED.find(b'{"version"'))


@settings(max_examples=60, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(-300, 3000), st.integers(0, 255)), min_size=1, max_size=16))
def test_mutated_helper_answers_never_crash_replay_or_classifier(muts: list[tuple[int, int]]) -> None:
    from kzprobe.analysis import classify

    data = bytearray(HELPER_SEED)
    for off, val in muts:
        data[min(len(data) - 1, max(0, _AT + off))] = val
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "h.pcap"
        path.write_bytes(bytes(data))
        fr = Replayer().replay_file(str(path))
    for v in classify(fr.observations):
        v.to_dict()


def test_latin1_digits_in_http_heads_are_not_numbers() -> None:
    """Heads are decoded as latin-1, where b"\\xb2" is "²": str.isdigit() says yes and int() raises,
    which cost the whole capture file its replay.  A server in the capture chooses these bytes."""
    from kzprobe.replay import parsers, trigger, tunnel

    msg = parsers.http_messages(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab", requests=False)
    assert msg[0].body == b"ab"  # no usable length: the body runs to the end of the stream
    assert trigger.response_parts(b"HTTP/1.1 \xb2\xb3\xb9 OK\r\nContent-Length: 2\r\n\r\nab")[0] is None
    assert tunnel.answer_head(b"HTTP/1.1 \xb2\xb3\xb9 OK\r\n\r\n") is None


def test_unparsable_target_urls_from_a_capture_name_nothing() -> None:
    """A helper request in a capture carries the URL its client chose: one whose host or port does
    not parse names no target (the exchange says so) instead of raising for the whole file."""
    from kzprobe.replay import control, kinds

    assert control.replay_name("http://[zz/") == ""
    got = kinds.kind_targets(["tcp://198.51.100.7:99999", "tcp://198.51.100.7:abc", "tor-or://[zz:9001",
                              "tcp://198.51.100.7:5222"])
    assert [t.url for t in got] == ["tcp://198.51.100.7:5222"]
