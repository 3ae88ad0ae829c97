"""DNS from a capture: transactions over UDP and TCP, injected answers, A/AAAA folding.

A transaction is keyed by (client, client port, query id); every response to it is kept (up to
8), because two different answers to one query are the signature of an on-path injector.  The
folding of A and AAAA lookups into one observation is the feature layer's
(:func:`kzprobe.analysis.features.fold_pair`); which queries form one lookup is decided here,
where the client and the capture's losses are known.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from kzprobe import errors as E
from kzprobe.analysis.features import fold_pair
from kzprobe.model import STEP_DNS, Observation
from kzprobe.replay import parsers
from kzprobe.replay.pcapio import Packet, _ntop
from kzprobe.replay.state import END_GRACE, SOURCE, TTL_MARGIN, FileState

if TYPE_CHECKING:
    from kzprobe.replay.flows import Flow, Icmp

#: An A and an AAAA query of one name to one resolver this close in time are one lookup.
PAIR_WINDOW = 2.0
#: Responses kept per query.
MAX_RESPONSES = 8


@dataclass
class DnsTx:
    client: bytes
    cport: int
    server: bytes
    sport: int
    txid: int
    qname: str
    qtype: str
    queries: list[int]
    t_start: float
    responses: list[dict[str, Any]] = field(default_factory=list)
    answers: list[dict[str, object]] = field(default_factory=list)
    last_ts: float = 0.0
    icmp: Icmp | None = None
    transport: str = "udp"

    def take(self, st: FileState, m: parsers.DnsMessage, n: int, ts: float, ttl: int | None,
             ip_id: int | None, source: bytes) -> None:
        """Record one response to this query."""
        self.last_ts = max(self.last_ts, ts)
        if len(self.responses) < MAX_RESPONSES:
            self.responses.append({"rcode": m.rcode, "addresses": m.addresses, "ip_ttl": ttl, "ip_id": ip_id,
                                   "packet": n, "delay": round(ts - self.t_start, 6), "source": _ntop(source)})
            if not self.answers:
                self.answers = m.answers
        for a in m.addresses:
            st.dns_names[a].add(m.qname)


class DoneLookup(NamedTuple):
    """A finished query, until A and AAAA are folded."""

    client: str
    obs: Observation
    #: Asked once and never answered (unknown, not a timeout, when the capture lost packets).
    silent: bool


def on_udp(st: FileState, p: Packet) -> None:
    msg = parsers.dns_message(p.raw[p.poff:p.pend])
    if msg is None:
        return
    s, d, sp, dp, n, ts = p.src_b, p.dst_b, p.sport or 0, p.dport or 0, p.number, p.ts
    if not msg.response and dp == 53:
        key = (s, sp, msg.txid)
        tx = st.dns.get(key)
        if tx is None:
            st.dns[key] = DnsTx(s, sp, d, dp, msg.txid, msg.qname, msg.qtype or "A", [n], ts, last_ts=ts)
        elif len(tx.queries) < 8:
            tx.queries.append(n)
            tx.last_ts = ts
        return
    if msg.response and sp == 53:
        key = (d, dp, msg.txid)
        tx = st.dns.get(key)
        if tx is None:  # the capture began after the query
            tx = st.dns[key] = DnsTx(d, dp, s, sp, msg.txid, msg.qname, msg.qtype or "A", [], ts, last_ts=ts)
        tx.take(st, msg, n, ts, p.ttl, p.ip_id, s)


def on_icmp(st: FileState, client: bytes, cport: int | None, server: bytes, note: Icmp) -> None:
    for tx in st.dns.values():
        if tx.client == client and tx.cport == cport and tx.server == server and tx.icmp is None:
            tx.icmp = note
            break


def sweep(st: FileState, now: float) -> None:
    done = [k for k, tx in st.dns.items() if now - tx.last_ts > st.limits.dns_idle]
    for k in done:
        finish(st, st.dns.pop(k), at_end=False)


def finish(st: FileState, tx: DnsTx, at_end: bool) -> None:
    resolver = f"{_ntop(tx.server)}:{tx.sport}"
    first = tx.responses[0] if tx.responses else None
    data: dict[str, Any] = {
        "resolver": resolver, "transport": tx.transport, "qtype": tx.qtype,
        "rcode": first["rcode"] if first else None,
        "answers": tx.answers, "addresses": list(first["addresses"]) if first else [],
        "responses": [{k: r[k] for k in ("rcode", "addresses", "ip_ttl", "ip_id", "packet", "delay")}
                      for r in tx.responses],
    }
    failure: str | None = None
    if first is None:
        if tx.icmp is not None:
            failure = E.HOST_UNREACHABLE if tx.icmp.type in (3, 1) else E.TIMEOUT
        elif at_end and st.now - tx.last_ts < END_GRACE:
            return
        else:
            failure = E.TIMEOUT
    else:
        failure = {"NXDOMAIN": E.DNS_NXDOMAIN, "SERVFAIL": E.DNS_SERVFAIL, "REFUSED": E.DNS_REFUSED}.get(
            str(first["rcode"]))
        if failure is None and first["rcode"] == "NOERROR" and not first["addresses"] and tx.qtype in ("A", "AAAA"):
            failure = E.DNS_NO_ANSWER
    packets = [*tx.queries, *(r["packet"] for r in tx.responses)]
    sets = {tuple(sorted(r["addresses"])) for r in tx.responses}
    if len(tx.responses) > 1 and (len(sets) > 1 or len({r["rcode"] for r in tx.responses}) > 1):
        a, b = tx.responses[0], tx.responses[-1]
        reason = (f"{len(tx.responses)} answers to one query differ: packet {a['packet']} "
                  f"{','.join(a['addresses']) or a['rcode']} (IP TTL {a['ip_ttl']}, IP-ID {a['ip_id']}) vs "
                  f"packet {b['packet']} {','.join(b['addresses']) or b['rcode']} (IP TTL {b['ip_ttl']}, "
                  f"IP-ID {b['ip_id']})")
        data["injected"] = {"packet": a["packet"], "kind": "dns", "reason": reason}
        st.find(tx.qname, "dns_injection", [a["packet"], b["packet"]],
                f"packet {a['packet']}: DNS answer for {tx.qname} injected: {reason}")
    obs = Observation(step=STEP_DNS, target=tx.qname, domain=tx.qname, source=SOURCE, address=None,
                      t_start=tx.t_start, t_end=tx.last_ts, failure=failure, data=data, packets=packets)
    silent = first is None and tx.icmp is None and len(tx.queries) == 1
    st.dns_done.append(DoneLookup(_ntop(tx.client), obs, silent))


def tcp_lookups(st: FileState, fl: Flow, cut: bool) -> bool:
    """DNS over TCP: the lookups on a flow to port 53, as DNS observations (transport "tcp").

    The live probe records no TCP step for them, so neither does replay.  Responses are read per
    segment where a segment holds whole messages (so that each has its packet, IP TTL and IP-ID
    for the injection checks), else from the reassembled stream.
    """
    assert fl.trigger is not None
    tn, tts = fl.trigger.number, fl.trigger.ts
    txs: dict[int, DnsTx] = {}
    for q in parsers.dns_stream(bytes(fl.cli_buf)):
        if not q.response and q.txid not in txs:
            txs[q.txid] = DnsTx(fl.cli, fl.cport, fl.srv, fl.sport, q.txid, q.qname, q.qtype or "A", [tn], tts,
                                last_ts=tts, transport="tcp")
    if not txs:
        return False
    seen: set[int] = set()

    def take(m: parsers.DnsMessage, n: int, ts: float, ttl: int | None, ipid: int | None) -> None:
        tx = txs.get(m.txid)
        if tx is None or not m.response or len(tx.responses) >= MAX_RESPONSES:
            return
        seen.add(m.txid)
        tx.take(st, m, n, ts, ttl, ipid, fl.srv)

    for e in fl.after:
        if e.length and e.head:
            for m in parsers.dns_stream(e.head):
                take(m, e.number, e.ts, e.ttl, e.ip_id)
    first = next((e for e in fl.after if e.length), None)
    if first is not None:
        for m in parsers.dns_stream(bytes(fl.srv_buf)):
            if m.txid not in seen:
                take(m, first.number, first.ts, first.ttl, first.ip_id)
    for tx in txs.values():
        if not tx.responses and cut:
            continue
        if not tx.responses:
            tx.last_ts = fl.last_ts
        finish(st, tx, at_end=False)
    return True


def outliers(st: FileState) -> None:
    """An answer whose IP TTL is out of line with its resolver's other answers."""
    by_res: dict[str, list[Observation]] = defaultdict(list)
    for done in st.dns_done:
        by_res[done.obs.data["resolver"]].append(done.obs)
    for obs in by_res.values():
        ttls = Counter(r["ip_ttl"] for o in obs for r in o.data["responses"])
        if not ttls:
            continue
        usual, count = ttls.most_common(1)[0]
        if count < 3 or count < 0.75 * sum(ttls.values()):
            continue
        for o in obs:
            if "injected" in o.data:
                continue
            for r in o.data["responses"]:
                if abs(r["ip_ttl"] - usual) >= TTL_MARGIN:
                    reason = f"IP TTL {r['ip_ttl']} vs {usual} on {count} other answers from this resolver"
                    o.data["injected"] = {"packet": r["packet"], "kind": "dns", "reason": reason}
                    st.find(o.domain, "dns_injection", [r["packet"]],
                            f"packet {r['packet']}: DNS answer for {o.domain} looks injected: {reason}")
                    break


