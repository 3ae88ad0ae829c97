"""``kzprobe lab run --scenario vantage-3isp``: the multi-ISP lab run end to end.

The expectations are read here straight from lab/scenarios/vantage-3isp.toml with tomllib (not
through lab/scenario.py, which the command itself uses): per ISP, a site's ``[site.isp."NAME"]``
table overrides its top-level ``expect``/``detail``; without one the site is not censored there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.slow]

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "nft", "tc", "dnsmasq", "nginx")):
    pytest.skip("the lab needs root, iproute2, iptables, nftables, dnsmasq and nginx", allow_module_level=True)

from kzprobe.lab.core import list_namespaces  # noqa: E402
from kzprobe.lab.topology import destroy  # noqa: E402
from kzprobe.tests.support.schema import validator  # noqa: E402

SCENARIO = Path(__file__).resolve().parents[1] / "lab" / "scenarios" / "vantage-3isp.toml"


def expectations(path: Path) -> dict[tuple[str, str], tuple[str, str | None]]:
    """{(ISP name, site URL): (expect, detail or None)} from the TOML itself."""
    doc = tomllib.loads(path.read_text("utf-8"))
    out: dict[tuple[str, str], tuple[str, str | None]] = {}
    for isp in doc["isp"]:
        for site in doc["site"]:
            own = site.get("isp", {}).get(isp["name"])
            src = own if own is not None else site
            out[(isp["name"], site.get("url", f"https://{site['domain']}/"))] = (src["expect"], src.get("detail"))
    return out


def lab_run(scenario: str | Path, inst: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kzprobe.cli", "lab", "run", "--scenario", str(scenario), "--format", "json",
         "--instance", inst],
        capture_output=True, text=True, timeout=600,
    )


def check_rows(doc: dict[str, Any], expected: dict[tuple[str, str], tuple[str, str | None]]) -> list[Any]:
    """Every (ISP, target) of the scenario has exactly one row; the rows whose verdict differs
    from the TOML's expectation (by our own reading, not the row's ``match``)."""
    validator("envelope.schema.json").validate(doc)
    assert doc["command"] == "lab run" and doc["problems"] == []
    rows = doc["lab"]["results"]
    assert sorted((r["isp"], r["target"]) for r in rows) == sorted(expected)
    # The envelope's verdicts are the volunteers' own: one per site per ISP, and each row's got is one of them.
    assert len(doc["verdicts"]) == len(rows)
    wrong = []
    for r in rows:
        exp, detail = expected[(r["isp"], r["target"])]
        assert (r["expect"], r["expect_detail"]) == (exp, detail), r
        good = r["got"] == exp and (detail is None or r["got_detail"] == detail)
        assert r["match"] is good, r
        if not good:
            wrong.append((r["isp"], r["target"], exp, detail, r["got"], r["got_detail"]))
        else:
            v = r["verdict"]
            assert v["target"] == r["target"] and v["evidence"]["observations"], r
    return wrong


def test_lab_run_vantage_3isp(request: pytest.FixtureRequest) -> None:
    inst = "kzm" + os.urandom(2).hex()
    request.addfinalizer(lambda: [destroy(i) for i in (inst, f"{inst}i1", f"{inst}i2", f"{inst}i3")])
    p = lab_run("vantage-3isp", inst)
    assert p.stdout, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    expected = expectations(SCENARIO)
    wrong = check_rows(doc, expected)
    assert not wrong, wrong
    assert p.returncode == 0 and doc["lab"]["ok"] is True
    assert [i["name"] for i in doc["lab"]["isps"]] == [i["name"] for i in tomllib.loads(SCENARIO.read_text())["isp"]]
    # The ISPs censor differently: each blocks a different set of targets.
    blocked = {isp: frozenset(t for (i, t), (e, _) in expected.items() if i == isp and e.startswith("blocked"))
               for isp, _ in expected}
    assert len(set(blocked.values())) == 3
    # Nothing of the lab left: the world and every chain are gone.
    assert not [ns for ns in list_namespaces() if ns.startswith(inst)]


def test_lab_run_multi_exits_non_zero_on_a_mismatch(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The same lab with one expectation made wrong on purpose (Tele2 drops avaaz.org's packets,
    so its connections time out; the copy claims they are refused): exit 1, that row alone fails,
    and only Tele2's ISP is not ok."""
    text = SCENARIO.read_text("utf-8")
    assert text.count('detail = "ip.tcp_timeout"') == 1
    wrong_toml = tmp_path / "vantage-3isp-wrong.toml"
    wrong_toml.write_text(text.replace('detail = "ip.tcp_timeout"', 'detail = "ip.tcp_refused"'), "utf-8")
    inst = "kzm" + os.urandom(2).hex()
    request.addfinalizer(lambda: [destroy(i) for i in (inst, f"{inst}i1", f"{inst}i2", f"{inst}i3")])
    p = lab_run(wrong_toml, inst)
    assert p.stdout, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    wrong = check_rows(doc, expectations(wrong_toml))
    assert [w[:2] for w in wrong] == [("Tele2 KZ", "https://avaaz.org/")], wrong
    assert wrong[0][4:] == ("blocked/ip", "ip.tcp_timeout")
    assert p.returncode == 1 and doc["lab"]["ok"] is False
    assert {i["name"]: i["ok"] for i in doc["lab"]["isps"]} == {"KazNet": True, "Beeline KZ": True, "Tele2 KZ": False}
    assert not [ns for ns in list_namespaces() if ns.startswith(inst)]


@pytest.mark.postgres
def test_lab_run_multi_with_the_collector(request: pytest.FixtureRequest) -> None:
    """``--collector``: every volunteer uploads to a collector in the world (throwaway PostgreSQL);
    the collector's own classification of each ISP's uploaded observations gives, target by
    target, what that ISP was built to do."""
    from kzprobe.storage.pgcluster import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL: {reason}")
    inst = "kzm" + os.urandom(2).hex()
    request.addfinalizer(lambda: [destroy(i) for i in (inst, f"{inst}i1", f"{inst}i2", f"{inst}i3")])
    p = subprocess.run(
        [sys.executable, "-m", "kzprobe.cli", "lab", "run", "--scenario", "vantage-3isp", "--format", "json",
         "--instance", inst, "--collector"],
        capture_output=True, text=True, timeout=600,
    )
    assert p.stdout, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    expected = expectations(SCENARIO)
    assert not check_rows(doc, expected)
    for r in doc["lab"]["results"]:
        exp, detail = expected[(r["isp"], r["target"])]
        c = r["collector"]
        assert c is not None, r
        label = c["status"] if c["status"] != "blocked" else f"{c['status']}/{c['mechanism']}"
        assert label == exp and (detail is None or c["detail"] == detail), r
        assert r["collector_match"] is True, r
    assert p.returncode == 0 and doc["lab"]["ok"] is True
    assert doc["lab"]["collector"]["url"].startswith("http://198.51.100.")
    assert not [ns for ns in list_namespaces() if ns.startswith(inst)]
