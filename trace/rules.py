"""The trace rule table: stable ids, in priority order, each a pure predicate over :class:`Facts`.

Like :mod:`kzprobe.analysis.rules` for verdicts: the first rule that matches gives the trace's
result, and every rule has a positive and a near-miss case in ``tests/test_trace_rules.py``
(``test_every_rule_has_cases`` fails when a rule is added without them).

Each rule names the CenTrace result code (``ResponseCode`` in CenTrace's ``pcap_parse.py``) it
corresponds to where one applies, so that results can be compared with CenTrace's:

=============================  ================================================================
CenTrace                       here
=============================  ================================================================
PROBE_TERMINATED_EARLY         no_handshake, no_control, nobody_reached_server,
                               test_sweep_incomplete
TERMINATING_TTL_PAST_CONTROL   past_control
NO_OBSERVED_CENSORSHIP         same_endpoint_answer
ENDPOINT_FIREWALL              endpoint_differs, endpoint_firewall (the test's answer comes at
                               the TTL where control reaches the server)
NAT_FIREWALL                   nat_firewall (the hop that would be named is the target's own
                               address: never ``censor_located``)
CAN_IDENTIFY_SERVER            on_path, in_path_terminated, in_path_drop, same_injection_both,
                               same_drop_both, injected_at_server_hop (CenTrace would say
                               ENDPOINT_FIREWALL; the answer's IP TTL names the router before)
NO_CORRESPONDING_RESPONSE      no_comparison
=============================  ================================================================

Order encodes precedence: sweeps that cannot be compared first, then the endpoint's own hop
(NAT / endpoint firewall), then the censor in the path, then the endpoint comparisons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kzprobe.trace.decide import (
    CENSOR_LOCATED,
    DOMAIN,
    ENDPOINT,
    HANDSHAKE_TIMEOUT,
    ICMP_TIME_EXCEEDED,
    IN_PATH,
    INCONCLUSIVE,
    IP,
    NONE_OBSERVED,
    ON_PATH,
    PLACEMENT_ENDPOINT,
    SILENCE,
    HopResult,
    consolidate,
)
from kzprobe.trace.decide import _describe as describe
from kzprobe.trace.decide import _first_terminating as first_terminating
from kzprobe.trace.decide import _hop_distance as hop_distance
from kzprobe.trace.decide import _hs_note as hs_note
from kzprobe.trace.decide import _last_router_before as last_router_before
from kzprobe.trace.decide import _name_hop as name_hop
from kzprobe.trace.decide import _same_answer as same_answer
from kzprobe.trace.decide import _silent_from as silent_from
from kzprobe.trace.decide import _ttl_list as ttl_list

# CenTrace's ResponseCode values.
C_TERMINATED_EARLY = "PROBE_TERMINATED_EARLY"
C_PAST_CONTROL = "TERMINATING_TTL_PAST_CONTROL"
C_NO_CENSORSHIP = "NO_OBSERVED_CENSORSHIP"
C_ENDPOINT_FIREWALL = "ENDPOINT_FIREWALL"
C_NAT_FIREWALL = "NAT_FIREWALL"
C_IDENTIFY_SERVER = "CAN_IDENTIFY_SERVER"
C_NO_CORRESPONDING = "NO_CORRESPONDING_RESPONSE"


@dataclass(frozen=True)
class Facts:
    """Both sweeps, consolidated per TTL, and what the rules keep asking of them."""

    target: str
    address: str
    trigger: str
    domain: str
    control_domain: str
    tv: dict[int, HopResult]
    cv: dict[int, HopResult]
    #: First terminating TTL of the test / control sweep (None: never answered).
    t_test: int | None
    t_ctrl: int | None
    #: Lowest TTL from which the test / control sweep is silent (enough silent TTLs), else None.
    s_test: int | None
    s_ctrl: int | None
    hs_test: list[int]
    hs_ctrl: list[int]

    @classmethod
    def of(cls, test: Sequence[HopResult], control: Sequence[HopResult], *, target: str, address: str,
           trigger: str, domain: str, control_domain: str) -> Facts:
        tv, cv = consolidate(test), consolidate(control)
        return cls(target=target, address=address, trigger=trigger, domain=domain, control_domain=control_domain,
                   tv=tv, cv=cv, t_test=first_terminating(tv), t_ctrl=first_terminating(cv),
                   s_test=silent_from(tv), s_ctrl=silent_from(cv),
                   hs_test=[t for t, h in tv.items() if h.kind == HANDSHAKE_TIMEOUT],
                   hs_ctrl=[t for t, h in cv.items() if h.kind == HANDSHAKE_TIMEOUT])

    @property
    def probed(self) -> bool:
        return any(h.kind != HANDSHAKE_TIMEOUT for h in self.tv.values())

    @property
    def ctrl_probed(self) -> bool:
        return any(h.kind != HANDSHAKE_TIMEOUT for h in self.cv.values())

    @property
    def ctrl_max(self) -> int:
        return max(self.cv) if self.cv else 0

    @property
    def blocked_at(self) -> int | None:
        """The test's terminating TTL, or the first of its trailing silent TTLs (CenTrace: one
        past the last response)."""
        return self.t_test if self.t_test is not None else self.s_test

    def control_passes(self, ttl: int) -> bool:
        """The control trigger went through at ``ttl``: an ICMP time-exceeded there, or it is
        answered only further on."""
        ch = self.cv.get(ttl)
        if ch is not None and ch.kind == ICMP_TIME_EXCEEDED:
            return True
        if self.t_test is not None:
            return (self.t_ctrl is None or self.t_ctrl > ttl) and self.ctrl_max > ttl
        return self.t_ctrl is not None and self.t_ctrl >= ttl


@dataclass(frozen=True)
class Hit:
    sentence: str
    hop_ttl: int | None = None
    hop_address: str | None = None
    placement: str | None = None
    triggered_by: str | None = None
    ttls: Sequence[int] = ()
    tp: Sequence[int] = ()
    cp: Sequence[int] = ()


@dataclass(frozen=True)
class TraceRule:
    id: str
    result: str
    #: CenTrace's ResponseCode for this case, where one applies.
    centrace: str | None
    check: Callable[[Facts], Hit | None] = field(repr=False)
    doc: str = ""


def _pk(h: HopResult | None) -> list[int]:
    return list(h.packets) if h is not None else []


# --- sweeps that cannot be compared ---------------------------------------------------------------
def _no_handshake(f: Facts) -> Hit | None:
    if f.probed:
        return None
    return Hit(f"No TCP handshake of the {f.domain} sweep completed ({len(f.hs_test)} handshake timeouts), so no "
               "trigger was ever sent.", ttls=f.hs_test)


def _no_control(f: Facts) -> Hit | None:
    if f.ctrl_probed:
        return None
    return Hit(f"The control sweep ({f.control_domain}) has no usable probe, so nothing to compare with.",
               ttls=f.hs_ctrl)


def _past_control(f: Facts) -> Hit | None:
    t = f.blocked_at
    if t is None or t <= f.ctrl_max + 1:
        return None
    how = "is first answered" if f.t_test is not None else "goes silent"
    return Hit(f"The {f.domain} sweep {how} at TTL {t}, past the end of the {f.control_domain} control sweep "
               f"(TTL {f.ctrl_max}): nothing to compare it with there; raise --max-hops for the control.",
               ttls=[t, f.ctrl_max], tp=_pk(f.tv.get(t)))


# --- the hop that would be named is the target itself ---------------------------------------------
_LOCATING: list[Callable[[Facts], Hit | None]] = []


def _nat_firewall(f: Facts) -> Hit | None:
    """A censor-locating rule would name the target's own address: the block is the endpoint's
    (a firewall or NAT in front of the server answering from its address), never a path hop."""
    for check in _LOCATING:
        hit = check(f)
        if hit is not None:
            break
    else:
        return None
    if hit.hop_address != f.address:
        return None
    return Hit(f"{hit.sentence} That hop is the target's own address {f.address}: the block is at the endpoint "
               "(a firewall or NAT in front of the server), not in the path.",
               hop_ttl=hit.hop_ttl, hop_address=f.address, placement=PLACEMENT_ENDPOINT, triggered_by=DOMAIN,
               ttls=hit.ttls, tp=hit.tp, cp=hit.cp)


# --- the censor in the path -----------------------------------------------------------------------
def _terminated_in_path(f: Facts, on_path: bool) -> Hit | None:
    t = f.t_test
    if t is None or not f.control_passes(t):
        return None
    th, ch = f.tv[t], f.cv.get(t)
    if bool(th.router) != on_path:
        return None
    later = [x for x, h in f.tv.items() if x > t and h.terminating]
    also = f" and at {len(later)} higher TTLs" if later else ""
    hop_ttl, hop_addr, how = name_hop(t, th, f.tv, f.cv, on_path=on_path)
    ctrl_said = (f"an ICMP time-exceeded from {ch.router}" if ch is not None and ch.kind == ICMP_TIME_EXCEEDED
                 else "through (it terminates further on)")
    if on_path:
        sentence = (f"At TTL {t} the {f.domain} trigger drew both an ICMP time-exceeded from {th.router} and "
                    f"{describe(th)}{also}: a copy-and-inject device (on-path) at that hop, while the "
                    f"{f.control_domain} control at the same TTL got {ctrl_said}. {how}")
    else:
        sentence = (f"The {f.domain} trigger was answered at TTL {t} by {describe(th)}{also} with no ICMP from that "
                    f"hop (in-path), while the {f.control_domain} control at the same TTL got {ctrl_said}. {how}")
    return Hit(sentence, hop_ttl=hop_ttl, hop_address=hop_addr, placement=ON_PATH if on_path else IN_PATH,
               triggered_by=DOMAIN, ttls=[t, *([hop_ttl] if hop_ttl is not None else [])], tp=_pk(th), cp=_pk(ch))


def _on_path(f: Facts) -> Hit | None:
    return _terminated_in_path(f, on_path=True)


def _in_path_terminated(f: Facts) -> Hit | None:
    return _terminated_in_path(f, on_path=False)


def _same_injection_both(f: Facts) -> Hit | None:
    t = f.t_test
    if t is None or f.t_ctrl != t:
        return None
    th, ch = f.tv[t], f.cv[t]
    if not (th.injected and ch.injected and same_answer(th, ch)):
        return None
    on_path = bool(th.router)
    hop_ttl, hop_addr, how = name_hop(t, th, f.tv, f.cv, on_path=on_path)
    return Hit(f"The {f.domain} and the {f.control_domain} triggers both got {describe(th)} at TTL {t}: the same "
               "injected answer whatever the domain, so the device acts on the address "
               f"({'on-path' if on_path else 'in-path'}). {how}",
               hop_ttl=hop_ttl, hop_address=hop_addr, placement=ON_PATH if on_path else IN_PATH, triggered_by=IP,
               ttls=[t], tp=_pk(th), cp=_pk(ch))


def _drop_hop(f: Facts, s: int) -> tuple[int | None, str | None, str]:
    """CenTrace's middlebox for a sweep that goes silent from TTL ``s``: the control's first
    answering hop at or after ``s`` (its silent hops skipped) when it is a router; when it is the
    server itself, or there is none, the last router before ``s``."""
    for ttl in sorted(x for x in f.cv if x >= s):
        ch = f.cv[ttl]
        if ch.kind == SILENCE:
            continue
        if ch.kind == ICMP_TIME_EXCEEDED and ch.router:
            skipped = f" (the control's TTLs {ttl_list(list(range(s, ttl)))} are silent too)" if ttl > s else ""
            return ttl, ch.router, (f"The censor sits in front of or at router {ch.router}, the control's first "
                                    f"answering hop from TTL {s} on (TTL {ttl}){skipped}.")
        if ch.terminating:
            # The trigger was dropped by the last router before the server or by the server's own
            # firewall: a sweep cannot tell them apart.  The router is named (as the lab's censors
            # next to the server are), never the target's address, and the sentence says so.
            # The control's view first: it is the path that reaches the server.  A gateway in
            # front of the server answering with the server's own address makes this the
            # endpoint (nat_firewall), as CenTrace calls such a drop an endpoint firewall.
            before_ttl, before = last_router_before(s, f.cv, f.tv)
            if before is None:
                hop_ttl, hop, how = name_hop(s, None, f.tv, f.cv, on_path=False)
            else:
                hop_ttl, hop, how = before_ttl, before, (f"The last router before the block on the control's path "
                                                        f"is {before} (TTL {before_ttl}).")
            return hop_ttl, hop, (f"{how} The control's first answer from TTL {s} on is the server's own (TTL "
                                  f"{ttl}), so a drop by the server's own firewall would look the same.")
        break
    return name_hop(s, None, f.tv, f.cv, on_path=False)


def _in_path_drop(f: Facts) -> Hit | None:
    s = f.s_test
    if f.t_test is not None or s is None or not f.control_passes(s):
        return None
    ch = f.cv.get(s)
    silent = [t for t, h in f.tv.items() if t >= s and h.kind == SILENCE]
    hop_ttl, hop_addr, how = _drop_hop(f, s)
    ctrl_said = (f"an ICMP time-exceeded from {ch.router}" if ch is not None and ch.kind == ICMP_TIME_EXCEEDED
                 else f"through to the server (answered at TTL {f.t_ctrl})")
    return Hit(f"From TTL {s} on, the {f.domain} trigger gets no answer at all (TTLs {ttl_list(silent)}: no ICMP, no "
               f"response): it is dropped in-path, while the {f.control_domain} control at TTL {s} got {ctrl_said}. "
               f"{how}", hop_ttl=hop_ttl, hop_address=hop_addr, placement=IN_PATH, triggered_by=DOMAIN, ttls=silent,
               tp=[p for t in silent for p in f.tv[t].packets], cp=_pk(ch))


def _same_drop_both(f: Facts) -> Hit | None:
    s = f.s_test
    if f.t_test is not None or s is None or f.s_ctrl != s or f.control_passes(s):
        return None
    silent = [t for t, h in f.tv.items() if t >= s and h.kind == SILENCE]
    hop_ttl, hop_addr, how = name_hop(s, None, f.tv, f.cv, on_path=False)
    return Hit(f"Both the {f.domain} and the {f.control_domain} triggers are dropped from TTL {s} on although the "
               f"handshakes complete: the device acts on the address (in-path drop). {how}",
               hop_ttl=hop_ttl, hop_address=hop_addr, placement=IN_PATH, triggered_by=IP, ttls=silent)


_LOCATING.extend([_on_path, _in_path_terminated, _same_injection_both, _in_path_drop, _same_drop_both])
# (_injected_at_server_hop names a router, never the target: see _sent_from_hop_before.)


# --- both reach the same hop: the endpoint's own answers ------------------------------------------
def _same_ttl(f: Facts) -> tuple[int, HopResult, HopResult] | None:
    t = f.t_test
    if t is None or f.t_ctrl != t:
        return None
    return t, f.tv[t], f.cv[t]


def _same_endpoint_answer(f: Facts) -> Hit | None:
    got = _same_ttl(f)
    if got is None:
        return None
    t, th, ch = got
    if th.injected or ch.injected or not same_answer(th, ch):
        return None
    return Hit(f"Both sweeps reach the server at TTL {t} and get the same answer ({describe(th)} for {f.domain}; "
               f"{describe(ch)} for {f.control_domain}).", ttls=[t], tp=_pk(th), cp=_pk(ch))


def _endpoint_differs(f: Facts) -> Hit | None:
    got = _same_ttl(f)
    if got is None:
        return None
    t, th, ch = got
    if th.injected or ch.injected or same_answer(th, ch):
        return None
    if f.trigger == "dns":
        sentence = (f"Both queries are first answered at TTL {t}, the resolver's own hop, and the answers differ: "
                    f"{describe(th)} for {f.domain} against {describe(ch)} for {f.control_domain}. The resolver "
                    "itself blocks the name (DNS blocking at the resolver), nothing in the path.")
    else:
        sentence = (f"Both sweeps first get an answer at TTL {t}, the server's own hop, and the packets carry the "
                    f"server's signature, but they differ: {describe(th)} for {f.domain} against {describe(ch)} for "
                    f"{f.control_domain}. The block is at the endpoint (a server-side firewall or policy), not in "
                    "the path.")
    return Hit(sentence, hop_ttl=t, hop_address=th.responder or f.address, placement=PLACEMENT_ENDPOINT,
               triggered_by=DOMAIN, ttls=[t], tp=_pk(th), cp=_pk(ch))


def _sent_from_hop_before(f: Facts, t: int, th: HopResult) -> tuple[int, str] | None:
    """(TTL, router) of the hop just before ``t`` when the answer's IP TTL says it was sent from
    there (a usual initial TTL minus the hops), and that router is known; else None."""
    before_ttl, before = last_router_before(t, f.tv, f.cv)
    if before is None or before_ttl != t - 1 or hop_distance(th.ip_ttl) != t - 1:
        return None
    return before_ttl, before


def _injected_at_server_hop(f: Facts) -> Hit | None:
    got = _same_ttl(f)
    if got is None:
        return None
    t, th, ch = got
    if not th.injected or ch.injected:
        return None
    origin = _sent_from_hop_before(f, t, th)
    if origin is None:
        return None
    return Hit(f"At TTL {t}, where the {f.control_domain} control reaches the server ({describe(ch)}), the "
               f"{f.domain} trigger got {describe(th)}: the packet lacks the server's signature, and its IP TTL "
               f"({th.ip_ttl}) says it was sent from TTL {origin[0]}, the hop of router {origin[1]}: the censor is "
               "that router, the last one before the server (in-path).", hop_ttl=origin[0], hop_address=origin[1],
               placement=IN_PATH, triggered_by=DOMAIN, ttls=[t, origin[0]], tp=_pk(th), cp=_pk(ch))


def _endpoint_firewall(f: Facts) -> Hit | None:
    got = _same_ttl(f)
    if got is None:
        return None
    t, th, ch = got
    if not th.injected or ch.injected or _sent_from_hop_before(f, t, th) is not None:
        return None
    return Hit(f"At TTL {t}, where the {f.control_domain} control reaches the server ({describe(ch)}), the "
               f"{f.domain} trigger got {describe(th)}: the packet lacks the server's signature, yet it comes from "
               "the server's own hop and nothing says it was sent from an earlier one, so a firewall in front of "
               "the server sent it (an endpoint firewall, not a censor in the path).", hop_ttl=t,
               hop_address=f.address, placement=PLACEMENT_ENDPOINT, triggered_by=DOMAIN, ttls=[t], tp=_pk(th),
               cp=_pk(ch))


# --- nothing to decide with ------------------------------------------------------------------------
def _control_blocked_earlier(f: Facts) -> Hit | None:
    t = f.t_test
    if t is None or f.t_ctrl is None or f.t_ctrl >= t:
        return None
    return Hit(f"The {f.control_domain} control is answered earlier (TTL {f.t_ctrl}) than the {f.domain} trigger "
               f"(TTL {t}); the control domain itself may be interfered with, or the route changed between the "
               "sweeps.", ttls=[f.t_ctrl, t], tp=_pk(f.tv[t]), cp=_pk(f.cv.get(f.t_ctrl)))


def _no_comparison(f: Facts) -> Hit | None:
    t = f.t_test
    if t is None:
        return None
    th = f.tv[t]
    return Hit(f"The {f.domain} trigger is answered at TTL {t} by {describe(th)}, but the control sweep does not "
               "cover that TTL in a way that can be compared.", ttls=[t], tp=_pk(th), cp=_pk(f.cv.get(t)))


def _nobody_reached_server(f: Facts) -> Hit | None:
    if f.t_test is not None or f.t_ctrl is not None:
        return None
    last = max(f.tv)
    return Hit(f"Neither sweep reached the server (the {f.domain} sweep stops at TTL {last}, the control at TTL "
               f"{f.ctrl_max}); raise --max-hops or check the address." + hs_note(f.hs_test, f.hs_ctrl),
               ttls=[last, f.ctrl_max, *f.hs_test])


def _test_sweep_incomplete(f: Facts) -> Hit | None:
    if f.t_test is not None or f.t_ctrl is None:
        return None
    last = max(f.tv)
    return Hit(f"The {f.domain} sweep ends at TTL {last} without an answer while the {f.control_domain} control "
               f"reaches the server at TTL {f.t_ctrl}; too few silent TTLs to call it a drop."
               + hs_note(f.hs_test, f.hs_ctrl), ttls=[last, f.t_ctrl, *f.hs_test], tp=_pk(f.tv[last]),
               cp=_pk(f.cv[f.t_ctrl]))


RULES: tuple[TraceRule, ...] = (
    TraceRule("no_handshake", INCONCLUSIVE, C_TERMINATED_EARLY, _no_handshake,
              "No handshake of the test sweep completed: no trigger was sent."),
    TraceRule("no_control", INCONCLUSIVE, C_TERMINATED_EARLY, _no_control, "The control sweep has no usable probe."),
    TraceRule("past_control", INCONCLUSIVE, C_PAST_CONTROL, _past_control,
              "The test terminates (or goes silent) past the control sweep's last TTL + 1."),
    TraceRule("nat_firewall", ENDPOINT, C_NAT_FIREWALL, _nat_firewall,
              "The hop a locating rule would name is the target's own address: endpoint, never censor_located."),
    TraceRule("on_path", CENSOR_LOCATED, C_IDENTIFY_SERVER, _on_path,
              "ICMP and an injected answer at the same TTL, where control passes: copy-and-inject."),
    TraceRule("in_path_terminated", CENSOR_LOCATED, C_IDENTIFY_SERVER, _in_path_terminated,
              "The test is answered (no ICMP) at a TTL where control passes."),
    TraceRule("same_injection_both", CENSOR_LOCATED, C_IDENTIFY_SERVER, _same_injection_both,
              "Both sweeps get the same injected answer at the same TTL: triggered by the address."),
    TraceRule("in_path_drop", CENSOR_LOCATED, C_IDENTIFY_SERVER, _in_path_drop,
              "The test goes silent from a TTL on while control passes there; the middlebox is control's first "
              "answering hop from that TTL on."),
    TraceRule("same_drop_both", CENSOR_LOCATED, C_IDENTIFY_SERVER, _same_drop_both,
              "Both sweeps go silent from the same TTL: triggered by the address."),
    TraceRule("same_endpoint_answer", NONE_OBSERVED, C_NO_CENSORSHIP, _same_endpoint_answer,
              "Both reach the server at the same TTL with the same answer."),
    TraceRule("endpoint_differs", ENDPOINT, C_ENDPOINT_FIREWALL, _endpoint_differs,
              "Both end at the same TTL with the server's signature, but the answers differ."),
    TraceRule("injected_at_server_hop", CENSOR_LOCATED, C_IDENTIFY_SERVER, _injected_at_server_hop,
              "The test ends where control reaches the server, with an answer unlike the server's whose IP TTL "
              "says it was sent from the router just before: that router."),
    TraceRule("endpoint_firewall", ENDPOINT, C_ENDPOINT_FIREWALL, _endpoint_firewall,
              "The test ends at the TTL where control reaches the server, with an answer unlike the server's and "
              "no sign of an earlier sender: an endpoint firewall."),
    TraceRule("control_blocked_earlier", INCONCLUSIVE, None, _control_blocked_earlier,
              "Control is answered earlier than the test."),
    TraceRule("no_comparison", INCONCLUSIVE, C_NO_CORRESPONDING, _no_comparison,
              "The test is answered where the control sweep offers nothing to compare."),
    TraceRule("nobody_reached_server", INCONCLUSIVE, C_TERMINATED_EARLY, _nobody_reached_server,
              "Neither sweep got an answer."),
    TraceRule("test_sweep_incomplete", INCONCLUSIVE, C_TERMINATED_EARLY, _test_sweep_incomplete,
              "The test got no answer, and too few silent TTLs to call it a drop."),
)
RULES_BY_ID = {r.id: r for r in RULES}


def first_hit(f: Facts, rules: Iterable[TraceRule] = RULES) -> tuple[TraceRule, Hit]:
    for rule in rules:
        hit = rule.check(f)
        if hit is not None:
            return rule, hit
    raise AssertionError("the last rule always matches")  # test_sweep_incomplete or nobody_reached_server
