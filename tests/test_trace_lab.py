"""`kzprobe trace` in the lab (issue 6, acceptance 2): each method on its own scenario.

For every method the scenario names the router it put the censor on (``hop``); the trace run
from the volunteer must name that router (its address as a TTL sweep sees it), at its TTL, with
the right kind (in-path for netfilter rules inside the router, on-path for the scapy injectors
that only add packets), domain-triggered, and the control domain must pass.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator

import pytest

pytestmark = [pytest.mark.lab]

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "nft", "tc", "dnsmasq")):
    pytest.skip("the lab needs root, iproute2, iptables, nftables and dnsmasq", allow_module_level=True)

from kzprobe.lab import Lab  # noqa: E402
from kzprobe.lab.core import PUBLIC_RESOLVER  # noqa: E402
from kzprobe.lab.scenario import ROLES  # noqa: E402

# method -> (trigger, placement, extra arguments)
CASES = {
    "sni-reset": ("tls", "in-path", []),
    "sni-drop": ("tls", "in-path", ["--max-hops", "7"]),
    "host-reset": ("http", "in-path", []),
    "http-blockpage-injection": ("http", "on-path", []),
    "dns-injection": ("dns", "on-path", ["--address", PUBLIC_RESOLVER]),
}


@pytest.fixture(scope="module", params=list(CASES))
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab(f"method-{request.param}")
    request.addfinalizer(lab.down)
    lab.up()
    yield lab


def trace_json(lab: Lab, domain: str, args: list[str]) -> dict:
    code = (
        "import json, sys\n"
        "from kzprobe.cli import run_main\n"
        "run_main(sys.argv[1:])\n"
    )
    p = lab.exec("volunteer", [sys.executable, "-c", code, "trace", domain, "--format", "json",
                               "--repeat", "2", "--timeout", "1", *args],
                 capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])["trace"]


def test_trace_names_the_censor_hop(lab: Lab) -> None:
    method = lab.scenario.name.removeprefix("method-")
    site = lab.scenario.by_method(method)[0]
    trigger, placement, extra = CASES[method]
    if "--address" not in extra:
        extra = [*extra, "--address", site.address]
    out = trace_json(lab, site.domain, ["--trigger", trigger, *extra])
    assert out["result"] == "censor_located", out
    assert out["hop_address"] == lab.router_address(site.hop), out
    assert out["hop_ttl"] == ROLES.index(site.hop), out
    assert out["placement"] == placement, out
    assert out["triggered_by"] == "domain", out


def test_control_domain_passes(lab: Lab) -> None:
    # The scenario's accessible site, traced the same way, shows nothing.
    method = lab.scenario.name.removeprefix("method-")
    trigger = CASES[method][0]
    control = next(s for s in lab.scenario.sites if not s.methods)
    site = lab.scenario.by_method(method)[0]
    address = PUBLIC_RESOLVER if trigger == "dns" else site.address
    out = trace_json(lab, control.domain, ["--trigger", trigger, "--address", address, "--max-hops", "6"])
    assert out["result"] == "none_observed", out
