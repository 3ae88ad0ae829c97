"""What one pass over one capture accumulates, shared by the replay modules.

The pass is split by concern (:mod:`.flows` TCP/ICMP, :mod:`.dns`, :mod:`.trigger` the
injection checks, :mod:`.naming`, :mod:`.helperflows`); each works on one :class:`FileState`,
which holds the bounded per-file state and the two outputs: observations and findings.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kzprobe.model import SOURCE_PCAP, Observation, Target
from kzprobe.replay.pcapio import ReadResult

if TYPE_CHECKING:
    from kzprobe.analysis.fingerprints import Fingerprints
    from kzprobe.replay.dns import DnsTx, DoneLookup
    from kzprobe.replay.flows import Flow

#: The ``source`` of every observation replay makes.
SOURCE = SOURCE_PCAP
#: A packet that answers a trigger is injected when its IP TTL differs from the server's own
#: handshake packet by this much (routers on one path do not change hop counts mid-flow).
TTL_MARGIN = 5
#: A flow whose last packet is this close to the end of the capture was cut by the capture,
#: so missing answers are not failures.
END_GRACE = 3.0


@dataclass
class Finding:
    file: str
    domain: str
    kind: str
    packets: list[int]
    sentence: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "domain": self.domain, "kind": self.kind, "packets": self.packets,
                "sentence": self.sentence}


@dataclass
class FileReplay:
    """The outcome of replaying one capture (or one run rotated across several files)."""

    read: ReadResult
    observations: list[Observation] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    packets: int = 0
    #: Every file read into this result, in order (one unless a rotated capture was joined).
    paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    """The bounds that keep a pass's memory flat whatever the capture holds."""

    idle: float = 60.0
    dns_idle: float = 10.0
    max_flows: int = 50_000
    #: Bytes kept per direction of an ordinary flow (a ClientHello, a server's first flight).
    buf_cap: int = 4096
    #: Bytes kept of a plain-HTTP response: enough for the feature layer's 512 KiB decoded cap
    #: (an uncompressed page) plus headers and chunk framing.
    http_cap: int = (512 + 64) * 1024
    #: Bytes of HTTP responses kept per file, all flows together.
    http_budget: int = 256 << 20
    #: Bytes of helper flows (reassembled in full) kept per file, all flows together.
    helper_budget: int = 64 << 20


class FileState:
    """The per-file state of a pass; :meth:`emit` and :meth:`find` are its outputs."""

    def __init__(self, path: str, out: FileReplay, limits: Limits, fingerprints: Fingerprints | None,
                 next_id: int) -> None:
        self.file = path
        self.out = out
        self.limits = limits
        #: None: the feature layer's default fingerprint file.
        self.fingerprints = fingerprints
        self.next_id = next_id
        self.flows: dict[tuple[bytes, int, bytes, int], Flow] = {}
        self.dns: dict[tuple[bytes, int, int], DnsTx] = {}
        #: (observation, needs a name) waiting for :func:`naming.resolve_pending`.
        self.pending: list[tuple[Observation, bool]] = []
        #: (address, kind, packets, sentence): findings waiting for a name.
        self.pfind: list[tuple[str, str, list[int], str]] = []
        #: DNS lookups until A and AAAA are folded.
        self.dns_done: list[DoneLookup] = []
        self.names: dict[str, Counter[str]] = defaultdict(Counter)  # address -> names (SNI/Host)
        self.dns_names: dict[str, set[str]] = defaultdict(set)  # address -> qnames that gave it
        self.expired: list[int] = []
        self.undelivered: list[int] = []
        self.now = 0.0
        self.http_budget = limits.http_budget
        self.helper_budget = limits.helper_budget
        self.helper_eps: set[tuple[bytes, int]] = set()  # (address, port) of helpers seen asked
        #: Kind targets (tor-or://, tcp://, ...) the replay was told of (replay/kinds.py).
        self.kind_targets: list[Target] = []
        #: Kind target URLs the probe asked its helper about, in the capture (dict: ordered set).
        self.helper_kind_urls: dict[str, None] = {}
        #: The first evidence that the capture dropped packets: (frame, why).
        self.loss: tuple[int, str] | None = None
        #: The file being read (its pcapng Decryption Secrets Blocks arrive as it is read).
        self.reading: ReadResult | None = None
        #: client random -> TLS 1.3 traffic secrets, from every file's key log so far.
        self.tls_keys: dict[bytes, dict[str, bytes]] = {}
        self._keylog_seen: tuple[int, int] = (0, 0)

    def may_decrypt(self) -> bool:
        """The capture carries TLS secrets (in this file, or in an earlier file of a rotated run)."""
        self.ingest_keylog()
        return bool(self.tls_keys)

    def tls_secrets(self, client_random: bytes | None) -> dict[str, bytes] | None:
        """The logged secrets of the TLS session with this ClientHello random, if the capture has them."""
        self.ingest_keylog()
        return self.tls_keys.get(client_random) if client_random is not None else None

    def ingest_keylog(self) -> None:
        """Parse the key log blocks the file being read has shown since the last call.  Keys are
        kept across the files of a rotated run: its secrets are in the first file only."""
        res = self.reading
        if res is None or (id(res), len(res.tls_keylog)) == self._keylog_seen:
            return
        from kzprobe.replay.tlsdecrypt import parse_keylog

        start = self._keylog_seen[1] if self._keylog_seen[0] == id(res) else 0
        for cr, secrets in parse_keylog(res.tls_keylog[start:]).items():
            self.tls_keys.setdefault(cr, {}).update(secrets)
        self._keylog_seen = (id(res), len(res.tls_keylog))

    def lost(self, n: int, why: str) -> None:
        if self.loss is None:
            self.loss = (n, why)

    def emit(self, obs: Observation, attempts: Counter[tuple[str, str]] | None = None) -> None:
        obs.id = self.next_id
        self.next_id += 1
        if attempts is not None:
            attempts[(obs.target, obs.step)] += 1
            obs.attempt = attempts[(obs.target, obs.step)] - 1
        self.out.observations.append(obs)

    def find(self, domain: str, kind: str, packets: list[int], sentence: str) -> None:
        self.out.findings.append(Finding(self.file, domain, kind, packets, sentence))


def seq_ge(a: int, b: int) -> bool:
    """a >= b in TCP sequence space (modulo 2**32)."""
    return ((a - b) & 0xFFFFFFFF) < 0x80000000


def span(ns: list[int]) -> str:
    shown = ", ".join(map(str, ns[:8]))
    return shown + (", ..." if len(ns) > 8 else "")
