"""The one observation model that every source feeds, and the verdict the classifier returns.

Three sources produce :class:`Observation` records: live probes (``source="live"``), pcap replay
(``source="pcap"``) and imported OONI measurements (``source="ooni"``).  Whatever the source, one
classifier (:mod:`kzprobe.analysis`) turns them into one :class:`Verdict` per target.  Keeping the
model this small and flat is deliberate: it is what gets stored in SQLite, exported to OONI's
format and compared in tests, so every field must mean the same thing for every source.

Per-step details live in ``data`` (a JSON-able dict).  The keys each step uses are summarised on
the ``STEP_*`` constants below; :mod:`kzprobe.contract` holds them as TypedDicts (the classifier
reads only those keys) and checks them on everything that arrives as JSON (``from_wire``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit

# --- steps -------------------------------------------------------------------------------------
#: DNS lookup.  data: resolver ("system" | "IP:PORT" | DoH URL), transport ("system" | "udp" |
#: "tcp" | "doh"), qtype ("A" | "AAAA" | "ANY"), rcode ("NOERROR", "NXDOMAIN", ...),
#: answers [{"type", "name", "data", "ttl"}], addresses [str] (A/AAAA of the first response),
#: responses [{"rcode", "addresses", "ip_ttl"?, "ip_id"?, "delay"}] -- every response seen for the
#: one query; more than one response with different addresses is evidence of injection.
STEP_DNS = "dns"
#: TCP connect to address:port.  data: {} (failure says it all); pcap adds "packets"; the connect of
#: a ClientHello connection (probes/hellos.py) carries "hello", as its TLS step does.
STEP_TCP = "tcp"
#: TLS handshake.  data: sni, version, cipher, alpn, certificates [{"subject", "issuer", "san",
#: "not_before", "not_after", "der_b64"}] (leaf first), cert_valid (bool | None),
#: cert_failure (OONI string | None), issuer (str).
STEP_TLS = "tls"
#: HTTP(S) GET.  data: url, host, status, headers {name: value}, redirect_to (a 3xx's Location),
#: and from analysis.features.http_features (over the DECODED body): title, body_length,
#: body_sha256, body_head, truncated, content_encoding, wire_bytes, blockpage; speed_samples
#: [[t, n], ...] (wire bytes every 250 ms).  Hop k >= 1 of a redirect chain: purpose REDIRECT,
#: data["hop"] = k.  Every step may carry "injected" (pcap evidence) and "hop".
STEP_HTTP = "http"

STEPS = (STEP_DNS, STEP_TCP, STEP_TLS, STEP_HTTP)
Step = Literal["dns", "tcp", "tls", "http"]

# --- vantages and sources ----------------------------------------------------------------------
PROBE: Final = "probe"
CONTROL: Final = "control"
VANTAGES = (PROBE, CONTROL)
Vantage = Literal["probe", "control"]
#: Where an observation came from: a live probe (or the helper it asked), a packet capture, an
#: imported OONI measurement.
SOURCE_LIVE: Final = "live"
SOURCE_PCAP: Final = "pcap"
SOURCE_OONI: Final = "ooni"
SOURCES = (SOURCE_LIVE, SOURCE_PCAP, SOURCE_OONI)
Source = Literal["live", "pcap", "ooni"]

# --- purposes: why a step was made ---------------------------------------------------------------
#: The step as asked for by the target.
MEASURE = "measure"
#: The same address with a benign SNI / Host (example.com): tells DPI from IP blocking.
FOLLOWUP = "followup"
#: The same GET without certificate validation, made only after validation failed: what is
#: served behind the bad certificate (a blockpage?).  Never counts as the site being reachable.
PEEK = "peek"
#: A step of a redirect chain beyond the first URL: hop k >= 1 is in ``data["hop"]`` (OONI
#: imports also keep ``data["depth"]``).  The rules read hops only to attribute a chain that broke.
REDIRECT = "redirect"
#: A TLS handshake made only to check whether a resolved address is genuine for the domain (e.g.
#: on 443 for an http:// target).  Its successes count; its failures prove nothing.
DNSCHECK = "dnscheck"
#: A control answer that failed the wire contract (contract.from_wire): data["wire_error"] says
#: why.  Nothing else of that answer is kept, and the target is inconclusive.
REJECTED = "rejected"
PURPOSES = (MEASURE, FOLLOWUP, PEEK, REDIRECT, DNSCHECK, REJECTED)

# --- verdict statuses and mechanisms -----------------------------------------------------------
OK = "ok"
BLOCKED = "blocked"
DOWN = "down"
INCONCLUSIVE = "inconclusive"
STATUSES = (OK, BLOCKED, DOWN, INCONCLUSIVE)
MECHANISMS = ("dns", "ip", "dpi")


# --- target kinds beyond web URLs (issue 15) -----------------------------------------------------
#: The non-web target schemes, as written in a target URL (CONTRACTS.md, "Target URLs"):
#: ``tor-or://IP:PORT`` a relay's OR port (TCP, then TLS as a Tor client makes it);
#: ``tor-dir://IP:PORT`` a directory (GET /tor/status-vote/current/consensus, first bytes);
#: ``obfs4://IP:PORT`` a bridge's TCP reachability; ``tcp://HOST:PORT`` a messaging endpoint;
#: ``udp-dns://NAME`` DNS only, over UDP; ``proxy+http://HOST:PORT`` an HTTP proxy's CONNECT.
KINDS: tuple[str, ...] = ("tor-or", "tor-dir", "obfs4", "tcp", "udp-dns", "proxy+http")
#: Kinds whose host may be a DNS name (the others take an IP address only).
NAME_KINDS: frozenset[str] = frozenset({"tcp", "udp-dns", "proxy+http"})
#: Kinds without a port (every other kind must write one).
PORTLESS_KINDS: frozenset[str] = frozenset({"udp-dns"})
#: Target.kind of an http:// or https:// target.
KIND_URL: Final = "url"


def now() -> float:
    """Wall-clock time, as stored in observations (seconds since the epoch)."""
    return time.time()


@dataclass(frozen=True, slots=True)
class Claim:
    """What the report says about a target."""

    quote: str
    section: str = ""
    footnote: str = ""
    dates: str = ""
    mechanism: str = ""

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Target:
    """One thing to measure: a URL, its category, and (optionally) the report's claim."""

    url: str
    category: str = ""
    claim: Claim | None = None
    notes: str = ""

    @property
    def host(self) -> str:
        if "://" not in self.url:  # a bare domain (pcap replay keys targets by domain)
            return self.url.split("/", 1)[0].split(":", 1)[0].lower()
        return (urlsplit(self.url).hostname or "").lower()

    @property
    def scheme(self) -> str:
        """The scheme as written, lowercased: "https", "tor-or", "proxy+http", ..."""
        return urlsplit(self.url).scheme or "https"

    @property
    def kind(self) -> str:
        """``url`` for an http(s) target, else its scheme (one of :data:`KINDS`)."""
        scheme = self.scheme
        return scheme if scheme in KINDS else KIND_URL

    @property
    def port(self) -> int:
        """The port written in the URL; else 443 for https, 53 for udp-dns (the resolvers'
        usual port: the probe's resolvers carry their own), 80 otherwise."""
        parts = urlsplit(self.url)
        if parts.port:
            return parts.port
        return {"https": 443, "udp-dns": 53}.get(parts.scheme, 80)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "host": self.host,
            "category": self.category,
            "claim": self.claim.to_dict() if self.claim else None,
            "notes": self.notes,
        }


