"""Scenario files: which sites the lab serves, and how each one is censored.

A scenario is data (TOML), so that a new censorship setup is a new file and not new code.  The
format is documented in ``lab/scenarios/README.md``; this module parses and validates it and gives
every error its file and site, because a typo in a scenario should read like a config error and
not like a traceback.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from kzprobe.lab.endpoints import Endpoint, Outage

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

ROLES = ("volunteer", "isp", "bb1", "bb2", "world")
ROUTERS = ("isp", "bb1", "bb2")

#: method -> (hops where it can run, default hop).
#: The DNS-server methods only make sense where a resolver lives (the ISP); ``dns-injection`` needs
#: a router on the path to every resolver beyond the ISP; the rest are packet filters that any
#: router can apply.
METHODS: dict[str, tuple[tuple[str, ...], str]] = {
    "none": (("",), ""),
    "down": (("world",), "world"),
    "dns-nxdomain": (("isp",), "isp"),
    "dns-redirect": (("isp",), "isp"),
    "dns-bogon": (("isp",), "isp"),
    "dns-injection": (ROUTERS, "bb1"),
    "ip-drop": (ROUTERS, "bb1"),
    "ip-reject": (ROUTERS, "bb1"),
    "sni-reset": (ROUTERS, "bb2"),
    "sni-drop": (ROUTERS, "bb2"),
    "host-reset": (ROUTERS, "bb2"),
    "http-blockpage-injection": (ROUTERS, "bb2"),
    "tls-mitm": (ROUTERS, "bb2"),
    "throttle": (ROUTERS, "bb2"),
    "sni-throttle": (ROUTERS, "bb2"),
}

#: Redirects a site's web server may make (``redirects = [...]``): http->https, apex->www.
REDIRECTS = ("https", "www")
#: Leaf certificate profiles (``cert = "..."``); see lab/pki.py.
CERT_PROFILES = ("intermediate", "no-aki", "no-ski-aki", "cross-signed")

EXPECTATIONS = ("ok", "down", "inconclusive", "blocked/dns", "blocked/ip", "blocked/dpi")

#: Sites are served from TEST-NET-3; the lab's own services live in TEST-NET-2 (see topology).
SITE_NET = ipaddress.ip_network("203.0.113.0/24")
RESERVED_SITE_ADDRESSES = frozenset({"203.0.113.0", "203.0.113.255"})

_SITE_KEYS = {
    "domain", "url", "address", "title", "content", "size", "method", "methods", "hop", "expect",
    "reason", "quote", "category", "bogon", "forged", "rate", "server_delay", "aliases",
    "redirects", "cert", "cdn", "geo_address", "gzip", "detail", "block_names", "isp",
}
#: What a site's per-ISP table (``[site.isp."NAME"]``, a multi-ISP scenario) may change: how that
#: ISP censors the site and what it must give.  Everything about the site itself (names, address,
#: content) is the world's and the same for every ISP; so is ``down``.
ISP_KEYS = {"method", "methods", "hop", "expect", "reason", "quote", "detail", "block_names", "bogon", "forged",
            "rate"}
_ISP_HEAD_KEYS = {"name", "asn", "country"}


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Site:
    domain: str
    address: str
    url: str
    title: str
    content: str
    methods: tuple[str, ...]
    hop: str
    expect: str
    reason: str
    quote: str = ""
    category: str = ""
    aliases: tuple[str, ...] = ()
    #: Body padding in bytes, so that throttling is measurable.
    size: int = 0
    #: Address the ISP resolver hands out for ``dns-bogon``.
    bogon: str = "10.10.34.34"
    #: Address the injector forges for ``dns-injection``.
    forged: str = "198.51.100.80"
    #: tc rate for ``throttle``.
    rate: str = "256kbit"
    #: Seconds the real server waits before answering: the kernel here has no netem, so the
    #: on-path injectors' race is made winnable at the server (a far-away server, in effect).
    server_delay: float = 0.0
    #: Redirects the site's server makes, a subset of REDIRECTS.
    redirects: tuple[str, ...] = ()
    #: Leaf certificate profile (CERT_PROFILES).
    cert: str = "intermediate"
    #: More addresses serving the same site (a CDN); the public resolver answers ``address`` and
    #: these, the ISP resolver ``geo_address`` (geo-DNS) when set.
    cdn: tuple[str, ...] = ()
    geo_address: str = ""
    #: nginx ``gzip on`` for the site's HTML.
    gzip: bool = True
    #: The verdict's detail kzprobe must give too (e.g. "dpi.throttled"); "" = any.
    detail: str = ""
    #: The names the censor lists (DPI string matches and resolver overrides); () = all of the
    #: site's names.  ``["www.x.kz"]`` on a site that redirects to www blocks the redirect's second
    #: hop only.
    block_names: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.domain, *self.aliases)

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address the site is served on (its own, then the CDN's)."""
        return (self.address, *self.cdn)

    @property
    def public_addresses(self) -> tuple[str, ...]:
        """What the authoritative (and so the public resolver) answers for the site's names."""
        return self.addresses if not self.geo_address else tuple(a for a in self.addresses if a != self.geo_address)

    @property
    def is_down(self) -> bool:
        return "down" in self.methods

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain, "address": self.address, "url": self.url, "title": self.title,
            "methods": list(self.methods), "hop": self.hop, "expect": self.expect,
            "reason": self.reason, "quote": self.quote, "category": self.category,
        }


