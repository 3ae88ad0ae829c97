"""The lab's PKI is shaped like the web's: leaves from an intermediate, leaves with and without
key identifiers, a cross-signed path; ``openssl verify`` (what curl and browsers build on) accepts
every server chain against the lab root alone.  No root needed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from kzprobe.lab.pki import PROFILES, LabPki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def certs_of(path: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def verify(tmp: Path, chain: str, anchor: Path, name: str) -> subprocess.CompletedProcess[str]:
    certs = Path(chain).read_bytes().split(b"-----END CERTIFICATE-----\n")
    leaf, rest = tmp / "leaf.pem", tmp / "untrusted.pem"
    leaf.write_bytes(certs[0] + b"-----END CERTIFICATE-----\n")
    rest.write_bytes(b"".join(c + b"-----END CERTIFICATE-----\n" for c in certs[1:] if c.strip()))
    return subprocess.run(["openssl", "verify", "-CAfile", str(anchor), "-untrusted", str(rest),
                           "-verify_hostname", name, "-purpose", "sslserver", str(leaf)],
                          capture_output=True, text=True)


def has(cert: x509.Certificate, ext: type[x509.ExtensionType]) -> bool:
    try:
        cert.extensions.get_extension_for_class(ext)
    except x509.ExtensionNotFound:
        return False
    return True


def test_every_profile_verifies_against_the_root_alone(tmp_path: Path) -> None:
    pki = LabPki(tmp_path / "certs")
    ca, qaznet = tmp_path / "ca.pem", tmp_path / "qaznet.pem"
    pki.write_anchors(ca, qaznet)
    assert len(certs_of(str(ca))) == 1 and certs_of(str(ca))[0].subject == certs_of(str(ca))[0].issuer
    for profile in PROFILES:
        chain, _key = pki.issue(profile, ["ratel.kz", "www.ratel.kz"], profile)
        p = verify(tmp_path, chain, ca, "www.ratel.kz")
        assert p.returncode == 0 and ": OK" in p.stdout, (profile, p.stdout, p.stderr)
        leaf, *intermediates = certs_of(chain)
        assert intermediates, profile  # the server sends its chain, never the leaf alone
        assert leaf.issuer != certs_of(str(ca))[0].subject, profile  # never signed by the root itself
        assert has(leaf, x509.SubjectKeyIdentifier) == (profile != "no-ski-aki"), profile
        assert has(leaf, x509.AuthorityKeyIdentifier) == (profile in ("intermediate", "cross-signed")), profile
        # A wrong name fails: the check is real.
        assert verify(tmp_path, chain, ca, "example.org").returncode != 0


def test_cross_signed_path_needs_the_cross_certificate(tmp_path: Path) -> None:
    pki = LabPki(tmp_path / "certs")
    ca, qaznet = tmp_path / "ca.pem", tmp_path / "qaznet.pem"
    pki.write_anchors(ca, qaznet)
    chain, _ = pki.issue("x", ["kaspi.kz"], "cross-signed")
    _leaf, issuing, cross = certs_of(chain)
    # R2's certificate in the chain has R2's subject and key but the lab root as issuer.
    assert cross.subject == pki.r2_self.cert.subject and cross.issuer == pki.root.cert.subject
    assert cross.public_key() == pki.r2_self.cert.public_key() and issuing.issuer == cross.subject
    # Without the cross-certificate the path stops at R2, which nobody trusts.
    Path(chain).write_bytes(Path(chain).read_bytes().rsplit(b"-----BEGIN CERTIFICATE-----", 1)[0])
    assert verify(tmp_path, chain, ca, "kaspi.kz").returncode != 0


def test_interception_ca_is_not_the_lab_root(tmp_path: Path) -> None:
    pki = LabPki(tmp_path / "certs")
    ca, qaznet = tmp_path / "ca.pem", tmp_path / "qaznet.pem"
    pki.write_anchors(ca, qaznet)
    chain, _ = pki.issue("m", ["ratel.kz"], interception=True)
    assert "Qaznet Trust Network" in certs_of(chain)[1].issuer.rfc4514_string()
    assert verify(tmp_path, chain, ca, "ratel.kz").returncode != 0
    assert verify(tmp_path, chain, qaznet, "ratel.kz").returncode == 0
