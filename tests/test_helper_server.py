"""The control helper (``kzprobe helper``): it measures, it refuses to be an open proxy, it survives abuse.

Everything runs on loopback addresses of its own (127.31.7.0/24) so it cannot collide with the
shared loopback test network: a dnsmasq resolver, an HTTPS site with a trustme certificate, and
helper subprocesses.  The helper started *without* ``--allow-private`` cannot measure anything
here -- which is the point: those tests check that it refuses, and that the site saw no
connection from it.  No test sends a packet to a non-loopback address, *even if the helper
regresses*: only loopback addresses are ever handed to a helper process; the private, link-local
and public examples are checked by the pure policy functions and the httpx request hook, which
never open a socket.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import httpx
import pytest
import trio
import trustme

from kzprobe.helper.policy import Policy, PolicyError
from kzprobe.helper.server import HelperApp, HttpError, Limits, parse_request
from kzprobe.helper.service import ControlResult, HelperEngine, RefusedByPolicy
from kzprobe.model import Observation
from kzprobe.probes.engine import ProbeConfig

HELPER_ADDR = "127.31.7.1"
DNS_ADDR = "127.31.7.2"
SITE_ADDR = "127.31.7.3"
SITE_NAME = "site.test"
SITE_TITLE = "Helper Test Site"
LAB_TOKEN = "lab-token-0123456789abcdef"
STRICT_TOKEN = "strict-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]


# --- the loopback network ---------------------------------------------------------------------
class _Site(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], ctx: ssl.SSLContext) -> None:
        super().__init__(addr, _Handler)
        self.ctx = ctx
        self.accepted = 0
        self._lock = threading.Lock()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._lock:
            self.accepted += 1
        return True

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Handshake in the connection's own thread, so a stuck client cannot stall accept().
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.RequestHandlerClass(tls, client_address, self)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"<html><head><title>{SITE_TITLE}</title></head><body>hello from {SITE_NAME}</body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Helper:
    proc: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class Net:
    tmp: Path
    ca: trustme.CA
    ca_path: Path
    dns_port: int
    site_port: int
    site: _Site

    @property
    def resolver(self) -> str:
        return f"{DNS_ADDR}:{self.dns_port}"

    @property
    def site_url(self) -> str:
        return f"https://{SITE_NAME}:{self.site_port}/"


def _kzprobe() -> list[str]:
    return [sys.executable, "-m", "kzprobe.cli"]


def _free_port(addr: str, kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def _dns_ready(port: int, deadline: float) -> bool:
    q = dns.message.make_query(SITE_NAME, "A")
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            r = dns.query.udp(q, DNS_ADDR, port=port, timeout=0.3)
            if any(rd.to_text() == SITE_ADDR for rrset in r.answer for rd in rrset):
                return True
        time.sleep(0.1)
    return False


def start_helper(*args: str, timeout: float = 30.0) -> Helper:
    proc = subprocess.Popen([*_kzprobe(), "helper", *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    assert proc.stderr is not None
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def drain() -> None:
        # Keep reading for the helper's whole life: a full stderr pipe would block its logging.
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            m = re.search(r"kzprobe helper listening on (\S+)", line)
            if m and not url:
                url.append(m.group(1))
                found.set()
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    if not found.wait(timeout) or not url:
        proc.kill()
        proc.wait()
        raise AssertionError(f"helper did not start: {' | '.join(lines)}")
    return Helper(proc, url[0], lines)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed")
    tmp = tmp_path_factory.mktemp("helper")
    ca = trustme.CA()
    ca_path = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    leaf = ca.issue_cert(SITE_NAME)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    site = _Site((SITE_ADDR, 0), ctx)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    dnsmasq: subprocess.Popen[bytes] | None = None
    port = 0
    try:
        for _ in range(3):  # the port probe races with other processes: retry on a collision
            port = _free_port(DNS_ADDR, socket.SOCK_DGRAM)
            dnsmasq = subprocess.Popen(
                ["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces", "--pid-file=",
                 f"--listen-address={DNS_ADDR}", f"--port={port}", f"--address=/{SITE_NAME}/{SITE_ADDR}",
                 "--log-facility=-"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            if _dns_ready(port, time.monotonic() + 5):
                break
            dnsmasq.kill()
            dnsmasq.wait()
            dnsmasq = None
        if dnsmasq is None:
            pytest.skip("dnsmasq did not start on loopback")
        yield Net(tmp, ca, ca_path, port, site.server_address[1], site)
    finally:
        site.shutdown()
        site.server_close()
        if dnsmasq is not None:
            dnsmasq.terminate()
            try:
                dnsmasq.wait(timeout=5)
            except subprocess.TimeoutExpired:
                dnsmasq.kill()
                dnsmasq.wait()


@pytest.fixture(scope="module")
def lab_helper(net: Net) -> Iterator[Helper]:
    # A generous per-client rate: every test of this module asks from the same address, and the
    # per-client limits are tested on helpers of their own (test_helper_attacks).  With the default
    # (4/s, burst 20) an unloaded machine runs the module fast enough to be answered 429.
    h = start_helper("--listen", f"{HELPER_ADDR}:0", "--allow-private", "--resolver", net.resolver,
                     "--ca-bundle", str(net.ca_path), "--token", LAB_TOKEN, "--client-rate", "1000")
    yield h
    h.stop()


@pytest.fixture(scope="module")
def strict_helper(net: Net) -> Iterator[Helper]:
    h = start_helper("--listen", f"{HELPER_ADDR}:0", "--resolver", net.resolver, "--ca-bundle", str(net.ca_path),
                     "--token", STRICT_TOKEN, "--io-timeout", "1", "--client-rate", "1000")
    yield h
    h.stop()


def post(helper: Helper, payload: Any, *, token: str | None, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    body = raw if raw is not None else json.dumps(payload).encode()
    with httpx.Client(trust_env=False, timeout=60) as c:
        return c.post(f"{helper.url}/v1/control", content=body, headers=hdrs)


def error_of(r: httpx.Response, status: int) -> str:
    """The response is the expected JSON error; returns its code."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "code"}, body
    assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"]
    return str(body["code"])