@dataclass(slots=True)
class Observation:
    """One measurement step, from any source.

    ``target`` is the target's URL (the key verdicts are grouped by); ``domain`` is the name the
    step was about.  ``id`` is assigned by storage (or, for pcap/OONI sources that are not
    stored, by the source itself) so that verdict evidence can point at it.
    """

    step: str
    target: str
    domain: str
    vantage: str = PROBE
    source: str = SOURCE_LIVE
    address: str | None = None
    port: int | None = None
    t_start: float = 0.0
    t_end: float = 0.0
    failure: str | None = None
    purpose: str = MEASURE
    attempt: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    #: Packet numbers (1-based, as Wireshark counts) for pcap-sourced observations.
    packets: list[int] = field(default_factory=list)
    id: int | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def duration(self) -> float:
        return max(0.0, self.t_end - self.t_start)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Observation:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(slots=True)
class Verdict:
    """The classifier's conclusion for one target, and why."""

    target: str
    domain: str
    status: str
    rule: str
    sentence: str
    mechanism: str | None = None
    detail: str | None = None
    confidence: float = 0.0
    observations: list[int] = field(default_factory=list)
    packets: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.status}/{self.mechanism}" if self.mechanism else self.status

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "domain": self.domain,
            "status": self.status,
            "mechanism": self.mechanism,
            "detail": self.detail,
            "rule": self.rule,
            "confidence": round(self.confidence, 2),
            "evidence": {
                "observations": list(self.observations),
                "packets": list(self.packets),
                "sentence": self.sentence,
            },
        }
