"""The lab network: namespaces, links, routes, servers and middleboxes for one scenario.

Topology (one chain, no link to the root namespace, no default route anywhere)::

    volunteer ── isp ── bb1 ── bb2 ── world
    100.64.1.1   .1.2   .2.2   .3.2   .4.2     (each hop's address on the side facing the volunteer)

* isp: the ISP resolver (dnsmasq, 198.51.100.53) with the DNS blocking, and the ISP's blockpage
  server (198.51.100.80).  TEST-NET-2's lower half is "the ISP".
* bb1, bb2: backbone routers; bb2 is the DPI box by default.  Middleboxes live on whatever hop
  a site's entry names.
* world: the authoritative DNS (198.51.100.153), the open "public" resolver (198.51.100.200),
  the slow authoritative for injected names (198.51.100.154), the control helper
  (198.51.100.210:8080), and every site's web server on its own 203.0.113.x address.

Addresses are the same in every instance: instances never share a link, so they cannot collide;
only names (namespaces, veths, state directories) carry the instance.

Everything that ``up`` creates lives inside the instance's namespaces (links, addresses, routes,
nft/iptables rules, qdiscs, processes) or under ``/run/kzprobe-lab/<instance>`` and
``/etc/netns/<ns>``, so ``down`` is: kill every pid in the namespaces, delete the namespaces,
delete those two directories.  That also works after a crash, from names alone.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from kzprobe.lab.scenario import ROLES, Scenario, Site, load

STATE_ROOT = Path("/run/kzprobe-lab")
NETNS_ETC = Path("/etc/netns")
DEFAULT_PREFIX = "kzl"
_INSTANCE_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")

ISP_RESOLVER = "198.51.100.53"
BLOCKPAGE = "198.51.100.80"
AUTH_DNS = "198.51.100.153"
SLOW_DNS = "198.51.100.154"
PUBLIC_RESOLVER = "198.51.100.200"
HELPER = "198.51.100.210"
HELPER_PORT = 8080
MITM_PORT = 8443
#: Seconds the real server waits when an on-path HTTP injector races it (see Site.server_delay).
INJECTION_SERVER_DELAY = 0.5
#: Seconds the slow authoritative waits, for the DNS injector's race.
INJECTION_DNS_DELAY = 0.3

_LETTER = {"volunteer": "v", "isp": "i", "bb1": "1", "bb2": "2", "world": "w"}
#: Prefixes each role owns besides its link addresses.
_OWNED: dict[str, tuple[str, ...]] = {
    "volunteer": (),
    "isp": ("198.51.100.0/25",),
    "bb1": (),
    "bb2": (),
    "world": ("198.51.100.128/25", "203.0.113.0/24"),
}

BLOCKPAGE_HTML = (
    "<h1>Страница заблокирована</h1>\n<p>Доступ к данному ресурсу ограничен в соответствии с "
    "законодательством Республики Казахстан.</p>\n<p>Access to this resource is restricted.</p>"
)


class LabError(RuntimeError):
    """A lab operation that cannot proceed; the message is meant for the user, on one line."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("kzprobe lab needs root (it creates network namespaces); run it with sudo")


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv[:6])}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _link_net(i: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"100.64.{i + 1}.0/24")


def _address(role: str, side: str) -> str:
    """The role's address on the link toward the volunteer ("down") or toward the world ("up")."""
    i = ROLES.index(role)
    if side == "down":
        return str(_link_net(i - 1).network_address + 2)
    return str(_link_net(i).network_address + 1)


def list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def instances(prefix: str = "") -> list[str]:
    """Instances that have a namespace or a state directory (a crash can leave either)."""
    found: set[str] = set()
    for ns in list_namespaces():
        inst, _, role = ns.rpartition("-")
        if role in ROLES and inst.startswith(prefix) and _INSTANCE_RE.match(inst):
            found.add(inst)
    if STATE_ROOT.is_dir():
        found.update(p.name for p in STATE_ROOT.iterdir() if p.name.startswith(prefix))
    return sorted(found)


