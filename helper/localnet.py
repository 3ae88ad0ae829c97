"""The helper host's own addresses, read from the kernel.

Address classes are not enough: the host's own *public* address is globally routed, yet a
request to it reaches services that the firewall hides from everybody else (an admin page bound
to the public address, a metrics port).  So the helper refuses every address the kernel would
deliver locally: each interface address and every route in the ``local`` table (which also
covers whole prefixes such as ``127.0.0.0/8`` and anything an operator routed there with
``ip route add local ...``).

Read with ``ip -j`` (iproute2), falling back to ``/proc/net`` when ``ip`` is missing.  Interface
addresses change (DHCP, cloud floating IPs), so the server re-reads them periodically.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
log = logging.getLogger("kzprobe.helper")


def _net(text: str) -> Network | None:
    try:
        return ipaddress.ip_network(text.split("%")[0], strict=False)
    except ValueError:
        return None


def _run_json(argv: list[str]) -> list[dict[str, Any]]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True).stdout
    data = json.loads(out or "[]")
    return data if isinstance(data, list) else []


def _from_ip() -> set[Network]:
    nets: set[Network] = set()
    for link in _run_json(["ip", "-j", "addr", "show"]):
        for info in link.get("addr_info") or []:
            if isinstance(info, dict) and isinstance(info.get("local"), str):
                n = _net(info["local"])
                if n is not None:
                    nets.add(n)
    for family in ("-4", "-6"):
        for route in _run_json(["ip", "-j", family, "route", "show", "table", "local"]):
            dst = route.get("dst")
            if isinstance(dst, str):
                n = _net("::/0" if dst == "default" and family == "-6" else
                         "0.0.0.0/0" if dst == "default" else dst)
                if n is not None:
                    nets.add(n)
    return nets


def _from_proc() -> set[Network]:
    nets: set[Network] = set()
    # fib_trie lists each local IPv4 address as "|-- A.B.C.D" followed by "/32 host LOCAL".
    try:
        last: str | None = None
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            s = line.strip()
            if s.startswith(("|--", "+--")):
                last = s.split()[1]
            elif "host LOCAL" in s and last:
                n = _net(last)
                if n is not None:
                    nets.add(n)
    except OSError:
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexaddr = line.split()[0]
            n = _net(str(ipaddress.IPv6Address(int(hexaddr, 16))))
            if n is not None:
                nets.add(n)
    except (OSError, ValueError, IndexError):
        pass
    nets.add(ipaddress.ip_network("127.0.0.0/8"))
    nets.add(ipaddress.ip_network("::1/128"))
    return nets


def read_local_networks() -> frozenset[Network]:
    """Every address or prefix the kernel delivers locally (blocking: call from a thread)."""
    try:
        nets = _from_ip()
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("cannot read local addresses with ip (%s); using /proc/net", type(exc).__name__)
        nets = set()
    return frozenset(nets | _from_proc())


class LocalNetworks:
    """A refreshable set of local prefixes; membership is a scan of a few dozen entries."""

    def __init__(self, nets: frozenset[Network] | None = None) -> None:
        self._nets: frozenset[Network] = frozenset() if nets is None else nets
        #: Policy decisions memoised against this set; emptied whenever the set changes.
        self.cache: dict[object, str | None] = {}

    @property
    def nets(self) -> frozenset[Network]:
        return self._nets

    @nets.setter
    def nets(self, value: frozenset[Network]) -> None:
        if value != self._nets:
            self._nets = value
            self.cache = {}

    @classmethod
    def from_kernel(cls) -> LocalNetworks:
        return cls(read_local_networks())

    def refresh(self) -> None:
        self.nets = read_local_networks()

    def __contains__(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self.nets)
