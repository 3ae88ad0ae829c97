"""Every rule of the classifier, on hand-built observations: a positive case and a near miss.

The near misses are the false positives OONI is known for (a lone timeout, a reset with no
contrast, a CDN answer unlike control's, a site down for everyone): each must *not* give the rule
it nearly matches.  ``test_every_rule_has_cases`` fails as soon as a rule is added to the table
without a case here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from kzprobe import errors as E
from kzprobe.analysis import RULES, RULES_BY_ID, Context, classify, classify_target
from kzprobe.analysis.fingerprints import Fingerprints, parse
from kzprobe.contract import rejected
from kzprobe.model import CONTROL, FOLLOWUP, MEASURE, PROBE, REDIRECT, Observation

URL = "https://site.example/"
DOMAIN = "site.example"
A = "203.0.113.10"  # the genuine address (TEST-NET-3: data only, nothing is sent)
CDN = "203.0.113.77"  # another genuine address (a CDN edge that validates by TLS)
PARKED = "198.51.100.66"  # a wrong, non-bogon address
BOGON = "10.10.34.34"
ISP = "198.51.100.53:53"
PUB = "198.51.100.54:53"


# --- observation builders ----------------------------------------------------------------------------
def dns(addresses: list[str] | None = None, failure: str | None = None, *, resolver: str = ISP,
        vantage: str = PROBE, responses: list[list[str]] | None = None) -> Observation:
    addrs = list(addresses or [])
    resp = [{"rcode": "NOERROR", "addresses": r} for r in (responses or ([addrs] if addrs else []))]
    return Observation(step="dns", target=URL, domain=DOMAIN, vantage=vantage, failure=failure,
                       data={"resolver": resolver, "transport": "udp", "addresses": addrs, "responses": resp,
                             "rcode": "NOERROR" if not failure else failure})


def tcp(address: str = A, failure: str | None = None, *, vantage: str = PROBE, purpose: str = MEASURE,
        attempt: int = 0) -> Observation:
    return Observation(step="tcp", target=URL, domain=DOMAIN, vantage=vantage, address=address, port=443,
                       failure=failure, purpose=purpose, attempt=attempt)


def tls(address: str = A, failure: str | None = None, *, sni: str = DOMAIN, valid: bool | None = True,
        issuer: str = "Let's Encrypt R3", vantage: str = PROBE, purpose: str = MEASURE, attempt: int = 0,
        source: str = "live", injected: dict[str, Any] | None = None) -> Observation:
    data: dict[str, Any] = {"sni": sni}
    if failure is None:
        data.update(cert_valid=valid, issuer=issuer,
                    cert_failure=None if valid else E.SSL_UNKNOWN_AUTHORITY)
    if injected:
        data["injected"] = injected
    return Observation(step="tls", target=URL, domain=DOMAIN, vantage=vantage, source=source, address=address,
                       port=443, failure=failure, purpose=purpose, attempt=attempt, data=data)


def http(address: str = A, failure: str | None = None, *, host: str = DOMAIN, title: str = "Site home",
         length: int = 5000, status: int = 200, blockpage: str | None = None, vantage: str = PROBE,
         purpose: str = MEASURE, attempt: int = 0) -> Observation:
    data: dict[str, Any] = {"url": URL, "host": host}
    if failure is None:
        data.update(status=status, title=title, body_length=length, blockpage=blockpage)
    return Observation(step="http", target=URL, domain=DOMAIN, vantage=vantage, address=address, port=443,
                       failure=failure, purpose=purpose, attempt=attempt, data=data)


def throttled(address: str = A, attempt: int = 0) -> Observation:
    """An HTTP step whose response headers arrived before the body timed out."""
    o = http(address, TIMEOUT, attempt=attempt)
    o.data.update(status=200, headers={"Content-Type": "text/html"})
    return o


WWW = "www.site.example"  # where the site redirects to


def hop(o: Observation, k: int = 1, domain: str = WWW) -> Observation:
    """``o`` as a step of hop ``k`` of the redirect chain (to ``domain``)."""
    o.purpose, o.domain = REDIRECT, domain
    o.data["hop"] = k
    if o.step == "http":
        o.data["url"] = o.data["host"] = f"https://{domain}/"
    if o.step == "tls":
        o.data["sni"] = domain
    return o


def redirecting(address: str = A, to: str = WWW) -> list[Observation]:
    """Hop 0: the target answers 301 to https://WWW/."""
    o = http(address, status=301, title="", length=0)
    o.data["redirect_to"] = f"https://{to}/"
    return [dns([address]), tcp(address), tls(address), o]


def sampled(o: Observation, rate: float, seconds: float = 4.0) -> Observation:
    """Speed samples every 250 ms at ``rate`` wire bytes per second."""
    o.data["speed_samples"] = [[round(0.25 * i, 2), int(rate * 0.25 * i)] for i in range(1, int(seconds * 4) + 1)]
    return o


