"""Facts derived from one target's observations: the vocabulary the rules are written in.

Everything here is a pure function of the observations, computed lazily and cached, so that a
rule reads like the sentence it stands for ("TLS with the target SNI failed at every address
where TCP worked, and the follow-up with a benign SNI completed").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property

from kzprobe import errors as E
from kzprobe.analysis.fingerprints import Fingerprints
from kzprobe.model import (
    CONTROL,
    DNSCHECK,
    FOLLOWUP,
    MEASURE,
    PEEK,
    PROBE,
    REDIRECT,
    REJECTED,
    STEP_DNS,
    STEP_HTTP,
    STEP_TCP,
    STEP_TLS,
    Observation,
)

__all__ = ["DNSCHECK", "DNS_FAILURES", "INTERFERENCE", "Context", "Facts", "dominant_failure", "failure_counts",
           "hop_of", "wire_rate"]

#: Failures that a censor produces by interfering with a flow (as opposed to DNS or TLS
#: validation failures).
INTERFERENCE = frozenset({E.CONNECTION_RESET, E.TIMEOUT, E.EOF, E.CONNECTION_ABORTED})
DNS_FAILURES = frozenset({E.DNS_NXDOMAIN, E.DNS_SERVFAIL, E.DNS_NO_ANSWER, E.DNS_REFUSED, E.TIMEOUT})


@dataclass(frozen=True, slots=True)
class Context:
    """What the classifier knows beyond one target's observations."""

    #: The vantage point itself has no working network (decided once per run).
    no_network: bool = False
    #: A control vantage (helper or DoH) was configured for the run.
    control_configured: bool = False
    #: Names of national interception CAs: a chain issued by one is interception, full stop.
    interception_cas: tuple[str, ...] = (
        "Qaznet Trust Network",
        "Information Security Certification Authority",
        "ISCA",
    )
    #: Blockpage fingerprints for DNS answers (location_found=dns); None: the built-in set.
    fingerprints: Fingerprints | None = None


def hop_of(o: Observation) -> int:
    """The redirect hop an observation belongs to: 0 for the target URL, k >= 1 along the chain."""
    for key in ("hop", "depth"):
        v = o.data.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    return 1 if o.purpose == REDIRECT else 0


#: Speed samples must cover at least this long (seconds) for a rate to mean anything...
MIN_SAMPLE_SPAN = 0.5
#: ... unless the body completed sooner and was bigger than TCP's initial window (10 segments,
#: RFC 6928), timed from at least SHORT_SPAN_FLOOR seconds.
SHORT_MIN_BYTES = 16 * 1024
SHORT_SPAN_FLOOR = 0.05


def wire_rate(o: Observation, *, lower_bound: bool = False) -> float | None:
    """Wire bytes per second of an HTTP body download, from its speed samples ([[t, n], ...]).

    A body done in under MIN_SAMPLE_SPAN has no measurable rate.  With ``lower_bound``, one of at
    least SHORT_MIN_BYTES gets n / max(t, SHORT_SPAN_FLOOR), never more than it was measured at:
    right for the benign follow-up and control (a live 50 KiB follow-up takes ~10 ms; n / 0.5 s
    understated it so much that a 256 kbit/s SNI shaper looked like a slow path), wrong for the
    target (understating the target's rate would overstate the ratio: a small page served in
    10 ms must never look throttled).  A transfer cut short by a failure says nothing then.
    """
    samples = o.data.get("speed_samples")
    if not isinstance(samples, list) or not samples:
        return None
    last = samples[-1]
    if not isinstance(last, list | tuple) or len(last) != 2:
        return None
    t, n = last
    if not isinstance(t, int | float) or not isinstance(n, int | float) or t < 0:
        return None
    if t < MIN_SAMPLE_SPAN:
        # A body that completed this fast (a live benign follow-up of a 50 KiB page takes ~10 ms)
        # still has a rate if it was bigger than TCP's initial window (a first flight arrives in
        # one round trip whatever the bandwidth), timed from at least SHORT_SPAN_FLOOR (bytes that
        # came with the headers are not counted as instant).
        if not lower_bound or o.failure is not None or n < SHORT_MIN_BYTES:
            return None
        return float(n) / max(float(t), SHORT_SPAN_FLOOR)
    return max(0.0, float(n)) / float(t)


