"""The rule table: stable rule ids, in priority order, each a pure predicate over :class:`Facts`.

The first rule that matches gives the verdict.  Order encodes precedence of evidence:
vantage problems first (never blame a site for our own broken network), then packet-level proof
of injection, then DNS (a wrong address explains every later failure), then TLS interception,
then TCP / TLS / HTTP interference, then success, then "down", then "inconclusive".

Design rules, from OONI's experience of false positives:
- ``blocked`` needs a contrast: control (helper / DoH), a follow-up on the same address with a
  benign SNI or Host, or another probe resolver whose answer validated.  Without one, a failure
  is ``inconclusive``.
- A timeout must be seen at least twice (Censored Planet's "sandwich" retry) before it is blocking.
- Failure everywhere, control included, is ``down``, not ``blocked``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from kzprobe import errors as E
from kzprobe.analysis.bogons import is_bogon, is_ip
from kzprobe.analysis.facts import DNS_FAILURES, INTERFERENCE, Facts, dominant_failure, hop_of
from kzprobe.model import (
    BLOCKED,
    CONTROL,
    DOWN,
    INCONCLUSIVE,
    MEASURE,
    OK,
    PEEK,
    PROBE,
    SOURCE_LIVE,
    STEP_DNS,
    STEP_HTTP,
    STEP_TCP,
    STEP_TLS,
    Observation,
)


@dataclass(frozen=True, slots=True)
class Hit:
    observations: list[Observation]
    sentence: str
    detail: str | None = None
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    status: str
    mechanism: str | None
    detail: str | None
    confidence: float
    check: Callable[[Facts], Hit | None]
    doc: str


# Failure -> verdict detail suffix.
_SUFFIX = {
    E.CONNECTION_RESET: "reset",
    E.TIMEOUT: "timeout",
    E.EOF: "eof",
    E.CONNECTION_ABORTED: "reset",
    E.CONNECTION_REFUSED: "refused",
    E.HOST_UNREACHABLE: "unreachable",
    E.NETWORK_UNREACHABLE: "unreachable",
    E.DNS_NXDOMAIN: "nxdomain",
    E.DNS_SERVFAIL: "servfail",
    E.DNS_NO_ANSWER: "no_answer",
    E.DNS_REFUSED: "refused",
}


def _suffix(failure: str | None) -> str:
    return _SUFFIX.get(failure or "", "failure")


def _times(obs: list[Observation]) -> str:
    bad = sum(1 for o in obs if not o.ok)
    return f"{bad}/{len(obs)} times"


def _enough(obs: list[Observation]) -> bool:
    """A reset is evidence at once; a timeout or EOF must be seen again (sandwich retry).

    A live probe always retries, so it can meet that bar.  An imported OONI measurement or a
    capture cannot be re-measured: there one failure counts (the verdict's contrast, control,
    is still required by every rule that calls this).
    """
    failures = [o for o in obs if o.failure]
    if not failures:
        return False
    if any(o.failure == E.CONNECTION_RESET for o in failures):
        return True
    if all(o.source != SOURCE_LIVE for o in failures):
        return True
    return len(failures) >= 2


# --- vantage -------------------------------------------------------------------------------------
def _no_network(f: Facts) -> Hit | None:
    if f.context.no_network:
        failed = [o for o in f.observations if not o.ok][:6]
        return Hit(failed, "The vantage point itself has no working network (no route but loopback); "
                           "nothing about this site can be said.")
    if f.network_unreachable_everywhere:
        ids = [o for o in f.observations if o.failure in E.NETWORK_DOWN]
        return Hit(ids, "Every step failed with network_unreachable: the vantage point has no route.")
    return None


def _control_rejected(f: Facts) -> Hit | None:
    if not f.rejected:
        return None
    o = f.rejected[0]
    return Hit([o], f"Control's answer was rejected ({o.data.get('wire_error') or 'malformed'}): "
                    "without a trustworthy contrast nothing about this site can be said.")


# --- packet-level injection (pcap) -----------------------------------------------------------------
def _injected_flow(f: Facts) -> Hit | None:
    for o in f.injected:
        inj = o.data["injected"]
        kind = inj.get("kind")
        if kind not in ("rst", "fin", "blockpage"):
            continue
        where = "TLS" if o.step == STEP_TLS else "HTTP" if o.step == STEP_HTTP else "TCP"
        if kind == "blockpage":
            detail = "dpi.blockpage"
        elif o.step == STEP_HTTP:
            detail = f"dpi.http_{'reset' if kind == 'rst' else 'eof'}"
        else:
            detail = f"dpi.tls_{'reset' if kind == 'rst' else 'eof'}"
        trig = f" after SNI {o.data['sni']}" if o.data.get("sni") else ""
        if o.data.get("host"):
            trig = f" after a request for Host {o.data['host']}"
        return Hit(
            [o],
            f"{where} flow to {o.address}{trig}: packet {inj.get('packet')} was injected "
            f"({kind}): {inj.get('reason', 'inconsistent with the server')}.",
            detail=detail,
        )
    return None


# --- DNS -----------------------------------------------------------------------------------------
def _dns_injected(f: Facts) -> Hit | None:
    for o in f.probe_dns:
        responses = o.data.get("responses") or []
        sets = {tuple(sorted(r.get("addresses") or [])) for r in responses if r.get("addresses")}
        inj = o.data.get("injected") or {}
        if len(sets) > 1 or inj.get("kind") == STEP_DNS:
            shown = " vs ".join(",".join(s) or "-" for s in sorted(sets))
            return Hit(
                [o],
                f"One query for {o.domain} to {o.data.get('resolver')} got {len(responses)} answers "
                f"with different addresses ({shown}): the first was forged on-path.",
            )
    return None


def _dns_led(f: Facts, addr: str) -> bool:
    """``addr`` came from DNS alone: unlike the reference, or given by only some probe resolvers."""
    return addr in f.suspect_addresses or (
        len(f.probe_resolvers) > 1 and 0 < len(f.resolved_by.get(addr, ())) < len(f.probe_resolvers))


def _dns_blockpage(f: Facts) -> Hit | None:
    """A blockpage served from an address that DNS handed out and the reference does not, or
    reached by a redirect that such an address answered."""
    for o in f.blockpages:
        start: Observation | None = o
        if hop_of(o) >= 1 and not f.hop:
            # Another name's address (a redirect, or a peek that followed one): DNS led there
            # only if the chain began at a DNS-led address.
            start = next((h for h in f.observations if h.vantage == PROBE and h.step == STEP_HTTP and h.ok
                          and h.purpose in (MEASURE, PEEK) and hop_of(h) == 0 and h.data.get("redirect_to")
                          and _dns_led(f, h.address or "")), None)
        if start is None:
            continue
        addr = start.address or ""
        if _dns_led(f, addr):
            dns = f.dns_obs_for({addr})
            who = ", ".join(sorted(f.resolved_by.get(addr, {"?"})))
            via = f", which redirects to {o.domain}" if start is not o else ""
            return Hit(
                [*dns, *([start] if start is not o else []), o],
                f"Resolver {who} answered {addr} for {f.domain}{via}, which serves the blockpage "
                f"'{o.data['blockpage']}'.",
            )
    return None


def _dns_fingerprint(f: Facts) -> Hit | None:
    """A probe resolver answered an address known to serve blockpages (location_found=dns)."""
    for o, name in f.dns_fingerprinted:
        addrs = [a for a in o.data.get("addresses") or [] if a not in f.control_addresses]
        if not addrs:
            continue  # control gets the same address: the fingerprint, not the resolver, is wrong
        return Hit([o], f"Resolver {o.data.get('resolver')} answered {', '.join(addrs)} for {f.domain}, "
                        f"an address known to serve a blockpage (fingerprint '{name}').")
    return None


def _dns_failure(f: Facts) -> Hit | None:
    """Some probe resolver fails while control, or another validated resolver, resolves."""
    failed = [o for o in f.probe_dns if o.failure in DNS_FAILURES]
    if not failed:
        return None
    reference = f.control_resolves or bool(f.valid_addresses)
    if not reference:
        return None
    if not _enough(failed) and all(o.failure == E.TIMEOUT for o in failed):
        return None
    failure = dominant_failure(failed)
    who = ", ".join(sorted({str(o.data.get("resolver")) for o in failed}))
    ref = "control resolves it" if f.control_resolves else "another resolver's answer validated"
    conf = 0.9 if f.control_resolves else 0.7
    return Hit(failed, f"Resolver {who} answered {failure} for {f.domain}, while {ref}.",
               detail=f"dns.{_suffix(failure)}", confidence=conf)


def _dns_ghost(f: Facts) -> Hit | None:
    """A resolver answers for a name that control (or an encrypted resolver) says does not exist."""
    if not f.probe_addresses or f.control_resolves:
        return None
    nx_control = [o for o in f.control_dns if o.failure == E.DNS_NXDOMAIN]
    nx_doh = [o for o in f.probe_dns if o.failure == E.DNS_NXDOMAIN and o.data.get("transport") == "doh"]
    if not (nx_control or nx_doh):
        return None
    answering = [o for o in f.probe_dns if o.ok]
    who = ", ".join(sorted({str(o.data.get("resolver") or "system") for o in answering}))
    by = "control" if nx_control else "DNS-over-HTTPS"
    return Hit([*answering, *(nx_control or nx_doh)],
               f"Resolver {who} answered {', '.join(sorted(f.probe_addresses))} for {f.domain}, a name that "
               f"{by} says does not exist (NXDOMAIN).")


def _dns_bogon(f: Facts) -> Hit | None:
    bogons = {a for a in f.suspect_addresses if is_bogon(a)}
    # Only meaningful when the genuine answer is not itself a bogon (a loopback test network
    # or a lab on private space makes every answer "bogon"; there it is plain poisoning).
    if not bogons or all(is_bogon(a) for a in f.reference_addresses):
        return None
    dns = f.dns_obs_for(bogons)
    return Hit(dns, f"{f.domain} resolved to the bogon address(es) {', '.join(sorted(bogons))}, "
                    "which control does not give.")


def _dns_poisoned(f: Facts) -> Hit | None:
    """Resolved addresses unlike control's, none of which proves genuine by TLS or by serving."""
    suspect = f.suspect_addresses
    if not suspect:
        return None
    # An address that serves the site over HTTPS with a valid certificate is genuine (CDN,
    # geo-DNS): suspect addresses never validated, by construction.  The site is blocked by DNS
    # only if every address the probe would really use (from some resolver) is suspect, or if a
    # resolver gave *only* suspect addresses.
    bad_resolvers = [
        o for o in f.probe_dns if o.ok and o.data.get("addresses") and set(o.data["addresses"]) <= suspect
    ]
    if not bad_resolvers:
        return _dns_led_diff(f)
    flows = [o for o in f.probe_tls + f.probe_tls_check + f.probe_http + f.probe_tcp if o.address in suspect]
    why = []
    for o in flows:
        if o.step == STEP_TLS and o.ok and o.data.get("cert_valid") is False:
            why.append(f"its certificate fails validation ({o.data.get('cert_failure')})")
        elif not o.ok:
            why.append(f"{o.step} to it fails ({o.failure})")
    reason = f"; {why[0]}" if why else ""
    ref = "control" if f.control_resolves else "the other resolver"
    who = ", ".join(sorted({str(o.data.get('resolver')) for o in bad_resolvers}))
    return Hit([*bad_resolvers, *flows[:4]],
               f"Resolver {who} answered {', '.join(sorted(suspect))} for {f.domain}, unlike {ref}"
               f"{reason}.", confidence=0.85 if f.control_resolves else 0.7)


