"""The options and the writer behind ``kzprobe report --format html|json``.

``commands.report`` (the command) decorates itself with :func:`analyst_options` and hands html
and json over to :func:`write_report`.  Only click is imported here, so that listing commands
stays fast; the database, matplotlib and the templates load when a report is written.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

FORMATS = ("html", "json")


def _when(value: str | None, name: str) -> float | None:
    """YYYY-MM-DD or an ISO 8601 time (UTC unless it says otherwise) -> epoch seconds."""
    if value is None:
        return None
    try:
        d = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: not a date (YYYY-MM-DD) or ISO 8601 time", param_hint=name) from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return d.timestamp()


def analyst_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The filters and the output file of the analyst's report (html / json)."""
    opts = [
        click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="File to write (html/json; default: standard output)."),
        click.option("--since", default=None, metavar="DATE", help="Only runs started at or after DATE (UTC)."),
        click.option("--until", default=None, metavar="DATE",
                     help="Only runs started before DATE (UTC; a bare date means its midnight)."),
        click.option("--network", "networks", multiple=True, metavar="NAME",
                     help="Only this vantage network (repeatable; as stored with --network-name)."),
        click.option("--asn", "asns", multiple=True, metavar="ASN",
                     help="Only this ASN (repeatable; AS12345 or 12345)."),
        click.option("--country", "countries", multiple=True, metavar="CC",
                     help="Only this country code (repeatable)."),
        click.option("--list", "list_spec", default=None, metavar="LIST|FILE",
                     help="Only the targets of this list (built-in name or file), matched by domain."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _list_domains(spec: str) -> frozenset[str]:
    from kzprobe.targets import TargetListError, load

    try:
        res = load(spec)
    except TargetListError as exc:
        raise click.ClickException(str(exc)) from None
    if not res.targets:
        raise click.ClickException(f"--list {spec}: no usable target")
    return frozenset(t.host for t in res.targets if t.host)


def check_unused(fmt: str, **analyst: Any) -> None:
    """Filters make sense for the whole-database report only: say so instead of ignoring them."""
    used = [k for k, v in analyst.items() if v not in (None, (), "")]
    if used and fmt not in FORMATS:
        name = {"list_spec": "list", "networks": "network", "asns": "asn", "countries": "country"}
        raise click.UsageError(f"--{name.get(used[0], used[0])} applies to --format html or json")


def write_report(store: Any, run_id: int | None, fmt: str, *, output: Path | None, since: str | None,
                 until: str | None, networks: tuple[str, ...], asns: tuple[str, ...], countries: tuple[str, ...],
                 list_spec: str | None) -> None:
    from kzprobe.report import Filters, build_report, render_html_report, render_json_report

    f = Filters(runs=(run_id,) if run_id is not None else (), since=_when(since, "--since"),
                until=_when(until, "--until"), networks=networks, asns=asns, countries=countries,
                domains=_list_domains(list_spec) if list_spec else frozenset(), list_name=list_spec)
    from sqlalchemy.exc import SQLAlchemyError

    t0 = time.monotonic()
    try:
        rep = build_report(store.engine, f)
    except SQLAlchemyError as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise click.ClickException(f"{store.url}: cannot read it: {exc.__class__.__name__}: {first}") from None
    if not rep["period"]["runs"]:
        asked = f.describe()
        if not asked:
            raise click.ClickException(f"{store.url}: no run stored yet")
        if asked.keys() == {"run"}:
            raise click.ClickException(f"{store.url}: no run {run_id}")
        opts = " ".join(f"--{k} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in asked.items())
        raise click.ClickException(f"{store.url}: no run matches {opts}")
    text = render_html_report(rep) if fmt == "html" else render_json_report(rep)
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"{output}: cannot write: {exc.strerror}") from None
    s = rep["summary"]
    click.echo(f"{output}: {fmt} report of {rep['period']['runs']} run(s), {s['targets']} targets on "
               f"{s['networks']} network(s), {len(text.encode()) / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s",
               err=True)
