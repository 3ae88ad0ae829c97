"""Rules for the target kinds beyond URLs (issue 15): tor-dir, obfs4, tcp, udp-dns, proxy+http.

Each rule here is guarded by the target's kind (its URL scheme), so it can never decide a URL
target; :func:`join` puts them into the one rule table (:data:`kzprobe.analysis.RULES`) right
after ``ip.tcp``.  What the generic rules already say right for the kinds stays theirs:

* an endpoint whose TCP connect is refused, reset or (twice) times out while control connects is
  ``ip.tcp`` (detail ``ip.tcp_refused`` / ``ip.tcp_timeout``), whatever the kind;
* a name that does not resolve, or resolves to a forged or bogon address, is the ``dns.*`` rules'
  (udp-dns targets are DNS steps only) -- but public answers that merely differ from control's
  are ``dns.unverified`` for udp-dns, and for tcp://NAME when they connect on the port
  (inconclusive: no handshake can tell geo-DNS from forgery);
* failure everywhere, control included, is ``down.everyone`` / ``dns.down``; no contrast at all is
  ``inconclusive``.

The rules below cover what the URL rules cannot see: a kind whose success is a TCP connect or a
DNS answer (no page is ever fetched), a proxy's CONNECT and the TLS through its tunnel, and a Tor
directory given by address (no DNS to tie the probe's address to control's).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from kzprobe.analysis.facts import INTERFERENCE, Facts, dominant_failure
from kzprobe.analysis.rules import Hit, Rule, _enough, _suffix, _times
from kzprobe.model import BLOCKED, CONTROL, DOWN, INCONCLUSIVE, MEASURE, OK, PROBE, STEP_HTTP, STEP_TLS, Observation

TOR_DIR, OBFS4, TCP, UDP_DNS, PROXY_HTTP = "tor-dir", "obfs4", "tcp", "udp-dns", "proxy+http"
_NAMES = {TOR_DIR: "Tor directory", OBFS4: "obfs4 bridge", TCP: "endpoint", PROXY_HTTP: "HTTP proxy"}


def kind_of(f: Facts) -> str:
    """The target's kind: its URL scheme ("url" for http/https, as ``model.Target.kind``)."""
    scheme = urlsplit(f.target).scheme.lower() if "://" in f.target else ""
    return "url" if scheme in ("", "http", "https") else scheme


def _connects(f: Facts, vantage: str) -> list[Observation]:
    """A proxy's CONNECT steps (HTTP steps with method CONNECT) from one vantage."""
    return [o for o in f.observations if o.step == STEP_HTTP and o.vantage == vantage
            and o.purpose == MEASURE and o.data.get("method") == "CONNECT"]


def _tunnelled(o: Observation) -> bool:
    status = o.data.get("status")
    return o.ok and isinstance(status, int) and 200 <= status < 300


def _probe_tunnel(f: Facts) -> Observation | None:
    """The probe's CONNECT that opened a tunnel, for a proxy+http target (else None)."""
    if kind_of(f) != PROXY_HTTP:
        return None
    return next((o for o in _connects(f, PROBE) if _tunnelled(o)), None)


def _tunnel_tls(f: Facts, vantage: str) -> list[Observation]:
    return [o for o in f.observations if o.step == STEP_TLS and o.vantage == vantage and o.purpose == MEASURE]


def _endpoint(o: Observation) -> str:
    return f"{o.address}:{o.port}" if o.port else str(o.address)


# --- proxy+http -----------------------------------------------------------------------------------------
def _proxy_connect(f: Facts) -> Hit | None:
    """The CONNECT through the proxy fails by interference (reset at once, a stall twice) while
    control's CONNECT through the same proxy opens a tunnel."""
    if kind_of(f) != PROXY_HTTP:
        return None
    probe = _connects(f, PROBE)
    if not probe or any(o.ok for o in probe) or not all(o.failure in INTERFERENCE for o in probe):
        return None
    ctl = [o for o in _connects(f, CONTROL) if _tunnelled(o)]
    if not ctl or not _enough(probe):
        return None
    failure = dominant_failure(probe)
    return Hit([*probe, ctl[0]], f"CONNECT {probe[0].data.get('connect_to')} through the proxy at "
                                 f"{_endpoint(probe[0])} failed ({failure}) {_times(probe)} after TCP connected, "
                                 f"while control's CONNECT through the same proxy got {ctl[0].data.get('status')}.")


