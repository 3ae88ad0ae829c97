"""Time-boxed outages (``[[outage]]``, lab/endpoints.py) during ``kzprobe lab run``.

The 13 February 2014 cut of WhatsApp and Viber in Almaty lasted about 1.5 hours; a measurement
sees it only if it falls inside that window.  The lab reproduces this with a rule that is added
and removed while the run goes on, in three rounds of ``kzprobe run`` from the volunteer:

1. *before*: the scenario's main run (every target, the outage's rule absent);
2. the outage's nftables table is added on its hop: the window opens (``opened``, wall clock after
   ``nft`` returned); *during*: kzprobe measures the outage's ``measure`` targets; the rule stays
   at least ``hold`` seconds; the table is deleted: the window closes (``closed``, wall clock
   before ``nft delete`` ran, so the rule was certainly in place from ``opened`` to ``closed``);
3. *after*: the same targets again.

Each row gets ``measured``: the first start and last end of the probe-side observations of its
target in kzprobe's database for that round's run, so that whoever reads the result can check
which measurements fell inside the window by their own timestamps.  Inside the window an
outage target is expected to be ``expect``/``detail``; every other measured target, and every
target outside the window, keeps its own expectation.  The window is measured in rounds rather
than by a timer racing kzprobe: a measurement straddling an edge would say nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kzprobe.lab import rules
from kzprobe.lab.endpoints import Outage
from kzprobe.lab.topology import LabError, run

if TYPE_CHECKING:
    from kzprobe.lab.core import Lab

#: Sentinel for rows outside any window: their expectation is the scenario's own.
BEFORE, DURING, AFTER = "before", "during", "after"


def measured_spans(db: Path, run_id: int, targets: list[str]) -> dict[str, list[float]]:
    """target -> [first start, last end] of its probe-side observations in run ``run_id``."""
    from kzprobe.storage import Store  # SQLAlchemy: only when a lab run reads its results

    store = Store(db)
    spans: dict[str, list[float]] = {}
    for t in targets:
        obs = [o for o in store.observations(run_id, t) if o.vantage == "probe"]
        if obs:
            spans[t] = [min(o.t_start for o in obs), max(o.t_end for o in obs)]
    return spans


def _row(lab: Lab, target: str, verdict: dict[str, Any] | None, expect: str, detail: str, reason: str,
         round_: str, outage: Outage, window: list[float], span: list[float] | None) -> dict[str, Any]:
    from kzprobe.lab.core import verdict_label

    e = next(x for x in lab.scenario.endpoints if x.target == target)
    got = verdict_label(verdict) if verdict else "missing"
    got_detail = (verdict or {}).get("detail")
    # What acts on the target in this round: the outage's method too, inside its window.
    inside = round_ == DURING and target in outage.targets
    methods, hop = ([*e.methods, outage.method], outage.hop) if inside else (list(e.methods), e.hop)
    return {
        "target": target, "domain": e.host, "address": e.address, "methods": methods, "hop": hop,
        "expect": expect, "expect_detail": detail or None, "got": got, "got_detail": got_detail,
        "match": got == expect and (not detail or got_detail == detail), "reason": reason,
        "verdict": verdict, "round": round_, "outage": outage.name, "window": window, "measured": span,
    }


def _run_id(doc: dict[str, Any]) -> int:
    run_info = doc.get("run")
    if not isinstance(run_info, dict) or not isinstance(run_info.get("id"), int):
        raise LabError("kzprobe run's JSON has no run id: cannot place its measurements in the outage's window")
    return int(run_info["id"])


def run_windows(lab: Lab, timeout: float, main_doc: dict[str, Any],
                rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every outage's during/after rounds; return all rows (the main ones marked ``before``
    with their measured spans) and one summary per window."""
    from kzprobe.lab.core import run_probe_doc

    db = lab.state_dir / "run.db"
    main_spans = measured_spans(db, _run_id(main_doc), [r["target"] for r in rows])
    rows = [r | {"round": BEFORE, "measured": main_spans.get(r["target"])} for r in rows]
    windows: list[dict[str, Any]] = []
    by_target = {e.target: e for e in lab.scenario.endpoints}
    for i, o in enumerate(lab.scenario.outages):
        targets_file = lab.state_dir / f"outage-{i}.txt"
        targets_file.write_text("".join(f"{t}\n" for t in o.measure))
        table = rules.outage_nft_rules(o, lab.scenario.endpoints)
        ns = lab.ns_name(o.hop)
        run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=table)
        opened = time.time()
        try:
            during = run_probe_doc(lab, timeout, db, targets_file)
            rest = o.hold - (time.time() - opened)
            if rest > 0:
                time.sleep(rest)
        finally:
            closed = time.time()
            run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", rules.OUTAGE_TABLE])
        after = run_probe_doc(lab, timeout, db, targets_file)
        window = [opened, closed]
        for round_, doc in ((DURING, during), (AFTER, after)):
            spans = measured_spans(db, _run_id(doc), list(o.measure))
            got = {v.get("target"): v for v in doc["verdicts"]}
            for t in o.measure:
                e = by_target[t]
                inside = round_ == DURING and t in o.targets
                rows.append(_row(lab, t, got.get(t), o.expect if inside else e.expect,
                                 o.detail if inside else e.detail, o.reason if inside else e.reason,
                                 round_, o, window, spans.get(t)))
        windows.append({"name": o.name, "date": o.date, "hop": o.hop, "method": o.method,
                        "targets": list(o.targets), "opened": opened, "closed": closed,
                        "runs": {DURING: _run_id(during), AFTER: _run_id(after)}})
    return rows, windows
