"""The CenTrace-style decision: where is the censor, is it in-path or on-path, what triggers it.

Pure functions over two sweeps (the test domain and a control domain, same address, same
trigger), so the same rules run on live sweeps and on sweeps read back from captures.  The
rules themselves are a table with stable ids, in :mod:`kzprobe.trace.rules`; this module holds
the sweep model (:class:`HopResult`, :class:`TraceResult`), the per-TTL consolidation and the
hop-naming helpers the rules share.

A sweep is a list of :class:`HopResult`, one per (TTL, repetition).  The rules work on a
per-TTL consolidation (majority over repetitions), because a single lost ICMP or a route flap
must not move the censor by a hop.

Vocabulary used below: the *terminating TTL* of a sweep is the lowest TTL at which the trigger
got an answer other than ICMP time-exceeded (a RST, FIN, data, a ServerHello, an ICMP
unreachable).  A response is *from the endpoint* when its IP TTL equals the TTL of the server's
SYN/ACK on the same connection: the same host, same path, same initial TTL.  Anything else that
claims the server's address is *injected*.

Which router is named (``hop_address``) needs care, because a censor inside a Linux router
(netfilter FORWARD) and a bump-in-the-wire box next to a router show up one TTL apart:

* on-path: the test sweep itself gets ICMP time-exceeded at the terminating TTL; that router
  is the censor's hop (the censor's own address shows).
* in-path, and the injected packet's IP TTL says it was sent from exactly one hop before the
  terminating TTL: the router at that hop *is* the censor (again its own address shows).
* in-path, control sweep gets ICMP at the terminating TTL: CenTrace's convention, the router
  at that TTL, the first router the blocked trigger would have reached.
* otherwise (the control reached the server at that TTL, or its router is silent): the last
  router that answered before the block.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# --- hop kinds ---------------------------------------------------------------------------------
ICMP_TIME_EXCEEDED = "icmp_time_exceeded"
ICMP_UNREACHABLE = "icmp_unreachable"
RST = "rst"
FIN = "fin"
RESPONSE = "response"
BLOCKPAGE = "blockpage"
SERVER_HELLO = "server_hello"
SILENCE = "silence"
HANDSHAKE_TIMEOUT = "handshake_timeout"

KINDS = (
    ICMP_TIME_EXCEEDED,
    RST,
    FIN,
    RESPONSE,
    BLOCKPAGE,
    SERVER_HELLO,
    SILENCE,
    HANDSHAKE_TIMEOUT,
    ICMP_UNREACHABLE,
)
#: An answer to the trigger that ends the sweep (the trigger reached *something* that spoke).
TERMINATING = frozenset({RST, FIN, RESPONSE, BLOCKPAGE, SERVER_HELLO, ICMP_UNREACHABLE})

# --- results -----------------------------------------------------------------------------------
CENSOR_LOCATED = "censor_located"
ENDPOINT = "endpoint"
NONE_OBSERVED = "none_observed"
INCONCLUSIVE = "inconclusive"
RESULTS = (CENSOR_LOCATED, ENDPOINT, NONE_OBSERVED, INCONCLUSIVE)

IN_PATH = "in-path"
ON_PATH = "on-path"
PLACEMENT_ENDPOINT = "endpoint"
DOMAIN = "domain"
IP = "ip"

TRIGGERS = ("http", "tls", "dns")

#: How many trailing silent TTLs it takes before silence is read as a drop rather than a
#: router that does not send ICMP.
MIN_SILENT_TTLS = 2


@dataclass(slots=True)
class HopResult:
    """What came back for one trigger sent with IP TTL ``ttl``."""

    ttl: int
    kind: str
    #: Source of an ICMP time-exceeded that quoted the trigger (also set next to an injected
    #: response: that combination is what on-path looks like).
    router: str | None = None
    #: Source address of the terminating packet (RST/FIN/data/ICMP unreachable).
    responder: str | None = None
    #: IP TTL and IP-ID of the terminating packet.
    ip_ttl: int | None = None
    ip_id: int | None = None
    #: IP TTL / IP-ID of the server's SYN/ACK on the same connection (the endpoint's signature).
    server_ttl: int | None = None
    server_ip_id: int | None = None
    #: Short human detail: "HTTP 403", "3 RST", "'Surf Safely' page" ...
    detail: str = ""
    repetition: int = 0
    #: 1-based packet numbers when the hop came from a capture.
    packets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown hop kind {self.kind!r}")

    @property
    def terminating(self) -> bool:
        return self.kind in TERMINATING

    @property
    def injected(self) -> bool | None:
        """True when the terminating packet cannot be the endpoint's (IP TTL differs)."""
        if not self.terminating:
            return None
        if self.kind == ICMP_UNREACHABLE:
            return True
        if self.ip_ttl is None or self.server_ttl is None:
            return None
        return self.ip_ttl != self.server_ttl

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HopResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(slots=True)
class TraceResult:
    """One trace's conclusion; ``to_dict`` is the JSON object ``kzprobe trace`` prints."""

    target: str
    address: str
    trigger: str
    result: str
    hop_ttl: int | None = None
    hop_address: str | None = None
    placement: str | None = None
    triggered_by: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    #: Which decision rule fired (also inside ``evidence``); tests pin rules by it.
    rule: str = ""
    test_hops: list[HopResult] = field(default_factory=list, repr=False)
    control_hops: list[HopResult] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "address": self.address,
            "trigger": self.trigger,
            "result": self.result,
            "hop_ttl": self.hop_ttl,
            "hop_address": self.hop_address,
            "placement": self.placement,
            "triggered_by": self.triggered_by,
            "evidence": self.evidence,
        }

    def hops_dict(self) -> dict[str, list[dict[str, Any]]]:
        """The raw sweeps, for storage next to the result."""
        return {
            "test": [h.to_dict() for h in self.test_hops],
            "control": [h.to_dict() for h in self.control_hops],
        }


