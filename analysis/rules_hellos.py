"""Rules on the ClientHello contrast (issue 15): TLS-fingerprint DPI, and Tor OR ports.

The probe sends a second handshake to an address whose handshake failed by interference: same
address, same SNI, the other ClientHello (probes/hellos.py: Tor-like against browser-like, or the
default hello against the browser-like one).  Observations say which hello they sent in
``data["hello"]`` (absent: the default).

Precedence: ``dpi.tls_fingerprint`` comes before ``dpi.tls_followup``, ``dpi.tls_control`` and
``ip.tls_followup``.  Those compare a *name* (target SNI against a benign one) or an address; when
the same name on the same address completes with one hello and not with the other, and the
failing hello fails with the benign SNI too, neither the name nor the address is what is blocked:
a box that keys on the fingerprint also resets the benign-SNI follow-up (it sends the same hello),
which ``ip.tls_followup`` would take for an address block.  When the benign-SNI follow-up with the
failing hello completes, the name is blocked (``dpi.tls_followup``) whatever the other hello did.
DNS, TCP and kind rules stay first: a wrong address or a refused port explains every later failure.

``tor-or://`` targets have no name: their TLS steps carry a random Tor-like SNI, so the URL TLS
rules (which read handshakes with SNI = the target's domain) never see them, and the two rules
for them live here too.
"""

from __future__ import annotations

from collections import defaultdict
from urllib.parse import urlsplit

from kzprobe.analysis.facts import INTERFERENCE, Facts, dominant_failure
from kzprobe.analysis.rules import Hit, Rule, _enough, _suffix, _times
from kzprobe.model import BLOCKED, FOLLOWUP, INCONCLUSIVE, MEASURE, OK, PROBE, STEP_TLS, Observation

TOR_OR = "tor-or"
DEFAULT, BROWSER, TOR = "default", "browser", "tor"
_HELLO_NAMES = {TOR: "Tor-like", BROWSER: "browser-like", DEFAULT: "default (OpenSSL's)"}
_VERBS = {"reset": "was reset", "timeout": "timed out", "eof": "was cut off (EOF)"}


def hello_of(o: Observation) -> str:
    h = o.data.get("hello")
    return h if isinstance(h, str) and h else DEFAULT


def _is_tor_or(f: Facts) -> bool:
    return "://" in f.target and urlsplit(f.target).scheme.lower() == TOR_OR


def _probe_handshakes(f: Facts) -> dict[tuple[str, str], list[Observation]]:
    """The probe's TLS steps (measurement and follow-ups) per (address, SNI)."""
    out: dict[tuple[str, str], list[Observation]] = defaultdict(list)
    for o in f.observations:
        if o.step == STEP_TLS and o.vantage == PROBE and o.purpose in (MEASURE, FOLLOWUP) and o.address:
            out[(o.address, str(o.data.get("sni") or o.domain))].append(o)
    return out


def _control_says(f: Facts, address: str) -> bool | None:
    """Did control complete a handshake (at the address, else anywhere) or fetch the page?"""
    for ok in (f.control_tls_ok(address), f.control_tls_ok(), f.control_http_ok):
        if ok is not None:
            return ok
    return None


def _control_evidence(f: Facts, address: str) -> list[Observation]:
    """The control step a verdict's "control completed" rests on (as :func:`_control_says` reads it)."""
    tls = [o for o in f.control_tls if o.ok and o.data.get("cert_valid") is not False]
    for o in (*[o for o in tls if o.address == address], *tls, *[o for o in f.control_http if o.ok]):
        return [o]
    return []


def _passes_with_another_name(handshakes: dict[tuple[str, str], list[Observation]], addr: str, sni: str,
                              hello: str) -> bool:
    """The same hello completed on the same address with another SNI (the benign-SNI follow-up):
    the name is part of what is blocked, so the contrast is the SNI's (``dpi.tls_followup``), and a
    browser-like hello passing with the name is a box that missed it, not one that reads fingerprints."""
    return any(o.ok and hello_of(o) == hello for (a, s), obs in handshakes.items() if a == addr and s != sni
               for o in obs)


