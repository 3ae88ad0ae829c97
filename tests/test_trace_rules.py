"""Every trace rule (kzprobe.trace.rules) on synthetic sweeps: a positive case and a near miss.

``test_every_rule_has_cases`` fails as soon as a rule is added to the table without both.  The
near misses are the sweeps one step away from the rule (the same block at the server's own hop,
a control that does not pass, a single silent TTL ...): each must *not* give the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kzprobe.trace.decide import HopResult, TraceResult, decide
from kzprobe.trace.rules import RULES, RULES_BY_ID

SERVER = "203.0.113.10"
R = {t: f"198.51.100.{t}" for t in range(1, 20)}


def icmp(ttl: int, router: str | None = None) -> HopResult:
    return HopResult(ttl=ttl, kind="icmp_time_exceeded", router=router or R[ttl])


def server(ttl: int, kind: str = "server_hello", detail: str = "", sttl: int = 60) -> HopResult:
    return HopResult(ttl=ttl, kind=kind, responder=SERVER, ip_ttl=sttl, server_ttl=sttl, detail=detail)


def injected(ttl: int, kind: str = "rst", ip_ttl: int = 200, router: str | None = None,
             responder: str = SERVER) -> HopResult:
    return HopResult(ttl=ttl, kind=kind, responder=responder, ip_ttl=ip_ttl, server_ttl=60, router=router)


def silence(ttl: int) -> HopResult:
    return HopResult(ttl=ttl, kind="silence")


def hs(ttl: int) -> HopResult:
    return HopResult(ttl=ttl, kind="handshake_timeout")


def path(last: int = 5, *, server_at: int = 5, **kw: object) -> list[HopResult]:
    """Routers up to the server's hop, then the server (or routers only when last < server_at)."""
    out = [icmp(t) for t in range(1, min(last + 1, server_at))]
    if last >= server_at:
        out.append(server(server_at, **kw))  # type: ignore[arg-type]
    return out


@dataclass
class Case:
    name: str
    test: list[HopResult]
    control: list[HopResult]
    rule: str
    #: For near misses: the rule this case must NOT give.
    near: str | None = None
    trigger: str = "tls"
    expect: dict[str, object] = field(default_factory=dict)


POSITIVE = [
    Case("no handshake completed", [hs(1), hs(2), hs(3)], path(), "no_handshake",
         expect={"result": "inconclusive"}),
    Case("control unusable", path(), [hs(1), hs(2)], "no_control", expect={"result": "inconclusive"}),
    Case("test terminates past control's end", [*path(7, server_at=9), injected(8)], path(), "past_control",
         expect={"result": "inconclusive"}),
    Case("NAT: control's hop at the blocked TTL is the server's address", [icmp(1), icmp(2), injected(3)],
         [icmp(1), icmp(2), icmp(3, router=SERVER), server(4)], "nat_firewall",
         expect={"result": "endpoint", "placement": "endpoint", "hop_address": SERVER}),
    Case("copy-and-inject at TTL 3", [icmp(1), icmp(2), injected(3, router=R[3])], path(), "on_path",
         expect={"result": "censor_located", "placement": "on-path", "hop_ttl": 3, "hop_address": R[3]}),
    Case("in-path RST at TTL 3", [icmp(1), icmp(2), injected(3)], path(), "in_path_terminated",
         expect={"result": "censor_located", "placement": "in-path", "hop_ttl": 3, "hop_address": R[3]}),
    Case("same injection whatever the domain", [icmp(1), icmp(2), injected(3)], [icmp(1), icmp(2), injected(3)],
         "same_injection_both", expect={"result": "censor_located", "triggered_by": "ip"}),
    Case("dropped from TTL 3", [icmp(1), icmp(2), *map(silence, range(3, 9))], path(), "in_path_drop",
         expect={"result": "censor_located", "hop_ttl": 3, "hop_address": R[3]}),
    Case("both dropped from TTL 3", [icmp(1), icmp(2), *map(silence, range(3, 8))],
         [icmp(1), icmp(2), *map(silence, range(3, 8))], "same_drop_both",
         expect={"result": "censor_located", "triggered_by": "ip"}),
    Case("the same page at the server", path(), path(), "same_endpoint_answer", expect={"result": "none_observed"}),
    Case("endpoint firewall: same TTL, server's signature, other answer",
         path(detail="HTTP 403", kind="response"), path(detail="HTTP 200", kind="response"), "endpoint_differs",
         trigger="http", expect={"result": "endpoint", "hop_address": SERVER, "hop_ttl": 5}),
    Case("endpoint firewall: same TTL as control's server answer, not the server's signature",
         [*path(4), injected(5, ip_ttl=200)], path(), "endpoint_firewall",
         expect={"result": "endpoint", "placement": "endpoint", "hop_ttl": 5, "hop_address": SERVER}),
    Case("a RST at the server's hop sent from the router before (its IP TTL: 64 - 3 hops)",
         [*path(4), injected(5, ip_ttl=61)], path(), "injected_at_server_hop",
         expect={"result": "censor_located", "placement": "in-path", "hop_ttl": 4, "hop_address": R[4]}),
    Case("control answered before the test", [icmp(1), icmp(2), injected(3)], [icmp(1), injected(2)],
         "control_blocked_earlier", expect={"result": "inconclusive"}),
    Case("control does not cover the blocked TTL", [icmp(1), icmp(2), injected(3)], [icmp(1), icmp(2), silence(3)],
         "no_comparison", expect={"result": "inconclusive"}),
    Case("nobody reached the server", [icmp(1), icmp(2), silence(3)], [icmp(1), icmp(2), icmp(3)],
         "nobody_reached_server", expect={"result": "inconclusive"}),
    Case("one silent TTL is not a drop", [icmp(1), icmp(2), silence(3)], path(), "test_sweep_incomplete",
         expect={"result": "inconclusive"}),
]

