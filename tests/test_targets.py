"""kzprobe.targets: the cited kz2014 list and the CSV / plain-text importers."""

from __future__ import annotations

import csv
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kzprobe.model import Target
from kzprobe.targets import (
    BUILTIN_LISTS,
    CATEGORY_CODES,
    ROLES,
    LoadResult,
    TargetListError,
    load,
    load_builtin,
    load_builtin_roles,
    load_file,
)
from kzprobe.targets._urls import URLProblem, check_url, url_from_line

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REPORT = SHARED / "report" / "freedom-on-the-net-2014-kazakhstan.txt"
LISTS = SHARED / "test-lists"
SECTIONS = ("Introduction", "Obstacles to Access", "Limits on Content", "Violations of User Rights")

needs_shared = pytest.mark.skipif(not REPORT.exists(), reason="../shared is not available")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="module")
def report() -> str:
    return REPORT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def kz2014() -> list[Target]:
    return load_builtin("kz2014")


def _bare(host: str) -> str:
    return host.removeprefix("www.")


def _by_host(targets: list[Target]) -> dict[str, list[Target]]:
    out: dict[str, list[Target]] = {}
    for t in targets:
        out.setdefault(_bare(t.host), []).append(t)
    return out


def _legend_codes() -> set[str]:
    with open(LISTS / "00-LEGEND-new_category_codes.csv", newline="", encoding="utf-8") as f:
        return {row["New Code"].strip() for row in csv.DictReader(f)}


def _section_spans(report_text: str) -> dict[str, str]:
    """Normalised text of each top-level section, cut at the heading lines."""
    lines = report_text.splitlines()
    starts = []
    for name in SECTIONS:
        idx = [i for i, line in enumerate(lines) if line.strip() == name]
        assert len(idx) == 1, f"heading {name!r} found {len(idx)} times"
        starts.append((idx[0], name))
    starts.sort()
    spans = {}
    for k, (start, name) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(lines)
        spans[name] = _norm("\n".join(lines[start:end]))
    return spans


# --- the built-in list ---------------------------------------------------------------------------


def test_builtin_names() -> None:
    assert BUILTIN_LISTS[0] == "kz2014"
    for name in BUILTIN_LISTS:
        assert load(name).targets == load_builtin(name)


def test_unknown_builtin_is_a_clear_error() -> None:
    with pytest.raises(TargetListError, match=r"unknown built-in target list 'kz2099'.*kz2014"):
        load_builtin("kz2099")


@needs_shared
def test_kz2014_every_quote_is_in_the_report_in_its_section(kz2014: list[Target], report: str) -> None:
    assert len(kz2014) >= 30
    whole = _norm(report)
    spans = _section_spans(report)
    for t in kz2014:
        assert t.claim is not None, t.url
        quote = _norm(t.claim.quote)
        assert quote, t.url
        assert quote in whole, f"{t.url}: quote not in the report: {quote!r}"
        assert t.claim.section in spans, f"{t.url}: unknown section {t.claim.section!r}"
        assert quote in spans[t.claim.section], f"{t.url}: quote is not in section {t.claim.section!r}"


@needs_shared
def test_kz2014_footnotes_exist(kz2014: list[Target], report: str) -> None:
    # Footnote bodies start a line with their number and two spaces ("62  “Website with ...").
    notes = {int(m.group(1)) for m in re.finditer(r"^\s*(\d{1,3})\s{2,}\S", report, re.M)}
    assert {1, 62, 63, 94, 111} <= notes
    for t in kz2014:
        assert t.claim is not None
        if not t.claim.footnote:
            continue
        for part in t.claim.footnote.split(","):
            assert part.strip().isdigit(), f"{t.url}: footnote {t.claim.footnote!r}"
            assert int(part) in notes, f"{t.url}: no footnote {part} in the report"


@needs_shared
def test_category_codes_match_the_legend(kz2014: list[Target]) -> None:
    legend = _legend_codes()
    assert legend == CATEGORY_CODES
    for t in kz2014:
        assert t.category in legend, f"{t.url}: {t.category!r}"


