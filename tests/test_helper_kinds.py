"""The helper measures the kind targets (issue 15) as control, inside its address and port policy.

Policy cases use TEST-NET addresses declared public with ``lab_public`` (data only: nothing is
sent to them).  The measuring cases run the helper's engine and service in-process with
``allow_private`` against servers on loopback, as the lab does.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import pytest
import trio
import trustme

from kzprobe import errors as E
from kzprobe.helper.localnet import LocalNetworks
from kzprobe.helper.policy import Policy, PolicyError
from kzprobe.helper.service import ControlResult, ControlService, HelperEngine, RefusedByPolicy, _kind_port
from kzprobe.model import CONTROL
from kzprobe.probes.engine import ProbeConfig
from kzprobe.tests.support import kindserve
from kzprobe.tests.support.doh import DoHHandler

LAB = Policy(local=LocalNetworks(frozenset({ipaddress.ip_network("127.0.0.0/8")})),
             lab_public=(ipaddress.ip_network("203.0.113.0/24"),))


@pytest.mark.parametrize("url", [
    "tcp://203.0.113.5:5222", "tcp://203.0.113.5:443", "tcp://chat.example.org:4244", "obfs4://203.0.113.5:47123",
    "tor-dir://203.0.113.5:9030", "tor-dir://203.0.113.5:80", "tor-or://203.0.113.5:9001",
    "proxy+http://203.0.113.5:3128", "proxy+http://proxy.example.org:8080/", "udp-dns://chat.example.org",
])
def test_policy_accepts_the_kinds(url: str) -> None:
    LAB.check_url(url)


@pytest.mark.parametrize(("url", "code"), [
    ("tcp://203.0.113.5:22", "forbidden_port"),           # infrastructure ports are not a kind's
    ("proxy+http://203.0.113.5:25", "forbidden_port"),
    ("tcp://203.0.113.5:0", "forbidden_port"),
    ("tcp://127.0.0.1:5222", "forbidden_address"),        # the host itself
    ("tcp://[::ffff:127.0.0.1]:5222", "forbidden_address"),
    ("obfs4://10.1.2.3:9443", "forbidden_address"),       # private
    ("tor-dir://169.254.169.254:9030", "forbidden_address"),  # cloud metadata
    ("tcp://chat.example.org", "bad_url"),                # the port is mandatory
    ("udp-dns://chat.example.org:53", "bad_url"),         # ... and meaningless for DNS only
    ("tor-dir://dir.example.org:9030", "bad_url"),        # relays and directories are addresses
    ("proxy+http://203.0.113.5:3128/admin?x=1", "bad_url"),
    ("tcp://user:pw@203.0.113.5:5222", "bad_url"),
    ("udp-dns://intranet", "bad_url"),                    # the search domains would complete it
    ("gopher://203.0.113.5:70/", "forbidden_scheme"),
])
def test_policy_refuses(url: str, code: str) -> None:
    with pytest.raises(PolicyError) as e:
        LAB.check_url(url)
    assert e.value.code == code, e.value


def test_a_named_relay_is_refused_in_words_that_say_why() -> None:
    # The one-line reason goes back to the client: it must say what is wrong, not the opposite.
    with pytest.raises(PolicyError, match="must be an IP address, not a name"):
        LAB.check_url("tor-dir://dir.example.org:9030")


def test_the_kind_port_opens_only_for_its_own_request() -> None:
    """tor-dir's GET on 9030 passes the request hook; a redirect elsewhere, or another request, does not."""
    engine = HelperEngine(ProbeConfig(system_resolver=False), LAB)
    req = httpx.Request("GET", "http://203.0.113.5:9030/tor/status-vote/current/consensus")
    other = httpx.Request("GET", "http://203.0.113.5:9031/")

    async def main() -> list[str]:
        out = []
        for port, r in ((9030, req), (9030, other), (None, req)):
            token = _kind_port.set(port)
            try:
                await engine._guard(r)
                out.append("passed")
            except RefusedByPolicy:
                out.append("refused")
            finally:
                _kind_port.reset(token)
        return out

    assert trio.run(main) == ["passed", "refused", "refused"]