# --- measuring -----------------------------------------------------------------------------------
def test_lab_helper_measures_the_site(net: Net, lab_helper: Helper) -> None:
    r = post(lab_helper, {"url": net.site_url, "addresses": [SITE_ADDR]}, token=LAB_TOKEN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1
    assert body["refused"] == []
    obs = [Observation.from_dict(d) for d in body["observations"]]
    assert obs and all(o.vantage == "control" for o in obs)
    assert all(o.target == net.site_url and o.domain == SITE_NAME for o in obs)
    by_step: dict[str, list[Observation]] = {}
    for o in obs:
        by_step.setdefault(o.step, []).append(o)
    dns_obs = by_step["dns"]
    # The helper used *its* resolver (the only one it was given), over UDP and TCP, and does not
    # say where that resolver is.
    assert {o.data["resolver"] for o in dns_obs} == {"control"}
    assert sorted(o.data["transport"] for o in dns_obs) == ["tcp", "udp"]
    assert net.resolver.rsplit(":", 1)[0] not in r.text
    assert all(o.ok and SITE_ADDR in o.data["addresses"] for o in dns_obs)
    (tcp,) = by_step["tcp"]
    assert tcp.ok and tcp.address == SITE_ADDR and tcp.port == net.site_port
    (tls,) = by_step["tls"]
    assert tls.ok and tls.data["sni"] == SITE_NAME
    assert tls.data["cert_valid"] is True, tls.data.get("cert_failure")
    (http,) = by_step["http"]
    assert http.ok and http.data["status"] == 200 and http.data["title"] == SITE_TITLE
    assert http.data["body_length"] > 0 and len(http.data["body_sha256"]) == 64


def test_lab_helper_health(lab_helper: Helper) -> None:
    # Without the token: alive, nothing more (no version to match against known bugs).
    r = httpx.get(f"{lab_helper.url}/v1/health", trust_env=False)
    assert r.status_code == 200 and r.json() == {"ok": True}
    r = httpx.get(f"{lab_helper.url}/v1/health", trust_env=False,
                  headers={"Authorization": "Bearer wrong-but-long-enough"})
    assert r.status_code == 200 and r.json() == {"ok": True}
    r = httpx.get(f"{lab_helper.url}/v1/health", trust_env=False, headers={"Authorization": f"Bearer {LAB_TOKEN}"})
    assert r.status_code == 200 and r.json()["ok"] is True and r.json()["version"] == 1


def test_token_is_required(net: Net, lab_helper: Helper) -> None:
    payload = {"url": net.site_url, "addresses": []}
    assert error_of(post(lab_helper, payload, token=None), 401) == "unauthorized"
    assert error_of(post(lab_helper, payload, token="wrong"), 401) == "unauthorized"
    r = post(lab_helper, payload, token=None, headers={"Authorization": f"Basic {LAB_TOKEN}"})
    assert error_of(r, 401) == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")


# --- not an open proxy ----------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "code"), [
    ("http://127.31.7.3/", "forbidden_address"),          # loopback literal
    ("https://127.0.0.1/", "forbidden_address"),
    ("http://[::1]/", "forbidden_address"),
    ("http://[::ffff:127.0.0.1]/", "forbidden_address"),  # mapped IPv4 reaches loopback too
    ("https://site.test/", "forbidden_address"),          # a name that resolves to 127.31.7.3
    ("https://site.test:8443/", "forbidden_port"),
    ("http://site.test:22/", "forbidden_port"),
    ("ftp://site.test/", "forbidden_scheme"),
    ("file:///etc/passwd", "forbidden_scheme"),
])
def test_strict_helper_refuses(net: Net, strict_helper: Helper, url: str, code: str) -> None:
    before = net.site.accepted
    r = post(strict_helper, {"url": url, "addresses": []}, token=STRICT_TOKEN)
    assert error_of(r, 403) == code
    assert net.site.accepted == before, "the helper connected to a forbidden address"


