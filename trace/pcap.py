"""Read a CenTrace-style capture back into a sweep of :class:`HopResult`.

A capture holds, per TTL step, one TCP connection from its own source port: SYN, SYN/ACK, ACK,
then the trigger (HTTP GET or TLS ClientHello) with a limited IP TTL, then whatever answered,
then the client's FIN.  For DNS, a UDP query with a limited TTL and what answered it.

What counts as the answer to a trigger: packets on that connection after the trigger and before
the client's own FIN/RST (so the server's reply to our FIN is not mistaken for a block), plus
ICMP messages whose quoted header is the trigger (same ports, same IP-ID).

Real captures are messy, and these rules come from the seven CenTrace pairs:
* a capture can contain packets of the *other* sweep (the binance and sohu control captures
  hold part of the test sweep): probes are kept only when their trigger names this sweep's
  domain;
* a capture can contain ICMP about other servers: only ICMP quoting the server is read;
* a connection whose SYN got no SYN/ACK is a handshake timeout; its TTL is inferred from the
  source port, because CenTrace uses one port per TTL step in increasing order;
* a connection that got a SYN/ACK but never sent a trigger measured nothing and is skipped.

Packets are read with :mod:`kzprobe.replay.pcapio` (header decoding only, no scapy).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kzprobe.trace import wire
from kzprobe.trace.decide import (
    BLOCKPAGE,
    FIN,
    HANDSHAKE_TIMEOUT,
    ICMP_TIME_EXCEEDED,
    ICMP_UNREACHABLE,
    RESPONSE,
    RST,
    SERVER_HELLO,
    SILENCE,
    HopResult,
)


class PcapError(Exception):
    """The capture cannot be read as a trace sweep."""


@dataclass(slots=True)
class Pkt:
    num: int
    src: str
    dst: str
    proto: int
    ttl: int
    ip_id: int
    sport: int = 0
    dport: int = 0
    flags: str = ""
    seq: int = 0
    ack: int = 0
    payload: bytes = b""
    icmp_type: int | None = None
    icmp_code: int | None = None
    #: For ICMP errors: the quoted packet's (src, dst, proto, sport, dport, ip_id, ttl).
    quoted: tuple[str, str, int, int, int, int, int] | None = None


@dataclass(slots=True)
class Sweep:
    domain: str
    server: str
    port: int
    trigger: str
    hops: list[HopResult] = field(default_factory=list)
    client: str = ""


_FLAG_LETTERS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "A"), (0x20, "U"))


def _flags(bits: int) -> str:
    return "".join(letter for bit, letter in _FLAG_LETTERS if bits & bit)


def to_pkt(p: Any, number: int = 0) -> Pkt:
    """A decoded :mod:`kzprobe.replay.pcapio` packet -> the sweep's :class:`Pkt` (captures and live)."""
    rec = Pkt(num=number, src=p.src, dst=p.dst, proto=p.proto, ttl=p.ttl, ip_id=p.ip_id or 0)
    if p.proto == 1:
        rec.icmp_type, rec.icmp_code = p.icmp_type, p.icmp_code
        q = p.inner
        if q is not None and q.version == 4:
            rec.quoted = (q.src, q.dst, q.proto, q.sport or 0, q.dport or 0, q.ip_id or 0, q.ttl)
    elif p.proto in (6, 17):
        rec.sport, rec.dport = p.sport or 0, p.dport or 0
        rec.flags, rec.seq, rec.ack = _flags(p.flags), p.seq, p.ack
        rec.payload = p.payload
    return rec


def read_packets(path: str | Path) -> list[Pkt]:
    """Every IPv4 packet of a capture as a :class:`Pkt` (1-based numbers, as Wireshark)."""
    from kzprobe.replay import pcapio

    result = pcapio.ReadResult()
    out: list[Pkt] = []
    try:
        for p in pcapio.iter_packets(str(path), result):
            if p.version != 4:
                continue
            out.append(to_pkt(p, p.number))
    except FileNotFoundError:
        raise PcapError(f"{path}: no such file") from None
    except (OSError, pcapio.CaptureError) as exc:
        raise PcapError(str(exc)) from None
    if result.error and not out:
        raise PcapError(f"{path}: {result.describe()}")
    return out


