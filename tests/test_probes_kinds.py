"""The kind probes (tor-dir, obfs4, tcp, udp-dns, proxy+http) against real servers on loopback.

Each expected value comes from how the server was set up: a listener that holds, a port nothing
listens on, a CONNECT proxy that relays (or forbids, or answers garbage), nginx serving a
consensus bigger than the directory cap, a DNS server that answers one name.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trustme

from kzprobe import errors as E
from kzprobe.lab import nginx
from kzprobe.model import MEASURE, Observation, Target
from kzprobe.probes import kinds
from kzprobe.probes.engine import Engine, ProbeConfig
from kzprobe.tests.support import kindserve

LO = "127.0.0.1"
BENIGN = "example.com"


def _measure(target: str, cfg: ProbeConfig, *, followups: bool = True) -> list[Observation]:
    seen: list[Observation] = []

    async def sink(o: Observation) -> None:
        seen.append(o)

    async def main() -> None:
        async with Engine(cfg, sink) as engine:
            await engine.measure(Target(target), followups=followups)

    trio.run(main)
    return seen


def _cfg(**kw: Any) -> ProbeConfig:
    base: dict[str, Any] = dict(system_resolver=False, timeout=1.0, control_sni=BENIGN)
    base.update(kw)
    return ProbeConfig(**base)


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port where nothing listens, held for the test: bound but not listening, so connects get
    refused, and no other test can start listening on it meanwhile."""
    s = socket.socket()
    s.bind((LO, 0))
    try:
        yield int(s.getsockname()[1])
    finally:
        s.close()