@dataclass(frozen=True, slots=True)
class Isp:
    """One ISP of a multi-ISP scenario: its declared vantage and the scenario as its subscribers
    see it (the shared sites, censored the way this ISP does it)."""

    name: str
    asn: str
    country: str
    scenario: Scenario


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    path: Path
    sites: tuple[Site, ...] = field(default_factory=tuple)
    blockpage_title: str = "Страница заблокирована"
    #: The volunteer's access link rate (tc htb at the ISP, toward the volunteer), e.g. "2mbit";
    #: "" = unshaped.  A real subscriber line has one, and a throttling verdict needs the benign
    #: follow-up's download to last long enough to have a rate.
    access_rate: str = ""
    #: Targets of the other kinds (tor-or://, tcp://, ...) and their servers (lab/endpoints.py).
    endpoints: tuple[Endpoint, ...] = ()
    #: Rules that hold only for a window of ``lab run`` (lab/endpoints.py, lab/outage.py).
    outages: tuple[Outage, ...] = ()
    #: A multi-ISP scenario's ISPs (``[[isp]]``); empty for the usual one-ISP lab.  ``sites`` are
    #: then the sites as an ISP that censors nothing would show them.
    isps: tuple[Isp, ...] = ()

    def site(self, domain: str) -> Site:
        for s in self.sites:
            if domain == s.domain or domain in s.aliases:
                return s
        raise KeyError(domain)

    def by_method(self, method: str) -> list[Site]:
        return [s for s in self.sites if method in s.methods]

    @property
    def methods(self) -> set[str]:
        return {m for s in self.sites for m in s.methods}

    def expected(self) -> dict[str, str]:
        """target URL -> expected "status/mechanism" (or plain status); details are in Site.detail."""
        return {s.url: s.expect for s in self.sites} | {e.target: e.expect for e in self.endpoints}


