"""A lab with several ISPs sharing one world: a multi-ISP scenario (``[[isp]]``, e.g.
``vantage-3isp``), one volunteer per ISP.

Topology (no link to the root namespace, no default route anywhere)::

    volunteer ── isp ── bb1 ── bb2 ──┐     (chain 1: instance INSTi1, links 100.64.17-20.0/24)
    volunteer ── isp ── bb1 ── bb2 ──┼── world     (instance INST: DNS, sites, helper,
    volunteer ── isp ── bb1 ── bb2 ──┘              and COLLECTOR for a collector)

Each ISP's chain is a :class:`~kzprobe.lab.core.Lab` of its own instance (``INSTi1``, ``INSTi2`` …)
without a world namespace, built with that ISP's view of the scenario (its resolver, its
middleboxes); the world is the instance ``INST`` with only its world namespace, built from every
site with the union of their methods (a server that must answer late for one ISP's injector does
so for all).  Service addresses are the one-ISP lab's in every chain; only the link addresses
differ per chain (topology.CHAIN_STRIDE), which is what the world routes back on.  Teardown is
``destroy`` of each instance, from names alone, as for any lab.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from kzprobe.lab import services
from kzprobe.lab.core import Lab, compare, probe_argv
from kzprobe.lab.scenario import ROLES, Isp, Scenario, load
from kzprobe.lab.topology import (
    DEFAULT_PREFIX,
    INSTANCE_RE,
    ISP_RESOLVER,
    NETNS_ETC,
    LabError,
    address,
    destroy,
    link_net,
    lo_addresses,
    node_commands,
    require_root,
    run,
)

#: An address in the world (inside its 198.51.100.128/25, which every chain routes to it) kept
#: free for a server a test adds there, such as ``kzprobe collector``.
COLLECTOR = "198.51.100.220"
CHAIN_ROLES = ROLES[:-1]


def world_scenario(scenario: Scenario) -> Scenario:
    """The sites as the world serves them: each with every method any ISP applies to it, because
    the world's side of some methods (a late server, a slow authoritative) is the same for all."""
    sites = []
    for i, base in enumerate(scenario.sites):
        methods = dict.fromkeys(base.methods)
        for isp in scenario.isps:
            methods.update(dict.fromkeys(isp.scenario.sites[i].methods))
        sites.append(dataclasses.replace(base, methods=tuple(methods)))
    return dataclasses.replace(scenario, sites=tuple(sites), isps=(), name=f"{scenario.name}/world")


def world_commands(world: str, chains: list[str]) -> list[str]:
    """``ip -batch`` lines for the shared world: its service addresses, one link per chain, and
    routes back to each chain's links (pure).  ``chains[c-1]`` is chain c's instance."""
    cmds = ["link set lo up", f"addr add {COLLECTOR}/32 dev lo"]
    for c, inst in enumerate(chains, 1):
        dev = f"{inst}-w2"
        cmds += [f"addr add {address('world', 'down', c)}/24 dev {dev}", f"link set {dev} up"]
        for k in range(len(ROLES) - 2):
            cmds.append(f"route replace {link_net(k, c)} via {address('bb2', 'up', c)}")
    return cmds


