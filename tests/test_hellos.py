"""The browser-like and Tor-like ClientHellos (probes/hellos.py), on the bytes OpenSSL really emits.

Expected values come from the hellos' definitions (Tor's 2012 cipher list, Chrome's order), read
off the wire with a parser written here, independent of kzprobe's own ClientHello parsing.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from kzprobe import errors as E
from kzprobe.analysis import features as F
from kzprobe.model import Observation
from kzprobe.probes import hellos
from kzprobe.probes import tcp as tcpprobe
from kzprobe.probes import tls as tlsprobe
from kzprobe.probes.certs import TrustStore


def client_hello(ctx: ssl.SSLContext, sni: str = "www.example.com") -> bytes:
    """The first flight OpenSSL writes for ``ctx`` (one TLS record), with no network."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def cipher_suites(record: bytes) -> list[int]:
    assert record[0] == 0x16 and record[5] == 0x01, "not a ClientHello record"
    p = 5 + 4 + 2 + 32  # record header, handshake header, legacy_version, random
    p += 1 + record[p]  # session id
    n = int.from_bytes(record[p:p + 2], "big")
    raw = record[p + 2:p + 2 + n]
    return [int.from_bytes(raw[i:i + 2], "big") for i in range(0, n, 2)]


def suites_bytes(record: bytes) -> bytes:
    return b"".join(c.to_bytes(2, "big") for c in cipher_suites(record))


@pytest.fixture(scope="module")
def trust() -> TrustStore:
    return TrustStore()


def test_signature_is_in_the_tor_hello_only(trust: TrustStore) -> None:
    tor = client_hello(hellos.context("tor", trust))
    browser = client_hello(hellos.context("browser", trust))
    default = client_hello(ssl.create_default_context())
    probe_default = client_hello(hellos.context("default", trust))
    assert hellos.DPI_SIGNATURE in suites_bytes(tor)
    # Anywhere in the record, as iptables' string match looks: not only in the cipher list.
    for other in (browser, default, probe_default):
        assert hellos.DPI_SIGNATURE not in other
    assert len(hellos.DPI_SIGNATURE) >= 8 and len(hellos.DPI_SIGNATURE) % 2 == 0


def test_tor_hello_follows_tors_order(trust: TrustStore) -> None:
    sent = cipher_suites(client_hello(hellos.context("tor", trust)))
    assert sent[-1] == 0x00FF  # OpenSSL's renegotiation SCSV
    wanted = [cid for cid, name in hellos.TOR_CIPHERS if name]
    assert sent[:-1] == wanted
    # Tor's list of 2012 began with these (tor-0.2.3.17-beta ciphers.inc).
    assert sent[:6] == [0xC00A, 0xC014, 0x0088, 0x0087, 0x0039, 0x0038]
    assert 0x1301 not in sent and 0x1302 not in sent  # no TLS 1.3: Tor of the time had none


def test_browser_hello_is_chromes_order_with_alpn(trust: TrustStore) -> None:
    record = client_hello(hellos.context("browser", trust))
    sent = cipher_suites(record)
    tls12 = [c for c in sent if c >> 8 != 0x13 and c != 0x00FF]
    assert tls12 == [cid for cid, _ in hellos.BROWSER_CIPHERS]
    assert {0x1301, 0x1302, 0x1303} <= set(sent)
    assert b"\x02h2\x08http/1.1" in record  # ALPN protocol list


def test_unknown_name_is_refused(trust: TrustStore) -> None:
    with pytest.raises(ValueError, match="unknown ClientHello"):
        hellos.context("chrome", trust)


def test_tor_sni_shape() -> None:
    import random

    names = {hellos.tor_sni(random.Random(i)) for i in range(50)}
    assert len(names) > 40
    for n in names:
        assert n.startswith("www.") and n.endswith(".com") and 4 <= len(n) - 8 <= 25


