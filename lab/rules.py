"""The middleboxes' rules, as pure functions of a hop's sites: nftables text, iptables argv
lists, tc argv lists.  Nothing here runs a command, so tests/test_lab_rules.py checks the
generated rule text without root; lab/core.py applies it inside the hop's namespace.

Where each method lives:

* ``ip-drop`` / ``ip-reject``: an nftables table in the forward path.
* ``sni-reset`` / ``sni-drop`` / ``host-reset``: iptables string match on the SNI (length-prefixed,
  see :func:`sni_hex`) or on ``Host: NAME``, in the filter table's FORWARD chain.
* ``tls-mitm``: nat REDIRECT of the site's port 443 to the interception proxy.
* ``throttle``: tc htb on the hop's volunteer-side interface, classed by the site's address (u32).
* ``sni-throttle``: the SNI string match marks the *connection* (CONNMARK); every later packet of
  that connection, the server's answers included, gets the mark copied to the packet (MARK); on
  the way out of the volunteer-side interface a marked packet is put in the site's slow tc htb
  class (iptables CLASSIFY sets skb->priority to the class id, which htb obeys before any filter).
  Why not a tc filter on the mark: this kernel has no ``fw`` or ``basic`` classifier, and u32's
  ``match mark`` is compiled out (it then matches every packet); there is no netem either.
  Another SNI on the same address is not marked, so it downloads at full rate: the follow-up's
  comparison point.
* Endpoints (lab/endpoints.py): ``ip-drop`` / ``ip-reject`` in their own nftables table;
  ``tls-fingerprint``, an iptables string match on the Tor-like ClientHello's cipher-suite bytes
  (see :func:`tls_fingerprint_rules`); an outage's rule in a table of its own, added and deleted
  during ``lab run`` (lab/outage.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kzprobe.lab.endpoints import Endpoint, Outage
from kzprobe.lab.scenario import Site

#: Port of the interception proxy on the hop (nat REDIRECT target).
MITM_PORT = 8443
#: First connmark/mark used by ``sni-throttle``; site k (0-based on its hop) gets MARK_BASE + k.
MARK_BASE = 0x4B00
#: First htb class minor number for shaped sites (tc and iptables both read minors as hex).
CLASS_BASE = 0x10


def site_names(site: Site) -> tuple[str, ...]:
    """Every name a site answers to (and a DPI box keyed on the site must match)."""
    names = list(site.names)
    if f"www.{site.domain}" not in names:
        names.append(f"www.{site.domain}")
    return tuple(names)


def blocked_names(site: Site) -> tuple[str, ...]:
    """The names a censor keyed on names lists for the site (Site.block_names, else all)."""
    return site.block_names or site_names(site)


def nft_rules(sites: Iterable[Site]) -> str:
    """IP blocking: an nftables table in the router's forward path ("" when nothing to block)."""
    rules = []
    for s in sites:
        for addr in s.addresses:
            if "ip-drop" in s.methods:
                rules.append(f"ip daddr {addr} counter drop")
            if "ip-reject" in s.methods:
                rules.append(f"ip daddr {addr} meta l4proto tcp counter reject with tcp reset")
                rules.append(f"ip daddr {addr} counter reject with icmp type admin-prohibited")
    if not rules:
        return ""
    body = "\n".join(f"    {r}" for r in rules)
    return (
        "table inet kzlab {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n"
        f"{body}\n  }}\n}}\n"
    )


def sni_hex(name: str) -> str:
    """The iptables hex-string for an SNI host_name: preceded by its 2-byte length, which pins the
    match to the whole name in the ClientHello, as DPI boxes keyed on the SNI field do."""
    n = len(name)
    return f"|{n >> 8:02x} {n & 0xFF:02x}|{name}"


def _sni_match(name: str) -> list[str]:
    return ["-p", "tcp", "--dport", "443", "-m", "string", "--algo", "bm", "--hex-string", sni_hex(name)]


