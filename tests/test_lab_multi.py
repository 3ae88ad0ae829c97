"""The multi-ISP lab's pure parts (no root): per-ISP views of a scenario, the shared world's sites
and links, distinct link addresses per chain, and one-line errors for bad ``[[isp]]`` files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kzprobe.lab.core import Lab
from kzprobe.lab.multi import COLLECTOR, world_commands, world_scenario
from kzprobe.lab.scenario import ScenarioError, load, parse
from kzprobe.lab.topology import LabError, address, link_net, node_commands

HEAD = "[[isp]]\nname='A'\nasn='AS1'\ncountry='KZ'\n[[isp]]\nname='B'\nasn='AS2'\ncountry='KZ'\n"
SITE = "[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\nexpect='ok'\nreason='x'\n"


def _parse(text: str) -> object:
    import tomllib

    return parse(tomllib.loads(text), Path("t.toml"))


def test_vantage_3isp_gives_each_isp_its_own_censorship() -> None:
    sc = load("vantage-3isp")
    assert [i.name for i in sc.isps] == ["KazNet", "Beeline KZ", "Tele2 KZ"]
    # The base view (an ISP that censors nothing) and the per-ISP views share every site.
    assert all(not s.methods and s.expect == "ok" for s in sc.sites)
    views = {i.name: {s.domain: (s.methods, s.hop, s.expect) for s in i.scenario.sites} for i in sc.isps}
    assert views["KazNet"]["ratel.kz"] == (("sni-reset",), "bb2", "blocked/dpi")
    assert views["Beeline KZ"]["ratel.kz"] == (("dns-nxdomain",), "isp", "blocked/dns")
    assert views["Tele2 KZ"]["ratel.kz"] == ((), "", "ok")
    assert views["Tele2 KZ"]["avaaz.org"] == (("ip-drop",), "bb1", "blocked/ip")
    for i in sc.isps:
        assert [(s.domain, s.address) for s in i.scenario.sites] == [(s.domain, s.address) for s in sc.sites]
        assert views[i.name]["mail.ru"][2] == "ok"
    # Every ISP blocks something, and no two block the same set.
    blocked = [frozenset((d, e) for d, (_, _, e) in v.items() if e != "ok") for v in views.values()]
    assert all(blocked) and len(set(blocked)) == 3
    # The world serves each site with the union of the methods applied to it.
    world = world_scenario(sc)
    assert not world.isps
    assert set(world.site("ratel.kz").methods) == {"sni-reset", "dns-nxdomain"}


def test_a_one_isp_lab_refuses_a_multi_isp_scenario() -> None:
    with pytest.raises(LabError, match=r"3 ISPs.*MultiLab"):
        Lab("vantage-3isp")


def test_chains_get_distinct_link_addresses_and_the_world_routes_back_to_each() -> None:
    sc = load("vantage-3isp")
    nets = {str(link_net(k, c)) for c in range(4) for k in range(4)}
    assert len(nets) == 16
    assert address("volunteer", "up") == "100.64.1.1"  # chain 0 is the one-ISP lab, unchanged
    assert address("volunteer", "up", 2) == "100.64.33.1"
    cmds = node_commands("kzlxi2", "bb2", sc.isps[1].scenario, chain=2)
    assert f"addr add {address('bb2', 'up', 2)}/24 dev kzlxi2-2w" in cmds
    assert f"route replace 203.0.113.0/24 via {address('world', 'down', 2)}" in cmds
    w = world_commands("kzlx", ["kzlxi1", "kzlxi2"])
    assert f"addr add {COLLECTOR}/32 dev lo" in w
    for c, inst in ((1, "kzlxi1"), (2, "kzlxi2")):
        assert f"addr add {address('world', 'down', c)}/24 dev {inst}-w2" in w
        for k in range(3):
            assert f"route replace {link_net(k, c)} via {address('bb2', 'up', c)}" in w
    assert not any("default" in line for line in w + cmds)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (HEAD + SITE + "[site.isp.C]\nmethod='dns-nxdomain'\n", "isp 'C' is not declared"),
        (HEAD + SITE + "[site.isp.A]\naddress='203.0.113.6'\n", r"key\(s\) address are the site's own"),
        (HEAD + SITE + "[site.isp.A]\nmethod='down'\n", "'down' is the site's"),
        (HEAD + SITE + "[site.isp.A]\nmethod='sni-reset'\nhop='world'\nexpect='blocked/dpi'\n",
         "cannot run at hop 'world'"),
        ("[[isp]]\nname='A'\n" + SITE, "needs exactly name, asn and country"),
        (HEAD + HEAD.split("[[isp]]\nname='B'")[0] + SITE, "isp 'A' appears twice"),
        (SITE + "[site.isp.A]\nmethod='dns-nxdomain'\n", "isp 'A' is not declared"),
    ],
)
def test_bad_multi_isp_files_give_one_line_errors(body: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message) as exc:
        _parse(body)
    assert "t.toml" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.lab
def test_lab_up_builds_a_multi_isp_scenario_and_down_removes_every_chain() -> None:
    import os
    import secrets
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "nft", "dnsmasq", "nginx", "curl")):
        pytest.skip("the lab needs root, iproute2, iptables, nftables, dnsmasq, nginx and curl")
    from kzprobe.lab.topology import list_namespaces

    kz = [sys.executable, "-m", "kzprobe.cli", "lab"]
    inst = "kzl" + secrets.token_hex(3)  # (lab status lists kzl* instances)
    try:
        up = subprocess.run([*kz, "up", "--scenario", "vantage-3isp", "--instance", inst], capture_output=True,
                            text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        status = subprocess.run([*kz, "status"], capture_output=True, text=True, timeout=60).stdout
        for name in (inst, f"{inst}i1", f"{inst}i2", f"{inst}i3"):
            assert f"{name}: up;" in status, status
        ca = f"/run/kzprobe-lab/{inst}/ca.pem"

        def fetch(chain: str, url: str) -> str:
            return subprocess.run([*kz, "exec", "--instance", chain, "--", "curl", "-s", "-m", "5", "-o", "/dev/null",
                                   "-w", "%{http_code}", "--cacert", ca, url], capture_output=True, text=True).stdout

        # From the scenario: Beeline (chain 2) answers NXDOMAIN for ratel.kz; Tele2 (chain 3) does not block it.
        assert fetch(f"{inst}i2", "https://ratel.kz/") == "000"
        assert fetch(f"{inst}i3", "https://ratel.kz/") == "200"
        assert fetch(f"{inst}i2", "https://mail.ru/") == "200"
    finally:
        down = subprocess.run([*kz, "down", "--instance", inst], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not [ns for ns in list_namespaces() if ns.startswith(inst)]
