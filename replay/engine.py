"""Streaming reconstruction of DNS, TCP, TLS and HTTP from packets: the pass over a capture.

State is bounded: flows idle for longer than ``idle`` seconds (capture time) are finished and
dropped, the number of live flows is capped, and only the first bytes of each direction of a
flow are kept (see :class:`~kzprobe.replay.state.Limits`).  A finished flow becomes
:class:`Observation` records (the one model every source feeds) plus human "findings" that cite
packet numbers.  The concerns live in their own modules: :mod:`.flows` (TCP and ICMP),
:mod:`.dns`, :mod:`.trigger` (outcome and injection), :mod:`.naming`, :mod:`.helperflows`.

A capture rotated across several files (``tcpdump -C`` / ``-G``) is one run: :meth:`Replayer.
replay_run` carries the flow state from one file into the next, and numbers packets as the
files' concatenation would (``mergecap -a``), so that evidence stays unambiguous.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kzprobe.model import MEASURE, Target
from kzprobe.replay import chains, dns, flows, kinds, naming, trigger
from kzprobe.replay.flows import Flow
from kzprobe.replay.pcapio import CaptureError, ReadResult, iter_frames, iter_packets
from kzprobe.replay.state import FileReplay, FileState, Finding, Limits, span

if TYPE_CHECKING:
    from kzprobe.analysis.fingerprints import Fingerprints

#: Rotated files join into one run when the next file starts no later than this after the
#: previous one ended (capture time): the flow idle timeout, past which nothing carries over.
JOIN_GAP = 60.0


@dataclass(frozen=True)
class FileError:
    """A capture that could not be replayed at all: its path and a one-line reason."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class Replayer:
    """Feed captures with :meth:`replay_file` (or :meth:`replay_run`); observations get running
    ids across files."""

    def __init__(self, fingerprints: Fingerprints | None = None, *, idle: float = 60.0,
                 dns_idle: float = 10.0, max_flows: int = 50_000, buf_cap: int = 4096,
                 helper_budget: int = 64 << 20, targets: Iterable[Target | str] = ()) -> None:
        #: Blockpage fingerprints (None: the project's file, as the live probe uses).
        self.fingerprints = fingerprints
        self.limits = Limits(idle=idle, dns_idle=dns_idle, max_flows=max_flows, buf_cap=buf_cap,
                             helper_budget=helper_budget)
        self.next_id = 1
        #: The kind targets (tor-or://, tcp://, ...) the captures measured: their flows are mapped
        #: to them by address and port (replay/kinds.py).  URL targets name themselves.
        self.kind_targets = kinds.kind_targets(targets)

    def replay_file(self, path: str) -> FileReplay:
        """One capture.  Raises :class:`CaptureError` only when the file is not a capture at all."""
        return self.replay_run([path])

    def replay_run(self, paths: Sequence[str]) -> FileReplay:
        """Several files of one capture, in order, as one.  A file that cannot be opened as a
        capture raises :class:`CaptureError` before anything is read from the others."""
        for p in paths[1:]:
            first_timestamp(p)  # fail early, naming the file
        res = ReadResult(path=str(paths[0]))
        out = FileReplay(res, paths=[str(p) for p in paths])
        st = FileState(str(paths[0]), out, self.limits, self.fingerprints, self.next_id)
        st.kind_targets = self.kind_targets
        base = 0
        for i, path in enumerate(paths):
            part = res if i == 0 else ReadResult()
            base = self._pass(st, str(path), part, base)
            if i:
                res.frames += part.frames
                res.linktypes |= part.linktypes
                res.warnings += [f"{path}: {w}" for w in part.warnings]
                if part.error and res.error is None:
                    res.error, res.error_offset, res.error_frame = (
                        f"{path}: {part.error}", part.error_offset, (part.error_frame or 0) + base - part.frames)
        self._finish(st)
        self.next_id = st.next_id
        return out

    def _pass(self, st: FileState, path: str, res: ReadResult, base: int) -> int:
        """Feed one file's packets, numbered from ``base``; returns the next base."""
        lim = self.limits
        table = st.flows
        on_tcp, on_udp, on_icmp = flows.on_tcp, dns.on_udp, flows.on_icmp
        next_sweep: float | None = None
        count = 0
        st.reading = res
        for p in iter_packets(path, res):
            count += 1
            if base:
                p = p._replace(number=p.number + base)
            # One unpack (field order checked in flows._FIELDS) beats attribute reads per packet.
            _n, ts, _v, _s, _d, _ttl, _id, proto, sport, dport, _f, _sq, _ak, _r, _po, _pe, _it, _ic, inner = p
            if proto == 6:
                if sport is not None:
                    on_tcp(st, p)
            elif proto == 17:
                if sport == 53 or dport == 53:
                    on_udp(st, p)
            elif inner is not None:
                on_icmp(st, p)
            if ts > st.now:
                st.now = ts
                if next_sweep is None:
                    next_sweep = ts + 5.0
                elif ts >= next_sweep:
                    next_sweep = ts + 5.0
                    flows.sweep(st, ts)
            if len(table) > lim.max_flows:
                flows.evict(st)
        st.ingest_keylog()  # secrets the file held, for flows that go on in the next file of a rotated run
        st.out.packets += count
        return base + res.frames

    def _finish(self, st: FileState) -> None:
        for fl in list(st.flows.values()):
            flows.finish(st, fl, at_end=True)
        st.flows.clear()
        for tx in list(st.dns.values()):
            dns.finish(st, tx, at_end=True)
        st.dns.clear()
        naming.resolve_pending(st)
        trigger.throttle_findings(st)
        dns.outliers(st)
        dns.fold(st)
        kinds.claim_lookups(st, naming.all_kind_targets(st))
        chains.link(st)  # after every observation is out, the lookups (folded last) included
        _summarise(st)


