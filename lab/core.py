"""One lab instance: builds the topology (lab/topology.py), the PKI (lab/pki.py), the servers
(lab/services.py) and the middleboxes (lab/rules.py) for a scenario, and runs kzprobe in it.

Everything that ``up`` creates lives inside the instance's namespaces or under
``/run/kzprobe-lab/<instance>`` and ``/etc/netns/<ns>``; ``down`` (topology.destroy) removes it
from names alone, also after a crash.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from kzprobe.lab import rules, services
from kzprobe.lab.scenario import ROLES, Scenario, load
from kzprobe.lab.topology import (
    AUTH_DNS,
    BLOCKPAGE,
    DEFAULT_PREFIX,
    HELPER,
    HELPER_PORT,
    INSTANCE_RE,
    ISP_RESOLVER,
    NETNS_ETC,
    PUBLIC_RESOLVER,
    SLOW_DNS,
    STATE_ROOT,
    LabError,
    address,
    destroy,
    down_all,
    instances,
    list_namespaces,
    node_commands,
    require_root,
    run,
    veth,
)

__all__ = [
    "AUTH_DNS", "BLOCKPAGE", "DEFAULT_PREFIX", "HELPER", "HELPER_PORT", "ISP_RESOLVER", "NETNS_ETC",
    "PUBLIC_RESOLVER", "ROLES", "SLOW_DNS", "STATE_ROOT", "Lab", "LabError", "compare", "destroy", "down_all",
    "instances", "list_namespaces", "probe_argv", "require_root", "run_probe", "run_probe_doc", "verdict_label",
]

MITM_PORT = rules.MITM_PORT
INJECTION_SERVER_DELAY = services.INJECTION_SERVER_DELAY
INJECTION_DNS_DELAY = services.INJECTION_DNS_DELAY
BLOCKPAGE_HTML = services.BLOCKPAGE_HTML

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
        if not INSTANCE_RE.match(self.instance):
            raise LabError(
                f"instance name {self.instance!r}: use 1-12 lowercase letters/digits, starting with a letter"
            )
        if self.scenario.isps:
            raise LabError(f"scenario {self.scenario.name} has {len(self.scenario.isps)} ISPs: it needs the "
                           "multi-ISP lab (`kzprobe lab up` builds it; kzprobe.lab.multi.MultiLab)")
        self.state_dir = STATE_ROOT / self.instance
        self.ca_path = self.state_dir / "ca.pem"
        self.interception_ca_path = self.state_dir / "qaznet-ca.pem"
        self.targets_file = self.state_dir / "targets.txt"
        self.expected_file = self.state_dir / "expected.json"
        self.isp_resolver = ISP_RESOLVER
        self.public_resolver = PUBLIC_RESOLVER
        self.blockpage = BLOCKPAGE
        self.helper_url: str | None = None
        #: kind ("world" | "mitm") -> domain -> [chain.pem, key.pem]
        self.certs: dict[str, dict[str, list[str]]] = {"world": {}, "mitm": {}}
        self.default_cert: list[str] = []
        self.blockpage_cert: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- names ------------------------------------------------------------------------------------
    def ns_name(self, role: str) -> str:
        if role not in ROLES:
            raise LabError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        return f"{self.instance}-{role}"

    def veth(self, role: str, side: str) -> str:
        """The interface of ``role`` toward the volunteer (side="down") or the world ("up")."""
        return veth(self.instance, role, side)

    def router_address(self, role: str) -> str:
        """The source address a TTL sweep from the volunteer sees for this hop."""
        if role == "volunteer":
            return address("volunteer", "up")
        return address(role, "down")

    @property
    def volunteer_address(self) -> str:
        return address("volunteer", "up")

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

    def write_config(self, name: str, data: dict[str, Any]) -> str:
        p = self.state_dir / f"{name}.json"
        p.write_text(json.dumps(data, ensure_ascii=False, indent=1))
        return str(p)

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
        for tool in ("ip", "iptables", "nft", "tc", "dnsmasq", "nginx"):
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
        waits = services.start(self)
        self._apply_middleboxes()
        self._wait(waits)
        (self.state_dir / "up.json").write_text(json.dumps({
            "instance": self.instance, "scenario": str(self.scenario.path),
            "name": self.scenario.name, "helper_url": self.helper_url,
            "seconds": round(time.monotonic() - t0, 2),
        }))

    # -- network ----------------------------------------------------------------------------------
    def _make_network(self) -> None:
        root = [f"netns add {self.ns_name(r)}" for r in ROLES]
        for a, b in itertools.pairwise(ROLES):
            root.append(
                f"link add {self.veth(a, 'up')} netns {self.ns_name(a)} type veth "
                f"peer name {self.veth(b, 'down')} netns {self.ns_name(b)}"
            )
        run(["ip", "-batch", "-"], input="\n".join(root) + "\n")
        NETNS_ETC.joinpath(self.ns_name("volunteer")).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / self.ns_name("volunteer") / "resolv.conf").write_text(
            f"# kzprobe lab {self.instance}: the ISP's resolver\nnameserver {ISP_RESOLVER}\n"
        )
        jobs = [(r, node_commands(self.instance, r, self.scenario)) for r in ROLES]

        def configure(job: tuple[str, list[str]]) -> None:
            role, cmds = job
            run(["ip", "-n", self.ns_name(role), "-batch", "-"], input="\n".join(cmds) + "\n")
            sysctl = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
            if role not in ("volunteer", "world"):
                sysctl.append("net.ipv4.ip_forward=1")
            self.exec(role, ["sysctl", "-q", "-w", *sysctl], check=True, capture_output=True)

        with ThreadPoolExecutor(len(jobs)) as pool:
            list(pool.map(configure, jobs))

    # -- certificates -----------------------------------------------------------------------------
    def _make_pki(self) -> None:
        from kzprobe.lab.pki import LabPki  # cryptography: only when a lab is built

        pki = LabPki(self.state_dir / "certs")
        pki.write_anchors(self.ca_path, self.interception_ca_path)
        for s in self.scenario.sites:
            names = rules.site_names(s)
            self.certs["world"][s.domain] = pki.issue(f"site-{s.domain}", names, s.cert)
            if "tls-mitm" in s.methods:
                self.certs["mitm"][s.domain] = pki.issue(f"mitm-{s.domain}", names, interception=True)
        self.default_cert = pki.issue("site-default", [services.DEFAULT_NAME, f"www.{services.DEFAULT_NAME}"])
        self.blockpage_cert = pki.issue("site-blockpage", ["blocked.isp.lab"])

    def _write_targets(self) -> None:
        self.targets_file.write_text("".join(f"{s.url}\n" for s in self.scenario.sites)
                                     + "".join(f"{e.target}\n" for e in self.scenario.endpoints))
        self.expected_file.write_text(json.dumps(self.expected(), indent=2, ensure_ascii=False) + "\n")

    def expected(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.name,
            "targets": [
                {"target": s.url, "domain": s.domain, "expect": s.expect, "methods": list(s.methods),
                 "hop": s.hop, "address": s.address, "reason": s.reason} | ({"detail": s.detail} if s.detail else {})
                for s in self.scenario.sites
            ] + [
                {"domain": e.host, **e.to_dict()} for e in self.scenario.endpoints
            ],
        }

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
            while time.monotonic() < deadline:
                files = [f for f in files if not os.path.exists(f)]
                for proc in self._procs:
                    if proc.poll() is not None:
                        what = " ".join(str(a) for a in list(proc.args)[4:7])  # type: ignore[arg-type]
                        raise LabError(f"a lab server exited early ({what}); logs in {self.state_dir}")
                if not files and all(f.done() for f in futures):
                    break
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
            # The subscriber line is shaped at the ISP, on its volunteer-side interface.
            access = self.scenario.access_rate if hop == "isp" else ""
            nft = rules.nft_rules(here)
            if nft:
                run(["ip", "netns", "exec", self.ns_name(hop), "nft", "-f", "-"], input=nft)
            for argv in rules.iptables_rules(here, self.veth(hop, "down")):
                self.exec(hop, ["iptables", "-w", *argv], check=True, capture_output=True)
            for argv in rules.tc_rules(self.veth(hop, "down"), here, access):
                self.exec(hop, ["tc", *argv], check=True, capture_output=True)
            self._apply_endpoint_rules(hop)

    def _apply_endpoint_rules(self, hop: str) -> None:
        """The endpoints' methods at ``hop`` (lab/endpoints.py): nftables by address, and the
        Tor-like ClientHello's string match."""
        here = [e for e in self.scenario.endpoints if e.hop == hop]
        nft = rules.endpoint_nft_rules(here)
        if nft:
            run(["ip", "netns", "exec", self.ns_name(hop), "nft", "-f", "-"], input=nft)
        if any("tls-fingerprint" in e.methods for e in here):
            try:
                from kzprobe.probes.hellos import DPI_SIGNATURE
            except ImportError:
                raise LabError("tls-fingerprint needs kzprobe.probes.hellos (DPI_SIGNATURE)") from None
            # The hello's copy goes on to the next router toward the world (see tls_fingerprint_rules).
            gateway = address(ROLES[ROLES.index(hop) + 1], "down")
            for argv in rules.tls_fingerprint_rules(here, DPI_SIGNATURE, gateway):
                self.exec(hop, ["iptables", "-w", *argv], check=True, capture_output=True)


