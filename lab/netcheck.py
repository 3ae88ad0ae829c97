"""A minimal, kzprobe-independent look at one URL from inside the lab, for checking the network.

``python -m kzprobe.lab.netcheck URL --resolver IP ... --ca PEM [--address IP]`` prints JSON: every
DNS response per resolver (all of them, within a window, to see injection), then TCP, TLS (with
the URL's SNI and with ``example.com`` on the same address) and an HTTP GET (with the URL's name,
and with ``example.com`` on the same address).  The lab's tests use
it to check each censorship method at the packet level, separately from kzprobe's classifier.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import time
from typing import Any
from urllib.parse import urlsplit


def dns_all(name: str, resolver: str, window: float = 0.8) -> list[dict[str, Any]]:
    import dns.message
    import dns.rcode

    q = dns.message.make_query(name, "A")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(window)
    t0 = time.monotonic()
    s.sendto(q.to_wire(), (resolver, 53))
    out = []
    try:
        while time.monotonic() - t0 < window:
            data, _ = s.recvfrom(4096)
            r = dns.message.from_wire(data)
            addrs = [rd.address for rr in r.answer for rd in rr if hasattr(rd, "address")]
            out.append({"rcode": dns.rcode.to_text(r.rcode()), "addresses": addrs,
                        "delay": round(time.monotonic() - t0, 3)})
    except (TimeoutError, OSError):
        pass
    finally:
        s.close()
    return out


def _err(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"ssl_verify:{exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"ssl:{exc.reason}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError):
        return f"oserror:{exc.errno}"
    return type(exc).__name__


def tls(address: str, port: int, sni: str, ca: str, timeout: float) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=ca)
    t0 = time.monotonic()
    try:
        with socket.create_connection((address, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=sni) as s:
            return {"ok": True, "version": s.version(), "seconds": round(time.monotonic() - t0, 3)}
    except Exception as exc:  # every failure is a result here
        return {"ok": False, "error": _err(exc), "seconds": round(time.monotonic() - t0, 3)}


def http_get(url: str, address: str, ca: str, timeout: float) -> dict[str, Any]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    t0 = time.monotonic()
    try:
        raw = socket.create_connection((address, port), timeout=timeout)
        s: Any = raw
        if parts.scheme == "https":
            s = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname=host)
        s.sendall(f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        reset = False
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                # An injected response is followed by a RST; what arrived before it still counts.
                if not data:
                    raise
                reset = True
                break
            if not chunk:
                break
            data += chunk
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        return {"ok": True, "status": status, "body": body.decode("utf-8", "replace")[:2000],
                "length": len(body), "reset_after_data": reset, "seconds": round(time.monotonic() - t0, 3)}
    except Exception as exc:  # every failure is a result here
        return {"ok": False, "error": _err(exc), "seconds": round(time.monotonic() - t0, 3)}


def check(url: str, resolvers: list[str], ca: str, address: str | None, timeout: float) -> dict[str, Any]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: dict[str, Any] = {"url": url, "dns": {r: dns_all(host, r) for r in resolvers}}
    if address is None:
        for answers in result["dns"].values():
            if answers and answers[-1]["addresses"]:
                address = answers[-1]["addresses"][0]
                break
    result["address"] = address
    if address is None:
        return result
    t0 = time.monotonic()
    try:
        socket.create_connection((address, port), timeout=timeout).close()
        result["tcp"] = {"ok": True, "seconds": round(time.monotonic() - t0, 3)}
    except Exception as exc:  # every failure is a result here
        result["tcp"] = {"ok": False, "error": _err(exc)}
    if parts.scheme == "https":
        result["tls"] = tls(address, port, host, ca, timeout)
        result["tls_control"] = tls(address, port, "example.com", ca, timeout)
    result["http"] = http_get(url, address, ca, timeout)
    # The same address with a benign name (SNI and Host): what a DPI box keyed on the name spares.
    result["http_control"] = http_get(f"{parts.scheme}://example.com/", address, ca, timeout)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kzprobe.lab.netcheck")
    ap.add_argument("url")
    ap.add_argument("--resolver", action="append", default=[])
    ap.add_argument("--ca", required=True)
    ap.add_argument("--address", help="Connect here instead of the last DNS answer.")
    ap.add_argument("--timeout", type=float, default=3.0)
    a = ap.parse_args(argv)
    json.dump(check(a.url, a.resolver, a.ca, a.address, a.timeout), sys.stdout, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
