"""OONI import: the 20 QA measurements get the verdict their scenario means, and the mapping details.

The EXPECTED table is written from what each scenario did on OONI's simulated network (read from
the file, not from kzprobe's output).  Where kzprobe's classifier disagrees today the case is
xfail(strict=True) with the reason, so the suite goes red as soon as the rules are fixed and the
marker must be removed.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kzprobe.analysis import classify
from kzprobe.cli import main
from kzprobe.model import CONTROL, PROBE, Observation
from kzprobe.ooni.importer import (
    REDIRECT,
    Problem,
    describe_certificates,
    map_failure,
    measurement_to_observations,
    read_measurements,
)
from kzprobe.storage import Store

QA = Path(__file__).resolve().parents[1].parent / "shared" / "ooni-qa"


# scenario -> (status, mechanism).  Why each one, where it is not obvious:
# - badSSL…: the server's certificate is from an untrusted root *for everyone* (control's handshake
#   fails with ssl_unknown_authority too): nothing on the path interferes, the site is broken: down.
# - cloudflareCAPTCHA…: Cloudflare's "Just a moment..." challenge (503) is the server's choice, not a
#   censor's: ok.
# - controlFailure…: the probe fetched the genuine page (200, same title as the default page); with no
#   control, kzprobe cannot say more than ok (at lower confidence), and nothing failed.
# - ghostDNS…: the name does not exist (DoH and control: NXDOMAIN) but the ISP's resolver invents an
#   answer that serves "Access Denied": DNS-based blocking.
# - redirect…ConnectionResetForHTTPS: bit.ly redirects to www.example.com whose TLS handshake is reset
#   (SNI-based DPI on the redirect target): the URL is blocked by dpi.
# - tcpBlockingConnectionRefusedWithInconsistentDNS: the ISP resolver gives 83.224.65.41 (refuses
#   connections) instead of the real 93.184.216.34: the root cause is DNS.
# - throttlingWithHTTPS: the status line arrived (200), then the body read timed out while control
#   downloaded the whole 16 MiB.  A slow path looks exactly the same, and one imported measurement
#   has no follow-up on the same address with a benign SNI to tell them apart: inconclusive
#   (rule throttle.unconfirmed), neither "ok" nor a risked "blocked" (OONI: http-failure).
EXPECTED: dict[str, tuple[str, str | None]] = {
    "badSSLWithUnknownAuthorityWithConsistentDNS": ("down", None),
    "cloudflareCAPTCHAWithHTTP": ("ok", None),
    "controlFailureWithSuccessfulHTTPWebsite": ("ok", None),
    "dnsBlockingBOGON": ("blocked", "dns"),
    "dnsBlockingNXDOMAIN": ("blocked", "dns"),
    "dnsHijackingToLocalhostWithHTTPS": ("blocked", "dns"),
    "ghostDNSBlockingWithHTTP": ("blocked", "dns"),
    "httpBlockingConnectionReset": ("blocked", "dpi"),
    "httpDiffWithConsistentDNS": ("blocked", "dpi"),
    "idnaWithoutCensorshipLowercase": ("ok", None),
    "largeFileWithHTTPS": ("ok", None),
    "redirectWithConsistentDNSAndThenConnectionResetForHTTPS": ("blocked", "dpi"),
    "successWithHTTP": ("ok", None),
    "successWithHTTPS": ("ok", None),
    "tcpBlockingConnectTimeout": ("blocked", "ip"),
    "tcpBlockingConnectionRefusedWithInconsistentDNS": ("blocked", "dns"),
    "throttlingWithHTTPS": ("inconclusive", None),
    "tlsBlockingConnectionResetWithConsistentDNS": ("blocked", "dpi"),
    "websiteDownNXDOMAIN": ("down", None),
    "websiteDownTCPConnect": ("down", None),
}

#: Where the classifier disagrees with the table (none today); a gap here is an xfail(strict).
CLASSIFIER_GAPS: dict[str, str] = {}


def _load(name: str) -> dict[str, Any]:
    return json.loads((QA / f"{name}.json").read_text("utf-8"))


def _classify(m: dict[str, Any]) -> tuple[Any, list[Observation]]:
    imp = measurement_to_observations(m)
    for i, o in enumerate(imp.observations, 1):
        o.id = i
    (verdict,) = classify(imp.observations, targets=[imp.input])
    return verdict, imp.observations


def test_table_covers_every_qa_file() -> None:
    assert sorted(p.stem for p in QA.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize(("name", "expected"), [
    pytest.param(k, v, id=k, marks=[pytest.mark.xfail(strict=True, reason=f"classifier: {CLASSIFIER_GAPS[k]}")]
                 if k in CLASSIFIER_GAPS else [])
    for k, v in EXPECTED.items()
])
def test_qa_verdict(name: str, expected: tuple[str, str | None]) -> None:
    verdict, _ = _classify(_load(name))
    assert (verdict.status, verdict.mechanism) == expected, f"{verdict.rule}: {verdict.sentence}"
    assert verdict.sentence
    if verdict.status == "blocked":
        assert verdict.observations, "a blocked verdict must cite observations"


def test_cli_imports_the_qa_folder(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    res = CliRunner().invoke(main, ["import-ooni", str(QA), "--db", str(db), "--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out) == 20
    assert all({"run_id", "ooni_blocking", "status", "rule"} <= set(v) for v in out)
    store = Store(db)
    runs = store.runs()
    assert len(runs) == 20 and all(r.source == "ooni" and r.state == "done" for r in runs)
    assert sum(len(store.verdicts(r.id)) for r in runs) == 20
    first = runs[0]
    assert first.vantage["probe_cc"] == "IT" and first.vantage["probe_asn"] == "AS137"
    assert "probe_ip" not in first.vantage
    assert first.started == dt.datetime(2024, 2, 12, 20, 33, 47, tzinfo=dt.UTC).timestamp()
    # Every stored verdict points at stored observations of its run.
    for r in runs:
        ids = {o.id for o in store.observations(r.id)}
        for v in store.verdicts(r.id):
            assert set(v.observations) <= ids
    by_file = {Path(v["file"]).stem: v for v in out}
    assert by_file["dnsBlockingNXDOMAIN"]["ooni_blocking"] == "dns"
    store.close()
    # Importing what is stored already is a no-op: same runs, nothing listed.
    again = CliRunner().invoke(main, ["import-ooni", str(QA / "successWithHTTPS.json"), "--db", str(db)])
    assert again.exit_code == 0 and "already stored 1" in again.stderr
    assert len(Store(db).runs()) == 20
    table = CliRunner().invoke(main, ["import-ooni", str(QA / "successWithHTTPS.json"), "--db",
                                      str(db.with_name("fresh.db"))])
    assert table.exit_code == 0 and "ok.http" in table.stdout


def test_cli_bad_inputs_are_one_line_and_the_rest_is_imported(tmp_path: Path) -> None:
    good = (QA / "successWithHTTPS.json").read_text("utf-8")
    jl = tmp_path / "mixed.jsonl"
    jl.write_text(json.dumps(json.loads(good)) + "\n{not json\n" + json.dumps({"test_name": "ndt"}) + "\n",
                  "utf-8")
    (tmp_path / "empty.json").write_text("", "utf-8")
    res = CliRunner().invoke(main, ["import-ooni", str(tmp_path), str(tmp_path / "missing.json"),
                                    "--db", str(tmp_path / "k.db"), "--format", "json"])
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    err = res.stderr.splitlines()
    assert f"{jl}:2: not JSON" in res.stderr
    # Another OONI test is skipped by the --test filter (web_connectivity by default), not an error.
    assert f"{jl}:3" not in res.stderr and "skipped by filters 1" in res.stderr
    assert f"{tmp_path / 'empty.json'}: empty file" in res.stderr
    assert f"{tmp_path / 'missing.json'}: no such file or folder" in res.stderr
    assert len(err) == 4  # three problems and the summary line
    assert len(json.loads(res.stdout)) == 1


def test_failure_strings() -> None:
    assert map_failure("android_dns_cache_no_data") == "dns_nxdomain_error"
    assert map_failure("dns_name_error") == "dns_nxdomain_error"  # the test helper's legacy string
    assert map_failure("connection_refused_error") == "connection_refused"
    assert map_failure("connection_reset") == "connection_reset"
    assert map_failure("generic_timeout_error") == "generic_timeout_error"
    assert map_failure("eof_error") == "eof_error"
    assert map_failure("dns_no_answer") == "dns_no_answer"
    assert map_failure("ssl_failed_handshake") == "ssl_failed_handshake"
    assert map_failure("dns_lookup_error") == "unknown_failure: dns_lookup_error"
    assert map_failure(None) is None


def test_a_and_aaaa_of_one_lookup_are_one_observation() -> None:
    _, obs = _classify(_load("successWithHTTPS"))
    udp = [o for o in obs if o.step == "dns" and o.data["resolver"] == "1.1.1.1:53"]
    assert len(udp) == 1
    (o,) = udp
    # The AAAA query had no answer; the lookup succeeded through A, as netxlite's LookupHost says.
    assert o.ok and o.data["qtype"] == "A+AAAA" and o.data["addresses"] == ["93.184.216.34"]
    assert [q["failure"] for q in o.data["queries"]] == [None, "dns_no_answer"]
    system = next(o for o in obs if o.step == "dns" and o.data["resolver"] == "system")
    assert system.data["transport"] == "system" and system.data["qtype"] == "ANY"
    doh = next(o for o in obs if o.step == "dns" and o.data["transport"] == "doh")
    assert doh.data["resolver"] == "https://dns.google/dns-query"


def test_nxdomain_lookup_fails() -> None:
    _, obs = _classify(_load("dnsBlockingNXDOMAIN"))
    system = next(o for o in obs if o.step == "dns" and o.data["resolver"] == "system")
    assert system.failure == "dns_nxdomain_error" and system.data["rcode"] == "NXDOMAIN"


def test_duplicate_dns_responses_are_injection_evidence() -> None:
    m = _load("successWithHTTPS")
    q = next(q for q in m["test_keys"]["queries"] if q["engine"] == "udp" and q["query_type"] == "A")
    dup = copy.deepcopy(q)
    dup["answers"] = [{"answer_type": "A", "ipv4": "203.0.113.66", "ttl": None}]
    m["test_keys"]["x_dns_duplicate_responses"] = [dup]
    verdict, obs = _classify(m)
    o = next(o for o in obs if o.step == "dns" and o.data["resolver"] == "1.1.1.1:53")
    assert [r["addresses"] for r in o.data["responses"]] == [["93.184.216.34"], ["203.0.113.66"]]
    assert (verdict.status, verdict.mechanism, verdict.rule) == ("blocked", "dns", "dns.injected")


def test_tcp_tls_http_and_control_mapping() -> None:
    _, obs = _classify(_load("httpBlockingConnectionReset"))
    probe = [o for o in obs if o.vantage == PROBE]
    tcp = [(o.address, o.port, o.failure) for o in probe if o.step == "tcp"]
    assert tcp == [("93.184.216.34", 80, None), ("93.184.216.34", 443, None)]
    tls = next(o for o in probe if o.step == "tls")
    assert (tls.address, tls.port, tls.data["sni"], tls.data["cert_valid"]) == (
        "93.184.216.34", 443, "www.example.com", True)
    assert tls.data["version"] == "TLSv1.3" and tls.data["cipher"] == "TLS_AES_128_GCM_SHA256"
    http = next(o for o in probe if o.step == "http")
    assert http.failure == "connection_reset" and http.data["status"] is None
    control = [o for o in obs if o.vantage == CONTROL]
    assert {o.step for o in control} == {"dns", "tcp", "tls", "http"}
    chttp = next(o for o in control if o.step == "http")
    assert (chttp.data["status"], chttp.data["title"], chttp.data["body_length"]) == (200, "Default Web Page", 1533)
    assert all(o.source == "ooni" for o in obs)


def test_http_fields_and_blockpage_fingerprint() -> None:
    m = _load("httpDiffWithConsistentDNS")
    _, obs = _classify(m)
    http = next(o for o in obs if o.step == "http" and o.vantage == PROBE)
    assert (http.data["status"], http.data["title"], http.data["body_length"]) == (200, "Access Denied", 188)
    assert http.data["headers"] == {}  # the censor's page came without headers
    assert http.data["host"] == "www.example.com" and http.data["blockpage"] is None
    m["test_keys"]["requests"][0]["response"]["body"] = "<html><title>Blocked</title>Страница заблокирована</html>"
    verdict, obs = _classify(m)
    http = next(o for o in obs if o.step == "http" and o.vantage == PROBE)
    assert http.data["blockpage"] == "kz_blockpage_zablokirovana"
    assert (verdict.status, verdict.mechanism, verdict.detail) == ("blocked", "dpi", "dpi.blockpage")


def test_headers_are_flattened() -> None:
    _, obs = _classify(_load("successWithHTTP"))
    http = next(o for o in obs if o.step == "http" and o.vantage == PROBE)
    assert http.data["headers"]["Content-Type"] == "text/html; charset=utf-8"
    assert http.data["headers"]["Content-Length"] == "1533"


def test_base64_body() -> None:
    m = _load("successWithHTTP")
    resp = m["test_keys"]["requests"][0]["response"]
    raw = resp["body"].encode("utf-8")
    resp["body"] = {"format": "base64", "data": base64.b64encode(raw).decode()}
    _, obs = _classify(m)
    http = next(o for o in obs if o.step == "http" and o.vantage == PROBE)
    assert http.data["title"] == "Default Web Page" and http.data["body_length"] == len(raw)


def test_certificate_failure_is_kept_and_cert_marked_invalid() -> None:
    _, obs = _classify(_load("badSSLWithUnknownAuthorityWithConsistentDNS"))
    tls = next(o for o in obs if o.step == "tls" and o.vantage == PROBE)
    assert tls.failure == "ssl_unknown_authority"
    assert tls.data["cert_valid"] is False and tls.data["cert_failure"] == "ssl_unknown_authority"
    ctls = next(o for o in obs if o.step == "tls" and o.vantage == CONTROL)
    assert ctls.data["cert_valid"] is False


def test_peer_certificates_are_parsed() -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("ratel.example")
    from cryptography import x509

    pem = leaf.cert_chain_pems[0].bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(__import__(
        "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER)
    b64 = base64.b64encode(der).decode()
    (info,) = describe_certificates([{"format": "base64", "data": b64}])
    assert info["der_b64"] == b64
    assert "ratel.example" in info["san"]
    assert "trustme" in info["issuer"]


def test_no_control_means_no_control_observations() -> None:
    m = _load("controlFailureWithSuccessfulHTTPWebsite")
    imp = measurement_to_observations(m)
    assert not imp.has_control
    assert imp.options["control_failure"] == "connection_reset"
    assert imp.options["ooni_blocking"] is None and imp.options["ooni_accessible"] is None


def test_timing_from_t0_and_t() -> None:
    m = _load("successWithHTTPS")
    tc = m["test_keys"]["tcp_connect"][0]
    tc["t0"], tc["t"] = 1.5, 1.75
    imp = measurement_to_observations(m)
    tcp = next(o for o in imp.observations if o.step == "tcp")
    assert tcp.t_start == pytest.approx(imp.started + 1.5) and tcp.t_end == pytest.approx(imp.started + 1.75)


def test_redirect_chain_is_folded_into_the_measured_request() -> None:
    _, obs = _classify(_load("redirectWithConsistentDNSAndThenConnectionResetForHTTPS"))
    http = next(o for o in obs if o.step == "http" and o.purpose == "measure")
    assert http.failure == "connection_reset"  # the TLS handshake to the redirect target was reset
    assert http.data["hops"][0]["status"] == 308
    other = [o for o in obs if o.domain == "www.example.com"]
    assert other and all(o.purpose == REDIRECT for o in other)
    _, obs = _classify(_load("idnaWithoutCensorshipLowercase"))
    http = next(o for o in obs if o.step == "http" and o.purpose == "measure")
    assert http.ok and http.data["status"] == 200 and http.data["redirects"] == ["https://yandex.com/",
                                                                                  "https://ya.ru/"]


def test_redirect_chain_failure_is_attributed_to_the_failing_hop() -> None:
    """bit.ly answers 308 to www.example.com, whose TLS handshake (hop 1) is reset; control
    fetched the page at the chain's end: SNI-based DPI on the redirect target, not an HTTP reset."""
    verdict, obs = _classify(_load("redirectWithConsistentDNSAndThenConnectionResetForHTTPS"))
    assert (verdict.rule, verdict.detail) == ("redirect.dpi", "dpi.tls_reset"), verdict.sentence
    cited = [o for o in obs if o.id in verdict.observations]
    reset = [o for o in cited if o.step == "tls" and o.vantage == PROBE]
    assert reset and all(o.purpose == REDIRECT and o.data["hop"] == 1 and o.domain == "www.example.com"
                         for o in reset)
    assert any(o.vantage == CONTROL for o in cited)
    assert "hop 1" in verdict.sentence and "www.example.com" in verdict.sentence