# -- probing the lab ------------------------------------------------------------------------------
def verdict_label(v: dict[str, Any]) -> str:
    return f"{v.get('status')}/{v['mechanism']}" if v.get("mechanism") else str(v.get("status"))


def probe_argv(lab: Lab, timeout: float = 3.0, db: Path | None = None, targets: Path | None = None) -> list[str]:
    """``kzprobe run`` as the lab runs it: the scenario's targets (or ``targets``), the system
    resolver (the ISP's, through /etc/netns) plus the world's public resolver, the lab CA, and the
    helper if up."""
    argv = [
        sys.executable, "-m", "kzprobe.cli", "run", "--targets", str(targets or lab.targets_file),
        "--resolver", lab.public_resolver, "--ca-bundle", str(lab.ca_path),
        "--db", str(db or lab.state_dir / "run.db"), "--format", "json", "--no-progress",
        "--timeout", str(timeout),
    ]
    if lab.helper_url:
        argv += ["--helper", lab.helper_url]
    return argv


def run_probe(lab: Lab, timeout: float = 3.0, db: Path | None = None, env: dict[str, str] | None = None
              ) -> list[dict[str, Any]]:
    """Run ``kzprobe run`` in the volunteer namespace; return its verdicts (JSON objects).
    ``env``: extra environment variables for it (e.g. SSLKEYLOGFILE)."""
    verdicts: list[dict[str, Any]] = run_probe_doc(lab, timeout, db, env=env)["verdicts"]
    return verdicts


