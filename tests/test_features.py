"""The feature layer: body decoding (bounded), charset, linear-time titles, SNI/Host, A/AAAA folding.

Expected values come from how the bytes were built here (compressed with the stdlib / brotli,
a ClientHello made by the stdlib's own TLS client), never from the feature layer's output.
"""

from __future__ import annotations

import gzip
import hashlib
import ssl
import time
import zlib

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kzprobe import errors as E
from kzprobe.analysis import features as F
from kzprobe.analysis.fingerprints import Fingerprints, parse
from kzprobe.model import CONTROL, STEP_DNS, Observation

PAGE = ("<html><head><meta charset='utf-8'><title>\n  Главная   страница\t</title></head>"
        "<body>" + "Привет, мир. " * 400 + "</body></html>").encode()


def _deflate_raw(b: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(b) + c.flush()


@pytest.mark.parametrize("encoding,raw", [
    ("gzip", gzip.compress(PAGE)),
    ("x-gzip", gzip.compress(PAGE)),
    ("deflate", zlib.compress(PAGE)),
    ("deflate", _deflate_raw(PAGE)),  # raw deflate, as some servers send it
    ("br", brotli.compress(PAGE)),
    ("identity", PAGE),
    ("GZIP", gzip.compress(PAGE)),
])
def test_decode_body_undoes_each_coding(encoding: str, raw: bytes) -> None:
    dec = F.decode_body(raw, {"Content-Encoding": encoding})
    assert dec.body == PAGE and dec.error is None and not dec.truncated
    assert dec.encoding == (None if encoding == "identity" else encoding)


def test_stacked_codings_are_undone_last_first() -> None:
    raw = brotli.compress(gzip.compress(PAGE))
    dec = F.decode_body(raw, {"content-encoding": "gzip, br"})
    assert dec.body == PAGE and dec.error is None


def test_concatenated_gzip_members() -> None:
    raw = gzip.compress(PAGE[:100]) + gzip.compress(PAGE[100:])
    assert F.decode_body(raw, {"content-encoding": "gzip"}).body == PAGE


@pytest.mark.parametrize("coding,compress", [
    ("gzip", lambda b: gzip.compress(b, 1)), ("deflate", lambda b: zlib.compress(b, 1)),
    ("br", lambda b: brotli.compress(b, quality=1))])
def test_decompression_bomb_stops_at_the_cap(coding: str, compress: object) -> None:
    bomb = compress(b"\0" * (64 * 1024 * 1024))  # type: ignore[operator]
    t0 = time.perf_counter()
    dec = F.decode_body(bomb, {"Content-Encoding": coding}, cap=1000)
    assert len(dec.body) == 1000 and dec.truncated and dec.error is None
    assert time.perf_counter() - t0 < 1.0  # did not inflate 64 MiB first


def test_body_cut_on_the_wire_decodes_as_far_as_it_goes() -> None:
    raw = gzip.compress(PAGE)
    dec = F.decode_body(raw[: len(raw) // 2], {"Content-Encoding": "gzip"})
    assert PAGE.startswith(dec.body) and 0 < len(dec.body) < len(PAGE)
    assert dec.error == "gzip: stream ends early"


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_garbage_gives_an_error_not_an_exception(coding: str) -> None:
    dec = F.decode_body(b"<html>not compressed at all</html>" * 3, {"Content-Encoding": coding})
    assert dec.error and dec.error.startswith(coding)


def test_unknown_coding_keeps_the_raw_bytes() -> None:
    dec = F.decode_body(b"abc", {"Content-Encoding": "zstd"})
    assert dec.body == b"abc" and dec.error == "unsupported content-encoding 'zstd'"


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=512), coding=st.sampled_from(["gzip", "deflate", "br", "gzip, br", "x", ""]),
       cap=st.integers(min_value=0, max_value=300))
def test_decode_body_never_raises_and_respects_the_cap(raw: bytes, coding: str, cap: int) -> None:
    dec = F.decode_body(raw, {"Content-Encoding": coding}, cap=cap)
    assert len(dec.body) <= cap


# --- charset and title --------------------------------------------------------------------------
def test_charset_from_header_then_meta_then_utf8() -> None:
    cp = "<title>Главная</title>".encode("cp1251")
    assert F.charset_of({"Content-Type": "text/html; charset=windows-1251"}, cp) == "cp1251"
    assert F.charset_of({}, b"<meta charset=\"KOI8-R\">") == "koi8-r"
    assert F.charset_of({"Content-Type": "text/html; charset=bogus"}, b"") == "utf-8"
    feats = F.http_features(200, {"Content-Type": "text/html; charset=windows-1251"}, cp, fingerprints=Fingerprints([]))
    assert feats["title"] == "Главная"


def test_title_is_normalised() -> None:
    assert F.title_of(PAGE) == "Главная страница"
    assert F.title_of(b"<TITLE lang=ru>A\r\n B</TITLE>") == "A B"
    assert F.title_of(b"<titles>x</titles><title>real</title>") == "real"
    assert F.title_of(b"<title>" + b"x" * 5000 + b"</title>") == "x" * 200
    assert F.title_of(b"<title>never closed") == ""
    assert F.title_of(b"no title") == ""


def test_pathological_title_is_linear() -> None:
    body = (b"<title>" * (512 * 1024 // 7 + 1))[: 512 * 1024]
    t0 = time.perf_counter()
    feats = F.http_features(200, {}, body)
    elapsed = time.perf_counter() - t0
    assert feats["title"] == "" and feats["body_length"] == 512 * 1024
    assert elapsed < 0.05, f"{elapsed * 1000:.1f} ms"


def test_pathological_title_with_a_close_far_away() -> None:
    body = (b"<title>" * 70000 + b"</title>")
    t0 = time.perf_counter()
    assert F.title_of(body).startswith("<title>")
    assert time.perf_counter() - t0 < 0.05


# --- http_features ------------------------------------------------------------------------------
BLOCK_CSV = ("name,scope,location_found,pattern_type,pattern,confidence_no_fp,expected_countries,source,exp_url,notes\n"
             "kz_block,isp,body,contains,Доступ к ресурсу ограничен,9,KZ,,,\n"
             "kz_hdr,isp,header.server,full,kz-filter,8,KZ,,,\n"
             "kz_dns,isp,dns,full,198.51.100.99,9,KZ,,,\n"
             "fp_dns,fp,dns,prefix,198.51.100.,9,,,,\n")


def test_gzip_blockpage_is_recognised_after_decoding() -> None:
    fps = Fingerprints(parse(BLOCK_CSV, "t"))
    page = "<html><title>Блок</title>Доступ к ресурсу ограничен</html>".encode()
    raw = gzip.compress(page)
    feats = F.http_features(200, {"Content-Encoding": "gzip"}, raw, fingerprints=fps)
    assert feats == {
        "title": "Блок", "body_length": len(page), "body_sha256": hashlib.sha256(page).hexdigest(),
        "body_head": page.decode(), "truncated": False, "content_encoding": "gzip", "wire_bytes": len(raw),
        "blockpage": "kz_block",
    }
    assert F.http_features(200, {"Server": "kz-filter"}, b"", fingerprints=fps)["blockpage"] == "kz_hdr"
    assert F.http_features(200, {"Server": "nginx"}, page.replace("Доступ".encode(), b"x"),
                           fingerprints=fps)["blockpage"] is None


def test_features_flag_truncation_from_either_side() -> None:
    assert F.http_features(200, {}, b"abc", truncated_on_wire=True)["truncated"] is True
    big = gzip.compress(b"a" * (F.BODY_CAP + 10))
    feats = F.http_features(200, {"content-encoding": "gzip"}, big)
    assert feats["truncated"] is True and feats["body_length"] == F.BODY_CAP and feats["wire_bytes"] == len(big)


def test_decode_error_is_reported() -> None:
    assert F.http_features(200, {"content-encoding": "gzip"}, b"junk")["decode_error"].startswith("gzip")


def test_dns_fingerprints_skip_false_positives() -> None:
    fps = Fingerprints(parse(BLOCK_CSV, "t"))
    assert F.dns_blockpage(["203.0.113.5", "198.51.100.99"], fps) == "kz_dns"
    assert F.dns_blockpage(["198.51.100.98"], fps) is None  # only the fp row matches


# --- SNI and Host -------------------------------------------------------------------------------
def _client_hello(server_name: str) -> bytes:
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        return out.read()
    raise AssertionError("a handshake cannot complete without a server")


_HELLO = _client_hello("a.example")


def test_sni_of_a_real_client_hello() -> None:
    hello = _client_hello("Blocked.Example")
    assert F.sni_of(hello) == "blocked.example"
    # Split across two records, as some clients (and evasion tools) do.
    body = hello[5:]
    split = (b"\x16\x03\x01" + (40).to_bytes(2, "big") + body[:40]
             + b"\x16\x03\x01" + (len(body) - 40).to_bytes(2, "big") + body[40:])
    assert F.sni_of(split) == "blocked.example"


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(min_value=0, max_value=600), junk=st.binary(max_size=64))
def test_sni_of_never_raises(cut: int, junk: bytes) -> None:
    hello = _HELLO
    F.sni_of(hello[:cut] + junk)
    F.sni_of(junk)


@pytest.mark.parametrize("req,host", [
    (b"GET / HTTP/1.1\r\nHost: Site.Example:8080\r\nAccept: */*\r\n\r\n", "site.example"),
    (b"GET / HTTP/1.1\r\nhost:site.example.\r\n\r\n", "site.example"),
    (b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", "2001:db8::1"),
    (b"GET / HTTP/1.1\r\nX-Host: no\r\n\r\n", None),
    (b"\x16\x03\x01garbage", None),
])
def test_host_of(req: bytes, host: str | None) -> None:
    assert F.host_of(req) == host


# --- A/AAAA folding -----------------------------------------------------------------------------
def _q(qtype: str, addrs: list[str], failure: str | None = None, t: float = 0.0, **kw: object) -> Observation:
    return Observation(step=STEP_DNS, target="https://s.example/", domain="s.example", t_start=t, t_end=t + 0.1,
                       failure=failure, packets=[int(t * 10) + (1 if qtype == "A" else 2)],
                       data={"resolver": "1.1.1.1:53", "transport": "udp", "qtype": qtype,
                             "answers": [{"type": qtype, "data": a} for a in addrs], "addresses": addrs,
                             "responses": [{"rcode": "NOERROR", "addresses": addrs}]}, **kw)  # type: ignore[arg-type]


def test_fold_dns_pairs_a_with_aaaa() -> None:
    a, q = _q("A", ["203.0.113.1"]), _q("AAAA", [], E.DNS_NO_ANSWER, t=0.01)
    other = _q("A", ["203.0.113.2"], vantage=CONTROL)
    out = F.fold_dns([a, q, other])
    assert len(out) == 2 and out[1] is other
    m = out[0]
    assert m.failure is None and m.data["qtype"] == "A+AAAA" and m.data["addresses"] == ["203.0.113.1"]
    assert m.packets == [1, 2]


def test_fold_dns_keeps_a_real_failure_and_far_apart_queries() -> None:
    a, q = _q("A", [], E.DNS_NXDOMAIN), _q("AAAA", [], E.DNS_NO_ANSWER, t=0.2)
    assert F.fold_dns([a, q])[0].failure == E.DNS_NXDOMAIN
    late = _q("AAAA", ["2001:db8::1"], t=5.0)
    out = F.fold_dns([_q("A", ["203.0.113.1"]), late])
    assert [o.data["qtype"] for o in out] == ["A", "AAAA"]
