"""`kzprobe report --format html`: the analyst's page, checked in a real browser (Debian's chromium,
driven headless by Playwright).

The database is built here, run by run, with verdicts whose counts are known from how it was
built (a table below), plus the 20 real OONI QA measurements imported with ``kzprobe
import-ooni``.  The page must load from file:// without a console error or a single network
request, show those counts, open the evidence of a blocked cell with its rule and observation
ids, draw every plot, and set the 2014 report's Ratel.kz claim beside the measurement with the
stored trace's backbone hop.

The lab acceptance test (several ``kzprobe run``s in the kz2014 lab with different network
names, a stored trace, the OONI files) is at the end; it needs root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kzprobe.cli import main
from kzprobe.model import Observation, Target, Verdict
from kzprobe.storage import Store

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OONI_QA = SHARED / "ooni-qa"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DAY = 86400
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z

# network -> (name, asn, country); the third name is Cyrillic on purpose (labels, plots).
NETS = [("Kazakhtelecom", "AS9198", "KZ"), ("Beeline KZ", "AS21299", "KZ"), ("Алма ТВ", "AS35104", "KZ")]
# target -> per network, per day (3 days): the verdict label stored.  "-" = not measured.
PLAN: dict[str, list[list[str]]] = {
    "http://ratel.kz/": [["dpi", "dpi", "dpi"], ["ok", "dpi", "dpi"], ["ok", "ok", "ok"]],
    "https://avaaz.org/": [["dns", "dns", "dns"], ["dns", "dns", "ok"], ["ok", "ok", "ok"]],
    "https://www.livejournal.com/": [["nx", "nx", "nx"], ["nx", "nx", "nx"], ["nx", "-", "nx"]],
    "https://bambuser.com/": [["ip", "ip", "ip"], ["ok", "ok", "ok"], ["ip", "ip", "down"]],
    "https://www.facebook.com/": [["ok", "ok", "ok"], ["mitm", "mitm", "mitm"], ["ok", "ok", "ok"]],
    "https://kolesa.kz/": [["ok", "ok", "ok"], ["ok", "ok", "ok"], ["ok", "ok", "ok"]],
    "http://uralskweek.kz/": [["ok", "ok", "ok"], ["ok", "ok", "ok"], ["ok", "ok", "ok"]],
    # Also in the OONI QA files (down there): the same site seen by two sources.
    "https://untrusted-root.badssl.com/": [["ok"] * 3, ["ok"] * 3, ["ok"] * 3],
    # A hostile name: must be shown as text, never run as markup.
    "http://evil.example/?q=</script><img src=x onerror=alert(1)>": [["ok"] * 3, ["ok"] * 3, ["ok"] * 3],
}
CATEGORY = {"http://ratel.kz/": "NEWS", "https://avaaz.org/": "GRP", "https://bambuser.com/": "MMED"}
# label -> (status, mechanism, detail, rule)
LABEL = {
    "ok": ("ok", None, None, "ok.http"), "down": ("down", None, None, "down.everywhere"),
    "dpi": ("blocked", "dpi", "dpi.tls_reset", "dpi.tls_reset"),
    "dns": ("blocked", "dns", "dns.blockpage", "dns.blockpage"),
    "nx": ("blocked", "dns", "dns.nxdomain", "dns.nxdomain"),
    "ip": ("blocked", "ip", "ip.tcp_timeout", "ip.tcp_timeout"),
    "mitm": ("blocked", "dpi", "dpi.tls_mitm", "dpi.tls_mitm"),
}
TRACE = {
    "target": "ratel.kz", "address": "203.0.113.11", "trigger": "tls", "result": "censor_located", "hop_ttl": 3,
    "hop_address": "100.64.0.3", "placement": "in-path", "triggered_by": "domain", "rule": "trace.rst_in_path",
    "evidence": {"sentence": "TTL 3 and beyond: RST to the ClientHello for ratel.kz; example.com passes."},
    "hops": {"test": [{"ttl": 1, "kind": "icmp_time_exceeded", "router": "100.64.0.1"},
                      {"ttl": 2, "kind": "icmp_time_exceeded", "router": "100.64.0.2"},
                      {"ttl": 3, "kind": "rst", "responder": "203.0.113.11", "detail": "1 RST"}],
             "control": [{"ttl": 1, "kind": "icmp_time_exceeded", "router": "100.64.0.1"},
                         {"ttl": 2, "kind": "icmp_time_exceeded", "router": "100.64.0.2"},
                         {"ttl": 3, "kind": "icmp_time_exceeded", "router": "100.64.0.3"},
                         {"ttl": 4, "kind": "server_hello", "responder": "203.0.113.11"}]},
}


def _observations(url: str, label: str) -> list[Observation]:
    """What a probe and its control would have seen for this label (the evidence panel's input)."""
    host = Target(url).host
    probe_dns = {"resolver": "100.64.0.53:53", "transport": "udp", "qtype": "A", "rcode": "NOERROR",
                 "addresses": ["203.0.113.10"]}
    obs = [Observation("dns", url, host, data=probe_dns),
           Observation("dns", url, host, vantage="control", data={**probe_dns, "resolver": "helper"})]
    if label == "nx":
        obs[0].failure, obs[0].data = "dns_nxdomain_error", {**probe_dns, "rcode": "NXDOMAIN", "addresses": []}
    elif label == "dns":
        obs[0].data = {**probe_dns, "addresses": ["100.64.0.80"]}
        obs.append(Observation("http", url, host, address="100.64.0.80", port=80, data={
            "status": 200, "title": "Доступ ограничен", "blockpage": "kz_isp_blockpage",
            "body_head": "<html><title>Доступ ограничен</title><p>Ресурс заблокирован по решению суда.</p>"}))
    elif label == "dpi":
        obs.append(Observation("tls", url, host, address="203.0.113.11", port=443, failure="connection_reset",
                               data={"sni": host}))
        obs.append(Observation("tls", url, host, address="203.0.113.11", port=443, purpose="followup",
                               data={"sni": "example.com", "cert_valid": True}))
    elif label == "mitm":
        obs.append(Observation("tls", url, host, address="203.0.113.15", port=443, data={
            "sni": host, "issuer": "CN=Qaznet Trust Network", "cert_valid": False,
            "cert_failure": "ssl_unknown_authority",
            "certificates": [{"subject": f"CN={host}", "issuer": "CN=Qaznet Trust Network"}]}))
    elif label in ("ip", "down"):
        obs.append(Observation("tcp", url, host, address="203.0.113.13", port=443, failure="generic_timeout_error"))
    else:
        obs.append(Observation("http", url, host, address="203.0.113.10", port=443,
                               data={"status": 200, "title": "Уральская неделя" if "uralsk" in url else host}))
    obs.append(Observation("http", url, host, vantage="control", data={"status": 200, "title": host}))
    return obs


def build_db(db: Path | str) -> dict[str, Any]:
    """The synthetic database; returns what the page must show, derived from PLAN alone."""
    store = Store(db)
    expected: dict[tuple[str, str], dict[str, Any]] = {}
    evidence: dict[tuple[str, str], dict[str, Any]] = {}
    for day in range(3):
        for n, (name, asn, cc) in enumerate(NETS):
            rid = store.new_run(vantage={"network_name": name, "asn": asn, "country": cc},
                                started=T0 + day * DAY + n * 600)
            urls = [u for u, plan in PLAN.items() if plan[n][day] != "-"]
            store.add_targets(rid, [Target(u, CATEGORY.get(u, "")) for u in urls])
            verdicts = []
            for u in urls:
                label = PLAN[u][n][day]
                obs = _observations(u, label)
                store.add_observations(rid, obs)
                status, mech, detail, rule = LABEL[label]
                ids = [o.id for o in obs if o.id is not None]
                verdicts.append(Verdict(u, Target(u).host, status, rule, f"{Target(u).host}: {label} on {name}",
                                        mech, detail, 0.9, ids))
                cell = expected.setdefault((u, name), {"total": 0, "blocked": 0})
                cell["total"] += 1
                cell["blocked"] += status == "blocked"
                cell["now"] = status
                evidence[(u, name)] = {"rule": rule, "observations": ids, "run": rid}
            store.set_verdicts(rid, verdicts)
            if day == 2 and n == 0:
                store.add_trace(rid, "ratel.kz", TRACE)
            store.finish_run(rid)
    store.close()
    return {"cells": expected, "evidence": evidence}


def import_ooni(db: Path | str) -> int:
    files = sorted(OONI_QA.glob("*.json"))
    r = CliRunner().invoke(main, ["import-ooni", *map(str, files), "--db", str(db), "--format", "json"])
    assert r.exit_code == 0, r.output
    return len(files)


# ---- the browser -----------------------------------------------------------------------------------


class Browser:
    """One headless chromium for the module (Playwright's sync API allows one instance per thread)."""

    def __init__(self) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self.chromium = self._pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])

    def close(self) -> None:
        self.chromium.close()
        self._pw.stop()


