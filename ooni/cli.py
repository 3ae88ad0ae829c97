"""``kzprobe import-ooni`` and ``kzprobe export``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import click

DB_HELP = "Database: a path or SQLAlchemy URL (default: $KZPROBE_DB or ~/.local/share/kzprobe/kzprobe.db)."


def _open_store(db: str | None) -> Any:
    from kzprobe.storage import StorageError, Store

    try:
        return Store(db)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None


def _when(value: str | None, option: str) -> Any:
    if value is None:
        return None
    import datetime as dt

    try:
        d = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM)",
                                 param_hint=option) from None
    return d if d.tzinfo else d.replace(tzinfo=dt.UTC)


def _split(values: tuple[str, ...], upper: bool = True) -> frozenset[str]:
    out = {v.strip() for value in values for v in value.split(",") if v.strip()}
    return frozenset(v.upper() for v in out) if upper else frozenset(out)


#: Up to this many imported measurements, the table lists each one; beyond it, a summary.
TABLE_ROWS = 50


@click.command("import-ooni")
@click.argument("paths", nargs=-1, required=True)
@click.option("--db", default=None, help=DB_HELP)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "jsonl"]), default="table", show_default=True,
              help="table: each measurement (or, past 50, a summary by status, network and day); json: a JSON "
                   "array of verdicts, streamed; jsonl: one verdict per line, streamed.")
@click.option("--country", "countries", multiple=True, metavar="CC", help="Only these probe countries (repeatable, "
              "or comma-separated).")
@click.option("--asn", "asns", multiple=True, metavar="ASN", help="Only these probe networks, e.g. AS9198.")
@click.option("--since", default=None, metavar="DATE", help="Only measurements started at or after DATE (UTC).")
@click.option("--until", default=None, metavar="DATE", help="Only measurements started before DATE (UTC).")
@click.option("--test", "test_name", default="web_connectivity", show_default=True,
              help="The OONI test to import; other tests are skipped.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes for parsing and classifying (default: one per core).")
@click.option("--scheduler", default=None, metavar="tcp://HOST:8786",
              help="Run the parsing and classifying on this Dask cluster instead (needs kzprobe[scale]).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write Parquet (verdicts/ and observations/) to this folder instead of a database "
                   "(needs kzprobe[scale]).")
@click.option("--progress/--no-progress", default=None, help="A progress bar on stderr (default: on a terminal).")
def import_ooni(paths: tuple[str, ...], db: str | None, fmt: str, countries: tuple[str, ...],
                asns: tuple[str, ...], since: str | None, until: str | None, test_name: str,
                workers: int | None, scheduler: str | None, out_dir: Path | None, progress: bool | None) -> None:
    """Import OONI measurements: .json, .jsonl and .jsonl.gz files, folders of them, or a copy of
    OONI's archive (raw/YYYYMMDD/HH/CC/TEST/...), and classify each with kzprobe's rules.

    Streams in bounded batches, in parallel worker processes, with one writer.  Re-importing the
    same measurements is a no-op (by measurement_uid, else report_id and input, else content).
    A file or line that cannot be read is reported as PATH[:LINE]: reason and skipped; the rest is
    still imported, and the exit status is 1."""
    from kzprobe.ooni.archive import Filters
    from kzprobe.ooni.pipeline import import_archive
    from kzprobe.storage import StorageError

    if scheduler and "://" not in scheduler:
        raise click.BadParameter(f"{scheduler!r} is not a scheduler address (tcp://HOST:PORT)",
                                 param_hint="--scheduler")
    filters = Filters(countries=_split(countries), asns=_split(asns), since=_when(since, "--since"),
                      until=_when(until, "--until"), test=test_name)
    if out_dir is not None and db is not None:
        raise click.UsageError("--out and --db are exclusive")
    if out_dir is not None:
        from kzprobe.ooni.parquet import ParquetSink

        try:
            store: Any = ParquetSink(out_dir)
        except ImportError as exc:
            raise click.ClickException(str(exc)) from None
    else:
        store = _open_store(db)
    out = sys.stdout
    listed: list[tuple[int, str, Any, Any]] = []
    first = [True]

    def on_row(run_id: int, row: Any, verdicts: list[dict[str, Any]]) -> None:
        from kzprobe.model import Verdict

        for vd in verdicts:
            v = Verdict(**vd)
            if fmt == "table":
                if len(listed) <= TABLE_ROWS:
                    listed.append((run_id, row.where, v, row.options.get("ooni_blocking")))
                continue
            line = json.dumps({**v.to_dict(), "run_id": run_id, "ooni_blocking": row.options.get("ooni_blocking"),
                               "file": row.where}, ensure_ascii=False)
            if fmt == "json":
                out.write(("[\n" if first[0] else ",\n") + line)
                first[0] = False
            else:
                out.write(line + "\n")

    def on_problem(where: str, reason: str) -> None:
        click.echo(f"{where}: {reason}", err=True)

    show = progress if progress is not None else sys.stderr.isatty()
    try:
        with _progress(show) as tick:
            summary = import_archive(paths, store, filters, workers=workers, scheduler=scheduler,
                                     on_row=on_row, on_problem=on_problem, on_progress=tick)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{getattr(exc, 'filename', None) or 'scheduler'}: "
                                   f"{exc.strerror or exc}") from None
    finally:
        store.close()
    if fmt == "json":
        out.write("[]\n" if first[0] else "\n]\n")
    elif fmt == "table":
        if summary.imported <= TABLE_ROWS:
            _table(listed)
        _summary_tables(summary)
    click.echo(f"imported {summary.imported}, already stored {summary.duplicates}, skipped by filters "
               f"{summary.filtered}, unreadable {summary.problems}", err=True)
    if summary.problems:
        sys.exit(1)


def _progress(show: bool) -> Any:
    import contextlib

    if not show:
        return contextlib.nullcontext(None)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bar() -> Any:
        with Progress(SpinnerColumn(), TextColumn("{task.completed:,.0f} measurements"),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                      transient=True, redirect_stdout=False, redirect_stderr=False) as p:
            task = p.add_task("import", total=None, rate="")

            def tick(n: int) -> None:
                p.advance(task, n)
                speed = p.tasks[0].speed
                p.update(task, rate=f"{speed:,.0f}/s" if speed else "")

            yield tick

    return bar()


def _table(results: list[tuple[int, str, Any, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(results)} OONI measurement(s) imported")
    for col in ("run", "file", "target", "verdict", "rule", "OONI blocking", "evidence"):
        table.add_column(col, overflow="fold")
    for run_id, where, v, ob in results:
        table.add_row(str(run_id), Path(where).name, v.target, v.label + (f" ({v.detail})" if v.detail else ""),
                      v.rule, json.dumps(ob), v.sentence)
    Console().print(table)


def _summary_tables(summary: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    d = summary.to_dict()
    console = Console()
    for key, title in (("by_status", "verdicts"), ("by_network", "measurements by network"),
                       ("by_day", "measurements by day")):
        if not d[key] or (key != "by_status" and summary.imported <= TABLE_ROWS):
            continue
        t = Table(title=f"{title} ({summary.imported:,} imported)")
        t.add_column(key[3:])
        t.add_column("count", justify="right")
        items = list(d[key].items())
        for k, n in items[:40]:
            t.add_row(str(k), f"{n:,}")
        if len(items) > 40:
            t.add_row(f"… {len(items) - 40} more", "")
        console.print(t)


@click.command("export")
@click.option("--db", default=None, help=DB_HELP)
@click.option("--run", "run_id", type=int, default=None, help="The run to export (default: the latest).")
@click.option("--all", "all_runs", is_flag=True, help="Export every run.")
@click.option("--format", "fmt", type=click.Choice(["ooni", "jsonl", "csv"]), required=True,
              help="ooni: one OONI Web Connectivity measurement per target per line; jsonl: one observation "
                   "per line; csv: the verdicts.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead of standard output.")
def export(db: str | None, run_id: int | None, all_runs: bool, fmt: str, out: Path | None) -> None:
    """Export stored runs as OONI measurements (JSONL), observations (JSONL) or verdicts (CSV)."""
    from kzprobe.storage import StorageError

    if run_id is not None and all_runs:
        raise click.UsageError("--run and --all are exclusive")
    store = _open_store(db)
    try:
        runs = store.runs()
        if all_runs:
            selected = runs
        else:
            wanted = run_id if run_id is not None else store.latest_run_id()
            selected = [r for r in runs if r.id == wanted]
            if not selected:
                raise click.ClickException(f"no run {wanted} in {store.url}" if wanted is not None
                                           else f"no runs in {store.url}")
        try:
            fh: TextIO = out.open("w", encoding="utf-8") if out else sys.stdout
        except OSError as exc:
            raise click.ClickException(f"{out}: {exc.strerror}") from None
        try:
            _write(store, selected, fmt, fh)
        finally:
            if out:
                fh.close()
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()


def _write(store: Any, runs: list[Any], fmt: str, fh: TextIO) -> None:
    from kzprobe import output
    from kzprobe.ooni import exporter
    from kzprobe.runview import NOT_MEASURED, run_verdicts

    header = True
    for r in runs:
        # Only what was measured is exported: a target the run never completed (interrupted,
        # --deadline, killed) is not an empty measurement, and its partial steps are not evidence.
        states = store.target_states(r.id)
        measured = [t.url for t, when in states if when is not None]
        keep = set(measured)
        observations = [o for o in store.observations(r.id) if o.target in keep or not states]
        if fmt == "jsonl":
            for line in exporter.observation_lines(r.id, observations):
                fh.write(line + "\n")
            continue
        verdicts = [v for v in run_verdicts(store, r.id) if v.status != NOT_MEASURED]
        if fmt == "csv":
            fh.write(output.csv_text([output.verdict_object(v, r.id) for v in verdicts], header=header))
            header = False
            continue
        for m in exporter.run_measurements(measured, observations, verdicts, run_id=r.id, started=r.started,
                                           ended=r.ended, vantage=r.vantage or {}, options=r.options):
            fh.write(exporter.dumps(m) + "\n")
