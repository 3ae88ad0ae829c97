"""The kind targets' rules (analysis/rules_kinds.py, issue 15): a positive case and a near miss each.

Observations are built as the kind probes make them (probes/kinds.py): ``target`` is the kind URL,
a proxy's CONNECT is an HTTP step with method/connect_to/status, the TLS through its tunnel has
SNI = the benign name.  ``test_rules.test_every_rule_has_cases`` counts the cases here too.  The
generic rules that decide kinds as well (ip.tcp, dns.failure, down.everyone, inconclusive) get kind
cases here, so a change there that breaks a kind shows.
"""

from __future__ import annotations

from typing import Any

import pytest

from kzprobe import errors as E
from kzprobe.analysis import RULES, Context, classify_target
from kzprobe.analysis.rules_kinds import KIND_DNS_RULES, KIND_RULES
from kzprobe.model import CONTROL, MEASURE, PROBE, Observation
from kzprobe.tests.test_rules import Case as SharedCase
from kzprobe.tests.test_rules import check_case

IP = "198.51.100.20"  # data only: nothing is sent
PORT = 9030
BENIGN = "example.com"
RESET, TIMEOUT, REFUSED = E.CONNECTION_RESET, E.TIMEOUT, E.CONNECTION_REFUSED


def tcp(url: str, failure: str | None = None, *, vantage: str = PROBE, attempt: int = 0,
        address: str = IP, port: int = PORT) -> Observation:
    return Observation(step="tcp", target=url, domain=address, vantage=vantage, address=address, port=port,
                       failure=failure, attempt=attempt)


def dns(url: str, name: str, addresses: list[str], failure: str | None = None, *,
        vantage: str = PROBE) -> Observation:
    return Observation(step="dns", target=url, domain=name, vantage=vantage, failure=failure,
                       data={"resolver": "198.51.100.53:53" if vantage == PROBE else "control", "transport": "udp",
                             "addresses": addresses,
                             "responses": [{"rcode": "NOERROR", "addresses": addresses}] if addresses else []})


def dirfetch(url: str, failure: str | None = None, *, vantage: str = PROBE, attempt: int = 0) -> Observation:
    data: dict[str, Any] = {"url": f"http://{IP}:{PORT}/tor/status-vote/current/consensus", "host": IP,
                            "kind": "tor-dir"}
    if failure is None:
        data.update(status=200, title=None, body_length=65536, truncated=True)
    return Observation(step="http", target=url, domain=IP, vantage=vantage, address=IP, port=PORT,
                       failure=failure, attempt=attempt, data=data)


def connect(url: str, failure: str | None = None, status: int | None = 200, *, vantage: str = PROBE,
            attempt: int = 0) -> Observation:
    data: dict[str, Any] = {"method": "CONNECT", "connect_to": f"{BENIGN}:443", "host": BENIGN}
    if failure is None and status is not None:
        data["status"] = status
    return Observation(step="http", target=url, domain=IP, vantage=vantage, address=IP, port=3128,
                       failure=failure, attempt=attempt, data=data)


def _page(o: Observation, status: int, title: str, length: int) -> Observation:
    """An answer other than the consensus: a whole (uncapped) page."""
    o.data.update(status=status, title=title, body_length=length, truncated=False)
    return o


def blockpage_connect() -> Observation:
    o = connect(PROXY, status=403)
    o.data.update(blockpage="kz_blockpage_zablokirovana", title="Blocked", body_length=180)
    return o


def tunnel_tls(url: str, failure: str | None = None, *, vantage: str = PROBE, attempt: int = 0) -> Observation:
    data: dict[str, Any] = {"sni": BENIGN}
    if failure is None:
        data.update(cert_valid=True, issuer="R3")
    return Observation(step="tls", target=url, domain=IP, vantage=vantage, address=IP, port=3128,
                       failure=failure, purpose=MEASURE, attempt=attempt, data=data)


DIR = f"tor-dir://{IP}:{PORT}"
OBFS = f"obfs4://{IP}:{PORT}"
TCPURL = f"tcp://{IP}:5222"
PROXY = f"proxy+http://{IP}:3128"
UDNS = "udp-dns://chat.example"
NAMED = "tcp://chat.example:5222"


def p_tcp(url: str, *failures: str | None, port: int = PORT) -> list[Observation]:
    return [tcp(url, f, attempt=i, port=port) for i, f in enumerate(failures)]


def c_tcp(url: str, failure: str | None = None, port: int = PORT) -> Observation:
    return tcp(url, failure, vantage=CONTROL, port=port)


