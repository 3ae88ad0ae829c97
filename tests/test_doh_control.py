"""DNS-over-HTTPS control (RFC 8484 over httpx) when no helper is configured.

A real DoH server on loopback (HTTPS with the loopback network's CA, POST application/dns-message)
answers each test name with its genuine address.  With only the censoring ISP resolver at the
probe, DoH is the contrast that turns a DNS failure into ``blocked/dns``, while a CDN answer that
validates by TLS stays ``ok``.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kzprobe.storage import Store
from kzprobe.tests.support.doh import DoHHandler

DOH_ADDR = "127.0.0.70"


class _DoH(DoHHandler):
    sites: ClassVar[dict[str, str]] = {}
    queries: ClassVar[list[str]] = []


@pytest.fixture(scope="module")
def doh(loopnet: Any, loopnet_lib: Any) -> Iterator[str]:
    _DoH.sites = {name: genuine for name, (genuine, _action) in loopnet_lib.SITES.items()}
    server = http.server.ThreadingHTTPServer((DOH_ADDR, 0), _DoH)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    loopnet.ca.issue_cert(DOH_ADDR).configure_cert(ctx)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://{DOH_ADDR}:{server.server_address[1]}/dns-query"
    server.shutdown()


CASES = {
    "nx.test": ("blocked", "dns", "dns.nxdomain"),
    "poison.test": ("blocked", "dns", "dns.poisoned"),
    "cdn.test": ("ok", None, "ok"),  # detail is never null in the output (docs/output.md)
    "ok.test": ("ok", None, "ok"),
}


def test_doh_is_control_when_no_helper(loopnet: Any, loopnet_lib: Any, doh: str, tmp_path: Path) -> None:
    _DoH.queries = []
    urls = [loopnet.url(n) for n in CASES]
    out = loopnet_lib.run_kzprobe(loopnet, urls, tmp_path / "doh.db", "--doh", doh,
                                  resolvers=(loopnet.isp.spec,), timeout=2.0)
    assert out.returncode == 0, out.stderr
    for name, (status, mech, detail) in CASES.items():
        v = out.verdicts[loopnet.url(name)]
        assert (v["status"], v["mechanism"], v["detail"]) == (status, mech, detail), v
    # The names went to the DoH server, and its answers are stored as control observations.
    assert set(CASES) <= set(_DoH.queries)
    store = Store(out.db)
    rid = store.latest_run_id()
    assert rid is not None
    doh_obs = [o for o in store.observations(rid) if o.vantage == "control" and o.data.get("transport") == "doh"]
    assert {o.domain for o in doh_obs} == set(CASES)
    poisoned = out.verdicts[loopnet.url("poison.test")]
    assert "unlike control" in poisoned["evidence"]["sentence"]


def test_without_doh_the_same_failure_is_inconclusive(loopnet: Any, loopnet_lib: Any, tmp_path: Path) -> None:
    """The contrast matters: the very same NXDOMAIN with no control at all is not 'blocked'."""
    out = loopnet_lib.run_kzprobe(loopnet, [loopnet.url("nx.test")], tmp_path / "nodoh.db",
                                  resolvers=(loopnet.isp.spec,), timeout=2.0)
    assert out.returncode == 0, out.stderr
    assert out.verdicts[loopnet.url("nx.test")]["status"] == "inconclusive"