NEAR_MISS = [
    Case("one handshake completed", [hs(1), icmp(2), hs(3)], path(), "test_sweep_incomplete", near="no_handshake"),
    Case("control has one usable probe", [icmp(1), icmp(2), injected(3)], [hs(1), hs(2), icmp(3), icmp(4)],
         "in_path_terminated", near="no_control"),
    Case("test terminates right after control's end", [*path(5, server_at=9), injected(6)], path(),
         "control_blocked_earlier", near="past_control"),
    Case("NAT near miss: control's hop is a router", [icmp(1), icmp(2), injected(3)],
         [icmp(1), icmp(2), icmp(3), server(4)], "in_path_terminated", near="nat_firewall"),
    Case("injected with no ICMP from that hop", [icmp(1), icmp(2), injected(3)], path(), "in_path_terminated",
         near="on_path"),
    Case("test ends where control reaches the server", [icmp(1), icmp(2), injected(3)],
         [icmp(1), icmp(2), server(3)], "endpoint_firewall", near="in_path_terminated"),
    Case("both injected, but differently", [icmp(1), icmp(2), injected(3)],
         [icmp(1), icmp(2), injected(3, kind="fin")], "no_comparison", near="same_injection_both"),
    Case("only the last TTL silent", [icmp(1), icmp(2), silence(3)], path(), "test_sweep_incomplete",
         near="in_path_drop"),
    Case("control passes where the test is dropped", [icmp(1), icmp(2), *map(silence, range(3, 8))],
         [icmp(1), icmp(2), icmp(3), *map(silence, range(4, 8))], "in_path_drop", near="same_drop_both"),
    Case("same hop, other page", path(detail="HTTP 403", kind="response"), path(detail="HTTP 200", kind="response"),
         "endpoint_differs", trigger="http", near="same_endpoint_answer"),
    Case("same hop, same page", path(detail="HTTP 200", kind="response"), path(detail="HTTP 200", kind="response"),
         "same_endpoint_answer", trigger="http", near="endpoint_differs"),
    Case("the server's own RST at its hop", [*path(4), server(5, kind="rst")], path(), "endpoint_differs",
         near="endpoint_firewall"),
    Case("a RST at the server's hop whose IP TTL points two hops back", [*path(4), injected(5, ip_ttl=62)], path(),
         "endpoint_firewall", near="injected_at_server_hop"),
    Case("control answered at the same TTL", [icmp(1), icmp(2), injected(3)], [icmp(1), icmp(2), injected(3)],
         "same_injection_both", near="control_blocked_earlier"),
    Case("control covers the blocked TTL", [icmp(1), icmp(2), injected(3)], [icmp(1), icmp(2), icmp(3), silence(4)],
         "in_path_terminated", near="no_comparison"),
    Case("control reached the server", [icmp(1), icmp(2), silence(3)], path(), "test_sweep_incomplete",
         near="nobody_reached_server"),
    Case("enough silent TTLs for a drop", [icmp(1), icmp(2), silence(3), silence(4)], path(), "in_path_drop",
         near="test_sweep_incomplete"),
]


def _run(c: Case) -> TraceResult:
    return decide(c.test, c.control, target="blocked.test", address=SERVER, trigger=c.trigger)


@pytest.mark.parametrize("case", POSITIVE, ids=[c.name for c in POSITIVE])
def test_positive(case: Case) -> None:
    r = _run(case)
    assert r.rule == case.rule, r.evidence["sentence"]
    assert r.result == RULES_BY_ID[case.rule].result
    assert r.evidence["centrace"] == RULES_BY_ID[case.rule].centrace
    for k, v in case.expect.items():
        assert getattr(r, k) == v, (k, r.to_dict())
    if r.result == "censor_located":
        assert r.hop_address != SERVER