def test_redirect_hops_carry_their_hop_number() -> None:
    _, obs = _classify(_load("idnaWithoutCensorshipLowercase"))
    hops = sorted({(o.domain, o.data["hop"]) for o in obs if o.purpose == REDIRECT})
    assert hops == [("ya.ru", 2), ("yandex.com", 1)]
    first = next(o for o in obs if o.step == "http" and o.purpose == REDIRECT and o.data["hop"] == 1)
    assert first.data["status"] == 308 and first.data["redirect_to"] == "https://ya.ru/"


def _as_v04(m: dict[str, Any]) -> dict[str, Any]:
    """The measurement as Web Connectivity 0.4 wrote it: no depth tags, and only the input's own
    DNS/TCP/TLS steps (0.4's HTTP client follows redirects without recording them apart)."""
    m = copy.deepcopy(m)
    tk = m["test_keys"]
    for key in ("queries", "tcp_connect", "tls_handshakes"):
        tk[key] = [e for e in tk.get(key) or [] if "depth=0" in (e.get("tags") or []) or not e.get("tags")]
    for e in tk["requests"]:
        e["tags"] = [t for t in e.get("tags") or [] if not t.startswith("depth=")]
    return m


def test_v04_redirect_chain_is_rebuilt_from_locations() -> None:
    verdict, obs = _classify(_as_v04(_load("idnaWithoutCensorshipLowercase")))
    assert verdict.status == "ok", verdict.sentence
    hops = sorted((o.data["hop"], o.domain) for o in obs if o.step == "http" and o.purpose == REDIRECT)
    assert hops == [(1, "yandex.com"), (2, "ya.ru")]


