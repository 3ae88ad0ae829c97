"""End to end against servers that behave like real ones (issue 9): compressed blockpages, a CDN
chain whose leaf has no key identifiers, redirect chains across names, and SNI throttling.

One ``kzprobe run`` with a control helper (outside the censored network: it connects from
127.0.0.1, which the middlebox leaves alone) and both resolvers.  What each case must show comes
from how the loopback network is built (tests/support/loopnet.py), never from kzprobe's output.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from kzprobe.model import CONTROL, FOLLOWUP, MEASURE, PEEK, PROBE, REDIRECT, Observation
from kzprobe.storage import Store

HELPER_ADDR = "127.0.0.61"
TIMEOUT = 2.0

CASES: dict[tuple[str, str], tuple[str, str | None, str | None]] = {
    # The ISP points the name at its blockpage server, which gzips like nginx.
    ("gzblockpage.test", "http"): ("blocked", "dns", "dns.blockpage"),
    ("gzblockpage.test", "https"): ("blocked", "dns", "dns.blockpage"),
    # The ISP's answer is a CDN edge unlike control's; its chain (leaf without SKI/AKI, an
    # intermediate) is valid for OpenSSL, curl and browsers: a genuine answer.
    ("noaki.test", "https"): ("ok", None, None),
    # http -> https -> www, all reachable.
    ("okredirect.test", "http"): ("ok", None, None),
    # http -> https -> www, and the last hop's TLS is reset by SNI while control gets the page.
    ("redirect.test", "http"): ("blocked", "dpi", "dpi.tls_reset"),
    # The middlebox shapes this SNI to 16 KiB/s; the benign SNI on the same address and control
    # are not shaped.
    ("throttle.test", "https"): ("blocked", "dpi", "dpi.throttled"),
    # A path that is slow whatever the name: the benign follow-up is as slow. Not censorship.
    ("slowpath.test", "https"): ("ok", None, None),
    # The middlebox answers this Host with a 302 to the ISP's (gzip-served) notice page.
    ("redirinject.test", "http"): ("blocked", "dpi", "dpi.blockpage"),
    # The ISP points the name at its redirector: behind a certificate for another name, a 301 to
    # the blockpage host.  The peek must follow that redirect to see the blockpage.
    ("peekredirect.test", "https"): ("blocked", "dns", "dns.blockpage"),
}


@pytest.fixture(scope="module")
def helper(loopnet: Any, loopnet_lib: Any) -> Iterator[str]:
    with loopnet_lib.helper_process(loopnet, HELPER_ADDR, TIMEOUT) as url:
        if url is None:
            pytest.skip("kzprobe helper did not start")
        yield url


@pytest.fixture(scope="module")
def run(loopnet: Any, loopnet_lib: Any, helper: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    urls = [loopnet.url(n, s) for n, s in CASES]
    out = loopnet_lib.run_kzprobe(loopnet, urls, tmp_path_factory.mktemp("fidelity") / "f.db", "--helper", helper,
                                  timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def observations(run: Any) -> list[Observation]:
    store = Store(run.db)
    rid = store.latest_run_id()
    assert rid is not None
    return store.observations(rid)


def _of(obs: list[Observation], url: str, **kw: Any) -> list[Observation]:
    return [o for o in obs if o.target == url and all(getattr(o, k) == v for k, v in kw.items())]


@pytest.mark.parametrize(("name", "scheme"), list(CASES), ids=[f"{s}-{n}" for n, s in CASES])
def test_verdict(run: Any, loopnet: Any, name: str, scheme: str) -> None:
    status, mechanism, detail = CASES[(name, scheme)]
    v = run.verdicts[loopnet.url(name, scheme)]
    assert (v["status"], v["mechanism"]) == (status, mechanism), v
    if detail is not None:
        assert v["detail"] == detail, v


def test_gzip_blockpage_is_decoded(observations: list[Observation], loopnet: Any, loopnet_lib: Any) -> None:
    http = _of(observations, loopnet.url("gzblockpage.test", "http"), step="http", vantage=PROBE,
               address=loopnet_lib.GZIP_BLOCKPAGE)
    assert http, "the probe fetched from the ISP's blockpage address"
    d = http[0].data
    assert d["content_encoding"] == "gzip" and d["title"] == "Blocked" and d["blockpage"]
    assert loopnet_lib.BLOCKPAGE_TEXT in d["body_head"]
    assert d["body_length"] == len(loopnet_lib.blockpage_body())  # decoded
    assert 0 < d["wire_bytes"] < d["body_length"]  # what came over the wire was compressed


def test_noaki_chain_validates_in_the_tls_step(observations: list[Observation], loopnet: Any,
                                               loopnet_lib: Any) -> None:
    tls = _of(observations, loopnet.url("noaki.test"), step="tls", vantage=PROBE, address=loopnet_lib.CDN_NOAKI)
    assert tls and tls[0].ok
    assert tls[0].data["cert_valid"] is True and len(tls[0].data["certificates"]) == 2


def test_redirect_chain_fails_at_hop_2(observations: list[Observation], loopnet: Any, loopnet_lib: Any) -> None:
    url = loopnet.url("redirect.test", "http")
    hop0 = _of(observations, url, step="http", vantage=PROBE, purpose=MEASURE)
    assert hop0 and hop0[0].data["status"] == 301
    assert hop0[0].data["redirect_to"] == f"https://redirect.test:{loopnet.https_port}/"
    chain = [o for o in _of(observations, url, vantage=PROBE, purpose=REDIRECT)]
    by_hop: dict[int, list[Observation]] = {}
    for o in chain:
        by_hop.setdefault(o.data["hop"], []).append(o)
    assert sorted(by_hop) == [1, 2]
    # Hop 1: http -> https on the same name (no new lookup), answered with the move to www.
    assert {o.step for o in by_hop[1]} == {"tcp", "tls", "http"} and all(o.ok for o in by_hop[1])
    h1 = next(o for o in by_hop[1] if o.step == "http")
    assert h1.data["redirect_to"] == f"https://www.redirect.test:{loopnet.https_port}/"
    # Hop 2: www.redirect.test looked up at the run's resolvers, then the SNI reset, seen twice.
    dns = [o for o in by_hop[2] if o.step == "dns"]
    assert dns and all(o.domain == "www.redirect.test" for o in dns)
    assert {o.data["resolver"] for o in dns} == {loopnet.isp.spec, loopnet.public.spec}
    tls = [o for o in by_hop[2] if o.step == "tls"]
    assert [o.failure for o in tls] == ["connection_reset", "connection_reset"]
    assert all(o.address == loopnet_lib.MIDDLEBOX and o.data["sni"] == "www.redirect.test" for o in tls)
    assert not [o for o in by_hop[2] if o.step == "http"]
    # Control followed the same chain to the page.
    ctl = [o for o in _of(observations, url, vantage=CONTROL, purpose=REDIRECT, step="http") if o.data.get("hop") == 2]
    assert ctl and ctl[0].ok and ctl[0].data["title"] == "www.redirect.test home"


def test_peek_follows_the_redirect_behind_a_bad_certificate(observations: list[Observation], loopnet: Any,
                                                              loopnet_lib: Any) -> None:
    """The GET without validation (PEEK) follows a redirect as the chain does: its next hop is looked
    up and fetched as a PEEK too, and that is where the blockpage is."""
    url = loopnet.url("peekredirect.test")
    peeks = sorted(_of(observations, url, vantage=PROBE, purpose=PEEK, step="http"),
                   key=lambda o: o.data.get("hop") or 0)
    assert [o.data.get("hop") for o in peeks] == [None, 1], peeks
    assert peeks[0].address == loopnet_lib.REDIRECTOR and peeks[0].data["status"] == 301
    assert peeks[0].data["redirect_to"] == f"http://blocked.isp.test:{loopnet.http_port}/"
    assert peeks[1].address == loopnet_lib.BLOCKPAGE_SERVER and peeks[1].domain == "blocked.isp.test"
    assert peeks[1].data["blockpage"] and loopnet_lib.BLOCKPAGE_TEXT in peeks[1].data["body_head"]
    dns = _of(observations, url, vantage=PROBE, purpose=PEEK, step="dns")
    assert dns and all(o.domain == "blocked.isp.test" and o.data["hop"] == 1 for o in dns)


def _rate(o: Observation) -> float:
    t, n = o.data["speed_samples"][-1]
    return float(n) / float(t)


def test_throttle_samples_and_benign_sni_followup(observations: list[Observation], loopnet: Any,
                                                  loopnet_lib: Any) -> None:
    url = loopnet.url("throttle.test")
    http = _of(observations, url, step="http", vantage=PROBE, purpose=MEASURE)
    assert http and http[0].ok, http
    d = http[0].data
    samples = d["speed_samples"]
    # ~48 KiB at 16 KiB/s: about 3 s of body, sampled every 250 ms with cumulative wire bytes.
    assert len(samples) >= 8
    ts = [t for t, _ in samples]
    # (the last sample is the end of the body, off the 250 ms grid)
    assert all(0.2 <= b - a <= 0.3 for a, b in itertools.pairwise(ts[:-1])), ts
    assert [n for _, n in samples] == sorted(n for _, n in samples)
    assert samples[-1][1] == d["wire_bytes"] >= loopnet_lib.BIG_PAGE_BYTES
    assert _rate(http[0]) <= 1.5 * loopnet_lib.THROTTLE_RATE
    # The follow-up: same address, benign SNI, same Host (the same page), at full speed.
    fu = _of(observations, url, step="http", vantage=PROBE, purpose=FOLLOWUP)
    assert len(fu) == 1 and fu[0].ok and fu[0].address == http[0].address
    assert fu[0].data["sni"] == "example.com" and fu[0].data["host"] == "throttle.test"
    assert fu[0].data["body_sha256"] == d["body_sha256"] and fu[0].data["speed_samples"]
    assert ("127.0.0.2", "example.com", "forward") in loopnet.middlebox.seen
    assert ("127.0.0.2", "throttle.test", "throttle") in loopnet.middlebox.seen
    # Control downloaded the same page, unthrottled.
    ctl = _of(observations, url, step="http", vantage=CONTROL)
    assert ctl and ctl[0].ok and ctl[0].data["body_sha256"] == d["body_sha256"]


def test_slow_path_gets_a_followup_that_is_slow_too(observations: list[Observation], loopnet: Any,
                                                    loopnet_lib: Any) -> None:
    url = loopnet.url("slowpath.test")
    http = _of(observations, url, step="http", vantage=PROBE, purpose=MEASURE)
    fu = _of(observations, url, step="http", vantage=PROBE, purpose=FOLLOWUP)
    assert http and fu and fu[0].data["sni"] == "example.com"
    assert _rate(http[0]) <= 1.5 * loopnet_lib.THROTTLE_RATE and _rate(fu[0]) <= 1.5 * loopnet_lib.THROTTLE_RATE
