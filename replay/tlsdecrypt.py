"""TLS 1.3 application data in a capture, decrypted with the secrets the capture carries.

A capture holds HTTPS pages only as ciphertext: a blockpage served behind a bad certificate, or
a body's rate as HTTP sees it, cannot be read from it.  A client that logged its TLS secrets
(``SSLKEYLOGFILE``, the NSS key log format every browser, curl and Python's ``ssl`` write) makes
them readable, and pcapng keeps those secrets inside the capture, in Decryption Secrets Blocks
(``editcap --inject-secrets tls,KEYLOG``), as Wireshark reads them.  ``kzprobe lab record``
writes its fixtures that way.

TLS 1.3 (RFC 8446's suites: AES-128/256-GCM, ChaCha20-Poly1305; keys from the logged traffic
secrets) and TLS 1.2 with an AEAD suite (AES-GCM, ChaCha20-Poly1305; keys from the logged master
secret through the 1.2 PRF) are decrypted.  CBC suites, and any flow whose client random the log
lacks, stay ciphertext.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

#: Bytes of key log kept per capture (a line is ~180 bytes: tens of thousands of sessions).
MAX_KEYLOG = 16 << 20
#: Secrets a client logs: TLS 1.3's, by the direction and phase they protect; TLS 1.2's master secret.
_LABELS = ("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0",
           "SERVER_TRAFFIC_SECRET_0", "CLIENT_RANDOM")
#: TLS 1.3 cipher suite -> (hash name, key length, AEAD name)
_SUITES = {0x1301: ("sha256", 16, "aesgcm"), 0x1302: ("sha384", 32, "aesgcm"), 0x1303: ("sha256", 32, "chacha")}
#: TLS 1.2 AEAD cipher suites -> (PRF hash, key length, fixed IV length, AEAD name)
_SUITES12 = {
    **{s: ("sha256", 16, 4, "aesgcm") for s in (0x009C, 0x009E, 0xC02B, 0xC02F)},
    **{s: ("sha384", 32, 4, "aesgcm") for s in (0x009D, 0x009F, 0xC02C, 0xC030)},
    **{s: ("sha256", 32, 12, "chacha") for s in (0xCCA8, 0xCCA9, 0xCCAA)},
}


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
            if len(cr) == 32 and 32 <= len(secret) <= 64:  # a 1.2 master secret is 48 bytes
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


@dataclass(frozen=True)
class Hello:
    """What the ServerHello chose: the version (1.3 or not), the suite, the server's random."""

    tls13: bool
    suite: int
    server_random: bytes


def server_hello(server: bytes) -> Hello | None:
    """The ServerHello at the start of a server's stream, when its suite can be decrypted here."""
    if len(server) < 5 or server[0] != 0x16:
        return None
    (rlen,) = struct.unpack_from("!H", server, 3)
    hs = server[5:5 + rlen]
    if len(hs) < 39 or hs[0] != 0x02:
        return None
    server_random = bytes(hs[6:38])
    p = 4 + 2 + 32
    sid_len = hs[p]
    p += 1 + sid_len
    if p + 3 > len(hs):
        return None
    (suite,) = struct.unpack_from("!H", hs, p)
    p += 3  # suite, compression
    tls13 = False
    if p + 2 <= len(hs):
        (ext_len,) = struct.unpack_from("!H", hs, p)
        p += 2
        end = min(len(hs), p + ext_len)
        while p + 4 <= end:
            etype, elen = struct.unpack_from("!HH", hs, p)
            if etype == 43 and elen == 2 and hs[p + 4:p + 6] == b"\x03\x04":  # supported_versions: TLS 1.3
                tls13 = True
            p += 4 + elen
    if (tls13 and suite in _SUITES) or (not tls13 and suite in _SUITES12):
        return Hello(tls13, suite, server_random)
    return None


def server_suite(server: bytes) -> int | None:
    """The cipher suite of a decryptable ServerHello at the start of a server's stream, else None."""
    got = server_hello(server)
    return got.suite if got is not None else None


