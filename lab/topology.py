"""The lab's topology: names, addresses, namespaces, links and routes, and their removal.

Topology (one chain, no link to the root namespace, no default route anywhere)::

    volunteer ── isp ── bb1 ── bb2 ── world
    100.64.1.1   .1.2   .2.2   .3.2   .4.2     (each hop's address on the side facing the volunteer)

* isp: the ISP resolver (dnsmasq, 198.51.100.53) with the DNS blocking, and the ISP's blockpage
  server (nginx, 198.51.100.80).  TEST-NET-2's lower half is "the ISP".
* bb1, bb2: backbone routers; bb2 is the DPI box by default.  Middleboxes live on whatever hop
  a site's entry names.
* world: the authoritative DNS (198.51.100.153), the open "public" resolver (198.51.100.200),
  the slow authoritative for injected names (198.51.100.154), the control helper
  (198.51.100.210:8080), and every site's web server (nginx) on its own 203.0.113.x address(es).

Addresses are the same in every instance: instances never share a link, so they cannot collide;
only names (namespaces, veths, state directories) carry the instance.

Everything that ``up`` creates lives inside the instance's namespaces (links, addresses, routes,
nft/iptables rules, qdiscs, processes) or under ``/run/kzprobe-lab/<instance>`` and
``/etc/netns/<ns>``, so ``destroy`` is: kill every pid in the namespaces, delete the namespaces,
delete those two directories.  That also works after a crash, from names alone.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kzprobe.lab.endpoints import world_addresses
from kzprobe.lab.scenario import ROLES, Scenario

STATE_ROOT = Path("/run/kzprobe-lab")
NETNS_ETC = Path("/etc/netns")
DEFAULT_PREFIX = "kzl"
INSTANCE_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")

ISP_RESOLVER = "198.51.100.53"
BLOCKPAGE = "198.51.100.80"
AUTH_DNS = "198.51.100.153"
SLOW_DNS = "198.51.100.154"
PUBLIC_RESOLVER = "198.51.100.200"
HELPER = "198.51.100.210"
HELPER_PORT = 8080

LETTER = {"volunteer": "v", "isp": "i", "bb1": "1", "bb2": "2", "world": "w"}
#: Prefixes each role owns besides its link addresses.
OWNED: dict[str, tuple[str, ...]] = {
    "volunteer": (),
    "isp": ("198.51.100.0/25",),
    "bb1": (),
    "bb2": (),
    "world": ("198.51.100.128/25", "203.0.113.0/24"),
}


class LabError(RuntimeError):
    """A lab operation that cannot proceed; the message is meant for the user, on one line."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("kzprobe lab needs root (it creates network namespaces); run it with sudo")


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv[:6])}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


#: A multi-ISP lab (lab/multi.py) has one chain volunteer..bb2 per ISP, all joining one world;
#: chain c's links are 100.64.(CHAIN_STRIDE*c + i + 1).0/24, so the world can route back to each.
#: Chain 0 is the one-ISP lab's.
CHAIN_STRIDE = 16


def link_net(i: int, chain: int = 0) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"100.64.{CHAIN_STRIDE * chain + i + 1}.0/24")


def address(role: str, side: str, chain: int = 0) -> str:
    """The role's address on the link toward the volunteer ("down") or toward the world ("up")."""
    i = ROLES.index(role)
    if side == "down":
        return str(link_net(i - 1, chain).network_address + 2)
    return str(link_net(i, chain).network_address + 1)


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def instances(prefix: str = "") -> list[str]:
    """Instances that have a namespace or a state directory (a crash can leave either)."""
    found: set[str] = set()
    for ns in list_namespaces():
        inst, _, role = ns.rpartition("-")
        if role in ROLES and inst.startswith(prefix) and INSTANCE_RE.match(inst):
            found.add(inst)
    if STATE_ROOT.is_dir():
        found.update(p.name for p in STATE_ROOT.iterdir() if p.name.startswith(prefix))
    return sorted(found)


def _kill_namespace_pids(ns: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in run(["ip", "netns", "pids", ns], check=False).split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if not run(["ip", "netns", "pids", ns], check=False).split():
                return
            time.sleep(0.05)


def destroy(instance: str) -> None:
    """Remove everything an instance made; safe to call on a half-built or already-gone one."""
    require_root()
    namespaces = [f"{instance}-{r}" for r in ROLES]
    existing = set(list_namespaces())
    state = STATE_ROOT / instance
    # Processes first: a server holding a socket in a namespace keeps it alive after `ip netns del`.
    # Also pids we recorded but that somehow left their namespace (they never should).
    with ThreadPoolExecutor(len(namespaces)) as pool:
        list(pool.map(_kill_namespace_pids, [n for n in namespaces if n in existing]))
    pidfile = state / "pids"
    if pidfile.is_file():
        for line in pidfile.read_text().split():
            try:
                os.kill(int(line), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for ns in namespaces:
        if ns in existing:
            run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)


def down_all(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove every lab instance whose name starts with ``prefix`` (leftovers after a crash)."""
    gone = instances(prefix)
    for inst in gone:
        destroy(inst)
    return gone


def veth(instance: str, role: str, side: str) -> str:
    """The interface of ``role`` toward the volunteer (side="down") or the world ("up")."""
    i = ROLES.index(role)
    peer = ROLES[i - 1] if side == "down" else ROLES[i + 1]
    return f"{instance}-{LETTER[role]}{LETTER[peer]}"


def lo_addresses(role: str, scenario: Scenario) -> list[str]:
    """Service addresses a role holds on its loopback (routed to it by every other node)."""
    if role == "isp":
        return [ISP_RESOLVER, BLOCKPAGE]
    if role == "world":
        return [AUTH_DNS, SLOW_DNS, PUBLIC_RESOLVER, HELPER, *(a for s in scenario.sites for a in s.addresses),
                *world_addresses(scenario.endpoints)]
    return []


def node_commands(instance: str, role: str, scenario: Scenario, chain: int = 0) -> list[str]:
    """``ip -batch`` lines for one node: links up, addresses, static routes (pure).  ``chain``
    picks the link addresses (see CHAIN_STRIDE)."""
    i = ROLES.index(role)
    cmds = ["link set lo up"]
    if i > 0:
        cmds += [f"addr add {address(role, 'down', chain)}/24 dev {veth(instance, role, 'down')}",
                 f"link set {veth(instance, role, 'down')} up"]
    if i < len(ROLES) - 1:
        cmds += [f"addr add {address(role, 'up', chain)}/24 dev {veth(instance, role, 'up')}",
                 f"link set {veth(instance, role, 'up')} up"]
    for addr in lo_addresses(role, scenario):
        cmds.append(f"addr add {addr}/32 dev lo")
    # Static routes to every other node's prefixes and every non-attached link, through the
    # neighbour on that side.  No default route: anything else is unreachable, by design.
    up_gw = address(ROLES[i + 1], "down", chain) if i < len(ROLES) - 1 else ""
    down_gw = address(ROLES[i - 1], "up", chain) if i > 0 else ""
    for j, other in enumerate(ROLES):
        for p in OWNED[other]:
            if j != i:
                cmds.append(f"route replace {p} via {up_gw if j > i else down_gw}")
    for k in range(len(ROLES) - 1):
        if k not in (i - 1, i):
            cmds.append(f"route replace {link_net(k, chain)} via {up_gw if k > i else down_gw}")
    return cmds
