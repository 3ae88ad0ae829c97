"""Replay reads HTTPS with the secrets a capture carries (replay.tlsdecrypt, pcapng DSB).

The TLS bytes come from a real handshake: Python's ssl module (OpenSSL) as client and server in
memory (MemoryBIO), the client logging its secrets as SSLKEYLOGFILE does.  What must come out of
the decryption is what each side was given to send."""

from __future__ import annotations

import ssl
import struct
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kzprobe.replay import tlsdecrypt
from kzprobe.replay.pcapio import ReadResult, iter_frames

REQUEST = b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + b"x" * 40000


#: (TLS version, OpenSSL cipher string for 1.2): every AEAD family replay decrypts.
SESSIONS = [("1.3", None), ("1.2", "ECDHE+AESGCM+AES256"), ("1.2", "ECDHE+AESGCM+AES128"), ("1.2", "ECDHE+CHACHA20")]


def _session(tmp_path: Path, version: str = "1.3", ciphers: str | None = None) -> tuple[bytes, bytes, bytes]:
    """(client stream, server stream, key log) of one TLS exchange of REQUEST and RESPONSE."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("site.test").configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    keylog = tmp_path / "keys.log"
    client_ctx.keylog_filename = str(keylog)
    tls = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    server_ctx.minimum_version = server_ctx.maximum_version = tls
    if ciphers:
        server_ctx.set_ciphers(ciphers)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="site.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    cli_stream, srv_stream = bytearray(), bytearray()

    def pump() -> None:
        a, b = c_out.read(), s_out.read()
        cli_stream.extend(a)
        srv_stream.extend(b)
        s_in.write(a)
        c_in.write(b)

    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        pump()
    client.write(REQUEST)
    pump()
    assert server.read(len(REQUEST)) == REQUEST
    server.write(RESPONSE)
    pump()
    return bytes(cli_stream), bytes(srv_stream), keylog.read_bytes()


@pytest.mark.parametrize(("version", "ciphers"), SESSIONS, ids=[f"{v}-{c}" for v, c in SESSIONS])
def test_both_directions_decrypt_to_what_was_sent(tmp_path: Path, version: str, ciphers: str | None) -> None:
    cli, srv, log = _session(tmp_path, version, ciphers)
    keys = tlsdecrypt.parse_keylog([log])
    cr = tlsdecrypt.client_random(cli)
    assert cr is not None and cr in keys
    hello = tlsdecrypt.server_hello(srv)
    assert hello is not None and hello.tls13 == (version == "1.3")
    req = tlsdecrypt.decrypt(cli, hello, keys[cr], "CLIENT", cr)
    assert bytes(req.data) == REQUEST and req.complete
    resp = tlsdecrypt.decrypt(srv, hello, keys[cr], "SERVER", cr)
    # The server also sends session tickets (handshake messages after the handshake): not data.
    assert bytes(resp.data) == RESPONSE and resp.complete
    # Each record's end in the stream, with the plaintext so far: what speed samples are timed by.
    assert resp.marks[-1] == (len(srv), len(RESPONSE))
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(resp.marks, resp.marks[1:], strict=False))


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_a_stream_cut_short_or_without_its_secrets_is_not_read(tmp_path: Path, version: str) -> None:
    cli, srv, log = _session(tmp_path, version)
    keys = tlsdecrypt.parse_keylog([log])
    cr = tlsdecrypt.client_random(cli)
    assert cr is not None
    hello = tlsdecrypt.server_hello(srv)
    assert hello is not None
    cut = tlsdecrypt.decrypt(srv[:-100], hello, keys[cr], "SERVER", cr)
    assert not cut.complete and RESPONSE.startswith(bytes(cut.data))
    # Another session's secrets open nothing.
    (tmp_path / "b").mkdir()
    other = tlsdecrypt.parse_keylog([_session(tmp_path / "b", version)[2]])
    wrong = next(iter(other.values()))
    got = tlsdecrypt.decrypt(srv, hello, wrong, "SERVER", cr)
    assert not got.data and not got.complete
    assert tlsdecrypt.decrypt(srv, hello, {}, "SERVER", cr).complete is False


@pytest.mark.parametrize("line", [b"", b"# comment", b"CLIENT_RANDOM aa bb", b"SERVER_TRAFFIC_SECRET_0 zz 00",
                                  b"SERVER_TRAFFIC_SECRET_0 " + b"00" * 31 + b" " + b"11" * 48])
def test_malformed_key_log_lines_are_skipped(line: bytes) -> None:
    assert tlsdecrypt.parse_keylog([line]) == {}


def _block(btype: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def test_pcapng_decryption_secrets_block_is_read(tmp_path: Path) -> None:
    secrets = b"SERVER_TRAFFIC_SECRET_0 " + b"ab" * 32 + b" " + b"cd" * 48 + b"\n"
    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = _block(1, struct.pack("<HHI", 1, 0, 65535))
    dsb = _block(0x0A, struct.pack("<II", 0x544C534B, len(secrets)) + secrets)
    other = _block(0x0A, struct.pack("<II", 0x57474B4C, 4) + b"wg!!")  # a WireGuard key log: not TLS
    p = tmp_path / "s.pcapng"
    p.write_bytes(shb + idb + dsb + other)
    res = ReadResult()
    assert list(iter_frames(str(p), res)) == []
    assert res.ok and res.tls_keylog == [secrets]
    assert list(tlsdecrypt.parse_keylog(res.tls_keylog)) == [bytes.fromhex("ab" * 32)]


def test_the_probe_logs_its_http_secrets_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SSLKEYLOGFILE set: the HTTP steps' contexts log there (what `lab record` captures); unset: nowhere."""
    import trio

    from kzprobe.probes.http import Clients

    async def make(ctx: ssl.SSLContext) -> None:
        clients = Clients(ctx, 1.0)
        await clients.aclose()

    keys = tmp_path / "keys.log"
    monkeypatch.delenv("SSLKEYLOGFILE", raising=False)
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    trio.run(make, plain)
    assert plain.keylog_filename is None
    monkeypatch.setenv("SSLKEYLOGFILE", str(keys))
    logged = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    trio.run(make, logged)
    assert logged.keylog_filename == str(keys)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=4096), cut=st.integers(min_value=0, max_value=20000))
def test_hostile_bytes_never_raise(tmp_path: Path, junk: bytes, cut: int) -> None:
    """Whatever a server (or a damaged capture) sent, with real secrets: no exception, nothing invented."""
    global _REAL
    if _REAL is None:
        _REAL = _session(tmp_path)
    cli, srv, log = _REAL
    keys = next(iter(tlsdecrypt.parse_keylog([log]).values()))
    cr = tlsdecrypt.client_random(cli)
    assert cr is not None
    tlsdecrypt.server_hello(junk)
    for hello in (tlsdecrypt.server_hello(srv), tlsdecrypt.Hello(False, 0xC02F, b"r" * 32),
                  tlsdecrypt.Hello(False, 0xCCA8, b"r" * 32)):
        assert hello is not None
        for stream in (junk, srv[:cut] + junk, cli[:cut] + junk, srv[:5] + junk, b"\x14\x03\x03\x00\x01\x01" + junk):
            for side in ("CLIENT", "SERVER"):
                got = tlsdecrypt.decrypt(stream, hello, {**keys, "CLIENT_RANDOM": b"m" * 48}, side, cr)
            assert RESPONSE.startswith(bytes(got.data)) or REQUEST.startswith(bytes(got.data))
    tlsdecrypt.parse_keylog([junk])
    tlsdecrypt.client_random(junk)


_REAL: tuple[bytes, bytes, bytes] | None = None
