"""TCP flows and the ICMP errors that quote them: streaming, bounded state per flow.

A flow keeps what the verdict needs, not the stream: the client's SYNs, the server's handshake
packet (its IP TTL / IP-ID are the endpoint's signature), the trigger (the first client data:
a ClientHello or a request), the server packets that followed it, and the first bytes of each
direction (more for a plain-HTTP response, whose body the feature layer reads).  A finished
flow becomes a TCP observation plus, through :mod:`.trigger`, a TLS or HTTP one.
"""

from __future__ import annotations

from typing import NamedTuple

from kzprobe import errors as E
from kzprobe.model import STEP_TCP, STEP_TLS, Observation
from kzprobe.replay import dns, helperflows, trigger, tunnel
from kzprobe.replay.control import HELPER_REQUEST, HelperStreams
from kzprobe.replay.pcapio import ACK, FIN, RST, SYN, Packet, _ntop
from kzprobe.replay.state import END_GRACE, SOURCE, FileState, seq_ge
from kzprobe.replay.tlsdecrypt import client_random

#: Server packets after the trigger kept per flow (the answer is among the first few).
AFTER_CAP = 24
#: Payload bytes kept of each of the first server packets after the trigger (injected pages).
HEAD_CAP = 2048
#: Client bytes kept of a flow that can be decrypted: the hello, the Finished and the request.
TLS_CLIENT_CAP = 16384
#: Client segments whose start is remembered per flow (cli_marks).
CLI_MARKS = 8
_HTTP_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"OPTIONS ", b"DELETE ", b"PATCH ")


class Mark(NamedTuple):
    """A server packet that signs the endpoint: its SYN/ACK, or its RST to our SYN."""

    number: int
    ttl: int
    ip_id: int | None
    ts: float


class Trig(NamedTuple):
    """The trigger: the client's first data segment."""

    number: int
    ts: float
    ttl: int
    ip_id: int | None
    seq: int
    length: int

    @property
    def end(self) -> int:
        return (self.seq + self.length) & 0xFFFFFFFF


class Answer(NamedTuple):
    """A server packet after the trigger."""

    number: int
    ts: float
    flags: int
    ttl: int
    ip_id: int | None
    length: int
    ack: int
    #: The client had already closed (FIN/RST) when it came.
    after_close: bool
    #: The first HEAD_CAP payload bytes (of the first 8 answers only).
    head: bytes


class Icmp(NamedTuple):
    """An ICMP error quoting one of the flow's packets."""

    number: int
    router: str
    type: int
    code: int


class Close(NamedTuple):
    number: int
    flags: int
    ts: float


class PreRst(NamedTuple):
    """A RST after the handshake but before any trigger was sent."""

    number: int
    ttl: int


class Flow:
    __slots__ = (
        "after",
        "cli",
        "cli_buf",
        "cli_close",
        "cli_marks",
        "cli_next",
        "cli_retx",
        "cli_ttl",
        "cport",
        "first_n",
        "first_ts",
        "helper",
        "keys",
        "last_n",
        "last_ts",
        "midstream",
        "pre_rst",
        "sport",
        "srv",
        "srv_buf",
        "srv_cap",
        "srv_fin",
        "srv_next",
        "srv_overflow",
        "srv_rst",
        "srv_times",
        "syn_icmp",
        "syn_rst",
        "syn_seq",
        "synack",
        "synack_count",
        "syns",
        "trig_icmp",
        "trigger",
        "version",
        "xfer",
    )

    def __init__(self, cli: bytes, cport: int, srv: bytes, sport: int, n: int, ts: float, version: int,
                 srv_cap: int) -> None:
        self.cli, self.cport, self.srv, self.sport = cli, cport, srv, sport
        self.version = version
        self.first_n = self.last_n = n
        self.first_ts = self.last_ts = ts
        self.midstream = True
        self.syns: list[int] = []
        self.syn_seq: int | None = None
        self.cli_ttl: int | None = None
        self.synack: Mark | None = None
        self.synack_count = 0
        self.syn_rst: Mark | None = None
        self.pre_rst: PreRst | None = None
        self.syn_icmp: Icmp | None = None
        self.cli_buf = bytearray()
        #: (offset in cli_buf, packet, time) where each of the first client segments begins: the
        #: packet that carried a message inside the kept bytes (a ClientHello after a CONNECT).
        self.cli_marks: list[tuple[int, int, float]] = []
        self.cli_next: int | None = None
        self.cli_retx = 0
        self.srv_buf = bytearray()
        self.srv_cap = srv_cap
        #: The server sent more in-order bytes than srv_buf kept.
        self.srv_overflow = False
        self.srv_next: int | None = None
        self.trigger: Trig | None = None
        self.trig_icmp: Icmp | None = None
        self.after: list[Answer] = []
        self.cli_close: Close | None = None
        self.srv_fin: int | None = None
        self.srv_rst: int | None = None
        #: Set when the flow is the probe asking its control helper (reassembled in full).
        self.helper: HelperStreams | None = None
        #: The server's data after the trigger, over time (set at its first byte).
        self.xfer: Transfer | None = None
        #: TLS secrets of this flow's session, when the capture carries them (its key log).
        self.keys: dict[str, bytes] | None = None
        #: For a flow with keys: (bytes of srv_buf, capture time, packet) after each in-order server segment.
        self.srv_times: list[tuple[int, float, int]] = []