@dataclass
class Facts:
    target: str
    domain: str
    observations: list[Observation]
    context: Context = field(default_factory=Context)
    #: The redirect hop these facts are about (0: the target URL; see :meth:`at_hop`).
    hop: int = 0

    # --- selections --------------------------------------------------------------------------
    def _sel(self, step: str, vantage: str, purposes: Iterable[str] = (MEASURE,)) -> list[Observation]:
        ps = set(purposes)
        return [o for o in self.observations if o.step == step and o.vantage == vantage and o.purpose in ps]

    @cached_property
    def probe_dns(self) -> list[Observation]:
        return self._sel(STEP_DNS, PROBE)

    @cached_property
    def control_dns(self) -> list[Observation]:
        return self._sel(STEP_DNS, CONTROL)

    @cached_property
    def probe_tcp(self) -> list[Observation]:
        return self._sel(STEP_TCP, PROBE)

    @cached_property
    def control_tcp(self) -> list[Observation]:
        return self._sel(STEP_TCP, CONTROL)

    @cached_property
    def probe_tls(self) -> list[Observation]:
        """TLS handshakes with SNI = the target's domain."""
        return [o for o in self._sel(STEP_TLS, PROBE) if (o.data.get("sni") or o.domain) == self.domain]

    @cached_property
    def probe_tls_check(self) -> list[Observation]:
        return self._sel(STEP_TLS, PROBE, (DNSCHECK,))

    @cached_property
    def probe_tls_followup(self) -> list[Observation]:
        return self._sel(STEP_TLS, PROBE, (FOLLOWUP,))

    @cached_property
    def control_tls(self) -> list[Observation]:
        return self._sel(STEP_TLS, CONTROL)

    @cached_property
    def probe_http(self) -> list[Observation]:
        return self._sel(STEP_HTTP, PROBE)

    @cached_property
    def probe_http_followup(self) -> list[Observation]:
        return self._sel(STEP_HTTP, PROBE, (FOLLOWUP,))

    @cached_property
    def control_http(self) -> list[Observation]:
        return self._sel(STEP_HTTP, CONTROL)

    @cached_property
    def injected(self) -> list[Observation]:
        """Observations on which a packet was judged injected (pcap evidence).

        Follow-ups (benign SNI / Host) are left out: an injection there says the *address* or
        the path is interfered with, not that this target's name triggered it.
        """
        return [o for o in self.observations
                if o.vantage == PROBE and o.purpose != FOLLOWUP and o.data.get("injected")]

    # --- DNS ---------------------------------------------------------------------------------
    @cached_property
    def probe_addresses(self) -> set[str]:
        return {a for o in self.probe_dns if o.ok for a in o.data.get("addresses", [])}

    @cached_property
    def control_addresses(self) -> set[str]:
        return {a for o in self.control_dns if o.ok for a in o.data.get("addresses", [])}

    @cached_property
    def has_control(self) -> bool:
        return any(o.vantage == CONTROL for o in self.observations)

    @cached_property
    def control_resolves(self) -> bool:
        return bool(self.control_addresses)

    @cached_property
    def control_dns_failures(self) -> set[str]:
        return {o.failure for o in self.control_dns if o.failure}

    @cached_property
    def resolved_by(self) -> dict[str, set[str]]:
        """address -> the probe resolvers that gave it."""
        out: dict[str, set[str]] = defaultdict(set)
        for o in self.probe_dns:
            if o.ok:
                for a in o.data.get("addresses", []):
                    out[a].add(str(o.data.get("resolver", "?")))
        return out

    @cached_property
    def probe_resolvers(self) -> set[str]:
        return {str(o.data.get("resolver", "?")) for o in self.probe_dns}

    def tls_valid_at(self, address: str) -> bool:
        """A handshake with SNI = domain at ``address`` presented a certificate valid for it."""
        return any(
            o.ok and o.address == address and o.data.get("cert_valid") is True
            for o in self.probe_tls + self.probe_tls_check
        )

    @cached_property
    def valid_addresses(self) -> set[str]:
        """Probe-resolved addresses shown genuine: given by control, or TLS-validated."""
        return {a for a in self.probe_addresses if a in self.control_addresses or self.tls_valid_at(a)}

    @cached_property
    def reference_addresses(self) -> set[str]:
        """Addresses known genuine: control's answers, and probe answers validated by TLS."""
        return self.control_addresses | self.valid_addresses

    @cached_property
    def suspect_addresses(self) -> set[str]:
        """Probe-resolved addresses that evidence says are *not* genuine.

        Needs a reference (control's answer, or another probe resolver's answer that validated):
        without one, nothing is suspect, however odd it looks.
        """
        reference = self.reference_addresses
        if not reference:
            return set()
        suspect = self.probe_addresses - reference
        if self.hop:
            # A hop is measured at one address only (the first resolver's): another resolver's
            # answer that was never tried is no evidence either way (a geo-DNS edge would look
            # poisoned).  At hop 0 every resolved address is measured, so every one had its chance.
            suspect &= self.flow_addresses
        return suspect

    @cached_property
    def flow_addresses(self) -> set[str]:
        """Addresses the probe connected to (or tried to) at this hop."""
        return {o.address for o in self.observations
                if o.vantage == PROBE and o.step != STEP_DNS and o.address}

    def dns_obs_for(self, addresses: set[str]) -> list[Observation]:
        return [o for o in self.probe_dns if set(o.data.get("addresses", [])) & addresses]

    # --- per-address flows --------------------------------------------------------------------
    def at(self, obs: list[Observation], address: str) -> list[Observation]:
        return [o for o in obs if o.address == address]

    @cached_property
    def tcp_ok_addresses(self) -> set[str]:
        return {o.address for o in self.probe_tcp if o.ok and o.address}

    @cached_property
    def tcp_tried_addresses(self) -> set[str]:
        return {o.address for o in self.probe_tcp if o.address}

    @cached_property
    def control_reaches_site(self) -> bool:
        """Control fetched the page; or, where it did not try to fetch, completed the deepest step it tried.

        A TCP connect alone is not "reaching the site" when control also tried TLS or HTTP and
        those failed (e.g. a certificate nobody trusts: the site is broken for everyone).
        """
        if self.control_http:
            return any(o.ok for o in self.control_http)
        if self.control_tls:
            return any(o.ok and o.data.get("cert_valid") is not False for o in self.control_tls)
        return any(o.ok for o in self.control_tcp)

    @cached_property
    def control_fails_site(self) -> bool:
        """Control tried and could not reach the site at all."""
        if not self.has_control:
            return False
        if self.control_dns and not self.control_resolves and self.control_dns_failures:
            return True
        tried = self.control_http or self.control_tls or self.control_tcp
        return bool(tried) and not self.control_reaches_site

    def control_connects(self, address: str) -> bool | None:
        obs = [o for o in self.control_tcp if o.address == address]
        if not obs:
            return None
        return any(o.ok for o in obs)

    def control_tls_ok(self, address: str | None = None) -> bool | None:
        """Control completed a handshake (at ``address``) whose certificate did not fail validation."""
        obs = [o for o in self.control_tls if address is None or o.address == address]
        if not obs:
            return None
        return any(o.ok and o.data.get("cert_valid") is not False for o in obs)

    @cached_property
    def control_http_ok(self) -> bool | None:
        if not self.control_http:
            return None
        return any(o.ok for o in self.control_http)

    @cached_property
    def probe_http_ok(self) -> list[Observation]:
        """Pages fetched.  A redirect whose chain then broke is not the page (the break decides)."""
        broke = self.redirect_break is not None
        return [o for o in self.probe_http if o.ok and not o.data.get("blockpage")
                and not (broke and o.data.get("redirect_to"))]

    @cached_property
    def blockpages(self) -> list[Observation]:
        """Responses matching a blockpage fingerprint, including what a peek behind a bad certificate saw."""
        return [o for o in self._sel(STEP_HTTP, PROBE, (MEASURE, PEEK, REDIRECT)) if o.data.get("blockpage")]

    @cached_property
    def network_unreachable_everywhere(self) -> bool:
        """Every probe step failed because the vantage point itself has no route anywhere."""
        probe = [o for o in self.observations if o.vantage == PROBE]
        if not probe or any(o.ok for o in probe):
            return False
        return all(o.failure in E.NETWORK_DOWN for o in probe if o.step != STEP_DNS) and any(
            o.failure in E.NETWORK_DOWN for o in probe
        )


    # --- the control answer ------------------------------------------------------------------
    @cached_property
    def rejected(self) -> list[Observation]:
        """Stand-ins for control answers that failed the wire contract (contract.rejected)."""
        return [o for o in self.observations if o.purpose == REJECTED]

    # --- DNS fingerprints -------------------------------------------------------------------------
    @cached_property
    def dns_fingerprinted(self) -> list[tuple[Observation, str]]:
        """Probe DNS answers that match a location_found=dns fingerprint, with its name.

        A name set by the source (``data["blockpage"]``, matched there with the run's extra
        fingerprints) counts; otherwise the answers are matched against the context's set.
        """
        from kzprobe.analysis.features import dns_blockpage

        out = []
        for o in self.probe_dns:
            name = o.data.get("blockpage")
            if not isinstance(name, str) or not name:
                name = dns_blockpage(o.data.get("addresses") or [], self.context.fingerprints)
            if name:
                out.append((o, name))
        return out

    # --- redirect chains ----------------------------------------------------------------------
    def hops(self, vantage: str) -> dict[int, list[Observation]]:
        """Redirect-chain observations (purpose REDIRECT) by hop, for one vantage."""
        out: dict[int, list[Observation]] = defaultdict(list)
        for o in self.observations:
            if o.vantage == vantage and o.purpose == REDIRECT:
                out[hop_of(o)].append(o)
        return dict(sorted(out.items()))

    def at_hop(self, k: int) -> Facts:
        """Hop ``k`` >= 1 of the redirect chain as a measurement of its own name: its REDIRECT
        steps (both vantages) read as MEASURE, with the peeks made at that hop.

        The DNS rules then judge a hop as they judge the target URL (DNS precedence, an answer
        leading to a blockpage, a resolver failing while control resolves), instead of only
        asking whether the chain as a whole got through: a chain completed through the public
        resolver's answer does not clear the ISP resolver's NXDOMAIN for that hop's name.
        """
        own = [o for o in self.observations if o.purpose == REDIRECT and hop_of(o) == k]
        name = next((o.domain for o in own if o.vantage == PROBE), None) or next((o.domain for o in own), "")
        peeks = [o for o in self.observations if o.purpose == PEEK and hop_of(o) == k and o.domain == name]
        obs = [replace(o, purpose=MEASURE) for o in own] + peeks
        return Facts(self.target, name, obs, self.context, hop=k)

    @cached_property
    def redirect_break(self) -> tuple[int, list[Observation]] | None:
        """(k, failed steps) for the first hop k >= 1 of the probe's chain where a step failed, when
        no later hop fetched a page (a failed attempt followed by a working one is no break)."""
        hops = self.hops(PROBE)
        for k, obs in hops.items():
            if k < 1:
                continue
            failed = [o for o in obs if not o.ok and not (o.step == STEP_TLS and o.purpose == DNSCHECK)]
            if not failed:
                continue
            later_ok = any(o.ok and o.step == STEP_HTTP and not o.data.get("redirect_to")
                           for j, more in hops.items() if j >= k for o in more)
            if later_ok:
                return None
            return k, failed
        return None

    def final_pages(self, vantage: str) -> list[Observation]:
        """The pages a vantage ended on: its fetched responses, or, where one redirected and the
        chain was followed, the chain's last responses (what a browser shows)."""
        base = self.probe_http_ok if vantage == PROBE else [o for o in self.control_http if o.ok]
        if not any(o.data.get("redirect_to") for o in base):
            return base
        ends = [o for obs in self.hops(vantage).values() for o in obs
                if o.step == STEP_HTTP and o.ok and not o.data.get("redirect_to") and not o.data.get("blockpage")]
        return ends or base

    def control_page_at(self, hop: int) -> Observation | None:
        """Control's fetched response at redirect hop ``hop`` (0: the target URL), if it has one."""
        return next((o for o in self.observations if o.vantage == CONTROL and o.step == STEP_HTTP and o.ok
                     and o.purpose in (MEASURE, REDIRECT) and hop_of(o) == hop), None)

    def control_completes_chain(self, k: int) -> bool:
        """Control fetched the final page, and (where it recorded hops) got past hop ``k``."""
        if not self.control_http_ok:
            return False
        hops = self.hops(CONTROL)
        if not hops:
            return True  # control reports only the chain's outcome (OONI's helper does)
        if any(not o.ok for j, obs in hops.items() for o in obs if j >= 1):
            return False
        return max(hops) >= k

    # --- throttling ---------------------------------------------------------------------------
    def rate(self, obs: Iterable[Observation], *, lower_bound: bool = False) -> tuple[float, Observation] | None:
        """The best wire rate among ``obs`` that have speed samples, with its observation."""
        rated = [(r, o) for o in obs if (r := wire_rate(o, lower_bound=lower_bound)) is not None]
        return max(rated, key=lambda x: x[0], default=None)


def failure_counts(obs: Iterable[Observation]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for o in obs:
        out[o.failure or "success"] += 1
    return dict(out)


def dominant_failure(obs: Iterable[Observation]) -> str | None:
    counts = {k: v for k, v in failure_counts(obs).items() if k != "success"}
    if not counts:
        return None
    return max(counts, key=lambda k: counts[k])
