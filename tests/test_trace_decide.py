"""The trace decision, rule by rule, on synthetic sweeps (kzprobe.trace.decide)."""

from __future__ import annotations

import json

import pytest

from kzprobe.trace.decide import (
    ICMP_TIME_EXCEEDED as ICMP,
)
from kzprobe.trace.decide import (
    HopResult,
    consolidate,
    decide,
)

SERVER = "203.0.113.10"
ROUTERS = {1: "198.51.100.1", 2: "198.51.100.2", 3: "198.51.100.3", 4: "198.51.100.4"}


def icmp(ttl: int, rep: int = 0, router: str | None = None) -> HopResult:
    return HopResult(ttl=ttl, kind=ICMP, router=router or ROUTERS[ttl], repetition=rep)


def server(ttl: int, kind: str = "server_hello", detail: str = "", sttl: int = 60, rep: int = 0) -> HopResult:
    return HopResult(ttl=ttl, kind=kind, responder=SERVER, ip_ttl=sttl, server_ttl=sttl, detail=detail, repetition=rep)


def injected(ttl: int, kind: str = "rst", ip_ttl: int = 200, router: str | None = None) -> HopResult:
    return HopResult(ttl=ttl, kind=kind, responder=SERVER, ip_ttl=ip_ttl, server_ttl=60, router=router)


def silence(ttl: int, rep: int = 0) -> HopResult:
    return HopResult(ttl=ttl, kind="silence", repetition=rep)


def path_to_server(last: int = 5) -> list[HopResult]:
    """Routers at TTL 1..4, the server answers at TTL 5."""
    return [icmp(t) for t in range(1, min(last, 5))] + ([server(5)] if last >= 5 else [])


def run(test: list[HopResult], control: list[HopResult], trigger: str = "tls"):
    return decide(test, control, target="blocked.test", address=SERVER, trigger=trigger)


def test_in_path_rst_where_control_gets_icmp() -> None:
    r = run([icmp(1), icmp(2), injected(3)], path_to_server())
    assert (r.result, r.placement, r.triggered_by) == ("censor_located", "in-path", "domain")
    assert r.rule == "in_path_terminated"
    # CenTrace's convention: the router the control reaches at the blocked TTL.
    assert (r.hop_ttl, r.hop_address) == (3, ROUTERS[3])


def test_injected_ttl_pointing_one_hop_back_names_that_router() -> None:
    # A RST sent with initial TTL 64 by the router at TTL 2 arrives with TTL 63: the censor is
    # that router (a netfilter REJECT inside a router), not the next one.
    r = run([icmp(1), icmp(2), injected(3, ip_ttl=63)], path_to_server())
    assert (r.hop_ttl, r.hop_address, r.placement) == (2, ROUTERS[2], "in-path")


def test_on_path_icmp_and_injection_at_same_ttl() -> None:
    r = run([icmp(1), icmp(2), injected(3, router=ROUTERS[3]), injected(4, router=ROUTERS[4])], path_to_server())
    assert (r.result, r.placement, r.rule) == ("censor_located", "on-path", "on_path")
    assert (r.hop_ttl, r.hop_address) == (3, ROUTERS[3])
    assert "1 higher TTLs" in r.evidence["sentence"]


def test_blockpage_in_path() -> None:
    r = run([icmp(1), injected(2, kind="blockpage", ip_ttl=120)], path_to_server(), trigger="http")
    assert (r.result, r.placement, r.hop_ttl) == ("censor_located", "in-path", 2)


def test_injection_at_server_hop_is_not_endpoint() -> None:
    # Control reaches the server at 5; the test gets a RST at 5 that lacks the server's TTL, and
    # whose IP TTL (61 = 64 - 3) says it was sent from TTL 4: that router, not the endpoint.
    r = run([*path_to_server(4), injected(5, ip_ttl=61)], path_to_server())
    assert (r.result, r.rule, r.placement) == ("censor_located", "injected_at_server_hop", "in-path")
    assert (r.hop_ttl, r.hop_address) == (4, ROUTERS[4])


def test_injection_at_server_hop_without_an_earlier_sender_is_an_endpoint_firewall() -> None:
    r = run([*path_to_server(4), injected(5, ip_ttl=200)], path_to_server())
    assert (r.result, r.rule, r.placement, r.hop_address) == ("endpoint", "endpoint_firewall", "endpoint", SERVER)
    assert r.evidence["centrace"] == "ENDPOINT_FIREWALL"


def test_endpoint_when_server_signature_and_answers_differ() -> None:
    r = run([*path_to_server(4), server(5, kind="response", detail="HTTP 403")],
            [*path_to_server(4), server(5, kind="response", detail="HTTP 200")], trigger="http")
    assert (r.result, r.placement, r.hop_ttl, r.hop_address) == ("endpoint", "endpoint", 5, SERVER)
    assert r.triggered_by == "domain"


def test_none_observed_same_answer() -> None:
    r = run(path_to_server(), path_to_server())
    assert (r.result, r.hop_address, r.placement, r.triggered_by) == ("none_observed", None, None, None)


