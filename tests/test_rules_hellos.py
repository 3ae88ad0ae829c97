"""The ClientHello rules (analysis/rules_hellos.py): a positive case and a near miss each.

tests/test_rules.py's ``test_every_rule_has_cases`` reads POSITIVE and NEAR_MISS from here.
"""

from __future__ import annotations

from typing import Any

import pytest

from kzprobe import errors as E
from kzprobe.analysis import RULES, classify_target
from kzprobe.analysis.rules_hellos import HELLO_RULES
from kzprobe.model import CONTROL, FOLLOWUP, MEASURE, PROBE, Observation
from kzprobe.tests.test_rules import DOMAIN, URL, A, Case, check_case, ctl_site, dns, http, tcp, tls

RESET, TIMEOUT, REFUSED = E.CONNECTION_RESET, E.TIMEOUT, E.CONNECTION_REFUSED
RELAY = "198.51.100.30"  # data only: nothing is sent
OR_PORT = 9001
OR_URL = f"tor-or://{RELAY}:{OR_PORT}"
TOR_SNI = "www.q7xk2mpd.com"


def hello(o: Observation, name: str) -> Observation:
    o.data["hello"] = name
    return o


def or_tcp(failure: str | None = None, *, vantage: str = PROBE, purpose: str = MEASURE,
           attempt: int = 0) -> Observation:
    return Observation(step="tcp", target=OR_URL, domain=RELAY, vantage=vantage, address=RELAY, port=OR_PORT,
                       failure=failure, purpose=purpose, attempt=attempt)


def or_tls(name: str, failure: str | None = None, *, vantage: str = PROBE, purpose: str = MEASURE,
           attempt: int = 0, valid: bool | None = None) -> Observation:
    data: dict[str, Any] = {"sni": TOR_SNI, "hello": name}
    if failure is None:
        data.update(cert_valid=valid, cert_failure=None if valid is not False else E.SSL_UNKNOWN_AUTHORITY,
                    version="TLSv1.2", cipher="ECDHE-RSA-AES256-SHA", issuer="www.xyzzyqwerty.net")
    return Observation(step="tls", target=OR_URL, domain=RELAY, vantage=vantage, address=RELAY, port=OR_PORT,
                       failure=failure, purpose=purpose, attempt=attempt, data=data)


def tor_blocked(failure: str = RESET, *, browser: str | None = None, control: str | None = None
                ) -> list[Observation]:
    """The engine's tor-or sandwich: Tor-like, browser-like follow-up, Tor-like again; control once."""
    obs = [or_tcp(), or_tls("tor", failure),
           or_tcp(purpose=FOLLOWUP), or_tls("browser", browser, purpose=FOLLOWUP, valid=False),
           or_tcp(attempt=1), or_tls("tor", failure, attempt=1)]
    return [*obs, or_tcp(vantage=CONTROL), or_tls("tor", control, vantage=CONTROL)]


def https_default_blocked(browser_followup: str | None = None, benign: str | None = RESET) -> list[Observation]:
    """An https target whose default hello is reset on the same SNI, with the engine's follow-ups."""
    return [dns([A]), tcp(A), tls(A, RESET),
            tcp(A, purpose=FOLLOWUP), tls(A, benign, sni="example.com", purpose=FOLLOWUP),
            tcp(A, purpose=FOLLOWUP), hello(tls(A, browser_followup, purpose=FOLLOWUP), "browser"),
            tcp(A, attempt=1), tls(A, RESET, attempt=1), *ctl_site()]


POSITIVE: list[Case] = [
    Case("tor-or: Tor-like hello reset twice, browser-like completes, control's Tor-like completes",
         tor_blocked(), "dpi.tls_fingerprint", "blocked", "dpi", "dpi.tls_fingerprint"),
    Case("https: the default hello reset (and the benign SNI too: same hello), the browser-like one completes",
         https_default_blocked(), "dpi.tls_fingerprint", "blocked", "dpi", "dpi.tls_fingerprint"),
    Case("tor-or: both hellos reset while control's handshake completes", tor_blocked(browser=RESET),
         "ip.tor_or_tls", "blocked", "ip", "ip.tls_reset"),
    Case("tor-or: the probe's browser-like hello completes, control's Tor-like one times out",
         tor_blocked(control=TIMEOUT), "tor_or.disagree", "inconclusive", None, "inconclusive.control_differs"),
    Case("tor-or: the Tor-like handshake completes (self-signed link certificate, not validated)",
         [or_tcp(), or_tls("tor"), or_tcp(vantage=CONTROL), or_tls("tor", vantage=CONTROL)],
         "ok.tor_or", "ok"),
]

