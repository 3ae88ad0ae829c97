"""The trigger (ClientHello or HTTP request) and what answered it: outcome and injection.

Injection rule: a packet that answers the trigger is injected when its IP TTL differs from the
server's own handshake packet (its SYN/ACK, or its RST to our SYN) by ``TTL_MARGIN`` or more.
Routers on one path do not change hop counts mid-flow by that much, and a middlebox that forges
the server's address cannot know how many hops the server is away.  IP-ID is reported beside
TTL but does not decide alone: many stacks send IP-ID 0 with DF set.

TTL-limited sweeps (CenTrace, ``kzprobe trace``): a trigger sent with a TTL lower than the
client's handshake TTL that no one answers did not reach the server -- that is not a timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urljoin

from kzprobe import errors as E
from kzprobe.analysis.features import hello_fingerprint, host_of, http_features
from kzprobe.model import FOLLOWUP, PROBE, STEP_HTTP, STEP_TLS, Observation
from kzprobe.probes.hellos import DPI_SIGNATURE, PRE_2012_SIGNATURE
from kzprobe.replay import parsers, tunnel
from kzprobe.replay.pcapio import ACK, FIN, RST
from kzprobe.replay.state import END_GRACE, SOURCE, TTL_MARGIN, FileState, seq_ge

if TYPE_CHECKING:
    from kzprobe.replay.flows import Answer, Flow

#: Certificate checks take milliseconds; a client closing later than this after the server's
#: handshake flight gave up waiting rather than rejected what it got.
REJECT_WITHIN = 0.5


class Ref(NamedTuple):
    """The server's own signature on this flow (what injected packets are compared with)."""

    what: str
    ttl: int
    ip_id: int | None
    number: int


class Request(NamedTuple):
    method: str
    path: str
    host: str


