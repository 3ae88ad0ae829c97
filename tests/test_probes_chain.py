"""Redirect chains, the parts that need no server: where a chain stops before any connection.

What a followed chain records (hop by hop, a failure at hop 2) is checked end to end in
test_e2e_fidelity.py against real servers."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from kzprobe.helper.policy import Policy
from kzprobe.helper.service import HelperEngine
from kzprobe.model import STEP_HTTP, Observation, Target
from kzprobe.probes import chain
from kzprobe.probes.engine import Engine, ProbeConfig


def _first(url: str, redirect_to: str) -> Observation:
    return Observation(step=STEP_HTTP, target=url, domain="site.test", address="198.51.100.7", port=80,
                       data={"url": url, "status": 302, "redirect_to": redirect_to})


def _follow(engine: Engine, redirect_to: str, url: str = "http://site.test/") -> list[Observation]:
    seen: list[Observation] = []

    async def sink(o: Observation) -> None:
        seen.append(o)

    engine.sink = sink

    async def main() -> None:
        await chain.follow(engine, Target(url), _first(url, redirect_to), followups=True)

    trio.run(main)
    return seen


def _engine() -> Engine:
    return Engine(ProbeConfig(system_resolver=False, resolvers=[], timeout=0.5), lambda o: trio.sleep(0))


@pytest.mark.parametrize("location", [
    "http://site.test/",  # back to the target URL: a loop
    "ftp://site.test/file",  # not a web scheme
    "http:///nohost",  # no host
    "http://site.test:99999/",  # no such port
    "http://" + "x" * 64 + ".test/",  # a label IDNA refuses
    "javascript:alert(1)",
])
def test_unfollowable_locations_end_the_chain_without_a_step(location: str) -> None:
    assert _follow(_engine(), location) == []


@pytest.mark.parametrize(("location", "why"), [
    ("http://127.0.0.1:8080/admin", "loopback"),
    ("http://[::1]/", "loopback"),
    ("https://93.184.215.14:22/", "port"),
])
def test_helper_never_connects_where_its_policy_forbids(location: str, why: Any) -> None:
    """A hop makes its own TCP step: the helper's policy stops it before any connection."""
    engine = HelperEngine(ProbeConfig(system_resolver=False, resolvers=[], timeout=0.5), Policy())
    assert engine.endpoint_refusal(*_endpoint(location))
    assert _follow(engine, location) == []


def _endpoint(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return str(parts.hostname), parts.port or (443 if parts.scheme == "https" else 80)


def test_the_probe_itself_follows_anywhere() -> None:
    assert _engine().endpoint_refusal("127.0.0.1", 8080) is None