def proxy_ok(vantage: str = PROBE) -> list[Observation]:
    return [tcp(PROXY, vantage=vantage, port=3128), connect(PROXY, vantage=vantage),
            tunnel_tls(PROXY, vantage=vantage)]


def Case(id: str, target: str, observations: list[Observation], rule: str, status: str,
         mechanism: str | None = None, detail: str | None = None, *, near: str | None = None) -> SharedCase:
    """test_rules' case under a kind target, classified as a run with a helper configured is."""
    return SharedCase(id, observations, rule, status, mechanism, detail, near=near,
                    context=Context(control_configured=True), target=target)


POSITIVE: list[SharedCase] = [
    Case("proxy: CONNECT reset while control's opens a tunnel", PROXY,
         [tcp(PROXY, port=3128), connect(PROXY, RESET), tcp(PROXY, port=3128, attempt=1),
          connect(PROXY, RESET, attempt=1), *proxy_ok(CONTROL)],
         "dpi.proxy_connect", "blocked", "dpi", "dpi.proxy_connect"),
    Case("proxy: tunnel opens, TLS through it reset twice, control completes", PROXY,
         [tcp(PROXY, port=3128), connect(PROXY), tunnel_tls(PROXY, RESET), connect(PROXY, attempt=1),
          tunnel_tls(PROXY, RESET, attempt=1), *proxy_ok(CONTROL)],
         "dpi.proxy_tunnel", "blocked", "dpi", "dpi.proxy_tls_reset"),
    Case("tor-dir: port connects, consensus fetch reset twice, control fetched it", DIR,
         [tcp(DIR), dirfetch(DIR, RESET), dirfetch(DIR, RESET, attempt=1), c_tcp(DIR), dirfetch(DIR, vantage=CONTROL)],
         "dpi.tor_dir", "blocked", "dpi", "dpi.http_reset"),
    Case("proxy: CONNECT and TLS through the tunnel work", PROXY, [*proxy_ok(), *proxy_ok(CONTROL)],
         "ok.proxy", "ok"),
    Case("proxy: TLS through the tunnel fails for probe and control alike", PROXY,
         [tcp(PROXY, port=3128), connect(PROXY), tunnel_tls(PROXY, RESET), connect(PROXY, attempt=1),
          tunnel_tls(PROXY, RESET, attempt=1), tcp(PROXY, vantage=CONTROL, port=3128),
          connect(PROXY, vantage=CONTROL), tunnel_tls(PROXY, RESET, vantage=CONTROL)],
         "down.proxy", "down"),
    Case("proxy: tunnel opens, TLS through it stalls once, no control", PROXY,
         [tcp(PROXY, port=3128), connect(PROXY), tunnel_tls(PROXY, TIMEOUT)],
         "proxy.unconfirmed", "inconclusive"),
    Case("proxy: the proxy itself answers 403", PROXY,
         [tcp(PROXY, port=3128), connect(PROXY, status=403), *proxy_ok(CONTROL)],
         "proxy.refused", "inconclusive", None, "proxy.refused"),
    Case("tcp: the endpoint connects", TCPURL, [*p_tcp(TCPURL, None, port=5222), c_tcp(TCPURL, port=5222)],
         "ok.tcp", "ok"),
    Case("udp-dns: the probe's answer is control's", UDNS,
         [dns(UDNS, "chat.example", [IP]), dns(UDNS, "chat.example", [IP], vantage=CONTROL)], "ok.dns", "ok"),
    Case("udp-dns: public answers unlike control's (a CDN by location?): cannot tell", UDNS,
         [dns(UDNS, "chat.example", ["198.51.100.99"]), dns(UDNS, "chat.example", [IP], vantage=CONTROL)],
         "dns.unverified", "inconclusive", None, "dns.unverified"),
    # Messaging names are served by location: another edge that accepts on the port is no evidence.
    Case("tcp by name: answers unlike control's, and they connect on the port: cannot tell", NAMED,
         [dns(NAMED, "chat.example", ["198.51.100.99"]), tcp(NAMED, address="198.51.100.99", port=5222),
          dns(NAMED, "chat.example", [IP], vantage=CONTROL), c_tcp(NAMED, port=5222)],
         "dns.unverified", "inconclusive", None, "dns.unverified"),
    # A directory given by address: probe and control fetch the same address, with no DNS to say so.
    Case("tor-dir: a 451 page where control gets the consensus", DIR,
         [tcp(DIR), _page(dirfetch(DIR), 451, "Resource blocked", 312), c_tcp(DIR), dirfetch(DIR, vantage=CONTROL)],
         "dpi.http_diff", "blocked", "dpi", "dpi.http_diff"),
    # The generic rules on kind targets (what the issue names as examples).
    Case("obfs4: refused twice while control connects", OBFS, [*p_tcp(OBFS, REFUSED, REFUSED), c_tcp(OBFS)],
         "ip.tcp", "blocked", "ip", "ip.tcp_refused"),
    Case("tor-dir: timeout twice while control connects", DIR,
         [*p_tcp(DIR, TIMEOUT, TIMEOUT), c_tcp(DIR), dirfetch(DIR, vantage=CONTROL)],
         "ip.tcp", "blocked", "ip", "ip.tcp_timeout"),
    Case("tcp: refused everywhere is down", TCPURL,
         [*p_tcp(TCPURL, REFUSED, REFUSED, port=5222), c_tcp(TCPURL, REFUSED, port=5222)], "down.everyone", "down"),
    Case("udp-dns: NXDOMAIN while control resolves", UDNS,
         [dns(UDNS, "chat.example", [], E.DNS_NXDOMAIN), dns(UDNS, "chat.example", [IP], vantage=CONTROL)],
         "dns.failure", "blocked", "dns", "dns.nxdomain"),
    Case("tcp: refused twice with no control is inconclusive", TCPURL, p_tcp(TCPURL, REFUSED, REFUSED, port=5222),
         "inconclusive", "inconclusive"),
]