# --- against a real OpenSSL server ---------------------------------------------------------------
@contextlib.contextmanager
def _s_server(tmp: Path, *extra: str) -> Iterator[tuple[int, Path]]:
    """``openssl s_server`` on loopback with an RSA trustme chain for relay.test; yields (port, CA PEM)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl binary")
    # RSA, as Tor relays' link keys are (trustme's default is ECDSA).
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert("relay.test", key_type=trustme.KeyType.RSA)
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp / "leaf.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    # s_server's stdout is block-buffered in a pipe, so it cannot tell us its port: pick a free one.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(tmp / "leaf.pem"),
                             "-alpn", "h2,http/1.1", "-www", "-quiet", *extra], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, "s_server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "s_server did not listen"
                time.sleep(0.05)
        yield port, tmp / "ca.pem"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def s_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    with _s_server(tmp_path_factory.mktemp("s_server")) as got:
        yield got


@pytest.fixture(scope="module")
def s_server_tls12(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    with _s_server(tmp_path_factory.mktemp("s_server12"), "-tls1_2") as got:
        yield got


@pytest.mark.parametrize("name", ["browser", "tor"])
def test_both_hellos_complete_against_s_server(name: str, s_server: tuple[int, Path]) -> None:
    port, ca = s_server
    ctx = hellos.context(name, TrustStore([ca], include_default=False))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="relay.test") as tls:
            cipher = tls.cipher()
            assert cipher is not None
            if name == "tor":
                assert tls.version() == "TLSv1.2"
                # The server (RSA key) picks the first RSA suite in Tor's order.
                assert cipher[0] == "ECDHE-RSA-AES256-SHA"
                assert tls.selected_alpn_protocol() is None
            else:
                assert tls.version() == "TLSv1.3"
                assert tls.selected_alpn_protocol() == "h2"
                assert tls.getpeercert()  # verified against the test CA


def _probe_handshake(port: int, trust: TrustStore, hello: str) -> Observation:
    async def main() -> Observation:
        tcp, stream = await tcpprobe.connect("tor-or://127.0.0.1:1", "127.0.0.1", "127.0.0.1", port, 5)
        assert stream is not None, tcp.failure
        return await tlsprobe.handshake(stream, "tor-or://127.0.0.1:1", "127.0.0.1", "127.0.0.1", port,
                                        "relay.test", 5, trust, hello=hello)

    return trio.run(main)


def test_the_tls_step_records_the_hello_and_the_tor_handshake_is_not_validated(s_server: tuple[int, Path]) -> None:
    port, _ca = s_server
    obs = _probe_handshake(port, TrustStore(include_default=False), "tor")  # trusts nothing
    assert obs.failure is None
    assert obs.data["hello"] == "tor"
    assert (obs.data["version"], obs.data["cipher"]) == ("TLSv1.2", "ECDHE-RSA-AES256-SHA")
    assert obs.data["cert_valid"] is None and obs.data["certificates"]


@pytest.mark.parametrize(("server", "version"), [("s_server", "TLSv1.3"), ("s_server_tls12", "TLSv1.2")])
def test_a_failed_verification_still_records_version_and_cipher(server: str, version: str,
                                                                request: pytest.FixtureRequest) -> None:
    port, _ca = request.getfixturevalue(server)
    obs = _probe_handshake(port, TrustStore(include_default=False), "browser")  # the test CA is unknown
    assert obs.failure is None and obs.data["cert_valid"] is False
    assert obs.data["cert_failure"] == E.SSL_UNKNOWN_AUTHORITY
    assert obs.data["hello"] == "browser"
    assert obs.data["version"] == version
    # s_server takes the client's order: the browser's first suite for an RSA key.
    assert obs.data["cipher"] == ("TLS_AES_256_GCM_SHA384" if version == "TLSv1.3" else "ECDHE-RSA-AES128-GCM-SHA256")


def test_tor_or_probe_against_a_relay_like_server(s_server: tuple[int, Path]) -> None:
    """The engine's tor-or:// measurement: TCP, then the Tor-like hello with a Tor-like SNI; ok."""
    from kzprobe.analysis import classify_target
    from kzprobe.model import Target
    from kzprobe.probes.engine import Engine, ProbeConfig

    port, _ca = s_server
    url = f"tor-or://127.0.0.1:{port}"
    seen: list[Observation] = []

    async def sink(o: Observation) -> None:
        o.id = len(seen) + 1
        seen.append(o)

    async def main() -> None:
        async with Engine(ProbeConfig(system_resolver=False, timeout=5), sink) as engine:
            await engine.measure(Target(url))

    trio.run(main)
    assert [(o.step, o.purpose, o.failure) for o in seen] == [("tcp", "measure", None), ("tls", "measure", None)]
    tls = seen[1]
    assert tls.data["hello"] == "tor" and tls.port == port
    assert tls.data["sni"].startswith("www.") and tls.data["sni"].endswith(".com")
    assert tls.data["cert_valid"] is None and tls.data["version"] == "TLSv1.2"
    v = classify_target(url, seen)
    assert (v.status, v.rule) == ("ok", "ok.tor_or"), v