def _dns_led_diff(f: Facts) -> Hit | None:
    """A page unlike control's, fetched from an address that only DNS vouches for.

    The address is unlike control's and no handshake validated it, so the different page is
    DNS's doing, not DPI's (dpi.http_diff needs an address control agrees with)."""
    ctl = next((o for o in f.control_http if o.ok), None)
    if ctl is None:
        return None
    for o in f.probe_http_ok:
        if o.address in f.suspect_addresses and not server_side_challenge(o) and not same_page(o, ctl):
            dns = f.dns_obs_for({o.address or ""})
            who = ", ".join(sorted(f.resolved_by.get(o.address or "", {"?"})))
            return Hit([*dns, o, ctl], f"Resolver {who} answered {o.address} for {f.domain}, unlike control and "
                                       f"never validated by TLS; the page there ({_page(o)}) differs from "
                                       f"control's ({_page(ctl)}).", confidence=0.8)
    return None


def _page(o: Observation) -> str:
    return (f"status {o.data.get('status')}, title '{o.data.get('title') or ''}', "
            f"{o.data.get('body_length')} bytes{' (capped)' if o.data.get('truncated') else ''}")


# --- TLS interception ----------------------------------------------------------------------------
def _mitm(f: Facts) -> Hit | None:
    for o in f.probe_tls:
        if not o.ok or o.data.get("cert_valid") is not False:
            continue
        issuer = str(o.data.get("issuer") or "")
        national = any(ca.lower() in issuer.lower() for ca in f.context.interception_cas)
        control_ok = f.control_tls_ok(o.address) or (f.control_tls_ok() and o.address in f.control_addresses)
        if national or control_ok:
            flag = " — a known national interception CA" if national else ""
            ctl = "; control's certificate validates" if control_ok else ""
            return Hit([o], f"TLS to {o.address} with SNI {f.domain} presented a certificate issued by "
                            f"'{issuer}'{flag} that does not validate ({o.data.get('cert_failure')}){ctl}.",
                       confidence=0.95 if national else 0.85)
    return None


