"""Which addresses a public name should never resolve to.

TEST-NET ranges (198.51.100.0/24, 203.0.113.0/24) are deliberately *not* bogons here: the lab
serves its sites from them, and a real resolver never hands them out for a public name anyway.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

_BOGON_NETS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    )
)


def is_ip(text: str) -> bool:
    """True for an IPv4 or IPv6 address literal (no brackets, no port)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


@lru_cache(maxsize=4096)
def is_bogon(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in _BOGON_NETS)
