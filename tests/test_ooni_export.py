"""``kzprobe export``: OONI output that ``kzprobe import-ooni`` reads back to the same verdicts.

Two round trips (acceptance 4): the 20 OONI QA files (import -> export -> import), and a
synthetic live-like run built from observations with what OONI's format cannot say directly:
follow-ups with a benign SNI / Host, retries, several DNS responses to one query, a blockpage,
and a TLS handshake that completed with a certificate that does not validate.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kzprobe.analysis import Context, classify
from kzprobe.cli import main
from kzprobe.model import CONTROL, FOLLOWUP, Observation, Target, Verdict
from kzprobe.ooni.exporter import ooni_blocking
from kzprobe.storage import Store

QA = Path(__file__).resolve().parents[1].parent / "shared" / "ooni-qa"
T0 = 1_750_000_000.0


def _key(v: Verdict | dict[str, Any]) -> tuple[Any, ...]:
    d = v.to_dict() if isinstance(v, Verdict) else v
    return d["target"], d["status"], d["mechanism"], d["detail"]


def _cli(*args: str) -> Any:
    res = CliRunner().invoke(main, list(args))
    assert "Traceback" not in res.output
    return res


def _stored(db: Path) -> list[tuple[Any, ...]]:
    store = Store(db)
    try:
        return [_key(v) for r in store.runs() for v in store.verdicts(r.id)]
    finally:
        store.close()


def test_qa_round_trip(tmp_path: Path) -> None:
    db1, db2, out = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "qa.jsonl"
    assert _cli("import-ooni", str(QA), "--db", str(db1), "--format", "json").exit_code == 0
    res = _cli("export", "--db", str(db1), "--all", "--format", "ooni", "--out", str(out))
    assert res.exit_code == 0, res.output
    lines = out.read_text("utf-8").splitlines()
    assert len(lines) == 20
    for line in lines:
        m = json.loads(line)
        assert m["test_name"] == "web_connectivity" and m["data_format_version"] == "0.2.0"
        assert m["software_name"] == "kzprobe" and m["probe_cc"] == "IT" and m["probe_asn"] == "AS137"
        assert m["measurement_start_time"] == "2024-02-12 20:33:47"
        assert (m["test_keys"]["blocking"], m["test_keys"]["accessible"]) == ooni_blocking(
            Verdict(**{k: v for k, v in m["test_keys"]["x_kzprobe_verdict"].items()
                       if k in ("target", "domain", "status", "mechanism", "detail", "rule")}, sentence=""))
    res = _cli("import-ooni", str(out), "--db", str(db2), "--format", "json")
    assert res.exit_code == 0, res.output
    first, second = _stored(db1), _stored(db2)
    assert len(first) == 20
    assert second == first
    # Not only the verdicts: the observations the rules read come back the same.
    s1, s2 = Store(db1), Store(db2)
    try:
        for r1, r2 in zip(s1.runs(), s2.runs(), strict=True):
            assert [_obs_key(o) for o in s1.observations(r1.id)] == [_obs_key(o) for o in s2.observations(r2.id)]
    finally:
        s1.close()
        s2.close()


def _obs_key(o: Observation) -> tuple[Any, ...]:
    d = o.data
    keep = ("resolver", "transport", "addresses", "responses", "sni", "cert_valid", "cert_failure", "status",
            "title", "body_length", "blockpage", "host", "redirects")
    return (o.step, o.vantage, o.purpose, o.domain, o.address, o.port, o.failure, o.attempt,
            round(o.t_start, 3), round(o.t_end, 3), {k: d.get(k) for k in keep})


# --- a synthetic live-like run --------------------------------------------------------------------
def _o(step: str, target: str, domain: str, t: float, **kw: Any) -> Observation:
    return Observation(step=step, target=target, domain=domain, source="live", t_start=T0 + t, t_end=T0 + t + 0.1,
                       **kw)


def _dns(target: str, domain: str, addresses: list[str], vantage: str = "probe",
         responses: list[list[str]] | None = None, failure: str | None = None) -> Observation:
    resolver = "control" if vantage == CONTROL else "198.51.100.53:53"
    return _o("dns", target, domain, 0.0, vantage=vantage, failure=failure, data={
        "resolver": resolver, "transport": "udp", "qtype": "A+AAAA", "rcode": "NOERROR" if not failure else "NXDOMAIN",
        "answers": [{"type": "A", "name": domain, "data": a, "ttl": 60} for a in addresses],
        "addresses": addresses,
        "responses": [{"rcode": "NOERROR", "addresses": r} for r in (responses or [addresses])],
    })


def _tls(target: str, domain: str, address: str, failure: str | None = None, sni: str | None = None,
         purpose: str = "measure", attempt: int = 0, vantage: str = "probe", cert_valid: bool | None = True,
         cert_failure: str | None = None, issuer: str = "CN=Lab CA") -> Observation:
    data: dict[str, Any] = {"sni": sni or domain}
    if failure is None:
        data.update(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", alpn="http/1.1", certificates=[],
                    cert_valid=cert_valid, cert_failure=cert_failure, issuer=issuer)
    return _o("tls", target, domain, 0.2 + attempt, address=address, port=443, failure=failure, purpose=purpose,
              attempt=attempt, vantage=vantage, data=data)


def _tcp(target: str, domain: str, address: str, port: int = 443, vantage: str = "probe",
         failure: str | None = None, attempt: int = 0) -> Observation:
    return _o("tcp", target, domain, 0.1 + attempt, address=address, port=port, vantage=vantage, failure=failure,
              attempt=attempt)


def _http(target: str, domain: str, address: str | None, *, status: int | None = 200, title: str = "Home",
          body: str = "<title>Home</title>", length: int = 5000, failure: str | None = None,
          host: str | None = None, purpose: str = "measure", vantage: str = "probe", attempt: int = 0,
          blockpage: str | None = None, port: int = 443, redirects: list[str] | None = None) -> Observation:
    data: dict[str, Any] = {"url": target, "host": host or domain}
    if failure is None:
        data.update(status=status, headers={"Content-Type": "text/html"}, title=title, body_length=length,
                    body_sha256="0" * 64, body_head=body, truncated=False, blockpage=blockpage,
                    redirects=redirects or [])
    return _o("http", target, domain, 0.4 + attempt, address=address, port=port if address else None,
              failure=failure, purpose=purpose, vantage=vantage, attempt=attempt, data=data)


def _control(target: str, domain: str, address: str, port: int = 443) -> list[Observation]:
    out = [_dns(target, domain, [address], vantage=CONTROL), _tcp(target, domain, address, port, vantage=CONTROL)]
    if port == 443:
        out.append(_tls(target, domain, address, vantage=CONTROL))
    return [*out, _http(target, domain, None, vantage=CONTROL)]


def live_run() -> tuple[list[str], list[Observation], dict[str, tuple[str, str | None, str | None]]]:
    """Observations of a live-like run and the verdict each target must get (rule-level expectations)."""
    obs: list[Observation] = []
    expect: dict[str, tuple[str, str | None, str | None]] = {}

    # SNI reset, seen twice; the same address with SNI example.com completes (follow-up).
    t, d, a = "https://sni.example.kz/", "sni.example.kz", "203.0.113.10"
    obs += [_dns(t, d, [a]), _tcp(t, d, a), _tls(t, d, a, failure="connection_reset"),
            _tcp(t, d, a, attempt=1), _tls(t, d, a, failure="connection_reset", attempt=1),
            _tls(t, d, a, sni="example.com", purpose=FOLLOWUP), *_control(t, d, a)]
    expect[t] = ("blocked", "dpi", "dpi.tls_reset")

    # A second, forged DNS response with another address.
    t, d, a = "https://inject.example.kz/", "inject.example.kz", "203.0.113.11"
    obs += [_dns(t, d, ["198.51.100.66"], responses=[["198.51.100.66"], [a]]), *_control(t, d, a)]
    expect[t] = ("blocked", "dns", "dns.injected")

    # A blockpage at a consistent address (injected by DPI), matched on the full body.
    t, d, a = "http://page.example.kz/", "page.example.kz", "203.0.113.12"
    obs += [_dns(t, d, [a]), _tcp(t, d, a, 80),
            _http(t, d, a, port=80, title="Blocked", body="<html><title>Blocked</title>", length=900,
                  blockpage="kz_blockpage_zablokirovana"), *_control(t, d, a, 80)]
    expect[t] = ("blocked", "dpi", "dpi.blockpage")

    # TLS interception: the handshake completed, the chain does not validate, control's does.
    t, d, a = "https://mitm.example.kz/", "mitm.example.kz", "203.0.113.13"
    obs += [_dns(t, d, [a]), _tcp(t, d, a),
            _tls(t, d, a, cert_valid=False, cert_failure="ssl_unknown_authority", issuer="CN=Qaznet Trust Network"),
            _http(t, d, a, title="Home"), *_control(t, d, a)]
    expect[t] = ("blocked", "dpi", "dpi.tls_mitm")

    # HTTP reset on Host = target; the same address with Host example.com answers.
    t, d, a = "http://host.example.kz/", "host.example.kz", "203.0.113.14"
    obs += [_dns(t, d, [a]), _tcp(t, d, a, 80), _http(t, d, a, port=80, failure="connection_reset"),
            _http(t, d, a, port=80, host="example.com", purpose=FOLLOWUP, title="Example"),
            *_control(t, d, a, 80)]
    expect[t] = ("blocked", "dpi", "dpi.http_reset")

    # CDN / geo-DNS: another address than control's, with a valid certificate: ok.
    t, d = "https://cdn.example.kz/", "cdn.example.kz"
    obs += [_dns(t, d, ["203.0.113.20"]), _tcp(t, d, "203.0.113.20"), _tls(t, d, "203.0.113.20"),
            _http(t, d, "203.0.113.20", redirects=["https://cdn.example.kz/home"]),
            *_control(t, d, "203.0.113.21")]
    expect[t] = ("ok", None, None)

    # Down for everyone.
    t, d, a = "https://down.example.kz/", "down.example.kz", "203.0.113.30"
    obs += [_dns(t, d, [a]), _tcp(t, d, a, failure="connection_refused"),
            _tcp(t, d, a, failure="connection_refused", attempt=1),
            _dns(t, d, [a], vantage=CONTROL), _tcp(t, d, a, vantage=CONTROL, failure="connection_refused"),
            _http(t, d, None, vantage=CONTROL, failure="connection_refused")]
    expect[t] = ("down", None, "down")
    return list(expect), obs, expect


def _store_live(db: Path) -> tuple[int, list[Verdict]]:
    targets, obs, expect = live_run()
    store = Store(db)
    try:
        run = store.new_run(source="live", vantage={"probe_cc": "KZ", "probe_asn": "AS9198"}, started=T0)
        store.add_targets(run, [Target(url=t) for t in targets])
        store.add_observations(run, obs)
        verdicts = classify(obs, Context(control_configured=True), targets=targets)
        store.set_verdicts(run, verdicts)
        store.finish_run(run, ended=T0 + 10)
    finally:
        store.close()
    # The run must exercise what it is meant to, or the round trip proves nothing.
    assert {v.target: (v.status, v.mechanism, v.detail) for v in verdicts} == expect, [
        (v.target, v.rule, v.sentence) for v in verdicts]
    return run, verdicts


def test_live_run_round_trip(tmp_path: Path) -> None:
    db1, db2, out = tmp_path / "live.db", tmp_path / "back.db", tmp_path / "live.jsonl"
    run, verdicts = _store_live(db1)
    res = _cli("export", "--db", str(db1), "--run", str(run), "--format", "ooni", "--out", str(out))
    assert res.exit_code == 0, res.output
    ms = {m["input"]: m for m in map(json.loads, out.read_text("utf-8").splitlines())}
    assert len(ms) == len(verdicts)
    # What OONI tooling sees.
    sni = ms["https://sni.example.kz/"]
    assert sni["probe_cc"] == "KZ" and sni["test_keys"]["blocking"] == "http-failure"
    follow = [h for h in sni["test_keys"]["tls_handshakes"] if "kzprobe_followup" in h["tags"]]
    assert [h["server_name"] for h in follow] == ["example.com"] and follow[0]["failure"] is None
    assert sni["test_keys"]["x_kzprobe_verdict"]["detail"] == "dpi.tls_reset"
    assert sni["test_keys"]["control"]["tls_handshake"]["203.0.113.10:443"]["status"] is True
    inj = ms["https://inject.example.kz/"]["test_keys"]
    assert inj["blocking"] == "dns"
    assert inj["x_dns_duplicate_responses"][0]["answers"][0]["ipv4"] == "203.0.113.11"
    mitm = next(h for h in ms["https://mitm.example.kz/"]["test_keys"]["tls_handshakes"])
    assert mitm["failure"] == "ssl_unknown_authority" and mitm["x_kzprobe_handshake_completed"] is True
    assert ms["http://page.example.kz/"]["test_keys"]["blocking"] == "http-diff"
    assert ms["https://cdn.example.kz/"]["test_keys"]["accessible"] is True
    assert (ms["https://down.example.kz/"]["test_keys"]["blocking"],
            ms["https://down.example.kz/"]["test_keys"]["accessible"]) == (False, False)
    # And kzprobe reads it back to the same verdicts.
    res = _cli("import-ooni", str(out), "--db", str(db2), "--format", "json")
    assert res.exit_code == 0, res.output
    back = {v["target"]: _key(v) for v in json.loads(res.stdout)}
    assert back == {v.target: _key(v) for v in verdicts}
    # Follow-ups and retries survive as such (not only the verdict).
    store = Store(db2)
    try:
        # One OONI measurement per target, hence one run per target on the way back.
        assert len(store.runs()) == len(verdicts)
        obs = [o for r in store.runs() for o in store.observations(r.id, "https://sni.example.kz/")]
    finally:
        store.close()
    assert [(o.purpose, o.attempt, o.failure) for o in obs if o.step == "tls" and o.vantage == "probe"] == [
        ("measure", 0, "connection_reset"), ("measure", 1, "connection_reset"), ("followup", 0, None)]


def test_jsonl_and_csv(tmp_path: Path) -> None:
    db = tmp_path / "live.db"
    run, verdicts = _store_live(db)
    res = _cli("export", "--db", str(db), "--format", "jsonl")  # the latest run by default
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    _, obs, _ = live_run()
    assert len(rows) == len(obs) and all(r["run_id"] == run for r in rows)
    assert [Observation.from_dict(r).step for r in rows] == [o.step for o in obs]
    res = _cli("export", "--db", str(db), "--run", str(run), "--format", "csv")
    assert res.exit_code == 0, res.output
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [(r["target"], r["status"], r["mechanism"] or None, r["rule"]) for r in table] == [
        (v.target, v.status, v.mechanism, v.rule) for v in verdicts]


def test_export_errors(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    res = _cli("export", "--db", str(db), "--format", "ooni")
    assert res.exit_code == 1 and "no runs in" in res.output and len(res.output.splitlines()) == 1
    _store_live(db)
    res = _cli("export", "--db", str(db), "--run", "99", "--format", "ooni")
    assert res.exit_code == 1 and "no run 99" in res.output
    res = _cli("export", "--db", str(db), "--run", "1", "--all", "--format", "ooni")
    assert res.exit_code == 2 and "exclusive" in res.output
    res = _cli("export", "--db", str(db), "--format", "ooni", "--out", str(tmp_path / "no" / "such" / "f"))
    assert res.exit_code == 1 and "No such file" in res.output


@pytest.mark.parametrize(("status", "mechanism", "detail", "expected"), [
    ("ok", None, None, (False, True)),
    ("down", None, "down", (False, False)),
    ("inconclusive", None, "inconclusive", (None, None)),
    ("blocked", "dns", "dns.nxdomain", ("dns", False)),
    ("blocked", "dns", "dns.blockpage", ("dns", False)),
    ("blocked", "ip", "ip.tcp_timeout", ("tcp_ip", False)),
    ("blocked", "dpi", "dpi.tls_reset", ("http-failure", False)),
    ("blocked", "dpi", "dpi.tls_mitm", ("http-failure", False)),
    ("blocked", "dpi", "dpi.http_diff", ("http-diff", False)),
    ("blocked", "dpi", "dpi.blockpage", ("http-diff", False)),
])
def test_ooni_blocking_mapping(status: str, mechanism: str | None, detail: str | None,
                               expected: tuple[Any, Any]) -> None:
    v = Verdict(target="t", domain="d", status=status, rule="r", sentence="", mechanism=mechanism, detail=detail)
    assert ooni_blocking(v) == expected