def _ctl_redirect(to: str = WWW) -> Observation:
    o = http(A, status=301, title="", length=0, vantage=CONTROL)
    o.data["redirect_to"] = f"https://{to}/"
    return o


def ctl_chain(address: str = A, to: str = WWW, at: str = CDN) -> list[Observation]:
    """Control: the target answers 301 to https://``to``/, whose name resolves to ``at``; fetched."""
    return [dns([address], vantage=CONTROL, resolver="helper"), tcp(address, vantage=CONTROL),
            tls(address, vantage=CONTROL), _ctl_redirect(to),
            hop(dns([at], vantage=CONTROL, resolver="helper"), domain=to), hop(tcp(at, vantage=CONTROL), domain=to),
            hop(tls(at, vantage=CONTROL), domain=to), hop(http(at, vantage=CONTROL), domain=to)]


def hop_fetched(address: str = CDN) -> list[Observation]:
    """The probe's hop 1 fetched from ``address``, validated."""
    return [hop(tcp(address)), hop(tls(address)), hop(http(address))]


def _plain_redirect(o: Observation, to: str) -> Observation:
    """A plain-HTTP 301 (as a capture sees the target URL's first answer)."""
    o.data.update(url="http://site.example/", status=301, title="301 Moved Permanently", body_length=169,
                  redirect_to=to)
    return o


def _titled(o: Observation, title: str, length: int) -> Observation:
    o.data.update(title=title, body_length=length)
    return o


def _samples(o: Observation, samples: list[list[float]]) -> Observation:
    o.data["speed_samples"] = samples
    return o


def _capped(o: Observation) -> Observation:
    o.data["truncated"] = True
    return o


def _reset(o: Observation) -> Observation:
    o.failure = RESET
    return o


def benign(address: str = A, rate: float = 2e6) -> Observation:
    """The live probe's throttling follow-up: same address, same URL and Host, SNI example.com."""
    o = sampled(http(address, purpose=FOLLOWUP, length=8_000_000), rate)
    o.data["sni"] = "example.com"
    return o


DNS_FP = Fingerprints(parse(
    "name,scope,location_found,pattern_type,pattern,confidence_no_fp\n"
    f"kz_dns_block,isp,dns,full,{PARKED},9\n"
    "fp_dns,fp,dns,prefix,203.0.113.,9\n", "test"))


def ctl_site(address: str = A) -> list[Observation]:
    """Control resolves the name, connects, handshakes and fetches the page."""
    return [dns([address], vantage=CONTROL, resolver="helper"), tcp(address, vantage=CONTROL),
            tls(address, vantage=CONTROL), http(address, vantage=CONTROL)]


def ctl_down(address: str = A) -> list[Observation]:
    return [dns([address], vantage=CONTROL, resolver="helper"), tcp(address, E.CONNECTION_REFUSED, vantage=CONTROL)]


def fetched(address: str = A) -> list[Observation]:
    return [tcp(address), tls(address), http(address)]


@dataclass
class Case:
    id: str
    observations: list[Observation]
    rule: str
    status: str
    mechanism: str | None = None
    detail: str | None = None
    #: For a near miss: the rule it must *not* give.
    near: str | None = None
    context: Context = field(default_factory=Context)
    #: The target the observations are classified under (test_rules_kinds' cases: a kind URL).
    target: str = URL


RESET, TIMEOUT = E.CONNECTION_RESET, E.TIMEOUT