# --- measuring, in-process on loopback (allow_private, as the lab) ---------------------------------------
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def world(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A held TCP endpoint, example.com's TLS server and a CONNECT proxy that reaches it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("example.com").configure_cert(ctx)
    tls = kindserve.listen("127.0.0.1")

    def handle(conn: socket.socket) -> None:
        conn.settimeout(10)
        with contextlib.suppress(OSError, ssl.SSLError), ctx.wrap_socket(conn, server_side=True) as t:
            t.recv(1)

    threading.Thread(target=kindserve._accept_loop, args=(tls, handle), daemon=True).start()
    endpoint = kindserve.listen("127.0.0.1")
    kindserve.serve_tcp(endpoint)
    proxy = kindserve.Proxy({"example.com": f"127.0.0.1:{tls.getsockname()[1]}"})
    psock = kindserve.listen("127.0.0.1")
    kindserve.serve_proxy(psock, proxy)
    pem = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    yield {"tcp": endpoint.getsockname()[1], "proxy": psock.getsockname()[1], "ca": str(pem), "requests": proxy}
    for s in (tls, endpoint, psock):
        s.close()


def _control(url: str, addresses: list[str], cfg: ProbeConfig) -> ControlResult:
    policy = Policy(allow_private=True)

    async def main() -> ControlResult:
        async with HelperEngine(cfg, policy) as engine:
            return await ControlService(engine, policy).control(url, addresses)

    return trio.run(main)


def test_helper_measures_a_tcp_endpoint_once(world: dict[str, Any]) -> None:
    res = _control(f"tcp://127.0.0.1:{world['tcp']}", [], ProbeConfig(system_resolver=False, retries=0))
    assert [(o.step, o.failure, o.vantage) for o in res.observations] == [("tcp", None, CONTROL)]


def test_helper_refused_endpoint_is_one_step(world: dict[str, Any]) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, not listening: refused, and no other test can take it meanwhile
    try:
        res = _control(f"obfs4://127.0.0.1:{s.getsockname()[1]}", [],
                       ProbeConfig(system_resolver=False, retries=0, timeout=1))
    finally:
        s.close()
    assert [(o.step, o.failure) for o in res.observations] == [("tcp", E.CONNECTION_REFUSED)]


def test_helper_proxy_connects_to_its_own_benign_name(world: dict[str, Any]) -> None:
    """The CONNECT names the helper's --control-sni, whatever the client would like."""
    cfg = ProbeConfig(system_resolver=False, retries=0, ca_bundles=[world["ca"]], control_sni="example.com")
    res = _control(f"proxy+http://127.0.0.1:{world['proxy']}", [], cfg)
    steps = [(o.step, o.failure) for o in res.observations]
    assert steps == [("tcp", None), ("http", None), ("tls", None)]
    assert res.observations[1].data["connect_to"] == "example.com:443"
    assert res.observations[1].data["status"] == 200
    assert res.observations[2].data["sni"] == "example.com" and res.observations[2].data["cert_valid"] is True
    assert world["requests"].requests[-1].startswith(b"CONNECT example.com:443 ")


def test_helper_udp_dns_connects_nowhere(loopnet: Any) -> None:
    cfg = ProbeConfig(system_resolver=False, resolvers=[loopnet.public.spec], retries=0)
    res = _control("udp-dns://ok.test", ["127.0.10.1", "127.0.10.2"], cfg)
    assert [(o.step, o.data.get("transport")) for o in res.observations] == [("dns", "udp")]
    assert res.observations[0].data["addresses"] == ["127.0.10.1"]
    assert res.observations[0].data["resolver"] == "control"  # never the helper's resolver address
    assert res.refused == []  # the client's addresses are neither measured nor reported on


# --- the probe's side: control for kind targets ------------------------------------------------------------
class _NxDoH(DoHHandler):
    """A DoH server that says NXDOMAIN to everything, as a real one does for an IP literal."""

    sites: ClassVar[dict[str, str]] = {}
    queries: ClassVar[list[str]] = []


def test_doh_is_not_asked_about_an_address() -> None:
    """A kind given by address has no DNS: DoH's NXDOMAIN for "198.51.100.7" would read as control
    failing to reach the site (down.everyone)."""
    from kzprobe.model import Observation, Target
    from kzprobe.probes.certs import TrustStore
    from kzprobe.probes.control import ControlClient

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NxDoH)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/dns-query"
    got: list[Observation] = []

    async def sink(o: Observation) -> None:
        got.append(o)

    async def main() -> None:
        client = ControlClient([], [url], ProbeConfig(), sink, TrustStore([]))
        try:
            await client.fetch(Target("tor-dir://198.51.100.7:9030"), ["198.51.100.7"])
            await client.fetch(Target("tcp://chat.example.org:5222"), [])
        finally:
            await client.aclose()

    try:
        trio.run(main)
    finally:
        server.shutdown()
    assert _NxDoH.queries == ["chat.example.org"]  # the name only (NXDOMAIN on A ends the lookup)
    assert [(o.target, o.failure) for o in got] == [("tcp://chat.example.org:5222", E.DNS_NXDOMAIN)]


