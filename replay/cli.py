"""``kzprobe replay``: classify censorship from packet captures."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from kzprobe.model import SOURCE_PCAP, Observation, Target, Verdict


def _classify(observations: list[Observation]) -> tuple[list[Verdict] | None, str | None]:
    try:
        from kzprobe.analysis import classify
    except ImportError as exc:  # analysis not built yet: findings are still worth printing
        return None, f"classifier unavailable: {exc}"
    return classify(observations), None


@click.command("replay")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--store", is_flag=True, help="Store observations and verdicts as one run (source=pcap): "
              "one verdict per target over all the files.")
@click.option("--db", default=None, help="Database path or SQLAlchemy URL (with --store).")
@click.option("--fingerprints", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Extra blockpage fingerprint CSV (ooni/blocking-fingerprints format); repeatable.")
@click.option("--separate", is_flag=True, help="Replay every file on its own, even when the files follow one "
              "another in time like a rotated capture (tcpdump -C / -G).")
@click.option("--targets", "targets_file", type=click.Path(dir_okay=False), default=None,
              help="The run's target list (a file as for `kzprobe run`, or a lab recording's NAME.expected.json): "
                   "flows to its tor-or://, tor-dir://, obfs4://, tcp://, proxy+http:// targets are mapped to them "
                   "by address and port, lookups to udp-dns:// targets by name.")
@click.option("--list", "list_name", default=None, help="The run's built-in target list (tor, messaging, "
              "circumvention, ...), used as --targets is.")
def replay(files: tuple[str, ...], fmt: str, store: bool, db: str | None, fingerprints: tuple[str, ...],
           separate: bool, targets_file: str | None, list_name: str | None) -> None:
    """Classify censorship from packet captures (pcap / pcapng, plain or gzip).

    Reconstructs DNS transactions, TCP flows, TLS ClientHellos and HTTP requests, judges which
    packets were injected (IP TTL / IP-ID unlike the server's own), and classifies each domain
    with the same rules as live runs.  Evidence cites packet numbers as Wireshark counts them.

    Files whose capture times follow one another (the next starts where the previous one ended)
    are one capture rotated across files: they are joined into one, and packets are numbered as
    in their concatenation (mergecap -a).  A file that cannot be read is reported on its own line
    and the others are still replayed.

    Control comes from the capture itself: the probe's requests to its control helper
    (POST /v1/control, found by that request line) and the helper's answers are always decoded
    as control observations, never reported as targets.

    Targets beyond URLs (tcp://, tor-or://, udp-dns://, ...) do not name themselves on the wire:
    replay knows those the probe asked its helper about, and those of --targets / --list.
    """
    from kzprobe.analysis.fingerprints import Fingerprints
    from kzprobe.replay.engine import FileError, FileReplay, Replayer, group_rotated
    from kzprobe.replay.pcapio import CaptureError

    if db is not None and not store:
        raise click.UsageError("--db is only used with --store")
    try:
        fps = Fingerprints.default(extra=list(fingerprints))
    except Exception as exc:  # a bad fingerprint file: one line, no traceback
        raise click.ClickException(f"fingerprints: {exc}") from None
    replayer = Replayer(fps, targets=_targets(targets_file, list_name))
    failed: list[FileError]
    if separate or len(files) == 1:  # (grouping reads every file once more: not for one)
        groups, failed = [[f] for f in files], []
    else:
        groups, failed = group_rotated(list(files))
    for err in failed:
        click.echo(f"error: {err}", err=True)
    results: list[FileReplay] = []
    for group in groups:
        try:
            fr = replayer.replay_run(group)
        except CaptureError as exc:
            err = FileError(group[0], str(exc))
            failed.append(err)
            click.echo(f"error: {exc}", err=True)
            continue
        except Exception as exc:  # a bug met on these bytes: one line naming the file, traceback in a log
            err = FileError(group[0], _internal_error(exc))
            failed.append(err)
            click.echo(f"error: {err}", err=True)
            continue
        if len(group) > 1:
            click.echo(f"note: joined {len(group)} files of one rotated capture: {', '.join(group)}", err=True)
        if fr.read.error:
            click.echo(f"warning: {fr.read.describe()}; the result covers the frames before it", err=True)
        for w in fr.read.warnings:
            click.echo(f"warning: {group[0]}: {w}", err=True)
        results.append(fr)
    if not results:
        raise click.ClickException(str(failed[0]) if len(failed) == 1 else
                                   f"none of the {len(failed)} files could be read")

    run_id = None
    if store:
        run_id = _store(db, files, results)
    per_file: list[tuple[FileReplay, list[Verdict] | None]] = []
    note = None
    for fr in results:
        verdicts, note = _classify(fr.observations)
        per_file.append((fr, verdicts))

    if fmt == "json":
        # The one envelope (docs/output.md): every file's verdicts in "verdicts", each naming its
        # capture; files that could not be replayed in "problems"; the per-file detail in "files".
        from kzprobe import output

        objects = [output.verdict_object(v, run_id, capture={"file": fr.read.path})
                   for fr, vs in per_file for v in (vs or [])]
        # A capture damaged part-way is replayed up to the damage: its verdicts are above, and the
        # damage is a problem too, so that a script reading only "problems" still learns of it.
        damaged = [{"where": fr.read.path, "reason": f"{fr.read.describe()}; the result covers the frames before it"}
                   for fr in results if fr.read.error]
        doc: dict[str, Any] = output.envelope(
            "replay", objects, problems=[*({"where": e.path, "reason": e.reason} for e in failed), *damaged],
            run_id=run_id, classifier=note,
            files=[{k: v for k, v in _file_doc(fr, vs).items() if k != "verdicts"} for fr, vs in per_file])
        json.dump(doc, sys.stdout, ensure_ascii=False, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        _table(per_file, note, run_id)
    if failed:
        sys.exit(1)


def _targets(targets_file: str | None, list_name: str | None) -> list[Target]:
    """--targets / --list: the targets the captured run measured (one line per problem, no traceback)."""
    if targets_file and list_name:
        raise click.UsageError("--targets and --list are one or the other")
    if not targets_file and not list_name:
        return []
    from kzprobe.replay.kinds import targets_of_expected
    from kzprobe.targets import BUILTIN_LISTS, TargetListError, load, load_builtin

    try:
        if list_name:
            if list_name not in BUILTIN_LISTS:
                raise click.BadParameter(f"no built-in list {list_name!r} (lists: {', '.join(sorted(BUILTIN_LISTS))})",
                                         param_hint="--list")
            return load_builtin(list_name)
        assert targets_file is not None
        if targets_file.endswith(".json"):
            got = targets_of_expected(targets_file)
            if got is None:
                raise click.BadParameter(f"{targets_file}: not a lab recording's expected.json (no \"targets\" list)",
                                         param_hint="--targets")
            return got
        res = load(targets_file)
    except TargetListError as exc:
        raise click.ClickException(str(exc)) from None
    for line in res.errors:
        click.echo(f"warning: {line}", err=True)
    if not res.targets:
        raise click.ClickException(f"{targets_file}: no usable target")
    return res.targets


def _internal_error(exc: BaseException) -> str:
    """One line for an unexpected exception (its leaf); the whole traceback goes to a log file."""
    import tempfile
    import traceback

    from kzprobe import errors as E

    leaf = E.leaf(exc)
    what = f"internal error while replaying ({type(leaf).__name__}: {str(leaf)[:200]})"
    try:
        fd, log = tempfile.mkstemp(prefix="kzprobe-replay-", suffix=".log")
        with open(fd, "w", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(exc)))
    except OSError:
        return what
    return f"{what}; traceback in {log}"


def _file_doc(fr: Any, verdicts: list[Verdict] | None) -> dict[str, Any]:
    return {
        "path": fr.read.path,
        "paths": fr.paths,
        "read": fr.read.to_dict(),
        "packets": fr.packets,
        "verdicts": [v.to_dict() for v in verdicts] if verdicts is not None else None,
        "findings": [f.to_dict() for f in fr.findings],
        "observations": [o.to_dict() for o in fr.observations],
    }


def _table(per_file: list[tuple[Any, list[Verdict] | None]], note: str | None, run_id: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for fr, verdicts in per_file:
        title = fr.read.path if len(fr.paths) < 2 else f"{fr.paths[0]} … {fr.paths[-1]} ({len(fr.paths)} files joined)"
        con.rule(f"[bold]{title}")
        status = f"{fr.read.frames} frames, {fr.packets} IP packets, {len(fr.observations)} observations"
        if fr.read.error:
            status += f" — [red]stopped at byte {fr.read.error_offset} (frame {fr.read.error_frame}): {fr.read.error}"
        con.print(status)
        if fr.findings:
            con.print("[bold]Findings")
            for f in fr.findings:
                con.print(f"  • {f.sentence}", highlight=False)
        if verdicts is None:
            con.print(f"[yellow]{note}")
            continue
        t = Table(show_lines=False)
        for col in ("target", "verdict", "rule", "packets", "why"):
            t.add_column(col, overflow="fold")
        for v in verdicts:
            colour = {"blocked": "red", "ok": "green", "down": "yellow"}.get(v.status, "white")
            pk = ", ".join(map(str, v.packets[:8])) + (" …" if len(v.packets) > 8 else "")
            t.add_row(v.target, f"[{colour}]{v.label}", v.rule, pk, v.sentence)
        con.print(t)
    if run_id is not None:
        con.print(f"stored as run {run_id}")


def _store(db: str | None, files: tuple[str, ...], results: list[Any]) -> int:
    """One run for all the files: their observations, and one verdict per target over all of them
    (a target seen in two captures is one target of the run, not two verdicts)."""
    from kzprobe.storage import StorageError, Store

    observations = [o for fr in results for o in fr.observations]
    try:
        st = Store(db)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    run_id: int | None = None
    try:
        run_id = st.new_run(source=SOURCE_PCAP, options={"files": list(files)})
        targets = list(dict.fromkeys(o.target for o in observations))
        st.add_targets(run_id, [Target(url=t, notes="pcap replay") for t in targets])
        # Storage assigns the ids; verdicts are computed afterwards so that their evidence points
        # at stored rows.
        st.add_observations(run_id, observations)
        verdicts, note = _classify(observations)
        if verdicts is None:
            raise click.ClickException(note or "classifier unavailable")
        st.set_verdicts(run_id, verdicts)
        st.finish_run(run_id)
    except StorageError as exc:
        _failed(st, run_id)
        raise click.ClickException(str(exc)) from None
    except BaseException:
        _failed(st, run_id)  # never leave the run "running"
        raise
    finally:
        st.close()
    return run_id


def _failed(st: Any, run_id: int | None) -> None:
    if run_id is None:
        return
    try:
        st.finish_run(run_id, state="failed")
    except Exception:  # the store itself is broken: the first error is the one to report
        pass