POSITIVE: list[Case] = [
    Case("no network (vantage flag)", [dns(failure=TIMEOUT), *ctl_site()], "vantage.no_network", "inconclusive",
         context=Context(no_network=True)),
    Case("no network (every step unreachable)", [dns(failure=E.NETWORK_UNREACHABLE), tcp(A, E.NETWORK_UNREACHABLE),
                                                 tcp(A, E.NETWORK_UNREACHABLE, attempt=1)],
         "vantage.no_network", "inconclusive"),
    Case("control: the helper's answer failed the wire contract",
         [dns([A]), tcp(A), tls(A), http(A, RESET),
          rejected("observations[0].data.addresses must be a list, not a number", target=URL, domain=DOMAIN,
                   source="live")],
         "control.rejected", "inconclusive"),
    Case("pcap: injected RST after the ClientHello",
         [tls(A, RESET, source="pcap", injected={"kind": "rst", "packet": 7, "reason": "IP TTL 61 vs 52"})],
         "pcap.injected", "blocked", "dpi", "dpi.tls_reset"),
    Case("dns: forged answer then the genuine one", [dns([PARKED], responses=[[PARKED], [A]]), *fetched(A)],
         "dns.injected", "blocked", "dns", "dns.injected"),
    Case("dns: resolver leads to a blockpage", [dns([PARKED]), tcp(PARKED), http(PARKED, blockpage="kz_block"),
                                               *ctl_site()],
         "dns.blockpage", "blocked", "dns", "dns.blockpage"),
    Case("dns: resolver leads to a blockpage behind a bad certificate (seen by the peek)",
         [dns([PARKED]), tcp(PARKED), tls(PARKED, valid=False, issuer="ISP notice"),
          http(PARKED, E.SSL_INVALID_HOSTNAME), http(PARKED, purpose="peek", blockpage="kz_block"), *ctl_site()],
         "dns.blockpage", "blocked", "dns", "dns.blockpage"),
    Case("dns: an answer that a DNS fingerprint names (no control needed)", [dns([PARKED]), tcp(PARKED, TIMEOUT)],
         "dns.fingerprint", "blocked", "dns", "dns.blockpage", context=Context(fingerprints=DNS_FP)),
    Case("dns: resolver leads to a server that redirects to a blockpage host",
         [dns([PARKED]), tcp(PARKED), *redirecting(PARKED, to="block.isp.example")[3:],
          hop(dns([BOGON]), domain="block.isp.example"), hop(http(BOGON, blockpage="kz_block"),
                                                             domain="block.isp.example"), *ctl_site()],
         "dns.blockpage", "blocked", "dns", "dns.blockpage"),
    Case("dns: NXDOMAIN while control resolves", [dns(failure=E.DNS_NXDOMAIN), *ctl_site()],
         "dns.failure", "blocked", "dns", "dns.nxdomain"),
    Case("dns: NXDOMAIN while another resolver's answer validates",
         [dns(failure=E.DNS_NXDOMAIN), dns([A], resolver=PUB), *fetched(A)],
         "dns.failure", "blocked", "dns", "dns.nxdomain"),
    Case("dns: SERVFAIL while control resolves", [dns(failure=E.DNS_SERVFAIL), *ctl_site()],
         "dns.failure", "blocked", "dns", "dns.servfail"),
    Case("dns: an answer for a name control says does not exist",
         [dns([PARKED]), *fetched(PARKED), dns(failure=E.DNS_NXDOMAIN, vantage=CONTROL, resolver="helper")],
         "dns.ghost", "blocked", "dns", "dns.ghost"),
    Case("dns: bogon answer", [dns([BOGON]), tcp(BOGON, TIMEOUT), tcp(BOGON, TIMEOUT, attempt=1), *ctl_site()],
         "dns.bogon", "blocked", "dns", "dns.bogon"),
    Case("dns: wrong address whose certificate is for another name",
         [dns([PARKED]), tcp(PARKED), tls(PARKED, valid=False), *ctl_site()],
         "dns.poisoned", "blocked", "dns", "dns.poisoned"),
    Case("dns: an answer unlike control's, never validated, serves another page (not dpi.http_diff)",
         [dns([A, PARKED]), tcp(PARKED), http(PARKED, title="Parked domain", length=300), *ctl_site()],
         "dns.poisoned", "blocked", "dns", "dns.poisoned"),
    Case("dns: NXDOMAIN at the probe and at control", [dns(failure=E.DNS_NXDOMAIN),
                                                       dns(failure=E.DNS_NXDOMAIN, vantage=CONTROL)],
         "dns.down", "down"),
    Case("tls: national interception CA", [dns([A]), tcp(A), tls(A, valid=False, issuer="Qaznet Trust Network"),
                                           http(A, E.SSL_UNKNOWN_AUTHORITY)],
         "tls.mitm", "blocked", "dpi", "dpi.tls_mitm"),
    Case("tls: invalid chain while control's validates", [dns([A]), tcp(A), tls(A, valid=False, issuer="Evil CA"),
                                                          http(A, E.SSL_UNKNOWN_AUTHORITY), *ctl_site()],
         "tls.mitm", "blocked", "dpi", "dpi.tls_mitm"),
    Case("redirect: TLS to the next hop reset while control follows the chain",
         [*redirecting(), hop(dns([CDN])), hop(tcp(CDN)), hop(tls(CDN, RESET)), *ctl_site()],
         "redirect.dpi", "blocked", "dpi", "dpi.tls_reset"),
    Case("redirect: HTTP at hop 2 reset while control follows the chain",
         [*redirecting(), hop(dns([CDN])), hop(tcp(CDN)), hop(tls(CDN)),
          hop(http(CDN, status=302, title="", length=0), 1), hop(dns([CDN]), 2, "m.site.example"),
          hop(tcp(CDN), 2, "m.site.example"), hop(tls(CDN), 2, "m.site.example"),
          hop(http(CDN, RESET), 2, "m.site.example"), *ctl_site()],
         "redirect.dpi", "blocked", "dpi", "dpi.http_reset"),
    Case("redirect: the next hop's name does not resolve while control follows the chain",
         [*redirecting(), hop(dns(failure=E.DNS_NXDOMAIN)), *ctl_site()],
         "redirect.dns", "blocked", "dns", "dns.nxdomain"),
    Case("redirect: the ISP resolver says NXDOMAIN for the next hop's name; the public one's answer completes it",
         [*redirecting(), hop(dns(failure=E.DNS_NXDOMAIN)), hop(dns([CDN], resolver=PUB)), *hop_fetched(),
          *ctl_chain()],
         "redirect.dns", "blocked", "dns", "dns.nxdomain"),
    Case("redirect: the ISP answer for the next hop's name serves a blockpage behind a bad certificate",
         [*redirecting(), hop(dns([PARKED])), hop(dns([CDN], resolver=PUB)), hop(tcp(PARKED)),
          hop(tls(PARKED, valid=False, issuer="ISP notice")), hop(http(PARKED, E.SSL_INVALID_HOSTNAME)),
          hop(http(PARKED, purpose="peek", blockpage="kz_block")), *ctl_chain()],
         "redirect.dns", "blocked", "dns", "dns.blockpage"),
    Case("redirect: the ISP answer for the next hop's name is unlike control's and does not validate",
         [*redirecting(), hop(dns([PARKED])), hop(dns([CDN], resolver=PUB)), hop(tcp(PARKED)),
          hop(tls(PARKED, valid=False, issuer="ISP notice")), hop(http(PARKED, E.SSL_INVALID_HOSTNAME)),
          *ctl_chain()],
         "redirect.dns", "blocked", "dns", "dns.poisoned"),
    Case("redirect: TCP to the next hop times out twice while control follows the chain",
         [*redirecting(), hop(dns([CDN])), hop(tcp(CDN, TIMEOUT)), hop(tcp(CDN, TIMEOUT, attempt=1)), *ctl_site()],
         "redirect.ip", "blocked", "ip", "ip.tcp_timeout"),
    Case("the probe's plain-HTTP answer redirects elsewhere than control's does at that hop",
         [dns([A]), tcp(A), _plain_redirect(http(A), "http://block.isp.example/"), *ctl_site()[:3],
          _plain_redirect(http(A, vantage=CONTROL), "https://site.example/"),
          hop(http(A, vantage=CONTROL), domain=DOMAIN)],
         "dpi.http_diff", "blocked", "dpi", "dpi.http_diff"),
    Case("tcp: timeout twice while control connects", [dns([A]), tcp(A, TIMEOUT), tcp(A, TIMEOUT, attempt=1),
                                                       *ctl_site()],
         "ip.tcp", "blocked", "ip", "ip.tcp_timeout"),
    Case("tls: reset on SNI, benign SNI completes", [dns([A]), tcp(A), tls(A, RESET),
                                                     tcp(A, purpose=FOLLOWUP), tls(A, sni="example.com",
                                                                                   purpose=FOLLOWUP),
                                                     tcp(A, attempt=1), tls(A, RESET, attempt=1)],
         "dpi.tls_followup", "blocked", "dpi", "dpi.tls_reset"),
    Case("tls: stall on SNI seen twice, benign SNI completes",
         [dns([A]), tcp(A), tls(A, TIMEOUT), tls(A, sni="example.com", purpose=FOLLOWUP), tls(A, TIMEOUT, attempt=1)],
         "dpi.tls_followup", "blocked", "dpi", "dpi.tls_timeout"),
    Case("tls: reset, no follow-up, control's handshake completes", [dns([A]), tcp(A), tls(A, RESET), *ctl_site()],
         "dpi.tls_control", "blocked", "dpi", "dpi.tls_reset"),
    Case("tls: reset with the benign SNI too, control completes",
         [dns([A]), tcp(A), tls(A, RESET), tls(A, RESET, sni="example.com", purpose=FOLLOWUP),
          tls(A, RESET, attempt=1), *ctl_site()],
         "ip.tls_followup", "blocked", "ip", "ip.tls_reset"),
    Case("http: injected blockpage at a consistent address", [dns([A]), tcp(A), http(A, blockpage="kz_block"),
                                                              *ctl_site()],
         "dpi.blockpage", "blocked", "dpi", "dpi.blockpage"),
    Case("http: the site redirects to a blockpage host", [*redirecting(to="block.isp.example"),
                                                          hop(dns([PARKED]), domain="block.isp.example"),
                                                          hop(http(PARKED, blockpage="kz_block"),
                                                              domain="block.isp.example"), *ctl_site()],
         "dpi.blockpage", "blocked", "dpi", "dpi.blockpage"),
    Case("http: reset on Host, benign Host answers",
         [dns([A]), tcp(A), http(A, RESET), http(A, host="example.com", purpose=FOLLOWUP), http(A, RESET, attempt=1)],
         "dpi.http_followup", "blocked", "dpi", "dpi.http_reset"),
    Case("http: reset, no follow-up, control fetched", [dns([A]), tcp(A), http(A, RESET), *ctl_site()],
         "dpi.http_control", "blocked", "dpi", "dpi.http_reset"),
    Case("http: a different page than control's", [dns([A]), *fetched(A)[:2], http(A, title="Не то", length=300),
                                                   *ctl_site()],
         "dpi.http_diff", "blocked", "dpi", "dpi.http_diff"),
    Case("throttled: 8 KiB/s with the target SNI, 2 MB/s with a benign SNI at the same address",
         [dns([A]), tcp(A), tls(A), sampled(throttled(), 8192), benign(), *ctl_site()],
         "dpi.throttled", "blocked", "dpi", "dpi.throttled"),
    Case("throttled: a 45 KB benign follow-up done in 10 ms (its rate floored at 50 ms) vs 32 KiB/s",
         [dns([A]), tcp(A), tls(A), sampled(http(A, length=65536), 32 * 1024), _samples(benign(), [[0.01, 46080]]),
          *ctl_site()],
         "dpi.throttled", "blocked", "dpi", "dpi.throttled"),
    Case("slow: the target and the benign follow-up are both slow",
         [dns([A]), tcp(A), tls(A), sampled(http(A), 8192), benign(rate=12000), *ctl_site()], "ok.slow", "ok"),
    Case("throttled-looking, but no follow-up (an imported measurement): inconclusive, not ok",
         [dns([A]), tcp(A), tls(A), throttled(), *ctl_site()], "throttle.unconfirmed", "inconclusive"),
    Case("ok: fetched", [dns([A]), *fetched(A)], "ok.http", "ok"),
    Case("ok: TLS-only measurement", [dns([A]), tcp(A), tls(A)], "ok.tls", "ok"),
    Case("down: probe and control both refused", [dns([A]), tcp(A, E.CONNECTION_REFUSED),
                                                  tcp(A, E.CONNECTION_REFUSED, attempt=1), *ctl_down()],
         "down.everyone", "down"),
    Case("inconclusive: lone TLS timeout, no contrast", [dns([A]), tcp(A), tls(A, TIMEOUT)],
         "inconclusive", "inconclusive"),
]

