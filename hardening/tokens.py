"""Bearer tokens: generation, strength, constant-time checks, throttled guessing."""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from kzprobe.hardening.limits import RateLimiter

#: A token shorter than this is guessable over the network in useful time.
MIN_TOKEN_BYTES = 16


def new_token() -> str:
    """32 random bytes, URL-safe base64 (43 characters): fits in a ``#token=`` URL fragment."""
    return secrets.token_urlsafe(32)


def token_problem(token: str) -> str | None:
    """Why ``token`` may not be used (None: it may)."""
    if not token or any(c.isspace() for c in token):
        return "must be non-empty and without whitespace"
    if len(token.encode()) < MIN_TOKEN_BYTES:
        return f"must be at least {MIN_TOKEN_BYTES} bytes (make one with `kzprobe helper token new`)"
    return None


class Auth(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    WRONG = "wrong"
    #: Too many wrong attempts from this client: not even compared.
    LOCKED = "locked"


@dataclass
class AuthResult:
    status: Auth
    retry_after: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is Auth.OK


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class TokenGuard:
    """Checks ``Authorization: Bearer ...`` against one token.

    Both sides are hashed first so ``compare_digest`` always compares 32 bytes: its timing then
    depends on neither the token's length nor how much of it a guess got right.
    """

    def __init__(self, token: str, failures: RateLimiter | None = None) -> None:
        problem = token_problem(token)
        if problem:
            raise ValueError(f"token {problem}")
        self._digest = _digest(token)
        # 5 wrong tries at once, then one per 10 s: a human typo recovers, a guesser gets nowhere.
        self.failures = failures or RateLimiter(rate=0.1, burst=5)

    def matches(self, given: str) -> bool:
        return hmac.compare_digest(_digest(given), self._digest)

    def check(self, client: str, authorization: str | None) -> AuthResult:
        wait = self.failures.peek(client)
        if wait > 0:
            return AuthResult(Auth.LOCKED, wait)
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            status = Auth.MISSING
        elif self.matches(given.strip()):
            return AuthResult(Auth.OK)
        else:
            # Only a wrong guess costs: a caller without a token is not guessing.
            self.failures.take(client)
            return AuthResult(Auth.WRONG, self.failures.peek(client))
        return AuthResult(status)
