"""`kzprobe report` and `kzprobe verdicts`: the claim beside the measurement, and a stored trace
beside the verdict of the traced target (trace issue, acceptance 4)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from kzprobe.analysis import classify
from kzprobe.cli import main
from kzprobe.model import Claim, Observation, Target
from kzprobe.storage import Store

CENTRACE = Path(__file__).resolve().parents[1].parent / "shared" / "real-pcaps" / "centrace"


def _stored_run(db: Path) -> int:
    store = Store(db)
    rid = store.new_run(vantage={"network_name": "test"})
    target = Target("http://www.nifty.org/", "POLR", Claim("a quote from the report", "Blocking", "63", "2014",
                                                           "domain-based"))
    store.add_targets(rid, [target])
    obs = [
        Observation("dns", target.url, "www.nifty.org", data={"resolver": "sys", "addresses": ["188.65.24.82"]}),
        Observation("tcp", target.url, "www.nifty.org", address="188.65.24.82", port=80),
        Observation("http", target.url, "www.nifty.org", address="188.65.24.82", port=80,
                    failure="connection_reset", data={"host": "www.nifty.org"}),
        Observation("http", target.url, "www.nifty.org", address="188.65.24.82", port=80, purpose="followup",
                    data={"host": "example.com", "status": 200}),
    ]
    store.add_observations(rid, obs)
    store.set_verdicts(rid, classify(obs, targets=[target.url]))
    return rid


def test_report_shows_claim_verdict_and_trace(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    rid = _stored_run(db)
    runner = CliRunner()
    traced = runner.invoke(main, [
        "trace", "--from-pcap", str(CENTRACE / "188.65.24.82_www.nifty.org_www.nifty.org.pcap"),
        "--control", str(CENTRACE / "188.65.24.82_www.nifty.org_example.com.pcap"),
        "--store", "--db", str(db), "--run", str(rid), "--format", "json"])
    assert traced.exit_code == 0, traced.output
    md = runner.invoke(main, ["report", "--db", str(db), "--run", str(rid), "--format", "markdown"])
    assert md.exit_code == 0, md.output
    row = next(line for line in md.output.splitlines() if line.startswith("| http://www.nifty.org/"))
    # The verdict and, on the same row, where the trace located the censor.
    assert "| blocked | dpi | dpi.http_reset |" in row
    assert "134.0.217.233" in row and "censor at hop" in row
    # The report's claim, then what was measured.
    assert "> a quote from the report" in md.output
    assert "**Measured:** blocked/dpi" in md.output
    term = runner.invoke(main, ["report", "--db", str(db), "--run", str(rid)], env={"COLUMNS": "400"})
    assert term.exit_code == 0 and "134.0.217.233" in term.output


def test_verdicts_json_and_csv(tmp_path: Path) -> None:
    db = tmp_path / "v.db"
    rid = _stored_run(db)
    out = CliRunner().invoke(main, ["verdicts", "--db", str(db), "--run", str(rid), "--format", "json"])
    assert out.exit_code == 0, out.output
    (v,) = json.loads(out.output)["verdicts"]
    assert {k: v[k] for k in ("target", "status", "mechanism", "detail", "rule")} == {
        "target": "http://www.nifty.org/", "status": "blocked", "mechanism": "dpi", "detail": "dpi.http_reset",
        "rule": "dpi.http_followup"}
    assert v["evidence"]["observations"], "evidence must point at stored observations"
    stored = {o.id for o in Store(db).observations(rid)}
    assert set(v["evidence"]["observations"]) <= stored
    csv_out = CliRunner().invoke(main, ["verdicts", "--db", str(db), "--format", "csv"])
    assert csv_out.exit_code == 0 and "dpi.http_followup" in csv_out.output


def test_unknown_run_and_bad_db_are_one_line_errors(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    _stored_run(db)
    out = CliRunner().invoke(main, ["verdicts", "--db", str(db), "--run", "99"])
    assert out.exit_code == 1 and "no run 99" in out.output and "Traceback" not in out.output
    empty = CliRunner().invoke(main, ["report", "--db", str(tmp_path / "new.db")])
    assert empty.exit_code == 1 and "no such database" in empty.output  # a --db typo is not a new database
    assert not (tmp_path / "new.db").exists()


# --- the circumvention section (issue 15, acceptance 4) -----------------------------------------------


def test_report_json_circumvention_section(tmp_path: Path) -> None:
    from kzprobe.tests.support import circdb

    db = tmp_path / "circ.db"
    built = circdb.build(db)
    r = CliRunner().invoke(main, ["report", "--db", str(db), "--format", "json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    circ = rep["circumvention"]
    names = [n["name"] for n in rep["networks"]]
    rows = {row["target"]: row for row in circ["rows"]}
    # Every target of the database is one of the section's, in the right group.
    assert set(rows) == {u for u, _ in built["cells"]}
    assert {u: rows[u]["group"] for u in (circdb.TOR_OR, circdb.TOR_DIR, circdb.PROXY, circdb.PSIPHON,
                                          circdb.OPERA, circdb.WA[0])} == {
        circdb.TOR_OR: "tor", circdb.TOR_DIR: "tor", circdb.PROXY: "proxies", circdb.PSIPHON: "proxies",
        circdb.OPERA: "proxies", circdb.WA[0]: "messaging"}
    assert rows[circdb.OPERA]["role"] == "control"  # the report: Opera's proxies still worked
    assert rows[circdb.TOR_OR]["claim"]["footnote"] == "94"  # moria1 is in the built-in tor list
    # Per cell: the latest verdict's detail and the blocked/total counts the database holds.
    for (url, net), want in built["cells"].items():
        cell = next(c for c in rows[url]["cells"] if names[c["net"]] == net)
        assert (cell["status"], cell["detail"], cell["blocked"], cell["total"]) == (
            want["status"], want["detail"], want["blocked"], want["total"]), (url, net)
        if want["status"] == "blocked":
            assert cell["sentence"] == want["sentence"]
    kt = next(c for c in rows[circdb.TOR_OR]["cells"] if names[c["net"]] == "Kazakhtelecom")
    assert kt["detail"] == "dpi.tls_fingerprint" and "Tor-like ClientHello was reset" in kt["sentence"]
    # The report's claims beside the measurements, per network.
    agree = {c["key"]: {names[m["net"]]: m["agreement"] for m in c["measured"]} for c in circ["claims"]}
    assert agree == {
        "tor-dpi": {"Kazakhtelecom": "agrees", "Beeline KZ": "differs", "Алма ТВ": "differs"},
        "proxies-blocked": {"Kazakhtelecom": "agrees", "Beeline KZ": "differs", "Алма ТВ": "differs"},
        "opera-vpn-open": {"Kazakhtelecom": "agrees", "Beeline KZ": "differs", "Алма ТВ": "agrees"},
        "messaging-outage": {"Kazakhtelecom": "agrees", "Beeline KZ": "differs", "Алма ТВ": "differs"},
    }
    claims = {c["key"]: c for c in circ["claims"]}
    assert claims["tor-dpi"]["footnote"] == "94" and claims["messaging-outage"]["footnote"] == "32"
    assert claims["opera-vpn-open"]["footnote"] == "92"
    why = {names[m["net"]]: m["why"] for m in claims["tor-dpi"]["measured"]}
    assert "ip.tcp_refused, ip.tcp_timeout" in why["Beeline KZ"]
    # The outage: Kazakhtelecom's endpoints failed from +600 s to +3610 s of day 2's run and were
    # fine again at +7200 s; Beeline's never were.
    outage = {names[o["net"]]: o for o in circ["outage"]}
    day2_kt = circdb.T0 + circdb.DAY
    assert outage["Kazakhtelecom"]["ended"] is True
    assert outage["Kazakhtelecom"]["minutes"] == round((3610 - 600) / 60, 1)
    assert outage["Kazakhtelecom"]["blocked_from"] == _iso(day2_kt + 600)
    assert outage["Kazakhtelecom"]["blocked_targets"] == 2
    assert outage["Beeline KZ"]["ended"] is False and outage["Beeline KZ"]["blocked_targets"] == 3
    assert outage["Алма ТВ"]["blocked_targets"] == 0 and outage["Алма ТВ"]["ok_targets"] == 4


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