def observe(st: FileState, fl: Flow, address: str, ref: Ref | None, cut: bool) -> Observation | None:
    """The TLS or HTTP observation of a flow's trigger, or None (not TLS/HTTP, or unanswered
    because the capture ended or the trigger's TTL was limited)."""
    trig = fl.trigger
    assert trig is not None
    tn, tts = trig.number, trig.ts
    buf = bytes(fl.cli_buf)
    is_tls, sni = parsers.client_hello_sni(buf)
    got = None if is_tls else parsers.http_request(buf)
    if not is_tls and got is None:
        return None
    req = Request(*got) if got is not None else None
    if is_tls:
        domain = sni or address
        what = f"ClientHello (SNI {sni})" if sni else "ClientHello (no SNI)"
    else:
        assert req is not None
        # A proxy's CONNECT names where the tunnel goes, not what is measured: the proxy is.
        domain = address if req.method == "CONNECT" else host_of(buf) or address
        what = f"{req.method} {req.path} (Host {req.host})"
    # Remember the name even if this flow yields no observation: TCP-only flows to the same
    # address (handshake timeouts) are named after it.
    if domain != address:
        st.names[address][domain] += 1
    # Packets that answer the trigger: before the client closed, or acknowledging the trigger.
    answers = [e for e in fl.after
               if not e.after_close or (e.flags & ACK and seq_ge(e.ack, trig.end) and (e.length or e.flags & RST))]
    sig = next((e for e in answers if e.length or e.flags & (RST | FIN)), None)
    limited = fl.cli_ttl is not None and trig.ttl + 2 < fl.cli_ttl
    data: dict[str, Any]
    if is_tls:
        data = {"sni": sni}
        hello = hello_fingerprint(buf)
        if hello is not None:  # "tor" / "browser": what a fingerprinting box would see (issue 15)
            data["hello"] = hello
            if hello == "tor":
                # Which of Tor's lists: the one DPI matched in 2012-2013, or the one before it.
                era = "2012-2013" if DPI_SIGNATURE in buf or PRE_2012_SIGNATURE not in buf else "2008 to May 2012"
                st.find(domain, "tor_hello", [tn], f"packet {tn}: a Tor-like ClientHello (Tor's {era} cipher "
                                                   f"list) to {address}:{fl.sport} with SNI {sni}")
    else:
        assert req is not None
        if req.method == "CONNECT":
            # A proxy's CONNECT (proxy+http:// targets): the request target is HOST:PORT, not a
            # path; recorded as the live probe records it (probes/kinds.py).
            data = {"host": host_of(buf) or req.path.rsplit(":", 1)[0], "method": "CONNECT", "connect_to": req.path,
                    "url": f"http://{address}:{fl.sport}"}
        else:
            data = {"host": host_of(buf) or req.host, "url": f"http://{req.host or address}{req.path}"}
    packets = [tn]
    failure: str | None
    if sig is None:
        if fl.trig_icmp is not None:
            st.expired.append(tn)
            return None
        if limited:
            st.undelivered.append(tn)
            return None
        # Still open at the end of the capture: only "cut" if the trigger itself is recent. A
        # client retransmitting its trigger for END_GRACE seconds with no answer at all is
        # silence, even though its own retransmissions keep the flow looking alive.
        if cut and st.now - tts < END_GRACE:
            return None
        outcome, failure = "silence", E.TIMEOUT
        st.find(domain, "silence", [tn], f"packet {tn}: no answer to the {what} sent to {address}:{fl.sport}: "
                                         "the connection went silent (blackholed?)")
        t_end = fl.last_ts
    else:
        t_end = sig.ts
        packets += [e.number for e in answers[:6]]
        injected = _injection(st, fl, domain, what, ref, sig, answers, tn)
        if injected is not None:
            data["injected"] = injected
        delay_ms = (sig.ts - tts) * 1000
        if sig.length:
            body = sig.head if injected else bytes(fl.srv_buf) or sig.head
            if is_tls:
                outcome, failure = _tls_reply(st, fl, domain, address, sni, buf, body, sig, bool(injected), data,
                                              packets)
            else:
                outcome, failure = "response", None
                head = tunnel.answer_head(body) if data.get("method") == "CONNECT" else None
                if head is not None and tunnel.tunnelled(head[0]):
                    # The answer's head is all of it: what follows is the tunnel (probes/kinds.py
                    # records status and headers of a 2xx, and reads a page only from a refusal).
                    data.update(status=head[0], headers=head[1])
                else:
                    _http_reply(st, fl, domain, what, body, bool(injected), sig, data)
        elif sig.flags & RST:
            outcome, failure = "rst", E.CONNECTION_RESET
            if not injected:
                st.find(domain, "reset", [tn, sig.number], f"packet {sig.number}: connection reset {delay_ms:.0f} ms "
                                                            f"after the {what} (packet {tn})")
        else:
            outcome, failure = "fin", E.EOF
            if not injected:
                st.find(domain, "eof", [tn, sig.number], f"packet {sig.number}: connection closed (FIN) "
                                                          f"{delay_ms:.0f} ms after the {what} (packet {tn})")
    if fl.trig_icmp is not None:
        packets.append(fl.trig_icmp.number)
    packets.sort()
    if is_tls:
        data["outcome"] = outcome
    data["_stopped"] = f"after trigger: {outcome}"
    return Observation(step=STEP_TLS if is_tls else STEP_HTTP, target="", domain=domain, source=SOURCE,
                       address=address, port=fl.sport, t_start=tts, t_end=t_end, failure=failure, data=data,
                       packets=packets)


def _injection(st: FileState, fl: Flow, domain: str, what: str, ref: Ref | None, sig: Answer,
               answers: list[Answer], tn: int) -> dict[str, Any] | None:
    """The ``injected`` record when the answer's IP TTL is not the server's, else None."""
    if ref is None or abs(sig.ttl - ref.ttl) < TTL_MARGIN:
        return None
    reason = f"IP TTL {sig.ttl} vs the server's {ref.what} TTL {ref.ttl}"
    if sig.ip_id is not None and ref.ip_id is not None:
        reason += f"; IP-ID {sig.ip_id} vs {ref.ip_id}"
    kind = "blockpage" if sig.length else "rst" if sig.flags & RST else "fin"
    injected: dict[str, Any] = {"packet": sig.number, "kind": kind, "reason": reason}
    pre = fl.pre_rst
    if kind == "rst" and pre is not None and abs(pre.ttl - sig.ttl) < TTL_MARGIN:
        # Reported, not acted on: CenTrace's censored and control sweeps to one server both look
        # like this, so it cannot tell them apart within one file.
        injected["pre_trigger"] = pre.number
        st.find(domain, "pre_trigger_reset", [pre.number, sig.number],
                f"packet {pre.number}: a RST with the same IP TTL ({pre.ttl}) as the injected one (packet "
                f"{sig.number}) came before the {what} was sent: the injector may not be triggered by the name "
                f"{domain}")
    more = [e.number for e in answers if e.number != sig.number and abs(e.ttl - ref.ttl) >= TTL_MARGIN]
    also = f" (also packets {', '.join(map(str, more[:5]))})" if more else ""
    st.find(domain, f"injected_{kind}", [sig.number, *more[:5]],
            f"packet {sig.number}: {kind.upper() if kind != 'blockpage' else 'response'} injected after the "
            f"{what} (packet {tn}): {reason}{also}")
    return injected


