"""TLS step: a handshake with a chosen SNI on ``trio.SSLStream``, recording the chain.

The handshake is made without verification so that a bad chain (interception, wrong name,
unknown CA) is still seen and recorded; validation happens offline in :mod:`certs`.
"""

from __future__ import annotations

import ssl
from typing import Any

import trio

from kzprobe import errors as E
from kzprobe.model import STEP_TLS, Observation, now
from kzprobe.probes.certs import TrustStore, describe


def unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def _chain(obj: ssl.SSLObject) -> list[bytes]:
    # Python < 3.13 has no public API for the full chain; the private one is stable since 3.10.
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
    leaf = obj.getpeercert(binary_form=True)
    return [leaf] if leaf else []


async def handshake(stream: trio.abc.Stream, target: str, domain: str, address: str, port: int, sni: str,
                    timeout: float, trust: TrustStore, ctx: ssl.SSLContext, *, purpose: str = "measure",
                    attempt: int = 0, vantage: str = "probe") -> Observation:
    """Handshake over an open TCP stream; always closes it."""
    t0 = now()
    data: dict[str, Any] = {"sni": sni}
    failure: str | None = None
    ssl_stream = trio.SSLStream(stream, ctx, server_hostname=sni)
    try:
        with trio.fail_after(timeout):
            await ssl_stream.do_handshake()
        obj = ssl_stream._ssl_object  # the SSLObject: version/cipher/alpn/chain
        chain = _chain(obj)
        valid, cert_failure = trust.validate(chain, sni)
        certs = [describe(d) for d in chain]
        data.update(
            version=obj.version(),
            cipher=(obj.cipher() or ("",))[0],
            alpn=obj.selected_alpn_protocol(),
            certificates=certs,
            cert_valid=valid,
            cert_failure=cert_failure,
            issuer=certs[0].get("issuer", "") if certs else "",
        )
    except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        failure = E.failure_string(exc)
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
