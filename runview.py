"""A stored run's verdicts as every command shows them, measured or not.

Why a module of its own: ``run``, ``verdicts``, ``report`` and ``export`` must agree on what a
target that was never measured is.  It is ``not_measured``: never ``inconclusive`` (that would
claim the probe looked and could not tell), never exported as an OONI measurement, and counted
apart in every summary.
"""

from __future__ import annotations

from typing import Any

from kzprobe.model import Observation, Target, Verdict

NOT_MEASURED = "not_measured"

_WHY = {
    "interrupted": "the run was interrupted (Ctrl-C or SIGTERM) before this target's measurement completed",
    "deadline": "the run's --deadline ran out before this target's measurement completed",
    "abandoned": "the measuring process died before this target's measurement completed",
    "failed": "the run stopped on an internal error before this target's measurement completed",
    "running": "the run has not measured this target yet",
}


def not_measured(target: Target, state: str) -> Verdict:
    why = _WHY.get(state, "this target's measurement never completed")
    return Verdict(target=target.url, domain=target.host, status=NOT_MEASURED, rule=NOT_MEASURED,
                   sentence=f"Not measured: {why}; `kzprobe run --resume` measures it.")


def classify_measured(store: Any, run_id: int, targets: list[Target], context: Any) -> dict[str, Verdict]:
    """Classify the given (measured) targets of a run from their stored observations."""
    from kzprobe.analysis import classify_target

    wanted = {t.url: t for t in targets}
    by_target: dict[str, list[Observation]] = {u: [] for u in wanted}
    for o in store.observations(run_id):
        if o.target in by_target:
            by_target[o.target].append(o)
    return {u: classify_target(u, by_target[u], context, domain=wanted[u].host) for u in wanted}


def run_verdicts(store: Any, run_id: int) -> list[Verdict]:
    """Every target of the run, in probe order: its stored verdict, a verdict classified now from
    its observations (a run killed before classifying), or ``not_measured``."""
    from kzprobe.analysis import Context

    info = store.run(run_id)
    state = info.state if info is not None else "done"
    stored = {v.target: v for v in store.verdicts(run_id)}
    states = store.target_states(run_id)
    if not states:  # a run stored without a target list (old imports): what was classified
        return list(stored.values())
    missing = [t for t, measured in states if measured is not None
               and (t.url not in stored or stored[t.url].status == NOT_MEASURED)]
    fresh: dict[str, Verdict] = {}
    if missing:
        vantage = info.vantage if info is not None else {}
        options = info.options if info is not None else {}
        ctx = Context(no_network=bool(vantage.get("no_network")),
                      control_configured=bool(options.get("helpers") or options.get("doh")))
        fresh = classify_measured(store, run_id, missing, ctx)
    out = []
    for t, measured in states:
        if measured is None and t.url in stored and stored[t.url].status != NOT_MEASURED:
            out.append(stored[t.url])  # a run from before targets were marked (schema 1, migrated)
        elif measured is None:
            out.append(not_measured(t, state))
        else:
            out.append(fresh.get(t.url) or stored[t.url])
    return out