class Transfer:
    """How the server's new (in-order) bytes after the trigger arrived: total, samples every
    ``SAMPLE_EVERY`` seconds since the first of them, and whether the client quit first.

    For TLS this is all the capture can say of a download (its content is ciphertext): a body
    the client gave up on while the server was still sending, and at what rate.
    """

    __slots__ = ("abandoned", "first_n", "first_ts", "last_ts", "next_t", "samples", "total")

    def __init__(self, n: int, ts: float) -> None:
        self.first_n, self.first_ts, self.last_ts = n, ts, ts
        self.total = 0
        self.samples: list[list[float]] = []
        self.next_t = SAMPLE_EVERY
        #: The first server data packet that came after the client had closed, if any.
        self.abandoned: int | None = None

    def add(self, n: int, ts: float, nbytes: int, client_closed: bool) -> None:
        t = ts - self.first_ts
        if t >= self.next_t and len(self.samples) < MAX_SAMPLES:
            self.samples.append([round(t, 3), self.total])
            self.next_t = (int(t / SAMPLE_EVERY) + 1) * SAMPLE_EVERY
        self.total += nbytes
        self.last_ts = ts
        if client_closed and self.abandoned is None:
            self.abandoned = n

    def to_dict(self) -> dict[str, object]:
        samples = [*self.samples, [round(self.last_ts - self.first_ts, 3), self.total]]
        return {"bytes": self.total, "seconds": samples[-1][0], "samples": samples}


#: Transfer samples: OONI's throttling methodology samples every 250 ms; at most 10 minutes of them.
SAMPLE_EVERY = 0.25
MAX_SAMPLES = 2400


#: Packet's fields, in order.  The hot path (every TCP packet) unpacks a packet once by these
#: names, several times cheaper than one attribute read per use; the import-time check keeps the
#: unpacking in step with the Packet type.
_FIELDS = ("number", "ts", "version", "src_b", "dst_b", "ttl", "ip_id", "proto", "sport", "dport", "flags", "seq",
           "ack", "raw", "poff", "pend", "icmp_type", "icmp_code", "inner")
if Packet._fields != _FIELDS:  # pragma: no cover - a change to Packet must be made here too
    raise ImportError(f"replay.flows unpacks Packet as {_FIELDS}, but Packet is {Packet._fields}")


