"""Which target each flow is about, and which flows are follow-ups rather than targets.

A TLS or HTTP flow names itself (SNI / Host).  A flow that never got that far (a handshake that
timed out) is named after what other flows or DNS said about its address.  A flow to an address
that DNS gave for another name, carrying a different SNI/Host, is that name's follow-up
(kzprobe's benign-SNI/Host check), not a target of its own.
"""

from __future__ import annotations

from collections import Counter

from kzprobe.model import FOLLOWUP, PEEK, STEP_HTTP, STEP_TLS, Observation, Target
from kzprobe.replay import kinds
from kzprobe.replay.state import SOURCE, FileState


def resolve_pending(st: FileState) -> None:
    """Name the flows' observations and emit them, with their findings."""
    attempts: Counter[tuple[str, str]] = Counter()
    _mark_peeks(st)
    claimed = kinds.claim_flows(st, all_kind_targets(st))
    for obs, unnamed in st.pending:
        if id(obs) in claimed:  # a kind target's (tcp://, tor-or://, ...): named by its URL already
            st.emit(obs, attempts)
            continue
        if unnamed or not obs.domain:
            obs.domain = name_of(st, obs.address or "")
        owners = st.dns_names.get(obs.address or "", set())
        if (obs.step in (STEP_TLS, STEP_HTTP) or not unnamed) and owners and obs.domain not in owners:
            for owner in sorted(owners):
                st.emit(followup(obs, owner), attempts)
            continue
        obs.target = obs.domain
        st.emit(obs, attempts)
    st.pending.clear()
    for addr, kind, packets, sentence in st.pfind:
        st.find(name_of(st, addr), kind, packets, sentence)
    st.pfind.clear()


def all_kind_targets(st: FileState) -> list[Target]:
    """The kind targets replay was told of, and those the probe asked its helper about."""
    return kinds.kind_targets([*st.kind_targets, *kinds.helper_targets(st)])


def name_of(st: FileState, addr: str) -> str:
    """The name a flow without SNI / Host of its own is about: a name seen (SNI / Host) at its
    address that DNS also gave it, else DNS's, else the most seen, else the address itself.
    DNS comes first because follow-ups put a benign name on the same address."""
    names = st.names.get(addr)
    owners = st.dns_names.get(addr)
    if names and owners:
        own = [(count, -i, name) for i, (name, count) in enumerate(names.items()) if name in owners]
        return max(own)[2] if own else sorted(owners)[0]
    if names:
        return names.most_common(1)[0][0]
    if owners:
        return sorted(owners)[0]
    return addr


def followup(obs: Observation, owner: str) -> Observation:
    return Observation(step=obs.step, target=owner, domain=obs.domain, source=SOURCE, address=obs.address,
                       port=obs.port, t_start=obs.t_start, t_end=obs.t_end, failure=obs.failure,
                       purpose=FOLLOWUP, data=dict(obs.data), packets=list(obs.packets))


def _mark_peeks(st: FileState) -> None:
    """A page read inside TLS (with the capture's secrets) from an address and name whose
    certificate a client rejected on another flow is the live probe's peek: its GET without
    validation after that failure (purpose PEEK), never the site being reachable."""
    rejected = {(o.address, o.data.get("sni")) for o, _ in st.pending
                if o.step == STEP_TLS and o.data.get("outcome") == "cert_rejected"}
    if not rejected:
        return
    for o, _ in st.pending:
        if o.step == STEP_HTTP and o.data.get("tls_decrypted") and (o.address, o.domain) in rejected:
            o.purpose = PEEK