# --- the pure parsers on hostile bytes ------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=600))
def test_parsers_never_raise(junk: bytes, cut: int) -> None:
    """Random bytes, and real hellos cut anywhere or with bytes flipped: an answer, never an exception."""
    real = client_hello(hellos.context("tor", TrustStore(include_default=False)))
    for buf in (junk, b"\x16\x03\x01" + junk, real[:cut], real[:cut] + junk):
        assert F.hello_fingerprint(buf) in (None, "tor", "browser")
        F.cipher_suites(buf)
        version, _cid = F.server_hello(buf)
        assert version is None or version.startswith(("TLS", "SSL"))


def test_server_hello_of_a_real_tls12_and_tls13_handshake(s_server: tuple[int, Path],
                                                          s_server_tls12: tuple[int, Path]) -> None:
    """The ServerHello parser against what s_server really sends (read off a raw socket)."""
    for (port, _ca), ctx, want in ((s_server, hellos.context("browser", TrustStore(include_default=False)),
                                    "TLSv1.3"),
                                   (s_server_tls12, hellos.context("tor", TrustStore(include_default=False)),
                                    "TLSv1.2")):
        hello = client_hello(ctx, "relay.test")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(hello)
            got = b""
            while len(got) < 5 or len(got) < 5 + int.from_bytes(got[3:5], "big"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        version, cid = F.server_hello(got)
        assert version == want
        assert cid == (0xC014 if want == "TLSv1.2" else 0x1302)


def _synthetic_hello(suites: list[int]) -> bytes:
    """A minimal ClientHello record offering ``suites`` (TLS 1.0 record, no extensions)."""
    body = b"\x03\x01" + bytes(32) + b"\x00" + (2 * len(suites)).to_bytes(2, "big")
    body += b"".join(c.to_bytes(2, "big") for c in suites) + b"\x01\x00"
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def test_fingerprint_of_tors_pre_2012_list() -> None:
    """Tor 0.2.2's client list (ciphers.inc from 2008 to May 2012, proposal 124), as on the wire then."""
    old = [0xC00A, 0xC014, 0x0039, 0x0038, 0xC00F, 0xC005, 0x0035, 0xC007, 0xC009, 0xC011, 0xC013, 0x0033,
           0x0032, 0xC00C, 0xC00E, 0xC002, 0xC004, 0x0004, 0x0005, 0x002F, 0xC008, 0xC012, 0x0016, 0x0013,
           0xC00D, 0xC003, 0xFEFF, 0x000A, 0x00FF]
    assert F.cipher_suites(_synthetic_hello(old)) == old
    assert F.hello_fingerprint(_synthetic_hello(old)) == "tor"
    # The signature's bytes straddling suite boundaries are not Tor's list.
    shifted = [0x00C0, 0x0AC0, 0x1400, 0x8800, 0x8700, 0x3900, 0x3800]
    assert hellos.DPI_SIGNATURE in b"".join(c.to_bytes(2, "big") for c in shifted)
    assert F.hello_fingerprint(_synthetic_hello(shifted)) is None
