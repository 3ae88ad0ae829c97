"""Glue between the flow table and :mod:`.control`: the probe's exchanges with its helper.

A flow whose first client bytes are ``POST /v1/control`` is the probe asking its control helper;
it is reassembled in full (under a per-file budget) instead of being read as a target, and its
answers become control observations.  Once one helper endpoint is known, an answer from it on a
flow whose request the capture lost is recognised too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kzprobe.replay import control
from kzprobe.replay.control import HelperStreams
from kzprobe.replay.pcapio import _ntop
from kzprobe.replay.state import FileState

if TYPE_CHECKING:
    from kzprobe.replay.flows import Flow


def answer(st: FileState, fl: Flow, s: bytes, sp: int, seq: int, payload: bytes, n: int) -> None:
    """A capture that lost a helper request (or the flow's start) still holds the answer: an HTTP
    response from an endpoint already known, by a request line, as a helper."""
    if (s, sp) in st.helper_eps and payload.startswith(b"HTTP/1."):
        fl.helper = HelperStreams(s, sp, None, seq)
        segment(st, fl.helper, False, seq, payload, n)


def segment(st: FileState, hs: HelperStreams, from_client: bool, seq: int, payload: bytes, n: int) -> None:
    used = (hs.cli if from_client else hs.srv).add(seq, payload, n, st.helper_budget)
    st.helper_budget -= used


def finish(st: FileState, fl: Flow, hs: HelperStreams) -> None:
    """The helper's answers become control observations of the targets they were asked for."""
    where = f"{_ntop(hs.srv_b)}:{hs.sport}"
    if hs.cli.ooo or hs.srv.ooo:
        first = min(f for _p, f in (*hs.cli.ooo.values(), *hs.srv.ooo.values()))
        st.lost(first, f"packet {first} follows a gap that the capture never fills")
    for ex in control.exchanges(hs, who=f"the helper at {where} (in the capture)"):
        if "://" in ex.target:  # a kind target (tcp://, tor-or://, ...): its flows are mapped by address
            st.helper_kind_urls[ex.target] = None
        for o in ex.observations:
            st.emit(o)
        first = (ex.frames or ex.request_frames or [fl.first_n])[0]
        if not ex.request_frames:
            st.lost(first, f"packet {first} answers a request to the helper that the capture does not hold")
        if ex.problem:
            st.find(ex.target, "control_missing", ex.frames[:1] or ex.request_frames[:1],
                    f"packet {first}: no control for {ex.url or '?'} from the helper at {where}: {ex.problem}")
        if ex.rejected:
            st.find(ex.target, "control_rejected", ex.frames[:1],
                    f"packet {first}: the answer of the helper at {where} for {ex.url} is rejected: {ex.rejected}")
        if ex.refused:
            st.find(ex.target, "control_refused", ex.frames[:1],
                    f"packet {first}: the helper at {where} refused to measure {', '.join(ex.refused)} for {ex.url}")
