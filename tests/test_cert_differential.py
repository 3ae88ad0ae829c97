"""The TLS step's certificate verdict agrees with ``openssl verify`` on a generated corpus.

Each chain of :mod:`kzprobe.tests.support.certcorpus` is served by a real TLS server (over an
in-memory stream) to the real TLS step, and checked with the ``openssl verify`` CLI
(``-purpose sslserver`` with ``-verify_hostname`` or ``-verify_ip``) against the same trust
anchors and the same untrusted certificates.  Valid/invalid must agree, and the failure string
must be OONI's name for OpenSSL's first error.  The expected strings come from OpenSSL's error
codes (the table below, from x509_vfy.h and OONI's netxlite vocabulary), never from kzprobe.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization

from kzprobe.probes import tls as tlsprobe
from kzprobe.probes.certs import TrustStore
from kzprobe.tests.support.certcorpus import Chain, corpus, pem

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

#: X509_V_ERR codes that mean "no path to a trusted root" (OONI: ssl_unknown_authority).
UNKNOWN_AUTHORITY = {2: "UNABLE_TO_GET_ISSUER_CERT", 18: "DEPTH_ZERO_SELF_SIGNED_CERT",
                     19: "SELF_SIGNED_CERT_IN_CHAIN", 20: "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
                     21: "UNABLE_TO_VERIFY_LEAF_SIGNATURE", 27: "CERT_UNTRUSTED"}
#: ... "the certificate is for another name" (OONI: ssl_invalid_hostname).
HOSTNAME = {62: "HOSTNAME_MISMATCH", 64: "IP_ADDRESS_MISMATCH"}
_ERROR = re.compile(r"^error (\d+) at (\d+) depth lookup", re.M)


def ooni_string(code: int) -> str:
    if code in UNKNOWN_AUTHORITY:
        return "ssl_unknown_authority"
    if code in HOSTNAME:
        return "ssl_invalid_hostname"
    return "ssl_invalid_certificate"  # expired, bad purpose, name constraints, not a CA ...


def openssl_verdict(chain: Chain, tmp: Path) -> tuple[bool, str | None, int | None]:
    ca, untrusted, leaf = tmp / "ca.pem", tmp / "untrusted.pem", tmp / "leaf.pem"
    ca.write_bytes(pem(chain.trusted))
    untrusted.write_bytes(pem(chain.sent[1:]))
    leaf.write_bytes(pem(chain.sent[:1]))
    cmd = ["openssl", "verify", "-no-CApath", "-no-CAstore", "-CAfile", str(ca), "-purpose", "sslserver",
           "-verify_ip" if chain.is_ip else "-verify_hostname", chain.host]
    if len(chain.sent) > 1:
        cmd += ["-untrusted", str(untrusted)]
    p = subprocess.run([*cmd, str(leaf)], capture_output=True, text=True, timeout=30)
    out = p.stdout + p.stderr
    first = _ERROR.search(out)
    if p.returncode == 0 and first is None:
        return True, None, None
    assert first is not None, out
    code = int(first.group(1))
    return False, ooni_string(code), code


async def kzprobe_verdict(chain: Chain, trust: TrustStore, tmp: Path) -> Any:
    """The real TLS step against a real TLS server presenting ``chain.sent``."""
    cert_file, key_file = tmp / "server.pem", tmp / "server.key"
    cert_file.write_bytes(pem(chain.sent))
    key_file.write_bytes(chain.leaf_key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(cert_file), str(key_file))
    client_end, server_end = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_end, sctx, server_side=True)
    result: list[Any] = []

    async def serve() -> None:
        try:
            await server.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError):
            pass  # the client rejected the chain

    async def probe() -> None:
        result.append(await tlsprobe.handshake(client_end, "https://x/", chain.host, "127.0.0.1", 443,
                                               chain.host, 5.0, trust))

    async with trio.open_nursery() as n:
        n.start_soon(serve)
        n.start_soon(probe)
    return result[0]


@pytest.fixture(scope="module")
def chains() -> list[Chain]:
    return corpus()


@pytest.fixture(scope="module")
def reference(chains: list[Chain], tmp_path_factory: pytest.TempPathFactory
              ) -> list[tuple[bool, str | None, int | None]]:
    """``openssl verify``'s verdict on every chain (computed once for the module)."""
    tmp = tmp_path_factory.mktemp("openssl")
    return [openssl_verdict(c, tmp) for c in chains]


def disagreements(chains: list[Chain], reference: list[tuple[bool, str | None, int | None]], tmp: Path,
                  store: type[TrustStore] = TrustStore) -> list[str]:
    out = []
    ca = tmp / "ca.pem"
    for chain, (want_valid, want_failure, code) in zip(chains, reference, strict=True):
        ca.write_bytes(pem(chain.trusted))
        obs = trio.run(kzprobe_verdict, chain, store([ca], include_default=False), tmp)
        got = (obs.failure, obs.data.get("cert_valid"), obs.data.get("cert_failure"))
        if got != (None, want_valid, want_failure):
            out.append(f"{chain.name} {sorted(chain.tags)}: openssl {want_valid} {want_failure} (code {code}); "
                       f"kzprobe {got}")
        # The chain as the server sent it is what is recorded, valid or not.
        assert len(obs.data["certificates"]) == len(chain.sent), chain.name
    return out


def test_corpus_covers_the_cases(chains: list[Chain], reference: list[tuple[bool, str | None, int | None]]) -> None:
    tags = Counter(t for c in chains for t in c.tags)
    assert len(chains) >= 200
    for needed in ("leaf-no-aki", "leaf-no-ski", "ca-no-aki", "ca-no-ski", "san-critical", "san-noncritical",
                   "leaf-eku-server-critical", "leaf-eku-server", "leaf-eku-client", "expired-intermediate",
                   "alternate-path", "wrong-name", "wildcard", "wildcard-too-deep", "ip-san", "ip-wrong",
                   "unknown-root", "name-constraints-permitted", "name-constraints-outside",
                   "name-constraints-excluded", "cn-only", "ca-bit-missing", "self-signed-leaf"):
        assert tags[needed] >= 1, needed
    # The corpus exercises every outcome, or agreement would prove little.
    outcomes = Counter(failure or "valid" for _, failure, _ in reference)
    assert outcomes["valid"] >= 30 and outcomes["ssl_unknown_authority"] >= 10, outcomes
    assert outcomes["ssl_invalid_hostname"] >= 10 and outcomes["ssl_invalid_certificate"] >= 10, outcomes


def test_tls_step_agrees_with_openssl_verify(chains: list[Chain], reference: list[tuple[bool, str | None, int | None]],
                                             tmp_path: Path) -> None:
    found = disagreements(chains, reference, tmp_path)
    assert not found, "\n".join(found[:20])


class _StrictStore(TrustStore):
    """What Python 3.13's default context would do: RFC 5280 strictness (X509_STRICT)."""

    def _context(self) -> ssl.SSLContext:
        ctx = super()._context()
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        return ctx


def test_the_comparison_can_fail(chains: list[Chain], reference: list[tuple[bool, str | None, int | None]],
                                 tmp_path: Path) -> None:
    """A validator with another policy (strict RFC 5280, which rejects a leaf without AKI as
    Python 3.13's defaults would) is caught on the corpus."""
    found = disagreements(chains, reference, tmp_path, _StrictStore)
    assert len(found) >= 5 and any("leaf-no-aki" in d for d in found), found