@pytest.mark.parametrize("case", NEAR_MISS, ids=[c.name for c in NEAR_MISS])
def test_near_miss(case: Case) -> None:
    r = _run(case)
    assert r.rule != case.near
    assert r.rule == case.rule, r.evidence["sentence"]


def test_every_rule_has_cases() -> None:
    positive = {c.rule for c in POSITIVE}
    near = {c.near for c in NEAR_MISS}
    missing = [r for r in RULES_BY_ID if r not in positive]
    assert not missing, f"rules without a positive test case: {missing}"
    missing = [r for r in RULES_BY_ID if r not in near]
    assert not missing, f"rules without a near-miss test case: {missing}"
    unknown = (positive | {c.rule for c in NEAR_MISS} | near) - set(RULES_BY_ID)
    assert not unknown, f"cases name rules that do not exist: {unknown}"
    assert len(RULES_BY_ID) == len(RULES), "duplicate rule id"


def test_drop_middlebox_is_controls_first_answering_hop() -> None:
    # CenTrace: when the test goes silent from TTL 3 and control is silent at 3 too, the
    # middlebox is control's first answering hop after it (TTL 4), not the last one before.
    test = [icmp(1), icmp(2), *map(silence, range(3, 9))]
    control = [icmp(1), icmp(2), silence(3), icmp(4), server(5)]
    r = decide(test, control, target="blocked.test", address=SERVER, trigger="tls")
    assert (r.rule, r.hop_ttl, r.hop_address) == ("in_path_drop", 4, R[4])
    assert "silent too" in r.evidence["sentence"]


def test_icmp_unreachable_from_the_server_is_the_endpoint() -> None:
    # A REJECT answering with ICMP unreachable from the server's own address.
    hop = HopResult(ttl=3, kind="icmp_unreachable", responder=SERVER, ip_ttl=62, detail="ICMP unreachable code 13")
    r = decide([icmp(1), icmp(2), hop], path(), target="blocked.test", address=SERVER, trigger="tls")
    assert (r.result, r.rule, r.hop_address) == ("endpoint", "nat_firewall", SERVER)


_ADDRS = [SERVER, R[1], R[2], R[3], R[4], "198.51.100.99"]


@st.composite
def sweeps(draw: st.DrawFn) -> list[HopResult]:
    hops = []
    for ttl in range(1, draw(st.integers(1, 8)) + 1):
        kind = draw(st.sampled_from(["icmp_time_exceeded", "rst", "fin", "response", "server_hello", "silence",
                                     "handshake_timeout", "icmp_unreachable", "blockpage"]))
        router = draw(st.sampled_from([None, *_ADDRS])) if kind in ("icmp_time_exceeded", "rst") else None
        if kind == "icmp_time_exceeded" and router is None:
            router = R[min(ttl, 4)]
        hops.append(HopResult(ttl=ttl, kind=kind, router=router, responder=draw(st.sampled_from(_ADDRS)),
                              ip_ttl=draw(st.sampled_from([None, 60, 61, 200])), server_ttl=60,
                              detail=draw(st.sampled_from(["", "HTTP 200", "HTTP 403"]))))
    return hops


@settings(max_examples=300, deadline=None)
@given(sweeps(), sweeps(), st.sampled_from(["tls", "http", "dns"]))
def test_target_address_is_never_a_censor_hop(test: list[HopResult], control: list[HopResult], trigger: str) -> None:
    r = decide(test, control, target="blocked.test", address=SERVER, trigger=trigger)
    assert r.rule in RULES_BY_ID
    if r.result == "censor_located":
        assert r.hop_address != SERVER, r.evidence["sentence"]


def test_drop_where_control_passes_the_servers_gateway_is_the_endpoint() -> None:
    # CenTrace's steampowered pair, in miniature: the test goes silent from TTL 5, where control
    # reaches the server, and the control's hop before it (TTL 4) answers with the server's own
    # address (a NAT gateway in front of it): the endpoint, never a censor hop.  With a router of
    # its own there instead, the router is named (the lab's censor next to the server).
    test = [*path(4), *map(silence, range(5, 9))]
    control = [icmp(1), icmp(2), icmp(3), icmp(4, router=SERVER), server(5)]
    r = decide(test, control, target="blocked.test", address=SERVER, trigger="tls")
    assert (r.result, r.rule, r.hop_address, r.hop_ttl) == ("endpoint", "nat_firewall", SERVER, 4)
    r = decide(test, path(), target="blocked.test", address=SERVER, trigger="tls")
    assert (r.result, r.rule, r.hop_address, r.hop_ttl) == ("censor_located", "in_path_drop", R[4], 4)