def on_tcp(st: FileState, p: Packet) -> None:
    n, ts, version, s, d, ttl, ip_id, _proto, sp, dp, flags, seq, ack, raw, poff, pend, _it, _ic, _inner = p
    assert sp is not None and dp is not None
    flows = st.flows
    fl = flows.get((s, sp, d, dp))
    if fl is not None:
        from_client = True
    else:
        fl = flows.get((d, dp, s, sp))
        if fl is not None:
            from_client = False
        elif flags & SYN and not flags & ACK:
            fl = flows[(s, sp, d, dp)] = Flow(s, sp, d, dp, n, ts, version, st.limits.buf_cap)
            from_client = True
        elif flags & SYN:  # capture began between SYN and SYN/ACK
            fl = flows[(d, dp, s, sp)] = Flow(d, dp, s, sp, n, ts, version, st.limits.buf_cap)
            fl.midstream = False
            from_client = False
        else:
            # Mid-stream: remember it so that its packets stay cheap; it yields nothing.
            fl = flows[(s, sp, d, dp)] = Flow(s, sp, d, dp, n, ts, version, st.limits.buf_cap)
            from_client = True
    fl.last_n = n
    fl.last_ts = ts
    plen = pend - poff
    hs = fl.helper
    if hs is not None:
        if plen:
            helperflows.segment(st, hs, not (sp == hs.sport and s == hs.srv_b), seq, raw[poff:pend], n)
        return
    if from_client:
        _from_client(st, fl, p, plen, flags, seq, n)
        return
    # from the server
    cn = fl.cli_next
    if ack != cn and cn is not None and flags & ACK and st.loss is None and not fl.midstream:
        # The server acknowledges client bytes that the capture never showed (1 is a FIN).
        gap = (ack - cn) & 0xFFFFFFFF
        if 1 < gap < 0x80000000:
            st.lost(n, f"packet {n} acknowledges {gap} bytes of client data the capture does not hold")
    if fl.midstream or (plen and fl.trigger is None and st.helper_eps):
        if plen and st.helper_eps:
            helperflows.answer(st, fl, s, sp, seq, raw[poff:pend], n)
        if fl.midstream or fl.helper is not None:
            return
    if flags & SYN:
        fl.synack_count += 1
        if fl.synack is None:
            fl.synack = Mark(n, ttl, ip_id, ts)
            fl.srv_next = (seq + 1) & 0xFFFFFFFF
        return
    if fl.trigger is None:
        if flags & RST and fl.synack is None and fl.syn_rst is None:
            fl.syn_rst = Mark(n, ttl, ip_id, ts)
        elif flags & RST and fl.pre_rst is None:
            fl.pre_rst = PreRst(n, ttl)
    elif len(fl.after) < AFTER_CAP:
        head = raw[poff:min(pend, poff + HEAD_CAP)] if plen and len(fl.after) < 8 else b""
        fl.after.append(Answer(n, ts, flags, ttl, ip_id, plen, ack, fl.cli_close is not None, head))
    if plen:
        nxt = fl.srv_next
        if nxt is None or seq == nxt:
            fl.srv_next = (seq + plen) & 0xFFFFFFFF
            if fl.trigger is not None:
                xf = fl.xfer
                if xf is None:
                    xf = fl.xfer = Transfer(n, ts)
                xf.add(n, ts, plen, fl.cli_close is not None)
            if len(fl.srv_buf) < fl.srv_cap:  # checked before slicing: bulk data past the cap costs nothing
                _keep_server(st, fl, raw, poff, pend)
                if fl.keys is not None:
                    fl.srv_times.append((len(fl.srv_buf), ts, n))
            else:
                fl.srv_overflow = True
    if flags & RST and fl.srv_rst is None:
        fl.srv_rst = n
    if flags & FIN and fl.srv_fin is None:
        fl.srv_fin = n


def _keep_server(st: FileState, fl: Flow, raw: bytes, poff: int, pend: int) -> None:
    room = fl.srv_cap - len(fl.srv_buf)
    http = fl.srv_cap > st.limits.buf_cap  # a plain-HTTP response: bytes past buf_cap come from the budget
    if http:
        room = min(room, st.http_budget)
    if room <= 0:
        fl.srv_overflow = True
        return
    take = raw[poff:min(pend, poff + room)]
    if http:
        st.http_budget -= len(take)
    fl.srv_buf += take
    if len(take) < pend - poff:
        fl.srv_overflow = True