@pytest.mark.parametrize("url", ["tcp://ok.test:5222", "proxy+http://ok.test:3128", "udp-dns://ok.test"])
def test_helper_refuses_a_kind_whose_name_resolves_only_to_refused_addresses(loopnet: Any, url: str) -> None:
    """DNS rebinding, for the kinds too: ok.test resolves to 127.0.10.1 (loopback), so a strict
    helper refuses before any connection, and says only "refused"."""
    policy = Policy()
    cfg = ProbeConfig(system_resolver=False, resolvers=[loopnet.public.spec], retries=0)

    async def main() -> None:
        async with HelperEngine(cfg, policy) as engine:
            await ControlService(engine, policy).control(url, ["127.0.10.1"])

    with pytest.raises(PolicyError) as e:
        trio.run(main)
    assert (e.value.code, str(e.value)) == ("forbidden_address", "refused")


# --- the wire: a helper's answer for a kind target is checked as strictly as any other ----------------------
def _connect_wire(**data: Any) -> dict[str, Any]:
    return {"step": "http", "target": "proxy+http://198.51.100.7:3128", "domain": "198.51.100.7",
            "address": "198.51.100.7", "port": 3128, "data": {"method": "CONNECT", "connect_to": "example.com:443",
                                                             "status": 200, **data}}


def test_wire_accepts_a_kind_answer() -> None:
    from kzprobe.contract import observations_from_wire

    tls = {"step": "tls", "target": "proxy+http://198.51.100.7:3128", "domain": "198.51.100.7",
           "data": {"sni": "example.com", "hello": "default", "cert_valid": True}}
    d = {"step": "http", "target": "tor-dir://198.51.100.7:9030", "domain": "198.51.100.7",
         "data": {"kind": "tor-dir", "status": 200, "truncated": True, "body_length": 65536}}
    got = observations_from_wire({"observations": [_connect_wire(), tls, d]}, source="live", vantage=CONTROL)
    assert [o.data.get("method") or o.data.get("kind") or o.step for o in got] == ["CONNECT", "tls", "tor-dir"]
    assert all(o.vantage == CONTROL for o in got)


@pytest.mark.parametrize(("data", "reason"), [
    ({"status": "200"}, "observations[0].data.status must be an integer or null, not a string"),
    ({"method": 5}, "observations[0].data.method must be a string, not a number"),
    ({"connect_to": ["example.com", 443]}, "observations[0].data.connect_to must be a string, not a list"),
    ({"kind": None}, "observations[0].data.kind must be a string, not null"),
])
def test_wire_rejects_a_type_wrong_kind_answer(data: dict[str, Any], reason: str) -> None:
    from kzprobe.contract import WireError, observations_from_wire

    with pytest.raises(WireError) as e:
        observations_from_wire({"observations": [_connect_wire(**data)]}, source="live", vantage=CONTROL)
    assert e.value.reason == reason
