"""Issue 12, acceptance 1: the lab scenario ``vantage-3isp`` (lab/scenarios/vantage-3isp.toml):
three volunteers on three ISPs that censor differently, sharing one world, and a collector in that
world namespace backed by a throwaway PostgreSQL cluster.

The cluster listens on a Unix socket in the root namespace; the collector, inside the world
namespace, reaches it through the socket's path (a path is not bound to a network namespace).
Each volunteer runs ``kzprobe run --upload URL`` from its ISP's namespace, at the same time as the
others, with the collector's lab address as URL; the run's background upload carries it there.

Checked per network, target by target: the volunteer's local verdicts are what its ISP was built
to do (the scenario's per-ISP expectations, not kzprobe's output), and the collector's verdicts
(its own classification of the uploaded observations) equal the volunteer's; every observation
arrived once, attributed to the volunteer's token name with the declared network, ASN and country.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.postgres]

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "nft", "tc", "dnsmasq", "nginx", "curl")):
    pytest.skip("the lab needs root, iproute2, iptables, nftables, dnsmasq, nginx and curl", allow_module_level=True)

from kzprobe.lab.core import Lab, compare, probe_argv  # noqa: E402
from kzprobe.lab.multi import MultiLab  # noqa: E402
from kzprobe.lab.scenario import Isp  # noqa: E402
from kzprobe.storage.pgcluster import ClusterUnavailable, throwaway_cluster, unavailable_reason  # noqa: E402
from kzprobe.tests.support.collector import ENV, KZ, add_token, local_ids, token_file  # noqa: E402

PORT = 8790


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


@pytest.fixture
def lab() -> Iterator[MultiLab]:
    with MultiLab("vantage-3isp") as m:
        yield m


def start_collector(lab: MultiLab, db: str) -> str:
    """``kzprobe collector`` in the world namespace, on the lab's collector address."""
    url = f"http://{lab.collector_address}:{PORT}"
    proc = lab.world.popen("world", [*KZ, "collector", "--db", db, "--listen", f"{lab.collector_address}:{PORT}"],
                           "collector")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = lab.world.exec("world", ["curl", "-sf", "-m", "2", f"{url}/v1/health"], capture_output=True)
        if p.returncode == 0:
            return url
        assert proc.poll() is None, (lab.world.state_dir / "collector.log").read_text()[-2000:]
        time.sleep(0.1)
    raise AssertionError("the collector did not start: " + (lab.world.state_dir / "collector.log").read_text())


