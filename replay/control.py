"""Control from the capture itself: the probe's exchanges with a ``kzprobe helper``.

A live probe asks its control helper over plain HTTP (``POST /v1/control`` with JSON
``{"url", "addresses"}``); the helper answers ``{"version": 1, "observations": [...],
"refused": [...]}`` with observations made by the very same engine.  A capture of the probe's
traffic therefore carries control, and verdicts that need a contrast (DNS, IP, down) can be made
from the capture alone.

Helper flows are recognised by their request line, not by an address: the helper can live
anywhere, and a capture does not say where it was.  Unlike every other flow (whose first few KB
are enough for a verdict), a helper answer can be tens of KB, so these flows are reassembled in
full, in sequence order, with out-of-order segments held until the gap fills.  The bound is just
larger: ``STREAM_CAP`` per direction and a per-file budget that the engine passes in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kzprobe.contract import WireError, observations_from_wire, rejected
from kzprobe.model import CONTROL, KINDS, SOURCE_PCAP, Observation, Target
from kzprobe.replay import parsers

#: The request line that marks a flow as the probe talking to its control helper.
HELPER_REQUEST = b"POST /v1/control"
#: Per direction of one helper flow.  A helper answer is tens of KB; this leaves room for a
#: helper that measured a site with a long redirect chain, and stops a hostile capture there.
STREAM_CAP = 8 << 20
#: Out-of-order segments held per direction while waiting for a gap to fill.
MAX_OOO = 1024


def _delta(seq: int, base: int) -> int:
    """seq - base in sequence space (signed, modulo 2**32)."""
    return ((seq - base + 0x80000000) & 0xFFFFFFFF) - 0x80000000


class Reassembly:
    """One direction of a TCP stream, in sequence order, with the frame of every byte run."""

    __slots__ = ("cap", "data", "frames", "next", "ooo", "overflow")

    def __init__(self, next_seq: int | None, cap: int = STREAM_CAP) -> None:
        self.next = next_seq
        self.cap = cap
        self.data = bytearray()
        #: (offset in data, frame number) where each frame's new bytes begin.
        self.frames: list[tuple[int, int]] = []
        self.ooo: dict[int, tuple[bytes, int]] = {}
        self.overflow = False

    def add(self, seq: int, payload: bytes, frame: int, budget: int) -> int:
        """Take one segment; returns how many bytes were appended (the caller's budget)."""
        if self.next is None:
            self.next = seq
        d = _delta(seq, self.next)
        if d > 0:
            if len(self.ooo) < MAX_OOO and seq not in self.ooo:
                self.ooo[seq] = (payload, frame)
            return 0
        used = self._append(payload[-d:] if d else payload, frame, budget)
        while self.ooo and not self.overflow:
            got = self.ooo.pop(self.next & 0xFFFFFFFF, None)
            if got is None:  # a held segment that overlaps what we now have
                seq_k = next((k for k in self.ooo if _delta(k, self.next) <= 0), None)
                if seq_k is None:
                    break
                p, f = self.ooo.pop(seq_k)
                d = _delta(seq_k, self.next)
                got = (p[-d:] if d else p, f)
            used += self._append(got[0], got[1], budget - used)
        return used

    def _append(self, payload: bytes, frame: int, budget: int) -> int:
        if not payload:
            return 0
        room = min(self.cap - len(self.data), budget)
        if room <= 0:
            self.overflow = True
            return 0
        if len(payload) > room:
            payload = payload[:room]
            self.overflow = True
        self.frames.append((len(self.data), frame))
        self.data += payload
        assert self.next is not None
        self.next = (self.next + len(payload)) & 0xFFFFFFFF
        return len(payload)

    def frames_of(self, start: int, end: int) -> list[int]:
        """Frame numbers that carried bytes [start, end) of the stream."""
        out: list[int] = []
        for i, (off, frame) in enumerate(self.frames):
            nxt = self.frames[i + 1][0] if i + 1 < len(self.frames) else len(self.data)
            if off < end and nxt > start and frame not in out:
                out.append(frame)
        return out


class HelperStreams:
    """Both directions of one helper flow; the helper's end is named, so that a flow first seen
    mid-stream (its SYN lost by the capture) is still read the right way round."""

    __slots__ = ("cli", "sport", "srv", "srv_b")

    def __init__(self, srv_b: bytes, sport: int, cli_next: int | None, srv_next: int | None) -> None:
        self.srv_b = srv_b
        self.sport = sport
        self.cli = Reassembly(cli_next)
        self.srv = Reassembly(srv_next)


@dataclass
class Exchange:
    """One request to the helper and what its answer said."""

    url: str
    target: str
    status: int | None
    observations: list[Observation] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    request_frames: list[int] = field(default_factory=list)
    problem: str | None = None
    #: Why the answer was rejected by the wire decoder (its observations are then one ``rejected``).
    rejected: str | None = None


def decode_answer(answer: Any, target: str, frames: list[int], who: str) -> tuple[list[Observation], str | None]:
    """The helper's answer as control observations of ``target``, through the one wire decoder
    (:func:`kzprobe.contract.from_wire`) that the live helper client uses.

    All or nothing, as live: one type-wrong field (``"data": []``, ``"addresses": 5``) rejects
    the answer, and the target gets the contract's ``rejected`` observation instead, so that its
    verdict is inconclusive and says why.  Returns (observations, the reason if rejected).
    """
    try:
        obs = observations_from_wire(answer, source=SOURCE_PCAP, vantage=CONTROL)
    except WireError as exc:
        o = rejected(exc.reason, target=target, domain=target, source=SOURCE_PCAP, who=who)
        o.packets = list(frames)
        return [o], exc.reason
    for o in obs:
        # Replay names URL targets by host (kind targets by URL); the helper's observations carry the URL.
        o.target = target
        o.domain = o.domain.lower() or Target(target).host
        o.packets = list(frames)
    return obs, None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def replay_name(url: str) -> str:
    """The target replay keys a measured URL by: the host of an http(s) URL (replay names those
    targets by SNI / Host), the URL itself for the kinds beyond URLs (``tcp://NAME:443`` and
    ``udp-dns://NAME`` are two targets of one name; replay/kinds.py)."""
    t = Target(url)
    try:
        return url if "://" in url and t.kind in KINDS else t.host
    except ValueError:  # a capture's bytes: "http://[zz/" names nothing (the exchange says so)
        return ""


def _answer_target(answer: Any) -> str:
    """The target the helper's answer says it measured (its observations carry the URL)."""
    if isinstance(answer, dict) and isinstance(answer.get("observations"), list):
        for d in answer["observations"]:
            if isinstance(d, dict) and isinstance(d.get("target"), str) and d["target"]:
                return replay_name(d["target"])
    return ""


def exchanges(streams: HelperStreams, who: str = "") -> list[Exchange]:
    """Pair the helper requests with their answers (HTTP/1.1 answers come in request order).

    A capture can lose the request (the flow is then known as a helper flow by its endpoint,
    see the engine) or the answer: the request's URL names the target when it is there, else
    the answer's own observations do.
    """
    cli, srv = streams.cli, streams.srv
    reqs = parsers.http_messages(bytes(cli.data), requests=True)
    resps = [m for m in parsers.http_messages(bytes(srv.data), requests=False)
             if m.first_line.split(" ", 2)[1:2] != ["100"]]
    out: list[Exchange] = []
    for i in range(max(len(reqs), len(resps))):
        req = reqs[i] if i < len(reqs) else None
        resp = resps[i] if i < len(resps) else None
        if req is not None and not req.first_line.startswith(HELPER_REQUEST.decode()):
            continue
        doc = _json(req.body) if req is not None else None
        url = str(doc.get("url") or "") if isinstance(doc, dict) else ""
        ex = Exchange(url=url, target=replay_name(url) if url else "", status=None,
                      request_frames=cli.frames_of(req.start, req.end) if req is not None else [])
        out.append(ex)
        if resp is None:
            ex.problem = "no answer in the capture" + (" (stream cut short)" if srv.overflow or srv.ooo else "")
            continue
        ex.frames = srv.frames_of(resp.start, resp.end)
        parts = resp.first_line.split(" ", 2)
        code = parts[1] if len(parts) > 1 else ""
        ex.status = int(code) if code.isascii() and code.isdigit() else None  # latin-1 "\xb2" is a digit too
        if not resp.complete:
            ex.problem = "the answer is cut short in the capture"
            continue
        answer = _json(resp.body)
        if ex.status != 200:
            why = answer.get("error") if isinstance(answer, dict) else None
            ex.problem = f"the helper answered HTTP {ex.status}" + (f": {why}" if why else "")
            continue
        if not isinstance(answer, dict) or not isinstance(answer.get("observations"), list):
            ex.problem = "the answer is not the helper's JSON"
            continue
        said = _answer_target(answer)
        if not ex.target:
            ex.target = said
            ex.url = ex.url or said
        elif said and said != ex.target:
            # Requests and answers out of step (a capture that lost a request mid-connection):
            # pairing them would give one site's control to another.
            ex.problem = f"the answer is about {said}, not {ex.target}: request and answer out of step"
            continue
        if not ex.target:
            ex.problem = "neither the request nor the answer names the target"
            continue
        ex.observations, ex.rejected = decode_answer(answer, ex.target, ex.frames, who)
        refused = answer.get("refused")
        if isinstance(refused, list):
            ex.refused = [f"{r.get('address')} ({r.get('reason')})" for r in refused[:50] if isinstance(r, dict)]
    return out