def _proxy_tunnel(f: Facts) -> Hit | None:
    """The proxy opened the tunnel, but TLS through it (benign SNI) fails by interference while
    control's handshake through the same proxy completes: the proxied flow itself is cut."""
    tunnel = _probe_tunnel(f)
    if tunnel is None:
        return None
    tls = _tunnel_tls(f, PROBE)
    if not tls or any(o.ok for o in tls) or not all(o.failure in INTERFERENCE for o in tls) or not _enough(tls):
        return None
    ctl = [o for o in _tunnel_tls(f, CONTROL) if o.ok]
    if not ctl:
        return None
    failure = dominant_failure(tls)
    return Hit([tunnel, *tls, ctl[0]],
               f"The proxy at {_endpoint(tls[0])} opened a tunnel, but TLS through it with SNI "
               f"{tls[0].data.get('sni')} failed ({failure}) {_times(tls)}, while control's handshake through the "
               "same proxy completed.",
               detail=f"dpi.proxy_tls_{_suffix(failure)}")


def _ok_proxy(f: Facts) -> Hit | None:
    tunnel = _probe_tunnel(f)
    tls = next((o for o in _tunnel_tls(f, PROBE) if o.ok), None)
    if tunnel is None or tls is None:
        return None
    valid = {True: "valid", False: "not valid", None: "not checked"}[tls.data.get("cert_valid")]
    return Hit([tunnel, tls], f"The proxy at {_endpoint(tunnel)} answered {tunnel.data.get('status')} to CONNECT "
                              f"{tunnel.data.get('connect_to')}, and TLS through the tunnel with SNI "
                              f"{tls.data.get('sni')} completed (certificate {valid}).")


def _proxy_down(f: Facts) -> Hit | None:
    """Both vantages got a tunnel, and TLS through it failed for both: the proxy does not carry
    TLS for anyone (or the benign server is down), which no censor explains."""
    if _probe_tunnel(f) is None:
        return None
    tls, ctl_tls = _tunnel_tls(f, PROBE), _tunnel_tls(f, CONTROL)
    if not tls or any(o.ok for o in tls) or not ctl_tls or any(o.ok for o in ctl_tls):
        return None
    if not any(_tunnelled(o) for o in _connects(f, CONTROL)):
        return None
    return Hit([tls[0], ctl_tls[0]], f"TLS through the proxy at {_endpoint(tls[0])} failed for the probe "
                                     f"({dominant_failure(tls)}) and for control ({dominant_failure(ctl_tls)}).")


def _proxy_unconfirmed(f: Facts) -> Hit | None:
    """The tunnel opened but no TLS through it completed, with no contrast that could tell why
    (a lone stall, or control did not get that far).  Never the generic ok.http: a CONNECT
    answer is not a page."""
    tunnel = _probe_tunnel(f)
    if tunnel is None:
        return None
    tls = _tunnel_tls(f, PROBE)
    how = f"TLS through it failed ({dominant_failure(tls)}) {_times(tls)}" if tls else "no TLS went through it"
    return Hit([tunnel, *tls], f"The proxy at {_endpoint(tunnel)} opened a tunnel, but {how}; without control's "
                               "handshake through the same proxy nothing can be said.")


