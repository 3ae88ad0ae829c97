"""A redirect in a capture is recorded as the live probe records it (``redirect_to``)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