def sni_throttled(sites: Iterable[Site]) -> list[tuple[Site, int]]:
    """The hop's ``sni-throttle`` sites with the mark each one's connections get."""
    return [(s, MARK_BASE + k) for k, s in enumerate(x for x in sites if "sni-throttle" in x.methods)]


def shaped(sites: Sequence[Site]) -> list[tuple[Site, str]]:
    """Every shaped site of a hop with its htb class id (address throttles first)."""
    order = [s for s in sites if "throttle" in s.methods] + [s for s, _ in sni_throttled(sites)]
    return [(s, f"1:{CLASS_BASE + k:x}") for k, s in enumerate(order)]


def iptables_rules(sites: Sequence[Site], dev: str = "") -> list[list[str]]:
    """DPI by string matching in the forward path, the MITM redirect and the SNI-throttle marks
    (argv for ``iptables -w``); ``dev`` is the hop's volunteer-side interface (where tc shapes)."""
    rules: list[list[str]] = []
    for s in sites:
        for name in blocked_names(s):
            if "sni-reset" in s.methods:
                rules.append(["-A", "FORWARD", *_sni_match(name), "-j", "REJECT", "--reject-with", "tcp-reset"])
            if "sni-drop" in s.methods:
                rules.append(["-A", "FORWARD", *_sni_match(name), "-j", "DROP"])
            if "host-reset" in s.methods:
                rules.append(["-A", "FORWARD", "-p", "tcp", "--dport", "80", "-m", "string", "--algo", "bm",
                              "--icase", "--string", f"Host: {name}\r", "-j", "REJECT",
                              "--reject-with", "tcp-reset"])
        if "tls-mitm" in s.methods:
            for addr in s.addresses:
                rules.append(["-t", "nat", "-A", "PREROUTING", "-d", addr, "-p", "tcp", "--dport", "443",
                              "-j", "REDIRECT", "--to-ports", str(MITM_PORT)])
    marked = sni_throttled(sites)
    for s, mark in marked:
        for name in blocked_names(s):
            rules.append(["-t", "mangle", "-A", "FORWARD", *_sni_match(name),
                          "-j", "CONNMARK", "--set-mark", hex(mark)])
    if marked:
        # Copy the connection's mark onto each of its packets, both directions.
        rules.append(["-t", "mangle", "-A", "FORWARD", "-m", "connmark", "!", "--mark", "0",
                      "-j", "CONNMARK", "--restore-mark"])
        classes = dict((s.domain, c) for s, c in shaped(sites))
        out = ["-o", dev] if dev else []
        for s, mark in marked:
            rules.append(["-t", "mangle", "-A", "POSTROUTING", *out, "-m", "mark", "--mark", hex(mark),
                          "-j", "CLASSIFY", "--set-class", classes[s.domain]])
    return rules


