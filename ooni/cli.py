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


@click.command("import-ooni")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--db", default=None, help=DB_HELP)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="How to print the verdicts.")
def import_ooni(paths: tuple[Path, ...], db: str | None, fmt: str) -> None:
    """Import OONI Web Connectivity measurements (JSON, JSONL or folders of them), store each as a
    run, classify it with kzprobe's rules and print the verdicts.

    A file or line that cannot be read is reported as PATH[:LINE]: reason; the rest is still
    imported, and the exit status is 1."""
    from kzprobe.analysis import Context, classify
    from kzprobe.model import Target
    from kzprobe.ooni.importer import Problem, read_measurements
    from kzprobe.storage import StorageError

    store = _open_store(db)
    results: list[tuple[int, str, Any, Any]] = []
    bad = 0
    try:
        for item in read_measurements(paths):
            if isinstance(item, Problem):
                bad += 1
                click.echo(f"{item}", err=True)
                continue
            where, imp = item
            run_id = store.new_run(source="ooni", vantage=imp.vantage, options={**imp.options, "file": where},
                                   started=imp.started, software=imp.software,
                                   software_version=imp.software_version)
            store.add_targets(run_id, [Target(url=imp.input)])
            store.add_observations(run_id, imp.observations)
            verdicts = classify(imp.observations, Context(control_configured=True), targets=[imp.input])
            store.set_verdicts(run_id, verdicts)
            store.finish_run(run_id, ended=imp.started + imp.runtime)
            for v in verdicts:
                results.append((run_id, where, v, imp.ooni_blocking))
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()
    if fmt == "json":
        click.echo(json.dumps([{**v.to_dict(), "run_id": run_id, "ooni_blocking": ob, "file": where}
                               for run_id, where, v, ob in results], ensure_ascii=False, indent=2))
    else:
        _table(results)
    if bad:
        click.echo(f"{bad} file(s) or line(s) could not be imported.", err=True)
        sys.exit(1)


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
    from kzprobe.analysis import Context, classify
    from kzprobe.ooni import exporter
    from kzprobe.storage.models import RunRow

    header = True
    for r in runs:
        observations = store.observations(r.id)
        if fmt == "jsonl":
            for line in exporter.observation_lines(r.id, observations):
                fh.write(line + "\n")
            continue
        targets = [t.url for t in store.targets(r.id)]
        verdicts = store.verdicts(r.id)
        if not verdicts and observations:
            # A run that was never classified (e.g. killed): classify now rather than export nothing.
            verdicts = classify(observations, Context(control_configured=True), targets=targets)
        if fmt == "csv":
            fh.write(exporter.verdict_csv(((r.id, v) for v in verdicts), header=header))
            header = False
            continue
        with store.session() as s:
            row = s.get(RunRow, r.id)
            options = dict(row.options or {}) if row is not None else {}
        for m in exporter.run_measurements(targets, observations, verdicts, run_id=r.id, started=r.started,
                                           ended=r.ended, vantage=r.vantage or {}, options=options):
            fh.write(exporter.dumps(m) + "\n")