# --- redirect chains ------------------------------------------------------------------------------
#: The step whose failure broke a chain -> the mechanism that failure points to.
_CHAIN_MECHANISM = {STEP_DNS: "dns", STEP_TCP: "ip", STEP_TLS: "dpi", STEP_HTTP: "dpi"}


#: The DNS rules a redirect hop is judged by, as the target URL is (in the same order).
def _hop_dns_checks() -> tuple[tuple[Callable[[Facts], Hit | None], str], ...]:
    return ((_dns_blockpage, "dns.blockpage"), (_dns_fingerprint, "dns.blockpage"), (_dns_failure, "dns.nxdomain"),
            (_dns_bogon, "dns.bogon"), (_dns_poisoned, "dns.poisoned"))


def _redirect_dns(f: Facts) -> Hit | None:
    """DNS at a later hop, judged as at the target URL: a resolver that fails, or whose answer
    leads to a blockpage or to an address unlike control's, for the name the page redirects to.

    The chain may still have completed through another resolver's answer (a hop is fetched at
    the first answer given): the ISP resolver's lie about that hop's name is blocking all the
    same, as it is at hop 0.  Needs control's lookups of the hop's name (an OONI control that
    reports only the chain's outcome falls back to where the chain broke)."""
    start = next((o for o in f.probe_http if o.data.get("redirect_to")), None)
    for k in f.hops(PROBE):
        if k < 1:
            continue
        h = f.at_hop(k)
        if not h.control_dns:
            continue
        for check, detail in _hop_dns_checks():
            hit = check(h)
            if hit is None:
                continue
            return Hit([*([start] if start else []), *hit.observations],
                       f"{f.domain} redirects to {h.domain} (hop {k}): {hit.sentence}",
                       detail=hit.detail or detail, confidence=hit.confidence)
    return _redirect("dns")(f)