def _from_client(st: FileState, fl: Flow, p: Packet, plen: int, flags: int, seq: int, n: int) -> None:
    if flags & SYN:
        fl.midstream = False
        if len(fl.syns) < 8:
            fl.syns.append(n)
        fl.syn_seq = seq
        if fl.cli_ttl is None:
            fl.cli_ttl = p.ttl
        fl.cli_next = (seq + 1 + plen) & 0xFFFFFFFF  # plen: TCP Fast Open data
        return
    raw, poff, pend = p.raw, p.poff, p.pend
    if fl.midstream:
        if plen and st.helper_eps:
            helperflows.answer(st, fl, p.src_b, p.sport or 0, seq, raw[poff:pend], n)
        return
    if plen:
        if fl.trigger is None:
            fl.trigger = Trig(n, p.ts, p.ttl, p.ip_id, seq, plen)
            if raw.startswith(HELPER_REQUEST, poff):
                fl.helper = HelperStreams(p.dst_b, p.dport or 0, seq, fl.srv_next)
                helperflows.segment(st, fl.helper, True, seq, raw[poff:pend], n)
                st.helper_eps.add((p.dst_b, p.dport or 0))
                return
            if raw.startswith(_HTTP_METHODS, poff):
                fl.srv_cap = max(fl.srv_cap, st.limits.http_cap)
            elif raw[poff:poff + 1] == b"\x16" and st.may_decrypt():
                # A ClientHello whose session the capture's key log has: the response can be read
                # (replay.tlsdecrypt), so keep as much of it as of a plain-HTTP one.
                fl.keys = st.tls_secrets(client_random(raw[poff:pend]))
                if fl.keys is not None:
                    fl.srv_cap = max(fl.srv_cap, st.limits.http_cap)
        nxt = fl.cli_next
        cap = st.limits.buf_cap if fl.keys is None else TLS_CLIENT_CAP
        if nxt is None or seq == nxt:
            if len(fl.cli_buf) < cap:
                if len(fl.cli_marks) < CLI_MARKS:
                    fl.cli_marks.append((len(fl.cli_buf), n, p.ts))
                fl.cli_buf += raw[poff:pend][: cap - len(fl.cli_buf)]
            fl.cli_next = (seq + plen) & 0xFFFFFFFF
        elif not seq_ge(seq, nxt):
            fl.cli_retx += 1
        elif st.loss is None:
            st.lost(n, f"packet {n} starts {(seq - nxt) & 0xFFFFFFFF} bytes past the last client data the "
                       "capture holds")
    if flags & (FIN | RST) and fl.cli_close is None:
        fl.cli_close = Close(n, flags, p.ts)


def on_icmp(st: FileState, p: Packet) -> None:
    q = p.inner
    assert q is not None and p.icmp_type is not None and p.icmp_code is not None
    note = Icmp(p.number, _ntop(p.src_b), p.icmp_type, p.icmp_code)
    if q.proto == 6 and q.sport is not None and q.dport is not None:
        fl = st.flows.get((q.src_b, q.sport, q.dst_b, q.dport))
        if fl is None:
            return
        trig = fl.trigger
        if trig is not None and fl.trig_icmp is None and (
            (q.ip_id is not None and q.ip_id == trig.ip_id) or q.seq == trig.seq
        ):
            fl.trig_icmp = note
        elif trig is None and fl.syn_icmp is None and q.seq is not None and q.seq == fl.syn_seq:
            fl.syn_icmp = note
    elif q.proto == 17 and q.dport == 53:
        dns.on_icmp(st, q.src_b, q.sport, q.dst_b, note)


def sweep(st: FileState, now: float) -> None:
    """Finish what has been idle too long (capture time)."""
    lim = st.limits
    done = [k for k, fl in st.flows.items() if now - fl.last_ts > lim.idle]
    for k in done:
        finish(st, st.flows.pop(k), at_end=False)
    dns.sweep(st, now)


