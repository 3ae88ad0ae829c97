"""Every lab capture (fixtures/pcaps/NAME.pcap[ng] + NAME.expected.json) replays to the live run's verdicts.

The expected JSON is written by ``kzprobe lab record``: per target, the scenario's expectation and
what the live run said while the capture was recorded (``live_verdict``, and ``live_detail``
when the recorder wrote it).  Replay must give the live verdict, detail included: the same
packets, the same feature layer, the same rules.  Other accepted shapes: a mapping target ->
"status[/mechanism]" (or -> {"status", "mechanism"}), optionally under a "verdicts" key, or a list
of verdict objects with "target"/"domain", "status" and "mechanism".  Targets may be URLs; replay
names URL targets by domain, so both sides are compared by host name.  Targets of the kinds beyond
URLs (tor-or://, tcp://, udp-dns://, ...) are compared by URL: replay is given the recording's
target list, as ``kzprobe replay --targets NAME.expected.json`` is, and maps their flows to them.

kz2014-circumvention.pcapng is that scenario's main run as ``kzprobe lab record`` captures it (lab
run's "before" round: no outage).  The messaging outage is not part of ``lab record``:
kz2014-circumvention-outage.pcapng is its "during" round (the outage's nftables drop in place,
its six ``measure`` targets; tests/support/outagerec.py records it the same way).  The "after"
round is the main run's conditions again and has no capture of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from kzprobe.analysis import classify
from kzprobe.model import KINDS
from kzprobe.replay.engine import Replayer
from kzprobe.replay.kinds import is_kind, targets_of_expected

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pcaps"
CAPTURES = sorted(p for p in FIXTURES.glob("*") if p.suffix in (".pcap", ".pcapng", ".gz")) if FIXTURES.is_dir() else []


def _host(key: str) -> str:
    """How a target is compared: by host name for a URL (replay names URL targets by SNI / Host),
    by the URL itself for the kinds beyond URLs (tcp://NAME:443 and udp-dns://NAME are two targets)."""
    if "://" in key and urlsplit(key).scheme.lower() in KINDS:
        return key
    return (urlsplit(key).hostname or key).lower().rstrip(".") if "://" in key else key.lower().rstrip(".")


def _key(d: dict[str, Any]) -> str:
    target = str(d.get("target") or "")
    return _host(target if is_kind(target) else str(d.get("domain") or target))


def _label(v: Any) -> tuple[str, str | None]:
    if isinstance(v, str):
        status, _, mech = v.partition("/")
        return status, mech or None
    return str(v.get("status")), v.get("mechanism")


def expected(path: Path) -> dict[str, tuple[str, str | None]]:
    doc = json.loads(path.read_text("utf-8"))
    if isinstance(doc, dict) and "targets" in doc:  # what `kzprobe lab record` writes: the live run's verdict
        return {_key(d): _label(d.get("live_verdict") or d["expect"]) for d in doc["targets"]}
    if isinstance(doc, dict) and "verdicts" in doc:
        doc = doc["verdicts"]
    if isinstance(doc, dict):
        return {_host(k): _label(v) for k, v in doc.items()}
    return {_key(d): _label(d) for d in doc}


def live_details(path: Path) -> dict[str, str | None]:
    """host -> the live run's verdict detail, for the targets whose recording kept it."""
    doc = json.loads(path.read_text("utf-8"))
    if not isinstance(doc, dict) or "targets" not in doc:
        return {}
    return {_key(d): d["live_detail"] for d in doc["targets"] if "live_detail" in d}


def _expected_file(capture: Path) -> Path:
    name = capture.name
    for suffix in (".gz", ".pcapng", ".pcap"):
        name = name.removesuffix(suffix)
    return capture.with_name(name + ".expected.json")


#: Targets whose packets the capture itself lost (tcpdump dropped them while recording): replay
#: can only say "inconclusive", and the test checks exactly that -- and that the capture really
#: holds no packet to the target's address, so that a re-recorded, complete capture fails here
#: until the entry is removed.
LOST_IN_CAPTURE: dict[tuple[str, str], str] = {
}

#: Live verdicts that rest on bytes the capture holds only encrypted, inside TLS, where the capture
#: has no secrets to read them with: replay gives the verdict the visible packets support.  Keyed
#: by (scenario, host); an entry applies only while the recorded live verdict and detail are the
#: ones listed, and only if the capture really holds no plain-HTTP response for the target (else
#: the entry is wrong and the test fails).  None today: the fixtures whose verdicts rest on HTTPS
#: content (a blockpage seen by the peek behind a bad certificate, a body's rate against the
#: benign-SNI follow-up's) are pcapng files recorded with the probe's TLS secrets in a Decryption
#: Secrets Block (`kzprobe lab record --out NAME.pcapng`), which replay decrypts.
ENCRYPTED_IN_CAPTURE: dict[tuple[str, str], tuple[str, str]] = {
    # (scenario, host): ("live label detail", "replay label detail")
}


@pytest.mark.skipif(not CAPTURES, reason=f"no lab captures under {FIXTURES} yet (kzprobe lab record writes them)")
@pytest.mark.parametrize("capture", CAPTURES, ids=[p.name for p in CAPTURES])
def test_fixture_replays_to_expected_verdicts(capture: Path) -> None:
    exp_file = _expected_file(capture)
    assert exp_file.is_file(), f"{capture.name} has no {exp_file.name} beside it"
    # The run's targets, as the recording lists them: replay maps the flows of tor-or://, tcp://,
    # udp-dns:// ... targets to them by address and port (URL targets name themselves).
    fr = Replayer(targets=targets_of_expected(str(exp_file)) or ()).replay_file(str(capture))
    assert fr.read.ok, fr.read.describe()
    got = {_host(v.target): v for v in classify(fr.observations)}
    addresses = _addresses(exp_file)
    details = live_details(exp_file)
    scenario = str(json.loads(exp_file.read_text("utf-8")).get("scenario", ""))
    wrong = []
    for host, (status, mech) in expected(exp_file).items():
        v = got.get(host)
        known = ENCRYPTED_IN_CAPTURE.get((scenario, host))
        live = f"{status}/{mech}" if mech else status
        if known is not None and host in details and known[0] == f"{live} {details[host]}":
            plain = [o.id for o in fr.observations
                     if o.step == "http" and o.vantage == "probe" and o.target == host and o.data.get("status")]
            said = f"{v.label} {v.detail}" if v else "nothing"
            if plain or said != known[1]:
                wrong.append(f"{host}: listed as encrypted in the capture (replay {known[1]}), but replay says {said} "
                             f"and sees plain-HTTP responses {plain}")
            continue
        if (capture.name, host) in LOST_IN_CAPTURE:
            seen = _packets_to(capture, addresses[host])
            if seen or v is None or v.status != "inconclusive":
                wrong.append(f"{host}: listed as lost in the capture, but it has {seen} packet(s) to "
                             f"{addresses[host]} and replay says {v.label if v else 'nothing'}")
            continue
        if v is None:
            wrong.append(f"{host}: expected {status}/{mech}, replay made no verdict")
        elif v.status != status or (mech is not None and v.mechanism != mech):
            wrong.append(f"{host}: expected {status}/{mech}, got {v.label} ({v.rule}: {v.sentence})")
        elif host in details and v.detail != details[host]:
            wrong.append(f"{host}: live detail {details[host]}, replay {v.detail} ({v.rule}: {v.sentence})")
    # Nothing the run did not measure becomes a target: a redirect's next hop (www.NAME, seen in
    # its own flows and lookups) is a hop of the target that redirected, as in the live run.
    extra = sorted(set(got) - set(expected(exp_file)))
    if extra:
        wrong.append(f"replay made targets of names the run did not list: {extra}")
    # The helper's own flows are control, never targets of their own.
    helper = urlsplit(json.loads(exp_file.read_text("utf-8")).get("helper") or "http://-").hostname
    if helper in got:
        wrong.append(f"the control helper {helper} became a target: {got[helper].label}")
    assert not wrong, "\n".join(wrong)


def _addresses(path: Path) -> dict[str, str]:
    doc = json.loads(path.read_text("utf-8"))
    if not isinstance(doc, dict) or "targets" not in doc:
        return {}
    return {_key(d): str(d.get("address", "")) for d in doc["targets"]}


def _packets_to(capture: Path, address: str) -> int:
    from kzprobe.replay.pcapio import iter_packets

    return sum(1 for p in iter_packets(str(capture)) if address in (p.src, p.dst))


def test_live_verdict_and_detail_are_what_is_compared(tmp_path: Path) -> None:
    p = tmp_path / "x.expected.json"
    p.write_text(json.dumps({"targets": [
        {"target": "https://a.example/", "domain": "a.example", "expect": "blocked/dpi",
         "live_verdict": "blocked/dns", "live_detail": "dns.nxdomain"},
        {"target": "https://b.example/", "domain": "b.example", "expect": "ok", "live_verdict": "ok",
         "live_detail": None},
        {"target": "https://c.example/", "domain": "c.example", "expect": "ok"},
    ]}))
    assert expected(p) == {"a.example": ("blocked", "dns"), "b.example": ("ok", None), "c.example": ("ok", None)}
    assert live_details(p) == {"a.example": "dns.nxdomain", "b.example": None}


def test_expected_file_shapes(tmp_path: Path) -> None:
    p = tmp_path / "x.expected.json"
    p.write_text(json.dumps({"https://a.example/": "blocked/dpi", "b.example": {"status": "ok"}}))
    assert expected(p) == {"a.example": ("blocked", "dpi"), "b.example": ("ok", None)}
    p.write_text(json.dumps({"verdicts": [{"target": "http://c.example/", "status": "blocked", "mechanism": "dns"}]}))
    assert expected(p) == {"c.example": ("blocked", "dns")}