def _redirect(mechanism: str) -> Callable[[Facts], Hit | None]:
    def check(f: Facts) -> Hit | None:
        got = f.redirect_break
        if got is None:
            return None
        k, failed = got
        first = min(failed, key=lambda o: (_STEP_ORDER.get(o.step, 9), o.t_start))
        if _CHAIN_MECHANISM.get(first.step) != mechanism:
            return None
        same = [o for o in failed if o.step == first.step]
        if not f.control_completes_chain(k):
            return None
        if first.step == STEP_DNS:
            # An NXDOMAIN is an answer; a timeout must be seen again (as for dns.failure).
            if first.failure not in DNS_FAILURES or (first.failure == E.TIMEOUT and not _enough(same)):
                return None
        elif not (first.failure in INTERFERENCE or first.step == STEP_TCP) or not _enough(same):
            return None
        prefix = {STEP_DNS: "dns.", STEP_TCP: "ip.tcp_", STEP_TLS: "dpi.tls_", STEP_HTTP: "dpi.http_"}[first.step]
        detail = f"{prefix}{_suffix(first.failure)}"
        start = next((o for o in f.probe_http if o.data.get("redirect_to") or o.data.get("redirects")), None)
        where = f" {first.address}" if first.address else ""
        ctl = f.final_pages(CONTROL)[:1]
        return Hit([*([start] if start else []), *same, *ctl],
                   f"{f.domain} redirects to {first.domain}; at hop {k} the {first.step.upper()} step to "
                   f"{first.domain}{where} failed ({first.failure}) {_times(same)}, while control followed "
                   "the same chain to the page.", detail=detail)
    return check


_STEP_ORDER = {STEP_DNS: 0, STEP_TCP: 1, STEP_TLS: 2, STEP_HTTP: 3}


# --- TCP -----------------------------------------------------------------------------------------
def _tcp_all_fail(f: Facts) -> list[Observation] | None:
    """Probe TCP failed at every address it tried (and none worked)."""
    if not f.probe_tcp or f.tcp_ok_addresses:
        return None
    return list(f.probe_tcp)


def _tcp_blocked(f: Facts) -> Hit | None:
    obs = _tcp_all_fail(f)
    if not obs or not _enough(obs):
        return None
    addrs = sorted({o.address or "" for o in obs})
    control = [a for a in addrs if f.control_connects(a)]
    if not control and not (f.control_http_ok and set(addrs) & f.control_addresses):
        return None
    failure = dominant_failure(obs)
    return Hit(obs, f"TCP connect to {', '.join(addrs)} failed ({failure}) {_times(obs)}, while control "
                    "connects to the same address.", detail=f"ip.tcp_{_suffix(failure)}")


# --- TLS -----------------------------------------------------------------------------------------
def _tls_interfered(f: Facts) -> tuple[list[Observation], list[Observation]] | None:
    """TLS with the target SNI failed by interference at every address where TCP worked.

    Returns (target-SNI attempts, follow-up attempts at those addresses)."""
    if f.probe_http_ok or not f.probe_tls:
        return None
    by_addr = {o.address for o in f.probe_tls}
    if any(o.ok for o in f.probe_tls):
        return None
    if not all(o.failure in INTERFERENCE for o in f.probe_tls):
        return None
    follow = [o for o in f.probe_tls_followup if o.address in by_addr]
    return list(f.probe_tls), follow


def _tls_dpi(f: Facts) -> Hit | None:
    got = _tls_interfered(f)
    if not got:
        return None
    tls, follow = got
    ok_follow = [o for o in follow if o.ok]
    if not ok_follow or not _enough(tls):
        return None
    failure = dominant_failure(tls)
    addr = tls[0].address
    sni = ok_follow[0].data.get("sni", "a control name")
    ctl = ""
    conf = 0.9
    if f.control_tls_ok() or f.control_http_ok:
        ctl, conf = "; control completed", 0.95
    return Hit([*tls, *ok_follow], f"TLS to {addr} with SNI {f.domain} failed ({failure}) {_times(tls)}; "
                                   f"the same address with SNI {sni} completed{ctl}.",
               detail=f"dpi.tls_{_suffix(failure)}", confidence=conf)


