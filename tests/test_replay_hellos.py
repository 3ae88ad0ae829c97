"""Replay recognises Tor-like ClientHellos and reports TLS-fingerprint DPI (issue 15, acceptance 3).

fixtures/pcaps/hello-fingerprint.pcap was recorded by tests/support/hellonet.py: two namespaces
on a veth pair, an OpenSSL server on 198.51.100.2:9001, and on the server's INPUT an iptables
string match on ``hellos.DPI_SIGNATURE`` that answers with a TCP reset.  The probe measured
tor-or://198.51.100.2:9001 through it: the Tor-like hello (reset), the browser-like follow-up
(completes), the Tor-like hello again (reset), all with one SNI.  So by construction: two Tor-like
ClientHellos, each answered by a RST, one browser-like handshake that completes, and the verdict
blocked/dpi dpi.tls_fingerprint for that SNI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kzprobe.analysis import classify
from kzprobe.analysis.features import hello_fingerprint
from kzprobe.replay.engine import Replayer

PCAPS = Path(__file__).resolve().parents[1] / "fixtures" / "pcaps"
FIXTURE = PCAPS / "hello-fingerprint.pcap"
#: The same construction with ``-j DROP`` instead of the reset: the Tor-like hellos go unanswered
#: (the probe's 3 s timeout, twice).
DROP_FIXTURE = PCAPS / "hello-fingerprint-drop.pcap"


def _sni(capture: Path = FIXTURE) -> str:
    (sni,) = json.loads(capture.with_name(capture.stem + ".expected.json").read_text("utf-8"))["verdicts"]
    return str(sni)


@pytest.mark.parametrize(("capture", "failure", "said"), [
    (FIXTURE, "connection_reset", "Tor-like ClientHello was reset"),
    (DROP_FIXTURE, "generic_timeout_error", "Tor-like ClientHello timed out"),
], ids=["reset", "drop"])
def test_capture_replays_to_the_fingerprint_verdict(capture: Path, failure: str, said: str) -> None:
    fr = Replayer().replay_file(str(capture))
    assert fr.read.ok, fr.read.describe()
    tls = [o for o in fr.observations if o.step == "tls"]
    assert [(o.data.get("hello"), o.failure) for o in tls] == [("tor", failure), ("browser", None), ("tor", failure)]
    tor_findings = [f for f in fr.findings if f.kind == "tor_hello"]
    assert [f.packets[0] for f in tor_findings] == [o.packets[0] for o in tls if o.data.get("hello") == "tor"]
    (v,) = [v for v in classify(fr.observations) if v.target == _sni(capture)]
    assert (v.status, v.mechanism, v.detail, v.rule) == ("blocked", "dpi", "dpi.tls_fingerprint",
                                                         "dpi.tls_fingerprint"), v
    assert said in v.sentence and "browser-like one completed" in v.sentence
    # Evidence points at the packets: both Tor-like hellos (and their resets), the browser-like hello.
    for o in tls:
        assert o.packets[0] in v.packets
    if failure == "connection_reset":
        for o in tls:
            if o.failure:
                assert o.packets[1] in v.packets  # the RST


def test_without_the_browser_like_contrast_it_is_not_a_fingerprint() -> None:
    """Near miss on the same capture: drop the browser-like flow, and only Tor-like resets remain."""
    fr = Replayer().replay_file(str(FIXTURE))
    keep = [o for o in fr.observations if o.data.get("hello") != "browser"]
    assert len(keep) == len(fr.observations) - 2  # its TCP and TLS steps (the connect says its hello too)
    (v,) = [v for v in classify(keep) if v.target == _sni()]
    assert v.rule != "dpi.tls_fingerprint", v


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
def test_tor_like_hellos_are_the_ones_tshark_sees_offering_tors_suites() -> None:
    """Independent of kzprobe's parser: the frames whose ClientHello offers DHE-DSS-CAMELLIA256-SHA
    (0x0087, in Tor's list and in no browser's) are the ones replay calls Tor-like."""
    out = subprocess.run(["tshark", "-r", str(FIXTURE), "-d", "tcp.port==9001,tls", "-Y",
                          "tls.handshake.type == 1 && tls.handshake.ciphersuite == 0x0087", "-T", "fields",
                          "-e", "frame.number"], capture_output=True, text=True, timeout=60, check=True)
    frames = [int(x) for x in out.stdout.split()]
    fr = Replayer().replay_file(str(FIXTURE))
    tor = [o.packets[0] for o in fr.observations if o.step == "tls" and o.data.get("hello") == "tor"]
    assert frames == tor and len(frames) == 2


def test_hello_fingerprint_on_odd_input() -> None:
    assert hello_fingerprint(b"") is None
    assert hello_fingerprint(b"GET / HTTP/1.1\r\n\r\n") is None
    assert hello_fingerprint(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00") is None
    assert hello_fingerprint(b"\x16\x03\x01" + b"\xff" * 64) is None


def test_the_finding_names_which_of_tors_lists_was_sent(tmp_path: Path) -> None:
    """The same capture with the Tor-like hellos' first six suites turned into the pre-May-2012 list's
    (proposal 124: c00a c014 0039 0038 c00f c005, as long): the finding names that list, not 2012-2013's."""
    from kzprobe.probes.hellos import DPI_SIGNATURE, PRE_2012_SIGNATURE

    raw = FIXTURE.read_bytes()
    assert raw.count(DPI_SIGNATURE) == 2  # the two Tor-like hellos of the recording
    old = tmp_path / "hello-fingerprint-2011.pcap"
    old.write_bytes(raw.replace(DPI_SIGNATURE, PRE_2012_SIGNATURE))
    for capture, era in ((FIXTURE, "Tor's 2012-2013 cipher list"), (old, "Tor's 2008 to May 2012 cipher list")):
        fr = Replayer().replay_file(str(capture))
        sentences = [f.sentence for f in fr.findings if f.kind == "tor_hello"]
        assert len(sentences) == 2 and all(era in s for s in sentences), sentences