NEAR_MISS: list[SharedCase] = [
    Case("proxy: CONNECT reset, but control's CONNECT is reset too: down, not dpi", PROXY,
         [tcp(PROXY, port=3128), connect(PROXY, RESET), tcp(PROXY, port=3128, attempt=1),
          connect(PROXY, RESET, attempt=1), tcp(PROXY, vantage=CONTROL, port=3128),
          connect(PROXY, RESET, vantage=CONTROL)],
         "down.everyone", "down", near="dpi.proxy_connect"),
    Case("proxy: a lone CONNECT timeout is not evidence", PROXY,
         [tcp(PROXY, port=3128), connect(PROXY, TIMEOUT), *proxy_ok(CONTROL)],
         "inconclusive", "inconclusive", near="dpi.proxy_connect"),
    Case("proxy: TLS through the tunnel fails for control too", PROXY,
         [tcp(PROXY, port=3128), connect(PROXY), tunnel_tls(PROXY, RESET), connect(PROXY, attempt=1),
          tunnel_tls(PROXY, RESET, attempt=1), tcp(PROXY, vantage=CONTROL, port=3128),
          connect(PROXY, vantage=CONTROL), tunnel_tls(PROXY, RESET, vantage=CONTROL)],
         "down.proxy", "down", near="dpi.proxy_tunnel"),
    Case("proxy: TLS through the tunnel reset twice while control's completes: dpi, not down", PROXY,
         [tcp(PROXY, port=3128), connect(PROXY), tunnel_tls(PROXY, RESET), connect(PROXY, attempt=1),
          tunnel_tls(PROXY, RESET, attempt=1), *proxy_ok(CONTROL)],
         "dpi.proxy_tunnel", "blocked", "dpi", "dpi.proxy_tls_reset", near="down.proxy"),
    Case("proxy: TLS through the tunnel completed: ok, not unconfirmed", PROXY, proxy_ok(),
         "ok.proxy", "ok", near="proxy.unconfirmed"),
    Case("tor-dir: fetch reset twice, but control's fetch failed too", DIR,
         [tcp(DIR), dirfetch(DIR, RESET), dirfetch(DIR, RESET, attempt=1), c_tcp(DIR),
          dirfetch(DIR, RESET, vantage=CONTROL)],
         "down.everyone", "down", near="dpi.tor_dir"),
    Case("proxy: tunnel opens but TLS through it stalls once, no control", PROXY,
         [tcp(PROXY, port=3128), connect(PROXY), tunnel_tls(PROXY, TIMEOUT)],
         "proxy.unconfirmed", "inconclusive", near="ok.proxy"),
    Case("proxy: CONNECT reset (no status): not the proxy's refusal", PROXY,
         [tcp(PROXY, port=3128), connect(PROXY, RESET)], "inconclusive", "inconclusive", near="proxy.refused"),
    Case("proxy: CONNECT answered with the ISP's blockpage while control tunnels: dpi.blockpage", PROXY,
         [tcp(PROXY, port=3128), blockpage_connect(), *proxy_ok(CONTROL)],
         "dpi.blockpage", "blocked", "dpi", "dpi.blockpage", near="proxy.refused"),
    Case("a URL target whose TCP connected but nothing more: not ok.tcp",
         "https://site.example/", [tcp("https://site.example/", address=IP, port=443)],
         "inconclusive", "inconclusive", near="ok.tcp"),
    Case("udp-dns: a bogon answer unlike control's is evidence, not unverified", UDNS,
         [dns(UDNS, "chat.example", ["10.10.34.34"]), dns(UDNS, "chat.example", [IP], vantage=CONTROL)],
         "dns.bogon", "blocked", "dns", "dns.bogon", near="dns.unverified"),
    Case("a URL target's unvalidated unlike answer stays dns.poisoned", "https://site.example/",
         [Observation(step="dns", target="https://site.example/", domain="site.example",
                      data={"resolver": "198.51.100.53:53", "addresses": ["198.51.100.99"],
                            "responses": [{"rcode": "NOERROR", "addresses": ["198.51.100.99"]}]}),
          Observation(step="tcp", target="https://site.example/", domain="site.example", address="198.51.100.99",
                      port=443),
          Observation(step="tls", target="https://site.example/", domain="site.example", address="198.51.100.99",
                      port=443, data={"sni": "site.example", "cert_valid": False,
                                      "cert_failure": E.SSL_INVALID_HOSTNAME}),
          Observation(step="dns", target="https://site.example/", domain="site.example", vantage=CONTROL,
                      data={"resolver": "control", "addresses": [IP]})],
         "dns.poisoned", "blocked", "dns", "dns.poisoned", near="dns.unverified"),
    Case("tcp by name: an unlike answer where the port is refused is a forged answer, not unverified", NAMED,
         [dns(NAMED, "chat.example", ["198.51.100.99"]),
          tcp(NAMED, REFUSED, address="198.51.100.99", port=5222),
          tcp(NAMED, REFUSED, address="198.51.100.99", port=5222, attempt=1),
          dns(NAMED, "chat.example", [IP], vantage=CONTROL), c_tcp(NAMED, port=5222)],
         "dns.poisoned", "blocked", "dns", "dns.poisoned", near="dns.unverified"),
    Case("tor-dir: both fetch the consensus (each cut at the cap)", DIR,
         [tcp(DIR), dirfetch(DIR), c_tcp(DIR), dirfetch(DIR, vantage=CONTROL)], "ok.http", "ok",
         near="dpi.http_diff"),
    Case("udp-dns: resolves, but there is no control to compare with", UDNS, [dns(UDNS, "chat.example", [IP])],
         "inconclusive", "inconclusive", near="ok.dns"),
]


