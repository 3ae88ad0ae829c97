"""The CenTrace-style decision: where is the censor, is it in-path or on-path, what triggers it.

Pure functions over two sweeps (the test domain and a control domain, same address, same
trigger), so the same rules run on live sweeps and on sweeps read back from captures.

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


def _pk(h: HopResult | None) -> list[int]:
    return list(h.packets) if h is not None else []


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


def _handshake_timeouts(view: dict[int, HopResult]) -> list[int]:
    return [t for t, h in view.items() if h.kind == HANDSHAKE_TIMEOUT]


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
    """Compare a test sweep with a control sweep and say where the trigger is blocked."""
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}")
    tv = consolidate(test)
    cv = consolidate(control)
    domain = test_domain or target

    def result(
        res: str,
        rule: str,
        sentence: str,
        *,
        hop_ttl: int | None = None,
        hop_address: str | None = None,
        placement: str | None = None,
        triggered_by: str | None = None,
        ttls: Iterable[int] = (),
        tp: Iterable[int] = (),
        cp: Iterable[int] = (),
    ) -> TraceResult:
        return TraceResult(
            target=target,
            address=address,
            trigger=trigger,
            result=res,
            hop_ttl=hop_ttl,
            hop_address=hop_address,
            placement=placement,
            triggered_by=triggered_by,
            rule=rule,
            evidence={
                "rule": rule,
                "sentence": sentence,
                "ttls": sorted(set(ttls)),
                "packets": {"test": sorted(set(tp)), "control": sorted(set(cp))},
                "test_domain": domain,
                "control_domain": control_domain,
            },
            test_hops=list(test),
            control_hops=list(control),
        )

    probed = [h for h in tv.values() if h.kind != HANDSHAKE_TIMEOUT]
    hs_test = _handshake_timeouts(tv)
    hs_ctrl = _handshake_timeouts(cv)
    if not probed:
        return result(
            INCONCLUSIVE,
            "no_handshake",
            f"No TCP handshake of the {domain} sweep completed "
            f"({len(hs_test)} handshake timeouts), so no trigger was ever sent.",
            ttls=hs_test,
        )
    if not [h for h in cv.values() if h.kind != HANDSHAKE_TIMEOUT]:
        return result(
            INCONCLUSIVE,
            "no_control",
            f"The control sweep ({control_domain}) has no usable probe, so nothing to compare with.",
            ttls=hs_ctrl,
        )

    t_test = _first_terminating(tv)
    t_ctrl = _first_terminating(cv)
    ctrl_max = max(cv)

    if t_test is not None:
        th = tv[t_test]
        ch = cv.get(t_test)
        control_passes = (ch is not None and ch.kind == ICMP_TIME_EXCEEDED) or (
            (t_ctrl is None or t_ctrl > t_test) and ctrl_max > t_test
        )
        later_term = [t for t, h in tv.items() if t > t_test and h.terminating]
        also = f" and at {len(later_term)} higher TTLs" if later_term else ""
        if control_passes:
            on_path = bool(th.router)
            hop_ttl, hop_addr, how = _name_hop(t_test, th, tv, cv, on_path=on_path)
            ctrl_said = (
                f"an ICMP time-exceeded from {ch.router}"
                if ch is not None and ch.kind == ICMP_TIME_EXCEEDED
                else "through (it terminates further on)"
            )
            if on_path:
                sentence = (
                    f"At TTL {t_test} the {domain} trigger drew both an ICMP time-exceeded from "
                    f"{th.router} and {_describe(th)}{also}: a copy-and-inject device (on-path) "
                    f"at that hop, while the {control_domain} control at the same TTL got "
                    f"{ctrl_said}. {how}"
                )
            else:
                sentence = (
                    f"The {domain} trigger was answered at TTL {t_test} by {_describe(th)}{also} "
                    f"with no ICMP from that hop (in-path), while the {control_domain} control at "
                    f"the same TTL got {ctrl_said}. {how}"
                )
            return result(
                CENSOR_LOCATED,
                "on_path" if on_path else "in_path_terminated",
                sentence,
                hop_ttl=hop_ttl,
                hop_address=hop_addr,
                placement=ON_PATH if on_path else IN_PATH,
                triggered_by=DOMAIN,
                ttls=[t_test, *([hop_ttl] if hop_ttl is not None else [])],
                tp=_pk(th),
                cp=_pk(ch),
            )
        if t_ctrl == t_test and ch is not None:
            t_inj = th.injected
            c_inj = ch.injected
            if not t_inj and not c_inj:
                if _same_answer(th, ch):
                    return result(
                        NONE_OBSERVED,
                        "same_endpoint_answer",
                        f"Both sweeps reach the server at TTL {t_test} and get the same answer "
                        f"({_describe(th)} for {domain}; {_describe(ch)} for {control_domain}).",
                        ttls=[t_test],
                        tp=_pk(th),
                        cp=_pk(ch),
                    )
                if trigger == "dns":
                    sentence = (
                        f"Both queries are first answered at TTL {t_test}, the resolver's own hop, "
                        f"and the answers differ: {_describe(th)} for {domain} against "
                        f"{_describe(ch)} for {control_domain}. The resolver itself blocks the "
                        "name (DNS blocking at the resolver), nothing in the path."
                    )
                else:
                    sentence = (
                        f"Both sweeps first get an answer at TTL {t_test}, the server's own hop, "
                        f"and the packets carry the server's signature, but they differ: "
                        f"{_describe(th)} for {domain} against {_describe(ch)} for "
                        f"{control_domain}. The block is at the endpoint (a server-side firewall "
                        "or policy), not in the path."
                    )
                return result(
                    ENDPOINT,
                    "endpoint_differs",
                    sentence,
                    hop_ttl=t_test,
                    hop_address=th.responder or address,
                    placement=PLACEMENT_ENDPOINT,
                    triggered_by=DOMAIN,
                    ttls=[t_test],
                    tp=_pk(th),
                    cp=_pk(ch),
                )
            if t_inj and not c_inj:
                hop_ttl, hop_addr, how = _name_hop(t_test, th, tv, cv, on_path=bool(th.router))
                on_path = bool(th.router)
                return result(
                    CENSOR_LOCATED,
                    "injected_at_server_hop",
                    f"At TTL {t_test}, where the {control_domain} control reaches the server "
                    f"({_describe(ch)}), the {domain} trigger got {_describe(th)}: the packet does "
                    "not carry the server's signature, so a device in front of the server sent it "
                    f"({'on-path' if on_path else 'in-path'}). {how}",
                    hop_ttl=hop_ttl,
                    hop_address=hop_addr,
                    placement=ON_PATH if on_path else IN_PATH,
                    triggered_by=DOMAIN,
                    ttls=[t_test],
                    tp=_pk(th),
                    cp=_pk(ch),
                )
            if t_inj and c_inj and _same_answer(th, ch):
                hop_ttl, hop_addr, how = _name_hop(t_test, th, tv, cv, on_path=bool(th.router))
                on_path = bool(th.router)
                return result(
                    CENSOR_LOCATED,
                    "same_injection_both",
                    f"The {domain} and the {control_domain} triggers both got {_describe(th)} at "
                    f"TTL {t_test}: the same injected answer whatever the domain, so the device "
                    f"acts on the address ({'on-path' if on_path else 'in-path'}). {how}",
                    hop_ttl=hop_ttl,
                    hop_address=hop_addr,
                    placement=ON_PATH if on_path else IN_PATH,
                    triggered_by=IP,
                    ttls=[t_test],
                    tp=_pk(th),
                    cp=_pk(ch),
                )
        if t_ctrl is not None and t_ctrl < t_test:
            return result(
                INCONCLUSIVE,
                "control_blocked_earlier",
                f"The {control_domain} control is answered earlier (TTL {t_ctrl}) than the "
                f"{domain} trigger (TTL {t_test}); the control domain itself may be interfered "
                "with, or the route changed between the sweeps.",
                ttls=[t_ctrl, t_test],
                tp=_pk(th),
                cp=_pk(cv.get(t_ctrl)),
            )
        return result(
            INCONCLUSIVE,
            "no_comparison",
            f"The {domain} trigger is answered at TTL {t_test} by {_describe(th)}, but the control "
            "sweep does not cover that TTL in a way that can be compared.",
            ttls=[t_test],
            tp=_pk(th),
            cp=_pk(ch),
        )

    # The test sweep never got an answer: silence (a drop) or a sweep that just stopped.
    s_test = _silent_from(tv)
    if s_test is not None:
        ch = cv.get(s_test)
        control_passes = (ch is not None and ch.kind == ICMP_TIME_EXCEEDED) or (
            t_ctrl is not None and t_ctrl >= s_test
        )
        silent_ttls = [t for t, h in tv.items() if t >= s_test and h.kind == SILENCE]
        s_ctrl = _silent_from(cv)
        hop_ttl, hop_addr, how = _name_hop(s_test, None, tv, cv, on_path=False)
        if control_passes:
            ctrl_said = (
                f"an ICMP time-exceeded from {ch.router}"
                if ch is not None and ch.kind == ICMP_TIME_EXCEEDED
                else f"through to the server (answered at TTL {t_ctrl})"
            )
            return result(
                CENSOR_LOCATED,
                "in_path_drop",
                f"From TTL {s_test} on, the {domain} trigger gets no answer at all (TTLs "
                f"{_ttl_list(silent_ttls)}: no ICMP, no response): it is dropped in-path, while "
                f"the {control_domain} control at TTL {s_test} got {ctrl_said}. {how}",
                hop_ttl=hop_ttl,
                hop_address=hop_addr,
                placement=IN_PATH,
                triggered_by=DOMAIN,
                ttls=silent_ttls,
                tp=[p for t in silent_ttls for p in tv[t].packets],
                cp=_pk(ch),
            )
        if s_ctrl == s_test:
            return result(
                CENSOR_LOCATED,
                "same_drop_both",
                f"Both the {domain} and the {control_domain} triggers are dropped from TTL "
                f"{s_test} on although the handshakes complete: the device acts on the address "
                f"(in-path drop). {how}",
                hop_ttl=hop_ttl,
                hop_address=hop_addr,
                placement=IN_PATH,
                triggered_by=IP,
                ttls=silent_ttls,
            )

    last = max(tv)
    if t_ctrl is None:
        return result(
            INCONCLUSIVE,
            "nobody_reached_server",
            f"Neither sweep reached the server (the {domain} sweep stops at TTL {last}, the "
            f"control at TTL {ctrl_max}); raise --max-hops or check the address."
            + _hs_note(hs_test, hs_ctrl),
            ttls=[last, ctrl_max, *hs_test],
        )
    return result(
        INCONCLUSIVE,
        "test_sweep_incomplete",
        f"The {domain} sweep ends at TTL {last} without an answer while the {control_domain} "
        f"control reaches the server at TTL {t_ctrl}; too few silent TTLs to call it a drop."
        + _hs_note(hs_test, hs_ctrl),
        ttls=[last, t_ctrl, *hs_test],
        tp=_pk(tv[last]),
        cp=_pk(cv[t_ctrl]),
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