def _trigger_domain(p: Pkt) -> tuple[str, str] | None:
    """(trigger kind, domain) if ``p`` is a trigger packet."""
    if not p.payload:
        return None
    if p.proto == 6:
        if (host := wire.http_host(p.payload)) is not None:
            return "http", host
        if (sni := wire.tls_sni(p.payload)) is not None:
            return "tls", sni
    elif p.proto == 17 and p.dport == 53 and not wire.dns_is_response(p.payload):
        if (name := wire.dns_qname(p.payload)) is not None:
            return "dns", name
    return None


def main_domain(pkts: list[Pkt], exclude: str | None = None) -> str | None:
    """The domain most triggers of a capture name (optionally ignoring one)."""
    counts = Counter(
        td[1] for p in pkts if (td := _trigger_domain(p)) is not None and td[1] != exclude
    )
    return counts.most_common(1)[0][0] if counts else None


def sweep_from_packets(pkts: list[Pkt], domain: str | None = None) -> Sweep:
    """Build the sweep for ``domain`` (default: the capture's main domain)."""
    domain = domain or main_domain(pkts)
    if domain is None:
        raise PcapError("no trigger (HTTP GET with Host, TLS ClientHello with SNI, DNS query) found")
    triggers = [(p, td) for p in pkts if (td := _trigger_domain(p)) is not None and td[1] == domain]
    if not triggers:
        raise PcapError(f"no trigger for {domain!r} in the capture")
    servers = Counter((p.src, p.dst, p.dport, td[0]) for p, td in triggers)
    client, server, port, trigger = servers.most_common(1)[0][0]
    sweep = Sweep(domain=domain, server=server, port=port, trigger=trigger, client=client)
    if trigger == "dns":
        sweep.hops = _dns_hops(pkts, client, server, domain)
    else:
        sweep.hops = _tcp_hops(pkts, client, server, port, domain)
    if not sweep.hops:
        raise PcapError(f"no probe toward {server}:{port} for {domain!r}")
    return sweep


def read_sweep(path: str | Path, domain: str | None = None, exclude: str | None = None) -> Sweep:
    pkts = read_packets(path)
    if domain is None:
        domain = main_domain(pkts, exclude=exclude)
    return sweep_from_packets(pkts, domain)


# --- TCP ---------------------------------------------------------------------------------------


def _tcp_hops(pkts: list[Pkt], client: str, server: str, port: int, domain: str) -> list[HopResult]:
    # Per client source port, in capture order.
    conns: dict[int, list[Pkt]] = {}
    icmp_by_port: dict[int, list[Pkt]] = {}
    for p in pkts:
        if p.proto == 6 and p.src == client and p.dst == server and p.dport == port:
            conns.setdefault(p.sport, []).append(p)
        elif p.proto == 6 and p.dst == client and p.sport == port:
            # Injected packets claim the server's address, but do not trust that they do.
            conns.setdefault(p.dport, []).append(p)
        elif p.proto == 1 and p.quoted is not None:
            qsrc, qdst, qproto, qsport, qdport, _qid, _qttl = p.quoted
            if qsrc == client and qdst == server and qproto == 6 and qdport == port:
                icmp_by_port.setdefault(qsport, []).append(p)

    probes: list[tuple[int, HopResult | None]] = []  # (sport, hop or None = handshake timeout)
    for sport, seq in conns.items():
        syns = [p for p in seq if p.src == client and p.flags == "S"]
        if not syns:
            continue  # stray packets of a connection captured elsewhere
        for hop in _probes_of_connection(seq, icmp_by_port.get(sport, []), client, domain):
            probes.append((sport, hop))

    # Keep this sweep's connections: the ones whose trigger named the domain, plus handshake
    # timeouts inside (or right after) that port range.
    ports = sorted(sp for sp, h in probes if h is not None)
    if not ports:
        return []
    lo, hi = ports[0], ports[-1] + 1
    ttl_at = {sp: h.ttl for sp, h in probes if h is not None}
    hops: list[HopResult] = [h for _, h in probes if h is not None]
    for sport, h in probes:
        if h is None and lo <= sport <= hi:
            ttl = _infer_ttl(sport, ttl_at)
            if ttl is not None:
                hops.append(HopResult(ttl=ttl, kind=HANDSHAKE_TIMEOUT, packets=_conn_nums(conns[sport])))
    hops.sort(key=lambda h: (h.ttl, h.repetition))
    # Repeated TTLs become repetitions, numbered in capture order.
    seen: Counter[int] = Counter()
    for h in hops:
        h.repetition = seen[h.ttl]
        seen[h.ttl] += 1
    return hops


