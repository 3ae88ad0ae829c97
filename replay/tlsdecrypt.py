"""TLS 1.3 application data in a capture, decrypted with the secrets the capture carries.

A capture holds HTTPS pages only as ciphertext: a blockpage served behind a bad certificate, or
a body's rate as HTTP sees it, cannot be read from it.  A client that logged its TLS secrets
(``SSLKEYLOGFILE``, the NSS key log format every browser, curl and Python's ``ssl`` write) makes
them readable, and pcapng keeps those secrets inside the capture, in Decryption Secrets Blocks
(``editcap --inject-secrets tls,KEYLOG``), as Wireshark reads them.  ``kzprobe lab record``
writes its fixtures that way.

Only TLS 1.3 is decrypted (the suites of RFC 8446: AES-128/256-GCM, ChaCha20-Poly1305): its
traffic keys come straight from the logged traffic secrets.  A TLS 1.2 session (its key log line
is CLIENT_RANDOM and the master secret, from which keys need the 1.2 PRF and the negotiated
suite's key block) stays ciphertext, as does any flow whose client random the log lacks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Bytes of key log kept per capture (a line is ~180 bytes: tens of thousands of sessions).
MAX_KEYLOG = 16 << 20
#: TLS 1.3 secrets a client logs, by the direction and phase they protect.
_LABELS = ("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0",
           "SERVER_TRAFFIC_SECRET_0")
#: cipher suite -> (hash name, key length, AEAD name)
_SUITES = {0x1301: ("sha256", 16, "aesgcm"), 0x1302: ("sha384", 32, "aesgcm"), 0x1303: ("sha256", 32, "chacha")}


def parse_keylog(blobs: Iterable[bytes]) -> dict[bytes, dict[str, bytes]]:
    """client random -> {label: secret} from NSS key log text (malformed lines are skipped)."""
    out: dict[bytes, dict[str, bytes]] = {}
    for blob in blobs:
        for line in blob.splitlines():
            parts = line.strip().split()
            if len(parts) != 3 or parts[0].startswith(b"#"):
                continue
            label = parts[0].decode("ascii", "replace")
            if label not in _LABELS:
                continue
            try:
                cr, secret = bytes.fromhex(parts[1].decode("ascii")), bytes.fromhex(parts[2].decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                continue
            if len(cr) == 32 and 32 <= len(secret) <= 64:
                out.setdefault(cr, {})[label] = secret
    return out


def client_random(hello: bytes) -> bytes | None:
    """The 32-byte random of a ClientHello at the start of a client's stream."""
    # record header (5) + handshake type and length (4) + legacy_version (2), then the random
    if len(hello) < 43 or hello[0] != 0x16 or hello[5] != 0x01:
        return None
    return bytes(hello[11:43])


@dataclass
class Records:
    """A direction's decrypted application data, with where each record ended in the stream."""

    data: bytearray = field(default_factory=bytearray)
    #: (stream offset just past the record, plaintext bytes so far) for each application record.
    marks: list[tuple[int, int]] = field(default_factory=list)
    #: The stream held only whole records that all decrypted (False: cut short or failed).
    complete: bool = True


def _hkdf_expand_label(hash_name: str, secret: bytes, label: bytes, length: int) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    algo: hashes.HashAlgorithm = hashes.SHA384() if hash_name == "sha384" else hashes.SHA256()
    return HKDFExpand(algo, length, info).derive(secret)


class _Keys:
    def __init__(self, suite: int, secret: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

        hash_name, klen, aead = _SUITES[suite]
        key = _hkdf_expand_label(hash_name, secret, b"key", klen)
        self.iv = _hkdf_expand_label(hash_name, secret, b"iv", 12)
        self.aead = AESGCM(key) if aead == "aesgcm" else ChaCha20Poly1305(key)
        self.seq = 0

    def open(self, header: bytes, body: bytes) -> bytes | None:
        from cryptography.exceptions import InvalidTag

        nonce = bytes(a ^ b for a, b in zip(self.iv, self.seq.to_bytes(12, "big"), strict=True))
        try:
            out = self.aead.decrypt(nonce, body, header)
        except InvalidTag:
            return None
        self.seq += 1
        return out


def server_suite(server: bytes) -> int | None:
    """The cipher suite of a TLS 1.3 ServerHello at the start of a server's stream, else None."""
    if len(server) < 5 or server[0] != 0x16:
        return None
    (rlen,) = struct.unpack_from("!H", server, 3)
    hs = server[5:5 + rlen]
    if len(hs) < 39 or hs[0] != 0x02:
        return None
    p = 4 + 2 + 32
    sid_len = hs[p]
    p += 1 + sid_len
    if p + 3 > len(hs):
        return None
    (suite,) = struct.unpack_from("!H", hs, p)
    p += 3  # suite, compression
    if p + 2 > len(hs):
        return None
    (ext_len,) = struct.unpack_from("!H", hs, p)
    p += 2
    end = min(len(hs), p + ext_len)
    tls13 = False
    while p + 4 <= end:
        etype, elen = struct.unpack_from("!HH", hs, p)
        if etype == 43 and elen == 2 and hs[p + 4:p + 6] == b"\x03\x04":  # supported_versions: TLS 1.3
            tls13 = True
        p += 4 + elen
    return suite if tls13 and suite in _SUITES else None


def decrypt(stream: bytes, suite: int, secrets: dict[str, bytes], side: str) -> Records:
    """The application data one side (``"CLIENT"`` or ``"SERVER"``) sent on a TLS 1.3 flow.

    Records protected by the handshake secret come first, then those under the traffic secret;
    a record that opens under neither ends the reading (``complete`` False)."""
    out = Records()
    keys: list[_Keys] = []
    for label in (f"{side}_HANDSHAKE_TRAFFIC_SECRET", f"{side}_TRAFFIC_SECRET_0"):
        if label in secrets:
            keys.append(_Keys(suite, secrets[label]))
    if not keys:
        out.complete = False
        return out
    current = 0
    p = 0
    while p + 5 <= len(stream):
        ctype = stream[p]
        (rlen,) = struct.unpack_from("!H", stream, p + 3)
        if p + 5 + rlen > len(stream):
            out.complete = False
            return out
        header, body = stream[p:p + 5], stream[p + 5:p + 5 + rlen]
        p += 5 + rlen
        if ctype != 23:  # plaintext: the hellos, the compatibility ChangeCipherSpec
            continue
        plain = keys[current].open(header, body)
        while plain is None and current + 1 < len(keys):
            # The handshake is over: the next secret protects what follows (its sequence from 0).
            current += 1
            plain = keys[current].open(header, body)
        if plain is None:
            out.complete = False
            return out
        inner = plain.rstrip(b"\x00")
        if not inner:
            continue
        if inner[-1] == 23:
            out.data += inner[:-1]
            out.marks.append((p, len(out.data)))
        elif inner[-1] == 21:  # an alert (close_notify or fatal): nothing more of interest
            return out
    if p != len(stream):
        out.complete = False
    return out


__all__ = ["MAX_KEYLOG", "Records", "client_random", "decrypt", "parse_keylog", "server_suite"]