def test_strict_helper_refuses_given_private_addresses(net: Net, strict_helper: Helper) -> None:
    """Bogons the probe saw are not measured, but the helper's own DNS still answers.

    A bogon DNS answer at the probe is a main sign of DNS blocking; refusing the whole request
    would cost the control measurement exactly when it is needed.  So given addresses are
    refused one by one, with a reason, and nothing connects to them.
    """
    before = net.site.accepted
    given = [SITE_ADDR, "127.0.0.1", "::1", "::ffff:127.31.7.3"]
    r = post(strict_helper, {"url": "https://unknown.test/", "addresses": given}, token=STRICT_TOKEN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert {x["address"] for x in body["refused"]} == {str(ipaddress.ip_address(a)) for a in given}
    assert all(x["reason"] for x in body["refused"])
    steps = {o["step"] for o in body["observations"]}
    assert steps == {"dns"}, steps  # no tcp / tls / http to any of them
    assert net.site.accepted == before
    # The same addresses for a name that resolves only to forbidden ones: refused outright.
    r = post(strict_helper, {"url": "https://site.test/", "addresses": given}, token=STRICT_TOKEN)
    assert error_of(r, 403) == "forbidden_address"
    assert net.site.accepted == before


# --- bad requests ------------------------------------------------------------------------------------
def test_oversized_body(strict_helper: Helper) -> None:
    big = {"url": "https://unknown.test/", "pad": "a" * 9000}
    assert error_of(post(strict_helper, big, token=STRICT_TOKEN), 413) == "too_large"
    # Without Content-Length (chunked) the cap holds while reading.
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 1024

    with httpx.Client(trust_env=False, timeout=30) as c:
        r = c.post(f"{strict_helper.url}/v1/control", content=chunks(),
                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {STRICT_TOKEN}"})
    assert error_of(r, 413) == "too_large"


@pytest.mark.parametrize(("raw", "code"), [
    (b"{not json", "bad_json"),
    (b"\xff\xfe\x00", "bad_json"),
    (b"[" * 4000, "bad_json"),
    (b"[1, 2]", "bad_request"),
    (b'{"addresses": []}', "bad_request"),
    (b'{"url": 5}', "bad_request"),
    (b'{"url": "https://a.test/", "addresses": "1.2.3.4"}', "bad_request"),
    (b'{"url": "https://a.test/", "addresses": [1]}', "bad_request"),
    (b'{"url": "https://a.test/", "addresses": ["not-an-ip"]}', "bad_address"),
    (json.dumps({"url": "https://a.test/", "addresses": [f"127.31.7.{i}" for i in range(9)]}).encode(),
     "too_many_addresses"),
    (json.dumps({"url": "https://a.test/" + "x" * 3000}).encode(), "bad_url"),
    (b'{"url": "https://a..test/"}', "bad_url"),
    (b'{"url": "https://user:pw@a.test/"}', "bad_url"),
])
def test_malformed_requests(strict_helper: Helper, raw: bytes, code: str) -> None:
    assert error_of(post(strict_helper, None, token=STRICT_TOKEN, raw=raw), 400) == code


def test_routing_errors_are_json(strict_helper: Helper) -> None:
    with httpx.Client(trust_env=False, timeout=10) as c:
        assert error_of(c.get(f"{strict_helper.url}/nope"), 404) == "not_found"
        r = c.get(f"{strict_helper.url}/v1/control", headers={"Authorization": f"Bearer {STRICT_TOKEN}"})
        assert error_of(r, 405) == "method_not_allowed" and r.headers["allow"] == "POST"
    r = post(strict_helper, {}, token=STRICT_TOKEN, headers={"Content-Type": "text/plain"})
    assert error_of(r, 415) == "unsupported_media_type"


def _raw_exchange(helper: Helper, data: bytes, wait: float) -> bytes:
    host, port = helper.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        out = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(4096):
                out += chunk
        return out


def test_slow_clients_are_dropped(strict_helper: Helper) -> None:
    # Slow-loris on the head: never finished, the connection is closed after --io-timeout (1 s).
    t0 = time.monotonic()
    out = _raw_exchange(strict_helper, b"POST /v1/control HTTP/1.1\r\nHost: x\r\n", wait=8)
    assert time.monotonic() - t0 < 6, "an unfinished request head held the connection"
    assert b"200" not in out.split(b"\r\n", 1)[0]
    # Slow-loris on the body: 408 with a JSON error.
    head = (f"POST /v1/control HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {STRICT_TOKEN}\r\nContent-Length: 100\r\n\r\n").encode()
    t0 = time.monotonic()
    out = _raw_exchange(strict_helper, head + b'{"url": ', wait=8)
    assert time.monotonic() - t0 < 6
    status_line, _, rest = out.partition(b"\r\n")
    assert b" 408" in status_line, out
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["code"] == "body_timeout"


def test_keeps_serving_after_abuse(net: Net, lab_helper: Helper) -> None:
    host, port = lab_helper.url.removeprefix("http://").rsplit(":", 1)
    # Garbage at the HTTP level, a connection cut mid-body, a bad JSON body, an oversized body.
    _raw_exchange(lab_helper, b"\x16\x03\x01\x00\xff garbage\r\n\r\n", wait=3)
    with socket.create_connection((host, int(port)), timeout=3) as s:
        s.sendall(b"POST /v1/control HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500\r\n\r\n{\"url\"")
    error_of(post(lab_helper, None, token=LAB_TOKEN, raw=b"{oops"), 400)
    error_of(post(lab_helper, {"pad": "b" * 20000}, token=LAB_TOKEN), 413)
    assert lab_helper.proc.poll() is None
    r = post(lab_helper, {"url": net.site_url, "addresses": [SITE_ADDR]}, token=LAB_TOKEN)
    assert r.status_code == 200, r.text
    https = [o for o in r.json()["observations"] if o["step"] == "http"]
    assert https and https[0]["data"]["status"] == 200


# --- the probe side, end to end ---------------------------------------------------------------------------
def test_probe_run_stores_control_observations(net: Net, lab_helper: Helper, tmp_path: Path) -> None:
    targets = tmp_path / "targets.txt"
    targets.write_text(net.site_url + "\n")
    db = tmp_path / "kz.db"
    cmd = [*_kzprobe(), "run", "--targets", str(targets), "--resolver", net.resolver, "--no-system-resolver",
           "--ca-bundle", str(net.ca_path), "--helper", f"{lab_helper.url}#token={LAB_TOKEN}", "--no-progress",
           "--format", "json", "--db", str(db), "--timeout", "3"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    (verdict,) = json.loads(p.stdout)["verdicts"]
    assert verdict["target"] == net.site_url
    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT step, address, failure, data FROM observations WHERE vantage = 'control'"
                           ).fetchall()
    steps = {r[0] for r in rows}
    assert {"dns", "tcp", "tls", "http"} <= steps, rows
    tls = [json.loads(r[3]) for r in rows if r[0] == "tls"]
    assert tls and tls[0]["cert_valid"] is True
    http = [json.loads(r[3]) for r in rows if r[0] == "http"]
    assert http[0]["status"] == 200 and http[0]["title"] == SITE_TITLE
    assert verdict["status"] == "ok", verdict


# --- options, TLS, shutdown ---------------------------------------------------------------------------
def test_tls_listener_and_clean_exit_on_sigint(net: Net) -> None:
    cert = net.ca.issue_cert(HELPER_ADDR)
    cert_path, key_path = net.tmp / "helper.crt", net.tmp / "helper.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    h = start_helper("--listen", f"{HELPER_ADDR}:0", "--tls-cert", str(cert_path), "--tls-key", str(key_path))
    try:
        assert h.url.startswith(f"https://{HELPER_ADDR}:")
        r = httpx.get(f"{h.url}/v1/health", verify=ssl.create_default_context(cafile=str(net.ca_path)), trust_env=False)
        assert r.status_code == 200 and r.json()["ok"] is True
        h.proc.send_signal(signal.SIGINT)
        assert h.proc.wait(timeout=10) == 0
        time.sleep(0.2)
        assert not any("Traceback" in line for line in h.lines), h.lines
    finally:
        h.stop()


@pytest.mark.parametrize("args", [
    ["--listen", "nonsense"],
    ["--listen", "127.0.0.1:99999"],
    ["--resolver", "not-an-ip"],
    ["--tls-cert", __file__],
    ["--ca-bundle", __file__],
    ["--timeout", "0"],
    ["--token", ""],
])
def test_bad_options_give_one_line_errors(args: list[str]) -> None:
    p = subprocess.run([*_kzprobe(), "helper", *args], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and "Error:" in p.stderr


def test_listen_on_busy_port_is_a_clean_error() -> None:
    with socket.socket() as s:
        s.bind((HELPER_ADDR, 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([*_kzprobe(), "helper", "--listen", f"{HELPER_ADDR}:{port}"], capture_output=True,
                           text=True, timeout=60, cwd=REPO)
    assert p.returncode == 1, p.stderr
    assert "cannot listen on" in p.stderr and "Traceback" not in p.stderr


# --- the ASGI app in process: limits that are slow or racy to provoke over sockets -----------------------
async def _call(app: HelperApp, body: bytes, *, path: str = "/v1/control", method: str = "POST",
                headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if chunks:
            return chunks.pop(0)
        await trio.sleep_forever()
        raise AssertionError

    async def send(msg: Any) -> None:
        sent.append(dict(msg))

    scope = {"type": "http", "path": path, "method": method,
             "headers": headers if headers is not None else [(b"content-type", b"application/json")]}
    await app(scope, receive, send)
    start, data = sent[0], sent[1]
    return start["status"], json.loads(data["body"])


GOOD = json.dumps({"url": "https://a.test/", "addresses": []}).encode()


def test_app_busy_and_deadline() -> None:
    release = trio.Event()

    async def slow_measure(url: str, addresses: list[str]) -> ControlResult:
        await release.wait()
        return ControlResult([], [])

    async def main() -> None:
        app = HelperApp(slow_measure, limits=Limits(concurrency=1, queue=0, deadline=5))
        results: list[tuple[int, dict[str, Any]]] = []
        async with trio.open_nursery() as n:
            async def first() -> None:
                results.append(await _call(app, GOOD))

            n.start_soon(first)
            await trio.sleep(0.05)
            with trio.fail_after(1):  # "busy" must be answered at once, not queued
                status, body = await _call(app, GOOD)
            assert (status, body["code"]) == (503, "busy")
            release.set()
        assert results[0][0] == 200

        async def hung(url: str, addresses: list[str]) -> ControlResult:
            await trio.sleep_forever()
            raise AssertionError

        hang = HelperApp(hung, limits=Limits(deadline=0.2))
        status, body = await _call(hang, GOOD)
        assert (status, body["code"]) == (504, "timeout")
        # The limiter slot of the timed-out request was given back.
        assert hang.limiter.borrowed_tokens == 0

    trio.run(main)


def test_app_queues_a_burst_then_sheds_load() -> None:
    release = trio.Event()

    async def slow_measure(url: str, addresses: list[str]) -> ControlResult:
        await release.wait()
        return ControlResult([], [])

    async def main() -> None:
        app = HelperApp(slow_measure, limits=Limits(concurrency=1, queue=1, queue_wait=2.0, deadline=5))
        results: list[int] = []

        async def call() -> None:
            results.append((await _call(app, GOOD))[0])

        async with trio.open_nursery() as n:
            n.start_soon(call)           # measuring
            await trio.sleep(0.05)
            n.start_soon(call)           # waits in the queue
            await trio.sleep(0.05)
            assert app.waiting == 1
            with trio.fail_after(1):     # queue full: refused at once
                status, body = await _call(app, GOOD)
            assert (status, body["code"]) == (503, "busy")
            release.set()
        assert results == [200, 200]
        # A queued request that waits too long is refused, and leaves the queue.
        app2 = HelperApp(slow_measure, limits=Limits(concurrency=1, queue=4, queue_wait=0.2))
        app2.limiter.acquire_on_behalf_of_nowait("someone")
        status, body = await _call(app2, GOOD)
        assert (status, body["code"]) == (503, "busy") and app2.waiting == 0

    trio.run(main)


def test_app_survives_a_bug_and_maps_policy_errors() -> None:
    calls: list[str] = []

    async def measure(url: str, addresses: list[str]) -> ControlResult:
        calls.append(url)
        if url.endswith("/bug"):
            raise RuntimeError("boom")
        if url.endswith("/forbidden"):
            raise PolicyError("nope", "forbidden_address")
        return ControlResult([], [{"address": "10.0.0.1", "reason": "private"}])

    async def main() -> None:
        app = HelperApp(measure, limits=Limits(concurrency=1))
        status, body = await _call(app, json.dumps({"url": "https://a.test/bug"}).encode())
        assert (status, body["code"]) == (500, "internal")
        status, body = await _call(app, json.dumps({"url": "https://a.test/forbidden"}).encode())
        assert (status, body["code"]) == (403, "forbidden_address")
        status, body = await _call(app, GOOD)
        assert status == 200 and body == {"version": 1, "observations": [],
                                          "refused": [{"address": "10.0.0.1", "reason": "private"}]}
        status, body = await _call(app, b"", path="/v1/health", method="GET", headers=[])
        assert status == 200 and body["ok"] is True

    trio.run(main)
    assert len(calls) == 3


def test_parse_request_normalises_addresses() -> None:
    url, addrs = parse_request(b'{"url": "https://a.test/", "addresses": ["::FFFF:1.2.3.4", " 5.6.7.8", "5.6.7.8"]}',
                               8)
    assert url == "https://a.test/" and addrs == ["::ffff:102:304", "5.6.7.8"]
    # null addresses and unknown keys are tolerated (newer clients may send more); null bodies are not.
    assert parse_request(b'{"url": "https://a.test/", "addresses": null, "x": 1}', 8) == ("https://a.test/", [])
    with pytest.raises(HttpError):
        parse_request(b"null", 8)


# --- the policy as pure functions (no sockets) -------------------------------------------------------------
@pytest.mark.parametrize(("address", "allowed"), [
    ("93.184.215.14", True), ("2606:4700::1111", True), ("::ffff:93.184.215.14", True),
    ("127.0.0.1", False), ("127.31.7.3", False), ("10.0.0.1", False), ("172.16.5.4", False),
    ("192.168.0.1", False), ("100.64.0.1", False), ("100.127.255.254", False), ("169.254.169.254", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("255.255.255.255", False), ("240.0.0.1", False),
    ("192.0.2.1", False), ("198.51.100.7", False), ("203.0.113.9", False), ("198.18.0.1", False),
    ("::", False), ("::1", False), ("fe80::1", False), ("fd12:3456::1", False), ("fec0::1", False),
    ("ff02::1", False), ("2001:db8::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
    ("64:ff9b::a00:1", False), ("2002:a00:1::1", False), ("not-an-ip", False),
])
def test_address_policy(address: str, allowed: bool) -> None:
    assert Policy().allow_address(address) is allowed
    if address in ("0.0.0.0", "224.0.0.1", "255.255.255.255", "::", "ff02::1", "not-an-ip"):
        # Never a website, even in the lab.
        assert not Policy(allow_private=True).allow_address(address)
    else:
        assert Policy(allow_private=True).allow_address(address)


def test_port_and_url_policy() -> None:
    strict, lab = Policy(), Policy(allow_private=True)
    assert strict.port_refusal(443) is None and strict.port_refusal(80) is None
    assert strict.port_refusal(8443) and lab.port_refusal(8443) is None
    assert strict.check_url("https://президент.рф/").hostname == "президент.рф"
    with pytest.raises(PolicyError) as e:
        strict.check_url("https://intranet/")
    assert e.value.code == "bad_url"
    assert lab.check_url("http://127.0.0.1:8080/").port == 8080


def test_redirect_guards(net: Net) -> None:
    """Redirects cannot lead the helper to a forbidden address or port (pure checks, no connection)."""

    async def main() -> None:
        strict = HelperEngine(ProbeConfig(resolvers=[net.resolver], system_resolver=False), Policy())
        lab = HelperEngine(ProbeConfig(resolvers=[net.resolver], system_resolver=False), Policy(allow_private=True))
        # The redirect resolver drops forbidden answers: site.test is 127.31.7.3.
        assert await strict.quick_resolve(SITE_NAME) is None
        assert await lab.quick_resolve(SITE_NAME) == SITE_ADDR
        # The request hook refuses what the policy forbids, before httpx connects.
        for url in ("http://127.0.0.1/", "http://[::1]:443/", "https://93.184.215.14:22/"):
            with pytest.raises(RefusedByPolicy):
                await strict._guard(httpx.Request("GET", url))
        await strict._guard(httpx.Request("GET", "https://93.184.215.14/"))
        await lab._guard(httpx.Request("GET", "http://127.0.0.1:8080/"))
        # ... and the hook is installed on both of the engine's HTTP clients.
        async with strict:
            assert strict.clients is not None
            for client in (strict.clients.verified, strict.clients.unverified):
                assert strict._guard in client.event_hooks["request"]

    trio.run(main)