# --- consolidation -----------------------------------------------------------------------------


def _category(kind: str) -> str:
    if kind in TERMINATING:
        return "term"
    if kind == ICMP_TIME_EXCEEDED:
        return "icmp"
    return kind  # silence / handshake_timeout


# When repetitions split evenly, prefer the answer that carries information: a router or a
# response is evidence something happened; silence may just be loss.
_TIE_ORDER = {"term": 0, "icmp": 1, SILENCE: 2, HANDSHAKE_TIMEOUT: 3}


def consolidate(hops: Iterable[HopResult]) -> dict[int, HopResult]:
    """One representative :class:`HopResult` per TTL: the majority category over repetitions.

    Within the winning category, an ICMP hop takes the most common router; a terminating hop
    takes its first member (and records that ICMP also arrived if any member saw it).
    """
    by_ttl: dict[int, list[HopResult]] = {}
    for h in hops:
        by_ttl.setdefault(h.ttl, []).append(h)
    out: dict[int, HopResult] = {}
    for ttl, group in sorted(by_ttl.items()):
        counts = Counter(_category(h.kind) for h in group)
        cat = min(counts, key=lambda c: (-counts[c], _TIE_ORDER[c]))
        members = [h for h in group if _category(h.kind) == cat]
        rep = dataclasses.replace(members[0], packets=sorted({p for h in members for p in h.packets}))
        routers = Counter(h.router for h in members if h.router)
        if routers:
            rep.router = routers.most_common(1)[0][0]
        out[ttl] = rep
    return out


def _first_terminating(view: dict[int, HopResult]) -> int | None:
    for ttl, h in view.items():
        if h.terminating:
            return ttl
    return None


def _silent_from(view: dict[int, HopResult]) -> int | None:
    """Lowest TTL from which every probed TTL is silent, if there are enough of them."""
    ttls = sorted(view)
    start = None
    for ttl in reversed(ttls):
        if view[ttl].kind == SILENCE:
            start = ttl
        elif view[ttl].kind == HANDSHAKE_TIMEOUT:
            continue  # says nothing about the trigger; neither breaks nor extends the run
        else:
            break
    if start is None:
        return None
    n = sum(1 for t in ttls if t >= start and view[t].kind == SILENCE)
    return start if n >= MIN_SILENT_TTLS else None


def _hop_distance(ip_ttl: int | None) -> int | None:
    """The hop (TTL that reaches it) a packet was sent from, assuming a usual initial TTL."""
    if ip_ttl is None:
        return None
    for initial in (64, 128, 255):
        if ip_ttl <= initial:
            return initial - ip_ttl + 1
    return None


def _router_at(ttl: int, *views: dict[int, HopResult]) -> str | None:
    for v in views:
        h = v.get(ttl)
        if h is not None and h.router:
            return h.router
    return None


def _last_router_before(ttl: int, *views: dict[int, HopResult]) -> tuple[int | None, str | None]:
    for t in range(ttl - 1, -1, -1):
        r = _router_at(t, *views)
        if r:
            return t, r
    return None, None


def _same_answer(a: HopResult, b: HopResult) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == RESPONSE:
        return a.detail.split(" ")[:2] == b.detail.split(" ")[:2]  # "HTTP 200" vs "HTTP 403"
    return True