def _tls_dpi_control_only(f: Facts) -> Hit | None:
    """No follow-up was made (e.g. an OONI import), but control's handshake to the address completed."""
    got = _tls_interfered(f)
    if not got:
        return None
    tls, follow = got
    if follow:
        return None
    addrs = {o.address for o in tls}
    if not any(f.control_tls_ok(a) for a in addrs if a):
        return None
    if not _enough(tls) and tls[0].failure != E.CONNECTION_RESET:
        return None
    failure = dominant_failure(tls)
    return Hit(tls, f"TCP to {tls[0].address} worked but TLS with SNI {f.domain} failed ({failure}) "
                    f"{_times(tls)}, while control's handshake to the same address completed.",
               detail=f"dpi.tls_{_suffix(failure)}", confidence=0.75)


def _tls_ip(f: Facts) -> Hit | None:
    got = _tls_interfered(f)
    if not got:
        return None
    tls, follow = got
    if not follow or any(o.ok for o in follow) or not _enough(tls):
        return None
    if not (f.control_tls_ok() or f.control_http_ok):
        return None
    failure = dominant_failure(tls)
    return Hit([*tls, *follow], f"TLS to {tls[0].address} failed ({failure}) with SNI {f.domain} and with "
                                "a benign SNI too, while control completed: the address is blocked.",
               detail=f"ip.tls_{_suffix(failure)}", confidence=0.8)


# --- HTTP ----------------------------------------------------------------------------------------
def _http_interfered(f: Facts) -> tuple[list[Observation], list[Observation]] | None:
    if f.probe_http_ok or f.blockpages or not f.probe_http:
        return None
    if not all(o.failure in INTERFERENCE for o in f.probe_http):
        return None
    # The TLS layer (when there is one) completed: the failure is at HTTP.
    if f.probe_tls and not any(o.ok for o in f.probe_tls):
        return None
    addrs = {o.address for o in f.probe_http}
    follow = [o for o in f.probe_http_followup if o.address in addrs]
    return list(f.probe_http), follow


#: The target's wire rate must be this many times below the benign follow-up's to be throttling.
THROTTLE_RATIO = 4.0
#: Below this a completed download counts as slow (for ok.slow's sentence to be true).
SLOW_RATE = 100 * 1024


def _throttle_pair(f: Facts) -> tuple[Observation, float, Observation, float] | None:
    """(target response, its rate, follow-up on the same address, its rate), when both were sampled."""
    # A body that completed or stalled (a reset mid-body is interference of another kind).
    target = f.rate(o for o in f.probe_http if o.data.get("status") and not o.data.get("blockpage")
                    and o.failure in (None, E.TIMEOUT))
    if target is None:
        return None
    t_rate, t_obs = target
    follow = f.rate((o for o in f.probe_http_followup if o.address == t_obs.address), lower_bound=True)
    if follow is None:
        return None
    return t_obs, t_rate, follow[1], follow[0]


def _control_full_rate(f: Facts, t_rate: float) -> bool:
    """Control downloaded the body: completed, and (when it sampled) not itself slowed to our rate."""
    ok = [o for o in f.control_http if o.ok]
    if not ok:
        return False
    rated = f.rate(ok, lower_bound=True)
    return rated is None or rated[0] >= THROTTLE_RATIO * t_rate


def _rate(r: float) -> str:
    return f"{r / 1024:.1f} KiB/s" if r < 1024 * 1024 else f"{r / 1024 / 1024:.1f} MiB/s"


def _throttled(f: Facts) -> Hit | None:
    got = _throttle_pair(f)
    if got is None:
        return None
    t_obs, t_rate, fu, fu_rate = got
    if fu_rate < THROTTLE_RATIO * max(t_rate, 1.0) or not _control_full_rate(f, t_rate):
        return None
    ratio = fu_rate / max(t_rate, 1.0)
    ctl = next(o for o in f.control_http if o.ok)
    kind = _name_kind(t_obs)
    # The live https follow-up changes only the SNI (its Host stays the target's): name what changed.
    benign = (fu.data.get("sni") if kind == "SNI" else None) or fu.data.get("host") or "a benign name"
    return Hit([t_obs, fu, ctl], f"The body from {t_obs.address} with {kind} {f.domain} came at "
                                 f"{_rate(t_rate)}, {ratio:.0f}× slower than from the same address with "
                                 f"{kind} {benign} "
                                 f"({_rate(fu_rate)}); control downloaded it at full rate.",
               confidence=0.85)


def _name_kind(o: Observation) -> str:
    return "SNI" if str(o.data.get("url") or "").startswith("https") else "Host"


def _slow_everywhere(f: Facts) -> Hit | None:
    """The target and the benign follow-up on the same address are both slow: the path, not the name."""
    got = _throttle_pair(f)
    if got is None:
        return None
    t_obs, t_rate, fu, fu_rate = got
    if fu_rate >= THROTTLE_RATIO * max(t_rate, 1.0):
        return None
    if t_obs.ok and t_rate >= SLOW_RATE:
        return None  # not slow at all
    return Hit([t_obs, fu], f"{t_obs.address} sent {f.domain}'s body at {_rate(t_rate)} and the same address "
                            f"with a benign name at {_rate(fu_rate)}: slow, but not for this name.",
               confidence=0.7)