def _summarise(st: FileState) -> None:
    if st.loss is not None:
        n, why = st.loss
        st.find("", "capture_loss", [n], f"the capture dropped packets ({why}): a missing answer in it is not by "
                                         "itself evidence of blocking")
    if st.expired:
        ns = sorted(st.expired)
        st.find("", "expired", ns[:20], f"packets {span(ns)}: {len(ns)} trigger(s) expired in transit (ICMP "
                                        "time-exceeded quoting them): TTL-limited probes, not timeouts")
    if st.undelivered:
        ns = sorted(st.undelivered)
        st.find("", "undelivered", ns[:20], f"packets {span(ns)}: {len(ns)} TTL-limited trigger(s) got no answer "
                                            "and no ICMP: they did not reach the server")


def first_timestamp(path: str) -> float | None:
    """The first frame's timestamp (None for a capture without frames).  Raises CaptureError."""
    for _n, ts, _lt, _frame in iter_frames(path):
        return ts
    return None


def _span_of(path: str) -> tuple[float, float] | None:
    first = last = None
    for _n, ts, _lt, _frame in iter_frames(path):
        if first is None:
            first = ts
        last = ts
    return (first, last) if first is not None and last is not None else None


def group_rotated(paths: Sequence[str]) -> tuple[list[list[str]], list[FileError]]:
    """Group files into runs: files named alike (the same folder, and the same name once digits
    are left out: ``cap.pcap``, ``cap.pcap1`` ... from ``tcpdump -C``; strftime names from ``-G``)
    whose capture times follow one another (the next one starts at or after the previous one's
    last packet, within ``JOIN_GAP``) are one rotated capture.  Times alone would join two
    separate captures recorded back to back.

    Files are ordered by their first packet, as ``mergecap -a`` would need them.  A file that is
    not a capture comes back as a :class:`FileError` and is left out.
    """
    spans: list[tuple[float, float, int, str]] = []
    errors: list[FileError] = []
    empty: list[str] = []
    for i, p in enumerate(paths):
        try:
            sp = _span_of(p)
        except CaptureError as exc:
            errors.append(FileError(p, _reason(exc, p)))
            continue
        except OSError as exc:
            errors.append(FileError(p, exc.strerror or str(exc)))
            continue
        if sp is None:
            empty.append(p)
        else:
            spans.append((sp[0], sp[1], i, p))
    spans.sort()
    groups: list[list[str]] = []
    ends: dict[tuple[str, str], tuple[int, float]] = {}  # stem -> (its open group, last timestamp)
    for first, last, _i, p in spans:
        stem = _stem(p)
        open_ = ends.get(stem)
        if open_ is not None and open_[1] <= first <= open_[1] + JOIN_GAP:
            groups[open_[0]].append(p)
            ends[stem] = (open_[0], last)
        else:
            groups.append([p])
            ends[stem] = (len(groups) - 1, last)
    groups += [[p] for p in empty]
    return groups, errors


def _stem(path: str) -> tuple[str, str]:
    folder, name = os.path.split(os.path.abspath(path))
    return folder, re.sub(r"\d+", "", name)


def _reason(exc: CaptureError, path: str) -> str:
    msg = str(exc)
    return msg[len(path) + 2:] if msg.startswith(f"{path}: ") else msg


def replay(paths: Iterable[str], fingerprints: Fingerprints | None = None) -> list[FileReplay]:
    r = Replayer(fingerprints)
    return [r.replay_file(p) for p in paths]


__all__ = ["JOIN_GAP", "MEASURE", "FileError", "FileReplay", "Finding", "Flow", "Replayer", "group_rotated",
           "replay"]