def _tls_reply(st: FileState, fl: Flow, domain: str, address: str, sni: str | None, cli: bytes, body: bytes,
               sig: Answer, injected: bool, data: dict[str, Any], packets: list[int]) -> tuple[str, str | None]:
    if parsers.tls_server_reply(body) != "server_hello":
        return "alert", E.SSL_FAILED_HANDSHAKE
    rejected = None if injected else _rejected(fl, cli, sig.number)
    if rejected is None:
        _transfer(st, fl, domain, address, sni, data)
        return "server_hello", None
    # The model's "handshake completed, certificate does not validate" (what the live probe's
    # unverified handshake records): the server did its part and the verifying client refused
    # to finish.
    data.update(cert_valid=False, cert_failure=E.SSL_INVALID_CERTIFICATE, issuer="unknown (not read from the capture)")
    st.find(domain, "cert_rejected", [sig.number, rejected],
            f"packet {rejected}: the client abandoned the TLS handshake with {address} (SNI {sni}) right after the "
            f"server's certificate (packet {sig.number}) without sending its Finished: it rejected the certificate")
    packets.append(rejected)
    return "cert_rejected", None


def _transfer(st: FileState, fl: Flow, domain: str, address: str, sni: str | None, data: dict[str, Any]) -> None:
    """What a capture can say of an HTTPS download: the server's bytes over time, and a client
    that gave up while the server was still sending (a stalled or throttled body, seen as
    ciphertext).  Evidence for a person; the rules rate HTTP bodies, which TLS hides here."""
    xf = fl.xfer
    if xf is None:
        return
    data["transfer"] = xf.to_dict()
    close = fl.cli_close
    # A client closing at once while the server's last records cross its FIN is a normal end; one
    # that waited a while and quit mid-stream gave up on the download.
    if xf.abandoned is None or close is None or close.ts - xf.first_ts < ABANDON_AFTER:
        return
    secs = close.ts - xf.first_ts
    rate = xf.total / secs
    st.find(domain, "tls_abandoned", [close.number, xf.abandoned],
            f"packet {close.number}: the client closed its TLS connection to {address} (SNI {sni}) while the "
            f"server was still sending (packet {xf.abandoned}): {xf.total} bytes in {secs:.1f} s since packet "
            f"{xf.first_n}, {rate / 1024:.1f} KiB/s -- a stalled or throttled download, its content unreadable "
            "in the capture")


#: The statuses httpx (the live probe) follows as redirects.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: The same ratio and floor the rules use for HTTP bodies (analysis.rules.THROTTLE_RATIO,
#: analysis.facts.MIN_SAMPLE_SPAN): a transfer shorter than the floor is rated as if it took it.
THROTTLE_RATIO = 4.0
MIN_SPAN = 0.5
#: A client that closes while the server still sends, this long after the first server bytes,
#: gave up on the download.
ABANDON_AFTER = 1.0
#: Transfers smaller than this say nothing about a rate (a handshake flight, a short page).
MIN_BYTES = 32 * 1024


def throttle_findings(st: FileState) -> None:
    """A finding when an HTTPS download from an address came far slower with the target's SNI than
    with the benign SNI of the follow-up to the same address (SNI throttling, seen in ciphertext)."""
    def rate(o: Observation) -> float | None:
        xf = o.data.get("transfer")
        if o.step != STEP_TLS or not isinstance(xf, dict) or xf.get("bytes", 0) < MIN_BYTES:
            return None
        return float(xf["bytes"]) / max(float(xf["seconds"]), MIN_SPAN)

    measured: dict[tuple[str, str | None], list[tuple[float, Observation]]] = {}
    benign: dict[tuple[str, str | None], list[tuple[float, Observation]]] = {}
    for o in st.out.observations:
        r = rate(o)
        if r is not None and o.vantage == PROBE:
            (benign if o.purpose == FOLLOWUP else measured).setdefault((o.target, o.address), []).append((r, o))
    for key, got in measured.items():
        fu = benign.get(key)
        if not fu:
            continue
        (t_rate, t_obs), (f_rate, f_obs) = min(got, key=lambda x: x[0]), max(fu, key=lambda x: x[0])
        if f_rate < THROTTLE_RATIO * max(t_rate, 1.0):
            continue
        st.find(key[0], "tls_throttled", sorted({*t_obs.packets[:1], *f_obs.packets[:1]}),
                f"packet {t_obs.packets[0]}: the HTTPS download from {key[1]} with SNI {t_obs.data.get('sni')} came at "
                f"{t_rate / 1024:.1f} KiB/s, {f_rate / max(t_rate, 1.0):.0f}x slower than from the same address "
                f"with SNI {f_obs.data.get('sni')} ({f_rate / 1024:.1f} KiB/s, packet {f_obs.packets[0]}): SNI "
                "throttling, as far as ciphertext shows")