def _conn_nums(seq: list[Pkt]) -> list[int]:
    return [p.num for p in seq]


def _infer_ttl(sport: int, ttl_at: dict[int, int]) -> int | None:
    """TTL of a trigger-less connection from its neighbours (one port per TTL step)."""
    below = [sp for sp in ttl_at if sp < sport]
    if below:
        sp = max(below)
        return ttl_at[sp] + (sport - sp)
    above = [sp for sp in ttl_at if sp > sport]
    if above:
        sp = min(above)
        ttl = ttl_at[sp] - (sp - sport)
        return ttl if ttl >= 0 else None
    return None


def _probes_of_connection(
    seq: list[Pkt], icmps: list[Pkt], client: str, domain: str
) -> Iterator[HopResult | None]:
    """Yield one HopResult per trigger on the connection, or None for a handshake timeout."""
    synack = next((p for p in seq if p.src != client and "S" in p.flags and "A" in p.flags), None)
    trig_idx = [
        i
        for i, p in enumerate(seq)
        if p.src == client and (td := _trigger_domain(p)) is not None and td[1] == domain
    ]
    if not trig_idx:
        if synack is None:
            yield None
        return  # a completed handshake with no trigger measured nothing
    # The same trigger retransmitted (same seq) is one probe; answers go to the first copy.
    for n, i in enumerate(trig_idx):
        trig = seq[i]
        if n > 0 and trig.seq == seq[trig_idx[n - 1]].seq and trig.ttl == seq[trig_idx[n - 1]].ttl:
            continue
        end = len(seq)
        for j in range(i + 1, len(seq)):
            q = seq[j]
            if q.src == client and (("F" in q.flags) or ("R" in q.flags) or j in trig_idx):
                end = j
                break
        after = [q for q in seq[i + 1 : end] if q.src != client]
        first_num = trig.num
        last_num = seq[end].num if end < len(seq) else 1 << 62
        quoting = [
            q
            for q in icmps
            if first_num < q.num < last_num and q.quoted is not None and q.quoted[5] == trig.ip_id
        ]
        yield _classify(trig, after, quoting, synack)


def _classify(trig: Pkt, answers: list[Pkt], icmps: list[Pkt], synack: Pkt | None) -> HopResult:
    router = next((q.src for q in icmps if q.icmp_type == 11), None)
    unreach = next((q for q in icmps if q.icmp_type == 3), None)
    packets = [trig.num, *(q.num for q in icmps)]
    server_ttl = synack.ttl if synack is not None else None
    server_id = synack.ip_id if synack is not None else None
    # Retransmitted SYN/ACKs and bare ACKs that do not acknowledge the trigger say nothing.
    end_seq = (trig.seq + len(trig.payload)) & 0xFFFFFFFF
    real = [
        q
        for q in answers
        if "S" not in q.flags
        and (q.payload or "R" in q.flags or "F" in q.flags or ("A" in q.flags and q.ack == end_seq))
    ]
    packets += [q.num for q in real]
    hop = HopResult(
        ttl=trig.ttl,
        kind=SILENCE,
        router=router,
        server_ttl=server_ttl,
        server_ip_id=server_id,
        packets=sorted(packets),
    )
    if real:
        prim = _primary(real, server_ttl)
        hop.kind, hop.detail = _kind_of(prim, real, server_ttl)
        hop.responder, hop.ip_ttl, hop.ip_id = prim.src, prim.ttl, prim.ip_id
    elif unreach is not None:
        hop.kind = ICMP_UNREACHABLE
        hop.responder, hop.ip_ttl, hop.ip_id = unreach.src, unreach.ttl, unreach.ip_id
        hop.detail = f"ICMP unreachable code {unreach.icmp_code}"
        hop.server_ttl = None
    elif router is not None:
        hop.kind = ICMP_TIME_EXCEEDED
    return hop


