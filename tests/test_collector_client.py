"""The uploader's retries (issue 12: exponential backoff with full jitter, honouring Retry-After)
against a scripted collector (httpx.MockTransport), with the sleeps recorded instead of slept.

Expected delays come from the policy's definition: a Retry-After given as seconds or as an HTTP
date is waited as given (capped); otherwise attempt k waits uniform(0, min(max_delay, base * 2**k)).
401 and other 4xx answers are not retried.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from kzprobe.collector.client import Options, Rejected, TokenRefused, Unreachable, Uploader
from kzprobe.storage import Store


def _uploader(tmp_path: Path, answers: list[Callable[[httpx.Request], httpx.Response]],
              **opts: float) -> tuple[Uploader, list[float], list[httpx.Request]]:
    sleeps: list[float] = []
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[min(len(seen), len(answers)) - 1](request)

    store = Store(tmp_path / "vol.db")
    options = Options(url="http://collector.test", token="kzp_x", sleep=sleeps.append, rng=random.Random(7),
                      **opts)  # type: ignore[arg-type]
    up = Uploader(store, options)
    up.http.close()
    up.http = httpx.Client(base_url="http://collector.test", transport=httpx.MockTransport(handler))
    return up, sleeps, seen


def ok(_r: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"uid": "u", "acked": 0, "state": "running"})


def status(code: int, **headers: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _r: httpx.Response(code, json={"error": f"status {code}", "code": "x"}, headers=headers)


def reset(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def test_retry_after_is_honoured_and_otherwise_backoff_is_jittered_and_growing(tmp_path: Path) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    answers = [status(503, **{"Retry-After": "7"}), status(429, **{"Retry-After": when}), status(500), reset,
               status(502), reset, ok]
    up, sleeps, seen = _uploader(tmp_path, answers, base_delay=0.5, max_delay=3.0, max_tries=10)
    assert up.request("POST", "/v1/runs", {"x": 1}) == {"uid": "u", "acked": 0, "state": "running"}
    assert len(seen) == 7 and len(sleeps) == 6
    assert all(json.loads(r.content) == {"x": 1} for r in seen)  # the same body each time
    assert sleeps[0] == 7.0
    assert 25 <= sleeps[1] <= 30  # an HTTP date: the time until then
    # Without Retry-After: full jitter under base * 2**attempt, capped at max_delay.
    for attempt in range(2, 6):
        assert 0 <= sleeps[attempt] <= min(3.0, 0.5 * 2**attempt), (attempt, sleeps)
    # The jitter is random, not a fixed schedule (the rng is seeded: same answer every run).
    assert len(set(sleeps[2:])) == 4


def test_jitter_spreads_a_crowd_of_uploaders(tmp_path: Path) -> None:
    # Many volunteers retrying after the same outage must not come back in step.
    firsts = []
    for seed in range(20):
        up, sleeps, _ = _uploader(tmp_path, [status(503), ok], base_delay=4.0, max_delay=60.0)
        up.opts.rng = random.Random(seed)
        up.request("GET", "/v1/health")
        firsts.append(sleeps[0])
        up.close()
    assert all(0 <= s <= 4.0 for s in firsts)
    assert max(firsts) - min(firsts) > 2.0 and len(set(firsts)) == 20


def test_retry_after_is_capped(tmp_path: Path) -> None:
    up, sleeps, _ = _uploader(tmp_path, [status(503, **{"Retry-After": "86400"}), ok], max_delay=2.0)
    up.request("GET", "/v1/health")
    assert sleeps == [20.0]  # ten times max_delay at most: a hostile or broken header cannot park us for a day


def test_gives_up_after_max_tries_without_sleeping_after_the_last(tmp_path: Path) -> None:
    up, sleeps, seen = _uploader(tmp_path, [reset], max_tries=4, base_delay=0.1, max_delay=1.0)
    with pytest.raises(Unreachable, match="no answer after 4 tries"):
        up.request("GET", "/v1/health")
    assert len(seen) == 4 and len(sleeps) == 3


@pytest.mark.parametrize(("code", "error"), [(401, TokenRefused), (400, Rejected), (404, Rejected), (413, Rejected)])
def test_client_errors_are_not_retried(tmp_path: Path, code: int, error: type[Exception]) -> None:
    up, sleeps, seen = _uploader(tmp_path, [status(code), ok])
    with pytest.raises(error):
        up.request("POST", "/v1/runs", {})
    assert len(seen) == 1 and sleeps == []


def test_a_batch_is_read_along_the_primary_key(tmp_path: Path) -> None:
    """Each batch must cost the batch, not the run: SQLite would otherwise pick the (run_id,
    target) index and sort the whole run for every batch (quadratic; 6x slower at 20k rows)."""
    import sqlite3

    from kzprobe.collector.client import SQLITE_BATCH

    Store(tmp_path / "q.db").close()
    with sqlite3.connect(tmp_path / "q.db") as c:
        plan = " ".join(str(row[-1]) for row in c.execute("EXPLAIN QUERY PLAN " + SQLITE_BATCH, (1, 0, 1000)))
    assert "INTEGER PRIMARY KEY" in plan and "TEMP B-TREE" not in plan, plan
