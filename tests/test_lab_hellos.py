"""TLS-fingerprint DPI with a real kernel rule, probed live (issue 15): tests/support/hellonet.py.

The server's INPUT chain resets (or drops) any segment holding ``hellos.DPI_SIGNATURE`` (iptables
string match).  By construction the Tor-like hello fails every time and the browser-like one passes,
so the live tor-or:// measurement is blocked/dpi with dpi.tls_fingerprint; with the rule removed
(the near miss), the same measurement is ok.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kzprobe.analysis import classify_target
from kzprobe.model import Observation, Verdict
from kzprobe.tests.support import hellonet

pytestmark = [pytest.mark.lab]

if hellonet.missing():
    pytest.skip(f"hellonet {hellonet.missing()}", allow_module_level=True)


@pytest.fixture(scope="module")
def net() -> Iterator[hellonet.HelloNet]:
    with hellonet.hellonet() as n:
        yield n


def _measure(net: hellonet.HelloNet) -> tuple[list[Observation], Verdict]:
    obs = [Observation.from_dict(d) for d in net.probe()]
    return obs, classify_target(hellonet.URL, obs)


@pytest.mark.parametrize(("action", "failure"), [("reset", "connection_reset"), ("drop", "generic_timeout_error")])
def test_tor_like_hello_blocked_browser_like_completes(net: hellonet.HelloNet, action: str, failure: str) -> None:
    net.dpi(True, action)
    try:
        obs, v = _measure(net)
    finally:
        net.dpi(False, action)
    tls = [(o.purpose, o.attempt, o.data.get("hello"), o.failure) for o in obs if o.step == "tls"]
    assert tls == [("measure", 0, "tor", failure), ("followup", 0, "browser", None),
                   ("measure", 1, "tor", failure)]
    assert len({o.data["sni"] for o in obs if o.step == "tls"}) == 1  # same SNI throughout
    assert (v.status, v.mechanism, v.detail, v.rule) == ("blocked", "dpi", "dpi.tls_fingerprint",
                                                         "dpi.tls_fingerprint")


def test_without_the_rule_the_or_port_is_ok(net: hellonet.HelloNet) -> None:
    obs, v = _measure(net)
    assert [(o.step, o.failure) for o in obs] == [("tcp", None), ("tls", None)]
    assert (v.status, v.rule) == ("ok", "ok.tor_or")
