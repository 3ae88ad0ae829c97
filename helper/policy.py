"""What the control helper agrees to touch: the guard that keeps it from being an open proxy.

A helper is a public service that connects wherever a request says.  Without a guard it is a
free scanner of the operator's own network (cloud metadata at 169.254.169.254, databases on
10.x, admin ports on localhost) and a relay to arbitrary ports anywhere.  So by default it only
ever connects to globally routed unicast addresses, on ports 80 and 443, and every refusal has
a reason that goes back to the client.

On top of the address classes it refuses the helper host's own addresses and every route of the
kernel's ``local`` table (:mod:`kzprobe.helper.localnet`), and whatever the operator lists with
``--deny CIDR`` (the networks the host can reach but the world must not).

Refusals say only "refused": never which address a name resolved to, since that is what the
operator's resolver knows about internal names.

``--allow-private`` lifts the class, port and local checks (never ``--deny``).  It exists for
the lab and the tests, where every site lives
on loopback or in private namespaces on high ports; it must never be used on a helper that
is reachable from the internet.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

import dns.exception
import dns.name

from kzprobe.analysis.bogons import is_ip
from kzprobe.helper.localnet import LocalNetworks, Network
from kzprobe.model import KINDS, NAME_KINDS, PORTLESS_KINDS

MAX_URL_LENGTH = 2048
ALLOWED_PORTS = frozenset({80, 443})
ALLOWED_SCHEMES = frozenset({"http", "https"})
#: The target kinds beyond URLs (issue 15) a helper measures as control: see :meth:`Policy.kind_port_refusal`.
KIND_SCHEMES = frozenset(KINDS)
#: Kind ports below this are refused (80 and 443 excepted).  Tor relays, directories and bridges,
#: messaging endpoints (XMPP 5222, Viber 4244/5242) and proxies (3128, 8080) live on 80, 443 or
#: above 1023; below 1024 are the host's infrastructure services (SSH, SMTP, LDAP...), where a
#: connect from the helper is abuse, not a measurement.
MIN_KIND_PORT = 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Prefixes refused on top of ``not is_global``.  Python's registry tables change between
#: versions (3.11 vs 3.13 disagree on several IPv6 blocks), so the ranges a helper must never
#: reach are spelled out here too: a newer or older interpreter cannot quietly open them up.
_EXTRA_BLOCKED = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",          # "this network"
    "10.0.0.0/8",         # RFC 1918
    "100.64.0.0/10",      # CGNAT (RFC 6598)
    "127.0.0.0/8",        # loopback
    "169.254.0.0/16",     # link-local (cloud metadata lives here)
    "172.16.0.0/12",      # RFC 1918
    "192.0.0.0/24",       # IETF protocol assignments
    "192.0.2.0/24",       # TEST-NET-1
    "192.88.99.0/24",     # 6to4 relay anycast (deprecated)
    "192.168.0.0/16",     # RFC 1918
    "198.18.0.0/15",      # benchmarking
    "198.51.100.0/24",    # TEST-NET-2
    "203.0.113.0/24",     # TEST-NET-3
    "224.0.0.0/4",        # multicast
    "240.0.0.0/4",        # reserved, and the limited broadcast address
    "::/128", "::1/128",
    "::ffff:0:0/96",      # IPv4-mapped: judged by the embedded IPv4 address instead
    "64:ff9b::/96",       # NAT64: ditto
    "64:ff9b:1::/48",     # local-use NAT64
    "100::/64",           # discard-only
    "2001::/23",          # IETF protocol assignments (Teredo, ORCHID, ...)
    "2001:db8::/32",      # documentation
    "2002::/16",          # 6to4: embeds an IPv4 address of any kind
    "3fff::/20",          # documentation (RFC 9637)
    "5f00::/16",          # SRv6 SIDs
    "fc00::/7",           # unique local
    "fe80::/10",          # link-local
    "fec0::/10",          # site-local (deprecated)
    "ff00::/8",           # multicast
))

#: Refused even with --allow-private: a TCP connect to these is never a website.
_NEVER = tuple(ipaddress.ip_network(n) for n in ("0.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32",
                                                 "::/128", "ff00::/8"))


class PolicyError(ValueError):
    """A request the helper will not serve; ``code`` is the machine-readable short code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in ipaddress.ip_network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


