"""A redirect in a capture is recorded as the live probe records it (``redirect_to``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kzprobe.model import MEASURE, REDIRECT, Observation
from kzprobe.replay import chains
from kzprobe.replay.pcapio import ReadResult
from kzprobe.replay.state import FileReplay, FileState, Limits
from kzprobe.tests.test_replay_control import CLI, SITE, Tcp, _replay


@pytest.mark.parametrize(("status", "location", "want"), [
    (301, "https://r.example/", "https://r.example/"),
    (302, "/next?x=1", "http://r.example/next?x=1"),
    (200, "https://r.example/", None),  # a Location on a 200 is no redirect
    (301, "http://[::1", None),  # not a URL: left unfollowed, never a crash
])
def test_redirect_to(tmp_path: Path, status: int, location: str, want: str | None) -> None:
    t = Tcp(CLI, 40000, SITE, 80)
    resp = f"HTTP/1.1 {status} X\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()
    pkts = [*t.handshake(), t.cli(b"GET / HTTP/1.1\r\nHost: r.example\r\n\r\n"), t.srv(resp), t.cli(flags="FA"),
            t.srv(flags="FA")]
    fr = _replay(tmp_path, [(i * 0.01, p) for i, p in enumerate(pkts)])
    (o,) = [o for o in fr.observations if o.step == "http"]
    assert o.data["status"] == status
    assert o.data.get("redirect_to") == want


def _obs(step: str, name: str, t: float, port: int = 443, **data: object) -> Observation:
    return Observation(step=step, target=name, domain=name, source="pcap", address="203.0.113.9", port=port,
                       t_start=t, t_end=t + 0.1, data=dict(data))


def test_flows_after_a_redirect_are_its_hops_and_nothing_else() -> None:
    """Steps about the next hop's name, on the hop URL's port, started after the redirect: hop 1 of
    the target that redirected.  The same name measured before the redirect, or on another port,
    stays what it was (a target of its own)."""
    start = _obs("http", "site.test", 10.0, status=301, redirect_to="https://www.site.test/",
                 url="https://site.test/")
    before = _obs("tls", "www.site.test", 5.0, sni="www.site.test")
    lookup = _obs("dns", "www.site.test", 10.2, port=53, addresses=["203.0.113.9"])
    hop_tls = _obs("tls", "www.site.test", 10.3, sni="www.site.test")
    hop_http = _obs("http", "www.site.test", 10.4, status=302, redirect_to="https://m.site.test/",
                    url="https://www.site.test/")
    other_port = _obs("tcp", "www.site.test", 10.5, port=80)
    hop2 = _obs("tls", "m.site.test", 10.6, sni="m.site.test")
    out = FileReplay(ReadResult())
    out.observations = [start, before, lookup, hop_tls, hop_http, other_port, hop2]
    chains.link(FileState("x.pcap", out, Limits(), None, 1))
    assert [(o.target, o.purpose, o.data.get("hop")) for o in (lookup, hop_tls, hop_http, hop2)] == [
        ("site.test", REDIRECT, 1), ("site.test", REDIRECT, 1), ("site.test", REDIRECT, 1), ("site.test", REDIRECT, 2)]
    for o in (start, before, other_port):
        assert o.purpose == MEASURE and "hop" not in o.data
    assert (before.target, other_port.target) == ("www.site.test", "www.site.test")