NEAR_MISS: list[Case] = [
    # A lone timeout of the Tor-like hello is not evidence: the retry completed.
    Case("tor-or: one Tor-like timeout, then the retry completes",
         [or_tcp(), or_tls("tor", TIMEOUT), or_tcp(purpose=FOLLOWUP), or_tls("browser", purpose=FOLLOWUP),
          or_tcp(attempt=1), or_tls("tor", attempt=1)],
         "ok.tor_or", "ok", near="dpi.tls_fingerprint"),
    # Control's Tor-like handshake fails too: not fingerprinting as far as can be told (and not
    # "down" either: the probe's browser-like hello reached the relay).
    Case("tor-or: control's Tor-like handshake fails as well", tor_blocked(control=RESET),
         "tor_or.disagree", "inconclusive", near="dpi.tls_fingerprint"),
    # Every hello of the probe fails and so does control's: the relay is down, the vantages agree.
    Case("tor-or: every handshake fails, control's too", tor_blocked(browser=RESET, control=RESET),
         "down.everyone", "down", near="tor_or.disagree"),
    # SNI DPI: the browser-like hello with the target SNI is reset too; only the benign SNI passes.
    Case("https: the browser-like hello is reset too, the benign SNI completes",
         https_default_blocked(browser_followup=RESET, benign=None), "dpi.tls_followup", "blocked", "dpi",
         "dpi.tls_reset", near="dpi.tls_fingerprint"),
    # SNI DPI that misses the browser-like hello: the default hello passes with the benign SNI, so
    # the name is what the box keys on (the benign-SNI contrast), not the default hello's fingerprint.
    Case("https: the default hello completes with the benign SNI, the browser-like one with the target's",
         https_default_blocked(benign=None), "dpi.tls_followup", "blocked", "dpi", "dpi.tls_reset",
         near="dpi.tls_fingerprint"),
    Case("tor-or: both hellos reset but control never measured", tor_blocked(browser=RESET)[:-2],
         "inconclusive", "inconclusive", near="ip.tor_or_tls"),
    Case("tor-or: refused at TCP while control connects",
         [or_tcp(REFUSED), or_tcp(REFUSED, attempt=1), or_tcp(vantage=CONTROL), or_tls("tor", vantage=CONTROL)],
         "ip.tcp", "blocked", "ip", "ip.tcp_refused", near="ok.tor_or"),
]


@pytest.mark.parametrize("case", POSITIVE, ids=[c.id for c in POSITIVE])
def test_positive(case: Case) -> None:
    check_case(case, case.observations[0].target, case.context)  # tor-or:// or https://


@pytest.mark.parametrize("case", NEAR_MISS, ids=[c.id for c in NEAR_MISS])
def test_near_miss(case: Case) -> None:
    check_case(case, case.observations[0].target, case.context)


def test_sentence_names_the_blocked_hello() -> None:
    obs = tor_blocked()
    for i, o in enumerate(obs):
        o.id = i + 1
    v = classify_target(OR_URL, obs)
    assert "the Tor-like ClientHello was reset" in v.sentence
    assert "the browser-like one completed" in v.sentence
    # Evidence: the two Tor-like failures, the browser-like completion and control's handshake.
    assert v.observations == [2, 6, 4, 8]


def test_hello_rules_come_before_the_sni_and_address_tls_rules() -> None:
    ids = [r.id for r in RULES]
    first = min(ids.index(r.id) for r in HELLO_RULES)
    assert ids[first:first + len(HELLO_RULES)] == [r.id for r in HELLO_RULES]
    for later in ("dpi.tls_followup", "dpi.tls_control", "ip.tls_followup"):
        assert ids.index(later) > first
    assert ids.index("ip.tcp") < first


def test_an_https_page_fetched_is_never_a_fingerprint() -> None:
    obs = [*https_default_blocked(), tcp(A, attempt=2), tls(A, attempt=2), http(A)]
    assert classify_target(URL, obs).rule != "dpi.tls_fingerprint"
    assert DOMAIN in URL


@pytest.mark.parametrize(("obs", "rule"), [(tor_blocked(), "dpi.tls_fingerprint"),
                                           (tor_blocked(browser=RESET), "ip.tor_or_tls")])
def test_control_that_the_verdict_names_is_in_its_evidence(obs: list[Observation], rule: str) -> None:
    """The sentence says "control completed": the control handshake is cited beside the probe's steps."""
    for i, o in enumerate(obs, start=1):
        o.id = i
    v = classify_target(OR_URL, obs)
    assert v.rule == rule and "control" in v.sentence
    control_tls = next(o.id for o in obs if o.vantage == CONTROL and o.step == "tls")
    assert control_tls in v.observations