#: What a refusal says to the client, whatever the reason (the reason goes to the log only).
REFUSED = "refused"


def idna_problem(host: str) -> str | None:
    """Why the system resolver could not even be asked for ``host`` (None: it can).

    dnspython accepts names that Python's ``idna`` codec -- which getaddrinfo goes through --
    rejects (over-long labels after encoding, characters IDNA 2003 forbids): reject them up front
    instead of letting a ``UnicodeError`` escape from deep inside a measurement.
    """
    try:
        encoded = host.rstrip(".").encode("idna")
    except (UnicodeError, ValueError):
        return "not a valid internationalised name"
    if not encoded or len(encoded) > 253 or any(not 0 < len(label) <= 63 for label in encoded.split(b".")):
        return "not a valid DNS name"
    return None


@dataclass(frozen=True)
class Policy:
    allow_private: bool = False
    #: ``--deny``: refused even with --allow-private.
    deny: tuple[Network, ...] = ()
    #: The host's own addresses and local-table routes (refreshed by the server).
    local: LocalNetworks = field(default_factory=LocalNetworks)
    #: LAB ONLY (``--lab-public``): prefixes treated as the public internet although their class
    #: is special-purpose (the lab's 198.51.100.0/24 ...).  Local and denied addresses stay refused.
    lab_public: tuple[Network, ...] = ()

    def address_refusal(self, address: str) -> str | None:
        """Why the helper will not connect to ``address`` (None: it will); for the log, not the client.

        Memoised per address (bounded), and per generation of the local-address table: a request
        checks the same addresses several times (DNS, connect, redirects, the answer).
        """
        cache = self.local.cache
        key = (self.allow_private, self.deny, self.lab_public, address)
        if key not in cache:
            if len(cache) > 4096:
                cache.clear()
            cache[key] = self._refusal(address)
        return cache[key]

    def _refusal(self, address: str) -> str | None:
        try:
            ip: IPAddress = ipaddress.ip_address(address)
        except ValueError:
            return "not an IP address"
        inner = _embedded_v4(ip)
        if inner is not None:
            # ::ffff:10.0.0.1 reaches 10.0.0.1 on a dual-stack socket: judge what it reaches.
            why = self._refusal(str(inner))
            return f"embeds {inner}: {why}" if why else None
        if any(ip in n for n in _NEVER):
            return "unspecified, multicast or broadcast address"
        if any(ip.version == n.version and ip in n for n in self.deny):
            return "denied by --deny"
        if self.allow_private:
            return None
        if ip in self.local:
            return "an address of the helper's own host"
        if any(ip.version == n.version and ip in n for n in self.lab_public):
            return None
        if ip.is_loopback:
            return "loopback address"
        if ip.is_link_local:
            return "link-local address"
        if ip.is_multicast:
            return "multicast address"
        if ip.is_unspecified:
            return "unspecified address"
        if ip in ipaddress.ip_network("100.64.0.0/10"):
            return "shared (CGNAT) address"
        if ip.is_private:
            return "private or special-purpose address"
        if ip.is_reserved:
            return "reserved address"
        if not ip.is_global or any(ip in n for n in _EXTRA_BLOCKED):
            return "not a globally routed address"
        return None

    def allow_address(self, address: str) -> bool:
        return self.address_refusal(address) is None

    def port_refusal(self, port: int) -> str | None:
        if self.allow_private or port in ALLOWED_PORTS:
            return None
        return f"port {port} is not 80 or 443"

    def kind_port_refusal(self, port: int) -> str | None:
        """Why a kind target's port is refused (None: it is not).

        A kind measurement is a TCP connect (tcp, obfs4), a fixed request (tor-dir's GET, a proxy's
        ``CONNECT <the helper's benign name>:443``) or a TLS handshake: bytes the helper chooses,
        never the client, so no port can be made to carry a client's payload (no cross-protocol
        requests, no relaying through open proxies: the CONNECT target is the operator's
        ``--control-sni``).  What remains is a reachability oracle for public addresses, which
        anyone can scan anyway; the per-client rate limits bound it, and ports under 1024 but 80
        and 443 (infrastructure services, abuse reports) are refused.
        """
        if self.allow_private or port in ALLOWED_PORTS or port >= MIN_KIND_PORT:
            return None
        return f"port {port} is below {MIN_KIND_PORT} (and not 80 or 443)"

    def check_url(self, url: str) -> SplitResult:
        """Validate a target URL; raises :class:`PolicyError` (code ``bad_url`` -> 400, else 403).

        http(s) URLs on ports 80 and 443; the kinds (``tcp://``, ``tor-dir://``...) on the ports
        :meth:`kind_port_refusal` allows, without path, query or credentials."""
        if len(url) > MAX_URL_LENGTH:
            raise PolicyError(f"url longer than {MAX_URL_LENGTH} characters", "bad_url")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise PolicyError("url contains whitespace or control characters", "bad_url")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise PolicyError(f"url does not parse: {exc}", "bad_url") from None
        scheme = parts.scheme.lower()
        kind = scheme in KIND_SCHEMES
        if scheme not in ALLOWED_SCHEMES and not kind:
            raise PolicyError(f"scheme {scheme or '(none)'!r} refused: only http, https and "
                              f"{', '.join(sorted(KIND_SCHEMES))}", "forbidden_scheme")
        host = (parts.hostname or "").lower()
        if not host:
            raise PolicyError("url has no host", "bad_url")
        if parts.username is not None or parts.password is not None:
            raise PolicyError("url carries credentials", "bad_url")
        if kind:
            self._check_kind(scheme, parts, host, port)
        else:
            if port is None:
                port = 443 if scheme == "https" else 80
            why = self.port_refusal(port)
            if why:
                raise PolicyError(f"{why}: refused", "forbidden_port")
        if is_ip(host):
            if self.address_refusal(host):
                raise PolicyError(REFUSED, "forbidden_address")
        else:
            try:
                name = dns.name.from_text(host)
            except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
                raise PolicyError(f"host {host!r} is not a valid DNS name: {exc}", "bad_url") from None
            # labels include the root: ("site", "test", "").  A bare word would be completed by
            # the operator's search domains, i.e. name something inside the operator's network.
            if len(name.labels) < (2 if self.allow_private else 3):
                raise PolicyError(f"host {host!r} is not a fully qualified name", "bad_url")
            why = idna_problem(host)
            if why:
                raise PolicyError(f"host {host!r} is {why}", "bad_url")
        return parts

    def _check_kind(self, scheme: str, parts: SplitResult, host: str, port: int | None) -> None:
        """The shape of a kind URL (as targets/_urls.py accepts it) and its port."""
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise PolicyError(f"a {scheme}:// target has no path, query or fragment", "bad_url")
        if scheme in PORTLESS_KINDS:
            if port is not None:
                raise PolicyError(f"a {scheme}:// target has no port", "bad_url")
            return
        if port is None:
            raise PolicyError(f"a {scheme}:// target needs a port", "bad_url")
        if scheme not in NAME_KINDS and not is_ip(host):
            raise PolicyError(f"a {scheme}:// target's host must be an IP address, not a name", "bad_url")
        why = self.kind_port_refusal(port)
        if why:
            raise PolicyError(f"{why}: refused", "forbidden_port")
