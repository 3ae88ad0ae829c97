"""Target URLs of the non-web kinds (issue 15): tor-or, tor-dir, obfs4, tcp, udp-dns, proxy+http.

Syntax only: nothing here resolves or connects (the addresses are data).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kzprobe.model import KINDS, Target
from kzprobe.targets import load_file
from kzprobe.targets._urls import URLProblem, check_url


def test_kinds_are_the_contract() -> None:
    assert KINDS == ("tor-or", "tor-dir", "obfs4", "tcp", "udp-dns", "proxy+http")


@pytest.mark.parametrize(("url", "key", "kind", "host", "port"), [
    ("tor-or://128.31.0.39:9201", "tor-or://128.31.0.39:9201", "tor-or", "128.31.0.39", 9201),
    ("tor-or://128.31.0.39:9201/", "tor-or://128.31.0.39:9201", "tor-or", "128.31.0.39", 9201),
    ("TOR-OR://[2001:858:2:2:AABB:0:563B:1526]:443", "tor-or://[2001:858:2:2:aabb:0:563b:1526]:443", "tor-or",
     "2001:858:2:2:aabb:0:563b:1526", 443),
    ("tor-dir://86.59.21.38:80", "tor-dir://86.59.21.38:80", "tor-dir", "86.59.21.38", 80),
    ("obfs4://198.51.100.7:443", "obfs4://198.51.100.7:443", "obfs4", "198.51.100.7", 443),
    ("tcp://e1.WhatsApp.net:5222", "tcp://e1.whatsapp.net:5222", "tcp", "e1.whatsapp.net", 5222),
    ("tcp://149.154.175.50:443", "tcp://149.154.175.50:443", "tcp", "149.154.175.50", 443),
    ("udp-dns://web.whatsapp.com", "udp-dns://web.whatsapp.com", "udp-dns", "web.whatsapp.com", 53),
    ("udp-dns://web.whatsapp.com.", "udp-dns://web.whatsapp.com", "udp-dns", "web.whatsapp.com.", 53),
    ("proxy+http://proxy.example:3128", "proxy+http://proxy.example:3128", "proxy+http", "proxy.example", 3128),
    ("https://example.com/a", "https://example.com/a", "url", "example.com", 443),
    ("http://example.com", "http://example.com/", "url", "example.com", 80),
])
def test_good_kind_urls(url: str, key: str, kind: str, host: str, port: int) -> None:
    assert check_url(url) == key
    t = Target(url)
    assert t.kind == kind
    assert t.scheme == (kind if kind != "url" else url.split(":", 1)[0])
    assert t.host == host
    assert t.port == port


@pytest.mark.parametrize(("url", "why"), [
    ("tor-or://128.31.0.39", "needs a port"),
    ("tor-dir://86.59.21.38/", "needs a port"),
    ("obfs4://198.51.100.7", "needs a port"),
    ("tcp://e1.whatsapp.net", "needs a port"),
    ("proxy+http://proxy.example", "needs a port"),
    ("tor-or://moria.example:9201", "needs an IP address"),
    ("obfs4://bridge.example:443", "needs an IP address"),
    ("tor-dir://dir.example:80", "needs an IP address"),
    ("tor-or://128.31.0.300:9201", "not a valid IP address"),
    ("tor-or://[2001:db8::zz]:443", "IPv6 address"),
    ("tor-or://2001:db8::1:443", "IPv6 addresses must be in brackets"),
    ("udp-dns://web.whatsapp.com:53", "no port"),
    ("udp-dns://149.154.175.50", "needs a DNS name"),
    ("tcp://e1.whatsapp.net:0", "out of range"),
    ("tcp://e1.whatsapp.net:65536", "out of range"),
    ("tcp://e1.whatsapp.net:x", "invalid port"),
    ("tcp://e1.whatsapp.net:443/chat", "no path"),
    ("obfs4://198.51.100.7:443?cert=abc", "no path, query"),
    ("proxy+http://user:pw@proxy.example:3128", "credentials"),
    ("socks5://proxy.example:1080", "unsupported scheme 'socks5'"),
])
def test_bad_kind_urls_say_why(url: str, why: str) -> None:
    with pytest.raises(URLProblem, match=why) as info:
        check_url(url)
    assert "\n" not in str(info.value)


def test_plain_text_file_with_kinds_gives_one_line_per_bad_entry(tmp_path: Path) -> None:
    p = tmp_path / "kinds.txt"
    p.write_text(
        "# circumvention endpoints\n"
        "tor-or://128.31.0.39:9201\n"
        "tor-or://128.31.0.39\n"            # 3: no port
        "udp-dns://g.whatsapp.net\n"
        "tcp://g.whatsapp.net:5222  # XMPP\n"
        "tor-dir://dir.example:80\n"        # 6: a name
        "proxy+http://203.0.113.9:8080\n"
        "tor-or://128.31.0.39:9201/\n"      # duplicate of line 2
        "https://www.torproject.org/\n",
        encoding="utf-8")
    res = load_file(p)
    assert [t.url for t in res.targets] == [
        "tor-or://128.31.0.39:9201", "udp-dns://g.whatsapp.net", "tcp://g.whatsapp.net:5222",
        "proxy+http://203.0.113.9:8080", "https://www.torproject.org/"]
    assert [t.kind for t in res.targets] == ["tor-or", "udp-dns", "tcp", "proxy+http", "url"]
    assert res.duplicates == 1
    assert len(res.errors) == 2
    assert res.errors[0].startswith(f"{p}:3: ") and "needs a port" in res.errors[0]
    assert res.errors[1].startswith(f"{p}:6: ") and "needs an IP address" in res.errors[1]
    assert all("\n" not in e for e in res.errors)


def test_csv_list_with_a_kind(tmp_path: Path) -> None:
    p = tmp_path / "kinds.csv"
    p.write_text("url,category_code,notes\ntcp://e1.whatsapp.net:443,COMT,x\nobfs4://bridge.example:1,ANON,y\n",
                 encoding="utf-8")
    res = load_file(p)
    assert [t.url for t in res.targets] == ["tcp://e1.whatsapp.net:443"]
    assert res.targets[0].category == "COMT"
    assert len(res.errors) == 1 and res.errors[0].startswith(f"{p}:3: ")