def _throttle_unconfirmed(f: Facts) -> Hit | None:
    """Headers arrived, then the body timed out, and no follow-up can tell throttling from a slow path."""
    if f.probe_http_ok or not f.probe_http:
        return None
    slow = [o for o in f.probe_http if o.failure == E.TIMEOUT and o.data.get("status")]
    if not slow or len(slow) != len(f.probe_http):
        return None
    o = slow[0]
    ctl = " while control downloaded it" if f.control_http_ok else ""
    return Hit(slow, f"{f.domain} answered (status {o.data.get('status')}) but the body timed out{ctl}; "
                     "with no follow-up on the same address, throttling cannot be told from a slow path.",
               confidence=0.4)


def _http_dpi(f: Facts) -> Hit | None:
    got = _http_interfered(f)
    if not got:
        return None
    http, follow = got
    ok_follow = [o for o in follow if o.ok]
    if not ok_follow or not _enough(http):
        return None
    failure = dominant_failure(http)
    host = ok_follow[0].data.get("host", "a control name")
    conf = 0.95 if f.control_http_ok else 0.9
    return Hit([*http, *ok_follow], f"HTTP to {http[0].address} with Host {f.domain} failed ({failure}) "
                                    f"{_times(http)}; the same address with Host {host} answered.",
               detail=f"dpi.http_{_suffix(failure)}", confidence=conf)


def _http_dpi_control_only(f: Facts) -> Hit | None:
    got = _http_interfered(f)
    if not got:
        return None
    http, follow = got
    if follow or not f.control_http_ok:
        return None
    if not f.valid_addresses and not (f.probe_addresses & f.control_addresses):
        return None
    if not _enough(http) and http[0].failure != E.CONNECTION_RESET:
        return None
    failure = dominant_failure(http)
    return Hit(http, f"HTTP to {http[0].address} with Host {f.domain} failed ({failure}) {_times(http)}, "
                     "while control fetched the page.", detail=f"dpi.http_{_suffix(failure)}", confidence=0.75)


def _dpi_blockpage(f: Facts) -> Hit | None:
    if not f.blockpages:
        return None
    o = f.blockpages[0]
    return Hit([o], f"HTTP to {o.address} for {f.domain} returned the blockpage '{o.data['blockpage']}' "
                    f"(status {o.data.get('status')}).", confidence=0.9)


#: Server-side challenges (CDN bot checks, CAPTCHAs): a different page, but the site's own doing.
CHALLENGE_HEADERS = ("cf-ray", "cf-mitigated", "x-amz-cf-id", "akamai-grn", "x-sucuri-id")
CHALLENGE_TITLES = ("just a moment", "attention required", "access denied", "captcha")


def server_side_challenge(o: Observation) -> bool:
    headers = {k.lower() for k in (o.data.get("headers") or {})}
    title = str(o.data.get("title") or "").lower()
    return o.data.get("status") in (403, 429, 503) and (
        bool(headers & set(CHALLENGE_HEADERS)) or any(t in title for t in CHALLENGE_TITLES))


def same_page(o: Observation, ctl: Observation) -> bool:
    """The probe's page may be control's: same status and (same title, or lengths that agree).

    A capped body's length is only a lower bound of the page's: it shows a difference only when
    the other, complete, body is much shorter than it.  Two capped bodies agree on length."""
    if o.data.get("status") != ctl.data.get("status"):
        return False
    if o.data.get("redirect_to") or ctl.data.get("redirect_to"):
        # A redirect is where it sends: the same site sends to the same host.
        return _host(o.data.get("redirect_to")) == _host(ctl.data.get("redirect_to"))
    pt, ct = str(o.data.get("title") or "").strip(), str(ctl.data.get("title") or "").strip()
    if pt == ct:
        return True
    return _lengths_agree(o, ctl)


def _host(url: object) -> str:
    return (urlsplit(url).hostname or "") if isinstance(url, str) else ""


def _lengths_agree(a: Observation, b: Observation) -> bool:
    alen, blen = a.data.get("body_length") or 0, b.data.get("body_length") or 0
    acap, bcap = bool(a.data.get("truncated")), bool(b.data.get("truncated"))
    if acap and bcap:
        return True
    if acap or bcap:
        capped, whole = (alen, blen) if acap else (blen, alen)
        return whole >= 0.7 * capped
    ratio = min(alen, blen) / max(alen, blen) if max(alen, blen) else 1.0
    return ratio > 0.7