def _fingerprint(f: Facts) -> Hit | None:
    """One ClientHello fails by interference at every attempt on an address while the other one,
    same address and same SNI, completes; control completes where control exists."""
    if f.probe_http_ok:
        return None
    handshakes = _probe_handshakes(f)
    for (addr, sni), obs in handshakes.items():
        by_hello: dict[str, list[Observation]] = defaultdict(list)
        for o in obs:
            by_hello[hello_of(o)].append(o)
        completed = {h: [o for o in lst if o.ok] for h, lst in by_hello.items()}
        for blocked, lst in by_hello.items():
            if completed[blocked] or not all(o.failure in INTERFERENCE for o in lst) or not _enough(lst):
                continue
            passed = next((h for h, ok in completed.items() if ok and h != blocked), None)
            if passed is None or _passes_with_another_name(handshakes, addr, sni, blocked):
                continue
            ctl = _control_says(f, addr)
            if ctl is False:
                return None
            failure = dominant_failure(lst)
            verb = _VERBS.get(_suffix(failure), f"failed ({failure})")
            tail = "; control completed" if ctl else " (no control to compare with)"
            return Hit([*lst, completed[passed][0], *(_control_evidence(f, addr) if ctl else [])],
                       f"TLS to {addr} with SNI {sni}: the {_HELLO_NAMES.get(blocked, blocked)} ClientHello "
                       f"{verb} ({_times(lst)}); the {_HELLO_NAMES.get(passed, passed)} one completed{tail}.",
                       confidence=0.95 if ctl else 0.85)
    return None


def _tor_tls_both(f: Facts) -> Hit | None:
    """An OR port where TCP works but every handshake fails by interference, whichever hello, while
    control's Tor-like handshake to the same port completes: the address is blocked past TCP."""
    if not _is_tor_or(f):
        return None
    for (addr, _sni), obs in _probe_handshakes(f).items():
        hellos = {hello_of(o) for o in obs}
        if len(hellos) < 2 or any(o.ok for o in obs) or not all(o.failure in INTERFERENCE for o in obs):
            continue
        measured = [o for o in obs if o.purpose == MEASURE]
        if not _enough(measured) or not f.control_tls_ok(addr):
            continue
        failure = dominant_failure(obs)
        return Hit([*obs, *_control_evidence(f, addr)],
                   f"TLS to the OR port {addr} failed ({failure}) with the Tor-like and the browser-like "
                   "ClientHello alike, while control's handshake completed: the address is blocked.",
                   detail=f"ip.tls_{_suffix(failure)}")
    return None


def _ok_tor_or(f: Facts) -> Hit | None:
    """A Tor-like handshake with the OR port completed (its certificate is not the question)."""
    if not _is_tor_or(f):
        return None
    done = [o for o in f.observations if o.step == STEP_TLS and o.vantage == PROBE and o.purpose == MEASURE
            and o.ok and hello_of(o) == TOR]
    if not done:
        return None
    o = done[0]
    return Hit([o], f"A Tor-like TLS handshake with the OR port {o.address}:{o.port} completed "
                    f"({o.data.get('version') or 'TLS'}, {o.data.get('cipher') or 'cipher unknown'}).")


def _tor_or_disagree(f: Facts) -> Hit | None:
    """An OR port the probe reached with some hello, while control's handshake failed: the vantages
    disagree, and neither "down" (the probe got through) nor "blocked" (control got nothing to
    contrast with) is what the observations say."""
    if not _is_tor_or(f):
        return None
    for (addr, _sni), obs in _probe_handshakes(f).items():
        passed = [o for o in obs if o.ok]
        if not passed or _control_says(f, addr) is not False:
            continue
        ctl = [o for o in f.control_tls if not o.ok and o.address == addr] or [o for o in f.control_tls if not o.ok]
        what = dominant_failure(ctl) or "failure"
        return Hit([passed[0], *ctl[:2]],
                   f"The probe completed a handshake with the OR port {addr} (the "
                   f"{_HELLO_NAMES.get(hello_of(passed[0]), hello_of(passed[0]))} ClientHello), but control's "
                   f"failed ({what}): the two vantages disagree, so nothing is concluded.")
    return None


HELLO_RULES: tuple[Rule, ...] = (
    Rule("dpi.tls_fingerprint", BLOCKED, "dpi", "dpi.tls_fingerprint", 0.9, _fingerprint,
         "Only one ClientHello fails on an address (same SNI) while the other completes: DPI reads the "
         "TLS fingerprint."),
    Rule("ip.tor_or_tls", BLOCKED, "ip", "ip.tls_reset", 0.8, _tor_tls_both,
         "An OR port fails the handshake with every hello while control's completes."),
    Rule("ok.tor_or", OK, None, None, 0.85, _ok_tor_or, "A Tor-like handshake with the OR port completed."),
    Rule("tor_or.disagree", INCONCLUSIVE, None, "inconclusive.control_differs", 0.3, _tor_or_disagree,
         "The probe reached the OR port with some hello while control's handshake failed."),
)


def join(base: tuple[Rule, ...], extra: tuple[Rule, ...] = HELLO_RULES, *, before: str = "dpi.tls_followup"
         ) -> tuple[Rule, ...]:
    """``base`` with ``extra`` inserted right before the rule ``before`` (see the module's precedence)."""
    at = [r.id for r in base].index(before)
    return (*base[:at], *extra, *base[at:])


__all__ = ["HELLO_RULES", "hello_of", "join"]
