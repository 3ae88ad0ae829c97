"""``kzprobe report``: a run's verdicts, counts, the report's claims beside the measurements,
and trace results beside the verdict of a traced target."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from kzprobe.model import Target, Verdict


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "-"


def _traces_by_domain(traces: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for t in traces:
        key = str(t.get("target") or "")
        out.setdefault(key, []).append(t)
    return out


def _trace_text(t: dict[str, Any]) -> str:
    if t.get("result") == "censor_located":
        return (f"trace ({t.get('trigger')}): censor at hop {t.get('hop_ttl')} ({t.get('hop_address')}), "
                f"{t.get('placement')}, {t.get('triggered_by')}-triggered")
    return f"trace ({t.get('trigger')}): {t.get('result')}"


def _trace_evidence(t: dict[str, Any]) -> str:
    ev = t.get("evidence")
    if isinstance(ev, dict):
        return str(ev.get("sentence") or "")
    return str(ev or "")


def _match_traces(v: Verdict, traces: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return traces.get(v.target, []) + (traces.get(v.domain, []) if v.domain != v.target else [])


def render_markdown(run: Any, targets: list[Target], verdicts: list[Verdict], traces: list[dict[str, Any]]) -> str:
    by_url = {t.url: t for t in targets}
    tr = _traces_by_domain(traces)
    lines = [f"# kzprobe report — run {run.id}", "",
             f"Started {_when(run.started)}, ended {_when(run.ended)}, state {run.state}, source {run.source}.", ""]
    if run.vantage.get("no_network"):
        lines += ["**The vantage point had no network during this run: no verdict says anything about blocking.**",
                  ""]
    counts = Counter(v.label for v in verdicts)
    lines += ["## Counts", "", "| verdict | targets |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in sorted(counts.items())]
    lines += ["", "## Verdicts", "", "| target | status | mechanism | detail | rule | confidence | evidence |",
              "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        ev = v.sentence.replace("|", "\\|")
        extra = "; ".join(_trace_text(t) for t in _match_traces(v, tr))
        if extra:
            ev += f" — {extra}"
        ids = ", ".join(map(str, v.observations[:8]))
        lines.append(f"| {v.target} | {v.status} | {v.mechanism or ''} | {v.detail or ''} | {v.rule} | "
                     f"{v.confidence:.2f} | {ev} (obs {ids}) |")
    claimed = [(by_url[v.target], v) for v in verdicts if v.target in by_url and by_url[v.target].claim]
    if claimed:
        lines += ["", "## What the report claims, and what this run measured", ""]
        for t, v in claimed:
            c = t.claim
            assert c is not None
            lines += [f"### {t.host}", "",
                      f"> {c.quote}", ">",
                      f"> — {c.section or 'report'}" + (f", footnote {c.footnote}" if c.footnote else "")
                      + (f", {c.dates}" if c.dates else "") + (f"; mechanism: {c.mechanism}" if c.mechanism else ""),
                      "", f"**Measured:** {v.label}" + (f" ({v.detail})" if v.detail else "") + f" — {v.sentence}"]
            for trace in _match_traces(v, tr):
                lines.append(f"**Trace:** {_trace_text(trace)}. {_trace_evidence(trace)}")
            lines.append("")
    return "\n".join(lines)


def render_terminal(console: Console, run: Any, targets: list[Target], verdicts: list[Verdict],
                    traces: list[dict[str, Any]]) -> None:
    by_url = {t.url: t for t in targets}
    tr = _traces_by_domain(traces)
    console.print(f"[bold]kzprobe report — run {run.id}[/]  started {_when(run.started)}  state {run.state}")
    if run.vantage.get("no_network"):
        console.print("[bold red]The vantage point had no network during this run.[/]")
    counts = Counter(v.label for v in verdicts)
    console.print("  ".join(f"{k}: {n}" for k, n in sorted(counts.items())))
    t = Table(show_lines=False)
    for col in ("target", "verdict", "detail", "rule", "conf", "evidence", "report claim"):
        t.add_column(col, overflow="fold")
    for v in verdicts:
        target = by_url.get(v.target)
        claim = target.claim.quote if target and target.claim else ""
        ev = v.sentence
        extra = "; ".join(_trace_text(x) for x in _match_traces(v, tr))
        if extra:
            ev += f"\n{extra}"
        t.add_row(v.target, v.label, v.detail or "", v.rule, f"{v.confidence:.2f}", ev,
                  claim[:120] + ("…" if len(claim) > 120 else ""))
    console.print(t)