NEAR_MISS: list[Case] = [
    Case("one step unreachable, DNS worked, no control",
         [dns([A]), tcp(A, E.NETWORK_UNREACHABLE), tcp(A, TIMEOUT, attempt=1)],
         "inconclusive", "inconclusive", near="vantage.no_network"),
    Case("a well-formed control answer", [dns([A]), *fetched(A), *ctl_site()], "ok.http", "ok",
         near="control.rejected"),
    Case("pcap flow with nothing injected", [dns([A]), *fetched(A)], "ok.http", "ok", near="pcap.injected"),
    Case("two identical UDP answers (a retransmission)", [dns([A], responses=[[A], [A]]), *fetched(A)],
         "ok.http", "ok", near="dns.injected"),
    Case("blockpage at the address control gives too (no DNS lead)",
         [dns([A]), tcp(A), http(A, blockpage="kz_block"), *ctl_site()],
         "dpi.blockpage", "blocked", "dpi", "dpi.blockpage", near="dns.blockpage"),
    Case("a DNS fingerprint's address that control gives too",
         [dns([PARKED]), *fetched(PARKED), *ctl_site(PARKED)], "ok.http", "ok", near="dns.fingerprint",
         context=Context(fingerprints=DNS_FP)),
    Case("an answer matching only a known-false-positive DNS fingerprint", [dns([CDN]), *fetched(CDN)],
         "ok.http", "ok", near="dns.fingerprint", context=Context(fingerprints=DNS_FP)),
    Case("the site itself redirects to a blockpage host (no DNS lead)",
         [*redirecting(to="block.isp.example"), hop(dns([PARKED]), domain="block.isp.example"),
          hop(http(PARKED, blockpage="kz_block"), domain="block.isp.example"), *ctl_site()],
         "dpi.blockpage", "blocked", "dpi", "dpi.blockpage", near="dns.blockpage"),
    Case("an unvalidated address unlike control's redirects where control's does (geo-DNS edge)",
         [dns([A, PARKED]), tcp(PARKED), _titled(redirecting(PARKED)[3], "301 Moved Permanently", 162),
          *ctl_site()[:3], _ctl_redirect()],
         "ok.http", "ok", near="dns.poisoned"),
    Case("NXDOMAIN at the only resolver, no control", [dns(failure=E.DNS_NXDOMAIN)],
         "inconclusive", "inconclusive", near="dns.failure"),
    Case("one DNS timeout while control resolves (not seen again)", [dns(failure=TIMEOUT), *ctl_site()],
         "inconclusive", "inconclusive", near="dns.failure"),
    Case("answer while control's resolver only timed out", [dns([A]), *fetched(A),
                                                           dns(failure=TIMEOUT, vantage=CONTROL, resolver="helper")],
         "ok.http", "ok", near="dns.ghost"),
    Case("private answer that control gives too (an intranet name)",
         [dns([BOGON]), *fetched(BOGON), *ctl_site(BOGON)], "ok.http", "ok", near="dns.bogon"),
    Case("bogon answer without any reference", [dns([BOGON]), tcp(BOGON, TIMEOUT), tcp(BOGON, TIMEOUT, attempt=1)],
         "inconclusive", "inconclusive", near="dns.bogon"),
    Case("CDN answer unlike control's, validated by TLS", [dns([CDN]), *fetched(CDN), *ctl_site(A)],
         "ok.http", "ok", near="dns.poisoned"),
    Case("an answer unlike control's serving the same page as control (geo-DNS mirror, mixed answer)",
         [dns([A, PARKED]), tcp(PARKED), http(PARKED), *ctl_site()], "ok.http", "ok", near="dns.poisoned"),
    Case("NXDOMAIN at the probe, no control", [dns(failure=E.DNS_NXDOMAIN), dns(failure=E.DNS_NXDOMAIN, resolver=PUB)],
         "inconclusive", "inconclusive", near="dns.down"),
    Case("invalid chain from an ordinary issuer, no control",
         [dns([A]), tcp(A), tls(A, valid=False, issuer="Evil CA"), http(A, E.SSL_UNKNOWN_AUTHORITY)],
         "inconclusive", "inconclusive", near="tls.mitm"),
    Case("redirect: another resolver's answer for the next hop is unlike control's but never tried (geo-DNS)",
         [*redirecting(), hop(dns([CDN])), hop(dns([PARKED], resolver=PUB)), *hop_fetched(), *ctl_chain(at=A)],
         "ok.http", "ok", near="redirect.dns"),
    Case("a capture: the probe's chain ends at the http->https 301, control's at the page (same hop agrees)",
         [dns([A]), tcp(A), _plain_redirect(http(A), "https://site.example/"), *ctl_site()[:3],
          _plain_redirect(http(A, vantage=CONTROL), "https://site.example/"),
          hop(http(A, vantage=CONTROL), domain=DOMAIN)],
         "ok.http", "ok", near="dpi.http_diff"),
    Case("redirect: TLS to the next hop reset, control fails at that hop too",
         [*redirecting(), hop(dns([CDN])), hop(tcp(CDN)), hop(tls(CDN, RESET)), *ctl_site(),
          hop(tls(CDN, RESET, vantage=CONTROL))],
         "inconclusive", "inconclusive", near="redirect.dpi"),
    Case("redirect: one reset at hop 1, then the chain completes on retry",
         [*redirecting(), hop(dns([CDN])), hop(tcp(CDN)), hop(tls(CDN, RESET)), hop(tls(CDN, attempt=1)),
          hop(http(CDN, attempt=1)), *ctl_site()],
         "ok.http", "ok", near="redirect.dpi"),
    Case("redirect: the next hop's name timed out once (live: not seen again)",
         [*redirecting(), hop(dns(failure=TIMEOUT)), *ctl_site()],
         "inconclusive", "inconclusive", near="redirect.dns"),
    Case("redirect: TCP to the next hop times out twice, no control",
         [*redirecting(), hop(dns([CDN])), hop(tcp(CDN, TIMEOUT)), hop(tcp(CDN, TIMEOUT, attempt=1))],
         "inconclusive", "inconclusive", near="redirect.ip"),
    Case("one TCP timeout while control connects (not seen again)", [dns([A]), tcp(A, TIMEOUT), *ctl_site()],
         "inconclusive", "inconclusive", near="ip.tcp"),
    Case("TCP timeout twice, no control", [dns([A]), tcp(A, TIMEOUT), tcp(A, TIMEOUT, attempt=1)],
         "inconclusive", "inconclusive", near="ip.tcp"),
    Case("one TLS timeout, benign SNI completes (not seen again)",
         [dns([A]), tcp(A), tls(A, TIMEOUT), tls(A, sni="example.com", purpose=FOLLOWUP)],
         "inconclusive", "inconclusive", near="dpi.tls_followup"),
    Case("TLS reset, no follow-up, no control", [dns([A]), tcp(A), tls(A, RESET)],
         "inconclusive", "inconclusive", near="dpi.tls_control"),
    Case("TLS reset with the benign SNI too, no control",
         [dns([A]), tcp(A), tls(A, RESET), tls(A, RESET, sni="example.com", purpose=FOLLOWUP),
          tls(A, RESET, attempt=1)],
         "inconclusive", "inconclusive", near="ip.tls_followup"),
    Case("a page that merely mentions blocking (no fingerprint matched)", [dns([A]), *fetched(A), *ctl_site()],
         "ok.http", "ok", near="dpi.blockpage"),
    Case("one HTTP timeout, benign Host answers (not seen again)",
         [dns([A]), tcp(A), http(A, TIMEOUT), http(A, host="example.com", purpose=FOLLOWUP)],
         "inconclusive", "inconclusive", near="dpi.http_followup"),
    Case("HTTP reset, control fails too", [dns([A]), tcp(A), http(A, RESET), *ctl_down()],
         "down.everyone", "down", near="dpi.http_control"),
    Case("HTTP timeout before any header, no control", [dns([A]), tcp(A), tls(A), http(A, TIMEOUT)],
         "inconclusive", "inconclusive", near="throttle.unconfirmed"),
    Case("throttled-looking, benign follow-up fast, but control failed to download too",
         [dns([A]), tcp(A), tls(A), sampled(throttled(), 8192), benign(), *ctl_site()[:3],
          http(A, TIMEOUT, vantage=CONTROL)],
         "throttle.unconfirmed", "inconclusive", near="dpi.throttled"),
    Case("both slow, but the target's body was reset (not a slow path)",
         [dns([A]), tcp(A), tls(A), _reset(sampled(throttled(), 8192)), benign(rate=9000), *ctl_site()],
         "dpi.http_followup", "blocked", "dpi", "dpi.http_reset", near="ok.slow"),
    Case("a small page done in 40 ms, a big benign follow-up at full speed (no measurable target rate)",
         [dns([A]), tcp(A), tls(A), _samples(http(A, length=2000), [[0.04, 2000]]), benign(), *ctl_site()],
         "ok.http", "ok", near="dpi.throttled"),
    Case("throttled target, benign follow-up done in 50 ms (its rate is a lower bound, still 4x faster)",
         [dns([A]), tcp(A), tls(A), sampled(throttled(), 8192), _samples(benign(), [[0.05, 61440]]), *ctl_site()],
         "dpi.throttled", "blocked", "dpi", "dpi.throttled", near="ok.slow"),
    Case("fast target and fast follow-up", [dns([A]), tcp(A), tls(A), sampled(http(A), 2e6), benign(), *ctl_site()],
         "ok.http", "ok", near="ok.slow"),
    Case("titles differ, the probe's body capped short (lengths say nothing)",
         [dns([A]), *fetched(A)[:2], _capped(http(A, title="Site home, 12:01", length=4096)), *ctl_site()],
         "ok.http", "ok", near="dpi.http_diff"),
    Case("same page as control's, slightly different length",
         [dns([A]), *fetched(A)[:2], http(A, length=4500), *ctl_site()], "ok.http", "ok", near="dpi.http_diff"),
    Case("fetched, but it is the blockpage", [dns([A]), tcp(A), http(A, blockpage="kz_block")],
         "dpi.blockpage", "blocked", "dpi", "dpi.blockpage", near="ok.http"),
    Case("TLS-only, chain does not validate, no control", [dns([A]), tcp(A), tls(A, valid=False, issuer="Evil CA")],
         "inconclusive", "inconclusive", near="ok.tls"),
    Case("refused twice, no control at all", [dns([A]), tcp(A, E.CONNECTION_REFUSED),
                                              tcp(A, E.CONNECTION_REFUSED, attempt=1)],
         "inconclusive", "inconclusive", near="down.everyone"),
    Case("lone TLS timeout becomes DPI once seen twice with a completed follow-up",
         [dns([A]), tcp(A), tls(A, TIMEOUT), tls(A, sni="example.com", purpose=FOLLOWUP), tls(A, TIMEOUT, attempt=1)],
         "dpi.tls_followup", "blocked", "dpi", "dpi.tls_timeout", near="inconclusive"),
    Case("no network overrides blocking-looking evidence",
         [dns(failure=E.DNS_NXDOMAIN), *ctl_site()], "vantage.no_network", "inconclusive",
         near="dns.failure", context=Context(no_network=True)),
]


