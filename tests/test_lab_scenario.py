"""Scenario files: every built-in one parses, kz2014 covers the report, and bad files give
one-line errors naming the file and the entry.  No root needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from kzprobe.lab.scenario import METHODS, ScenarioError, builtin_scenarios, load

REPORT = Path(__file__).resolve().parents[1].parent / "shared" / "report" / "freedom-on-the-net-2014-kazakhstan.txt"


def test_every_builtin_scenario_parses_and_every_method_has_one() -> None:
    names = builtin_scenarios()
    for name in names:
        sc = load(name)
        assert sc.sites and all(s.reason for s in sc.sites)
        assert any(s.expect == "ok" for s in sc.sites) or name == "method-down", name
    methods = [m for m in METHODS if m != "none"]
    for m in methods:
        assert f"method-{m}" in names
        sc = load(f"method-{m}")
        assert [s.methods for s in sc.sites if s.methods] == [(m,)]


def test_kz2014_mirrors_the_report() -> None:
    sc = load("kz2014")
    domains = {s.domain for s in sc.sites}
    for d in ("avaaz.org", "ratel.kz", "livejournal.com", "bambuser.com", "uralskweek.kz", "torproject.org",
              "whatsapp.com", "viber.com", "facebook.com", "kolesa.kz", "mail.ru"):
        assert d in domains, d
    assert any(s.category == "ANON" and s.domain != "torproject.org" for s in sc.sites)  # proxy sites
    assert [s.expect for s in sc.sites if s.is_down] == ["down"]
    for d in ("facebook.com", "kolesa.kz", "mail.ru"):
        assert sc.site(d).expect == "ok" and not sc.site(d).methods
    ratel = sc.site("ratel.kz")
    # The report: at a backbone facility, by domain name rather than IP.
    assert ratel.hop in ("bb1", "bb2") and ratel.expect in ("blocked/dns", "blocked/dpi")
    assert not {"ip-drop", "ip-reject"} & set(ratel.methods)
    assert "backbone" in ratel.reason
    # Reasons and quotes use the report's own words.
    if REPORT.is_file():
        def norm(t: str) -> str:
            return " ".join(t.translate(str.maketrans("’‘“”", "''\"\"")).split())

        text = norm(REPORT.read_text(encoding="utf-8"))
        for s in sc.sites:
            if s.quote:
                assert norm(s.quote) in text, s.domain


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\nexpect='ok'\n", "'reason' is required"),
        ("[[site]]\ndomain='a.kz'\naddress='192.0.2.5'\nexpect='ok'\nreason='x'\n", "must be inside 203.0.113.0/24"),
        ("[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\nexpect='ok'\nreason='x'\nmethod='dns-magic'\n",
         "unknown method 'dns-magic'"),
        ("[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\nexpect='ok'\nreason='x'\nmethod='dns-nxdomain'\nhop='bb2'\n",
         "cannot run at hop 'bb2'"),
        ("[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\nexpect='blocked'\nreason='x'\n", "'expect' must be one of"),
        ("[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\nexpect='ok'\nreason='x'\ncolour='red'\n",
         "unknown key(s) colour"),
        ("[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\nexpect='ok'\nreason='x'\ncert='self-signed'\n",
         "'cert' must be one of"),
        ("[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\nexpect='ok'\nreason='x'\nredirects=['apex']\n",
         "'redirects' must be a list of https, www"),
        ("[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\nexpect='ok'\nreason='x'\ngeo_address='203.0.113.6'\n",
         "'geo_address' 203.0.113.6 must be one of the site's addresses"),
        ("[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\nexpect='ok'\nreason='x'\ncdn=['192.0.2.7']\n",
         "'cdn' 192.0.2.7 must be inside"),
        ("[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\nexpect='ok'\nreason='x'\nrate='fast'\n",
         "'fast' is not a tc rate"),
        ("[[site]\n", "Expected"),
        ("", "needs at least one [[site]]"),
    ],
)
def test_bad_scenarios_name_file_and_entry(tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(ScenarioError) as exc:
        load(f)
    text = str(exc.value)
    assert text.startswith(str(f)) and message in text and "\n" not in text
    if "[[site]]\ndomain" in body:
        assert "[[site]] #1 (a.kz)" in text


def test_cdn_addresses_count_as_the_sites_own(tmp_path: Path) -> None:
    f = tmp_path / "cdn.toml"
    f.write_text("[[site]]\ndomain='a.kz'\naddress='203.0.113.5'\ncdn=['203.0.113.6']\nexpect='ok'\nreason='x'\n"
                 "[[site]]\ndomain='b.kz'\naddress='203.0.113.6'\nexpect='ok'\nreason='x'\n")
    with pytest.raises(ScenarioError, match=r"#2 .*address 203\.0\.113\.6 appears twice"):
        load(f)
    sc = load("clean-world")
    geo = [s for s in sc.sites if s.geo_address]
    assert len(geo) >= 1 and all(s.geo_address not in s.public_addresses and len(s.addresses) >= 3 for s in geo)
    assert len(sc.sites) >= 100 and {s.cert for s in sc.sites} == {"intermediate", "no-aki", "no-ski-aki",
                                                                    "cross-signed"}
    assert any(s.server_delay for s in sc.sites) and any(s.redirects == ("https", "www") for s in sc.sites)


def test_duplicate_addresses_are_refused(tmp_path: Path) -> None:
    site = "[[site]]\ndomain='{d}'\naddress='203.0.113.5'\nexpect='ok'\nreason='x'\n"
    f = tmp_path / "dup.toml"
    f.write_text(site.format(d="a.kz") + site.format(d="b.kz"))
    with pytest.raises(ScenarioError, match=r"#2 .*address 203\.0\.113\.5 appears twice"):
        load(f)
