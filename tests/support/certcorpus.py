"""A generated corpus of certificate chains for the validator's differential test.

Every chain is built with ``cryptography`` from deterministic keys (EC P-256 private values
derived from a seed), so the corpus is the same on every run.  A chain is: the trust anchors
(the CA file), the certificates a server sends (leaf first, in that order) with the leaf's key,
and the name the client asks for (a DNS name or an IP address).

What varies, because each is a place where two validators have disagreed in practice:
missing SKI/AKI (leaf and CA), critical and non-critical SAN and EKU, EKU for another purpose,
CN-only leaves, intermediates (zero to two), an expired intermediate with a valid cross-signed
alternative, an untrusted path with a trusted alternative, wrong names, wildcards, IP SANs,
unknown and self-signed roots, name constraints (permitted and excluded), CA bits, path length,
expired and not-yet-valid certificates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import random
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID = (dt.datetime(2020, 1, 1, tzinfo=dt.UTC), dt.datetime(2045, 1, 1, tzinfo=dt.UTC))
EXPIRED = (dt.datetime(2018, 1, 1, tzinfo=dt.UTC), dt.datetime(2021, 1, 1, tzinfo=dt.UTC))
FUTURE = (dt.datetime(2044, 1, 1, tzinfo=dt.UTC), dt.datetime(2046, 1, 1, tzinfo=dt.UTC))
#: Lab addresses only (the certificates are data: nothing ever connects to them).
IP_OK, IP_OTHER = "198.51.100.7", "203.0.113.9"


def key(seed: str) -> ec.EllipticCurvePrivateKey:
    value = int.from_bytes(hashlib.sha256(seed.encode()).digest(), "big") % (2**255) + 1
    return ec.derive_private_key(value, ec.SECP256R1())


def _serial(seed: str) -> int:
    return int.from_bytes(hashlib.sha256(b"serial" + seed.encode()).digest()[:16], "big") >> 1


@dataclass
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass
class Spec:
    """One certificate's shape; defaults are a conventional, valid certificate."""

    cn: str
    ca: bool = False
    ski: bool = True
    aki: bool = True
    san: list[str] | None = None  # DNS names or IP literals; None: no SAN extension
    san_critical: bool = False
    eku: list[str] | None = None  # "server" | "client"; None: no EKU extension
    eku_critical: bool = False
    basic_constraints: bool = True
    bc_critical: bool = True
    key_usage: bool = True
    pathlen: int | None = None
    permitted: list[str] | None = None  # name constraints (DNS subtrees)
    excluded: list[str] | None = None
    validity: tuple[dt.datetime, dt.datetime] = VALID


def build(spec: Spec, seed: str, issuer: Issuer | None) -> Issuer:
    """A certificate for ``spec`` with the key for ``seed``, signed by ``issuer`` (None: self-signed)."""
    k = key(seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.cn)])
    signer_key = issuer.key if issuer else k
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer.cert.subject if issuer else name)
         .public_key(k.public_key()).serial_number(_serial(seed + spec.cn + str(spec.validity)))
         .not_valid_before(spec.validity[0]).not_valid_after(spec.validity[1]))
    if spec.basic_constraints:
        b = b.add_extension(x509.BasicConstraints(ca=spec.ca, path_length=spec.pathlen if spec.ca else None),
                            critical=spec.bc_critical)
    if spec.key_usage:
        if spec.ca:
            ku = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                               data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                               encipher_only=False, decipher_only=False)
        else:
            ku = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                               data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                               encipher_only=False, decipher_only=False)
        b = b.add_extension(ku, critical=True)
    if spec.ski:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
    if spec.aki and issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                            critical=False)
    if spec.san is not None:
        names: list[x509.GeneralName] = []
        for n in spec.san:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                names.append(x509.DNSName(n))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=spec.san_critical)
    if spec.eku is not None:
        oids = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
        b = b.add_extension(x509.ExtendedKeyUsage([oids[e] for e in spec.eku]), critical=spec.eku_critical)
    if spec.permitted is not None or spec.excluded is not None:
        b = b.add_extension(x509.NameConstraints(
            permitted_subtrees=[x509.DNSName(n) for n in spec.permitted] if spec.permitted else None,
            excluded_subtrees=[x509.DNSName(n) for n in spec.excluded] if spec.excluded else None), critical=True)
    return Issuer(b.sign(signer_key, hashes.SHA256()), k)


def pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass
class Chain:
    name: str
    trusted: list[x509.Certificate]
    sent: list[x509.Certificate]  # leaf first
    leaf_key: ec.EllipticCurvePrivateKey
    host: str  # what the client asks for: a DNS name or an IP literal
    tags: set[str] = field(default_factory=set)

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


class _Roots:
    def __init__(self) -> None:
        root = Spec("Corpus Root R1", ca=True)
        self.r1 = build(root, "root-r1", None)
        self.r2 = build(Spec("Corpus Root R2", ca=True), "root-r2", None)
        self.unknown = build(Spec("Unknown Root", ca=True), "root-unknown", None)
        self.r1_no_ski = build(Spec("Corpus Root R3 no SKI", ca=True, ski=False), "root-r3", None)


# Leaf name shapes: (SAN list or None for CN-only, CN, host asked, tag)
_NAMES: list[tuple[list[str] | None, str, str, str]] = [
    (["site.test"], "site.test", "site.test", "name-ok"),
    (["site.test", "www.site.test"], "site.test", "www.site.test", "name-second-san"),
    (["site.test"], "site.test", "other.test", "wrong-name"),
    (["*.wild.test"], "wild", "a.wild.test", "wildcard"),
    (["*.wild.test"], "wild", "a.b.wild.test", "wildcard-too-deep"),
    (["*.wild.test"], "wild", "wild.test", "wildcard-apex"),
    ([IP_OK], "ip", IP_OK, "ip-san"),
    ([IP_OK], "ip", IP_OTHER, "ip-wrong"),
    (["site.test"], "site.test", IP_OK, "ip-asked-dns-san"),
    (None, "site.test", "site.test", "cn-only"),
    (None, "site.test", "other.test", "cn-only-wrong"),
    (["other.test"], "site.test", "site.test", "cn-not-in-san"),
]


def _leaf_spec(rng: random.Random, san: list[str] | None, cn: str, tags: set[str]) -> Spec:
    s = Spec(cn, san=san)
    s.ski = rng.random() < 0.6
    s.aki = rng.random() < 0.6
    s.san_critical = san is not None and rng.random() < 0.4
    eku = rng.choice(["none", "server", "server", "server-critical", "client", "both"])
    s.eku = {"none": None, "server": ["server"], "server-critical": ["server"], "client": ["client"],
             "both": ["server", "client"]}[eku]
    s.eku_critical = eku == "server-critical" or (eku == "both" and rng.random() < 0.5)
    s.bc_critical = rng.random() < 0.5
    s.basic_constraints = rng.random() < 0.85
    s.key_usage = rng.random() < 0.8
    v = rng.random()
    if v < 0.05:
        s.validity, _ = EXPIRED, tags.add("leaf-expired")
    elif v < 0.08:
        s.validity, _ = FUTURE, tags.add("leaf-future")
    tags.update({f"leaf-eku-{eku}", "leaf-no-ski" if not s.ski else "leaf-ski",
                 "leaf-no-aki" if not s.aki else "leaf-aki",
                 "san-critical" if s.san_critical else "san-noncritical"})
    return s


def _ca_spec(rng: random.Random, cn: str, tags: set[str], host: str) -> Spec:
    s = Spec(cn, ca=True)
    s.ski = rng.random() < 0.7
    s.aki = rng.random() < 0.7
    if not s.ski:
        tags.add("ca-no-ski")
    if not s.aki:
        tags.add("ca-no-aki")
    r = rng.random()
    if r < 0.08:
        s.ca, _ = False, tags.add("ca-bit-missing")
    elif r < 0.12:
        s.basic_constraints, _ = False, tags.add("ca-no-basic-constraints")
    elif r < 0.18:
        s.eku, _ = ["client"], tags.add("ca-eku-client")
    elif r < 0.24:
        s.eku, _ = ["server"], tags.add("ca-eku-server")
    elif r < 0.32:
        zone = host.split(".", 1)[-1] if "." in host and not host[0].isdigit() else "site.test"
        s.permitted, _ = [zone], tags.add("name-constraints-permitted")
    elif r < 0.38:
        s.permitted, _ = ["elsewhere.test"], tags.add("name-constraints-outside")
    elif r < 0.44:
        s.excluded, _ = ["site.test"], tags.add("name-constraints-excluded")
    elif r < 0.48:
        s.validity, _ = EXPIRED, tags.add("ca-expired")
    return s


