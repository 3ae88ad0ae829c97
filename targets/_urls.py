"""URL and host validation for target lists.

Validation is purely syntactic on purpose: loading a list must never touch the network (no DNS),
both because it has to be fast for lists of thousands of URLs and because resolving a censored
name from the wrong vantage point is itself a measurement (and a leak).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit, urlunsplit

import idna

from kzprobe.model import KINDS, NAME_KINDS, PORTLESS_KINDS

SCHEMES = ("http", "https")
#: Every scheme a target may have: web URLs, then the non-web kinds (model.KINDS).
ALL_SCHEMES = SCHEMES + KINDS

# Underscores are not legal in hostnames (RFC 952/1123) but do occur in real DNS names that
# browsers load, so rejecting them would drop measurable targets.
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_FORBIDDEN = re.compile(r"[\s\x00-\x1f\x7f]")
_HOST_DELIMS = re.compile(r"[/?#]")
# "mailto:x", "javascript:..." -- a scheme without "//"; distinct from "host:port" (digits follow).
_OPAQUE_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+-]*:(?!\d|$)")


class URLProblem(ValueError):
    """Why a URL or host is not an acceptable target (the message is one short line)."""


def ascii_hostname(host: str) -> str:
    """Return the ASCII (IDNA) form of a DNS name, or raise URLProblem.

    ``host`` is lowercase, without brackets or port.  A trailing dot (fully-qualified form) is
    allowed and kept.
    """
    if not host:
        raise URLProblem("empty host")
    name = host[:-1] if host.endswith(".") else host
    if not name:
        raise URLProblem("empty host")
    labels = name.split(".")
    out: list[str] = []
    for label in labels:
        if not label:
            raise URLProblem(f"invalid host {host!r}: empty label")
        if label.isascii():
            ace = label
        else:
            try:
                ace = idna.encode(label, uts46=True).decode("ascii")
            except (idna.IDNAError, UnicodeError) as exc:
                raise URLProblem(f"invalid host {host!r}: not IDNA-encodable ({exc})") from None
        if len(ace) > 63:
            raise URLProblem(f"invalid host {host!r}: label longer than 63 bytes")
        if not _LABEL.match(ace):
            raise URLProblem(f"invalid host {host!r}: bad character or hyphen in label {label!r}")
        if ace.startswith("xn--"):
            # An ACE label must decode, otherwise it is garbage that merely looks like punycode.
            try:
                idna.decode(ace)
            except (idna.IDNAError, UnicodeError):
                raise URLProblem(f"invalid host {host!r}: bad punycode label {label!r}") from None
        out.append(ace)
    ascii_name = ".".join(out)
    if len(ascii_name) > 253:
        raise URLProblem(f"invalid host {host!r}: longer than 253 bytes")
    if out[-1].isdigit():
        # All-numeric TLDs do not exist; this is a malformed IPv4 address such as 10.0.0.256.
        raise URLProblem(f"invalid host {host!r}: not a valid IP address or DNS name")
    return ascii_name + ("." if host.endswith(".") else "")


def _check_host(host: str, bracketed: bool) -> str:
    """Validate a host from a URL; return its canonical lowercase ASCII form."""
    if "%" in host:
        raise URLProblem(f"invalid host {host!r}: zone IDs and percent-escapes are not supported")
    if bracketed:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise URLProblem(f"invalid IPv6 address {host!r}") from None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if ":" in host:
        raise URLProblem(f"invalid host {host!r}: IPv6 addresses must be in brackets")
    return ascii_hostname(host)


def check_url(url: str) -> str:
    """Validate a target URL; return its canonical key (for de-duplication), or raise URLProblem.

    The key lowercases scheme and host, IDNA-encodes the host, drops a default port and turns an
    empty path into ``/``, so that ``HTTP://Example.com:80`` and ``http://example.com/`` are the
    same target.
    """
    if not url:
        raise URLProblem("empty URL")
    if _FORBIDDEN.search(url):
        # urlsplit silently strips tabs and newlines, which would hide a broken line.
        raise URLProblem(f"URL contains whitespace or control characters: {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise URLProblem(f"unparsable URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme or "://" not in url:
        raise URLProblem(f"not a URL {url!r}: expected scheme://host/...")
    if scheme not in ALL_SCHEMES:
        raise URLProblem(f"unsupported scheme {parts.scheme!r} (one of {', '.join(ALL_SCHEMES)})")
    netloc = parts.netloc
    if not netloc:
        raise URLProblem(f"no host in URL {url!r}")
    if "@" in netloc:
        raise URLProblem(f"credentials in URL are not supported: {url!r}")
    bracketed = netloc.startswith("[")
    if bracketed:
        end = netloc.find("]")
        if end < 0:
            raise URLProblem(f"unterminated IPv6 address in {url!r}")
        raw_host, rest = netloc[1:end], netloc[end + 1 :]
        if rest and not rest.startswith(":"):
            raise URLProblem(f"garbage after IPv6 address in {url!r}")
        port_text = rest[1:] if rest else None
    else:
        raw_host, sep, port_text_ = netloc.rpartition(":")
        if not sep:
            raw_host, port_text = netloc, None
        else:
            port_text = port_text_
    host = _check_host(raw_host.lower(), bracketed)
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not port_text.isascii():
            raise URLProblem(f"invalid port {port_text!r} in {url!r}")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise URLProblem(f"port {port} out of range (1-65535) in {url!r}")
    if scheme in KINDS:
        return _kind_key(url, scheme, host, port, parts.path, parts.query, parts.fragment)
    default = 443 if scheme == "https" else 80
    host_part = f"[{host}]" if ":" in host else host
    netloc_key = host_part if port in (None, default) else f"{host_part}:{port}"
    return urlunsplit((scheme, netloc_key, parts.path or "/", parts.query, parts.fragment))


def _kind_key(url: str, scheme: str, host: str, port: int | None, path: str, query: str,
              fragment: str) -> str:
    """The canonical key of a non-web target (``scheme://host:port``, ``udp-dns://name``).

    These are endpoints, not documents: a path, query or fragment would be silently ignored by
    the probe, so it is an error rather than a surprise.
    """
    if path not in ("", "/") or query or fragment:
        raise URLProblem(f"{scheme}:// takes no path, query or fragment: {url!r}")
    is_ip = _is_ip(host)
    if scheme in PORTLESS_KINDS:
        if port is not None:
            raise URLProblem(f"{scheme}:// takes a name and no port (the resolvers' port is used): {url!r}")
        if is_ip:
            raise URLProblem(f"{scheme}:// needs a DNS name, not an IP address: {url!r}")
        return f"{scheme}://{host.rstrip('.')}"
    if port is None:
        raise URLProblem(f"{scheme}:// needs a port ({scheme}://HOST:PORT): {url!r}")
    if scheme not in NAME_KINDS and not is_ip:
        # A relay or bridge is an address; resolving a name first would measure DNS instead.
        raise URLProblem(f"{scheme}:// needs an IP address, not a name: {url!r}")
    host_part = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host_part}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def url_from_line(text: str) -> str:
    """Turn one plain-text list entry (a URL, a bare host, or host:port) into a URL.

    Bare entries default to https because that is what a user typing a name into a browser gets
    today; ``http://`` must be written out to probe plain HTTP.
    """
    if "://" in text or _OPAQUE_SCHEME.match(text):
        return text  # check_url explains what is wrong with an opaque scheme
    try:
        # A bare IPv6 literal would otherwise be read as host:port pairs.
        if ":" in text and not text.startswith("["):
            ipaddress.IPv6Address(text)
            return f"https://[{text}]/"
    except ValueError:
        pass
    m = _HOST_DELIMS.search(text)
    if m is None:
        return f"https://{text}/"
    return f"https://{text}"