def _http_reply(st: FileState, fl: Flow, domain: str, what: str, body: bytes, injected: bool, sig: Answer,
                data: dict[str, Any]) -> None:
    """The response's features, through the feature layer the live probe uses (same bytes, same
    features): decoded body (gzip/deflate/br), title, length, sha256, head, truncation, blockpage."""
    status, headers, raw, complete = response_parts(body)
    # Lengths are meaningless when the capture does not hold the whole body: cut by the flow's
    # buffer, by the end of the capture or connection, or (injected) only its first packet read.
    cut = not complete or (fl.srv_overflow and not injected)
    feats = http_features(status, headers, raw, truncated_on_wire=cut, fingerprints=st.fingerprints)
    data.update(status=status, headers=headers, **feats)
    # Where a redirect sends, as the live probe records it: the rules compare a redirect by its
    # target, not by its (tiny) page, so an http->https 301 is not "a different page" than control's.
    _redirect_of(data, status, headers)
    bp = feats["blockpage"]
    if bp:
        st.find(domain, "blockpage", [sig.number], f"packet {sig.number}: blockpage '{bp}' served for {what} "
                                                   f"(title {feats['title']!r})")


def decrypted_http(st: FileState, fl: Flow, address: str, tls: Observation) -> Observation | None:
    """The HTTP exchange inside a TLS flow whose secrets the capture carries (replay.tlsdecrypt),
    as the live probe's HTTP step records it: status, headers, the feature layer's features of
    the body, and speed samples (body bytes every 250 ms from the end of the headers, as the
    live probe samples them).  None when the flow holds no HTTP/1 request (a handshake-only
    flow, HTTP/2) or its suite is not one replay decrypts (tlsdecrypt)."""
    from kzprobe.replay import tlsdecrypt

    keys = fl.keys
    srv = bytes(fl.srv_buf)
    hello = tlsdecrypt.server_hello(srv)
    cr = tlsdecrypt.client_random(bytes(fl.cli_buf))
    if keys is None or hello is None or cr is None:
        return None
    cli = tlsdecrypt.decrypt(bytes(fl.cli_buf), hello, keys, "CLIENT", cr)
    req = parsers.http_request(bytes(cli.data))
    if req is None:
        return None
    _method, path, req_host = req
    host = host_of(bytes(cli.data)) or req_host or address
    sni = tls.data.get("sni")
    port = "" if fl.sport == 443 else f":{fl.sport}"
    data: dict[str, Any] = {"url": f"https://{host}{port}{path}", "host": host, "tls_decrypted": True}
    if sni and sni != host:
        data["sni"] = sni
    got = tlsdecrypt.decrypt(srv, hello, keys, "SERVER", cr)
    body = bytes(got.data)
    arrived = _arrival(fl, got.marks)
    packets = [fl.trigger.number] if fl.trigger is not None else []
    failure: str | None = None
    t_end = fl.last_ts
    if not body.startswith(b"HTTP/"):
        failure = _cut_failure(fl)
    else:
        status, headers, raw, complete = response_parts(body)
        cut = not complete or fl.srv_overflow or not got.complete
        feats = http_features(status, headers, raw, truncated_on_wire=cut, fingerprints=st.fingerprints)
        data.update(status=status, headers=headers, **feats)
        _redirect_of(data, status, headers)
        head_end = body.find(b"\r\n\r\n") + 4
        data["speed_samples"] = _samples(arrived, head_end, fl.cli_close.ts if cut and fl.cli_close else None)
        if arrived:
            t_end = arrived[-1][1]
            packets += sorted({arrived[0][2], arrived[-1][2]})
        if cut:
            failure = _cut_failure(fl)
        if feats["blockpage"]:
            st.find(tls.domain, "blockpage", packets[-1:],
                    f"packet {packets[-1]}: blockpage '{feats['blockpage']}' served over TLS to {address} "
                    f"(SNI {sni}, Host {host}; read with the capture's TLS secrets)")
    return Observation(step=STEP_HTTP, target="", domain=tls.domain, source=SOURCE, address=address,
                       port=fl.sport, t_start=tls.t_start, t_end=t_end, failure=failure, data=data,
                       packets=packets)