def _numbered(obs: list[Observation]) -> list[Observation]:
    for i, o in enumerate(obs, start=1):
        o.id = i
    return obs


def check_case(case: Case, target: str, context: Context) -> None:
    """Classify a case's observations (numbered 1..n) under ``target``: the rule, status, mechanism
    and detail it names, never its near miss, and evidence among the case's own observations.
    Shared by test_rules_kinds.py and test_rules_hellos.py."""
    obs = _numbered(case.observations)
    v = classify_target(target, obs, context)
    assert v.rule == case.rule, (v.rule, v.sentence)
    assert (v.status, v.mechanism) == (case.status, case.mechanism), v
    if case.detail is not None:
        assert v.detail == case.detail, v
    if case.near is not None:
        assert v.rule != case.near
    assert v.sentence
    assert 0 < v.confidence <= 1
    ids = {o.id for o in obs}
    assert set(v.observations) <= ids
    if v.status in ("blocked", "down"):
        assert v.observations, "a blocked/down verdict must cite its evidence"


@pytest.mark.parametrize("case", POSITIVE, ids=[c.id for c in POSITIVE])
def test_positive(case: Case) -> None:
    check_case(case, case.target, case.context)


@pytest.mark.parametrize("case", NEAR_MISS, ids=[c.id for c in NEAR_MISS])
def test_near_miss(case: Case) -> None:
    check_case(case, case.target, case.context)


