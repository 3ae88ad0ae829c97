"""The lab's certificates, shaped like the web PKI rather than like a test fixture.

* ``kzprobe lab Root CA`` is the only trust anchor (``ca.pem``, what the probe and the helper
  get as ``--ca-bundle``).  It signs no leaf itself: as on the web, leaves come from an
  intermediate, ``kzprobe lab Issuing CA 1``, which servers send after the leaf.
* One cross-signed path: ``kzprobe lab Root R2`` is a second root whose self-signed certificate is
  in nobody's bundle; it is cross-signed by the lab root (same subject and key, issuer = lab root),
  and R2 signs ``kzprobe lab Issuing CA R2a``.  A server on that path sends leaf, R2a and the
  cross-signed R2, and a client reaches the lab root through the cross-certificate (Let's
  Encrypt's ISRG Root X1 under DST Root CA X3 was this shape).
* Leaf profiles (a site's ``cert`` key): ``intermediate`` (SKI and AKI, the default),
  ``no-aki`` (SKI only), ``no-ski-aki`` (neither; OpenSSL, curl and browsers accept both),
  ``cross-signed`` (the R2 path).
* The interception CA, "Qaznet Trust Network", mirrors Kazakhstan's national certificate: a root
  with an intermediate, trusted by nobody but those who installed it.

EC P-256 keys: a scenario of 100+ sites issues 100+ leaves, and RSA key generation would make
``lab up`` take seconds per site.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Leaf profiles a scenario may ask for (Site.cert).
PROFILES = ("intermediate", "no-aki", "no-ski-aki", "cross-signed")

_Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Authority:
    key: _Key
    cert: x509.Certificate
    #: What a server sends after a leaf this authority issued (the authority itself and above,
    #: without the trust anchor), in order.
    chain: tuple[x509.Certificate, ...]


def _new_key() -> _Key:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, org: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "KZ"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))


def ca_cert(subject: x509.Name, key: _Key, issuer: Authority | None, *, path_length: int | None) -> x509.Certificate:
    """A CA certificate; self-signed when ``issuer`` is None."""
    pub = key.public_key()
    b = x509.CertificateBuilder().subject_name(subject).public_key(pub).serial_number(x509.random_serial_number())
    b = _validity(b, 3650)
    b = b.issuer_name(issuer.cert.subject if issuer else subject)
    b = b.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
    b = b.add_extension(x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
    ), critical=True)
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
    signer = issuer.key if issuer else key
    b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    return b.sign(signer, hashes.SHA256())


def root(cn: str, org: str) -> Authority:
    key = _new_key()
    return Authority(key, ca_cert(_name(cn, org), key, None, path_length=None), ())


def intermediate(cn: str, org: str, issuer: Authority, key: _Key | None = None) -> Authority:
    key = key or _new_key()
    cert = ca_cert(_name(cn, org), key, issuer, path_length=0 if issuer.chain == () else None)
    return Authority(key, cert, (cert, *issuer.chain))


def leaf(names: Iterable[str], issuer: Authority, *, ski: bool = True,
         aki: bool = True) -> tuple[x509.Certificate, _Key]:
    names = list(names)
    key = _new_key()
    pub = key.public_key()
    b = x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
    b = _validity(b.issuer_name(issuer.cert.subject).public_key(pub).serial_number(x509.random_serial_number()), 397)
    b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    b = b.add_extension(x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    ), critical=True)
    b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    if ski:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
    if aki:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                            critical=False)
    return b.sign(issuer.key, hashes.SHA256()), key


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: _Key | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class LabPki:
    """Every authority of one lab instance; ``issue`` writes a leaf's chain and key to disk."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root = root("kzprobe lab Root CA", "kzprobe lab")
        self.issuing = intermediate("kzprobe lab Issuing CA 1", "kzprobe lab", self.root)
        # The cross-signed path: R2's key, certified by the lab root instead of by itself.
        r2_key = _new_key()
        r2_name = _name("kzprobe lab Root R2", "kzprobe lab")
        self.r2_self = Authority(r2_key, ca_cert(r2_name, r2_key, None, path_length=None), ())
        r2_cross = ca_cert(r2_name, r2_key, self.root, path_length=None)
        r2 = Authority(r2_key, r2_cross, (r2_cross,))
        self.r2_issuing = intermediate("kzprobe lab Issuing CA R2a", "kzprobe lab", r2)
        self.qaznet_root = root("Qaznet Trust Network", "Qaznet Trust Network")
        self.qaznet = intermediate("Qaznet Trust Network Issuing CA", "Qaznet Trust Network", self.qaznet_root)

    def write_anchors(self, ca_path: Path, interception_ca_path: Path) -> None:
        ca_path.write_bytes(pem(self.root.cert))
        interception_ca_path.write_bytes(pem(self.qaznet_root.cert))

    def issue(self, label: str, names: Iterable[str], profile: str = "intermediate", *,
              interception: bool = False) -> list[str]:
        """Write ``label.pem`` (leaf + chain, as a server sends it) and ``label.key``; return both paths."""
        if profile not in PROFILES:
            raise ValueError(f"unknown certificate profile {profile!r} (known: {', '.join(PROFILES)})")
        if interception:
            issuer = self.qaznet
        elif profile == "cross-signed":
            issuer = self.r2_issuing
        else:
            issuer = self.issuing
        cert, key = leaf(names, issuer, ski=profile != "no-ski-aki", aki=profile not in ("no-aki", "no-ski-aki"))
        cert_p, key_p = self.dir / f"{label}.pem", self.dir / f"{label}.key"
        cert_p.write_bytes(pem(cert, *issuer.chain))
        key_p.write_bytes(key_pem(key))
        key_p.chmod(0o600)
        return [str(cert_p), str(key_p)]


