"""Offline certificate validation, so the TLS step can record the chain even when it is bad.

The TLS probe handshakes *without* verification (otherwise an interception certificate would
abort the handshake before we could see who issued it) and then validates the chain here,
against the trust store, with the ``cryptography`` package's X.509 path validation.
"""

from __future__ import annotations

import base64
import datetime as dt
import ssl
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from kzprobe import errors as E
from kzprobe.analysis.bogons import is_ip


def _policy(when: dt.datetime) -> PolicyBuilder:
    """Web PKI path validation, relaxed on extension *criticality* the way OpenSSL is.

    cryptography's default policy is strict RFC 5280 (a critical SAN beside a non-empty
    subject, or a critical EKU, fails); browsers and OpenSSL accept both, and so do we, so that
    "invalid" means what a user's browser would say.
    """
    ee = (ExtensionPolicy.webpki_defaults_ee()
          .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
          .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None))
    return PolicyBuilder().time(when).extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)


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
    except x509.ExtensionNotFound:
        names = []
    out.update(
        subject=_name(c.subject),
        issuer=_name(c.issuer),
        san=names,
        not_before=c.not_valid_before_utc.isoformat(),
        not_after=c.not_valid_after_utc.isoformat(),
        serial=format(c.serial_number, "x"),
    )
    return out


class TrustStore:
    """The roots a probe trusts: certifi's bundle plus any ``--ca-bundle`` PEM files."""

    def __init__(self, extra: list[str | Path] | None = None, *, include_default: bool = True) -> None:
        self.paths: list[Path] = []
        if include_default:
            try:
                import certifi

                self.paths.append(Path(certifi.where()))
            except ImportError:  # pragma: no cover - httpx depends on certifi
                pass
        self.paths.extend(Path(p) for p in (extra or []))

    @cached_property
    def roots(self) -> list[x509.Certificate]:
        certs: list[x509.Certificate] = []
        import warnings

        for p in self.paths:
            with warnings.catch_warnings():
                # certifi ships a few roots with non-positive serials; they still validate.
                warnings.simplefilter("ignore")
                certs.extend(x509.load_pem_x509_certificates(p.read_bytes()))
        return certs

    @cached_property
    def store(self) -> Store:
        return Store(self.roots)

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context trusting the same roots (for the HTTP step)."""
        ctx = ssl.create_default_context()
        for p in self.paths:
            ctx.load_verify_locations(cafile=str(p))
        return ctx

    def validate(self, chain_der: list[bytes], hostname: str) -> tuple[bool, str | None]:
        """(valid, failure string) for a chain (leaf first) presented for ``hostname``."""
        if not chain_der:
            return False, E.SSL_INVALID_CERTIFICATE
        try:
            leaf = x509.load_der_x509_certificate(chain_der[0])
            inter = [x509.load_der_x509_certificate(d) for d in chain_der[1:]]
        except ValueError:
            return False, E.SSL_INVALID_CERTIFICATE
        when = dt.datetime.now(dt.UTC)
        if not (leaf.not_valid_before_utc <= when <= leaf.not_valid_after_utc):
            return False, E.SSL_INVALID_CERTIFICATE
        try:
            subject = x509.DNSName(hostname) if not is_ip(hostname) else x509.IPAddress(_ip(hostname))
            verifier = _policy(when).store(self.store).build_server_verifier(subject)
            verifier.verify(leaf, inter)
            return True, None
        except VerificationError:
            pass
        except ValueError:
            return False, E.SSL_INVALID_CERTIFICATE
        # Tell "wrong name" from "untrusted issuer": validate again for a name the leaf does carry.
        names = describe(chain_der[0]).get("san") or []
        for alt in names:
            if "*" in alt:
                alt = alt.replace("*", "x", 1)
            try:
                v = _policy(when).store(self.store).build_server_verifier(x509.DNSName(alt))
                v.verify(leaf, inter)
                return False, E.SSL_INVALID_HOSTNAME
            except (VerificationError, ValueError):
                break
        return False, E.SSL_UNKNOWN_AUTHORITY


def _ip(s: str) -> Any:
    import ipaddress

    return ipaddress.ip_address(s)