def measure(isp: Isp, chain: Lab, db: Path, url: str, tok: str, home: Path) -> list[dict[str, Any]]:
    """``kzprobe run --upload URL`` in the ISP's volunteer namespace; its printed verdicts."""
    argv = [*probe_argv(chain, db=db), "--network-name", isp.name, "--asn", isp.asn, "--country", isp.country,
            "--upload", url, "--upload-token-file", tok]
    env = {**ENV, "XDG_DATA_HOME": str(home)}  # the background upload's log goes there
    p = chain.exec("volunteer", argv, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    printed = json.loads(p.stdout)
    return list(printed["verdicts"] if isinstance(printed, dict) else printed)


def stored_verdicts(db: Path) -> dict[str, tuple[Any, ...]]:
    with sqlite3.connect(db) as c:
        return {t: (st, m, d) for t, st, m, d in c.execute("SELECT target, status, mechanism, detail FROM verdicts")}


def wait_uploaded(url: str, networks: set[str], timeout: float = 180) -> None:
    """Until the collector holds a closed run of every network (the background uploads end)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with engine.connect() as c:
                done = {n for (n,) in c.execute(text("SELECT network_name FROM runs WHERE state != 'running'"))}
            if networks <= done:
                return
            time.sleep(0.3)
        raise AssertionError(f"the background uploads did not finish: closed runs only for {sorted(done)}")
    finally:
        engine.dispose()


def collector_contents(url: str) -> tuple[dict[str, Any], dict[str, dict[str, tuple[Any, ...]]], dict[str, list[int]]]:
    """(runs by uid, verdicts by network and target, observation seqs by run uid)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as c:
            runs = {uid: (net, asn, cc, sub, state) for uid, net, asn, cc, sub, state in c.execute(text(
                "SELECT uid, network_name, asn, country, submitter, state FROM runs"))}
            verdicts: dict[str, dict[str, tuple[Any, ...]]] = {}
            for net, target, status, mech, detail, cv in c.execute(text(
                    "SELECT r.network_name, v.target, v.status, v.mechanism, v.detail, v.classifier_version "
                    "FROM verdicts v JOIN runs r ON r.id = v.run_id")):
                assert cv  # every verdict carries its classifier version
                assert target not in verdicts.get(net, {}), (net, target)  # one run, one verdict per target
                verdicts.setdefault(net, {})[target] = (status, mech, detail)
            seqs: dict[str, list[int]] = {}
            for uid, seq in c.execute(text("SELECT r.uid, o.seq FROM observations o JOIN runs r ON r.id = o.run_id "
                                           "ORDER BY r.uid, o.seq")):
                seqs.setdefault(uid, []).append(seq)
            return runs, verdicts, seqs
    finally:
        engine.dispose()


def test_three_isps_upload_to_the_collector_in_the_world(tmp_path: Path, pg_cluster: Any, lab: MultiLab) -> None:
    db_url = pg_cluster.create_database()
    tokens = {isp.name: token_file(tmp_path, add_token(db_url, f"volunteer{c}"), f"token{c}")
              for c, (isp, _) in enumerate(lab.chains, 1)}
    url = start_collector(lab, db_url)
    dbs = {isp.name: tmp_path / f"{isp.asn}.db" for isp, _ in lab.chains}

    # The three volunteers measure at the same time, each uploading in the background.
    with ThreadPoolExecutor(len(lab.chains)) as pool:
        futures = {isp.name: pool.submit(measure, isp, chain, dbs[isp.name], url, tokens[isp.name],
                                         tmp_path / f"xdg{c}")
                   for c, (isp, chain) in enumerate(lab.chains, 1)}
        printed = {name: f.result() for name, f in futures.items()}
    wait_uploaded(db_url, set(dbs))

    local: dict[str, dict[str, tuple[Any, ...]]] = {}
    for c, (isp, _) in enumerate(lab.chains, 1):
        # The volunteer's verdicts are what its ISP was built to do, target by target.
        wrong = [(r["target"], r["expect"], r["expect_detail"], r["got"], r["got_detail"])
                 for r in compare(isp.scenario, printed[isp.name])
                 if not r["match"]]
        assert not wrong, (isp.name, wrong)
        local[isp.name] = stored_verdicts(dbs[isp.name])
        assert {v["target"]: v["status"] for v in printed[isp.name]} == {t: v[0] for t, v in local[isp.name].items()}
        # Nothing is left pending in the volunteer's queue.
        p = lab.chains[c - 1][1].exec("volunteer", [*KZ, "upload", "--status", "--db", str(dbs[isp.name]), url],
                                      capture_output=True, text=True, env=ENV, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stdout.rstrip().endswith("\tclosed") and len(p.stdout.splitlines()) == 1, p.stdout
        assert p.stderr.startswith("0 observation(s) and 0 run(s) not yet closed"), p.stderr

    # The ISPs censor differently: each blocks a different set of (target, mechanism).
    blocked = {net: {(t, v[1]) for t, v in vs.items() if v[0] == "blocked"} for net, vs in local.items()}
    assert all(blocked.values()) and len({frozenset(b) for b in blocked.values()}) == len(blocked)

    runs, verdicts, seqs = collector_contents(db_url)
    # Per network, the collector's verdicts equal the volunteer's, target by target.
    assert verdicts == local
    # Every observation arrived once; each run is attributed to its token's name and declared vantage.
    assert len(runs) == len(lab.chains)
    for c, (isp, _) in enumerate(lab.chains, 1):
        ((uid, ids),) = local_ids(dbs[isp.name]).items()
        assert seqs[uid] == ids
        net, asn, cc, submitter, state = runs[uid]
        assert (net, asn, cc, submitter, state) == (isp.name, isp.asn, isp.country, f"volunteer{c}", "done")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