class Page:
    """A report opened in the browser, with every console message and request recorded."""

    def __init__(self, browser: Browser, path: Path) -> None:
        self.context = browser.chromium.new_context(viewport={"width": 1440, "height": 1000})
        self.page = self.context.new_page()
        self.console: list[tuple[str, str]] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e))))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.failed: dict[str, str] = {}
        self.responses: list[str] = []
        self.page.on("requestfailed", lambda r: self.failed.__setitem__(r.url, r.failure or ""))
        self.page.on("response", lambda r: self.responses.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-ready='1']", timeout=30_000)

    def close(self) -> None:
        self.context.close()

    def cell(self, target: str, net_key: str) -> Any:
        """The matrix cell of (target, network), searching for the target first (pages of 100)."""
        self.page.fill("#m-search", target)
        q = json.dumps  # a JSON string literal is a valid CSS string for these names
        return self.page.locator(f"td.c[data-net={q(net_key, ensure_ascii=False)}]"
                                 f"[data-target={q(target, ensure_ascii=False)}]")


def check_page(p: Page, db_cells: dict[tuple[str, str], dict[str, Any]], net_keys: dict[str, str]) -> None:
    """The checks every report page must pass."""
    errors = [c for c in p.console if c[0] in ("error", "pageerror", "warning")]
    assert not errors, errors
    assert p.requests == [p.url], p.requests  # the page itself, nothing else
    assert not p.dialogs
    csp = p.page.locator("meta[http-equiv='Content-Security-Policy']").get_attribute("content") or ""
    assert "default-src 'none'" in csp and "connect-src 'none'" in csp
    # The matrix shows the counts the database holds.
    for (target, net), want in db_cells.items():
        td = p.cell(target, net_keys[net])
        assert td.count() == 1, (target, net)
        assert int(td.get_attribute("data-total") or -1) == want["total"], (target, net)
        assert int(td.get_attribute("data-blocked") or -1) == want["blocked"], (target, net)
        text = td.inner_text().strip()
        if want["blocked"]:
            assert text == f"{want['blocked']}/{want['total']}", (target, net, text)
    p.page.fill("#m-search", "")
    # Every plot is there and drew something.
    plots = p.page.locator("svg.plot")
    names = sorted(plots.evaluate_all("els => els.map(e => e.dataset.plot)"))
    assert names == ["mechanisms", "pairs", "sources", "time"], names
    for i in range(plots.count()):
        box = plots.nth(i).bounding_box()
        assert box and box["width"] > 300 and box["height"] > 80
        assert plots.nth(i).locator("path").count() > 20