@pytest.mark.parametrize("case", POSITIVE, ids=[c.id for c in POSITIVE])
def test_positive(case: SharedCase) -> None:
    check_case(case, case.target, case.context)


@pytest.mark.parametrize("case", NEAR_MISS, ids=[c.id for c in NEAR_MISS])
def test_near_miss(case: SharedCase) -> None:
    check_case(case, case.target, case.context)


def test_kind_rules_are_in_the_one_table() -> None:
    ids = [r.id for r in RULES]
    at = ids.index("ip.tcp")
    assert ids[at + 1: at + 1 + len(KIND_RULES)] == [r.id for r in KIND_RULES]
    at = ids.index("dns.poisoned")
    assert ids[at - len(KIND_DNS_RULES): at] == [r.id for r in KIND_DNS_RULES]
    # After every DNS rule that is evidence for any kind.
    assert ids.index("dns.bogon") < ids.index("dns.unverified") and ids.index("dns.failure") < at


@pytest.mark.parametrize("rule", [*KIND_DNS_RULES, *KIND_RULES], ids=[r.id for r in [*KIND_DNS_RULES, *KIND_RULES]])
def test_kind_rules_never_decide_a_url_target(rule: Any) -> None:
    """Every kind rule is guarded by the kind: the same observations on an https:// target say nothing."""
    url = "https://site.example/"
    for case in POSITIVE:
        if case.rule != rule.id:
            continue
        from kzprobe.analysis.facts import Facts

        obs = [Observation(**{**o.to_dict(), "target": url}) for o in case.observations]
        assert rule.check(Facts(target=url, domain="site.example", observations=obs)) is None


@pytest.mark.parametrize("rule", ["dpi.proxy_tunnel", "dpi.tor_dir"])
def test_blocked_kind_cites_the_step_its_sentence_starts_from(rule: str) -> None:
    """'The proxy opened a tunnel' / 'TCP to the directory connected': that step is evidence too."""
    case = next(c for c in POSITIVE if c.rule == rule)
    check_case(case, case.target, case.context)
    v = classify_target(case.target, case.observations, case.context)
    wanted = next(o for o in case.observations if o.vantage == PROBE and o.ok
                  and (o.data.get("method") == "CONNECT" if rule == "dpi.proxy_tunnel" else o.step == "tcp"))
    assert wanted.id in v.observations, (v.observations, v.sentence)
