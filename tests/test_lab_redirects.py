"""Censorship on the second hop of a redirect chain (lab/scenarios/redirect-chains.toml).

First curl (not kzprobe) shows where each chain breaks, from the volunteer: the first hop answers
301 untouched and the second fails the way the scenario's method says.  Then kzprobe must classify
every target with the mechanism of the failing step."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

pytestmark = [pytest.mark.lab]

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "nft", "tc", "dnsmasq", "nginx",
                                                         "curl")):
    pytest.skip("the lab needs root, iproute2, iptables, nftables, dnsmasq, nginx and curl", allow_module_level=True)

from kzprobe.lab import Lab  # noqa: E402
from kzprobe.lab.core import BLOCKPAGE, compare, run_probe  # noqa: E402

#: curl's exit codes: 6 couldn't resolve, 28 timeout, 35 TLS handshake failed (the reset).
CURL_FAILURE = {"sni-reset": (35,), "sni-drop": (28,), "dns-nxdomain": (6,)}


#: Targets kzprobe still gets wrong, with the reason; the test fails when one of them changes (then
#: update or delete its line), so the list cannot rot.
KNOWN_WRONG: dict[str, tuple[str, str]] = {}


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab("redirect-chains", instance="kzlrc" + os.urandom(2).hex())
    request.addfinalizer(lab.down)
    lab.up()
    yield lab


def curl(lab: Lab, url: str, *extra: str) -> tuple[int, str]:
    p = lab.exec("volunteer", ["curl", "-s", "--max-time", "3", "--cacert", str(lab.ca_path), "-o", "/dev/null",
                               "-w", "%{http_code} %{redirect_url} %{remote_ip}", *extra, url],
                 capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout


def test_chains_break_on_the_second_hop(lab: Lab) -> None:
    for s in lab.scenario.sites:
        rc, out = curl(lab, s.url)
        assert rc == 0 and out.startswith("301 "), (s.domain, rc, out)  # hop 0 untouched
        next_url = out.split()[1]
        rc, out = curl(lab, next_url, "-L")
        if not s.methods:
            assert rc == 0 and out.startswith("200 "), (s.domain, rc, out)
        elif "dns-redirect" in s.methods:
            # The ISP's resolver sends hop 1 to the blockpage server, whose certificate is not the site's.
            rc, out = curl(lab, next_url.replace("https://", "http://"))
            assert rc == 0 and out.endswith(BLOCKPAGE), (s.domain, rc, out)
        else:
            assert rc in CURL_FAILURE[s.methods[0]], (s.domain, next_url, rc, out)


def test_kzprobe_names_the_failing_step(lab: Lab) -> None:
    rows = compare(lab.scenario, run_probe(lab, timeout=2.0))
    wrong = [(r["target"], r["expect"], r["got"], (r["verdict"] or {}).get("rule"),
              ((r["verdict"] or {}).get("evidence") or {}).get("sentence")) for r in rows
             if not r["match"] and KNOWN_WRONG.get(r["target"], ("",))[0] != r["got"]]
    assert not wrong, wrong
    changed = [(r["target"], KNOWN_WRONG[r["target"]][0], r["got"]) for r in rows
               if r["target"] in KNOWN_WRONG and r["got"] != KNOWN_WRONG[r["target"]][0]]
    assert not changed, f"known-wrong verdicts changed (update KNOWN_WRONG): {changed}"
    # The chains broken by TLS at hop 1 name that step.
    for r in rows:
        if r["target"] not in KNOWN_WRONG and r["expect"].startswith("blocked"):
            assert "hop 1" in r["verdict"]["evidence"]["sentence"], r
