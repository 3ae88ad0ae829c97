"""The analysts' options of `kzprobe verdicts`: filters across runs (--network --asn --country
--since --until, and --list: only a target list's domains, as `kzprobe report` takes them),
--runs to list the matching runs, and verdicts grouped by vantage.  Kept here so that
commands.py only wires them in."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def filter_options(fn: F) -> F:
    opts = [
        click.option("--network", default=None, help="Only runs whose declared network name is this (any case)."),
        click.option("--asn", default=None, help="Only runs from this ASN (AS9198 or 9198)."),
        click.option("--country", default=None, help="Only runs from this country code."),
        click.option("--since", default=None, metavar="DATE", help="Only runs started at or after DATE (UTC ISO)."),
        click.option("--until", default=None, metavar="DATE", help="Only runs started before DATE (UTC ISO)."),
        click.option("--list", "list_spec", default=None, metavar="LIST|FILE",
                     help="Only the targets of this list (built-in name or file), matched by domain."),
        click.option("--runs", "list_runs", is_flag=True, help="List the matching runs instead of verdicts."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def build_filter(network: str | None, asn: str | None, country: str | None, since: str | None,
                 until: str | None) -> Any:
    from kzprobe.storage.query import RunFilter, parse_when

    when: dict[str, float | None] = {}
    for name, text in (("since", since), ("until", until)):
        try:
            when[name] = parse_when(text) if text else None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=f"--{name}") from None
    return RunFilter(network=network, asn=asn, country=country, since=when["since"], until=when["until"])


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""


def emit_runs(store: Any, flt: Any, fmt: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from kzprobe.storage.query import runs

    rows = runs(store, flt)
    if fmt == "json":
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2, ensure_ascii=False))
        return
    if fmt == "jsonl":
        for r in rows:
            click.echo(json.dumps(r.to_dict(), ensure_ascii=False))
        return
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "uid", "network_name", "asn", "country", "started", "ended", "state", "submitter",
                    "observations", "verdicts"])
        for r in rows:
            w.writerow([r.id, r.uid, r.vantage.network or "", r.vantage.asn or "", r.vantage.country or "",
                        _when(r.started), _when(r.ended), r.state, r.submitter or "", r.observations, r.verdicts])
        click.echo(buf.getvalue(), nl=False)
        return
    t = Table(title=f"{len(rows)} run(s)")
    for col in ("run", "vantage", "started", "state", "by", "observations", "verdicts"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(str(r.id), r.vantage.label(), _when(r.started), r.state, r.submitter or "", str(r.observations),
                  str(r.verdicts))
    Console().print(t)


def across_runs(store: Any, run_id: int | None, fmt: str, *, network: str | None, asn: str | None,
                country: str | None, since: str | None, until: str | None, list_spec: str | None,
                list_runs: bool) -> bool:
    """Handle the filters; False when none is given (the single-run view applies)."""
    flt = build_filter(network, asn, country, since, until)
    if list_runs:
        emit_runs(store, flt, fmt)
        return True
    if (flt.active or list_spec) and run_id is None:
        domains = None
        if list_spec:
            from kzprobe.report.cli import _list_domains

            domains = _list_domains(list_spec)
        emit_grouped(store, flt, fmt, domains)
        return True
    return False


def emit_grouped(store: Any, flt: Any, fmt: str, domains: frozenset[str] | None = None) -> None:
    """The latest verdict per target for each vantage among the matching runs."""
    from rich.console import Console

    from kzprobe.commands import verdict_table
    from kzprobe.storage.query import verdicts_by_vantage

    groups = verdicts_by_vantage(store, flt)
    if domains is not None:
        for g in groups:
            g.verdicts = {t: x for t, x in g.verdicts.items() if x[0].domain in domains}
        groups = [g for g in groups if g.verdicts]
    if not groups:
        raise click.ClickException(f"{store.url}: no verdicts in the matching runs")
    if fmt in ("json", "jsonl"):
        out = [{**v.to_dict(), "vantage": g.vantage.to_dict(), "run": rid, "run_started": started,
                "classifier_version": cv}
               for g in groups for v, rid, started, cv in g.verdicts.values()]
        if fmt == "jsonl":
            for item in out:
                click.echo(json.dumps(item, ensure_ascii=False))
        else:
            click.echo(json.dumps(out, indent=2, ensure_ascii=False))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["network_name", "asn", "country", "run", "target", "domain", "status", "mechanism", "detail",
                    "rule", "confidence", "observations", "classifier_version", "sentence"])
        for g in groups:
            for v, rid, _started, cv in g.verdicts.values():
                w.writerow([g.vantage.network or "", g.vantage.asn or "", g.vantage.country or "", rid, v.target,
                            v.domain, v.status, v.mechanism or "", v.detail or "", v.rule, f"{v.confidence:.2f}",
                            " ".join(map(str, v.observations)), cv or "", v.sentence])
        click.echo(buf.getvalue(), nl=False)
    else:
        console = Console()
        for g in groups:
            title = f"{g.vantage.label()} (latest of run(s) {', '.join(map(str, g.runs))})"
            console.print(verdict_table([v for v, *_ in g.verdicts.values()], title=title))
