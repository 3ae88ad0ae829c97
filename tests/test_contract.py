"""The wire contract: from_wire rejects type-wrong observations with a one-line reason, never crashes,
and a helper answer it rejects makes the target inconclusive with that reason in the sentence.

Valid answers are built from real observations (Observation.to_dict(), what the helper sends);
type-wrong ones replace one field with a value of another JSON type.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kzprobe import errors as E
from kzprobe.analysis import classify_target
from kzprobe.contract import WireError, from_wire, observations_from_wire
from kzprobe.model import CONTROL, PROBE, REJECTED, SOURCE_LIVE, Observation, Target
from kzprobe.probes.certs import TrustStore
from kzprobe.probes.control import ControlClient
from kzprobe.probes.engine import ProbeConfig

URL = "https://site.example/"
DOMAIN = "site.example"
A = "203.0.113.10"


def _helper_answer() -> dict[str, Any]:
    """What a helper sends: its own observations of the site, Observation.to_dict() each."""
    obs = [
        Observation(step="dns", target=URL, domain=DOMAIN, vantage=CONTROL, t_start=1.0, t_end=1.1,
                    data={"resolver": "system", "transport": "system", "qtype": "A+AAAA", "rcode": "NOERROR",
                          "answers": [{"type": "A", "name": DOMAIN, "data": A, "ttl": 60}], "addresses": [A],
                          "responses": [{"rcode": "NOERROR", "addresses": [A], "delay": 0.01}]}),
        Observation(step="tcp", target=URL, domain=DOMAIN, vantage=CONTROL, address=A, port=443, t_start=1.1,
                    t_end=1.2),
        Observation(step="tls", target=URL, domain=DOMAIN, vantage=CONTROL, address=A, port=443,
                    data={"sni": DOMAIN, "version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "alpn": "h2",
                          "certificates": [{"subject": "CN=site.example", "issuer": "CN=Lab CA", "san": [DOMAIN],
                                            "not_before": "2026-01-01T00:00:00+00:00",
                                            "not_after": "2027-01-01T00:00:00+00:00", "der_b64": "AAAA"}],
                          "cert_valid": True, "cert_failure": None, "issuer": "CN=Lab CA"}),
        Observation(step="http", target=URL, domain=DOMAIN, vantage=CONTROL, address=A, port=443,
                    data={"url": URL, "host": DOMAIN, "status": 200, "headers": {"content-type": "text/html"},
                          "redirects": [], "final_url": URL, "title": "Site home", "body_length": 5000,
                          "body_sha256": "00" * 32, "body_head": "<html>", "truncated": False,
                          "content_encoding": "gzip", "wire_bytes": 1200, "blockpage": None,
                          "speed_samples": [[0.25, 1200]]}),
    ]
    return json.loads(json.dumps({"observations": [o.to_dict() for o in obs]}))


def test_a_real_answer_passes_and_keeps_its_data() -> None:
    answer = _helper_answer()
    got = observations_from_wire(answer, source=SOURCE_LIVE, vantage=CONTROL)
    assert [o.step for o in got] == ["dns", "tcp", "tls", "http"]
    assert got[0].data == answer["observations"][0]["data"]
    assert all(o.vantage == CONTROL and o.id is None for o in got)


def test_the_sender_cannot_choose_vantage_source_or_id() -> None:
    d = _helper_answer()["observations"][0]
    d.update(vantage=PROBE, source="pcap", id=7)
    o = from_wire(d, source=SOURCE_LIVE, vantage=CONTROL)
    assert (o.vantage, o.source, o.id) == (CONTROL, SOURCE_LIVE, None)


@pytest.mark.parametrize("index,path,value,reason", [
    (3, ("data",), [], "observations[3].data must be an object, not a list"),
    (0, ("data", "addresses"), 5, "observations[0].data.addresses must be a list, not a number"),
    (0, ("data", "addresses"), [5], "observations[0].data.addresses[0] must be a string, not a number"),
    (0, ("data", "responses"), [5], "observations[0].data.responses[0] must be an object, not a number"),
    (0, ("data", "responses", 0, "addresses"), "203.0.113.10",
     "observations[0].data.responses[0].addresses must be a list, not a string"),
    (2, ("data", "cert_valid"), "yes", "observations[2].data.cert_valid must be a boolean or null, not a string"),
    (3, ("data", "headers"), ["a", "b"], "observations[3].data.headers must be an object, not a list"),
    (3, ("data", "headers", "server"), 1, "observations[3].data.headers.server must be a string, not a number"),
    (3, ("data", "body_length"), "5000", "observations[3].data.body_length must be an integer or null, not a string"),
    (3, ("data", "status"), True, "observations[3].data.status must be an integer or null, not a boolean"),
    (3, ("data", "injected"), "yes", "observations[3].data.injected must be an object, not a string"),
    (3, ("data", "speed_samples"), [[0.25, "x"]],
     "observations[3].data.speed_samples[0][1] must be a finite number, not a string"),
    (1, ("step",), "ftp", "observations[1].step must be one of dns, tcp, tls, http"),
    (1, ("purpose",), "rejected", "observations[1].purpose 'rejected' is not a helper's to send"),
    (1, ("purpose",), "other",
     "observations[1].purpose must be one of measure, followup, peek, redirect, dnscheck, rejected"),
    (1, ("address",), ["203.0.113.10"], "observations[1].address must be a string or null, not a list"),
    (1, ("t_start",), "now", "observations[1].t_start must be a finite number, not a string"),
])
def test_type_wrong_field_is_named(index: int, path: tuple[Any, ...], value: Any, reason: str) -> None:
    answer = _helper_answer()
    node = answer["observations"][index]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(WireError) as exc:
        observations_from_wire(answer, source=SOURCE_LIVE, vantage=CONTROL)
    assert exc.value.reason == reason
    assert "\n" not in exc.value.reason


def test_a_stored_rejection_mark_travels_through_from_wire() -> None:
    """An upload of a run whose helper answer was rejected carries the mark; from_wire keeps it."""
    from kzprobe.contract import rejected

    mark = rejected("observations[0].data.addresses must be a list, not a number", target=URL, domain=DOMAIN,
                    source=SOURCE_LIVE)
    o = from_wire(json.loads(json.dumps(mark.to_dict())), source=SOURCE_LIVE, vantage=CONTROL)
    assert o.purpose == REJECTED and o.data["wire_error"] == mark.data["wire_error"]


def test_a_long_list_is_checked_to_its_end_or_refused() -> None:
    """The classifier sorts every address: one wrong item at the end must be found, not skipped."""
    answer = _helper_answer()
    answer["observations"][0]["data"]["addresses"] = [A] * 50_000 + [5]
    with pytest.raises(WireError, match=r"addresses\[50000\] must be a string, not a number$"):
        observations_from_wire(answer, source=SOURCE_LIVE, vantage=CONTROL)
    answer["observations"][0]["data"]["addresses"] = [A] * 100_001
    with pytest.raises(WireError, match=r"addresses has more than 100000 items$"):
        observations_from_wire(answer, source=SOURCE_LIVE, vantage=CONTROL)


def test_missing_and_top_level_shapes() -> None:
    with pytest.raises(WireError, match=r"^observations\[0\]\.target is missing$"):
        observations_from_wire({"observations": [{"step": "dns", "domain": DOMAIN}]}, source="live", vantage=CONTROL)
    with pytest.raises(WireError, match=r"^observations must be a list, not an object$"):
        observations_from_wire({"observations": {}}, source="live", vantage=CONTROL)
    with pytest.raises(WireError, match=r"^the answer must be an object, not a list$"):
        observations_from_wire([], source="live", vantage=CONTROL)


# --- fuzzing ---------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


ANSWER = _helper_answer()
PATHS = _paths(ANSWER)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=JSON)
def test_fuzz_one_field_replaced(path: tuple[Any, ...], value: Any) -> None:
    """Any field replaced by any JSON value: accepted (and then classifiable) or a WireError, nothing else."""
    answer = copy.deepcopy(ANSWER)
    node = answer
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        got = observations_from_wire(answer, source=SOURCE_LIVE, vantage=CONTROL)
    except WireError as exc:
        assert exc.reason and "\n" not in exc.reason and len(exc.reason) < 300
        return
    # Accepted: the classifier must then run on it without an exception.
    probe = [Observation(step="dns", target=URL, domain=DOMAIN, data={"resolver": "x", "addresses": [A]}),
             Observation(step="tcp", target=URL, domain=DOMAIN, address=A, failure=E.CONNECTION_RESET)]
    for o in got:
        o.target = URL
    classify_target(URL, probe + got)


@settings(max_examples=300, deadline=None)
@given(payload=JSON)
def test_fuzz_any_json(payload: Any) -> None:
    try:
        observations_from_wire(payload, source=SOURCE_LIVE, vantage=CONTROL)
        observations_from_wire({"observations": [payload]}, source=SOURCE_LIVE, vantage=CONTROL)
    except WireError:
        pass


# --- the helper client: a rejected answer -> inconclusive, with the reason -----------------------
def _ask(answer: Any) -> list[Observation]:
    """ControlClient asks a helper that answers ``answer`` (an in-process transport, no socket)."""
    sunk: list[Observation] = []

    async def sink(o: Observation) -> None:
        sunk.append(o)

    async def main() -> None:
        client = ControlClient(["http://helper.invalid"], [], ProbeConfig(timeout=1.0), sink,
                               TrustStore(include_default=False))
        await client.client.aclose()
        client.client = httpx.AsyncClient(transport=httpx.MockTransport(
            lambda request: httpx.Response(200, json=answer)))
        try:
            await client.fetch(Target(URL), [A])
        finally:
            await client.aclose()

    trio.run(main)
    return sunk


def _probe_side() -> list[Observation]:
    return [Observation(step="dns", target=URL, domain=DOMAIN,
                        data={"resolver": "198.51.100.53:53", "transport": "udp", "addresses": [A],
                              "responses": [{"rcode": "NOERROR", "addresses": [A]}]}),
            Observation(step="tcp", target=URL, domain=DOMAIN, address=A, port=443),
            Observation(step="tls", target=URL, domain=DOMAIN, address=A, port=443, failure=E.CONNECTION_RESET,
                        data={"sni": DOMAIN})]


@pytest.mark.parametrize("field,value,reason", [
    ("data", [], "observations[3].data must be an object, not a list"),
    ("addresses", 5, "observations[0].data.addresses must be a list, not a number"),
])
def test_rejected_helper_answer_makes_the_target_inconclusive(field: str, value: Any, reason: str) -> None:
    answer = _helper_answer()
    if field == "data":
        answer["observations"][3]["data"] = value
    else:
        answer["observations"][0]["data"][field] = value
    got = _ask(answer)
    assert len(got) == 1 and got[0].purpose == REJECTED and got[0].vantage == CONTROL
    obs = _probe_side() + got
    for i, o in enumerate(obs, 1):
        o.id = i
    v = classify_target(URL, obs)
    assert (v.status, v.rule) == ("inconclusive", "control.rejected")
    assert reason in v.sentence and "helper http://helper.invalid" in v.sentence
    assert v.observations == [len(obs)]


def test_accepted_helper_answer_is_the_contrast() -> None:
    """The same exchange with a well-formed answer: control completes, so the reset is DPI."""
    got = _ask(_helper_answer())
    assert [o.step for o in got] == ["dns", "tcp", "tls", "http"] and all(o.target == URL for o in got)
    v = classify_target(URL, _probe_side() + got)
    assert (v.status, v.mechanism, v.rule) == ("blocked", "dpi", "dpi.tls_control")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from([p for p in PATHS if p[0] == "observations"]), value=JSON)
def test_fuzz_through_the_helper_client(path: tuple[Any, ...], value: Any) -> None:
    """Whatever the helper sends, the client and the classifier give a verdict; a rejection says why."""
    answer = copy.deepcopy(ANSWER)
    node = answer
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    got = _ask(answer)
    v = classify_target(URL, _probe_side() + got)
    if any(o.purpose == REJECTED for o in got):
        assert v.rule == "control.rejected" and got[0].data["wire_error"] in v.sentence
