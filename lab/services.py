"""The lab's servers: DNS (dnsmasq), the sites (nginx), the ISP's blockpage (nginx), the slow
servers some scenarios need, the control helper, the on-path injectors and the interception proxy.

The configuration text is made by pure functions (``*_lines``, :func:`vhosts`), tested without
root; :func:`start` writes it and launches each server in its namespace through the ``Lab``.

DNS, as the internet has it:

* the authoritative (world) answers every lab name with the site's public address(es);
* the public resolver (world) forwards to it, uncached (every query is on the wire, so an
  on-path injector can race each one);
* the ISP resolver forwards the same way, with the ISP's blocking (``address=`` overrides) in
  front, and the geo-DNS answers for CDN sites: the address the CDN gives the ISP's region, a
  valid server of the same site, different from what the public resolver gets.

Simple Python servers remain only where nginx cannot behave as the scenario needs: a site with
``server_delay`` (the real server that loses the race to an on-path HTTP injector, or a slow
site) is served by lab/webserver.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kzprobe.lab import endpoint_servers, nginx, pages
from kzprobe.lab.rules import MITM_PORT, site_names
from kzprobe.lab.scenario import Scenario, Site
from kzprobe.lab.topology import AUTH_DNS, BLOCKPAGE, HELPER, HELPER_PORT, ISP_RESOLVER, PUBLIC_RESOLVER, SLOW_DNS

if TYPE_CHECKING:
    from kzprobe.lab.core import Lab

#: Seconds the real server waits when an on-path HTTP injector races it (see Site.server_delay).
INJECTION_SERVER_DELAY = 0.5
#: Seconds the slow authoritative waits, for the DNS injector's race.
INJECTION_DNS_DELAY = 0.3
#: The catch-all site on every address (the probe's benign follow-up name).
DEFAULT_NAME = "example.com"
#: What the authoritative answers for it (no server there: the probe only uses the name as SNI/Host).
DEFAULT_ADDRESS = "203.0.113.254"
#: Size of the catch-all page: big enough that a follow-up download has a measurable rate.
DEFAULT_PAGE_SIZE = 128 * 1024

BLOCKPAGE_HTML = (
    "<h1>Страница заблокирована</h1>\n<p>Доступ к данному ресурсу ограничен в соответствии с "
    "законодательством Республики Казахстан.</p>\n<p>Access to this resource is restricted.</p>"
)


def blockpage_document(title: str) -> str:
    return pages.blockpage(title, BLOCKPAGE_HTML).decode()


def slow_sites(scenario: Scenario) -> list[Site]:
    """Sites served by the Python server because their server must answer late."""
    return [s for s in scenario.sites if not s.is_down and server_delay(s) > 0]


def server_delay(site: Site) -> float:
    if "http-blockpage-injection" in site.methods and not site.server_delay:
        return INJECTION_SERVER_DELAY
    return site.server_delay


def nginx_sites(scenario: Scenario) -> list[Site]:
    slow = set(slow_sites(scenario))
    return [s for s in scenario.sites if not s.is_down and s not in slow]


def injected(scenario: Scenario) -> list[Site]:
    return [s for s in scenario.sites if "dns-injection" in s.methods]


# -- DNS ------------------------------------------------------------------------------------------
def auth_dns_lines(scenario: Scenario) -> list[str]:
    """The authoritative: every lab name, except those the slow authoritative answers."""
    lines = []
    slow = set(injected(scenario))
    for s in scenario.sites:
        if s in slow:
            continue
        for n in site_names(s):
            lines += [f"host-record={n},{a}" for a in s.public_addresses]
        lines.append(f"local=/{s.domain}/")
    lines += endpoint_servers.auth_dns_lines(scenario)
    lines.append(f"host-record={DEFAULT_NAME},{DEFAULT_ADDRESS}")
    return lines


def forward_lines(scenario: Scenario) -> list[str]:
    return [f"server=/{s.domain}/{SLOW_DNS}" for s in injected(scenario)] + [f"server={AUTH_DNS}"]


def public_dns_lines(scenario: Scenario) -> list[str]:
    # No cache: every query reaches the wire, so every query can be raced.
    return ["cache-size=0", *forward_lines(scenario)]


def isp_dns_lines(scenario: Scenario, world: Scenario | None = None) -> list[str]:
    """The ISP resolver, configured like ISPs do it: local overrides in front of a forwarder.
    ``world``: the scenario the world's servers were built from, when it is not ``scenario``
    (a multi-ISP lab: which names only the slow authoritative answers is the world's)."""
    lines = list(forward_lines(world or scenario))
    for s in scenario.sites:
        if s.geo_address:
            lines += [f"host-record={n},{s.geo_address}" for n in site_names(s)]
        for n in s.block_names or s.names:
            if "dns-nxdomain" in s.methods:
                lines.append(f"address=/{n}/")
            elif "dns-redirect" in s.methods:
                lines.append(f"address=/{n}/{BLOCKPAGE}")
            elif "dns-bogon" in s.methods:
                lines.append(f"address=/{n}/{s.bogon}")
    return lines + endpoint_servers.isp_dns_lines(scenario)


def dnsmasq_conf(address: str, log: Path, lines: Sequence[str]) -> str:
    return "\n".join([
        "no-resolv", "no-hosts", "no-poll", "bind-interfaces", f"listen-address={address}",
        "except-interface=nonexistent", "local-ttl=60", f"log-facility={log}", "log-queries", *lines,
    ]) + "\n"


# -- web ------------------------------------------------------------------------------------------
def vhosts(sites: Sequence[Site], certs: dict[str, list[str]], www: Path) -> list[nginx.Vhost]:
    out = []
    for s in sites:
        cert, key = certs[s.domain]
        out.append(nginx.Vhost(
            names=s.names, www=f"www.{s.domain}", addresses=s.addresses, root=str(www / s.domain),
            cert=cert, key=key, redirects=s.redirects, gzip=s.gzip,
        ))
    return out


def world_nginx_servers(scenario: Scenario, certs: dict[str, list[str]], default_cert: list[str],
                        www: Path) -> list[str]:
    sites = nginx_sites(scenario)
    servers = [nginx.catchall_server(nginx.Catchall(
        addresses=tuple(a for s in sites for a in s.addresses), root=str(www / "_default"),
        cert=default_cert[0], key=default_cert[1],
    ))]
    for v in vhosts(sites, certs, www):
        servers += nginx.vhost_servers(v)
    return servers


def blockpage_nginx_servers(cert: list[str], www: Path) -> list[str]:
    return [nginx.catchall_server(nginx.Catchall(
        addresses=(BLOCKPAGE,), root=str(www / "_blockpage"), cert=cert[0], key=cert[1], any_path=True,
    ))]


def incompressible_share(site: Site) -> float:
    # Throttling acts on wire bytes: a throttled site's page is mostly images, as a video or photo
    # site's would be, so gzip cannot make the shaping invisible.
    return 0.9 if {"throttle", "sni-throttle"} & set(site.methods) else 0.35


def write_pages(scenario: Scenario, www: Path) -> None:
    for s in nginx_sites(scenario):
        d = www / s.domain
        d.mkdir(parents=True, exist_ok=True)
        (d / "index.html").write_bytes(
            pages.page(s.title, s.domain, s.size, content=s.content, incompressible=incompressible_share(s)))
    (www / "_default").mkdir(parents=True, exist_ok=True)
    (www / "_default" / "index.html").write_bytes(
        pages.page("Example Domain", DEFAULT_NAME, DEFAULT_PAGE_SIZE, content="<h1>Example Domain</h1>",
                   incompressible=0.9))
    (www / "_blockpage").mkdir(parents=True, exist_ok=True)
    (www / "_blockpage" / "index.html").write_text(blockpage_document(scenario.blockpage_title))


# -- starting -------------------------------------------------------------------------------------
Waits = dict[str, list[str]]


def start(lab: Lab) -> Waits:
    """Start every server (in parallel: they are independent); return what to wait for
    (``role -> [address:port]`` to connect to, and ``files``: ready files)."""
    waits: Waits = {"world": [], "isp": [], "files": []}
    start_world(lab, waits)
    start_isp(lab, waits)
    # Tor relays and directories, proxies, messaging endpoints (scenarios with [[endpoint]]).
    endpoint_servers.start(lab, waits)
    return waits


def _dnsmasq(lab: Lab, waits: Waits, role: str, name: str, address: str, lines: list[str]) -> None:
    sd = lab.state_dir
    conf = sd / f"{name}.conf"
    conf.write_text(dnsmasq_conf(address, sd / f"{name}.log", lines))
    lab.popen(role, ["dnsmasq", "--keep-in-foreground", "--user=root", "--pid-file=", "-C", str(conf)], name)
    waits[role].append(f"{address}:53")


def start_world(lab: Lab, waits: Waits) -> None:
    """The world's servers: DNS (authoritative, public, slow), the sites, the helper."""
    py = sys.executable
    sc = lab.scenario
    sd = lab.state_dir
    _dnsmasq(lab, waits, "world", "dns-auth", AUTH_DNS, auth_dns_lines(sc))
    _dnsmasq(lab, waits, "world", "dns-public", PUBLIC_RESOLVER, public_dns_lines(sc))
    slow_names = injected(sc)
    if slow_names:
        ready = str(sd / "slowdns.ready")
        records = {n: s.address for s in slow_names for n in site_names(s)}
        cfg = lab.write_config("slowdns", {"address": SLOW_DNS, "records": records,
                                           "delay": INJECTION_DNS_DELAY, "ready_file": ready})
        lab.popen("world", [py, "-m", "kzprobe.lab.slowdns", cfg], "slowdns")
        waits["files"].append(ready)

    # The sites (nginx).
    www = sd / "www"
    write_pages(sc, www)
    if nginx_sites(sc):  # (an nginx without a listen line would listen on *:80)
        prefix = sd / "nginx-world"
        nginx.prepare(prefix, world_nginx_servers(sc, lab.certs["world"], lab.default_cert, www))
        lab.popen("world", nginx.argv(prefix), "nginx-world")
        waits["world"] += [f"{a}:443" for s in nginx_sites(sc) for a in s.addresses]

    slow = slow_sites(sc)
    if slow:
        web_sites: dict[str, dict[str, Any]] = {}
        for s in slow:
            for n in site_names(s):
                web_sites[n] = {"title": s.title, "domain": s.domain, "content": s.content, "size": s.size,
                                "delay": server_delay(s)}
        ready = str(sd / "web.ready")
        cfg = lab.write_config("web", {
            "listen": [a for s in slow for a in s.addresses], "sites": web_sites, "ready_file": ready,
            "certs": {n: lab.certs["world"][s.domain] for s in slow for n in site_names(s)},
            "default_cert": lab.default_cert,
        })
        lab.popen("world", [py, "-m", "kzprobe.lab.webserver", cfg], "web")
        waits["files"].append(ready)

    # The control helper, if kzprobe has one.
    kz = [py, "-m", "kzprobe.cli"]
    if subprocess.run([*kz, "helper", "--help"], capture_output=True).returncode == 0:
        lab.popen("world", [*kz, "helper", "--listen", f"{HELPER}:{HELPER_PORT}", "--allow-private",
                            "--ca-bundle", str(lab.ca_path), "--resolver", PUBLIC_RESOLVER], "helper")
        waits["world"].append(f"{HELPER}:{HELPER_PORT}")
        lab.helper_url = f"http://{HELPER}:{HELPER_PORT}"


def start_isp(lab: Lab, waits: Waits, world: Scenario | None = None) -> None:
    """The ISP's servers (resolver, blockpage) and the middleboxes' processes on its hops.
    ``world``: the scenario the world was built from, when it is not ``lab.scenario``."""
    py = sys.executable
    sc = lab.scenario
    sd = lab.state_dir
    _dnsmasq(lab, waits, "isp", "dns-isp", ISP_RESOLVER, isp_dns_lines(sc, world))
    www = sd / "www"
    (www / "_blockpage").mkdir(parents=True, exist_ok=True)
    (www / "_blockpage" / "index.html").write_text(blockpage_document(sc.blockpage_title))
    prefix = sd / "nginx-isp"
    nginx.prepare(prefix, blockpage_nginx_servers(lab.blockpage_cert, www))
    lab.popen("isp", nginx.argv(prefix), "nginx-isp")
    waits["isp"] += [f"{BLOCKPAGE}:80", f"{BLOCKPAGE}:443"]

    # On-path injectors and the interception proxy, per hop.
    for hop in ("isp", "bb1", "bb2"):
        here = [s for s in sc.sites if s.hop == hop]
        dns_rules = {n: s.forged for s in here if "dns-injection" in s.methods for n in s.names}
        http_rules = {n: blockpage_document(sc.blockpage_title)
                      for s in here if "http-blockpage-injection" in s.methods for n in s.names}
        for mode, rules in (("dns", dns_rules), ("http", http_rules)):
            if rules:
                ready = str(sd / f"inject-{mode}-{hop}.ready")
                cfg = lab.write_config(f"inject-{mode}-{hop}", {
                    "mode": mode, "rules": rules, "iface": lab.veth(hop, "down"), "ready_file": ready,
                })
                lab.popen(hop, [py, "-m", "kzprobe.lab.injector", cfg], f"inject-{mode}-{hop}")
                waits["files"].append(ready)
        mitm = [s for s in here if "tls-mitm" in s.methods]
        if mitm:
            ready = str(sd / f"mitm-{hop}.ready")
            cfg = lab.write_config(f"mitm-{hop}", {
                "port": MITM_PORT, "ready_file": ready,
                "certs": {n: lab.certs["mitm"][s.domain] for s in mitm for n in site_names(s)},
            })
            lab.popen(hop, [py, "-m", "kzprobe.lab.mitm", cfg], f"mitm-{hop}")
            waits["files"].append(ready)