def test_every_rule_has_cases() -> None:
    # The kind targets' rules (analysis/rules_kinds.py) have their cases in test_rules_kinds.py,
    # the ClientHello rules (analysis/rules_hellos.py) theirs in test_rules_hellos.py.
    from kzprobe.tests import test_rules_hellos as hellos
    from kzprobe.tests import test_rules_kinds as kinds

    positive = {c.rule for c in [*POSITIVE, *kinds.POSITIVE, *hellos.POSITIVE]}
    near = {c.near for c in [*NEAR_MISS, *kinds.NEAR_MISS, *hellos.NEAR_MISS]}
    missing = [r for r in RULES_BY_ID if r not in positive]
    assert not missing, f"rules without a positive test case: {missing}"
    missing = [r for r in RULES_BY_ID if r not in near]
    assert not missing, f"rules without a near-miss test case: {missing}"
    unknown = (positive | {c.rule for c in [*NEAR_MISS, *kinds.NEAR_MISS, *hellos.NEAR_MISS]} | near) - set(RULES_BY_ID)
    assert not unknown, f"cases name rules that do not exist: {unknown}"


def test_rule_table_is_well_formed() -> None:
    assert len(RULES_BY_ID) == len(RULES), "duplicate rule id"
    assert RULES[-1].id == "inconclusive"
    for r in RULES:
        assert r.status in ("ok", "blocked", "down", "inconclusive")
        assert (r.mechanism is not None) == (r.status == "blocked"), r.id
        assert r.mechanism in (None, "dns", "ip", "dpi")
        assert r.doc