def open_evidence(p: Page, target: str, net_key: str) -> str:
    td = p.cell(target, net_key)
    td.click()
    body = p.page.locator("#evidence-body")
    body.locator(".ev-rule").wait_for()
    return body.inner_text()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/setup installs it)")
    b = Browser()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory, browser: Browser) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("report")
    db = tmp / "kz.db"
    built = build_db(db)
    n_ooni = import_ooni(db)
    out = tmp / "report.html"
    r = CliRunner().invoke(main, ["report", "--db", str(db), "--format", "html", "-o", str(out)])
    assert r.exit_code == 0, r.output
    page = Page(browser, out)
    try:
        yield {**built, "db": db, "html": out, "page": page, "n_ooni": n_ooni}
    finally:
        page.close()


def test_page_loads_offline_and_shows_the_counts(synthetic: dict[str, Any]) -> None:
    keys = {name: f"live:{name}" for name, _, _ in NETS}
    check_page(synthetic["page"], synthetic["cells"], keys)


def test_clicking_a_blocked_cell_shows_rule_and_observation_ids(synthetic: dict[str, Any]) -> None:
    p = synthetic["page"]
    for target, net in (("http://ratel.kz/", "Kazakhtelecom"), ("https://www.facebook.com/", "Beeline KZ"),
                        ("https://avaaz.org/", "Beeline KZ")):
        text = open_evidence(p, target, f"live:{net}")
        ev = synthetic["evidence"][(target, net)]
        assert ev["rule"] in text
        obs = p.page.locator("#evidence-body .ev-obs").inner_text()
        assert [int(x) for x in re.findall(r"\d+", obs)] == ev["observations"]
        # Each observation id appears as its own step card, probe and control side by side.
        cards = p.page.locator("#evidence-body .step").evaluate_all("els => els.map(e => +e.dataset.obs)")
        assert sorted(cards) == sorted(ev["observations"])
    # The run that has a stored trace shows it beside the verdict, placed on its hop.
    text = open_evidence(p, "http://ratel.kz/", "live:Kazakhtelecom")
    assert "censor at hop 3 (100.64.0.3), in-path, domain-triggered — a backbone hop" in text
    assert "undefined" not in text
    # The MITM cell names the interceptor's issuer; the blockpage cell its title (Cyrillic).
    assert "Qaznet Trust Network" in open_evidence(p, "https://www.facebook.com/", "live:Beeline KZ")
    assert "Доступ ограничен" in open_evidence(p, "https://avaaz.org/", "live:Kazakhtelecom")