def run_probe_doc(lab: Lab, timeout: float = 3.0, db: Path | None = None,
                  targets: Path | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``kzprobe run`` in the volunteer namespace; return its JSON envelope (``verdicts``
    always a list of objects; ``run`` as kzprobe printed it, when it did)."""
    p = lab.exec("volunteer", probe_argv(lab, timeout, db, targets), capture_output=True, text=True,
                 env={**os.environ, **env} if env else None)
    (lab.state_dir / "probe.stderr").write_text(p.stderr)
    try:
        doc = json.loads(p.stdout)
    except json.JSONDecodeError:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise LabError(f"kzprobe run failed (exit {p.returncode}): {last}") from None
    # A list of verdicts, or cli-durable's envelope {"command", "verdicts": [...], ...}.
    if isinstance(doc, list):
        doc = {"verdicts": doc}
    verdicts = doc.get("verdicts") if isinstance(doc, dict) else None
    if not isinstance(verdicts, list) or not all(isinstance(v, dict) for v in verdicts):
        raise LabError("kzprobe run printed JSON that is neither a list of verdicts nor an envelope holding one")
    return doc


def compare(scenario: Scenario, verdicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario site: what was expected, what kzprobe said, and whether they match."""
    by_target = {v.get("target"): v for v in verdicts}
    rows = []
    for s in scenario.sites:
        v = by_target.get(s.url)
        got = verdict_label(v) if v else "missing"
        detail = (v or {}).get("detail")
        rows.append({
            "target": s.url, "domain": s.domain, "address": s.address, "methods": list(s.methods), "hop": s.hop,
            "expect": s.expect, "expect_detail": s.detail or None, "got": got, "got_detail": detail,
            "match": got == s.expect and (not s.detail or detail == s.detail), "reason": s.reason,
            "verdict": v,
        })
    for e in scenario.endpoints:
        v = by_target.get(e.target)
        got = verdict_label(v) if v else "missing"
        detail = (v or {}).get("detail")
        rows.append({
            "target": e.target, "domain": e.host, "address": e.address, "methods": list(e.methods), "hop": e.hop,
            "expect": e.expect, "expect_detail": e.detail or None, "got": got, "got_detail": detail,
            "match": got == e.expect and (not e.detail or detail == e.detail), "reason": e.reason,
            "verdict": v,
        })
    return rows