def _describe(h: HopResult) -> str:
    what = h.detail or h.kind.replace("_", " ")
    sig = ""
    if h.ip_ttl is not None:
        sig = f" (IP TTL {h.ip_ttl}"
        if h.ip_id is not None:
            sig += f", IP-ID {h.ip_id}"
        if h.server_ttl is not None:
            sig += f"; the server's SYN/ACK had TTL {h.server_ttl}"
            if h.server_ip_id is not None:
                sig += f", IP-ID {h.server_ip_id}"
        sig += ")"
    src = f" from {h.responder}" if h.responder else ""
    return f"{what}{src}{sig}"


# --- the decision ------------------------------------------------------------------------------


def decide(
    test: Sequence[HopResult],
    control: Sequence[HopResult],
    *,
    target: str,
    address: str,
    trigger: str,
    test_domain: str | None = None,
    control_domain: str = "example.com",
) -> TraceResult:
    """Compare a test sweep with a control sweep and say where the trigger is blocked: the first
    rule of :data:`kzprobe.trace.rules.RULES` that matches."""
    from kzprobe.trace.rules import Facts, first_hit

    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}")
    domain = test_domain or target
    facts = Facts.of(test, control, target=target, address=address, trigger=trigger, domain=domain,
                     control_domain=control_domain)
    rule, hit = first_hit(facts)
    return TraceResult(
        target=target,
        address=address,
        trigger=trigger,
        result=rule.result,
        hop_ttl=hit.hop_ttl,
        hop_address=hit.hop_address,
        placement=hit.placement,
        triggered_by=hit.triggered_by,
        rule=rule.id,
        evidence={
            "rule": rule.id,
            "centrace": rule.centrace,
            "sentence": hit.sentence,
            "ttls": sorted(set(hit.ttls)),
            "packets": {"test": sorted(set(hit.tp)), "control": sorted(set(hit.cp))},
            "test_domain": domain,
            "control_domain": control_domain,
        },
        test_hops=list(test),
        control_hops=list(control),
    )


def _ttl_list(ttls: Sequence[int]) -> str:
    ttls = sorted(ttls)
    if len(ttls) > 2 and ttls == list(range(ttls[0], ttls[-1] + 1)):
        return f"{ttls[0]}-{ttls[-1]}"
    return ", ".join(str(t) for t in ttls)


def _hs_note(hs_test: list[int], hs_ctrl: list[int]) -> str:
    if not hs_test:
        return ""
    note = (
        f" {len(hs_test)} TCP handshakes of the test sweep timed out (TTLs {_ttl_list(hs_test)})"
    )
    if hs_ctrl:
        note += f", and {len(hs_ctrl)} of the control's (TTLs {_ttl_list(hs_ctrl)})"
    return note + "."


def _name_hop(
    t: int,
    th: HopResult | None,
    tv: dict[int, HopResult],
    cv: dict[int, HopResult],
    *,
    on_path: bool,
) -> tuple[int | None, str | None, str]:
    """Which router to name for a block first seen at TTL ``t``; see the module docstring."""
    if on_path and th is not None and th.router:
        return t, th.router, f"The censor's hop is TTL {t}, router {th.router}."
    before_ttl, before = _last_router_before(t, tv, cv)
    if th is not None and th.kind == ICMP_UNREACHABLE and th.responder:
        known = [x for v in (tv, cv) for x, h in v.items() if h.router == th.responder and x <= t]
        at = max(known) if known else t
        return at, th.responder, f"The censor names itself: ICMP unreachable from {th.responder}."
    if th is not None and th.injected and before_ttl == t - 1:
        origin = _hop_distance(th.ip_ttl)
        if origin == t - 1:
            return (
                before_ttl,
                before,
                f"The injected packet's IP TTL ({th.ip_ttl}) says it was sent from TTL {origin}, "
                f"the hop of router {before}: the censor is that router.",
            )
    ch = cv.get(t)
    if ch is not None and ch.kind == ICMP_TIME_EXCEEDED and ch.router:
        return (
            t,
            ch.router,
            f"The censor sits in front of or at router {ch.router} (TTL {t} in the control sweep)"
            + (
                f"; the last router before it is {before} (TTL {before_ttl})."
                if before and before != ch.router
                else "."
            ),
        )
    if before is not None:
        return (
            before_ttl,
            before,
            f"The last router that answered before the block is {before} (TTL {before_ttl}).",
        )
    return t, None, "No router along the way answered with ICMP, so the hop has no address."