def _prf12(hash_name: str, secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """TLS 1.2's PRF (RFC 5246, 5): P_hash(secret, label + seed)."""
    import hashlib
    import hmac

    digest = hashlib.sha384 if hash_name == "sha384" else hashlib.sha256
    seed = label + seed
    out, a = b"", seed
    while len(out) < length:
        a = hmac.new(secret, a, digest).digest()
        out += hmac.new(secret, a + seed, digest).digest()
    return out[:length]


class _Keys12:
    """One direction's TLS 1.2 AEAD keys (RFC 5288 GCM with an explicit nonce, RFC 7905 ChaCha20)."""

    def __init__(self, suite: int, master: bytes, client_random: bytes, server_random: bytes, side: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

        hash_name, klen, ivlen, aead = _SUITES12[suite]
        block = _prf12(hash_name, master, b"key expansion", server_random + client_random, 2 * (klen + ivlen))
        ck, sk = block[:klen], block[klen:2 * klen]
        civ, siv = block[2 * klen:2 * klen + ivlen], block[2 * klen + ivlen:]
        key, self.iv = (ck, civ) if side == "CLIENT" else (sk, siv)
        self.chacha = aead == "chacha"
        self.aead = ChaCha20Poly1305(key) if self.chacha else AESGCM(key)
        self.seq = 0

    def open(self, header: bytes, body: bytes) -> bytes | None:
        from cryptography.exceptions import InvalidTag

        if self.chacha:
            nonce = bytes(a ^ b for a, b in zip(self.iv, self.seq.to_bytes(12, "big"), strict=True))
            ct = body
        else:
            if len(body) < 8:
                return None
            nonce, ct = self.iv + body[:8], body[8:]
        if len(ct) < 16:
            return None
        aad = self.seq.to_bytes(8, "big") + header[:3] + (len(ct) - 16).to_bytes(2, "big")
        try:
            out = self.aead.decrypt(nonce, ct, aad)
        except InvalidTag:
            return None
        self.seq += 1
        return out


def _decrypt12(stream: bytes, hello: Hello, secrets: dict[str, bytes], side: str, client_random: bytes
               ) -> Records:
    out = Records()
    master = secrets.get("CLIENT_RANDOM")
    if master is None or len(master) != 48 or len(client_random) != 32:
        out.complete = False
        return out
    keys = _Keys12(hello.suite, master, client_random, hello.server_random, side)
    encrypted = False
    for ctype, header, body, p in _records(stream, out):
        if ctype == 20:  # ChangeCipherSpec: what follows in this direction is protected
            encrypted = True
            continue
        if not encrypted:
            continue
        plain = keys.open(header, body)
        if plain is None:
            out.complete = False
            return out
        if ctype == 23:
            out.data += plain
            out.marks.append((p, len(out.data)))
        elif ctype == 21:
            return out
    return out


def _records(stream: bytes, out: Records) -> Iterator[tuple[int, bytes, bytes, int]]:
    """(content type, header, body, offset past it) of each whole record at the start of ``stream``;
    ``out.complete`` goes False when the stream ends inside a record or holds bytes after the last."""
    p = 0
    while p + 5 <= len(stream):
        ctype = stream[p]
        (rlen,) = struct.unpack_from("!H", stream, p + 3)
        if p + 5 + rlen > len(stream):
            out.complete = False
            return
        header, body = stream[p:p + 5], stream[p + 5:p + 5 + rlen]
        p += 5 + rlen
        yield ctype, header, body, p
    if p != len(stream):
        out.complete = False


def decrypt(stream: bytes, hello: Hello, secrets: dict[str, bytes], side: str, client_random: bytes = b""
            ) -> Records:
    """The application data one side (``"CLIENT"`` or ``"SERVER"``) sent on a TLS flow.

    TLS 1.3: records protected by the handshake secret come first, then those under the traffic
    secret.  TLS 1.2: every record after the side's ChangeCipherSpec, under the keys the master
    secret expands to (``client_random`` needed).  A record that does not open ends the reading
    (``complete`` False)."""
    if not hello.tls13:
        return _decrypt12(stream, hello, secrets, side, client_random)
    suite = hello.suite
    out = Records()
    keys: list[_Keys] = []
    for label in (f"{side}_HANDSHAKE_TRAFFIC_SECRET", f"{side}_TRAFFIC_SECRET_0"):
        if label in secrets:
            keys.append(_Keys(suite, secrets[label]))
    if not keys:
        out.complete = False
        return out
    current = 0
    for ctype, header, body, p in _records(stream, out):
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
    return out


__all__ = ["MAX_KEYLOG", "Hello", "Records", "client_random", "decrypt", "parse_keylog", "server_hello",
           "server_suite"]