def _arrival(fl: Flow, marks: list[tuple[int, int]]) -> list[tuple[int, float, int]]:
    """(plaintext bytes so far, capture time, packet) for each application record, timed by the
    TCP segment that completed it."""
    import bisect

    ends = [e for e, _ts, _n in fl.srv_times]
    out = []
    for stream_end, plain in marks:
        i = bisect.bisect_left(ends, stream_end)
        if i < len(fl.srv_times):
            out.append((plain, fl.srv_times[i][1], fl.srv_times[i][2]))
    return out


def _samples(arrived: list[tuple[int, float, int]], head_end: int, gave_up: float | None) -> list[list[float | int]]:
    """OONI-style [[t, n], ...]: body bytes received every SAMPLE_EVERY s from the record that
    completed the headers, and a last sample at the end (where the client gave up, if it did)."""
    from kzprobe.replay.flows import SAMPLE_EVERY

    start = next((ts for plain, ts, _n in arrived if plain >= head_end), None)
    if start is None:
        return []
    out: list[list[float | int]] = []
    got = 0
    k = 1
    for plain, ts, _n in arrived:
        while ts - start >= k * SAMPLE_EVERY:
            out.append([round(k * SAMPLE_EVERY, 3), got])
            k += 1
        got = max(got, plain - head_end)
    end = max(arrived[-1][1], gave_up or 0.0)
    out.append([round(end - start, 3), got])
    return out


def _cut_failure(fl: Flow) -> str:
    """Why a response inside TLS stopped short: the server reset, or the client gave up (the live
    probe's body deadline or step timeout)."""
    close = fl.cli_close
    if fl.srv_rst is not None and (close is None or fl.srv_rst < close.number):
        return E.CONNECTION_RESET
    return E.TIMEOUT


def _redirect_of(data: dict[str, Any], status: int | None, headers: dict[str, str]) -> None:
    """Where a redirect sends, as the live probe records it (redirect_to, redirects)."""
    location = headers.get("location")
    if status in REDIRECT_STATUSES and location:
        try:
            data["redirect_to"] = urljoin(str(data.get("url") or ""), location)
        except ValueError:  # a hostile Location that is no URL: the redirect stays unfollowed
            pass
        else:
            data["redirects"] = [data["redirect_to"]]


def response_parts(buf: bytes) -> tuple[int | None, dict[str, str], bytes, bool]:
    """(status, headers, raw body after transfer-decoding, complete?) of what a server sent.

    Tolerates a missing status line (an injected raw HTML page: all of it is the body).  The body
    is still content-encoded: the feature layer decodes it.
    """
    msgs = parsers.http_messages(buf, requests=False, max_messages=1)
    if not msgs:
        if buf.startswith(b"HTTP/"):  # headers cut short: a response, but no body to speak of
            head = parsers.http_response(buf)
            return head.status, {k.lower(): v for k, v in head.headers.items()}, b"", False
        return None, {}, buf, True
    m = msgs[0]
    parts = m.first_line.split(" ", 2)
    code = parts[1][:3] if len(parts) > 1 else ""
    status = int(code) if code.isascii() and code.isdigit() else None  # latin-1 "\xb2" is a digit too
    return status, m.headers, m.body, m.complete


def _rejected(fl: Flow, cli: bytes, server_hello: int) -> int | None:
    """The frame where a client abandoned a handshake after the server's flight, else None.

    A client that got the server's whole first flight and then closes (or alerts) instead of
    sending its Finished refused something in it: in practice, the certificate.  Closing long
    after the flight is a timeout instead (a slow or stalled certificate), so the client must
    close within ``REJECT_WITHIN`` of the server's last bytes before it.
    """
    close = fl.cli_close
    if close is None or close.number < server_hello:
        return None
    if any(x is not None and x < close.number for x in (fl.srv_rst, fl.srv_fin)):  # the server quit first
        return None
    if parsers.tls_client_after_hello(cli) not in ("nothing", "alert"):
        return None
    last = max((e.ts for e in fl.after if e.length and e.number < close.number), default=None)
    if last is None or close.ts - last > REJECT_WITHIN:
        return None
    return close.number