def _http_diff(f: Facts) -> Hit | None:
    """The page differs materially from control's, at an address control agrees with."""
    if not f.probe_http_ok or not f.control_http_ok:
        return None
    if any(server_side_challenge(o) for o in f.probe_http_ok):
        return None
    # A target given by address (tor-dir://IP:PORT, http://IP/) is fetched at that address by both:
    # they agree by construction, with no DNS to show it.
    if not (f.probe_addresses & f.control_addresses) and not f.valid_addresses and not is_ip(f.domain):
        return None
    final = f.final_pages(CONTROL)[0]
    # Pages from suspect addresses are DNS's doing (dns.poisoned comes first); judge the others.
    pages = [o for o in f.final_pages(PROBE) if o.address not in f.suspect_addresses]
    if not pages:
        return None
    differ = []
    for o in pages:
        # Like with like: a probe whose chain ends at a redirect (a capture, where the next hop is
        # ciphertext or absent) is compared with control's response at that same hop, not with
        # the page control's chain ended on.
        ctl = (f.control_page_at(hop_of(o)) if o.data.get("redirect_to") else None) or final
        if same_page(o, ctl):
            return None
        differ.append((o, ctl))
    o, ctl = differ[0]
    return Hit([o, ctl], f"The page at {o.address} ({_page(o)}) differs from control's ({_page(ctl)}).",
               confidence=0.5)


# --- success, down, inconclusive -------------------------------------------------------------------
def _ok(f: Facts) -> Hit | None:
    if not f.probe_http_ok:
        return None
    o = f.final_pages(PROBE)[0] if f.final_pages(PROBE) else f.probe_http_ok[0]
    via = f" via {o.address}" if o.address else ""
    checked = " (address validated by TLS)" if o.address in f.valid_addresses else ""
    conf = 0.95 if f.control_http_ok or o.address in f.valid_addresses else 0.8
    return Hit([o], f"Fetched {o.data.get('url') or f.target}{via}{checked}: status {o.data.get('status')}, "
                    f"title '{o.data.get('title') or ''}'.", confidence=conf)


def _ok_tls(f: Facts) -> Hit | None:
    """No HTTP step (e.g. OONI TLS-only measurement) but a valid handshake with SNI = domain."""
    if f.probe_http:
        return None
    good = [o for o in f.probe_tls if o.ok and o.data.get("cert_valid") is not False]
    if not good:
        return None
    return Hit(good[:1], f"TLS to {good[0].address} with SNI {f.domain} completed.", confidence=0.7)


def _down(f: Facts) -> Hit | None:
    if not f.control_fails_site:
        return None
    if f.probe_http_ok:
        return None
    probe_fail = [o for o in f.observations if o.vantage == PROBE and not o.ok]
    control = [o for o in f.observations if o.vantage == CONTROL and not o.ok]
    what = dominant_failure(control) or "failure"
    return Hit([*probe_fail[:4], *control[:4]], f"{f.domain} fails from the probe and from control too "
                                               f"(control: {what}): the site is down, not blocked.")


def _dns_down(f: Facts) -> Hit | None:
    """The name does not resolve anywhere (probe and control agree)."""
    failed = [o for o in f.probe_dns if o.failure]
    if not failed or f.probe_addresses:
        return None
    if f.control_dns and not f.control_resolves and f.control_dns_failures & DNS_FAILURES:
        return Hit(failed + f.control_dns, f"{f.domain} does not resolve from the probe "
                                           f"({dominant_failure(failed)}) nor from control.")
    return None


def _inconclusive(f: Facts) -> Hit | None:
    bad = [o for o in f.observations if o.vantage == PROBE and not o.ok]
    if not f.observations:
        return Hit([], "No observation was made for this target.")
    if not bad:
        return Hit([], "No step failed, but nothing was fetched either.")
    first = bad[0]
    ctl = ("control could not say" if f.has_control else "there is no control to compare with")
    return Hit(bad[:6], f"{first.step} to {first.address or first.domain} failed ({first.failure}) "
                        f"{_times([o for o in f.observations if o.step == first.step and o.vantage == PROBE])}, "
                        f"but {ctl}.", detail=_inconclusive_detail(bad))


def _inconclusive_detail(bad: list[Observation]) -> str:
    o = bad[0]
    prefix = {STEP_DNS: "dns", STEP_TCP: "ip.tcp", STEP_TLS: "tls", STEP_HTTP: "http"}.get(o.step, o.step)
    return f"{prefix}_{_suffix(o.failure)}" if "." in prefix else f"{prefix}.{_suffix(o.failure)}"


