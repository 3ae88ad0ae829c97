"""The volunteer's and analyst's commands: run, targets, verdicts, report.

Thin by design: option parsing and presentation only; the work is in probes/, analysis/ and
storage/.  Every user mistake becomes a one-line ``click.ClickException``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import Counter
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from kzprobe.model import Target, Verdict
from kzprobe.report.cli import analyst_options, check_unused, write_report
from kzprobe.storage.query_cli import across_runs, filter_options

# soft_wrap: a warning is one line (file:line: reason), whatever the terminal width.
err = Console(stderr=True, soft_wrap=True)

STATUS_STYLE = {"ok": "green", "blocked": "bold red", "down": "yellow", "inconclusive": "magenta"}


def _load_targets(list_name: str | None, targets_file: str | None, strict: bool) -> list[Target]:
    from kzprobe.targets import TargetListError, load, load_builtin

    try:
        if targets_file:
            res = load(targets_file)
            for line in res.errors:
                err.print(f"[yellow]warning:[/] {line}", highlight=False)
            if res.errors and strict:
                raise click.ClickException(f"{len(res.errors)} bad line(s) in {targets_file} (--strict)")
            if not res.targets:
                raise click.ClickException(f"{targets_file}: no usable target")
            return res.targets
        return load_builtin(list_name or "kz2014")
    except TargetListError as exc:
        raise click.ClickException(str(exc)) from None


def _open_store(db: str | None) -> Any:
    from kzprobe.storage import StorageError, Store

    try:
        return Store(db)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None


def verdict_table(verdicts: list[Verdict], title: str = "Verdicts") -> Table:
    t = Table(title=title, show_lines=False)
    for col in ("target", "status", "mechanism", "detail", "rule", "conf", "evidence"):
        t.add_column(col, overflow="fold")
    for v in verdicts:
        t.add_row(v.target, f"[{STATUS_STYLE.get(v.status, '')}]{v.status}[/]", v.mechanism or "",
                  v.detail or "", v.rule, f"{v.confidence:.2f}", v.sentence)
    return t


def emit_verdicts(verdicts: list[Verdict], fmt: str, extra: dict[str, dict[str, Any]] | None = None) -> None:
    if fmt == "json":
        out = [{**v.to_dict(), **(extra or {}).get(v.target, {})} for v in verdicts]
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["target", "domain", "status", "mechanism", "detail", "rule", "confidence", "observations",
                    "packets", "sentence"])
        for v in verdicts:
            w.writerow([v.target, v.domain, v.status, v.mechanism or "", v.detail or "", v.rule,
                        f"{v.confidence:.2f}", " ".join(map(str, v.observations)),
                        " ".join(map(str, v.packets)), v.sentence])
        click.echo(buf.getvalue(), nl=False)
    else:
        Console().print(verdict_table(verdicts))


@click.command()
@click.option("--list", "list_name", default=None, help="Built-in target list (default: kz2014).")
@click.option("--targets", "targets_file", type=click.Path(dir_okay=False), default=None,
              help="Citizen Lab test-list CSV or plain text (one URL or host per line).")
@click.option("--strict", is_flag=True, help="Fail before probing if the target file has a bad line.")
@click.option("--resolver", "resolvers", multiple=True, metavar="IP[:PORT]",
              help="An explicit resolver, queried over UDP and TCP (repeatable).")
@click.option("--system-resolver/--no-system-resolver", default=True, show_default=True,
              help="Also resolve with the system resolver (getaddrinfo).")
@click.option("--ca-bundle", "ca_bundles", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Extra trusted CA certificates (PEM), e.g. a lab CA.")
@click.option("--db", default=None, help="SQLite path or SQLAlchemy URL (default: ~/.local/share/kzprobe/kzprobe.db).")
@click.option("--helper", "helpers", multiple=True, metavar="URL",
              help="Control helper URL (repeatable); '#token=T' appends a shared token.")
@click.option("--doh", multiple=True, metavar="URL",
              help="DNS-over-HTTPS control when no helper answers (repeatable; 'default' = well-known resolvers).")
@click.option("--control-sni", default="example.com", show_default=True,
              help="Benign SNI / Host for follow-ups on the same address.")
@click.option("--fingerprints", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Extra blockpage fingerprint CSV (ooni/blocking-fingerprints format).")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 120),
              help="Per-step timeout (s).")
@click.option("--deadline", default=None, type=click.FloatRange(1, None), help="Overall deadline for the run (s).")
@click.option("--concurrency", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar on stderr.")
@click.option("--source-address", default=None, metavar="IP", help="Source address for connections.")
@click.option("--network-name", default=None, help="Vantage metadata: the network's name (stored).")
@click.option("--asn", default=None, help="Vantage metadata: the network's ASN (stored).")
@click.option("--country", default=None, help="Vantage metadata: country code (stored).")
@click.option("--upload", "upload_url", default=None, metavar="URL",
              help="After the run, upload it to this collector in the background (never waits on it).")
@click.option("--upload-token-file", type=click.Path(dir_okay=False), default=None,
              help="Upload token file (else $KZPROBE_UPLOAD_TOKEN).")
def run(list_name: str | None, targets_file: str | None, strict: bool, resolvers: tuple[str, ...],
        system_resolver: bool, ca_bundles: tuple[str, ...], db: str | None, helpers: tuple[str, ...],
        doh: tuple[str, ...], control_sni: str, fingerprints: tuple[str, ...], timeout: float,
        deadline: float | None, concurrency: int, fmt: str, progress: bool, source_address: str | None,
        network_name: str | None,
        asn: str | None, country: str | None, upload_url: str | None, upload_token_file: str | None) -> None:
    """Probe a target list and print a verdict per target.

    Every step (DNS, TCP, TLS, HTTP) is stored as it completes, so an interrupted run keeps what
    it measured.  The probe's own public IP address is never stored.
    """
    from kzprobe.probes import dns as dnsprobe

    for r in resolvers:
        try:
            dnsprobe.parse_resolver(r)
        except ValueError as exc:
            raise click.BadParameter(f"{r!r}: {exc}", param_hint="--resolver") from None
    if upload_url:
        from kzprobe.collector.upload_cli import check_upload_options

        check_upload_options(upload_url, upload_token_file)
    targets = _load_targets(list_name, targets_file, strict)
    store = _open_store(db)

    from kzprobe.analysis.fingerprints import FingerprintError
    from kzprobe.probes.engine import ProbeConfig
    from kzprobe.probes.runner import Runner

    cfg = ProbeConfig(resolvers=list(resolvers), system_resolver=system_resolver, ca_bundles=list(ca_bundles),
                      timeout=timeout, concurrency=concurrency, control_sni=control_sni,
                      fingerprints=list(fingerprints), source_address=source_address)
    vantage = {"resolvers": dnsprobe.system_resolvers() if system_resolver else [],
               "explicit_resolvers": list(resolvers), "network_name": network_name, "asn": asn,
               "country": country}
    show = progress and sys.stderr.isatty()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]probing"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=err, disable=not show)
    task = bar.add_task("run", total=len(targets), counts="")

    def on_progress(done: int, _total: int, counts: dict[str, int]) -> None:
        text = " ".join(f"{k}={v}" for k, v in counts.items() if v)
        bar.update(task, completed=done, counts=text)

    try:
        with bar:
            runner = Runner(store, cfg, helpers=list(helpers), doh=list(doh), deadline=deadline,
                            vantage=vantage, progress=on_progress)
            result = runner.run(targets)
    except FingerprintError as exc:
        raise click.ClickException(str(exc)) from None
    if result.no_network:
        err.print("[bold red]The vantage point has no network[/] (no route other than loopback): every target "
                  "is inconclusive; nothing here says anything about blocking.", highlight=False)
    if result.interrupted:
        err.print(f"[yellow]Interrupted:[/] what was measured is kept in run {result.run_id}.")
    for line in result.internal_errors:
        err.print(f"[bold red]internal error (please report):[/] {line}", highlight=False)
    for note in result.control_notes[:5]:
        err.print(f"[dim]control: {note}[/]", highlight=False)
    emit_verdicts(result.verdicts, fmt)
    counts = Counter(v.label for v in result.verdicts)
    err.print(f"run {result.run_id} stored in {store.url}: "
              + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())), highlight=False)
    if upload_url:
        from kzprobe.collector.upload_cli import start_background_upload

        err.print(start_background_upload(store.url, upload_url, upload_token_file), highlight=False)
    if result.interrupted:
        sys.exit(130)


@click.command()
@click.option("--list", "list_name", default=None, help="Built-in target list (default: kz2014).")
@click.option("--targets", "targets_file", type=click.Path(dir_okay=False), default=None,
              help="Citizen Lab test-list CSV or plain text.")
@click.option("--strict", is_flag=True, help="Fail if the file has a bad line.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def targets(list_name: str | None, targets_file: str | None, strict: bool, fmt: str) -> None:
    """Show a target list (built-in, or imported from a file)."""
    ts = _load_targets(list_name, targets_file, strict)
    if fmt == "json":
        click.echo(json.dumps([t.to_dict() for t in ts], indent=2, ensure_ascii=False))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["url", "category", "claim_quote", "claim_section", "claim_footnote", "claim_dates",
                    "claim_mechanism"])
        for t in ts:
            c = t.claim
            w.writerow([t.url, t.category, c.quote if c else "", c.section if c else "", c.footnote if c else "",
                        c.dates if c else "", c.mechanism if c else ""])
        click.echo(buf.getvalue(), nl=False)
    else:
        table = Table(title=f"{len(ts)} targets")
        for col in ("url", "category", "claim"):
            table.add_column(col, overflow="fold")
        for t in ts:
            table.add_row(t.url, t.category, (t.claim.quote[:90] + "…") if t.claim and len(t.claim.quote) > 90
                          else (t.claim.quote if t.claim else ""))
        Console().print(table)


def _pick_run(store: Any, run_id: int | None) -> int:
    rid = run_id if run_id is not None else store.latest_run_id()
    if rid is None:
        raise click.ClickException(f"{store.url}: no run stored yet")
    if store.run(rid) is None:
        raise click.ClickException(f"{store.url}: no run {rid}")
    return int(rid)


def stored_verdicts(store: Any, rid: int) -> list[Verdict]:
    """The run's verdicts; a run killed before classifying is classified from its observations."""
    vs: list[Verdict] = store.verdicts(rid)
    if vs:
        return vs
    from kzprobe.analysis import Context, classify

    info = store.run(rid)
    ctx = Context(no_network=bool(info and info.vantage.get("no_network")))
    ts = store.targets(rid)
    return classify(store.observations(rid), ctx, targets=[t.url for t in ts])


