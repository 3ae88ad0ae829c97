"""The volunteer's and analyst's commands: run, targets, verdicts, report.

Thin by design: option parsing and presentation only; the work is in probes/, analysis/ and
storage/.  Every user mistake becomes a one-line ``click.ClickException``.
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from kzprobe import clioptions as opt
from kzprobe import output
from kzprobe.model import Target, Verdict
from kzprobe.report.cli import analyst_options, check_unused, write_report
from kzprobe.storage.query_cli import across_runs, filter_options

# soft_wrap: a warning is one line (file:line: reason), whatever the terminal width.
err = Console(stderr=True, soft_wrap=True)

STATUS_STYLE = {"ok": "green", "blocked": "bold red", "down": "yellow", "inconclusive": "magenta",
                "not_measured": "dim"}
DB_HELP = ("SQLite path or SQLAlchemy URL, postgresql://... for a collector's "
           "(default: $KZPROBE_DB or ~/.local/share/kzprobe/kzprobe.db).")
#: Exit status of a run that --deadline cut short (130 is Ctrl-C / SIGTERM, 1 an error).
EXIT_DEADLINE = 3


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


def _check_tor_options(list_name: str | None, targets_file: str | None, tor_consensus: str | None,
                       tor_sample: int | None) -> None:
    if tor_sample is not None and not tor_consensus:
        raise click.UsageError("--tor-sample needs --tor-consensus FILE")
    if tor_consensus and (list_name != "tor" or targets_file):
        raise click.UsageError("--tor-consensus goes with --list tor (the guards join the directory authorities)")


def _add_tor_guards(targets: list[Target], consensus: str, sample: int, seed: int | None) -> list[Target]:
    """The tor list plus N guards sampled (with SEED) from a consensus file, de-duplicated."""
    from kzprobe.targets import TargetListError, shared_claim
    from kzprobe.targets._urls import check_url
    from kzprobe.targets.consensus import ConsensusError, guard_targets, parse

    try:
        doc = parse(consensus)
        guards = guard_targets(doc, sample, seed, shared_claim("tor", "tor-dpi"))
    except (ConsensusError, TargetListError) as exc:
        raise click.ClickException(str(exc)) from None
    seen = {check_url(t.url) for t in targets}
    added = [g for g in guards if check_url(g.url) not in seen]
    err.print(f"tor: {sum(g.kind == 'tor-or' for g in guards)} guard(s) sampled from {consensus} (valid after "
              f"{doc.valid_after or '?'}; {len(doc.guards)} guards of {len(doc.relays)} relays)"
              + (f", seed {seed}" if seed is not None else ""), highlight=False)
    return targets + added


def _open_store(db: str | None, *, must_exist: bool = False) -> Any:
    """Open the database; ``must_exist``: a reading command refuses to create one (a typo in
    --db would otherwise show an empty new database instead of an error)."""
    from kzprobe.storage import StorageError, Store, default_db_path

    if must_exist and (db is None or "://" not in db):
        path = Path(db) if db is not None else default_db_path()
        if not path.is_file():
            raise click.ClickException(f"{path}: no such database (--db); `kzprobe run` creates one")
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
                  v.detail or v.status, v.rule, f"{v.confidence:.2f}", v.sentence)
    return t


def _run_summary(store: Any, info: Any) -> dict[str, Any]:
    return {"id": info.id, "state": info.state, "source": info.source, "started": info.started,
            "ended": info.ended, "targets": info.n_targets, "measured": info.n_measured,
            "not_measured": info.n_targets - info.n_measured, "db": store.url}


def emit_verdicts(command: str, verdicts: list[Verdict], fmt: str, *, run_id: int | None = None,
                  run: dict[str, Any] | None = None) -> None:
    objects = [output.verdict_object(v, run_id) for v in verdicts]
    output.emit(command, fmt, objects, table=lambda: Console().print(verdict_table(verdicts)),
                run=run, counts=output.counts(verdicts))


def _resumable(store: Any, run_id: int | None) -> int:
    """The run ``--resume [RUN]`` continues: the given one, or the latest live run not done."""
    if run_id:
        info = store.run(run_id)
        if info is None:
            raise click.ClickException(f"{store.url}: no run {run_id} (--resume)")
    else:
        live = [r for r in store.runs() if r.source == "live"]
        if not live:
            raise click.ClickException(f"{store.url}: no run to resume (--resume)")
        unfinished = [r for r in live if r.state != "done"]
        info = unfinished[-1] if unfinished else live[-1]
    if info.source != "live":
        raise click.ClickException(f"run {info.id} is a {info.source} import, not a measurement; nothing to resume")
    if info.state == "running":
        raise click.ClickException(f"run {info.id} is still being measured (pid {info.pid}); stop it first")
    if info.state == "done":
        raise click.ClickException(f"run {info.id} is done: every target was measured")
    # A run killed after its last measurement but before it was written up has nothing left to
    # measure; resuming it still classifies it and marks it done.
    return int(info.id)


@click.command()
@click.option("--list", "list_name", default=None, help="Built-in target list (default: kz2014).")
@click.option("--targets", "targets_file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Citizen Lab test-list CSV or plain text (one URL or host per line); '-' reads stdin.")
@click.option("--strict", is_flag=True, help="Fail before probing if the target file has a bad line.")
@click.option("--resume", "resume", type=click.IntRange(0), is_flag=False, flag_value=0, default=None,
              metavar="[RUN]",
              help="Measure only the targets of RUN (default: the latest unfinished run) that have no "
                   "completed measurement, appending to that run.")
@click.option("--shuffle", "shuffle", type=int, default=None, metavar="SEED",
              help="Probe in a random order drawn from SEED (default: the list's order); also draws --tor-sample.")
@click.option("--tor-consensus", "tor_consensus", type=click.Path(), default=None, metavar="FILE",
              help="With --list tor: also measure guards sampled from this Tor consensus document.")
@click.option("--tor-sample", "tor_sample", type=click.IntRange(1, 1000), default=None, metavar="N",
              help="How many guards --tor-consensus samples (default 10); deterministic with --shuffle SEED.")
@click.option("--resolver", "resolvers", multiple=True, metavar="IP[:PORT]",
              help="An explicit resolver, queried over UDP and TCP (repeatable).")
@click.option("--system-resolver/--no-system-resolver", default=True, show_default=True,
              help="Also resolve with the system resolver (getaddrinfo).")
@click.option("--ca-bundle", "ca_bundles", multiple=True, type=click.Path(exists=True, dir_okay=False),
              callback=opt.check_ca_bundles, help="Extra trusted CA certificates (PEM), e.g. a lab CA.")
@click.option("--db", default=None, help=DB_HELP)
@click.option("--helper", "helpers", multiple=True, metavar="URL", callback=opt.check_helpers,
              help="Control helper URL (repeatable); '#token=T' appends a shared token.")
@click.option("--doh", multiple=True, metavar="URL", callback=opt.check_doh,
              help="DNS-over-HTTPS control when no helper answers (repeatable; 'default' = well-known resolvers).")
@opt.control_sni_option()
@click.option("--fingerprints", multiple=True, type=click.Path(exists=True, dir_okay=False),
              callback=opt.check_fingerprints,
              help="Extra blockpage fingerprint CSV (ooni/blocking-fingerprints format).")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 120),
              help="Per-step timeout (s).")
@click.option("--deadline", default=None, type=click.FloatRange(1, None),
              help="Overall deadline (s); targets not reached are not_measured, and --resume measures them.")
@click.option("--concurrency", default=64, show_default=True, type=click.IntRange(1, 4096))
@output.format_option("table", "json", "jsonl", "csv")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar on stderr.")
@click.option("--source-address", default=None, metavar="IP", callback=opt.check_ip,
              help="Source address for connections.")
@click.option("--network-name", default=None, help="Vantage metadata: the network's name (stored).")
@click.option("--asn", default=None, help="Vantage metadata: the network's ASN (stored).")
@click.option("--country", default=None, help="Vantage metadata: country code (stored).")
@click.option("--upload", "upload_url", default=None, metavar="URL",
              help="After the run, upload it to this collector in the background (never waits on it).")
@click.option("--upload-token-file", type=click.Path(dir_okay=False), default=None,
              help="Upload token file (else $KZPROBE_UPLOAD_TOKEN).")
def run(list_name: str | None, targets_file: str | None, strict: bool, resume: int | None, shuffle: int | None,
        tor_consensus: str | None, tor_sample: int | None, resolvers: tuple[str, ...], system_resolver: bool,
        ca_bundles: tuple[str, ...], db: str | None,
        helpers: tuple[str, ...], doh: tuple[str, ...], control_sni: str, control_sni_alias: str | None,
        fingerprints: tuple[str, ...], timeout: float, deadline: float | None, concurrency: int, fmt: str | None,
        progress: bool, source_address: str | None, network_name: str | None, asn: str | None,
        country: str | None, upload_url: str | None, upload_token_file: str | None) -> None:
    """Probe a target list and print a verdict per target.

    Every step (DNS, TCP, TLS, HTTP) is stored as it completes, so an interrupted (Ctrl-C,
    SIGTERM) or killed run keeps what it measured, and `--resume` measures the rest.  The probe's
    own public IP address is never stored.
    """
    from kzprobe.probes import dns as dnsprobe

    fmt = output.pick_format(fmt, ("table", "json", "jsonl", "csv"))
    control_sni = control_sni_alias or control_sni
    for r in resolvers:
        try:
            dnsprobe.parse_resolver(r)
        except ValueError as exc:
            raise click.BadParameter(f"{r!r}: {exc}", param_hint="--resolver") from None
    if upload_url:
        from kzprobe.collector.upload_cli import check_upload_options

        check_upload_options(upload_url, upload_token_file)
    if resume is not None and (targets_file or list_name or shuffle is not None or tor_consensus):
        raise click.UsageError("--resume measures the stored run's own targets, in its own order: "
                               "it takes no --targets, --list, --shuffle or --tor-consensus")
    _check_tor_options(list_name, targets_file, tor_consensus, tor_sample)
    targets: list[Target] = []
    if resume is None:
        targets = _load_targets(list_name, targets_file, strict)
        if tor_consensus:
            from kzprobe.targets.consensus import DEFAULT_SAMPLE

            targets = _add_tor_guards(targets, tor_consensus, tor_sample or DEFAULT_SAMPLE, shuffle)
        if shuffle is not None:
            random.Random(shuffle).shuffle(targets)
    store = _open_store(db)
    resume_id = _resumable(store, resume) if resume is not None else None

    from kzprobe.probes.engine import ProbeConfig
    from kzprobe.probes.runner import Runner

    cfg = ProbeConfig(resolvers=list(resolvers), system_resolver=system_resolver, ca_bundles=list(ca_bundles),
                      timeout=timeout, concurrency=concurrency, control_sni=control_sni,
                      fingerprints=list(fingerprints), source_address=source_address)
    vantage = {"resolvers": dnsprobe.system_resolvers() if system_resolver else [],
               "explicit_resolvers": list(resolvers), "network_name": network_name, "asn": asn,
               "country": country}
    total = len(targets) if resume_id is None else len(store.pending_targets(resume_id))
    show = progress and sys.stderr.isatty()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]probing"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=err, disable=not show)
    task = bar.add_task("run", total=total, counts="")

    def on_progress(done: int, _total: int, counts: dict[str, int]) -> None:
        text = " ".join(f"{k}={v}" for k, v in counts.items() if v)
        bar.update(task, completed=done, counts=text)

    with bar:
        runner = Runner(store, cfg, helpers=list(helpers), doh=list(doh), deadline=deadline,
                        vantage=vantage, progress=on_progress)
        result = runner.run(targets, resume=resume_id)
    if result.no_network:
        err.print("[bold red]The vantage point has no network[/] (no route other than loopback): every target "
                  "is inconclusive; nothing here says anything about blocking.", highlight=False)
    for line in result.internal_errors:
        err.print(f"[bold red]internal error (please report):[/] {line}", highlight=False)
    for note in result.control_notes[:5]:
        err.print(f"[dim]control: {note}[/]", highlight=False)
    info = store.run(result.run_id)
    emit_verdicts("run", result.verdicts, fmt, run_id=result.run_id, run=_run_summary(store, info))
    counts = output.counts(result.verdicts)
    err.print(f"run {result.run_id} ({result.state}) stored in {store.url}: "
              + ", ".join(f"{k} {n}" for k, n in counts.items()), highlight=False)
    if result.not_measured:
        why = {"deadline": "the --deadline ran out", "interrupted": "interrupted"}.get(result.state, result.state)
        err.print(f"[yellow]{why}:[/] {result.not_measured} of {len(result.verdicts)} target(s) not measured; "
                  f"`kzprobe run --resume {result.run_id}` measures them.", highlight=False)
    if upload_url:
        from kzprobe.collector.upload_cli import start_background_upload

        err.print(start_background_upload(store.url, upload_url, upload_token_file), highlight=False)
    if result.state == "interrupted":
        sys.exit(130)
    if result.state == "deadline":
        sys.exit(EXIT_DEADLINE)


@click.command()
@click.option("--list", "list_name", default=None, help="Built-in target list (default: kz2014).")
@click.option("--targets", "targets_file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Citizen Lab test-list CSV or plain text; '-' reads stdin.")
@click.option("--strict", is_flag=True, help="Fail if the file has a bad line.")
@click.option("--tor-consensus", "tor_consensus", type=click.Path(), default=None, metavar="FILE",
              help="With --list tor: add guards sampled from this Tor consensus (as `run` would).")
@click.option("--tor-sample", "tor_sample", type=click.IntRange(1, 1000), default=None, metavar="N",
              help="How many guards --tor-consensus samples (default 10).")
@click.option("--shuffle", "shuffle", type=int, default=None, metavar="SEED", help="Seed of the guard sample.")
@output.format_option("table", "json", "jsonl", "csv")
def targets(list_name: str | None, targets_file: str | None, strict: bool, tor_consensus: str | None,
            tor_sample: int | None, shuffle: int | None, fmt: str | None) -> None:
    """Show a target list (built-in, or imported from a file)."""
    fmt = output.pick_format(fmt, ("table", "json", "jsonl", "csv"))
    _check_tor_options(list_name, targets_file, tor_consensus, tor_sample)
    ts = _load_targets(list_name, targets_file, strict)
    if tor_consensus:
        from kzprobe.targets.consensus import DEFAULT_SAMPLE

        ts = _add_tor_guards(ts, tor_consensus, tor_sample or DEFAULT_SAMPLE, shuffle)
    if fmt == "json":
        click.echo(output.dumps_json({"command": "targets", "targets": [t.to_dict() for t in ts]}))
    elif fmt == "jsonl":
        for t in ts:
            click.echo(json.dumps(t.to_dict(), ensure_ascii=False))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
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
    """Every target of the run: stored verdicts, classified now if the run was killed before
    classifying, and ``not_measured`` for the targets it never completed."""
    from kzprobe.runview import run_verdicts

    return run_verdicts(store, rid)


@click.command()
@click.option("--db", default=None, help=DB_HELP)
@click.option("--run", "run_id", type=int, default=None, help="Run id (default: the latest).")
@output.format_option("table", "json", "jsonl", "csv")
@filter_options
def verdicts(db: str | None, run_id: int | None, fmt: str | None, **filters: Any) -> None:
    """Show the verdicts of a stored run; with filters, across runs grouped by vantage."""
    fmt = output.pick_format(fmt, ("table", "json", "jsonl", "csv"))
    store = _open_store(db, must_exist=True)
    if across_runs(store, run_id, fmt, **filters):
        return
    rid = _pick_run(store, run_id)
    emit_verdicts("verdicts", stored_verdicts(store, rid), fmt, run_id=rid, run=_run_summary(store, store.run(rid)))


@click.command()
@click.option("--db", default=None, help=DB_HELP)
@click.option("--run", "run_id", type=int, default=None,
              help="Run id (default: the latest; html/json: every run that matches the filters).")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "html", "json", "terminal"]),
              default="table", show_default=True,
              help="table: for the terminal ('terminal' is its old name); markdown: a file; html: one "
                   "self-contained page over the whole database; json: its data.")
@analyst_options
def report(db: str | None, run_id: int | None, fmt: str, **analyst: Any) -> None:
    """A blocking report: for a stored run (table, markdown), or across runs, networks and time
    (html, json; see kzprobe.report)."""
    from kzprobe.reporting import render_markdown, render_terminal

    fmt = "terminal" if fmt == "table" else fmt
    check_unused(fmt, **analyst)
    store = _open_store(db, must_exist=True)
    if fmt in ("html", "json"):
        write_report(store, run_id, fmt, **analyst)
        return
    rid = _pick_run(store, run_id)
    data = dict(run=store.run(rid), targets=store.targets(rid), verdicts=stored_verdicts(store, rid),
                traces=store.traces(rid))
    if fmt == "markdown":
        click.echo(render_markdown(**data))
    else:
        render_terminal(Console(), **data)
