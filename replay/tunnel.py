"""An HTTP proxy's CONNECT in a capture (``proxy+http://`` targets), as the live probe records it.

The live probe (probes/kinds.py) sends ``CONNECT benign:443`` on its connection to the proxy
(an HTTP step: method, connect_to, status), and when the proxy answers 2xx it makes a TLS
handshake with SNI = benign through the tunnel (a TLS step, purpose MEASURE).  Both live on one
TCP flow: the client's bytes are the CONNECT request then a ClientHello, the server's the answer
head then the TLS server's flight.  This module splits them: the answer head alone becomes the
HTTP step (a 2xx answer's "body" is the tunnel, never a page), and the bytes after it the TLS step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kzprobe import errors as E
from kzprobe.analysis.features import response_head
from kzprobe.model import STEP_TLS, Observation
from kzprobe.replay import parsers
from kzprobe.replay.state import END_GRACE, SOURCE, FileState

#: As for a direct handshake (replay.trigger.REJECT_WITHIN): a client that closes this soon after
#: the server's flight, without its Finished, rejected the certificate; later, it gave up waiting.
REJECT_WITHIN = 0.5

if TYPE_CHECKING:
    from kzprobe.replay.flows import Flow


def head_end(buf: bytes) -> int:
    """Where an HTTP/1 head ends (just past its blank line), or -1 when the bytes hold no whole head."""
    at = buf.find(b"\r\n\r\n", 0, 8192 + 4)
    return at + 4 if at >= 0 else -1


def tunnelled(status: object) -> bool:
    return isinstance(status, int) and 200 <= status < 300


def answer_head(srv: bytes) -> tuple[int | None, dict[str, str]] | None:
    """(status, headers) of the proxy's answer head, headers as the live probe records them."""
    end = head_end(srv)
    if end < 0 or not srv.startswith(b"HTTP/1."):
        return None
    return response_head(srv[:end - 4])


def tls_through(st: FileState, fl: Flow, address: str, connect: Observation, cut: bool) -> Observation | None:
    """The TLS step through a proxy's tunnel (after a 2xx answer to CONNECT), or None when the
    client sent no ClientHello into it (or the capture ended before anything could be said)."""
    cli, srv = bytes(fl.cli_buf), bytes(fl.srv_buf)
    c_end, s_end = head_end(cli), head_end(srv)
    if c_end < 0 or s_end < 0:
        return None
    hello = cli[c_end:]
    is_tls, sni = parsers.client_hello_sni(hello)
    if not is_tls:
        return None
    reply = srv[s_end:]
    data: dict[str, Any] = {"sni": sni}
    packets = list(connect.packets[:1])
    sent = next((m for m in fl.cli_marks if m[0] == c_end), None)  # the segment that carried the ClientHello
    if sent is not None:
        packets.append(sent[1])
    first = _packet_at(fl, s_end)
    t_start = sent[2] if sent is not None else connect.t_end
    t_end = fl.last_ts
    failure: str | None
    if reply:
        if first is not None:
            packets.append(first[0])
            t_end = first[1]
        if parsers.tls_server_reply(reply) != "server_hello":
            outcome, failure = "alert", E.SSL_FAILED_HANDSHAKE
        else:
            outcome, failure = "server_hello", None
            close = fl.cli_close
            quit_ = parsers.tls_client_after_hello(hello) in ("nothing", "alert")
            if (close is not None and first is not None and quit_
                    and not any(x is not None and x < close.number for x in (fl.srv_rst, fl.srv_fin))
                    and close.ts - first[1] <= REJECT_WITHIN):
                # The server did its part and the verifying client refused to finish: the model's
                # "handshake completed, certificate does not validate", as for a direct handshake.
                outcome = "cert_rejected"
                data.update(cert_valid=False, cert_failure=E.SSL_INVALID_CERTIFICATE,
                            issuer="unknown (not read from the capture)")
                packets.append(close.number)
    elif fl.srv_rst is not None:
        outcome, failure = "rst", E.CONNECTION_RESET
        packets.append(fl.srv_rst)
    elif fl.srv_fin is not None:
        outcome, failure = "fin", E.EOF
        packets.append(fl.srv_fin)
    else:
        if cut and st.now - connect.t_end < END_GRACE:
            return None
        outcome, failure = "silence", E.TIMEOUT
    data["outcome"] = outcome
    if failure is not None:
        st.find(connect.domain, f"tunnel_{outcome}", packets,
                f"packet {packets[-1]}: TLS with SNI {sni} through the proxy at {address}:{fl.sport} failed "
                f"({failure}) after the proxy answered {connect.data.get('status')} to CONNECT "
                f"{connect.data.get('connect_to')}")
    return Observation(step=STEP_TLS, target="", domain=connect.domain, source=SOURCE, address=address,
                       port=fl.sport, t_start=t_start, t_end=t_end, failure=failure, data=data,
                       packets=sorted(set(packets)))


def _packet_at(fl: Flow, offset: int) -> tuple[int, float] | None:
    """(number, time) of the server packet after the trigger that carried byte ``offset`` of the
    server's stream (the answers kept: the first few after the trigger)."""
    pos = 0
    for a in fl.after:
        if not a.length:
            continue
        if pos <= offset < pos + a.length:
            return a.number, a.ts
        pos += a.length
    return None