def _primary(real: list[Pkt], server_ttl: int | None) -> Pkt:
    # The most telling packet: a page beats a bare RST/FIN; among equals the first.
    def rank(q: Pkt) -> tuple[int, int]:
        if q.payload:
            r = 0
        elif "R" in q.flags:
            r = 1
        elif "F" in q.flags:
            r = 2
        else:
            r = 3
        return r, q.num

    return min(real, key=rank)


def _kind_of(prim: Pkt, real: list[Pkt], server_ttl: int | None) -> tuple[str, str]:
    injected = server_ttl is not None and prim.ttl != server_ttl
    n_rst = sum(1 for q in real if "R" in q.flags)
    if prim.payload:
        status = wire.http_status(prim.payload)
        if status is not None or b"<html" in prim.payload[:200].lower():
            title = wire.http_title(prim.payload)
            detail = f"HTTP {status}" if status is not None else "HTML"
            if title:
                detail += f" '{title}'"
            if injected:
                return BLOCKPAGE, detail + (" in a FIN segment" if "F" in prim.flags else "")
            return RESPONSE, detail
        if wire.is_tls_server_hello(prim.payload):
            return SERVER_HELLO, "TLS ServerHello"
        if wire.is_tls_alert(prim.payload):
            return RESPONSE, "TLS alert"
        return RESPONSE, f"{len(prim.payload)} bytes of data"
    if "R" in prim.flags:
        return RST, f"{n_rst} RST" if n_rst > 1 else "RST"
    if "F" in prim.flags:
        return FIN, "FIN"
    return RESPONSE, "ACK of the trigger"


# --- DNS ---------------------------------------------------------------------------------------


def _dns_hops(pkts: list[Pkt], client: str, server: str, domain: str) -> list[HopResult]:
    hops: list[HopResult] = []
    queries = [
        p
        for p in pkts
        if p.proto == 17 and p.src == client and p.dst == server and p.dport == 53
        and wire.dns_qname(p.payload) == domain and not wire.dns_is_response(p.payload)
    ]
    for i, q in enumerate(queries):
        # Answers belong to the query until the next query from the same port (a live sweep
        # sends queries of many TTLs at once, each from its own port).
        nxt = next((r.num for r in queries[i + 1 :] if r.sport == q.sport), 1 << 62)
        answers = [
            p for p in pkts
            if q.num < p.num < nxt and p.proto == 17 and p.dst == client and p.sport == 53
            and p.dport == q.sport and wire.dns_is_response(p.payload)
        ]
        icmps = [
            p for p in pkts
            if q.num < p.num < nxt and p.proto == 1 and p.quoted is not None
            and p.quoted[3] == q.sport and p.quoted[5] == q.ip_id
        ]
        router = next((p.src for p in icmps if p.icmp_type == 11), None)
        hop = HopResult(ttl=q.ttl, kind=SILENCE, router=router,
                        packets=sorted([q.num, *(p.num for p in answers), *(p.num for p in icmps)]))
        if answers:
            a = answers[0]
            hop.kind, hop.detail = RESPONSE, wire.dns_summary(a.payload)
            if len(answers) > 1:
                hop.detail += f" (+{len(answers) - 1} more responses)"
            hop.responder, hop.ip_ttl, hop.ip_id = a.src, a.ttl, a.ip_id
        elif router is not None:
            hop.kind = ICMP_TIME_EXCEEDED
        hops.append(hop)
    seen: Counter[int] = Counter()
    for h in sorted(hops, key=lambda h: h.ttl):
        h.repetition = seen[h.ttl]
        seen[h.ttl] += 1
    return sorted(hops, key=lambda h: (h.ttl, h.repetition))


__all__ = [
    "FIN",
    "PcapError",
    "Pkt",
    "Sweep",
    "main_domain",
    "read_packets",
    "read_sweep",
    "sweep_from_packets",
]