def corpus(seed: int = 9, random_chains: int = 216) -> list[Chain]:
    rng = random.Random(seed)
    roots = _Roots()
    out: list[Chain] = []
    for i in range(random_chains):
        san, cn, host, ntag = _NAMES[i % len(_NAMES)]
        tags = {ntag}
        depth = rng.choice([0, 1, 1, 2])
        root_kind = rng.random()
        if root_kind < 0.1:
            root, trusted, tags = roots.unknown, [roots.r1.cert], tags | {"unknown-root"}
        elif root_kind < 0.2:
            root, trusted, tags = roots.r1_no_ski, [roots.r1_no_ski.cert], tags | {"root-no-ski"}
        else:
            root, trusted = roots.r1, [roots.r1.cert]
        issuer, cas = root, []
        for d in range(depth):
            ca = build(_ca_spec(rng, f"Corpus CA {i}.{d}", tags, host), f"ca-{i}-{d}", issuer)
            cas.insert(0, ca.cert)
            issuer = ca
        leaf = build(_leaf_spec(rng, san, cn, tags), f"leaf-{i}", issuer)
        sent = [leaf.cert, *cas]
        if rng.random() < 0.15:
            sent.append(root.cert)
            tags.add("root-sent")
        if depth == 0 and root is roots.unknown and rng.random() < 0.5:
            # A self-signed leaf: the classic "unknown authority" of a broken site.
            leaf = build(Spec(cn, san=san), f"selfsigned-{i}", None)
            sent, tags = [leaf.cert], tags | {"self-signed-leaf"}
        out.append(Chain(f"random-{i:03d}-{ntag}", trusted, sent, leaf.key, host, tags))
    out.extend(_cross_signed(roots))
    return out


def _cross_signed(roots: _Roots) -> list[Chain]:
    """An intermediate whose one certificate expired while a cross-signed one is valid, and an
    untrusted path beside a trusted one: OpenSSL's path building must find the good path."""
    ikey_seed = "inter-x"
    i_expired = build(Spec("Inter X", ca=True, validity=EXPIRED), ikey_seed, roots.r1)
    i_cross = build(Spec("Inter X", ca=True), ikey_seed, roots.r2)
    i_by_unknown = build(Spec("Inter X", ca=True), ikey_seed, roots.unknown)
    i_r1 = build(Spec("Inter X", ca=True), ikey_seed, roots.r1)
    out = []
    for aki in (True, False):
        leaf = build(Spec("site.test", san=["site.test"], eku=["server"], aki=aki), f"cross-leaf-{aki}", i_cross)
        k = leaf.key
        t = {"cross-signed"} | ({"leaf-no-aki"} if not aki else set())
        both = [roots.r1.cert, roots.r2.cert]
        out += [
            Chain(f"cross-expired-only-{aki}", both, [leaf.cert, i_expired.cert], k, "site.test",
                  t | {"expired-intermediate"}),
            Chain(f"cross-expired-first-{aki}", both, [leaf.cert, i_expired.cert, i_cross.cert], k, "site.test",
                  t | {"expired-intermediate", "alternate-path"}),
            Chain(f"cross-valid-first-{aki}", both, [leaf.cert, i_cross.cert, i_expired.cert], k, "site.test",
                  t | {"expired-intermediate", "alternate-path"}),
            Chain(f"cross-r1-only-trusted-{aki}", [roots.r1.cert], [leaf.cert, i_expired.cert, i_cross.cert], k,
                  "site.test", t | {"expired-intermediate"}),
            Chain(f"cross-r2-only-trusted-{aki}", [roots.r2.cert], [leaf.cert, i_expired.cert, i_cross.cert], k,
                  "site.test", t | {"alternate-path"}),
            Chain(f"untrusted-path-then-trusted-{aki}", both,
                  [leaf.cert, i_by_unknown.cert, roots.unknown.cert, i_r1.cert], k, "site.test",
                  t | {"alternate-path", "unknown-root"}),
            Chain(f"untrusted-path-only-{aki}", both, [leaf.cert, i_by_unknown.cert, roots.unknown.cert], k,
                  "site.test", t | {"unknown-root"}),
        ]
    return out
