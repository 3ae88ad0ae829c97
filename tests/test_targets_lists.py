"""The built-in lists of issue 15 (tor, messaging, circumvention): every entry cites the report
where the report speaks of it, and says so honestly where it does not.

Expected values come from the sources, not from the loader: the Tor authorities from Tor's
auth_dirs.inc (8 v3 authorities, 5 with an IPv6 OR port), the report's text from ../shared.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kzprobe.model import KINDS
from kzprobe.targets import (
    BUILTIN_LISTS,
    CATEGORY_CODES,
    CLAIMED_ROLES,
    TargetListError,
    _parse_entry,  # the schema checks, on hand-made entries
    builtin_info,
    load_builtin,
    load_builtin_roles,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REPORT = SHARED / "report" / "freedom-on-the-net-2014-kazakhstan.txt"
SECTIONS = ("Introduction", "Obstacles to Access", "Limits on Content", "Violations of User Rights")
needs_shared = pytest.mark.skipif(not REPORT.exists(), reason="../shared is not available")

NEW_LISTS = [n for n in ("tor", "messaging", "circumvention") if n in BUILTIN_LISTS]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _sections(text: str) -> dict[str, str]:
    """Normalised text of each top-level section, cut at its heading line."""
    lines = text.splitlines()
    starts = sorted((i, line.strip()) for i, line in enumerate(lines) if line.strip() in SECTIONS)
    return {name: _norm("\n".join(lines[i:(starts[k + 1][0] if k + 1 < len(starts) else len(lines))]))
            for k, (i, name) in enumerate(starts)}


def test_tor_is_built_in() -> None:
    assert "tor" in BUILTIN_LISTS


@needs_shared
@pytest.mark.parametrize("name", NEW_LISTS)
def test_every_claim_is_quoted_from_the_report(name: str) -> None:
    report = _norm(REPORT.read_text(encoding="utf-8"))
    sections = _sections(REPORT.read_text(encoding="utf-8"))
    assert set(sections) == set(SECTIONS)
    notes = {int(m.group(1)) for m in re.finditer(r"^\s*(\d{1,3})\s{2,}\S", REPORT.read_text(encoding="utf-8"), re.M)}
    roles = load_builtin_roles(name)
    for t in load_builtin(name):
        role = roles[t.url]
        if role in CLAIMED_ROLES:
            assert t.claim is not None, t.url
            assert _norm(t.claim.quote) in report, f"{name}: {t.url}: quote not in the report: {t.claim.quote!r}"
            assert _norm(t.claim.quote) in sections[t.claim.section], f"{name}: {t.url}: not in {t.claim.section}"
            for part in filter(None, (p.strip() for p in t.claim.footnote.split(","))):
                assert int(part) in notes, f"{name}: {t.url}: no footnote {part}"
        else:
            # Honest about it: no claim, and the notes say the report does not speak of it and where
            # the entry comes from.
            assert t.claim is None, t.url
            assert "not in the report" in t.notes.lower() or "does not" in t.notes.lower(), t.url
            assert "Source: " in t.notes, t.url


@pytest.mark.parametrize("name", NEW_LISTS)
def test_entries_are_valid_kinds_with_known_categories(name: str) -> None:
    targets = load_builtin(name)
    assert targets
    for t in targets:
        assert t.category in CATEGORY_CODES, t.url
        assert t.kind in (*KINDS, "url"), t.url


def test_tor_list_is_tors_authorities() -> None:
    info = builtin_info("tor")
    assert info["date"] == "2022-11-29" and "auth_dirs.inc" in info["source"]
    targets = load_builtin("tor")
    ors = [t for t in targets if t.kind == "tor-or"]
    dirs = [t for t in targets if t.kind == "tor-dir"]
    # auth_dirs.inc @72b04a5: 8 v3 authorities (Serge, the bridge authority, left out), 5 of them
    # with an IPv6 OR port; one DirPort each.
    assert len(dirs) == 8
    assert len(ors) == 8 + 5
    assert len(targets) == len(ors) + len(dirs)
    by_url = {t.url: t for t in targets}
    # Spot checks against the source text (not against the loader).
    assert "moria1" in by_url["tor-or://128.31.0.39:9201"].notes
    assert "moria1" in by_url["tor-dir://128.31.0.39:9231"].notes
    assert "maatuska" in by_url["tor-or://[2001:67c:289c::9]:80"].notes
    assert "tor-dir://171.25.193.9:443" in by_url  # maatuska's DirPort is 443, its OR port 80
    assert not any("66.111.2.131" in u for u in by_url)  # Serge
    for t in targets:
        assert t.claim is not None and t.claim.footnote == "94", t.url


def test_shared_claim_reference_must_exist() -> None:
    entry = {"url": "tcp://e1.whatsapp.net:443", "category": "COMT", "role": "censored", "claim": "nope"}
    with pytest.raises(TargetListError, match=r"claim 'nope' is not one of the list's \[claims\.\*\] tables"):
        _parse_entry("x", 1, entry, {})


def test_listed_entries_carry_no_claim_and_say_where_they_come_from() -> None:
    base = {"url": "tcp://cdn.signal.org:443", "category": "COMT", "role": "listed"}
    with pytest.raises(TargetListError, match="needs notes"):
        _parse_entry("x", 1, dict(base), {})
    with pytest.raises(TargetListError, match="no claim"):
        _parse_entry("x", 1, {**base, "notes": "n", "source": "s", "claim": {"quote": "q"}}, {})
    t, role = _parse_entry("x", 1, {**base, "notes": "Not in the report.", "source": "ooni/spec"}, {})
    assert role == "listed" and t.claim is None and t.notes == "Not in the report. Source: ooni/spec."
    with pytest.raises(TargetListError, match=r"missing \[target.claim\]"):
        _parse_entry("x", 1, {**base, "role": "censored"}, {})


def test_messaging_has_oonis_endpoints() -> None:
    targets = load_builtin("messaging")
    urls = {t.url for t in targets}
    roles = load_builtin_roles("messaging")
    # ts-018: e1..e16.whatsapp.net on 443 and 5222; ts-020: five DCs on 80 and 443; ts-029: six backends.
    for n in range(1, 17):
        assert {f"tcp://e{n}.whatsapp.net:443", f"tcp://e{n}.whatsapp.net:5222", f"udp-dns://e{n}.whatsapp.net"} <= urls
    for ip in ("149.154.175.50", "149.154.167.51", "149.154.175.100", "149.154.167.91", "149.154.171.5"):
        assert {f"tcp://{ip}:80", f"tcp://{ip}:443"} <= urls
        assert roles[f"tcp://{ip}:443"] == "listed"  # the report does not speak of Telegram
    assert {"tcp://cdn.signal.org:443", "udp-dns://sfu.voip.signal.org", "tcp://www.viber.com:443"} <= urls
    wa = next(t for t in targets if t.url == "tcp://e1.whatsapp.net:5222")
    assert wa.claim is not None and wa.claim.footnote == "32" and wa.claim.dates == "2014-02-13"
    assert roles["tcp://www.viber.com:443"] == "censored"  # the report names Viber in the outage
    assert all(t.kind in ("tcp", "udp-dns") for t in targets)


def test_circumvention_cites_proxies_vpns_and_opera() -> None:
    targets = load_builtin("circumvention")
    roles = load_builtin_roles("circumvention")
    by_url = {t.url: t for t in targets}
    assert "https://psiphon.ca/" in by_url
    opera = [t for t in targets if "sec-tunnel.com" in t.host]
    assert opera and all(roles[t.url] == "control" and t.claim and t.claim.footnote == "92" for t in opera)
    proxies = [t for t in targets if t.claim and "proxy sites" in t.claim.quote]
    assert len(proxies) >= 5 and all(roles[t.url] == "censored" for t in proxies)
    vpns = [t for t in targets if t.claim and t.claim.quote.startswith("VPNs")]
    assert vpns and all(roles[t.url] == "control" for t in vpns)
    assert all("Source: " in t.notes for t in targets)
    # rdsys' moat documentation lists 15 built-in obfs4 bridges (14 IPv4, 1 IPv6); the report knows none.
    bridges = [t for t in targets if t.kind == "obfs4"]
    assert len(bridges) == 15 and sum(":" in t.host for t in bridges) == 1
    assert all(roles[t.url] == "listed" and t.claim is None for t in bridges)
    assert "obfs4://192.95.36.142:443" in by_url
