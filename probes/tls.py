"""TLS step: a handshake with a chosen SNI on ``trio.SSLStream``, verified by OpenSSL, recording the chain.

The handshake verifies (OpenSSL, with the run's trust store: :mod:`certs`).  A chain that does
not verify ends the handshake at the certificate, as a browser would, but the chain OpenSSL
received is still recorded, so an interception certificate, a wrong name or an unknown CA is
seen and named: the step then has ``failure=None`` (the network delivered a certificate),
``cert_valid=False`` and ``cert_failure`` = OpenSSL's verdict as an OONI string.  The version and
cipher the server chose are recorded then too: the ``ssl`` module will not report a version for
an unfinished handshake, so they are read from the ServerHello bytes that arrived.

``hello`` names the ClientHello sent (:mod:`kzprobe.probes.hellos`): "browser" or "tor" is
recorded as ``data["hello"]``; the default hello leaves the key out.
"""

from __future__ import annotations

import ssl
from typing import Any

import trio

from kzprobe import errors as E
from kzprobe.analysis.features import server_hello
from kzprobe.model import STEP_TLS, Observation, now
from kzprobe.probes import hellos
from kzprobe.probes.certs import TrustStore, describe, verify_failure

#: Bytes from the server kept for reading the ServerHello (it comes first and is small).
_KEEP = 16 * 1024


def unverified_context() -> ssl.SSLContext:
    """A non-verifying client context (kept for callers that only want a handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def _chain(obj: ssl.SSLObject) -> list[bytes]:
    # Python < 3.13 has no public API for the full chain; the private one is stable since 3.10.
    # It answers after a failed verification too: OpenSSL keeps the chain it received.
    sslobj = getattr(obj, "_sslobj", None)
    getter = getattr(sslobj, "get_unverified_chain", None)
    if getter is not None:
        try:
            chain = getter()
            if chain:
                import _ssl

                der = _ssl.ENCODING_DER
                return [c.public_bytes(der) if hasattr(c, "public_bytes") else bytes(c) for c in chain]
        except Exception:
            pass
    try:
        leaf = obj.getpeercert(binary_form=True)
    except ValueError:  # no handshake yet
        leaf = None
    return [leaf] if leaf else []


class _Recording(trio.abc.Stream):
    """A transport that keeps the first bytes the server sent (for the ServerHello)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.received = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        room = _KEEP - len(self.received)
        if room > 0:
            self.received += data[:room]
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


def _negotiated(obj: ssl.SSLObject, received: bytes, ctx: ssl.SSLContext) -> dict[str, Any]:
    """Version and cipher of a handshake that stopped at the certificate (from the ServerHello)."""
    version, cid = server_hello(received)
    cipher = (obj.cipher() or (None,))[0]
    if cipher is None and cid is not None:
        cipher = next((c["name"] for c in ctx.get_ciphers() if c["id"] & 0xFFFF == cid), f"0x{cid:04x}")
    return {"version": version, "cipher": cipher}


async def handshake(stream: trio.abc.Stream, target: str, domain: str, address: str, port: int, sni: str,
                    timeout: float, trust: TrustStore, ctx: ssl.SSLContext | None = None, *,
                    purpose: str = "measure", attempt: int = 0, vantage: str = "probe",
                    hello: str = hellos.DEFAULT) -> Observation:
    """Handshake over an open TCP stream; always closes it.

    ``ctx`` defaults to the context of ``hello`` (the trust store's verifying context for the
    default hello); a non-verifying one records the chain with ``cert_valid=None`` (not validated).
    """
    t0 = now()
    data: dict[str, Any] = {"sni": sni}
    if hello != hellos.DEFAULT:
        data["hello"] = hello
    failure: str | None = None
    if ctx is None:
        ctx = trust.handshake_context if hello == hellos.DEFAULT else hellos.shared(hello, trust)
    recording = _Recording(stream)
    try:
        ssl_stream = trio.SSLStream(recording, ctx, server_hostname=sni)
    except ValueError as exc:  # a name the ssl module will not send (too long a label, ...)
        await trio.aclose_forcefully(stream)
        return Observation(step=STEP_TLS, target=target, domain=domain, address=address, port=port, t_start=t0,
                           t_end=now(), failure=E.failure_string(exc), purpose=purpose, attempt=attempt,
                           vantage=vantage, data=data)
    obj = ssl_stream._ssl_object  # the SSLObject: version/cipher/alpn/chain
    try:
        try:
            with trio.fail_after(timeout):
                await ssl_stream.do_handshake()
            valid: bool | None = True if ctx.verify_mode == ssl.CERT_REQUIRED else None
            cert_failure: str | None = None
            data.update(version=obj.version(), cipher=(obj.cipher() or ("",))[0],
                        alpn=obj.selected_alpn_protocol())
        except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            cert_failure = verify_failure(exc)
            if cert_failure is None:
                failure = E.failure_string(exc)
            else:  # the network did its part: say what was negotiated (issue 9)
                data.update(_negotiated(obj, bytes(recording.received), ctx), alpn=obj.selected_alpn_protocol())
            valid = False
        if failure is None:
            certs = [describe(d) for d in _chain(obj)]
            data.update(certificates=certs, cert_valid=valid, cert_failure=cert_failure,
                        issuer=certs[0].get("issuer", "") if certs else "")
    finally:
        with trio.move_on_after(0.5) as cs:
            cs.shield = True
            try:
                await ssl_stream.aclose()
            except (trio.BrokenResourceError, ssl.SSLError, OSError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(stream)
    return Observation(step=STEP_TLS, target=target, domain=domain,
                       address=address, port=port, t_start=t0, t_end=now(), failure=failure,
                       purpose=purpose, attempt=attempt, vantage=vantage, data=data)