def test_kz2014_required_sites(kz2014: list[Target]) -> None:
    hosts = _by_host(kz2014)
    for host in (
        "avaaz.org",
        "ratel.kz",
        "ratel.su",
        "livejournal.com",
        "bambuser.com",
        "uralskweek.kz",
        "wordpress.com",
        "slideshare.net",
        "nuradam.kz",
        "guljan.org",
        "torproject.org",
        "whatsapp.com",
        "viber.com",
        "kolesa.kz",
        "mail.ru",
        "vk.com",
        "youtube.com",
        "facebook.com",
    ):
        assert host in hosts, f"{host} missing from kz2014"
    assert any("respublika" in h for h in hosts)
    # Tor directory authorities: IP literal with an explicit DirPort.
    dir_auths = [t for t in kz2014 if re.fullmatch(r"http://\d+\.\d+\.\d+\.\d+:\d+/", t.url)]
    assert len(dir_auths) >= 2
    assert all(t.category == "ANON" for t in dir_auths)
    proxies = [
        t
        for t in kz2014
        if t.category == "ANON" and t not in dir_auths and "torproject" not in t.host and t.claim
        if "prox" in t.claim.quote or "anonymiz" in t.claim.quote
    ]
    assert len(proxies) >= 3


def test_kz2014_key_claims(kz2014: list[Target]) -> None:
    hosts = _by_host(kz2014)
    (ratel,) = hosts["ratel.kz"]
    assert ratel.claim is not None
    assert ratel.claim.quote == "based on a domain name rather than an IP address"
    assert ratel.claim.mechanism == "domain-based"
    assert ratel.claim.dates.startswith("2014-02")
    (ratel_su,) = hosts["ratel.su"]
    assert ratel_su.claim is not None and ".su" in ratel_su.claim.quote
    for host in ("whatsapp.com", "viber.com"):
        for t in hosts[host]:
            assert t.claim is not None and t.claim.dates == "2014-02-13", t.url
            assert "Almaty" in t.claim.quote
    (tor,) = hosts["torproject.org"]
    assert tor.claim is not None and tor.claim.footnote == "94"


def test_kz2014_roles(kz2014: list[Target]) -> None:
    roles = load_builtin_roles("kz2014")
    assert list(roles) == [t.url for t in kz2014]
    assert set(roles.values()) == {"censored", "control"}  # every kz2014 entry is one the report speaks of
    assert {"censored", "control"} < set(ROLES)
    by_host = {_bare(t.host): roles[t.url] for t in kz2014}
    for host in ("avaaz.org", "ratel.kz", "livejournal.com", "bambuser.com", "torproject.org"):
        assert by_host[host] == "censored", host
    for host in ("kolesa.kz", "mail.ru", "vk.com", "youtube.com", "facebook.com", "ratel.su"):
        assert by_host[host] == "control", host


def test_kz2014_urls_are_unique_and_valid(kz2014: list[Target]) -> None:
    urls = [t.url for t in kz2014]
    assert len(urls) == len(set(urls))
    assert all(t.scheme in ("http", "https") and t.host for t in kz2014)


# --- Citizen Lab CSV -----------------------------------------------------------------------------


def _no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"name resolution attempted: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)