def _proxy_refused(f: Facts) -> Hit | None:
    """The proxy itself answered the CONNECT with a refusal (403, 407, 502...): it was reached, but
    a proxy's own refusal (an ACL by source address, authentication) is not a censor's doing."""
    if kind_of(f) != PROXY_HTTP:
        return None
    probe = _connects(f, PROBE)
    answered = [o for o in probe if o.ok and isinstance(o.data.get("status"), int)]
    if not answered or any(_tunnelled(o) for o in probe) or any(o.data.get("blockpage") for o in answered):
        return None  # a blockpage in the answer is dpi.blockpage's
    ctl = _connects(f, CONTROL)
    said = (f"control's got {ctl[0].data.get('status') or ctl[0].failure}" if ctl
            else "there is no control to compare with")
    return Hit(answered, f"The proxy at {_endpoint(answered[0])} answered {answered[0].data.get('status')} to "
                         f"CONNECT {answered[0].data.get('connect_to')}; {said}.")


# --- tor-dir ------------------------------------------------------------------------------------------
def _tor_dir(f: Facts) -> Hit | None:
    """TCP to the directory port connected, then the consensus fetch fails by interference while
    control fetched it from the same address."""
    if kind_of(f) != TOR_DIR or not f.tcp_ok_addresses:
        return None
    http = [o for o in f.probe_http if o.address in f.tcp_ok_addresses]
    if not http or any(o.ok for o in http) or not all(o.failure in INTERFERENCE for o in http):
        return None
    ctl = [o for o in f.control_http if o.ok and o.address in {h.address for h in http}]
    if not ctl or not _enough(http):
        return None
    failure = dominant_failure(http)
    connected = [o for o in f.probe_tcp if o.ok and o.address == http[0].address][:1]
    return Hit([*connected, *http, ctl[0]],
               f"TCP to the Tor directory at {_endpoint(http[0])} connected, but fetching the consensus failed "
               f"({failure}) {_times(http)}, while control fetched it from the same address (status "
               f"{ctl[0].data.get('status')}).",
               detail=f"dpi.http_{_suffix(failure)}")


# --- tcp / obfs4 / udp-dns ------------------------------------------------------------------------------
def _ok_tcp(f: Facts) -> Hit | None:
    kind = kind_of(f)
    if kind not in (TCP, OBFS4):
        return None
    ok = [o for o in f.probe_tcp if o.ok]
    if not ok:
        return None
    ctl = " (control connects too)" if any(o.ok for o in f.control_tcp) else ""
    return Hit(ok[:1], f"TCP to the {_NAMES[kind]} at {_endpoint(ok[0])} connected{ctl}.",
               confidence=0.9 if ctl else 0.8)


def _dns_unverified(f: Facts) -> Hit | None:
    """A DNS-only target whose probe answers are all unlike control's, none a bogon; or a tcp://NAME
    target whose unlike answers all connect on its port.

    For a URL a TLS handshake tells a CDN's or geo-DNS's other answer from a forged one; a
    udp-dns target has nothing but the answers, and messaging names are served by location
    (WhatsApp's and Telegram's edges differ by country), so two public answers that differ are no
    evidence.  Forged answers that *are* evidence were decided before: injected (two answers to
    one query), a bogon, an address a DNS fingerprint names, NXDOMAIN/SERVFAIL/no answer.
    """
    kind = kind_of(f)
    if kind not in (UDP_DNS, TCP) or not f.control_resolves:
        return None
    unlike = [o for o in f.probe_dns if o.ok and o.data.get("addresses")
              and not set(o.data["addresses"]) & f.control_addresses]
    if not unlike:
        return None
    got = sorted({a for o in unlike for a in o.data["addresses"]})
    connects: list[Observation] = []
    if kind == TCP:
        # tcp://NAME: the unlike answers' endpoints accept on the target's port (every one the probe
        # tried), as a messaging edge chosen by location does.  A failed connect there is left to
        # dns.poisoned (a forged answer that leads nowhere).
        tried = [o for o in f.probe_tcp if o.address in got]
        connects = [o for o in tried if o.ok]
        if not connects or {o.address for o in connects} != {o.address for o in tried}:
            return None
    who = ", ".join(sorted({str(o.data.get("resolver")) for o in unlike}))
    why = ("a DNS-only target cannot tell a location-dependent answer from a forged one (measure "
           "tcp://NAME:443 to validate)" if kind == UDP_DNS else
           f"TCP to port {connects[0].port} there connected, which no handshake checks, so it cannot tell "
           "a location-dependent answer from a forged one")
    return Hit([*unlike[:4], *connects[:4]], f"Resolver {who} answered {', '.join(got[:4])} for {f.domain}, unlike "
                                             f"control ({', '.join(sorted(f.control_addresses)[:4])}); {why}.",
               detail="dns.unverified")


