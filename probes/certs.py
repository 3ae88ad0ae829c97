"""One certificate validator for every step: OpenSSL, through the ``ssl`` module.

Why OpenSSL and not a second implementation: the TLS step and the HTTP step (httpx, i.e.
OpenSSL) must never disagree about a chain, and the reference a user compares with (curl,
``openssl verify``, most browsers' behaviour on odd-but-valid chains such as a leaf without an
Authority Key Identifier) is OpenSSL's path building.  An earlier version validated the TLS
step's chain with ``cryptography``'s strict web-PKI policy, which calls such a leaf
``ssl_unknown_authority`` while the HTTP step accepts it: a CDN answer served with one became a
false ``blocked/dns``.

So the TLS step now verifies *in the handshake*, with the context built here, and captures the
chain whether or not it verifies (OpenSSL keeps the peer's chain after a failed verification).
The failure string comes from OpenSSL's X509_V_ERR code through :func:`kzprobe.errors.failure_string`,
the same mapping the HTTP step's certificate errors go through.
"""

from __future__ import annotations

import base64
import ssl
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from kzprobe import errors as E

#: The ALPN offered by the TLS step, as a browser offers it.
ALPN = ["h2", "http/1.1"]


def _name(n: x509.Name) -> str:
    cn = n.get_attributes_for_oid(NameOID.COMMON_NAME)
    org = n.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    parts = [str(a.value) for a in cn + org]
    return ", ".join(parts) or n.rfc4514_string()


def describe(der: bytes) -> dict[str, Any]:
    """A JSON-able summary of one certificate (subject, issuer, SANs, validity, DER)."""
    out: dict[str, Any] = {"der_b64": base64.b64encode(der).decode()}
    try:
        c = x509.load_der_x509_certificate(der)
    except ValueError:
        out["error"] = "unparseable"
        return out
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except (x509.ExtensionNotFound, ValueError):
        names = []
    try:
        out.update(
            subject=_name(c.subject),
            issuer=_name(c.issuer),
            san=names,
            not_before=c.not_valid_before_utc.isoformat(),
            not_after=c.not_valid_after_utc.isoformat(),
            serial=format(c.serial_number, "x"),
        )
    except ValueError:  # a malformed name or date: keep the DER, say so
        out["error"] = "unparseable"
    return out


def verify_failure(exc: BaseException) -> str | None:
    """The OONI failure string when ``exc`` (however wrapped) is a certificate verification error."""
    for e in E.walk(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return E.failure_string(e)
    return None


class TrustStore:
    """The roots a probe trusts: certifi's bundle plus any ``--ca-bundle`` PEM files.

    Every verifying context of a run comes from here, so the TLS step, the HTTP step and the
    helper client trust exactly the same roots with exactly the same OpenSSL flags.
    """

    def __init__(self, extra: list[str | Path] | None = None, *, include_default: bool = True) -> None:
        self.paths: list[Path] = []
        if include_default:
            try:
                import certifi

                self.paths.append(Path(certifi.where()))
            except ImportError:  # pragma: no cover - httpx depends on certifi
                pass
        self.paths.extend(Path(p) for p in (extra or []))

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
        # Pinned to OpenSSL's own defaults (what `openssl verify` and curl do), whatever this
        # Python's defaults are: newer Pythons add X509_STRICT and PARTIAL_CHAIN.
        ctx.verify_flags = ssl.VERIFY_X509_TRUSTED_FIRST
        ctx.hostname_checks_common_name = True
        for p in self.paths:
            ctx.load_verify_locations(cafile=str(p))
        return ctx

    @cached_property
    def handshake_context(self) -> ssl.SSLContext:
        """The TLS step's context: verifying, with a browser's ALPN."""
        ctx = self._context()
        ctx.set_alpn_protocols(ALPN)
        return ctx

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context trusting the same roots (the HTTP step, the helper client)."""
        return self._context()