def _csv_urls(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [row["url"] for row in csv.DictReader(f)]


@needs_shared
def test_kz_csv_loads_all_553_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_dns(monkeypatch)
    t0 = time.perf_counter()
    result = load_file(LISTS / "kz.csv")
    elapsed = time.perf_counter() - t0
    assert result.errors == []
    assert result.duplicates == 0
    assert result.format == "csv"
    assert len(result.targets) == 553
    assert [t.url for t in result.targets] == _csv_urls(LISTS / "kz.csv")
    assert elapsed < 2.0, f"loading kz.csv took {elapsed:.2f}s"
    first = result.targets[0]
    assert (first.url, first.category) == ("http://www.akorda.kz/", "CULTR")
    bambuser = next(t for t in result.targets if t.host == "bambuser.com")
    assert bambuser.notes == "video streaming site, blocked since 2012"
    assert {t.category for t in result.targets} <= CATEGORY_CODES
    assert "xn--80aatcn.xn--p1ai" in {t.host for t in result.targets}  # punycode survives


@needs_shared
def test_global_csv_loads_without_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_dns(monkeypatch)
    expected = _csv_urls(LISTS / "global.csv")
    result = load_file(LISTS / "global.csv")
    assert result.errors == []
    assert len(result.targets) == len(expected) == 1722
    # IP-literal DoH endpoints are in there and must survive.
    assert "1.1.1.1" in {t.host for t in result.targets}


def test_csv_bad_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "list.csv"
    p.write_text(
        "url,category_code,category_description,date_added,source,notes\n"  # 1
        "https://good.example/,NEWS,News Media,2014-04-15,citizenlab,\n"  # 2
        "ftp://files.example/,FILE,File-sharing,2014-04-15,citizenlab,\n"  # 3
        'https://multi.example/,HUMR,Human Rights,2014-04-15,x,"two\nlines"\n'  # 4-5
        "http://bad_port.example:99999/,NEWS,News Media,2014-04-15,x,\n"  # 6
        "\n"  # 7
        "https://short.example/,NEWS\n"  # 8
        "http://old.example/,POLT,Political,2014-04-15,x,old code\n"  # 9
        "https://GOOD.example,NEWS,News Media,2014-04-15,x,dup\n"  # 10
        ",NEWS,News Media,2014-04-15,x,\n",  # 11
        encoding="utf-8",
    )
    result = load_file(p)
    assert result.format == "csv"
    assert [t.url for t in result.targets] == [
        "https://good.example/",
        "https://multi.example/",
        "http://old.example/",
    ]
    assert result.targets[1].notes == "two\nlines"
    assert result.targets[2].category == "POLR"  # old code mapped to its replacement
    assert result.duplicates == 1
    lines = [int(e.split(":")[1]) for e in result.errors]
    assert lines == [3, 6, 8, 11], result.errors
    assert all(e.startswith(f"{p}:") for e in result.errors)
    assert "scheme 'ftp'" in result.errors[0]
    assert "port 99999" in result.errors[1]
    assert "expected 6 CSV fields, got 2" in result.errors[2]
    assert "empty URL" in result.errors[3]


# --- plain text ----------------------------------------------------------------------------------


def test_plain_text_mix_of_good_and_bad_lines(tmp_path: Path) -> None:
    p = tmp_path / "list.txt"
    p.write_text(
        "# my list\n"  # 1
        "\n"  # 2
        "example.com\n"  # 3
        "http://plain.example/path?q=1  # trailing comment\n"  # 4
        "example.net:8443\n"  # 5
        "ftp://files.example/\n"  # 6
        "bad host.example\n"  # 7
        "   \n"  # 8
        "10.0.0.256\n"  # 9
        "[2001:db8::1]:8080\n"  # 10
        "https://EXAMPLE.com:443\n"  # 11 -- same as line 3
        "-leading-hyphen.example\n"  # 12
        "203.0.113.7:80\n"  # 13
        "http://namba.kz/#!/\n"  # 14
        "пример.рф\n"  # 15
        "example.org:0\n"  # 16
        "mailto:someone@example.org\n",  # 17
        encoding="utf-8",
    )
    result = load_file(p)
    assert result.format == "text"
    assert [t.url for t in result.targets] == [
        "https://example.com/",
        "http://plain.example/path?q=1",
        "https://example.net:8443/",
        "https://[2001:db8::1]:8080/",
        "https://203.0.113.7:80/",
        "http://namba.kz/#!/",
        "https://пример.рф/",
    ]
    assert result.duplicates == 1
    lines = [int(e.split(":")[1]) for e in result.errors]
    assert lines == [6, 7, 9, 12, 16, 17], result.errors
    assert result.targets[2].port == 8443
    assert result.targets[3].host == "2001:db8::1"


def test_plain_text_with_crlf_and_bom(tmp_path: Path) -> None:
    p = tmp_path / "win.txt"
    p.write_bytes("\ufeffexample.com\r\nnot..valid\r\nexample.org\r\n".encode())
    result = load_file(p)
    assert [t.url for t in result.targets] == ["https://example.com/", "https://example.org/"]
    assert len(result.errors) == 1 and result.errors[0].startswith(f"{p}:2: ")


def test_empty_file_is_empty_list(tmp_path: Path) -> None:
    p = tmp_path / "empty.txt"
    p.write_text("# nothing yet\n\n", encoding="utf-8")
    assert load_file(p) == LoadResult(targets=[], errors=[], duplicates=0, format="text")


# --- unusable files ------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.csv"
    with pytest.raises(TargetListError, match=re.escape(f"{p}: no such file")):
        load_file(p)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(TargetListError, match="is a directory"):
        load_file(tmp_path)


def test_binary_garbage(tmp_path: Path) -> None:
    p = tmp_path / "garbage.bin"
    p.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    with pytest.raises(TargetListError, match=re.escape(f"{p}: binary file")):
        load_file(p)


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin1.txt"
    p.write_bytes("example.com\ncafé.example\nexample.org\n".encode("latin-1"))
    res = load_file(p)  # the bad line is skipped with its location; the good ones are kept
    assert [t.url for t in res.targets] == ["https://example.com/", "https://example.org/"]
    assert res.errors == [f"{p}:2: not UTF-8 (invalid byte 0xe9 at column 4); line skipped"]


def test_bounded_reading(tmp_path: Path) -> None:
    with pytest.raises(TargetListError, match=r"/dev/zero: binary file \(NUL byte at offset 0\)"):
        load_file("/dev/zero")
    big = tmp_path / "big.txt"
    big.write_bytes(b"a.example\n" * (64 * 1024 * 1024 // 10 + 1))
    with pytest.raises(TargetListError, match=r"larger than 64 MiB"):
        load_file(big)
    long = tmp_path / "long.txt"
    long.write_text("ok.example\nhttps://x.example/" + "a" * 1_000_000 + "\n", encoding="utf-8")
    res = load_file(long)
    assert [t.url for t in res.targets] == ["https://ok.example/"]
    assert res.errors == [f"{long}:2: line longer than 8192 characters; skipped"]


def test_unknown_csv_header_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "news.csv"
    p.write_text("https://a.example/,NEWS,News\n", encoding="utf-8")
    with pytest.raises(TargetListError, match=r"news.csv:1: unknown CSV header"):
        load_file(p)


def test_load_prefers_an_existing_file_over_a_builtin_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("kz2014").write_text("example.com\n", encoding="utf-8")
    assert [t.url for t in load("kz2014").targets] == ["https://example.com/"]


def test_control_characters_do_not_shift_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "ff.txt"
    p.write_text("example.com\nbad\x0chost.example\nexample.org\nnot..ok\n", encoding="utf-8")
    result = load_file(p)
    assert [e.split(":")[1] for e in result.errors] == ["2", "4"]
    assert len(result.targets) == 2


# --- canonical URLs ------------------------------------------------------------------------------

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_tld = st.from_regex(r"[a-z]{2,10}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    labels=st.lists(_label, min_size=1, max_size=4),
    tld=_tld,
    port=st.one_of(st.none(), st.integers(1, 65535)),
    upper=st.booleans(),
    path=st.sampled_from(["", "/", "/a/b", "/x?y=1", "/#frag"]),
)
def test_valid_hosts_are_accepted_and_canonical_form_is_stable(
    labels: list[str], tld: str, port: int | None, upper: bool, path: str
) -> None:
    host = ".".join([*labels, tld])
    if upper:
        host = host.upper()
    entry = host + (f":{port}" if port is not None else "") + path
    key = check_url(url_from_line(entry))
    assert check_url(key) == key  # idempotent
    assert key.startswith(f"https://{host.lower()}")
    assert (f":{port}" in key) == (port not in (None, 443))


@settings(max_examples=200, deadline=None)
@given(port=st.one_of(st.integers(max_value=0), st.integers(min_value=65536)))
def test_out_of_range_ports_are_rejected(port: int) -> None:
    with pytest.raises(URLProblem):
        check_url(f"http://example.com:{port}/")