def scenario_path(name_or_path: str | Path) -> Path:
    """A built-in scenario name (``kz2014``, ``method-sni-reset``) or a file path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists() or len(p.parts) > 1:
        if not p.is_file():
            raise ScenarioError(f"{p}: no such scenario file")
        return p
    builtin = SCENARIO_DIR / f"{name_or_path}.toml"
    if not builtin.is_file():
        known = ", ".join(sorted(x.stem for x in SCENARIO_DIR.glob("*.toml")))
        raise ScenarioError(f"unknown scenario {name_or_path!r} (built-in: {known})")
    return builtin


def builtin_scenarios() -> list[str]:
    return sorted(x.stem for x in SCENARIO_DIR.glob("*.toml"))


def load(name_or_path: str | Path) -> Scenario:
    path = scenario_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    return parse(raw, path)


def parse(raw: dict[str, Any], path: Path) -> Scenario:
    head = raw.get("scenario", {})
    if not isinstance(head, dict):
        raise ScenarioError(f"{path}: [scenario] must be a table")
    entries = raw.get("site", [])
    if not isinstance(entries, list) or not entries:
        raise ScenarioError(f"{path}: needs at least one [[site]]")
    unknown = set(raw) - {"scenario", "site", "endpoint", "outage", "isp"}
    if unknown:
        raise ScenarioError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    sites: list[Site] = []
    seen_domains: set[str] = set()
    seen_addresses: set[str] = set()
    for i, entry in enumerate(entries, 1):
        where = f"{path}: [[site]] #{i}"
        if not isinstance(entry, dict):
            raise ScenarioError(f"{where}: must be a table")
        site = _parse_site(entry, where)
        where = f"{where} ({site.domain})"
        for n in site.names:
            if n in seen_domains:
                raise ScenarioError(f"{where}: domain {n!r} appears twice")
            seen_domains.add(n)
        for addr in site.addresses:
            if addr in seen_addresses:
                raise ScenarioError(f"{where}: address {addr} appears twice")
            seen_addresses.add(addr)
        sites.append(site)
    from kzprobe.lab.endpoints import parse_endpoints, parse_outages

    endpoints = parse_endpoints(raw.get("endpoint"), path, seen_addresses)
    outages = parse_outages(raw.get("outage"), path, endpoints)
    scenario = Scenario(
        name=str(head.get("name", path.stem)),
        description=str(head.get("description", "")).strip(),
        path=path,
        sites=tuple(sites),
        blockpage_title=str(head.get("blockpage_title", "Страница заблокирована")),
        access_rate=_rate(head.get("access_rate", ""), f"{path}: [scenario] access_rate"),
        endpoints=endpoints,
        outages=outages,
    )
    isps = _parse_isps(raw, entries, path)
    return replace(scenario, isps=isps) if isps else scenario


def _parse_isps(raw: dict[str, Any], entries: list[Any], path: Path) -> tuple[Isp, ...]:
    """``[[isp]]`` entries, each with the scenario its subscribers see: every site's own keys with
    the site's ``[site.isp."NAME"]`` table on top (a site without one is not censored there)."""
    heads = raw.get("isp", [])
    names = [h.get("name") if isinstance(h, dict) else None for h in heads] if isinstance(heads, list) else [None]
    for i, entry in enumerate(entries, 1):
        overlays = entry.get("isp", {})
        where = f"{path}: [[site]] #{i} ({entry.get('domain')})"
        if not isinstance(overlays, dict) or not all(isinstance(v, dict) for v in overlays.values()):
            raise ScenarioError(f'{where}: \'isp\' must be tables [site.isp."NAME"]')
        for name, overlay in overlays.items():
            if name not in names:
                raise ScenarioError(f"{where}: isp {name!r} is not declared in an [[isp]]")
            bad = set(overlay) - ISP_KEYS
            if bad:
                raise ScenarioError(f"{where}: isp {name!r}: key(s) {', '.join(sorted(bad))} are the site's "
                                    f"own, not an ISP's (an ISP may set {', '.join(sorted(ISP_KEYS))})")
            if "down" in {overlay.get("method"), *overlay.get("methods", ())}:
                raise ScenarioError(f"{where}: isp {name!r}: 'down' is the site's, not an ISP's")
    if not heads:
        return ()
    out = []
    for i, head in enumerate(heads, 1):
        where = f"{path}: [[isp]] #{i}"
        if not isinstance(head, dict) or set(head) - _ISP_HEAD_KEYS or not all(
                isinstance(head.get(k), str) and head.get(k) for k in _ISP_HEAD_KEYS):
            raise ScenarioError(f"{where}: needs exactly name, asn and country (strings)")
        name = head["name"]
        if names.count(name) > 1:
            raise ScenarioError(f"{where}: isp {name!r} appears twice")
        view = []
        for e in entries:
            overlay = e.get("isp", {}).get(name, {})
            base = {k: v for k, v in e.items() if k != "isp"}
            if "method" in overlay or "methods" in overlay:
                base = {k: v for k, v in base.items() if k not in ("method", "methods", "hop")}
            view.append({**base, **overlay})
        head_ = raw.get("scenario", {})
        sub = parse({"scenario": {**head_, "name": f"{head_.get('name', path.stem)}/{name}"}, "site": view}, path)
        out.append(Isp(name=name, asn=head["asn"], country=head["country"], scenario=sub))
    return tuple(out)


