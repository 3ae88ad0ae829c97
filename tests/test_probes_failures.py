"""Failure mapping with real exceptions from real sockets on loopback, and the probes' failure strings.

Each failure is produced the way a censor or a broken site produces it (an RST, a silent peer, a
clean close mid-handshake, a bad certificate), raised by the same libraries the probe uses
(socket, ssl, trio, httpx, dnspython), sometimes wrapped by trio's nurseries in exception groups.
No exception here is constructed by hand except where the wrapping itself is under test.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme

from kzprobe import errors as E
from kzprobe.analysis.fingerprints import Fingerprints
from kzprobe.probes import dns as dnsprobe
from kzprobe.probes import http as httpprobe
from kzprobe.probes import tcp as tcpprobe
from kzprobe.probes import tls as tlsprobe
from kzprobe.probes.certs import TrustStore

NAME = "site.test"


@dataclass
class Servers:
    ca_pem: Path
    reset: tuple[str, int]  # reads the first bytes, then RST
    eof: tuple[str, int]  # reads the first bytes, then a clean close (FIN)
    silent: tuple[str, int]  # accepts and never answers
    refused: tuple[str, int]  # nothing listens
    good: tuple[str, int]  # TLS, certificate for NAME from the trusted CA
    untrusted: tuple[str, int]  # TLS, certificate for NAME from a CA nobody trusts
    wrong_name: tuple[str, int]  # TLS, trusted CA, certificate for another name
    expired: tuple[str, int]  # TLS, trusted CA, certificate for NAME that expired


@pytest.fixture(scope="module")
def servers(loopnet_lib: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    lib = loopnet_lib
    tmp = tmp_path_factory.mktemp("failures")
    ca, rogue = trustme.CA(), trustme.CA()
    ca_pem = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)

    def tls_site(cert: trustme.LeafCert) -> Callable[[socket.socket, Any], None]:
        b = lib.WebBehaviour(lib._server_ctx(cert))
        return lambda conn, _peer: lib.serve_web(conn, b)

    def reset(conn: socket.socket, _peer: Any) -> None:
        conn.settimeout(5)
        conn.recv(65536)
        lib.reset(conn)

    def eof(conn: socket.socket, _peer: Any) -> None:
        conn.settimeout(5)
        conn.recv(65536)
        conn.shutdown(socket.SHUT_RDWR)

    def silent(conn: socket.socket, _peer: Any) -> None:
        conn.settimeout(30)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    handlers = {
        "reset": reset, "eof": eof, "silent": silent,
        "good": tls_site(ca.issue_cert(NAME)),
        "untrusted": tls_site(rogue.issue_cert(NAME)),
        "wrong_name": tls_site(ca.issue_cert("other.test")),
        "expired": tls_site(ca.issue_cert(NAME, not_before=past - dt.timedelta(days=60), not_after=past)),
    }
    listeners = []
    where: dict[str, tuple[str, int]] = {}
    for i, (key, handle) in enumerate(handlers.items()):
        s = socket.socket()
        s.bind((f"127.0.20.{i + 1}", 0))
        s.listen(64)
        listener = lib.Listener(s, handle)
        listener.start()
        listeners.append(listener)
        where[key] = s.getsockname()
    gone = socket.socket()
    gone.bind(("127.0.20.99", 0))
    refused = gone.getsockname()
    gone.close()
    try:
        yield Servers(ca_pem=ca_pem, refused=refused, **where)
    finally:
        for listener in listeners:
            listener.close()


def _caught(fn: Callable[[], Any]) -> BaseException:
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("expected an exception")


def _trio_caught(fn: Callable[[], Any]) -> BaseException:
    async def main() -> None:
        await fn()

    return _caught(lambda: trio.run(main))


# --- plain sockets and ssl ----------------------------------------------------------------------------
def test_refused(servers: Servers) -> None:
    exc = _caught(lambda: socket.create_connection(servers.refused, timeout=2))
    assert isinstance(exc, ConnectionRefusedError)
    assert E.failure_string(exc) == E.CONNECTION_REFUSED


def test_reset(servers: Servers) -> None:
    def go() -> None:
        with socket.create_connection(servers.reset, timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n")
            s.recv(100)

    exc = _caught(go)
    assert isinstance(exc, OSError) and exc.errno == errno.ECONNRESET
    assert E.failure_string(exc) == E.CONNECTION_RESET


def _handshake(addr: tuple[str, int], ctx: ssl.SSLContext, sni: str = NAME) -> None:
    with socket.create_connection(addr, timeout=3) as s, ctx.wrap_socket(s, server_hostname=sni):
        pass


def _trusting(ca_pem: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    return ctx


def test_tls_eof(servers: Servers) -> None:
    exc = _caught(lambda: _handshake(servers.eof, _trusting(servers.ca_pem)))
    assert isinstance(exc, ssl.SSLError | OSError)
    assert E.failure_string(exc) == E.EOF


def test_tls_reset(servers: Servers) -> None:
    exc = _caught(lambda: _handshake(servers.reset, _trusting(servers.ca_pem)))
    assert E.failure_string(exc) == E.CONNECTION_RESET


@pytest.mark.parametrize(("server", "sni", "expected"), [
    ("untrusted", NAME, E.SSL_UNKNOWN_AUTHORITY),
    ("wrong_name", NAME, E.SSL_INVALID_HOSTNAME),
    ("expired", NAME, E.SSL_INVALID_CERTIFICATE),
])
def test_certificate_failures(servers: Servers, server: str, sni: str, expected: str) -> None:
    exc = _caught(lambda: _handshake(getattr(servers, server), _trusting(servers.ca_pem), sni))
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert E.failure_string(exc) == expected


def test_good_certificate_handshakes(servers: Servers) -> None:
    _handshake(servers.good, _trusting(servers.ca_pem))  # the control for the three above


# --- trio --------------------------------------------------------------------------------------------
def test_trio_timeout(servers: Servers) -> None:
    async def read_silence() -> None:
        stream = await trio.open_tcp_stream(*servers.silent)
        async with stream:
            with trio.fail_after(0.3):
                await stream.receive_some(100)

    exc = _trio_caught(read_silence)
    assert isinstance(exc, trio.TooSlowError)
    assert E.failure_string(exc) == E.TIMEOUT


def test_trio_ssl_stream_eof(servers: Servers) -> None:
    async def handshake() -> None:
        stream = await trio.open_tcp_stream(*servers.eof)
        ssl_stream = trio.SSLStream(stream, _trusting(servers.ca_pem), server_hostname=NAME)
        await ssl_stream.do_handshake()

    exc = _trio_caught(handshake)
    assert isinstance(exc, trio.BrokenResourceError)
    assert E.failure_string(exc) == E.EOF


def test_trio_ssl_stream_reset(servers: Servers) -> None:
    async def handshake() -> None:
        stream = await trio.open_tcp_stream(*servers.reset)
        ssl_stream = trio.SSLStream(stream, _trusting(servers.ca_pem), server_hostname=NAME)
        await ssl_stream.do_handshake()

    exc = _trio_caught(handshake)
    assert isinstance(exc, trio.BrokenResourceError)  # the errno is only in __cause__
    assert E.failure_string(exc) == E.CONNECTION_RESET


# --- httpx under trio, inside nurseries (exception groups) ----------------------------------------------
async def _get_in_nursery(url: str, ca_pem: Path, timeout: float = 2.0, sni: str | None = NAME) -> None:
    async with httpx.AsyncClient(verify=_trusting(ca_pem), timeout=timeout, trust_env=False) as client:

        async def get() -> None:
            # Pinned to the address with SNI / Host = the name, as the probe's HTTP step does.
            ext = {"sni_hostname": sni} if sni else {}
            await client.get(url, headers={"Host": sni or ""} if sni else None, extensions=ext)

        async with trio.open_nursery() as n:
            n.start_soon(get)


@pytest.mark.parametrize(("server", "scheme", "timeout", "expected", "httpx_type"), [
    ("reset", "http", 2.0, E.CONNECTION_RESET, httpx.ReadError),
    ("refused", "http", 2.0, E.CONNECTION_REFUSED, httpx.ConnectError),
    ("silent", "http", 0.3, E.TIMEOUT, httpx.ReadTimeout),
    ("eof", "http", 2.0, E.EOF, httpx.RemoteProtocolError),
    ("untrusted", "https", 2.0, E.SSL_UNKNOWN_AUTHORITY, httpx.ConnectError),
    ("wrong_name", "https", 2.0, E.SSL_INVALID_HOSTNAME, httpx.ConnectError),
    ("expired", "https", 2.0, E.SSL_INVALID_CERTIFICATE, httpx.ConnectError),
])
def test_httpx_errors_in_exception_groups(servers: Servers, server: str, scheme: str, timeout: float,
                                          expected: str, httpx_type: type[Exception]) -> None:
    host, port = getattr(servers, server)
    exc = _trio_caught(lambda: _get_in_nursery(f"{scheme}://{host}:{port}/", servers.ca_pem, timeout))
    # trio's strict exception groups: the httpx error arrives wrapped, possibly more than once.
    assert isinstance(exc, BaseExceptionGroup)
    leaves = [e for e in E.walk(exc) if isinstance(e, httpx_type)]
    assert leaves, exc
    assert E.failure_string(exc) == expected


def test_ip_url_with_a_certificate_for_a_name_is_invalid_hostname(servers: Servers) -> None:
    host, port = servers.wrong_name
    exc = _trio_caught(lambda: _get_in_nursery(f"https://{host}:{port}/", servers.ca_pem, sni=None))
    assert E.failure_string(exc) == E.SSL_INVALID_HOSTNAME


def test_walk_follows_context_and_groups() -> None:
    """A failure re-raised as something else while handling an OS error keeps its errno."""
    def go() -> None:
        try:
            socket.create_connection(("127.0.20.99", 9), timeout=2)
        except OSError:
            raise RuntimeError("wrapped") from None  # explicit cause suppressed: only __context__ remains

    exc = _caught(go)
    assert exc.__cause__ is None and exc.__context__ is not None
    assert E.failure_string(exc) == E.CONNECTION_REFUSED
    group = BaseExceptionGroup("outer", [ValueError("noise"), ExceptionGroup("inner", [exc])])
    assert E.failure_string(group) == E.CONNECTION_REFUSED


def test_unknown_failure_is_labelled() -> None:
    assert E.failure_string(ValueError("odd")).startswith(E.UNKNOWN)


def test_unknown_failure_names_the_leaf_not_the_group() -> None:
    """A bug inside a trio nursery arrives as a group wrapping a chain: the string names its cause."""
    async def boom() -> None:
        try:
            {}["missing"]
        except KeyError as exc:
            raise RuntimeError("step failed") from exc

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(boom)

    exc = _caught(lambda: trio.run(main))
    assert isinstance(exc, BaseExceptionGroup)
    assert isinstance(E.leaf(exc), KeyError)
    assert E.failure_string(exc) == "unknown_failure: KeyError: 'missing'"


# --- the probe steps themselves -------------------------------------------------------------------------
def _run(fn: Callable[[], Any]) -> Any:
    async def main() -> Any:
        return await fn()

    return trio.run(main)


def test_tcp_step(servers: Servers, loopnet: Any, loopnet_lib: Any) -> None:
    host, port = servers.refused
    obs, stream = _run(lambda: tcpprobe.connect("u", NAME, host, port, 2))
    assert stream is None and obs.failure == E.CONNECTION_REFUSED
    # The full accept queue of the loopback network: the SYN is dropped, the connect times out.
    obs, stream = _run(lambda: tcpprobe.connect("u", NAME, loopnet_lib.BACKLOG_FULL, loopnet.https_port, 0.5))
    assert stream is None and obs.failure == E.TIMEOUT
    assert obs.duration >= 0.4


async def _tls_step(addr: tuple[str, int], ca_pem: Path, sni: str = NAME, timeout: float = 2.0) -> Any:
    tcp, stream = await tcpprobe.connect("u", NAME, addr[0], addr[1], timeout)
    assert stream is not None, tcp.failure
    return await tlsprobe.handshake(stream, "u", NAME, addr[0], addr[1], sni, timeout, TrustStore([ca_pem]))


@pytest.mark.parametrize(("server", "failure", "cert_valid", "cert_failure"), [
    ("good", None, True, None),
    ("reset", E.CONNECTION_RESET, None, None),
    ("eof", E.EOF, None, None),
    ("silent", E.TIMEOUT, None, None),
    # OpenSSL verifies in the handshake; a chain that fails ends it at the certificate, but the
    # network delivered one: no failure, the chain is kept and OpenSSL's verdict recorded.
    ("untrusted", None, False, E.SSL_UNKNOWN_AUTHORITY),
    ("wrong_name", None, False, E.SSL_INVALID_HOSTNAME),
    ("expired", None, False, E.SSL_INVALID_CERTIFICATE),
])
def test_tls_step(servers: Servers, server: str, failure: str | None, cert_valid: bool | None,
                  cert_failure: str | None) -> None:
    obs = _run(lambda: _tls_step(getattr(servers, server), servers.ca_pem, timeout=0.5 if server == "silent"
                                 else 2.0))
    assert obs.failure == failure, obs
    assert obs.data.get("cert_valid") == cert_valid
    assert obs.data.get("cert_failure") == cert_failure
    if failure is None:
        assert obs.data["certificates"] and obs.data["certificates"][0]["der_b64"]
        # Negotiated before the certificate was judged: recorded whether or not it verified
        # (the test servers are Python's default server contexts: TLS 1.3).
        assert obs.data["version"] == "TLSv1.3", obs.data
        assert obs.data["cipher"] in ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
                                      "TLS_AES_128_GCM_SHA256"), obs.data
        if cert_valid:
            assert obs.data["version"].startswith("TLS")


@pytest.mark.parametrize(("server", "scheme", "failure"), [
    ("reset", "http", E.CONNECTION_RESET),
    ("eof", "http", E.EOF),
    ("silent", "http", E.TIMEOUT),
    ("refused", "http", E.CONNECTION_REFUSED),
    ("untrusted", "https", E.SSL_UNKNOWN_AUTHORITY),
    ("good", "https", None),
])
def test_http_step(servers: Servers, server: str, scheme: str, failure: str | None) -> None:
    host, port = getattr(servers, server)
    url = f"{scheme}://{NAME}:{port}/"
    timeout = 0.3 if server == "silent" else 2.0

    async def fetch() -> Any:
        clients = httpprobe.Clients(TrustStore([servers.ca_pem]).ssl_context(), timeout)
        try:
            return await httpprobe.fetch(clients, url, NAME, url, host, timeout, Fingerprints.default())
        finally:
            await clients.aclose()

    obs = _run(fetch)
    assert obs.failure == failure, obs
    if failure is None:
        assert obs.data["status"] == 200 and obs.data["title"] == f"{NAME} home"


# --- DNS against the loopback resolvers -----------------------------------------------------------------
@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize(("name", "failure"), [
    ("ok.test", None),
    ("nx.test", E.DNS_NXDOMAIN),
    ("servfail.test", E.DNS_SERVFAIL),
    ("silent.test", E.TIMEOUT),
])
def test_dns_lookup(loopnet: Any, loopnet_lib: Any, name: str, failure: str | None, transport: str) -> None:
    obs = _run(lambda: dnsprobe.lookup(f"https://{name}/", name, loopnet.isp.spec, transport, 0.6, 0.1))
    assert obs.failure == failure, obs
    assert obs.data["resolver"] == loopnet.isp.spec and obs.data["transport"] == transport
    if failure is None:
        assert obs.data["addresses"] == [loopnet_lib.ORIGIN]
        assert obs.data["answers"][0]["ttl"] == 60


def test_dns_injection_keeps_both_answers(loopnet: Any, loopnet_lib: Any) -> None:
    obs = _run(lambda: dnsprobe.lookup("https://injected.test/", "injected.test", loopnet.isp.spec, "udp", 1.0,
                                       0.3))
    assert obs.failure is None
    assert [r["addresses"] for r in obs.data["responses"]] == [[loopnet_lib.FORGED], [loopnet_lib.ORIGIN]]
    assert obs.data["addresses"] == [loopnet_lib.FORGED]  # the first answer is what a stub would use


def test_dns_unreachable_resolver_times_out() -> None:
    """A resolver address where nothing listens: ICMP port unreachable on loopback, or silence."""
    obs = _run(lambda: dnsprobe.lookup("https://x.test/", "x.test", "127.0.20.98:9", "udp", 0.5, 0.1))
    assert obs.failure in (E.TIMEOUT, E.CONNECTION_REFUSED)