def test_same_http_status_is_none_observed() -> None:
    a = [*path_to_server(4), server(5, kind="response", detail="HTTP 200 'x'")]
    b = [*path_to_server(4), server(5, kind="response", detail="HTTP 200 'y'")]
    assert run(a, b, trigger="http").result == "none_observed"


def test_ip_triggered_when_control_fails_the_same_way() -> None:
    r = run([icmp(1), icmp(2), injected(3)], [icmp(1), icmp(2), injected(3)])
    assert (r.result, r.triggered_by, r.rule) == ("censor_located", "ip", "same_injection_both")


def test_in_path_drop_silence_from_hop() -> None:
    test = [icmp(1), icmp(2)] + [silence(t) for t in range(3, 9)]
    r = run(test, path_to_server())
    assert (r.result, r.placement, r.rule, r.triggered_by) == ("censor_located", "in-path", "in_path_drop", "domain")
    assert (r.hop_ttl, r.hop_address) == (3, ROUTERS[3])
    assert r.evidence["ttls"] == list(range(3, 9))


def test_drop_right_before_server_names_last_router() -> None:
    # Silent from TTL 5, where control's first answer is the server's own: the router before it
    # is named (never the target's address), and the sentence says an endpoint drop looks the same.
    test = path_to_server(4) + [silence(t) for t in range(5, 9)]
    r = run(test, path_to_server())
    assert (r.result, r.hop_ttl, r.hop_address) == ("censor_located", 4, ROUTERS[4])
    assert "server's own firewall would look the same" in r.evidence["sentence"]


def test_single_trailing_silence_is_not_a_drop() -> None:
    r = run([icmp(1), icmp(2), silence(3)], path_to_server())
    assert (r.result, r.rule) == ("inconclusive", "test_sweep_incomplete")


def test_silent_router_in_the_middle_is_not_a_drop() -> None:
    test = [icmp(1), silence(2), icmp(3), icmp(4), server(5)]
    assert run(test, path_to_server()).result == "none_observed"


def test_same_drop_on_both_is_ip_triggered() -> None:
    sweep = [icmp(1), icmp(2)] + [silence(t) for t in range(3, 7)]
    r = run(sweep, list(sweep))
    assert (r.result, r.triggered_by, r.rule) == ("censor_located", "ip", "same_drop_both")


def test_control_blocked_earlier_is_inconclusive() -> None:
    r = run([icmp(1), icmp(2), injected(3)], [icmp(1), injected(2)])
    assert (r.result, r.rule) == ("inconclusive", "control_blocked_earlier")


def test_no_handshake_is_inconclusive() -> None:
    test = [HopResult(ttl=t, kind="handshake_timeout") for t in range(1, 4)]
    r = run(test, path_to_server())
    assert (r.result, r.rule) == ("inconclusive", "no_handshake")


def test_icmp_unreachable_names_the_censor() -> None:
    hop = HopResult(ttl=3, kind="icmp_unreachable", responder=ROUTERS[2], ip_ttl=63, detail="ICMP unreachable code 13")
    r = run([icmp(1), icmp(2), hop], path_to_server())
    assert (r.result, r.hop_address, r.hop_ttl) == ("censor_located", ROUTERS[2], 2)


def test_repetitions_majority_beats_one_lost_icmp() -> None:
    # At TTL 3 one of three repetitions lost its ICMP; the majority says the hop passes.
    test = [icmp(1), icmp(2), icmp(3, 0), silence(3, 1), icmp(3, 2), icmp(4), server(5)]
    view = consolidate(test)
    assert view[3].kind == ICMP
    assert run(test, path_to_server()).result == "none_observed"


def test_repetitions_majority_terminating() -> None:
    # Two of three repetitions at TTL 3 were reset: the majority places the censor at TTL 3.
    test = [icmp(1), icmp(2), injected(3), injected(3), icmp(3, 2)]
    for i, h in enumerate(test[2:]):
        h.repetition = i
    r = run(test, path_to_server())
    assert (r.result, r.hop_ttl) == ("censor_located", 3)


def test_to_dict_is_json_and_exact_fields() -> None:
    r = run([icmp(1), injected(2)], path_to_server())
    d = json.loads(json.dumps(r.to_dict()))
    assert list(d) == ["target", "address", "trigger", "result", "hop_ttl", "hop_address", "placement",
                       "triggered_by", "evidence"]
    assert d["evidence"]["sentence"]
    json.dumps(r.hops_dict())


def test_bad_kind_and_trigger_rejected() -> None:
    with pytest.raises(ValueError):
        HopResult(ttl=1, kind="nonsense")
    with pytest.raises(ValueError):
        run([icmp(1)], [icmp(1)], trigger="ftp")


def test_dns_resolver_answering_differently_is_endpoint() -> None:
    nx = HopResult(ttl=1, kind="response", responder="198.51.100.53", ip_ttl=64, detail="DNS NXDOMAIN")
    ok = HopResult(ttl=1, kind="response", responder="198.51.100.53", ip_ttl=64, detail="DNS NOERROR 203.0.113.9")
    r = decide([nx], [ok], target="blocked.test", address="198.51.100.53", trigger="dns")
    assert (r.result, r.placement, r.hop_ttl, r.hop_address) == ("endpoint", "endpoint", 1, "198.51.100.53")
    assert "resolver" in r.evidence["sentence"]