def tc_rules(dev: str, sites: Sequence[Site], access_rate: str = "") -> list[list[str]]:
    """Shaping of what flows toward the volunteer (the downloads) on ``dev`` (argv for ``tc``).

    One htb tree: class 1:2 is the link (``access_rate``, the subscriber line, or unlimited);
    under it 1:1 takes everything unclassified and each shaped site has its own class.  Address
    throttles are classed by a u32 source match, SNI throttles by iptables CLASSIFY (see
    :func:`iptables_rules`)."""
    classes = shaped(sites)
    if not classes and not access_rate:
        return []
    link = access_rate or "10gbit"
    rules = [
        ["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"],
        ["class", "add", "dev", dev, "parent", "1:", "classid", "1:2", "htb", "rate", link, "ceil", link],
        ["class", "add", "dev", dev, "parent", "1:2", "classid", "1:1", "htb", "rate", link, "ceil", link],
    ]
    for s, classid in classes:
        rules.append(["class", "add", "dev", dev, "parent", "1:2", "classid", classid, "htb",
                      "rate", s.rate, "ceil", s.rate])
        if "throttle" in s.methods:
            for addr in s.addresses:
                rules.append(["filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                              "u32", "match", "ip", "src", f"{addr}/32", "flowid", classid])
    return rules


# -- endpoints of the other kinds (lab/endpoints.py) ----------------------------------------------
#: nftables tables for endpoints and for outage windows, apart from the sites' ``kzlab`` table so
#: that an outage is added and removed as a whole (``nft delete table inet kzlab_outage``).
ENDPOINT_TABLE = "kzlab_ep"
OUTAGE_TABLE = "kzlab_outage"
#: iptables' string match takes patterns of at most 128 bytes (XT_STRING_MAX_PATTERN_SIZE).
MAX_PATTERN = 128


def _nft_table(name: str, rules: list[str]) -> str:
    if not rules:
        return ""
    body = "\n".join(f"    {r}" for r in rules)
    return (
        f"table inet {name} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n"
        f"{body}\n  }}\n}}\n"
    )


def _address_rules(address: str, method: str) -> list[str]:
    if method == "ip-drop":
        return [f"ip daddr {address} counter drop"]
    if method == "ip-reject":
        return [f"ip daddr {address} meta l4proto tcp counter reject with tcp reset",
                f"ip daddr {address} counter reject with icmp type admin-prohibited"]
    return []


def endpoint_nft_rules(endpoints: Iterable[Endpoint]) -> str:
    """IP blocking of endpoints (every port of the address), one table; "" when none."""
    rules: list[str] = []
    done: set[tuple[str, str]] = set()
    for e in endpoints:
        for m in ("ip-drop", "ip-reject"):
            if m in e.methods and (e.address, m) not in done:
                done.add((e.address, m))
                rules += _address_rules(e.address, m)
    return _nft_table(ENDPOINT_TABLE, rules)


def outage_nft_rules(outage: Outage, endpoints: Iterable[Endpoint]) -> str:
    """The outage's table: its method on each of its targets' addresses (added, then deleted)."""
    by_target = {e.target: e for e in endpoints}
    addresses = sorted({by_target[t].address for t in outage.targets})
    return _nft_table(OUTAGE_TABLE, [r for a in addresses for r in _address_rules(a, outage.method)])


def dpi_hex(signature: bytes) -> str:
    """iptables ``--hex-string`` for raw bytes: ``|c0 2b ...|``."""
    if not 0 < len(signature) <= MAX_PATTERN:
        raise ValueError(f"a string-match pattern must be 1-{MAX_PATTERN} bytes, got {len(signature)}")
    return "|" + " ".join(f"{b:02x}" for b in signature) + "|"


def tls_fingerprint_rules(endpoints: Iterable[Endpoint], signature: bytes, gateway: str) -> list[list[str]]:
    """``tls-fingerprint``: the Tor-like ClientHello (the only hello carrying ``signature``, its
    cipher-suite bytes) to an endpoint's OR port is reset; every other hello passes.

    Two rules per endpoint, both on the same match: TEE first sends a copy of the hello on to
    the server (``gateway``: the next router toward the world), then REJECT drops the original
    and resets the client.  The server answers the copy, the client's kernel (its socket is gone)
    answers that with a reset, and the server's handshake ends: as with a DPI box that resets
    both ends.  Without the copy ``openssl s_server`` (one connection at a time) would wait for
    ever for a hello that never comes, and every later client of that relay would hang behind it."""
    rules: list[list[str]] = []
    pattern = dpi_hex(signature)
    for e in endpoints:
        if "tls-fingerprint" not in e.methods:
            continue
        match = ["-d", e.address, "-p", "tcp", "--dport", str(e.port), "-m", "string", "--algo", "bm",
                 "--hex-string", pattern]
        rules.append(["-A", "FORWARD", *match, "-j", "TEE", "--gateway", gateway])
        rules.append(["-A", "FORWARD", *match, "-j", "REJECT", "--reject-with", "tcp-reset"])
    return rules