def evict(st: FileState) -> None:
    # Oldest-created first (dict order): bounded memory beats perfect answers for floods.
    for k in list(st.flows)[: max(1, st.limits.max_flows // 10)]:
        finish(st, st.flows.pop(k), at_end=False)


def finish(st: FileState, fl: Flow, at_end: bool) -> None:
    """A flow's TCP observation, and its TLS/HTTP one (named later, in :mod:`.naming`)."""
    if fl.helper is not None:
        helperflows.finish(st, fl, fl.helper)
        return
    if fl.midstream or (not fl.syns and fl.synack is None):
        return
    address = _ntop(fl.srv)
    cut = at_end and st.now - fl.last_ts < END_GRACE
    if fl.sport == 53 and fl.trigger is not None and dns.tcp_lookups(st, fl, cut):
        return
    tcp_fail: str | None = None
    stopped = "handshake"
    tcp_packets = list(fl.syns)
    ref: trigger.Ref | None = None
    if fl.synack is not None:
        tcp_packets.append(fl.synack.number)
        ref = trigger.Ref("SYN/ACK", fl.synack.ttl, fl.synack.ip_id, fl.synack.number)
        stopped = "established"
    elif fl.syn_rst is not None:
        tcp_fail = E.CONNECTION_REFUSED
        tcp_packets.append(fl.syn_rst.number)
        ref = trigger.Ref("RST to our SYN", fl.syn_rst.ttl, fl.syn_rst.ip_id, fl.syn_rst.number)
    elif fl.syn_icmp is not None:
        ic = fl.syn_icmp
        tcp_packets.append(ic.number)
        if (fl.version == 4 and ic.type == 11) or (fl.version == 6 and ic.type == 3):
            return  # a TTL-limited SYN that expired: a traceroute step, not a connection attempt
        if fl.version == 4:
            tcp_fail = (E.NETWORK_UNREACHABLE if ic.code == 0 else E.CONNECTION_REFUSED if ic.code == 3
                        else E.HOST_UNREACHABLE)
        else:
            tcp_fail = E.CONNECTION_REFUSED if ic.code == 4 else E.HOST_UNREACHABLE
    else:
        # Still open at the end of the capture: cut only if the first SYN is recent.  A client
        # retransmitting its SYN for END_GRACE seconds with no answer has timed out, even though
        # its own retransmissions keep the flow looking alive (as for a trigger: replay.trigger).
        if cut and st.now - fl.first_ts < END_GRACE:
            return
        tcp_fail = E.TIMEOUT
    mark = fl.synack or fl.syn_rst
    tcp = Observation(step=STEP_TCP, target="", domain="", source=SOURCE, address=address, port=fl.sport,
                      t_start=fl.first_ts, t_end=mark.ts if mark is not None else fl.last_ts,
                      failure=tcp_fail, data={"stopped": stopped, "syn_retransmits": max(0, len(fl.syns) - 1),
                                              "retransmissions": fl.cli_retx},
                      packets=tcp_packets)
    if tcp_fail == E.TIMEOUT:
        st.pfind.append((address, "tcp_timeout", tcp_packets,
                         f"packet {fl.syns[0] if fl.syns else fl.first_n}: TCP handshake to {address}:"
                         f"{fl.sport} timed out ({len(fl.syns)} SYN, no SYN/ACK)"))
    app: Observation | None = None
    if fl.trigger is not None:
        app = trigger.observe(st, fl, address, ref, cut)
        if app is not None:
            tcp.data["stopped"] = app.data.pop("_stopped", "trigger")
            if "hello" in app.data:  # as the live probe's connect of a ClientHello follow-up records it
                tcp.data["hello"] = app.data["hello"]
    name = app.domain if app is not None else None
    st.pending.append((tcp, not name))
    if name:
        tcp.target = tcp.domain = name
    if app is not None:
        st.pending.append((app, False))
        if app.data.get("method") == "CONNECT" and tunnel.tunnelled(app.data.get("status")):
            through = tunnel.tls_through(st, fl, address, app, cut)
            if through is not None:
                st.pending.append((through, False))
        if fl.keys is not None and app.step == STEP_TLS and app.ok:
            page = trigger.decrypted_http(st, fl, address, app)
            if page is not None:
                st.pending.append((page, False))