class MultiLab:
    """Several ISPs, one world.

    >>> with MultiLab("vantage-3isp") as lab:                       # doctest: +SKIP
    ...     for isp, chain in lab.chains:
    ...         chain.exec("volunteer", ["curl", "-sk", "https://ratel.kz/"])
    """

    def __init__(self, scenario: str | Path | Scenario = "vantage-3isp", instance: str | None = None) -> None:
        self.scenario = scenario if isinstance(scenario, Scenario) else load(scenario)
        if not self.scenario.isps:
            raise LabError(f"scenario {self.scenario.name} declares no [[isp]]: use the one-ISP lab (Lab)")
        if self.scenario.endpoints or self.scenario.outages:
            raise LabError(f"scenario {self.scenario.name}: [[endpoint]] and [[outage]] are not supported "
                           "with [[isp]] yet")
        self.instance = instance or DEFAULT_PREFIX + secrets.token_hex(2)
        if not INSTANCE_RE.match(self.instance) or len(self.instance) > 9:
            raise LabError(f"instance name {self.instance!r}: use 1-9 lowercase letters/digits, starting with a letter "
                           "(each ISP's chain adds a suffix)")
        self.world = Lab(world_scenario(self.scenario), instance=self.instance)
        #: (ISP, its chain) in the scenario's order; chain c (1-based) is instance INSTi<c>.
        self.chains: list[tuple[Isp, Lab]] = [
            (isp, Lab(isp.scenario, instance=f"{self.instance}i{c}")) for c, isp in enumerate(self.scenario.isps, 1)
        ]
        self.collector_address = COLLECTOR

    def chain(self, isp_name: str) -> Lab:
        for isp, lab in self.chains:
            if isp.name == isp_name:
                return lab
        raise KeyError(isp_name)

    def measure(self, timeout: float = 3.0, extra: dict[str, list[str]] | None = None,
                env: dict[str, dict[str, str]] | None = None) -> list[tuple[Isp, dict[str, Any]]]:
        """``kzprobe run`` from every ISP's volunteer at once (each declaring its ISP's network
        name, ASN and country, as a volunteer would); each ISP's JSON envelope, in chain order.
        ``extra``/``env``: more options / environment variables per ISP name (e.g. ``--upload``)."""
        with ThreadPoolExecutor(len(self.chains)) as pool:
            docs = list(pool.map(lambda job: _probe(job[0], job[1], timeout, (extra or {}).get(job[0].name, []),
                                                    (env or {}).get(job[0].name)), self.chains))
        return list(zip([isp for isp, _ in self.chains], docs, strict=True))

    def compare(self, measured: list[tuple[Isp, dict[str, Any]]]) -> list[dict[str, Any]]:
        """One row per (ISP, site): that ISP's expectation (its view of the scenario) against
        what its volunteer's kzprobe said; rows as :func:`~kzprobe.lab.core.compare`'s plus ``isp``."""
        return [{"isp": isp.name, **row} for isp, doc in measured for row in compare(isp.scenario, doc["verdicts"])]

    def __enter__(self) -> MultiLab:
        return self.up()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.down()

    def _labs(self) -> list[Lab]:
        return [self.world, *(lab for _, lab in self.chains)]

    def down(self) -> None:
        for lab in self._labs():
            lab.down()

    def up(self) -> MultiLab:
        require_root()
        for tool in ("ip", "iptables", "nft", "tc", "dnsmasq", "nginx"):
            if shutil.which(tool) is None:
                raise LabError(f"'{tool}' is not installed (see the README: apt-get install ...)")
        for lab in self._labs():
            destroy(lab.instance)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        w = self.world
        for lab in self._labs():
            lab.state_dir.mkdir(parents=True, exist_ok=True)
        self._make_network()
        w._make_pki()
        w._write_targets()
        all_waits: list[tuple[Lab, dict[str, list[str]]]] = [(w, {"world": [], "isp": [], "files": []})]
        services.start_world(w, all_waits[0][1])
        for _, lab in self.chains:
            # One PKI (the world's): the volunteers trust its root, the ISPs' interception proxies
            # use its Qaznet certificates.
            lab.ca_path, lab.interception_ca_path = w.ca_path, w.interception_ca_path
            lab.certs, lab.default_cert, lab.blockpage_cert = w.certs, w.default_cert, w.blockpage_cert
            lab.helper_url = w.helper_url
            lab._write_targets()
            waits_c: dict[str, list[str]] = {"world": [], "isp": [], "files": []}
            services.start_isp(lab, waits_c, world=w.scenario)
            lab._apply_middleboxes()
            all_waits.append((lab, waits_c))
        with ThreadPoolExecutor(len(all_waits)) as pool:
            list(pool.map(lambda job: job[0]._wait(job[1]), all_waits))
        for lab in self._labs():
            (lab.state_dir / "up.json").write_text(json.dumps({
                "instance": lab.instance, "scenario": str(self.scenario.path), "name": lab.scenario.name,
                "helper_url": w.helper_url, "multi": self.instance,
            }))

    def _make_network(self) -> None:
        w = self.world
        root = [f"netns add {w.ns_name('world')}"]
        for _, lab in self.chains:
            root += [f"netns add {lab.ns_name(r)}" for r in CHAIN_ROLES]
            for a, b in itertools.pairwise(CHAIN_ROLES):
                root.append(f"link add {lab.veth(a, 'up')} netns {lab.ns_name(a)} type veth "
                            f"peer name {lab.veth(b, 'down')} netns {lab.ns_name(b)}")
            root.append(f"link add {lab.veth('bb2', 'up')} netns {lab.ns_name('bb2')} type veth "
                        f"peer name {lab.instance}-w2 netns {w.ns_name('world')}")
        run(["ip", "-batch", "-"], input="\n".join(root) + "\n")
        jobs: list[tuple[Lab, str, list[str]]] = [
            (w, "world", world_commands(w.instance, [lab.instance for _, lab in self.chains])
             + [f"addr add {a}/32 dev lo" for a in lo_addresses("world", w.scenario)]),
        ]
        for c, (_, lab) in enumerate(self.chains, 1):
            NETNS_ETC.joinpath(lab.ns_name("volunteer")).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / lab.ns_name("volunteer") / "resolv.conf").write_text(
                f"# kzprobe lab {lab.instance}: the ISP's resolver\nnameserver {ISP_RESOLVER}\n")
            jobs += [(lab, r, node_commands(lab.instance, r, lab.scenario, chain=c)) for r in CHAIN_ROLES]

        def configure(job: tuple[Lab, str, list[str]]) -> None:
            lab, role, cmds = job
            run(["ip", "-n", lab.ns_name(role), "-batch", "-"], input="\n".join(cmds) + "\n")
            sysctl = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
            if role not in ("volunteer", "world"):
                sysctl.append("net.ipv4.ip_forward=1")
            lab.exec(role, ["sysctl", "-q", "-w", *sysctl], check=True, capture_output=True)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(configure, jobs))


def _probe(isp: Isp, chain: Lab, timeout: float, extra: list[str], env: dict[str, str] | None) -> dict[str, Any]:
    """``kzprobe run`` in one chain's volunteer namespace; its JSON envelope.  A run that printed no
    JSON is a LabError naming the ISP and kzprobe's last stderr line (its whole stderr stays in the
    chain's state directory, probe.stderr), as the one-ISP lab's run_probe_doc does."""
    argv = [*probe_argv(chain, timeout), "--network-name", isp.name, "--asn", isp.asn, "--country", isp.country,
            *extra]
    p = chain.exec("volunteer", argv, capture_output=True, text=True, env={**os.environ, **env} if env else None)
    (chain.state_dir / "probe.stderr").write_text(p.stderr)
    try:
        doc = json.loads(p.stdout)
    except json.JSONDecodeError:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise LabError(f"{isp.name}: kzprobe run failed (exit {p.returncode}): {last}") from None
    if isinstance(doc, list):
        doc = {"verdicts": doc}
    verdicts = doc.get("verdicts") if isinstance(doc, dict) else None
    if not isinstance(verdicts, list) or not all(isinstance(v, dict) for v in verdicts):
        raise LabError(f"{isp.name}: kzprobe run printed JSON that holds no list of verdicts")
    return doc
