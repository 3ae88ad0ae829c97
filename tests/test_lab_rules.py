"""The lab's generated configuration, checked as text without root: middlebox rules (nftables,
iptables, tc), DNS (dnsmasq lines), nginx (text, and ``nginx -t`` when nginx is installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kzprobe.lab import rules, services
from kzprobe.lab.nginx import Vhost, vhost_servers
from kzprobe.lab.scenario import Site, load


def site(domain: str = "ratel.kz", address: str = "203.0.113.11", *methods: str, **kw: object) -> Site:
    base: dict[str, object] = dict(domain=domain, address=address, url=f"https://{domain}/", title=domain,
                                   content="", methods=tuple(methods), hop="bb2", expect="ok", reason="r")
    base.update(kw)
    return Site(**base)  # type: ignore[arg-type]


def test_sni_hex_pins_the_length_prefixed_name() -> None:
    assert rules.sni_hex("ratel.kz") == "|00 08|ratel.kz"
    assert rules.sni_hex("a" * 300) == "|01 2c|" + "a" * 300


def test_nft_blocks_every_address_of_the_site_and_nothing_else() -> None:
    text = rules.nft_rules([site("bambuser.com", "203.0.113.13", "ip-drop", cdn=("203.0.113.14",)),
                            site("hidemyass.com", "203.0.113.20", "ip-reject"), site("mail.ru", "203.0.113.200")])
    assert "ip daddr 203.0.113.13 counter drop" in text and "ip daddr 203.0.113.14 counter drop" in text
    assert "ip daddr 203.0.113.20 meta l4proto tcp counter reject with tcp reset" in text
    assert "icmp type admin-prohibited" in text and "203.0.113.200" not in text
    assert text.startswith("table inet kzlab {") and "hook forward" in text
    assert rules.nft_rules([site("mail.ru", "203.0.113.200")]) == ""


def test_iptables_string_matches_for_each_dpi_method() -> None:
    got = rules.iptables_rules([site("ratel.kz", "203.0.113.11", "sni-reset", "host-reset"),
                                site("torproject.org", "203.0.113.22", "sni-drop")])
    text = [" ".join(r) for r in got]
    assert ("-A FORWARD -p tcp --dport 443 -m string --algo bm --hex-string |00 08|ratel.kz "
            "-j REJECT --reject-with tcp-reset") in text
    assert any("|00 0c|www.ratel.kz" in t and "tcp-reset" in t for t in text)
    assert any("--string Host: ratel.kz\r" in t and "--dport 80" in t for t in text)
    assert any("|00 0e|torproject.org" in t and t.endswith("-j DROP") for t in text)
    assert not any("mangle" in t for t in text)  # no throttling asked for
    assert rules.iptables_rules([site("mail.ru", "203.0.113.200")]) == []


def test_sni_throttle_marks_connections_by_sni_and_restores_the_mark() -> None:
    slow = site("kiwi.kz", "203.0.113.23", "sni-throttle", rate="256kbit")
    other = site("ok.kz", "203.0.113.24", "sni-throttle", rate="1mbit")
    got = [" ".join(r) for r in rules.iptables_rules([slow, other], "kzl1-2v")]
    assert ("-t mangle -A FORWARD -p tcp --dport 443 -m string --algo bm --hex-string |00 07|kiwi.kz "
            f"-j CONNMARK --set-mark {hex(rules.MARK_BASE)}") in got
    assert any("|00 05|ok.kz" in t and hex(rules.MARK_BASE + 1) in t for t in got)
    # One restore rule, after every set-mark rule (order matters in a chain).
    forward = [t for t in got if "FORWARD" in t]
    assert [i for i, t in enumerate(forward) if "--restore-mark" in t] == [len(forward) - 1]
    # Marked packets leaving toward the volunteer go to the site's htb class.
    assert (f"-t mangle -A POSTROUTING -o kzl1-2v -m mark --mark {hex(rules.MARK_BASE)} "
            "-j CLASSIFY --set-class 1:10") in got
    assert any(f"--mark {hex(rules.MARK_BASE + 1)} -j CLASSIFY --set-class 1:11" in t for t in got)
    tc = [" ".join(r) for r in rules.tc_rules("kzl1-2v", [slow, other])]
    assert tc[0] == "qdisc add dev kzl1-2v root handle 1: htb default 1"
    assert "class add dev kzl1-2v parent 1:2 classid 1:10 htb rate 256kbit ceil 256kbit" in tc
    assert "class add dev kzl1-2v parent 1:2 classid 1:11 htb rate 1mbit ceil 1mbit" in tc
    # The address is not what is shaped: no filter at all for SNI-throttled sites (CLASSIFY does it).
    assert not any("filter" in t or "203.0.113.23" in t for t in tc)


def test_address_throttle_shapes_by_source_address() -> None:
    tc = [" ".join(r) for r in rules.tc_rules("d", [site("kolesa.kz", "203.0.113.21", "throttle")])]
    assert "filter add dev d parent 1: protocol ip prio 1 u32 match ip src 203.0.113.21/32 flowid 1:10" in tc
    assert not any("CLASSIFY" in " ".join(r) for r in rules.iptables_rules([site("k.kz", "203.0.113.21", "throttle")]))
    assert rules.tc_rules("d", [site("mail.ru", "203.0.113.200")]) == []


def test_access_rate_shapes_the_whole_subscriber_line() -> None:
    tc = [" ".join(r) for r in rules.tc_rules("kzl1-iv", [], "2mbit")]
    assert tc == ["qdisc add dev kzl1-iv root handle 1: htb default 1",
                  "class add dev kzl1-iv parent 1: classid 1:2 htb rate 2mbit ceil 2mbit",
                  "class add dev kzl1-iv parent 1:2 classid 1:1 htb rate 2mbit ceil 2mbit"]
    # Shaped sites on the same hop live under the line's class, so the line's rate bounds them too.
    tc = [" ".join(r) for r in rules.tc_rules("d", [site("k.kz", "203.0.113.21", "throttle")], "2mbit")]
    assert "class add dev d parent 1:2 classid 1:10 htb rate 256kbit ceil 256kbit" in tc
    assert rules.tc_rules("d", []) == []


def test_mitm_redirects_port_443_of_each_address() -> None:
    got = rules.iptables_rules([site("x.kz", "203.0.113.30", "tls-mitm")])
    assert ["-t", "nat", "-A", "PREROUTING", "-d", "203.0.113.30", "-p", "tcp", "--dport", "443", "-j",
            "REDIRECT", "--to-ports", str(rules.MITM_PORT)] in got


def test_dns_lines_geo_dns_and_blocking() -> None:
    sc = load("clean-world")
    cdn = next(s for s in sc.sites if s.geo_address)
    auth = services.auth_dns_lines(sc)
    isp = services.isp_dns_lines(sc)
    # The authoritative (public path) never hands out the geo address; the ISP resolver only that.
    assert f"host-record={cdn.domain},{cdn.address}" in auth
    assert f"host-record={cdn.domain},{cdn.geo_address}" not in auth
    assert f"host-record={cdn.domain},{cdn.geo_address}" in isp
    assert f"host-record=www.{cdn.domain},{cdn.geo_address}" in isp
    kz = load("kz2014")
    isp = services.isp_dns_lines(kz)
    assert "address=/livejournal.com/" in isp and "address=/avaaz.org/198.51.100.80" in isp
    assert "address=/kproxy.com/10.10.34.34" in isp and isp[-1].startswith("address=")
    assert services.public_dns_lines(kz)[0] == "cache-size=0"


def test_nginx_vhost_redirects_and_gzip() -> None:
    v = Vhost(names=("mail.ru",), www="www.mail.ru", addresses=("203.0.113.42", "203.0.113.43"),
              root="/r/mail.ru", cert="/c.pem", key="/c.key", redirects=("https", "www"), gzip=False)
    http, apex, www = vhost_servers(v)
    assert "listen 203.0.113.42:80;" in http and "listen 203.0.113.43:80;" in http
    assert "return 301 https://$host$request_uri;" in http and "gzip off;" in http
    assert "listen 203.0.113.43:443 ssl http2;" in apex and "server_name mail.ru;" in apex
    assert "return 301 https://www.mail.ru$request_uri;" in apex and "root" not in apex
    assert "server_name www.mail.ru;" in www and "root /r/mail.ru;" in www and "return" not in www
    plain = vhost_servers(Vhost(names=("a.kz",), www="www.a.kz", addresses=("203.0.113.9",), root="/r",
                                cert="/c", key="/k"))
    assert not any("return 301" in b or "gzip off" in b for b in plain)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_the_generated_world(tmp_path: Path) -> None:
    from kzprobe.lab import nginx
    from kzprobe.lab.pki import LabPki

    sc = load("clean-world")
    pki = LabPki(tmp_path / "certs")
    certs = {s.domain: pki.issue(s.domain, rules.site_names(s), s.cert) for s in sc.sites}
    default = pki.issue("default", ["example.com"])
    servers = services.world_nginx_servers(sc, certs, default, tmp_path / "www")
    conf = nginx.prepare(tmp_path / "nginx", servers)
    argv = ["nginx", "-t", "-p", f"{tmp_path}/nginx/", "-c", str(conf)]
    if os.geteuid() == 0 and shutil.which("unshare"):
        argv = ["unshare", "--net", *argv]  # `nginx -t` also tries the binds: never in the host's network
    p = subprocess.run(argv, capture_output=True, text=True)
    # The binds fail (the lab's addresses exist only inside a lab); the syntax is what is checked here.
    assert "syntax is ok" in p.stderr, p.stderr
    text = conf.read_text()
    assert "gzip on;" in text and "daemon off;" in text and f"pid {tmp_path}/nginx/nginx.pid;" in text
    # Every served address has a catch-all default server (the benign follow-up's SNI and Host).
    for s in services.nginx_sites(sc):
        for a in s.addresses:
            assert f"listen {a}:443 ssl http2 default_server;" in text
    # A slow site is not nginx's: its address is the Python server's.
    for s in services.slow_sites(sc):
        assert s.address not in text


def test_run_probe_reads_a_list_or_an_envelope(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kzprobe.lab.core import LabError, run_probe

    def fake(stdout: str) -> SimpleNamespace:
        def exec_(role: str, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
            assert role == "volunteer" and "run" in argv
            return subprocess.CompletedProcess(argv, 0, stdout, "")
        return SimpleNamespace(exec=exec_, state_dir=tmp_path, targets_file=tmp_path / "t", public_resolver="x",
                               ca_path=tmp_path / "ca", helper_url=None)

    v = [{"target": "https://a.kz/", "status": "ok"}]
    assert run_probe(fake(json.dumps(v))) == v  # type: ignore[arg-type]
    assert run_probe(fake(json.dumps({"command": "run", "verdicts": v, "problems": []}))) == v  # type: ignore[arg-type]
    with pytest.raises(LabError, match="neither a list"):
        run_probe(fake(json.dumps({"command": "run"})))  # type: ignore[arg-type]