def _kill_namespace_pids(ns: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if not _run(["ip", "netns", "pids", ns], check=False).split():
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
            _run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)


def down_all(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove every lab instance whose name starts with ``prefix`` (leftovers after a crash)."""
    gone = instances(prefix)
    for inst in gone:
        destroy(inst)
    return gone


_POLL = r"""
import socket, sys, time
want = [a.rsplit(":", 1) for a in sys.argv[2:]]
deadline = time.monotonic() + float(sys.argv[1])
while want and time.monotonic() < deadline:
    left = []
    for host, port in want:
        s = socket.socket()
        s.settimeout(0.2)
        try:
            s.connect((host, int(port)))
        except OSError:
            left.append((host, port))
        finally:
            s.close()
    want = left
    if want:
        time.sleep(0.02)
if want:
    print(" ".join(f"{h}:{p}" for h, p in want))
    sys.exit(1)
"""


class Lab:
    """One running (or runnable) lab instance.

    >>> with Lab("method-sni-reset") as lab:            # doctest: +SKIP
    ...     lab.exec("volunteer", ["curl", "-sk", "https://ratel.kz/"])
    """

    def __init__(self, scenario: str | Path | Scenario = "kz2014", instance: str | None = None) -> None:
        self.scenario: Scenario = scenario if isinstance(scenario, Scenario) else load(scenario)
        self.instance = instance or DEFAULT_PREFIX + secrets.token_hex(2)
        if not _INSTANCE_RE.match(self.instance):
            raise LabError(
                f"instance name {self.instance!r}: use 1-12 lowercase letters/digits, starting with a letter"
            )
        self.state_dir = STATE_ROOT / self.instance
        self.ca_path = self.state_dir / "ca.pem"
        self.interception_ca_path = self.state_dir / "qaznet-ca.pem"
        self.targets_file = self.state_dir / "targets.txt"
        self.expected_file = self.state_dir / "expected.json"
        self.isp_resolver = ISP_RESOLVER
        self.public_resolver = PUBLIC_RESOLVER
        self.blockpage = BLOCKPAGE
        self.helper_url: str | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- names ------------------------------------------------------------------------------------
    def ns_name(self, role: str) -> str:
        if role not in ROLES:
            raise LabError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        return f"{self.instance}-{role}"

    def veth(self, role: str, side: str) -> str:
        """The interface of ``role`` toward the volunteer (side="down") or the world ("up")."""
        i = ROLES.index(role)
        peer = ROLES[i - 1] if side == "down" else ROLES[i + 1]
        return f"{self.instance}-{_LETTER[role]}{_LETTER[peer]}"

    def router_address(self, role: str) -> str:
        """The source address a TTL sweep from the volunteer sees for this hop."""
        if role == "volunteer":
            return _address("volunteer", "up")
        return _address(role, "down")

    @property
    def volunteer_address(self) -> str:
        return _address("volunteer", "up")

    def is_up(self) -> bool:
        existing = set(list_namespaces())
        return all(self.ns_name(r) in existing for r in ROLES) and (self.state_dir / "up.json").is_file()

    # -- running things ---------------------------------------------------------------------------
    def exec(self, role: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside the role's namespace (``subprocess.run`` keyword arguments apply)."""
        return subprocess.run(["ip", "netns", "exec", self.ns_name(role), *argv], **kwargs)

    def popen(self, role: str, argv: Sequence[str], log: str) -> subprocess.Popen[bytes]:
        logf = open(self.state_dir / f"{log}.log", "ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns_name(role), *argv],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        logf.close()
        self._procs.append(proc)
        with open(self.state_dir / "pids", "a") as f:
            f.write(f"{proc.pid}\n")
        return proc

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.down()

    def down(self) -> None:
        destroy(self.instance)
        for p in self._procs:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()

    def up(self) -> Lab:
        require_root()
        for tool in ("ip", "iptables", "nft", "tc", "dnsmasq"):
            if shutil.which(tool) is None:
                raise LabError(f"'{tool}' is not installed (see the README: apt-get install ...)")
        if self.is_up():
            info = json.loads((self.state_dir / "up.json").read_text())
            if info.get("scenario") == str(self.scenario.path):
                self.helper_url = info.get("helper_url")
                return self
        destroy(self.instance)
        try:
            self._build()
        except BaseException:
            destroy(self.instance)
            raise
        return self

    def _build(self) -> None:
        t0 = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._make_network()
        self._make_pki()
        self._write_targets()
        waits = self._start_services()
        self._apply_middleboxes()
        self._wait(waits)
        (self.state_dir / "up.json").write_text(json.dumps({
            "instance": self.instance, "scenario": str(self.scenario.path),
            "name": self.scenario.name, "helper_url": self.helper_url,
            "seconds": round(time.monotonic() - t0, 2),
        }))

    # -- network ----------------------------------------------------------------------------------
    def _make_network(self) -> None:
        root = []
        for r in ROLES:
            root.append(f"netns add {self.ns_name(r)}")
        for a, b in itertools.pairwise(ROLES):
            root.append(
                f"link add {self.veth(a, 'up')} netns {self.ns_name(a)} type veth "
                f"peer name {self.veth(b, 'down')} netns {self.ns_name(b)}"
            )
        _run(["ip", "-batch", "-"], input="\n".join(root) + "\n")
        NETNS_ETC.joinpath(self.ns_name("volunteer")).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / self.ns_name("volunteer") / "resolv.conf").write_text(
            f"# kzprobe lab {self.instance}: the ISP's resolver\nnameserver {ISP_RESOLVER}\n"
        )
        jobs = [(r, self._node_commands(r)) for r in ROLES]

        def configure(job: tuple[str, list[str]]) -> None:
            role, cmds = job
            _run(["ip", "-n", self.ns_name(role), "-batch", "-"], input="\n".join(cmds) + "\n")
            sysctl = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
            if role not in ("volunteer", "world"):
                sysctl.append("net.ipv4.ip_forward=1")
            self.exec(role, ["sysctl", "-q", "-w", *sysctl], check=True, capture_output=True)

        with ThreadPoolExecutor(len(jobs)) as pool:
            list(pool.map(configure, jobs))

    def _node_commands(self, role: str) -> list[str]:
        i = ROLES.index(role)
        cmds = ["link set lo up"]
        if i > 0:
            cmds += [f"addr add {_address(role, 'down')}/24 dev {self.veth(role, 'down')}",
                     f"link set {self.veth(role, 'down')} up"]
        if i < len(ROLES) - 1:
            cmds += [f"addr add {_address(role, 'up')}/24 dev {self.veth(role, 'up')}",
                     f"link set {self.veth(role, 'up')} up"]
        for addr in self._lo_addresses(role):
            cmds.append(f"addr add {addr}/32 dev lo")
        # Static routes to every other node's prefixes and every non-attached link, through the
        # neighbour on that side.  No default route: anything else is unreachable, by design.
        up_gw = _address(ROLES[i + 1], "down") if i < len(ROLES) - 1 else ""
        down_gw = _address(ROLES[i - 1], "up") if i > 0 else ""
        for j, other in enumerate(ROLES):
            for p in _OWNED[other]:
                if j != i:
                    cmds.append(f"route replace {p} via {up_gw if j > i else down_gw}")
        for k in range(len(ROLES) - 1):
            if k not in (i - 1, i):
                cmds.append(f"route replace {_link_net(k)} via {up_gw if k > i else down_gw}")
        return cmds

    def _lo_addresses(self, role: str) -> list[str]:
        if role == "isp":
            return [ISP_RESOLVER, BLOCKPAGE]
        if role == "world":
            return [AUTH_DNS, SLOW_DNS, PUBLIC_RESOLVER, HELPER, *(s.address for s in self.scenario.sites)]
        return []

    # -- certificates -----------------------------------------------------------------------------
    def _make_pki(self) -> None:
        import trustme

        certs = self.state_dir / "certs"
        certs.mkdir(exist_ok=True)
        ca = trustme.CA(organization_name="kzprobe lab CA")
        ca.cert_pem.write_to_path(str(self.ca_path))
        qaznet = trustme.CA(organization_name="Qaznet Trust Network",
                            organization_unit_name="Qaznet Trust Network")
        qaznet.cert_pem.write_to_path(str(self.interception_ca_path))
        self._certs: dict[str, dict[str, list[str]]] = {"world": {}, "mitm": {}}

        def issue(authority: Any, kind: str, key: str, names: Iterable[str]) -> list[str]:
            leaf = authority.issue_cert(*names)
            cert_p, key_p = certs / f"{kind}-{key}.pem", certs / f"{kind}-{key}.key"
            # The chain, so that clients that trust only the root still verify.
            cert_p.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
            leaf.private_key_pem.write_to_path(str(key_p))
            return [str(cert_p), str(key_p)]

        for s in self.scenario.sites:
            names = [s.domain, *s.aliases]
            if f"www.{s.domain}" not in names:
                names.append(f"www.{s.domain}")
            self._certs["world"][s.domain] = issue(ca, "site", s.domain, names)
            if "tls-mitm" in s.methods:
                self._certs["mitm"][s.domain] = issue(qaznet, "mitm", s.domain, names)
        self._default_cert = issue(ca, "site", "default", ["example.com", "www.example.com"])
        self._blockpage_cert = issue(ca, "site", "blockpage", ["blocked.isp.lab"])

    def _write_targets(self) -> None:
        self.targets_file.write_text("".join(f"{s.url}\n" for s in self.scenario.sites))
        self.expected_file.write_text(json.dumps(self.expected(), indent=2, ensure_ascii=False) + "\n")

    def expected(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.name,
            "targets": [
                {"target": s.url, "domain": s.domain, "expect": s.expect, "methods": list(s.methods),
                 "hop": s.hop, "address": s.address, "reason": s.reason}
                for s in self.scenario.sites
            ],
        }

    # -- services ---------------------------------------------------------------------------------
    def _config(self, name: str, data: dict[str, Any]) -> str:
        p = self.state_dir / f"{name}.json"
        p.write_text(json.dumps(data, ensure_ascii=False, indent=1))
        return str(p)

    def _dnsmasq(self, role: str, name: str, address: str, lines: list[str]) -> None:
        conf = self.state_dir / f"{name}.conf"
        conf.write_text("\n".join([
            "no-resolv", "no-hosts", "no-poll", "bind-interfaces", f"listen-address={address}",
            "except-interface=nonexistent", "local-ttl=60", f"log-facility={self.state_dir}/{name}.log",
            "log-queries", *lines,
        ]) + "\n")
        self.popen(role, ["dnsmasq", "--keep-in-foreground", "--user=root", "--pid-file=", "-C", str(conf)],
                   name)

    def _start_services(self) -> dict[str, list[str]]:
        """Start every server (in parallel: they are independent); return what to wait for."""
        py = sys.executable
        sites = self.scenario.sites
        injected = [s for s in sites if "dns-injection" in s.methods]
        waits: dict[str, list[str]] = {"world": [], "isp": [], "files": []}

        # Authoritative DNS: every lab name, except those the slow authoritative answers.
        auth = []
        for s in sites:
            if s in injected:
                continue
            for n in (*s.names, f"www.{s.domain}"):
                auth.append(f"host-record={n},{s.address}")
            auth.append(f"local=/{s.domain}/")
        auth.append("host-record=example.com,203.0.113.254")
        self._dnsmasq("world", "dns-auth", AUTH_DNS, auth)
        forward = [f"server=/{s.domain}/{SLOW_DNS}" for s in injected] + [f"server={AUTH_DNS}"]
        # No cache at the public resolver: every query reaches the wire, so every query can be raced.
        self._dnsmasq("world", "dns-public", PUBLIC_RESOLVER, ["cache-size=0", *forward])
        waits["world"] += [f"{AUTH_DNS}:53", f"{PUBLIC_RESOLVER}:53"]
        if injected:
            ready = str(self.state_dir / "slowdns.ready")
            records = {n: s.address for s in injected for n in (*s.names, f"www.{s.domain}")}
            cfg = self._config("slowdns", {"address": SLOW_DNS, "records": records,
                                           "delay": INJECTION_DNS_DELAY, "ready_file": ready})
            self.popen("world", [py, "-m", "kzprobe.lab.slowdns", cfg], "slowdns")
            waits["files"].append(ready)

        # ISP resolver, configured like ISPs do it: local overrides in front of a forwarder.
        isp = list(forward)
        for s in sites:
            for n in s.names:
                if "dns-nxdomain" in s.methods:
                    isp.append(f"address=/{n}/")
                elif "dns-redirect" in s.methods:
                    isp.append(f"address=/{n}/{BLOCKPAGE}")
                elif "dns-bogon" in s.methods:
                    isp.append(f"address=/{n}/{s.bogon}")
        self._dnsmasq("isp", "dns-isp", ISP_RESOLVER, isp)
        waits["isp"].append(f"{ISP_RESOLVER}:53")

        # Web servers.
        web_sites: dict[str, dict[str, Any]] = {}
        for s in sites:
            delay = s.server_delay
            if "http-blockpage-injection" in s.methods and not delay:
                delay = INJECTION_SERVER_DELAY
            for n in (*s.names, f"www.{s.domain}"):
                web_sites[n] = {"title": s.title, "content": s.content, "size": s.size, "delay": delay}
        web_sites["example.com"] = {"title": "Example Domain", "content": "<h1>Example Domain</h1>"}
        live = [s.address for s in sites if not s.is_down]
        ready = str(self.state_dir / "web.ready")
        cfg = self._config("web", {
            "listen": live, "sites": web_sites, "ready_file": ready,
            "certs": {n: self._certs["world"][s.domain] for s in sites for n in (*s.names, f"www.{s.domain}")},
            "default_cert": self._default_cert,
        })
        self.popen("world", [py, "-m", "kzprobe.lab.webserver", cfg], "web")
        waits["files"].append(ready)
        ready = str(self.state_dir / "blockpage.ready")
        cfg = self._config("blockpage", {
            "listen": [BLOCKPAGE], "sites": {}, "ready_file": ready,
            "default_site": {"title": self.scenario.blockpage_title, "content": BLOCKPAGE_HTML},
            "default_cert": self._blockpage_cert,
        })
        self.popen("isp", [py, "-m", "kzprobe.lab.webserver", cfg], "blockpage")
        waits["files"].append(ready)

        # The control helper, if kzprobe has one yet.
        kz = [py, "-m", "kzprobe.cli"]
        probe = subprocess.run([*kz, "helper", "--help"], capture_output=True)
        if probe.returncode == 0:
            self.popen("world", [*kz, "helper", "--listen", f"{HELPER}:{HELPER_PORT}", "--allow-private",
                                 "--ca-bundle", str(self.ca_path), "--resolver", PUBLIC_RESOLVER], "helper")
            waits["world"].append(f"{HELPER}:{HELPER_PORT}")
            self.helper_url = f"http://{HELPER}:{HELPER_PORT}"

        # On-path injectors and the interception proxy, per hop.
        for hop in ("isp", "bb1", "bb2"):
            here = [s for s in sites if s.hop == hop]
            dns_rules = {n: s.forged for s in here if "dns-injection" in s.methods for n in s.names}
            http_rules = {
                n: _blockpage_document(self.scenario.blockpage_title)
                for s in here if "http-blockpage-injection" in s.methods for n in s.names
            }
            for mode, rules in (("dns", dns_rules), ("http", http_rules)):
                if rules:
                    ready = str(self.state_dir / f"inject-{mode}-{hop}.ready")
                    cfg = self._config(f"inject-{mode}-{hop}", {
                        "mode": mode, "rules": rules, "iface": self.veth(hop, "down"), "ready_file": ready,
                    })
                    self.popen(hop, [py, "-m", "kzprobe.lab.injector", cfg], f"inject-{mode}-{hop}")
                    waits["files"].append(ready)
            mitm = [s for s in here if "tls-mitm" in s.methods]
            if mitm:
                ready = str(self.state_dir / f"mitm-{hop}.ready")
                cfg = self._config(f"mitm-{hop}", {
                    "port": MITM_PORT, "ready_file": ready,
                    "certs": {n: self._certs["mitm"][s.domain] for s in mitm
                              for n in (*s.names, f"www.{s.domain}")},
                })
                self.popen(hop, [py, "-m", "kzprobe.lab.mitm", cfg], f"mitm-{hop}")
                waits["files"].append(ready)
        return waits

    def _wait(self, waits: dict[str, list[str]], timeout: float = 30.0) -> None:
        def poll(role: str) -> str:
            if not waits.get(role):
                return ""
            p = self.exec(role, [sys.executable, "-c", _POLL, str(timeout), *waits[role]],
                          capture_output=True, text=True)
            return "" if p.returncode == 0 else f"{role}: {p.stdout.strip() or p.stderr.strip()}"

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(poll, r) for r in ("world", "isp")]
            deadline = time.monotonic() + timeout
            files = list(waits["files"])
            while files and time.monotonic() < deadline:
                files = [f for f in files if not os.path.exists(f)]
                for proc in self._procs:
                    if proc.poll() is not None:
                        what = " ".join(str(a) for a in list(proc.args)[4:7])  # type: ignore[arg-type]
                        raise LabError(f"a lab server exited early ({what}); logs in {self.state_dir}")
                if files:
                    time.sleep(0.02)
            problems = [f.result() for f in futures]
        if files:
            problems.append("not ready: " + ", ".join(Path(f).stem for f in files))
        problems = [p for p in problems if p]
        if problems:
            raise LabError(f"lab services did not start ({'; '.join(problems)}); logs in {self.state_dir}")

    # -- middleboxes ------------------------------------------------------------------------------
    def _apply_middleboxes(self) -> None:
        for hop in ("isp", "bb1", "bb2"):
            here = [s for s in self.scenario.sites if s.hop == hop]
            if not here:
                continue
            nft = _nft_rules(here)
            if nft:
                _run(["ip", "netns", "exec", self.ns_name(hop), "nft", "-f", "-"], input=nft)
            for argv in _iptables_rules(here):
                self.exec(hop, ["iptables", "-w", *argv], check=True, capture_output=True)
            for argv in self._tc_rules(hop, here):
                self.exec(hop, ["tc", *argv], check=True, capture_output=True)

    def _tc_rules(self, hop: str, sites: list[Site]) -> list[list[str]]:
        slow = [s for s in sites if "throttle" in s.methods]
        if not slow:
            return []
        dev = self.veth(hop, "down")  # shape what flows toward the volunteer: the downloads
        rules = [
            ["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"],
            ["class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", "10gbit"],
        ]
        for n, s in enumerate(slow, start=10):
            rules.append(["class", "add", "dev", dev, "parent", "1:", "classid", f"1:{n}", "htb",
                          "rate", s.rate, "ceil", s.rate])
            rules.append(["filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                          "u32", "match", "ip", "src", f"{s.address}/32", "flowid", f"1:{n}"])
        return rules


def _blockpage_document(title: str) -> str:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
        f"{title}</title></head>\n<body>{BLOCKPAGE_HTML}</body></html>\n"
    )


def _nft_rules(sites: list[Site]) -> str:
    """IP blocking: an nftables table in the router's forward path."""
    rules = []
    for s in sites:
        if "ip-drop" in s.methods:
            rules.append(f"ip daddr {s.address} counter drop")
        if "ip-reject" in s.methods:
            rules.append(f"ip daddr {s.address} meta l4proto tcp counter reject with tcp reset")
            rules.append(f"ip daddr {s.address} counter reject with icmp type admin-prohibited")
    if not rules:
        return ""
    body = "\n".join(f"    {r}" for r in rules)
    return (
        "table inet kzlab {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n"
        f"{body}\n  }}\n}}\n"
    )


def _sni_hex(name: str) -> str:
    # The SNI's host_name is preceded by its 2-byte length: matching both pins the match to the
    # whole name in the ClientHello, as DPI boxes keyed on the SNI field do.
    n = len(name)
    return f"|{n >> 8:02x} {n & 0xFF:02x}|{name}"


def _iptables_rules(sites: list[Site]) -> list[list[str]]:
    """DPI by string matching in the forward path, and the MITM redirect."""
    rules: list[list[str]] = []
    for s in sites:
        for name in (*s.names, f"www.{s.domain}"):
            tls = ["-A", "FORWARD", "-p", "tcp", "--dport", "443", "-m", "string", "--algo", "bm",
                   "--hex-string", _sni_hex(name)]
            if "sni-reset" in s.methods:
                rules.append([*tls, "-j", "REJECT", "--reject-with", "tcp-reset"])
            if "sni-drop" in s.methods:
                rules.append([*tls, "-j", "DROP"])
            if "host-reset" in s.methods:
                rules.append(["-A", "FORWARD", "-p", "tcp", "--dport", "80", "-m", "string", "--algo", "bm",
                              "--icase", "--string", f"Host: {name}\r", "-j", "REJECT",
                              "--reject-with", "tcp-reset"])
        if "tls-mitm" in s.methods:
            rules.append(["-t", "nat", "-A", "PREROUTING", "-d", s.address, "-p", "tcp", "--dport", "443",
                          "-j", "REDIRECT", "--to-ports", str(MITM_PORT)])
    return rules


# -- probing the lab ------------------------------------------------------------------------------
def verdict_label(v: dict[str, Any]) -> str:
    return f"{v.get('status')}/{v['mechanism']}" if v.get("mechanism") else str(v.get("status"))


def probe_argv(lab: Lab, timeout: float = 3.0, db: Path | None = None) -> list[str]:
    """``kzprobe run`` as the lab runs it: the scenario's targets, the system resolver (the ISP's,
    through /etc/netns) plus the world's public resolver, the lab CA, and the helper if up."""
    argv = [
        sys.executable, "-m", "kzprobe.cli", "run", "--targets", str(lab.targets_file),
        "--resolver", lab.public_resolver, "--ca-bundle", str(lab.ca_path),
        "--db", str(db or lab.state_dir / "run.db"), "--format", "json", "--no-progress",
        "--timeout", str(timeout),
    ]
    if lab.helper_url:
        argv += ["--helper", lab.helper_url]
    return argv


def run_probe(lab: Lab, timeout: float = 3.0, db: Path | None = None) -> list[dict[str, Any]]:
    """Run ``kzprobe run`` in the volunteer namespace; return its verdicts (JSON objects)."""
    p = lab.exec("volunteer", probe_argv(lab, timeout, db), capture_output=True, text=True)
    (lab.state_dir / "probe.stderr").write_text(p.stderr)
    try:
        verdicts = json.loads(p.stdout)
    except json.JSONDecodeError:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise LabError(f"kzprobe run failed (exit {p.returncode}): {last}") from None
    if not isinstance(verdicts, list):
        raise LabError("kzprobe run printed JSON that is not a list of verdicts")
    return verdicts


def compare(scenario: Scenario, verdicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario site: what was expected, what kzprobe said, and whether they match."""
    by_target = {v.get("target"): v for v in verdicts}
    rows = []
    for s in scenario.sites:
        v = by_target.get(s.url)
        got = verdict_label(v) if v else "missing"
        rows.append({
            "target": s.url, "domain": s.domain, "methods": list(s.methods), "hop": s.hop,
            "expect": s.expect, "got": got, "match": got == s.expect, "reason": s.reason,
            "verdict": v,
        })
    return rows