def test_certificate_nobody_trusts_is_not_interception() -> None:
    """Control's handshake completes but its chain does not validate either: no interception."""
    obs = [dns([A]), tcp(A), tls(A, valid=False, issuer="Self CA"), http(A, E.SSL_UNKNOWN_AUTHORITY),
           dns([A], vantage=CONTROL, resolver="helper"), tcp(A, vantage=CONTROL),
           tls(A, vantage=CONTROL, valid=False, issuer="Self CA"), http(A, E.SSL_UNKNOWN_AUTHORITY, vantage=CONTROL)]
    v = classify_target(URL, _numbered(obs))
    assert v.rule != "tls.mitm", v.sentence
    assert v.status == "down", v


def test_blocked_needs_control_or_followup_not_just_failures() -> None:
    """However many failures pile up at the probe alone, without any contrast they stay inconclusive."""
    obs = [dns([A]), *(tcp(A, TIMEOUT, attempt=i) for i in range(5)), dns([A], resolver=PUB)]
    assert classify_target(URL, _numbered(obs)).status == "inconclusive"


def test_classify_groups_by_target_and_keeps_order() -> None:
    other = "https://other.example/"
    obs = _numbered([dns(failure=E.DNS_NXDOMAIN), *ctl_site(),
                     Observation(step="dns", target=other, domain="other.example",
                                 data={"resolver": ISP, "addresses": [A], "responses": []})])
    vs = classify(obs, targets=["https://first.example/"])
    assert [v.target for v in vs] == ["https://first.example/", URL, other]
    assert vs[0].status == "inconclusive" and vs[0].rule == "inconclusive"
    assert (vs[1].status, vs[1].mechanism) == ("blocked", "dns")


def test_throttling_sentence_gives_the_ratio_and_the_benign_sni() -> None:
    obs = _numbered([dns([A]), tcp(A), tls(A), sampled(throttled(), 8192), benign(rate=8192 * 25), *ctl_site()])
    v = classify_target(URL, obs)
    assert v.detail == "dpi.throttled"
    assert "8.0 KiB/s, 25× slower" in v.sentence and "with SNI example.com (200.0 KiB/s)" in v.sentence, v.sentence
