"""Replay of Censored Planet's CenTrace captures must give the findings their README states."""

from __future__ import annotations

from pathlib import Path

import pytest

from kzprobe.analysis import classify
from kzprobe.model import Observation
from kzprobe.replay.engine import FileReplay, Replayer

CENTRACE = Path(__file__).resolve().parents[1].parent / "shared" / "real-pcaps" / "centrace"

pytestmark = pytest.mark.skipif(not CENTRACE.is_dir(), reason=f"{CENTRACE} is not there")


def _replay(name: str) -> FileReplay:
    fr = Replayer().replay_file(str(CENTRACE / name))
    assert fr.read.ok, fr.read.describe()
    return fr


def _injected(obs: list[Observation], domain: str, kind: str) -> list[Observation]:
    return [o for o in obs if o.target == domain and (o.data.get("injected") or {}).get("kind") == kind]


def test_archive_org_rst_injected_with_ttl_and_ipid_reason() -> None:
    fr = _replay("222.138.4.221_archive.org_archive.org.pcap")
    inj = _injected(fr.observations, "archive.org", "rst")
    assert inj, "no injected RST found"
    first = min(inj, key=lambda o: o.data["injected"]["packet"])
    assert first.step == "tls" and first.data["sni"] == "archive.org" and first.data["outcome"] == "rst"
    assert first.failure == "connection_reset"
    assert first.data["injected"]["packet"] == 117
    reason = first.data["injected"]["reason"]
    # The README: SYN/ACK has TTL 45 and IP-ID 0; injected RSTs have TTL 128-221, IP-IDs ~45-47k.
    assert "TTL 128" in reason and "TTL 45" in reason and "IP-ID 47371 vs 0" in reason
    ttls = sorted(int(o.data["injected"]["reason"].split()[2]) for o in inj)
    assert ttls[0] >= 128 and ttls[-1] <= 221
    assert any("packet 117" in f.sentence and "injected" in f.sentence for f in fr.findings)
    (v,) = [v for v in classify(fr.observations) if v.target == "archive.org"]
    assert (v.status, v.mechanism, v.rule) == ("blocked", "dpi", "pcap.injected")
    assert 117 in v.packets


def test_bisexual_org_injected_blockpage_with_packet() -> None:
    fr = _replay("103.93.208.20_bisexual.org_bisexual.org.pcap")
    inj = _injected(fr.observations, "bisexual.org", "blockpage")
    assert inj
    o = min(inj, key=lambda o: o.data["injected"]["packet"])
    assert o.step == "http" and o.data["host"] == "bisexual.org"
    assert o.data["injected"]["packet"] == 166  # the FIN/PSH segment carrying the page
    assert o.data["blockpage"] and "surf_safely" in o.data["blockpage"]
    assert o.data["title"] == "Surf Safely"
    assert "TTL 83" in o.data["injected"]["reason"] and "TTL 238" in o.data["injected"]["reason"]
    (v,) = [v for v in classify(fr.observations) if v.target == "bisexual.org"]
    assert v.status == "blocked" and v.mechanism == "dpi" and 166 in v.packets


def test_binance_com_rst_injection() -> None:
    fr = _replay("200.115.176.142_binance.com_binance.com.pcap")
    inj = _injected(fr.observations, "binance.com", "rst")
    assert [o.data["injected"]["packet"] for o in inj] == [145]
    (v,) = [v for v in classify(fr.observations) if v.target == "binance.com"]
    assert v.status == "blocked" and v.rule == "pcap.injected"


def test_gawker_com_repeated_handshake_timeouts() -> None:
    fr = _replay("118.215.97.75_gawker.com_gawker.com.pcap")
    timeouts = [o for o in fr.observations
                if o.step == "tcp" and o.target == "gawker.com" and o.failure == "generic_timeout_error"]
    assert sorted(p for o in timeouts for p in o.packets) == [35, 37, 48, 55, 65]
    assert sum("timed out" in f.sentence for f in fr.findings) == 5
    # TTL-limited GETs that expired in transit are not blackholing.
    assert not [o for o in fr.observations if o.step == "http" and o.failure]
    assert not [o for o in fr.observations if o.data.get("injected")]


def test_sohu_com_nothing_blocked() -> None:
    fr = _replay("95.167.150.101_sohu.com_sohu.com.pcap")
    assert not [o for o in fr.observations if o.data.get("injected")]
    tls = [o for o in fr.observations if o.step == "tls" and o.target == "sohu.com"]
    assert tls and all(o.ok and o.data["outcome"] == "server_hello" for o in tls)
    (v,) = [v for v in classify(fr.observations) if v.target == "sohu.com"]
    assert v.status == "ok"


@pytest.mark.parametrize("name", ["222.138.4.221_archive.org_example.com.pcap",
                                  "95.167.150.101_sohu.com_example.com.pcap",
                                  "103.93.208.20_bisexual.org_example.com.pcap"])
def test_control_sweeps_show_no_injection(name: str) -> None:
    fr = _replay(name)
    assert not [o for o in fr.observations if o.data.get("injected")]
    assert all(v.status != "blocked" for v in classify(fr.observations))


@pytest.mark.parametrize("name", ["200.115.176.142_binance.com_binance.com.pcap",
                                  "200.115.176.142_binance.com_example.com.pcap"])
def test_binance_resets_before_the_trigger_are_reported(name: str) -> None:
    """Both binance sweeps get a RST with the injector's TTL to a bare ACK *before* the trigger:
    reported beside the injection, since one file cannot tell the censored sweep from the control."""
    fr = _replay(name)
    (inj,) = [o for o in fr.observations if (o.data.get("injected") or {}).get("kind") == "rst"]
    pre = inj.data["injected"]["pre_trigger"]
    assert pre < inj.data["injected"]["packet"] and pre not in inj.packets
    assert [f.packets for f in fr.findings if f.kind == "pre_trigger_reset"] == [[pre, inj.data["injected"]["packet"]]]
