"""Acceptance: ``kzprobe lab run --scenario kz2014`` gets every target's expected verdict, and leaves
no namespace behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.slow]

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "nft", "tc", "dnsmasq")):
    pytest.skip("the lab needs root, iproute2, iptables, nftables and dnsmasq", allow_module_level=True)

from kzprobe.lab import destroy  # noqa: E402
from kzprobe.lab.core import list_namespaces  # noqa: E402
from kzprobe.lab.scenario import load  # noqa: E402
from kzprobe.tests.support.schema import validator  # noqa: E402


def test_kz2014_end_to_end(request: pytest.FixtureRequest) -> None:
    inst = "kzl2014" + os.urandom(2).hex()
    request.addfinalizer(lambda: destroy(inst))
    p = subprocess.run(
        [sys.executable, "-m", "kzprobe.cli", "lab", "run", "--scenario", "kz2014", "--format", "json",
         "--instance", inst],
        capture_output=True, text=True, timeout=600,
    )
    assert p.stdout, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    validator("envelope.schema.json").validate(doc)
    assert doc["command"] == "lab run" and doc["problems"] == []
    report = doc["lab"]
    rows = report["results"]
    # The envelope's verdicts are kzprobe's own, one per site.
    assert sorted(v["target"] for v in doc["verdicts"]) == sorted(r["target"] for r in rows)
    scenario = load("kz2014")
    assert [r["target"] for r in rows] == [s.url for s in scenario.sites]
    wrong = [(r["target"], r["expect"], r["got"], (r["verdict"] or {}).get("rule")) for r in rows if not r["match"]]
    assert not wrong, wrong
    assert p.returncode == 0 and report["ok"] is True
    ratel = next(r for r in rows if r["domain"] == "ratel.kz")
    assert ratel["got"] in ("blocked/dns", "blocked/dpi")
    assert ratel["verdict"]["evidence"]["observations"] and "ratel.kz" in ratel["verdict"]["evidence"]["sentence"]
    # Acceptance 2: nothing of the lab left.
    assert not [ns for ns in list_namespaces() if ns.startswith(inst + "-")]