def test_ratel_claim_is_domain_based_at_a_backbone_hop(synthetic: dict[str, Any]) -> None:
    p = synthetic["page"]
    claim = p.page.locator("#claims-body .claim[data-domain='ratel.kz']")
    text = claim.inner_text()
    assert "domain name rather than an IP address" in text and "domain-based" in text
    assert "footnote 63" in text
    row = claim.locator("table.claim-table tr", has_text="Kazakhtelecom")
    assert "blocked/dpi" in row.inner_text() and "agrees" in row.inner_text()
    # Алма ТВ measured it reachable: the claim differs there.
    assert "differs" in claim.locator("table.claim-table tr", has_text="Алма ТВ").inner_text()
    assert "censor at hop 3 (100.64.0.3), in-path, domain-triggered" in text
    assert "backbone hop" in text


def test_interception_blockpages_and_sources(synthetic: dict[str, Any]) -> None:
    p = synthetic["page"]
    tls = p.page.locator("#tls-body").inner_text()
    assert "Qaznet Trust Network" in tls and "Beeline KZ" in tls and "Kazakhtelecom" not in tls
    bp = p.page.locator("#bp-body").inner_text()
    assert "kz_isp_blockpage" in bp and "Ресурс заблокирован" in bp
    src = p.page.locator("#sources-table tbody tr")
    rows = {r.split("\t")[0]: r.split("\t") for r in src.evaluate_all("els => els.map(e => e.innerText)")}
    # live: 3 days x 3 networks, one run each; ooni: one run per imported file.
    assert rows["live"][1] == "9" and rows["ooni"][1] == str(synthetic["n_ooni"]) and rows["pcap"][1] == "0"
    live_verdicts = sum(c["total"] for c in synthetic["cells"].values())
    assert rows["live"][4] == str(live_verdicts)
    cross = p.page.locator("#cross-source tbody tr").evaluate_all("els => els.map(e => e.innerText)")
    row = next(r.split("\t") for r in cross if r.startswith("untrusted-root.badssl.com"))
    assert row[1] == "; ".join(f"ok ({n})" for n in sorted(name for name, _, _ in NETS)) and row[2] == "—"
    assert row[3] != "—"  # whatever OONI's file made of it, it is shown beside the live verdicts


def test_matrix_filters_and_sort(synthetic: dict[str, Any]) -> None:
    p = synthetic["page"]
    p.page.fill("#m-search", "")
    p.page.select_option("#m-mech", "i")  # blocked by IP now, on some network
    shown = p.page.locator("#matrix-table td.t").evaluate_all("els => els.map(e => e.title)")
    assert shown == ["https://bambuser.com/"]
    p.page.select_option("#m-mech", "")
    p.page.select_option("#m-status", "ever")
    shown = set(p.page.locator("#matrix-table td.t").evaluate_all("els => els.map(e => e.title)"))
    ever = {t for (t, _), c in synthetic["cells"].items() if c["blocked"]}
    assert shown & set(PLAN) == ever  # (the OONI files add their own blocked targets)
    p.page.select_option("#m-status", "")
    p.page.select_option("#m-cat", label="NEWS")
    assert p.page.locator("#matrix-table td.t").evaluate_all("els => els.map(e => e.title)") == ["http://ratel.kz/"]
    p.page.select_option("#m-cat", "")


def test_csp_blocks_any_load_the_page_would_try(synthetic: dict[str, Any], browser: Browser) -> None:
    """Even a script that tried (an injected image, script, stylesheet or fetch) loads nothing:
    the browser reports a CSP violation for each and never makes the request (loopback only)."""
    p = Page(browser, synthetic["html"])
    try:
        before = list(p.requests)
        blocked = p.page.evaluate("""async () => {
            const seen = [];
            document.addEventListener("securitypolicyviolation", (e) => seen.push(e.effectiveDirective));
            const img = document.createElement("img"); img.src = "http://127.0.0.1:9/x.png"; document.body.append(img);
            const css = document.createElement("link"); css.rel = "stylesheet"; css.href = "http://127.0.0.1:9/x.css";
            document.head.append(css);
            const js = document.createElement("script"); js.src = "http://127.0.0.1:9/x.js"; document.head.append(js);
            try { await fetch("http://127.0.0.1:9/x"); } catch (e) { seen.push("fetch refused"); }
            await new Promise((r) => setTimeout(r, 300));
            return seen.sort();
        }""")
        assert {"img-src", "style-src-elem", "script-src-elem", "connect-src"} <= set(blocked), blocked
        # Chromium shows each attempt as a request that failed on the policy; none got an answer.
        tried = [u for u in p.requests if u not in before]
        assert tried and all("csp" in p.failed.get(u, "").lower() for u in tried), (tried, p.failed)
        assert p.responses == [p.url]
    finally:
        p.close()