# -- Tor relays' link certificates ------------------------------------------------------------------
def _tor_hostname(rng: random.Random, tld: str) -> str:
    # Tor's crypto_random_hostname(8, 20, "www.", tld): base32 letters and digits.
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "www." + "".join(rng.choice(alphabet) for _ in range(rng.randint(8, 20))) + tld


def tor_link(directory: Path, label: str, rng: random.Random | None = None) -> list[str]:
    """A relay's TLS certificates as Tor makes them (tortls.c/x509.c): the link certificate's
    subject is a random ``www.<random>.net``, issued by a random ``www.<random>.com`` that is the
    relay's identity certificate (self-signed by the identity key); no extensions, a random 8-byte
    serial, validity starting on a day boundary in the past and short (Tor picks 5 days to a
    year; the lab takes 5 to 30 days).  Neither name is in any DNS and no CA is involved, which is
    what a TLS fingerprint of Tor's handshake keys on besides the ClientHello.

    Keys are RSA-2048 for both (Tor's identity key is RSA-1024, which OpenSSL 3's default security
    level refuses to use in a server's chain).  Writes ``label.pem`` (the link certificate),
    ``label.key`` and ``label-chain.pem`` (the identity certificate, sent after the link one);
    returns the three paths in that order."""
    rng = rng or random.Random()
    identity_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    link_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _tor_hostname(rng, ".com"))])
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _tor_hostname(rng, ".net"))])
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    lifetime = dt.timedelta(days=rng.randint(5, 30))
    start = now - dt.timedelta(seconds=rng.randint(0, int(lifetime.total_seconds()) - 2 * 86400))
    start = start.replace(hour=0, minute=0, second=0)

    def cert(name: x509.Name, key: rsa.RSAPrivateKey) -> x509.Certificate:
        b = x509.CertificateBuilder().subject_name(name).issuer_name(issuer).public_key(key.public_key())
        b = b.serial_number(int.from_bytes(rng.randbytes(8), "big") >> 1 or 1)
        return b.not_valid_before(start).not_valid_after(start + lifetime).sign(identity_key, hashes.SHA256())

    link = cert(subject, link_key)
    identity = cert(issuer, identity_key)
    directory.mkdir(parents=True, exist_ok=True)
    cert_p, key_p, chain_p = directory / f"{label}.pem", directory / f"{label}.key", directory / f"{label}-chain.pem"
    cert_p.write_bytes(pem(link))
    chain_p.write_bytes(pem(identity))
    key_p.write_bytes(key_pem(link_key))
    key_p.chmod(0o600)
    return [str(cert_p), str(key_p), str(chain_p)]
