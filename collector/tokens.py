"""Upload tokens: one per volunteer, shown once, kept only as a salted scrypt hash.

A token is ``kzp_<key id>_<secret>``.  The key id (public, 12 hex) finds the row without a
scan; the secret (32 random bytes) is checked against ``scrypt(secret, salt)``.  scrypt costs
tens of milliseconds on purpose (a stolen table is slow to attack), so a server remembers the
tokens it has verified (by their SHA-256, in memory) and re-reads only the revocation state,
at most every ``refresh`` seconds: a revoked token stops working within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kzprobe.storage.models import TokenRow

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOKEN_RE = re.compile(r"^kzp_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
# scrypt parameters: n=2**14, r=8 -> 16 MiB and ~50 ms per check.
_N, _R, _P = 2**14, 8, 1


class TokenError(ValueError):
    """A token operation that cannot be done; the message is one line."""


def _kdf(secret: str, salt: bytes) -> str:
    return hashlib.scrypt(secret.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=64 * 1024 * 1024, dklen=32).hex()


@dataclass(frozen=True, slots=True)
class TokenInfo:
    name: str
    created: float
    revoked: float | None


def add(sessions: Callable[[], Session], name: str) -> str:
    """Create a token for ``name`` and return it (the only time it exists in clear)."""
    if not NAME_RE.match(name):
        raise TokenError(f"{name!r}: a token name is 1-64 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    try:
        with sessions() as s, s.begin():
            if s.get(TokenRow, name) is not None:
                raise TokenError(f"{name!r} already has a token (revoke it first to issue a new one)")
            s.add(TokenRow(name=name, key_id=key_id, salt=salt.hex(), hash=_kdf(secret, salt), created=time.time()))
    except IntegrityError:
        raise TokenError(f"{name!r} already has a token") from None
    return f"kzp_{key_id}_{secret}"


def revoke(sessions: Callable[[], Session], name: str) -> None:
    with sessions() as s, s.begin():
        row = s.get(TokenRow, name)
        if row is None:
            raise TokenError(f"no token named {name!r}")
        if row.revoked is None:
            row.revoked = time.time()
        # The name stays taken: runs are attributed to it, and a new volunteer must not inherit them.


def listing(sessions: Callable[[], Session]) -> list[TokenInfo]:
    with sessions() as s:
        return [TokenInfo(r.name, r.created, r.revoked) for r in s.scalars(select(TokenRow).order_by(TokenRow.name))]


class Verifier:
    """Token -> volunteer name, or None.  Thread-safe; call from worker threads (scrypt blocks)."""

    def __init__(self, sessions: Callable[[], Session], refresh: float = 1.0) -> None:
        self.sessions = sessions
        self.refresh = refresh
        self._verified: dict[bytes, str] = {}  # sha256(token) -> name
        self._revoked: set[str] = set()
        self._loaded = 0.0
        self._lock = threading.Lock()

    def _revocations(self) -> set[str]:
        now = time.monotonic()
        if now - self._loaded >= self.refresh:
            with self.sessions() as s:
                revoked = set(s.scalars(select(TokenRow.name).where(TokenRow.revoked.is_not(None))))
            with self._lock:
                self._revoked, self._loaded = revoked, now
        return self._revoked

    def name_of(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        name = self._verified.get(digest)
        if name is None:
            name = self._check(token)
            if name is None:
                return None
            with self._lock:
                self._verified[digest] = name
        return None if name in self._revocations() else name

    def _check(self, token: str) -> str | None:
        m = TOKEN_RE.match(token)
        if m is None:
            return None
        key_id, secret = m.groups()
        with self.sessions() as s:
            row = s.scalars(select(TokenRow).where(TokenRow.key_id == key_id)).first()
        if row is None:
            _kdf(secret, b"\0" * 16)  # same cost as a real check: the answer time says nothing
            return None
        if not hmac.compare_digest(_kdf(secret, bytes.fromhex(row.salt)), row.hash):
            return None
        return row.name
