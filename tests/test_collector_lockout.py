"""The collector's wrong-token lockout (the helper's hardening layer, hardening/limits.py): a client
that keeps presenting wrong tokens is refused unchecked (no scrypt, same 401) until its bucket
refills; other clients are not affected, and a right token does not cost anything.

In process (the ASGI app called directly, with the client address in the scope, as hypercorn
passes it) with a counting verifier, so that "unchecked" is observed rather than inferred from
timing; then once through a real `kzprobe collector` on loopback with two client addresses.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from sqlalchemy import func, select

from kzprobe.collector.app import CollectorApp, Limits
from kzprobe.collector.ingest import Ingest
from kzprobe.storage import Store
from kzprobe.storage.models import RunRow
from kzprobe.tests.support.collector import Collector, add_token, count, free_port

GOOD = "kzp_000000000001_" + "a" * 43


class CountingVerifier:
    """Knows one token; counts the checks (each would be a ~50 ms scrypt in the real Verifier)."""

    def __init__(self) -> None:
        self.checks = 0

    def name_of(self, token: str) -> str | None:
        self.checks += 1
        return "alice" if token == GOOD else None


def _call(app: CollectorApp, client: str, token: str | None) -> tuple[int, dict[str, Any]]:
    """POST /v1/runs from ``client`` with ``token``; (status, JSON answer)."""
    body = json.dumps({"uid": str(uuid.uuid4()), "software_version": "0.1.0", "started": 1.0}).encode()
    headers = [(b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/runs", "headers": headers, "client": (client, 40000)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg: Any) -> None:
        sent.append(dict(msg))

    trio.run(app, scope, receive, send)
    return int(sent[0]["status"]), json.loads(sent[1]["body"])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "collector.db")
    yield s
    s.close()


def test_wrong_tokens_lock_the_client_out_unchecked_until_the_bucket_refills(store: Store) -> None:
    verifier = CountingVerifier()
    lockout = 1.0
    app = CollectorApp(Ingest(store), verifier, limits=Limits(auth_failures=3, auth_lockout=lockout))  # type: ignore[arg-type]
    now = [1000.0]
    app._failures.clock = lambda: now[0]  # the limiter's time, so that a loaded machine cannot refill it early
    attacker, other = "198.51.100.7", "203.0.113.9"

    # A right token costs nothing: many in a row all pass.
    for _ in range(5):
        assert _call(app, attacker, GOOD)[0] == 200
    # Three wrong guesses are checked (and refused) ...
    wrong = [_call(app, attacker, "kzp_000000000001_" + "b" * 43) for _ in range(3)]
    assert [s for s, _ in wrong] == [401, 401, 401]
    assert verifier.checks == 5 + 3
    # ... then the client is refused unchecked, even with the right token, and the answer is the
    # same 401 as for a wrong token (it tells the guesser nothing).
    for token in ("kzp_000000000001_" + "c" * 43, GOOD, None):
        status, answer = _call(app, attacker, token)
        assert (status, answer) == (401, wrong[0][1])
    assert verifier.checks == 8
    # Another client is not affected.
    assert _call(app, other, GOOD)[0] == 200
    assert verifier.checks == 9
    # The bucket refills at auth_failures per auth_lockout seconds: one guess's worth comes back
    # after lockout / auth_failures, and the right token works again.
    now[0] += lockout / 3 * 0.9
    assert _call(app, attacker, GOOD)[0] == 401
    now[0] += lockout / 3 * 0.2
    assert _call(app, attacker, GOOD)[0] == 200
    assert verifier.checks == 10
    # (and a fresh guess now is checked, then locks it out again)
    assert _call(app, attacker, "nope")[0] == 401 and verifier.checks == 11
    assert _call(app, attacker, GOOD)[0] == 401 and verifier.checks == 11
    with store.session() as ses:
        runs = ses.scalar(select(func.count()).select_from(RunRow))
    assert runs == 5 + 1 + 1  # the refused requests stored nothing


def test_ipv6_clients_are_locked_out_by_their_64(store: Store) -> None:
    verifier = CountingVerifier()
    app = CollectorApp(Ingest(store), verifier, limits=Limits(auth_failures=2, auth_lockout=60))  # type: ignore[arg-type]
    for i in range(2):
        assert _call(app, f"2001:db8:1:2::{i + 1}", "nope")[0] == 401
    # Another address of the same /64 (a guesser rotating its interface id) is locked out too.
    assert _call(app, "2001:db8:1:2::ff", GOOD)[0] == 401
    assert verifier.checks == 2
    assert _call(app, "2001:db8:1:3::1", GOOD)[0] == 200


@pytest.mark.slow
def test_lockout_through_the_real_collector(tmp_path: Path) -> None:
    c = Collector(db=str(tmp_path / "collector.db"), port=free_port(), log=tmp_path / "collector.log")
    token = add_token(c.db, "alice")
    c.start()
    body = {"uid": str(uuid.uuid4()), "software_version": "0.1.0", "started": 1.0}
    try:
        def post(local: str, tok: str) -> int:
            # Bind the client's own loopback address: the collector keys the lockout on it.
            with httpx.Client(base_url=c.url, trust_env=False,
                              transport=httpx.HTTPTransport(local_address=local)) as h:
                r = h.post("/v1/runs", json={**body, "uid": str(uuid.uuid4())},
                           headers={"authorization": f"Bearer {tok}"})
                return r.status_code

        assert post("127.0.0.1", token) == 200
        # Limits' default: 10 wrong tokens per client before answering 401 unchecked.
        assert [post("127.0.0.1", token[:-1] + ("x" if token[-1] != "x" else "y")) for _ in range(10)] == [401] * 10
        t0 = time.monotonic()
        assert post("127.0.0.1", token) == 401  # locked out: the right token is refused too ...
        unchecked = time.monotonic() - t0
        assert post("127.0.0.2", token) == 200  # ... from that address only
        assert unchecked < 5  # (no scrypt queue behind it; the in-process test counts the checks)
        assert count(c.db, "runs") == 2
    finally:
        c.stop()