def _free_port() -> int:
    s = socket.socket()
    s.bind((LO, 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(p))
    return str(p)


@pytest.fixture(scope="module")
def tls_server(ca: trustme.CA) -> Iterator[int]:
    """example.com's TLS server (what the proxy's tunnel reaches): handshakes, then holds."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(BENIGN).configure_cert(ctx)
    sock = kindserve.listen(LO)

    def handle(conn: socket.socket) -> None:
        conn.settimeout(10)
        with contextlib.suppress(OSError, ssl.SSLError), ctx.wrap_socket(conn, server_side=True) as t:
            t.recv(1)

    threading.Thread(target=kindserve._accept_loop, args=(sock, handle), daemon=True).start()
    yield int(sock.getsockname()[1])
    sock.close()


def _proxy(mode: str, tls_port: int) -> tuple[kindserve.Proxy, int]:
    p = kindserve.Proxy({BENIGN: f"{LO}:{tls_port}"}, mode)
    sock = kindserve.listen(LO)
    kindserve.serve_proxy(sock, p)
    return p, int(sock.getsockname()[1])


def _steps(obs: list[Observation]) -> list[tuple[str, str | None]]:
    return [(o.step, o.failure) for o in obs]


# --- tcp / obfs4 -------------------------------------------------------------------------------------
def test_tcp_endpoint_that_listens_is_one_tcp_step() -> None:
    sock = kindserve.listen(LO)
    kindserve.serve_tcp(sock)
    port = sock.getsockname()[1]
    obs = _measure(f"tcp://{LO}:{port}", _cfg())
    assert _steps(obs) == [("tcp", None)]
    o = obs[0]
    assert (o.address, o.port, o.target, o.purpose) == (LO, port, f"tcp://{LO}:{port}", MEASURE)
    assert o.t_end >= o.t_start > 0
    sock.close()


@pytest.mark.parametrize("scheme", ["tcp", "obfs4"])
def test_refused_endpoint_is_measured_again(scheme: str) -> None:
    """Nothing listens: refused, and measured once more (a lone failure is not evidence)."""
    with closed_port() as port:
        obs = _measure(f"{scheme}://{LO}:{port}", _cfg())
    assert _steps(obs) == [("tcp", E.CONNECTION_REFUSED)] * 2
    assert [o.attempt for o in obs] == [0, 1]


def test_helper_side_measures_once() -> None:
    with closed_port() as port:
        obs = _measure(f"obfs4://{LO}:{port}", _cfg(), followups=False)
    assert _steps(obs) == [("tcp", E.CONNECTION_REFUSED)]


def test_tcp_endpoint_by_name_resolves_first(loopnet: Any) -> None:
    """tcp://NAME:PORT: DNS at the configured resolver (UDP and TCP), then TCP to what it answered."""
    sock = kindserve.listen("127.0.10.1")  # the loopnet origin's address, which the resolvers give for it
    kindserve.serve_tcp(sock)
    port = sock.getsockname()[1]
    obs = _measure(f"tcp://ok.test:{port}", _cfg(resolvers=[loopnet.public.spec]))
    assert [o.step for o in obs if o.step == "dns"] == ["dns", "dns"]
    tcp = [o for o in obs if o.step == "tcp"]
    assert [(o.address, o.failure) for o in tcp] == [("127.0.10.1", None)]
    sock.close()


# --- udp-dns -------------------------------------------------------------------------------------------
def test_udp_dns_is_dns_over_udp_only(loopnet: Any) -> None:
    obs = _measure("udp-dns://ok.test", _cfg(resolvers=[loopnet.public.spec]))
    assert [(o.step, o.data.get("transport")) for o in obs] == [("dns", "udp")]
    assert obs[0].data["addresses"] == ["127.0.10.1"]
    assert obs[0].failure is None


def test_udp_dns_nxdomain(loopnet: Any) -> None:
    obs = _measure("udp-dns://nx.test", _cfg(resolvers=[loopnet.isp.spec]))
    assert _steps(obs) == [("dns", E.DNS_NXDOMAIN)]


# --- proxy+http ------------------------------------------------------------------------------------------
def test_proxy_connect_then_tls_through_the_tunnel(tls_server: int, ca_pem: str) -> None:
    proxy, port = _proxy("ok", tls_server)
    url = f"proxy+http://{LO}:{port}"
    obs = _measure(url, _cfg(ca_bundles=[ca_pem]))
    assert _steps(obs) == [("tcp", None), ("http", None), ("tls", None)]
    connect, tls = obs[1], obs[2]
    assert connect.data["method"] == "CONNECT"
    assert connect.data["connect_to"] == f"{BENIGN}:443"
    assert connect.data["status"] == 200
    assert proxy.requests and proxy.requests[0].startswith(b"CONNECT example.com:443 HTTP/1.1\r\n")
    # The handshake went through the tunnel to example.com's server, with the benign SNI.
    assert tls.data["sni"] == BENIGN and tls.data["cert_valid"] is True
    assert tls.purpose == MEASURE and tls.address == LO and tls.port == port


def test_proxy_that_forbids_gives_its_status_and_no_tls(tls_server: int) -> None:
    _, port = _proxy("forbid", tls_server)
    obs = _measure(f"proxy+http://{LO}:{port}", _cfg())
    assert _steps(obs) == [("tcp", None), ("http", None)]
    assert obs[1].data["status"] == 403


def test_blockpage_answering_connect_goes_through_the_feature_layer(tls_server: int) -> None:
    _, port = _proxy("blockpage", tls_server)
    obs = _measure(f"proxy+http://{LO}:{port}", _cfg())
    assert _steps(obs) == [("tcp", None), ("http", None)]
    d = obs[1].data
    assert d["status"] == 403 and d["blockpage"] == "kz_blockpage_zablokirovana"
    assert d["body_length"] == len(kindserve.BLOCKPAGE.encode()) and d["truncated"] is False
    assert d["title"] == "Blocked"


def test_plain_refusal_has_no_blockpage(tls_server: int) -> None:
    _, port = _proxy("forbid", tls_server)
    obs = _measure(f"proxy+http://{LO}:{port}", _cfg())
    assert obs[1].data["status"] == 403 and obs[1].data["blockpage"] is None and obs[1].data["body_length"] == 0


def test_proxy_that_answers_garbage_is_malformed(tls_server: int) -> None:
    _, port = _proxy("garbage", tls_server)
    obs = _measure(f"proxy+http://{LO}:{port}", _cfg())
    assert _steps(obs) == [("tcp", None), ("http", E.HTTP_MALFORMED)]
    assert "status" not in obs[1].data


def test_proxy_that_closes_is_eof_and_measured_again(tls_server: int) -> None:
    _, port = _proxy("close", tls_server)
    obs = _measure(f"proxy+http://{LO}:{port}", _cfg())
    assert _steps(obs) == [("tcp", None), ("http", E.EOF), ("tcp", None), ("http", E.EOF)]
    assert [o.attempt for o in obs] == [0, 0, 1, 1]


def test_proxy_retry_after_a_retried_connect_takes_a_fresh_attempt(tls_server: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The first connect is refused (a real refusal: a port held bound, not listening), its retry
    connects, the CONNECT is cut (EOF) and measured again: that connect is attempt 2, not a second
    attempt 1 (twin steps read as a target measured twice, e.g. by a resumed run)."""
    _, port = _proxy("close", tls_server)
    real = kinds.tcpprobe.connect
    calls: list[int] = []
    with closed_port() as dead:
        async def first_refused(target: str, domain: str, address: str, p: int, timeout: float,
                                **kw: Any) -> tuple[Observation, Any]:
            calls.append(p)
            obs, stream = await real(target, domain, address, dead if len(calls) == 1 else p, timeout, **kw)
            obs.port = p
            return obs, stream

        monkeypatch.setattr(kinds.tcpprobe, "connect", first_refused)
        obs = _measure(f"proxy+http://{LO}:{port}", _cfg())
    assert _steps(obs) == [("tcp", E.CONNECTION_REFUSED), ("tcp", None), ("http", E.EOF), ("tcp", None),
                           ("http", E.EOF)]
    assert [o.attempt for o in obs] == [0, 1, 0, 2, 1]


def test_connect_head_parser() -> None:
    assert kinds.parse_head(b"HTTP/1.1 200 Connection established\r\nVia: x") == (200, {"Via": "x"})
    assert kinds.parse_head(b"HTTP/1.0 407 Proxy Authentication Required") == (407, {})
    assert kinds.parse_head(b"SSH-2.0-OpenSSH") is None
    assert kinds.parse_head(b"HTTP/1.1 2000 no") is None
    assert kinds.parse_head(b"HTTP/1.1 \xb2\xb3\xb9 no") is None  # latin-1 superscripts: isdigit, not int


def test_refusal_with_a_non_ascii_length_keeps_its_status() -> None:
    """A proxy's 403 whose Content-Length is "\xb2" (latin-1 "²", which isdigit() accepts and int()
    refuses): the answer is recorded with its status, read to the close, not turned into a malformed one."""
    sock = socket.create_server((LO, 0))
    sock.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = sock.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: \xb2\r\nConnection: close\r\n\r\nno")
        sock.close()

    threading.Thread(target=serve, daemon=True).start()
    obs = _measure(f"proxy+http://{LO}:{sock.getsockname()[1]}", _cfg(), followups=False)
    assert _steps(obs) == [("tcp", None), ("http", None)]
    assert obs[1].data["status"] == 403


# --- tor-dir ----------------------------------------------------------------------------------------------
CONSENSUS_HEAD = "network-status-version 3\nvote-status consensus\nconsensus-method 33\n"


@pytest.fixture(scope="module")
def dir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """nginx serving a 300 KiB consensus at /tor/status-vote/current/consensus; (port, file size)."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (scripts/setup installs nginx-light)")
    tmp = tmp_path_factory.mktemp("dir")
    root = tmp / "www"
    f = root / "tor/status-vote/current/consensus"
    f.parent.mkdir(parents=True)
    body = CONSENSUS_HEAD + "".join(f"r relay{i} AAAA BBBB 2026-11-29 12:00:00 198.51.100.{i % 250} 9001 0\n"
                                    for i in range(6000))
    f.write_text(body)
    size = f.stat().st_size
    assert size > 3 * kinds.DIR_CAP
    for _ in range(3):  # a free port can be taken between our probe of it and nginx's bind: retry
        port = _free_port()
        server = nginx._block([f"listen {LO}:{port};", "server_name _;", f"root {root};", "gzip off;"])
        prefix = tmp / f"nginx-{port}"
        nginx.prepare(prefix, [server])
        proc = subprocess.Popen(nginx.argv(prefix), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection((LO, port), timeout=0.2):
                break
            time.sleep(0.05)
        time.sleep(0.2)  # a port someone else listens on answers too: nginx then exits on its bind error
        if proc.poll() is None:
            break
    else:
        pytest.fail("nginx did not start")
    yield port, size
    proc.terminate()
    proc.wait(10)


def test_tor_dir_fetches_the_consensus_head_only(dir_server: tuple[int, int]) -> None:
    port, size = dir_server
    url = f"tor-dir://{LO}:{port}"
    obs = _measure(url, _cfg())
    assert _steps(obs) == [("tcp", None), ("http", None)]
    h = obs[1]
    assert h.target == url and h.data["kind"] == "tor-dir"
    assert h.data["url"] == f"http://{LO}:{port}{kinds.CONSENSUS_PATH}"
    assert h.data["status"] == 200
    assert int(h.data["headers"]["content-length"]) == size
    # Read at most 64 KiB (plus at most one chunk past it), and said so.
    assert h.data["truncated"] is True
    assert kinds.DIR_CAP <= h.data["wire_bytes"] < kinds.DIR_CAP + 65536 < size
    assert str(h.data["body_head"]).startswith("network-status-version 3")


def test_tor_dir_where_nothing_listens() -> None:
    with closed_port() as port:
        obs = _measure(f"tor-dir://{LO}:{port}", _cfg())
    assert _steps(obs) == [("tcp", E.CONNECTION_REFUSED)] * 2