def fold(st: FileState) -> None:
    """One observation per lookup, as the live probe makes it: A and AAAA folded together.

    A stub resolver asks A and AAAA of one name at once; alone, an AAAA NOERROR-empty answer
    (most sites have no IPv6) would read as ``dns_no_answer`` and make every verdict
    inconclusive.  A pair is the same client, resolver, transport and name, the AAAA query sent
    within ``PAIR_WINDOW`` of the A query; the merge itself is the feature layer's.
    """
    groups: dict[tuple[str, str, str, str], list[Observation]] = defaultdict(list)
    # Every stub resolver asks again when no answer comes; one that did not got its answer, and
    # a capture that provably dropped packets dropped that answer too: unknown, not a timeout.
    # (A lookup that is half unknown says only what its other half found.)
    lost: set[int] = set()
    for client, o, silent in st.dns_done:
        if silent and st.loss is not None:
            lost.add(id(o))
            st.find(o.domain, "capture_loss", o.packets,
                    f"packet {o.packets[0]}: the {o.data['qtype']} query for {o.domain} to {o.data['resolver']} "
                    "has no answer in the capture but was never asked again; the capture lost packets, so "
                    "this is not counted as a timeout")
        groups[(client, o.data["resolver"], o.data["transport"], o.domain)].append(o)
    st.dns_done.clear()
    out: list[Observation] = []
    for obs in groups.values():
        aaaa = [o for o in obs if o.data["qtype"] == "AAAA"]
        for o in obs:
            if o.data["qtype"] != "A":
                continue
            mate = min((q for q in aaaa if abs(q.t_start - o.t_start) <= PAIR_WINDOW),
                       key=lambda q: abs(q.t_start - o.t_start), default=None)
            if mate is None:
                out.append(o)
                continue
            aaaa.remove(mate)
            if id(o) in lost:
                out.append(mate if mate.data["addresses"] else o)  # o: dropped below
            elif id(mate) in lost:
                out.append(o)
            else:
                out.append(fold_pair(o, mate))
        out.extend(o for o in obs if o.data["qtype"] not in ("A", "AAAA"))
        out.extend(aaaa)
    out = [o for o in out if id(o) not in lost]
    out.sort(key=lambda o: (o.t_start, o.packets[:1]))
    for o in out:
        st.emit(o)

