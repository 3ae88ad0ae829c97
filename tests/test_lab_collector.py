"""Three volunteers on three lab ISPs that censor differently, each measuring in its own lab and
uploading to one collector backed by PostgreSQL: per network, the collector's verdicts (its own
classification of the uploaded observations) equal the volunteer's local ones, target by target.

The labs have no link to the root namespace, so each volunteer uploads after its run from the
root namespace to a collector on loopback: measuring is offline-first, and the upload path is
the one a volunteer whose collector was unreachable during the run takes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.postgres]

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "nft", "tc", "dnsmasq")):
    pytest.skip("the lab needs root, iproute2, iptables, nftables and dnsmasq", allow_module_level=True)

from kzprobe.lab import Lab  # noqa: E402
from kzprobe.lab.core import probe_argv  # noqa: E402
from kzprobe.storage.pgcluster import ClusterUnavailable, throwaway_cluster, unavailable_reason  # noqa: E402
from kzprobe.tests.support.collector import Collector, add_token, free_port, kz, token_file  # noqa: E402

#: network name -> (ASN, the lab scenario of its ISP's censorship)
ISPS = {"KazNet": ("AS9198", "method-dns-nxdomain"), "Beeline KZ": ("AS21299", "method-sni-reset"),
        "Tele2 KZ": ("AS48503", "method-ip-drop")}


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[Any]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL: {reason}")
    try:
        with throwaway_cluster() as cluster:
            yield cluster
    except ClusterUnavailable as exc:
        pytest.skip(f"PostgreSQL cannot start here: {exc}")


def measure(scenario: str, db: Path, network: str, asn: str) -> dict[str, tuple[Any, ...]]:
    lab = Lab(scenario)
    try:
        lab.up()
        argv = [*probe_argv(lab, db=db), "--network-name", network, "--asn", asn, "--country", "KZ"]
        p = lab.exec("volunteer", argv, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        printed = json.loads(p.stdout)
        printed = printed["verdicts"] if isinstance(printed, dict) else printed  # cli-durable's envelope
        # The volunteer's verdicts as stored (the printed form may render an empty detail as "ok").
        with sqlite3.connect(db) as c:
            stored = {t: (st, m, d) for t, st, m, d in c.execute("SELECT target, status, mechanism, detail "
                                                                  "FROM verdicts")}
        assert {v["target"]: v["status"] for v in printed} == {t: v[0] for t, v in stored.items()}
        return stored
    finally:
        lab.down()


def collector_verdicts(url: str) -> dict[str, dict[str, tuple[Any, ...]]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as c:
            out: dict[str, dict[str, tuple[Any, ...]]] = {}
            for net, target, status, mech, detail, cv in c.execute(text(
                    "SELECT r.network_name, v.target, v.status, v.mechanism, v.detail, v.classifier_version "
                    "FROM verdicts v JOIN runs r ON r.id = v.run_id")):
                assert cv  # every verdict carries its classifier version
                out.setdefault(net, {})[target] = (status, mech, detail)
            return out
    finally:
        engine.dispose()


def test_three_isps_upload_and_the_collector_agrees(tmp_path: Path, pg_cluster: Any) -> None:
    url = pg_cluster.create_database()
    collector = Collector(db=url, port=free_port(), log=tmp_path / "collector.log")
    tokens = {net: add_token(url, f"volunteer{i}") for i, net in enumerate(ISPS)}
    collector.start()
    local: dict[str, dict[str, tuple[Any, ...]]] = {}
    try:
        for net, (asn, scenario) in ISPS.items():
            db = tmp_path / f"{asn}.db"
            local[net] = measure(scenario, db, net, asn)
            p = kz("upload", "--db", str(db), "--token-file", token_file(tmp_path, tokens[net], asn), collector.url)
            assert p.returncode == 0, p.stderr
    finally:
        collector.stop()
    # The three ISPs censor differently, so their blocked verdicts differ.
    blocked = {net: {(t, v[1]) for t, v in vs.items() if v[0] == "blocked"} for net, vs in local.items()}
    assert all(blocked.values()) and len({frozenset(b) for b in blocked.values()}) == 3
    assert collector_verdicts(url) == local