def test_v04_redirect_chain_broken_at_hop_2_is_attributed() -> None:
    """0.4 lists the failed last request first, with its failure and no response."""
    m = _as_v04(_load("idnaWithoutCensorshipLowercase"))
    last = m["test_keys"]["requests"][0]
    assert last["request"]["url"] == "https://ya.ru/"
    last["failure"], last["response"] = "connection_reset", None
    verdict, obs = _classify(m)
    assert (verdict.status, verdict.rule, verdict.detail) == ("blocked", "redirect.dpi", "dpi.http_reset"), \
        verdict.sentence
    assert "hop 2" in verdict.sentence and "ya.ru" in verdict.sentence
    # A list whose Locations do not link up is not taken for a chain.
    m["test_keys"]["requests"][1]["response"]["headers_list"] = []
    m["test_keys"]["requests"][1]["response"]["headers"] = {}
    _, obs = _classify(m)
    assert not [o for o in obs if o.step == "http" and o.purpose == REDIRECT]


def test_http_features_are_the_feature_layers() -> None:
    """The importer's HTTP keys are http_features' for the same (decoded, as OONI stores them) bytes."""
    from kzprobe.analysis.features import http_features

    m = _load("successWithHTTP")
    resp = m["test_keys"]["requests"][0]["response"]
    body = "<html><head><title>\n Главная\tстраница </title></head><body>" + "слово " * 3000 + "</body></html>"
    resp["body"] = body
    resp["headers"] = {"Content-Type": "text/html; charset=utf-8", "Content-Encoding": "gzip"}
    resp["headers_list"] = [["Content-Type", "text/html; charset=utf-8"], ["Content-Encoding", "gzip"]]
    _, obs = _classify(m)
    http = next(o for o in obs if o.step == "http" and o.vantage == PROBE)
    want = http_features(200, {"Content-Type": "text/html; charset=utf-8"}, body.encode())
    for key in ("title", "body_length", "body_sha256", "body_head", "truncated", "blockpage"):
        assert http.data[key] == want[key], key
    assert http.data["title"] == "Главная страница"
    assert http.data["content_encoding"] == "gzip"  # as sent; OONI already undid it


def test_type_wrong_fields_are_one_line_problems(tmp_path: Path) -> None:
    m = _load("successWithHTTP")
    m["test_keys"]["requests"][0]["response"]["x_kzprobe"] = {"title": 5}
    with pytest.raises(Exception) as exc:
        measurement_to_observations(m)
    assert str(exc.value) == "malformed test_keys: http data.title must be a string or null, not a number"


def test_reader_accepts_jsonl_in_dot_json_and_lists(tmp_path: Path) -> None:
    m = json.loads((QA / "successWithHTTP.json").read_text("utf-8"))
    f = tmp_path / "two.json"
    f.write_text(json.dumps(m) + "\n" + json.dumps(m) + "\n", "utf-8")
    items = list(read_measurements([f]))
    assert [w for w, _ in items if not isinstance(_, Problem)] == [f"{f}:1", f"{f}:2"]  # type: ignore[misc]
    bad = copy.deepcopy(m)
    bad["test_keys"]["queries"] = "nope"
    f2 = tmp_path / "bad.json"
    f2.write_text(json.dumps(bad), "utf-8")
    (p,) = list(read_measurements([f2]))
    assert isinstance(p, Problem) and "queries" in str(p)