def _parse_site(e: dict[str, Any], where: str) -> Site:
    domain = e.get("domain")
    if not isinstance(domain, str) or "." not in domain or "/" in domain:
        raise ScenarioError(f"{where}: 'domain' must be a host name, got {domain!r}")
    domain = domain.lower().rstrip(".")
    where = f"{where} ({domain})"
    unknown = set(e) - _SITE_KEYS
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    address = _site_address(e.get("address", ""), "address", where)
    cdn_raw = e.get("cdn", [])
    if not isinstance(cdn_raw, list):
        raise ScenarioError(f"{where}: 'cdn' must be a list of addresses")
    cdn = tuple(_site_address(a, "cdn", where) for a in cdn_raw)
    geo = str(e.get("geo_address", ""))
    if geo and geo not in (address, *cdn):
        raise ScenarioError(f"{where}: 'geo_address' {geo} must be one of the site's addresses (address, cdn)")
    if geo and len(cdn) < 1:
        raise ScenarioError(f"{where}: 'geo_address' needs a 'cdn' (geo-DNS picks among several addresses)")
    redirects = e.get("redirects", [])
    if not isinstance(redirects, list) or any(r not in REDIRECTS for r in redirects):
        raise ScenarioError(f"{where}: 'redirects' must be a list of {', '.join(REDIRECTS)}, got {redirects!r}")
    cert = e.get("cert", "intermediate")
    if cert not in CERT_PROFILES:
        raise ScenarioError(f"{where}: 'cert' must be one of {', '.join(CERT_PROFILES)}, got {cert!r}")
    detail = e.get("detail", "")
    if not isinstance(detail, str) or (detail and not re.match(r"^[a-z]+(\.[a-z0-9_]+)+$", detail)):
        raise ScenarioError(f"{where}: 'detail' must be a verdict detail such as 'dpi.throttled', got {detail!r}")
    block = e.get("block_names", [])
    if not isinstance(block, list) or any(
            not isinstance(n, str) or not (n == domain or n.endswith("." + domain)) for n in block):
        raise ScenarioError(f"{where}: 'block_names' must list {domain} or names under it, got {block!r}")
    gzip = e.get("gzip", True)
    if not isinstance(gzip, bool):
        raise ScenarioError(f"{where}: 'gzip' must be true or false")
    raw_methods = e.get("methods", e.get("method", "none"))
    methods = (raw_methods,) if isinstance(raw_methods, str) else tuple(raw_methods)
    for m in methods:
        if m not in METHODS:
            raise ScenarioError(f"{where}: unknown method {m!r} (known: {', '.join(METHODS)})")
    methods = tuple(m for m in methods if m != "none")
    hop = str(e.get("hop", ""))
    for m in methods:
        allowed, default = METHODS[m]
        if not hop:
            hop = default
        if m == "down":
            continue
        if hop not in allowed:
            raise ScenarioError(f"{where}: method {m!r} cannot run at hop {hop!r} (allowed: {allowed})")
    expect = e.get("expect")
    if expect not in EXPECTATIONS:
        raise ScenarioError(f"{where}: 'expect' must be one of {', '.join(EXPECTATIONS)}, got {expect!r}")
    reason = e.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ScenarioError(f"{where}: 'reason' is required (say why, in the report's words)")
    url = str(e.get("url", f"https://{domain}/"))
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    aliases = tuple(str(a).lower() for a in e.get("aliases", ()))
    if parts.scheme not in ("http", "https") or host not in (domain, *aliases):
        raise ScenarioError(f"{where}: 'url' {url!r} must be http(s) on {domain}")
    try:
        delay = float(e.get("server_delay", 0.0))
        size = int(e.get("size", 0))
    except (TypeError, ValueError):
        raise ScenarioError(f"{where}: 'server_delay'/'size' must be numbers") from None
    title = str(e.get("title", domain))
    return Site(
        domain=domain,
        address=address,
        url=url,
        title=title,
        content=str(e.get("content", f"<h1>{title}</h1>")),
        methods=methods,
        hop=hop,
        expect=str(expect),
        reason=reason.strip(),
        quote=str(e.get("quote", "")).strip(),
        category=str(e.get("category", "")),
        aliases=aliases,
        size=size,
        bogon=str(e.get("bogon", "10.10.34.34")),
        forged=str(e.get("forged", "198.51.100.80")),
        rate=_rate(e.get("rate", "256kbit"), f"{where}: rate") or "256kbit",
        server_delay=delay,
        redirects=tuple(redirects),
        cert=str(cert),
        cdn=cdn,
        geo_address=geo,
        gzip=gzip,
        detail=detail,
        block_names=tuple(n.lower() for n in block),
    )


_RATE_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(bit|kbit|mbit|gbit)$")


def _rate(value: object, where: str) -> str:
    """A tc rate ("256kbit", "2mbit"); "" stays "" (unset)."""
    text = str(value)
    if text and not _RATE_RE.match(text):
        raise ScenarioError(f"{where}: {text!r} is not a tc rate (e.g. 256kbit, 2mbit)")
    return text


def _site_address(value: object, key: str, where: str) -> str:
    address = str(value)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ScenarioError(f"{where}: '{key}' must be an IPv4 address, got {address!r}") from None
    if ip not in SITE_NET or address in RESERVED_SITE_ADDRESSES:
        raise ScenarioError(f"{where}: '{key}' {address} must be inside {SITE_NET}")
    return address