RULES: tuple[Rule, ...] = (
    Rule("vantage.no_network", INCONCLUSIVE, None, "vantage.no_network", 1.0, _no_network,
         "The vantage point has no network: never blame the site."),
    Rule("control.rejected", INCONCLUSIVE, None, "control.rejected", 0.3, _control_rejected,
         "Control's answer failed the wire contract: no trustworthy contrast."),
    Rule("pcap.injected", BLOCKED, "dpi", "dpi.injected", 0.9, _injected_flow,
         "A packet on the flow was injected (TTL / IP-ID unlike the server's)."),
    Rule("dns.injected", BLOCKED, "dns", "dns.injected", 0.9, _dns_injected,
         "One query got several answers with different addresses."),
    Rule("dns.blockpage", BLOCKED, "dns", "dns.blockpage", 0.95, _dns_blockpage,
         "DNS led to an address serving a blockpage."),
    Rule("dns.fingerprint", BLOCKED, "dns", "dns.blockpage", 0.9, _dns_fingerprint,
         "A probe resolver answers an address that a DNS fingerprint names as a blockpage server."),
    Rule("dns.failure", BLOCKED, "dns", "dns.nxdomain", 0.9, _dns_failure,
         "A probe resolver fails (NXDOMAIN, SERVFAIL, no answer, timeout) while control resolves."),
    Rule("dns.ghost", BLOCKED, "dns", "dns.ghost", 0.85, _dns_ghost,
         "A resolver answers for a name that control or DoH says does not exist."),
    Rule("dns.bogon", BLOCKED, "dns", "dns.bogon", 0.9, _dns_bogon,
         "A probe resolver answers a bogon address that control does not give."),
    Rule("dns.poisoned", BLOCKED, "dns", "dns.poisoned", 0.85, _dns_poisoned,
         "A probe resolver answers only addresses that control does not give and that do not validate."),
    Rule("dns.down", DOWN, None, "dns.nxdomain", 0.9, _dns_down,
         "The name resolves neither at the probe nor at control."),
    Rule("tls.mitm", BLOCKED, "dpi", "dpi.tls_mitm", 0.9, _mitm,
         "The certificate does not validate while control's does, or a national interception CA issued it."),
    Rule("redirect.dns", BLOCKED, "dns", "dns.nxdomain", 0.8, _redirect_dns,
         "The page redirects; DNS for a later hop's name fails, or leads elsewhere than control's, "
         "judged as for the target's own name."),
    Rule("redirect.ip", BLOCKED, "ip", "ip.tcp_timeout", 0.8, _redirect("ip"),
         "The page redirects; TCP to a later hop fails while control follows the chain."),
    Rule("redirect.dpi", BLOCKED, "dpi", "dpi.tls_reset", 0.8, _redirect("dpi"),
         "The page redirects; TLS or HTTP at a later hop is interfered with while control follows the chain."),
    Rule("ip.tcp", BLOCKED, "ip", "ip.tcp_timeout", 0.85, _tcp_blocked,
         "TCP to every address fails (twice for timeouts) while control connects."),
    Rule("dpi.tls_followup", BLOCKED, "dpi", "dpi.tls_reset", 0.9, _tls_dpi,
         "TLS with the target SNI fails; the same address with a benign SNI completes."),
    Rule("dpi.tls_control", BLOCKED, "dpi", "dpi.tls_reset", 0.75, _tls_dpi_control_only,
         "TLS with the target SNI fails after TCP worked; control's handshake completes (no follow-up)."),
    Rule("ip.tls_followup", BLOCKED, "ip", "ip.tls_reset", 0.8, _tls_ip,
         "TLS fails with the target SNI and a benign SNI alike, while control completes."),
    Rule("dpi.blockpage", BLOCKED, "dpi", "dpi.blockpage", 0.9, _dpi_blockpage,
         "The HTTP response matches a blockpage fingerprint."),
    Rule("dpi.throttled", BLOCKED, "dpi", "dpi.throttled", 0.85, _throttled,
         "The body comes far slower than from the same address with a benign SNI/Host; control is at full rate."),
    Rule("ok.slow", OK, None, "ok.slow", 0.7, _slow_everywhere,
         "The target and the benign follow-up on the same address are equally slow: the path, not the name."),
    Rule("throttle.unconfirmed", INCONCLUSIVE, None, "inconclusive.throttled", 0.4, _throttle_unconfirmed,
         "Headers arrived, then the body timed out, with no follow-up to tell throttling from a slow path."),
    Rule("dpi.http_followup", BLOCKED, "dpi", "dpi.http_reset", 0.9, _http_dpi,
         "HTTP with Host = target fails; the same address with a benign Host answers."),
    Rule("dpi.http_control", BLOCKED, "dpi", "dpi.http_reset", 0.75, _http_dpi_control_only,
         "HTTP with Host = target fails at a consistent address; control fetched the page."),
    Rule("dpi.http_diff", BLOCKED, "dpi", "dpi.http_diff", 0.5, _http_diff,
         "The page differs materially from control's."),
    Rule("ok.http", OK, None, None, 0.9, _ok, "The page was fetched."),
    Rule("ok.tls", OK, None, None, 0.7, _ok_tls, "A valid TLS handshake with the target SNI completed."),
    Rule("down.everyone", DOWN, None, "down", 0.85, _down, "Probe and control both fail."),
    Rule("inconclusive", INCONCLUSIVE, None, "inconclusive", 0.3, _inconclusive,
         "Failures without a contrast (no control, no follow-up, or a lone timeout)."),
)

RULES_BY_ID = {r.id: r for r in RULES}