def test_hostile_target_is_text(synthetic: dict[str, Any]) -> None:
    p = synthetic["page"]
    assert not p.dialogs
    assert p.page.locator("img[src='x']").count() == 0
    html = synthetic["html"].read_text()
    assert "</script><img" not in html.split('id="report-data">', 1)[1].split("</script>", 1)[0]


def test_filters_json_and_bad_input(synthetic: dict[str, Any], tmp_path: Path) -> None:
    db = str(synthetic["db"])
    run = CliRunner().invoke
    r = run(main, ["report", "--db", db, "--format", "json", "--network", "Beeline KZ", "--since", "2026-01-02"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert [n["name"] for n in rep["networks"]] == ["Beeline KZ"] and rep["period"]["runs"] == 2
    # A bounded period is compared with the one just before it (day 3 against day 2).
    r = run(main, ["report", "--db", db, "--format", "json", "--since", "2026-01-03", "--until", "2026-01-04"])
    rep = json.loads(r.stdout)
    code = {"ok": "o", "down": "w", "dpi": "p", "mitm": "p", "dns": "d", "nx": "d", "ip": "i"}
    names = [n["name"] for n in rep["networks"]]
    want = sorted((u, name, code[plan[n][1]], code[plan[n][2]]) for u, plan in PLAN.items()
                  for n, (name, _, _) in enumerate(NETS) if "-" not in (plan[n][1], plan[n][2])
                  and code[plan[n][1]] != code[plan[n][2]])
    got = sorted((c["target"], names[c["net"]], c["before"], c["now"]) for c in rep["summary"]["changes"]["rows"])
    assert got == want and want
    assert rep["summary"]["changes"]["basis"].startswith("the previous period (2026-01-02")
    lst = tmp_path / "one.txt"
    lst.write_text("ratel.kz\n")
    r = run(main, ["report", "--db", db, "--format", "json", "--list", str(lst), "--asn", "9198"])
    rep = json.loads(r.stdout)
    assert [t[0] for t in rep["matrix"]["targets"]] == ["http://ratel.kz/"]
    assert rep["matrix"]["blocked"] == [[3]]
    r = run(main, ["report", "--db", db, "--format", "html", "--since", "yesterday"])
    assert r.exit_code == 2 and "--since" in r.output and "Traceback" not in r.output
    r = run(main, ["report", "--db", db, "--format", "json", "--run", "999"])
    assert r.exit_code == 1 and r.output.strip().endswith("no run 999")
    r = run(main, ["report", "--db", db, "--format", "html", "--network", "Nope"])
    assert r.exit_code == 1 and "no run matches --network Nope" in r.output
    r = run(main, ["report", "--db", db, "--network", "x"])
    assert r.exit_code == 2 and "html or json" in r.output
    r = run(main, ["report", "--db", db, "--format", "html", "-o", str(tmp_path / "no" / "such" / "r.html")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "cannot write" in r.output


def test_plots_draw_cyrillic_labels_with_a_real_font(synthetic: dict[str, Any]) -> None:
    """The Cyrillic network name reaches the charts as glyphs of DejaVu Sans, not as boxes
    (matplotlib warns "Glyph ... missing from font" when it has to draw a box)."""
    import warnings

    from kzprobe.report import Filters, build_report
    from kzprobe.report.plots import all_plots

    store = Store(synthetic["db"])
    try:
        rep = build_report(store.engine, Filters())
    finally:
        store.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots = all_plots(rep)
    assert not [w for w in caught if "missing from" in str(w.message)], [str(w.message) for w in caught]
    # Text is drawn as paths: the Cyrillic letters of "Алма ТВ" are glyph definitions in the SVG
    # (named by their glyph index in DejaVu Sans).
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    font = FT2Font(font_manager.findfont("DejaVu Sans"))
    for ch in "Алма ТВ".replace(" ", ""):
        assert f'id="time-DejaVuSans-{font.get_char_index(ord(ch)):x}"' in plots["time"], ch


def test_a_replayed_capture_is_its_own_source_with_frame_numbers(tmp_path: Path) -> None:
    """A pcap replay stored with --store: named after its capture, kept apart as source pcap, and
    a blocked verdict's evidence carries the frame numbers the database holds for it."""
    pcap = Path(__file__).resolve().parents[1] / "fixtures" / "pcaps" / "method-sni-reset.pcap"
    db = tmp_path / "cap.db"
    r = CliRunner().invoke(main, ["replay", str(pcap), "--store", "--db", str(db), "--format", "json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["report", "--db", str(db), "--format", "json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert [(n["name"], n["source"]) for n in rep["networks"]] == [("capture method-sni-reset.pcap", "pcap")]
    store = Store(db)
    try:
        stored = {v.target: v for v in store.verdicts(store.runs()[0].id)}
    finally:
        store.close()
    blocked = [e for e in rep["evidence"].values() if e["status"] == "blocked"]
    assert blocked
    for e in blocked:
        assert e["packets"] and e["packets"] == stored[e["target"]].packets[:50]
        assert all(s["source"] == "pcap" and s["packets"] for s in e["steps"] if s["step"] != "dns")


def _comparable(rep: dict[str, Any]) -> dict[str, Any]:
    """The aggregates, without what differs from one build to the next (times, database ids)."""
    rep = {k: v for k, v in rep.items() if k not in ("generated", "limits", "evidence")}
    rep["matrix"] = {k: v for k, v in rep["matrix"].items() if k != "cells"}
    return json.loads(json.dumps(rep))


@pytest.mark.postgres
def test_postgresql_gives_the_same_aggregates(synthetic: dict[str, Any]) -> None:
    from kzprobe.storage.pgcluster import ClusterUnavailable, throwaway_cluster, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL: {reason}")
    try:
        with throwaway_cluster() as cluster:
            url = cluster.create_database("rep")
            build_db(url)
            import_ooni(url)
            r = CliRunner().invoke(main, ["report", "--db", url, "--format", "json"])
            assert r.exit_code == 0, r.output
            pg = json.loads(r.stdout)
    except ClusterUnavailable as exc:
        pytest.skip(f"PostgreSQL cannot start here: {exc}")
    r = CliRunner().invoke(main, ["report", "--db", str(synthetic["db"]), "--format", "json"])
    lite = json.loads(r.stdout)
    assert _comparable(pg) == _comparable(lite)
    assert pg["matrix"]["totals"] and pg["summary"]["measurements"] == lite["summary"]["measurements"]


# ---- acceptance: the kz2014 lab, three networks, a stored trace, the OONI files (root) ----------------

LAB_NETS = [("Kazakhtelecom", "AS9198"), ("Beeline KZ", "AS21299"), ("Transtelecom", "AS35168")]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "report.png"


def _lab_ok() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "iptables", "nft", "tc", "dnsmasq"))


@pytest.mark.lab
@pytest.mark.slow
def test_lab_kz2014_three_networks_and_ooni(tmp_path: Path, request: pytest.FixtureRequest,
                                            browser: Browser) -> None:
    if not _lab_ok():
        pytest.skip("the lab needs root, iproute2, iptables, nftables and dnsmasq")
    from kzprobe.lab import Lab, destroy
    from kzprobe.lab.core import probe_argv

    inst = "kzrep" + os.urandom(2).hex()
    request.addfinalizer(lambda: destroy(inst))
    lab = Lab("kz2014", inst)
    db = tmp_path / "kz.db"
    lab.up()
    try:
        expect = {s.url: s for s in lab.scenario.sites}
        for name, asn in LAB_NETS:
            argv = [*probe_argv(lab, db=db), "--network-name", name, "--asn", asn, "--country", "KZ"]
            p = lab.exec("volunteer", argv, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stderr[-2000:]
        ratel = next(s for s in lab.scenario.sites if s.domain == "ratel.kz")
        code = "import sys\nfrom kzprobe.cli import run_main\nrun_main(sys.argv[1:])\n"
        p = lab.exec("volunteer", [sys.executable, "-c", code, "trace", "ratel.kz", "--trigger", "tls",
                                   "--address", ratel.address, "--repeat", "2", "--timeout", "1", "--store",
                                   "--db", str(db), "--format", "json"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        backbone_hop = lab.router_address(ratel.hop)
    finally:
        lab.down()
    import_ooni(db)
    out = tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "kzprobe.cli", "report", "--db", str(db), "--format", "html",
                        "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # What the page must show, from the scenario: every site measured once per network, blocked
    # exactly when the scenario blocks it.
    cells = {(url, name): {"total": 1, "blocked": int(s.expect.startswith("blocked"))}
             for url, s in expect.items() for name, _ in LAB_NETS}
    page = Page(browser, out)
    try:
        check_page(page, cells, {name: f"live:{name}" for name, _ in LAB_NETS})
        store = Store(db)
        try:
            runs = [r_.id for r_ in store.runs() if r_.source == "live"]
            v = next(v for v in store.verdicts(runs[0]) if v.domain == "ratel.kz")
        finally:
            store.close()
        text = open_evidence(page, ratel.url, "live:Kazakhtelecom")
        assert v.rule in text
        shown = page.page.locator("#evidence-body .ev-obs").inner_text()
        assert [int(x) for x in re.findall(r"\d+", shown)] == v.observations
        claim = page.page.locator("#claims-body .claim[data-domain='ratel.kz']")
        ctext = claim.inner_text()
        assert "domain name rather than an IP address" in ctext
        for name, _ in LAB_NETS:
            row = claim.locator("table.claim-table tr", has_text=name).inner_text()
            assert "blocked/dpi" in row and "agrees" in row, row
        assert f"censor at hop 3 ({backbone_hop})" in ctext and "domain-triggered" in ctext
        assert "backbone hop" in ctext
        # `trace --store` attached the trace to the latest run (the last network's): its
        # evidence shows the trace beside the verdict.
        last = LAB_NETS[-1][0]
        etext = open_evidence(page, ratel.url, f"live:{last}")
        assert f"censor at hop 3 ({backbone_hop})" in etext and "backbone hop" in etext
        page.page.fill("#m-search", "")
        page.page.locator("#m-search").blur()
        page.page.mouse.move(0, 0)
        page.page.evaluate("window.scrollTo(0, 0)")
        shot = tmp_path / "report.png"
        page.page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1440, "height": 1600}, full_page=True)
        if os.environ.get("KZPROBE_UPDATE_SCREENSHOT"):
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)
    finally:
        page.close()


# ---- the circumvention section (issue 15, acceptance 4) ------------------------------------------------


@pytest.fixture(scope="module")
def circ(tmp_path_factory: pytest.TempPathFactory, browser: Browser) -> Iterator[dict[str, Any]]:
    """A database of Tor / messaging / proxy verdicts built directly (tests/support/circdb.py)."""
    from kzprobe.tests.support import circdb

    tmp = tmp_path_factory.mktemp("circ")
    db = tmp / "circ.db"
    built = circdb.build(db)
    out = tmp / "report.html"
    r = CliRunner().invoke(main, ["report", "--db", str(db), "--format", "html", "-o", str(out)])
    assert r.exit_code == 0, r.output
    page = Page(browser, out)
    try:
        yield {**built, "page": page, "lib": circdb}
    finally:
        page.close()


def test_circumvention_section_in_the_browser(circ: dict[str, Any]) -> None:
    p, lib = circ["page"], circ["lib"]
    errors = [c for c in p.console if c[0] in ("error", "pageerror", "warning")]
    assert not errors, errors
    assert p.requests == [p.url], p.requests
    sec = p.page.locator("#circumvention")
    assert sec.count() == 1 and p.page.locator("nav.toc a[href='#circumvention']").count() == 1
    # Every (target, network) of the database is a cell with its latest detail.
    for (url, net), want in circ["cells"].items():
        key = json.dumps("live:" + net, ensure_ascii=False)
        td = sec.locator(f"td.cc[data-target={json.dumps(url)}][data-net={key}]")
        assert td.count() == 1, (url, net)
        assert td.get_attribute("data-status") == want["status"], (url, net)
        assert (td.get_attribute("data-detail") or None) == want["detail"], (url, net)
        if want["blocked"]:
            assert f"{want['blocked']}/{want['total']}" in td.inner_text(), (url, net)
    # The fingerprint finding says which hello was blocked, right in the table.
    fp = sec.locator(f"td.cc[data-target={json.dumps(lib.TOR_OR)}][data-net='live:Kazakhtelecom']")
    assert "dpi.tls_fingerprint" in fp.inner_text() and "Tor-like ClientHello was reset" in fp.inner_text()
    # The report's claims, quoted and cited, with the per-network agreement.
    claims = {k: sec.locator(f".circ-claim[data-key='{k}']") for k in
              ("tor-dpi", "proxies-blocked", "opera-vpn-open", "messaging-outage")}
    assert "footnote 94" in claims["tor-dpi"].inner_text() and "KazTransCom" in claims["tor-dpi"].inner_text()
    assert "footnote 32" in claims["messaging-outage"].inner_text()
    assert "footnote 92" in claims["opera-vpn-open"].inner_text()
    for key, want in (("tor-dpi", ("agrees", "differs", "differs")),
                      ("messaging-outage", ("agrees", "differs", "differs")),
                      ("opera-vpn-open", ("agrees", "differs", "agrees"))):
        for (net, _, _), agreement in zip(lib.NETS, want, strict=True):
            row = claims[key].locator("table.claim-table tr", has_text=net)
            assert agreement in row.inner_text(), (key, net, row.inner_text())
    outage = sec.locator("table.circ-outage tr", has_text="Kazakhtelecom").inner_text()
    assert "yes (measured fine afterwards)" in outage and "50.2" in outage
    # Clicking the Tor cell opens its evidence: rule, observation ids, and which hello each TLS step sent.
    fp.click()
    body = p.page.locator("#evidence-body")
    body.locator(".ev-rule").wait_for()
    want = circ["cells"][(lib.TOR_OR, "Kazakhtelecom")]
    assert body.locator(".ev-rule").inner_text() == "dpi.tls_fingerprint"
    assert [int(x) for x in re.findall(r"\d+", body.locator(".ev-obs").inner_text())] == want["observations"]
    text = body.inner_text()
    assert "ClientHello\ntor" in text and "ClientHello\nbrowser" in text and "connection_reset" in text
    # The proxy's CONNECT is shown as what it was.
    sec.locator(f"td.cc[data-target={json.dumps(lib.PROXY)}][data-net='live:Kazakhtelecom']").click()
    body.locator(".ev-rule", has_text="dpi.proxy_connect").wait_for()
    assert "CONNECT example.com:443" in body.inner_text()


@pytest.mark.lab
@pytest.mark.slow
def test_lab_circumvention_run_in_the_report(tmp_path: Path, request: pytest.FixtureRequest,
                                             browser: Browser) -> None:
    """`kzprobe lab run --scenario kz2014-circumvention` (before, during and after the messaging
    outage's window), then the report of its database: the circumvention section shows every
    endpoint as the scenario builds it, and sets the outage beside the report's."""
    if not _lab_ok() or not all(shutil.which(t) for t in ("nginx", "openssl", "tinyproxy")):
        pytest.skip("the lab needs root, iproute2, iptables, nftables, dnsmasq, nginx, openssl and tinyproxy")
    from kzprobe.lab import destroy
    from kzprobe.lab.scenario import load
    from kzprobe.lab.topology import STATE_ROOT

    inst = "kzrcc" + os.urandom(2).hex()
    request.addfinalizer(lambda: destroy(inst))
    p = subprocess.run([sys.executable, "-m", "kzprobe.cli", "lab", "run", "--scenario", "kz2014-circumvention",
                        "--format", "json", "--instance", inst, "--keep"], capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    db = tmp_path / "circ.db"
    shutil.copyfile(STATE_ROOT / inst / "run.db", db)
    destroy(inst)
    out = tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "kzprobe.cli", "report", "--db", str(db), "--format", "html",
                        "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sc = load("kz2014-circumvention")
    (o,) = sc.outages
    page = Page(browser, out)
    try:
        errors = [c for c in page.console if c[0] in ("error", "pageerror", "warning")]
        assert not errors, errors
        assert page.requests == [page.url]
        sec = page.page.locator("#circumvention")
        for e in sc.endpoints:
            # From the scenario: measured once, or three times (before, during, after) for what
            # the outage measures; blocked as the scenario expects, plus once inside the window.
            rounds = 3 if e.target in o.measure else 1
            blocked = rounds * e.expect.startswith("blocked") + (e.target in o.targets)
            td = sec.locator(f"td.cc[data-target={json.dumps(e.target)}]")
            assert td.count() == 1, e.target
            assert td.get_attribute("data-status") == e.expect.split("/")[0], (e.target, td.inner_text())
            if e.expect.startswith("blocked"):
                assert td.get_attribute("data-detail") == e.detail, (e.target, td.inner_text())
            if blocked:
                assert f"{blocked}/{rounds}" in td.inner_text(), (e.target, td.inner_text())
        claims = {k: sec.locator(f".circ-claim[data-key='{k}']").inner_text() for k in ("tor-dpi", "messaging-outage")}
        assert "agrees" in claims["tor-dpi"] and "dpi.tls_fingerprint" in claims["tor-dpi"]
        assert "agrees" in claims["messaging-outage"] and "time-boxed outage" in claims["messaging-outage"]
        assert f"{len(o.targets)} endpoint(s) failed" in claims["messaging-outage"]
        fp = next(e for e in sc.endpoints if e.detail == "dpi.tls_fingerprint")
        sec.locator(f"td.cc[data-target={json.dumps(fp.target)}]").click()
        body = page.page.locator("#evidence-body")
        body.locator(".ev-rule", has_text="dpi.tls_fingerprint").wait_for()
        assert "Tor-like" in body.inner_text() and "ClientHello\ntor" in body.inner_text()
    finally:
        page.close()