def _ok_dns(f: Facts) -> Hit | None:
    """A DNS-only target whose probe answers share an address with control's."""
    if kind_of(f) != UDP_DNS or not f.control_resolves:
        return None
    agree = f.probe_addresses & f.control_addresses
    if not agree:
        return None
    dns = [o for o in f.probe_dns if o.ok and set(o.data.get("addresses") or []) & agree]
    return Hit(dns[:4], f"{f.domain} resolved to {', '.join(sorted(agree)[:4])} at the probe, as at control.")


#: In priority order; :func:`join` places them after ``ip.tcp``.
KIND_RULES: tuple[Rule, ...] = (
    Rule("dpi.proxy_connect", BLOCKED, "dpi", "dpi.proxy_connect", 0.85, _proxy_connect,
         "CONNECT through an HTTP proxy fails by interference (twice for stalls) while control's opens a tunnel."),
    Rule("dpi.proxy_tunnel", BLOCKED, "dpi", "dpi.proxy_tls_reset", 0.8, _proxy_tunnel,
         "The proxy's tunnel opens, but TLS through it fails by interference while control's completes."),
    Rule("dpi.tor_dir", BLOCKED, "dpi", "dpi.http_reset", 0.85, _tor_dir,
         "A Tor directory's port connects, the consensus fetch is interfered with, control fetches it."),
    Rule("ok.proxy", OK, None, None, 0.9, _ok_proxy, "CONNECT through the proxy and TLS through its tunnel worked."),
    Rule("down.proxy", DOWN, None, "down", 0.8, _proxy_down,
         "TLS through the proxy's tunnel fails for the probe and for control alike."),
    Rule("proxy.unconfirmed", INCONCLUSIVE, None, "inconclusive", 0.3, _proxy_unconfirmed,
         "The proxy's tunnel opened, TLS through it did not complete, and there is no contrast."),
    Rule("proxy.refused", INCONCLUSIVE, None, "proxy.refused", 0.4, _proxy_refused,
         "The proxy itself refused the CONNECT (its own answer, not evidence of blocking)."),
    Rule("ok.tcp", OK, None, None, 0.9, _ok_tcp, "A TCP-only kind (tcp, obfs4) connected."),
    Rule("ok.dns", OK, None, None, 0.9, _ok_dns, "A DNS-only kind (udp-dns) resolved as control does."),
)


#: Placed right before ``dns.poisoned`` (after the DNS rules that are evidence for any kind).
KIND_DNS_RULES: tuple[Rule, ...] = (
    Rule("dns.unverified", INCONCLUSIVE, None, "dns.unverified", 0.3, _dns_unverified,
         "A DNS-only (or TCP-only, connecting) target's answers differ from control's, with nothing to tell "
         "geo-DNS from forgery."),
)


def join(base: tuple[Rule, ...], extra: tuple[Rule, ...] = KIND_RULES, *, after: str = "ip.tcp",
         dns_rules: tuple[Rule, ...] = KIND_DNS_RULES, before: str = "dns.poisoned") -> tuple[Rule, ...]:
    """``base`` with ``extra`` inserted after the rule ``after`` (before the success rules if absent)
    and ``dns_rules`` before the rule ``before`` (right after ``extra`` if absent)."""
    ids = [r.id for r in base]
    at = ids.index(after) + 1 if after in ids else next(i for i, r in enumerate(base) if r.status == OK)
    out = [*base[:at], *extra, *base[at:]]
    ids = [r.id for r in out]
    at = ids.index(before) if before in ids else ids.index(extra[-1].id) + 1 if extra else len(out) - 1
    return (*out[:at], *dns_rules, *out[at:])


__all__ = ["KIND_DNS_RULES", "KIND_RULES", "join", "kind_of"]