@click.command()
@click.option("--db", default=None, help="SQLite path or SQLAlchemy URL (postgresql://... for a collector's).")
@click.option("--run", "run_id", type=int, default=None, help="Run id (default: the latest).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@filter_options
def verdicts(db: str | None, run_id: int | None, fmt: str, **filters: Any) -> None:
    """Show the verdicts of a stored run; with filters, across runs grouped by vantage."""
    store = _open_store(db)
    if across_runs(store, run_id, fmt, **filters):
        return
    rid = _pick_run(store, run_id)
    emit_verdicts(stored_verdicts(store, rid), fmt)


@click.command()
@click.option("--db", default=None, help="SQLite path or SQLAlchemy URL.")
@click.option("--run", "run_id", type=int, default=None,
              help="Run id (default: the latest; html/json: every run that matches the filters).")
@click.option("--format", "fmt", type=click.Choice(["terminal", "markdown", "html", "json"]), default="terminal",
              show_default=True, help="html: one self-contained page over the whole database; json: its data.")
@analyst_options
def report(db: str | None, run_id: int | None, fmt: str, **analyst: Any) -> None:
    """A blocking report: for a stored run (terminal, markdown), or across runs, networks and time
    (html, json; see kzprobe.report)."""
    from kzprobe.reporting import render_markdown, render_terminal

    check_unused(fmt, **analyst)
    if fmt in ("html", "json"):
        write_report(_open_store(db), run_id, fmt, **analyst)
        return
    store = _open_store(db)
    rid = _pick_run(store, run_id)
    data = dict(run=store.run(rid), targets=store.targets(rid), verdicts=stored_verdicts(store, rid),
                traces=store.traces(rid))
    if fmt == "markdown":
        click.echo(render_markdown(**data))
    else:
        render_terminal(Console(), **data)
