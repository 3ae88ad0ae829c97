"""One output vocabulary for every command (documented in docs/output.md, checked against
docs/schema/*.json by the tests).

* ``--format`` comes from one set: table, json, jsonl, csv, markdown, html (each command offers
  the ones that apply).  The default is ``table`` on a terminal and ``jsonl`` otherwise, so a
  pipe gets something a program can read line by line.
* A verdict is the same object everywhere: ``Verdict.to_dict()`` (target, domain, status,
  mechanism, detail, rule, confidence, evidence {observations, packets, sentence}).  What a command
  adds goes under one named key (``run_id``, ``ooni``, ``capture``, ``trace``, ``lab``), never
  mixed into the verdict's own keys.
* ``json`` is one envelope object: ``{"command", "kzprobe", "verdicts": [...], "problems": [...]}``
  plus the command's named extras.  ``jsonl`` is one verdict object per line.
* ``csv`` has one column set for verdicts, :data:`CSV_COLUMNS`, whatever the command.

Kept free of rich, trio and SQLAlchemy imports: ``kzprobe --help`` imports option helpers from
here indirectly and must stay fast.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click

from kzprobe import __version__

FORMATS = ("table", "json", "jsonl", "csv", "markdown", "html")

#: The verdict CSV columns, for every command that writes verdicts as CSV.
CSV_COLUMNS = ("run_id", "target", "domain", "status", "mechanism", "detail", "rule", "confidence",
               "observations", "packets", "sentence")


def default_format() -> str:
    return "table" if sys.stdout.isatty() else "jsonl"


def format_option(*choices: str, help_extra: str = "") -> Any:
    """The ``--format`` option, with a subset of :data:`FORMATS` (in that order)."""
    unknown = set(choices) - set(FORMATS)
    if unknown:  # pragma: no cover - a programming error
        raise ValueError(f"unknown format(s) {sorted(unknown)}")
    return click.option(
        "--format", "fmt", type=click.Choice(list(choices)), default=None,
        help="Output format (default: table on a terminal, jsonl otherwise). " + help_extra)


def pick_format(fmt: str | None, choices: Sequence[str] = FORMATS) -> str:
    if fmt is not None:
        return fmt
    wanted = default_format()
    return wanted if wanted in choices else choices[0]


def verdict_object(v: Any, run_id: int | None = None, **extras: Any) -> dict[str, Any]:
    """The one verdict object.  ``extras``: named keys a command adds (e.g. ``ooni={...}``)."""
    out: dict[str, Any] = v.to_dict()
    # One rule for every status: detail is never null (ok and inconclusive repeat the status,
    # as "down" already does), so a consumer never special-cases which statuses carry it.
    if out.get("detail") is None:
        out["detail"] = out["status"]
    if run_id is not None:
        out["run_id"] = run_id
    for key, value in extras.items():
        if value is not None:
            out[key] = value
    return out


def counts(verdicts: Iterable[Any]) -> dict[str, int]:
    """Counts by status (``blocked`` split by mechanism: ``blocked/dns`` ...)."""
    return dict(sorted(Counter(v.label for v in verdicts).items()))


def envelope(command: str, objects: list[dict[str, Any]], *, problems: Sequence[Mapping[str, Any]] = (),
             **named: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"command": command, "kzprobe": __version__}
    out.update({k: v for k, v in named.items() if v is not None})
    out["verdicts"] = objects
    out["problems"] = [dict(p) for p in problems]
    return out


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)


def csv_text(objects: Iterable[Mapping[str, Any]], header: bool = True) -> str:
    """Verdict objects (from :func:`verdict_object`) as CSV in :data:`CSV_COLUMNS`."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(CSV_COLUMNS)
    for o in objects:
        ev = o.get("evidence") or {}
        w.writerow([o.get("run_id", ""), o["target"], o["domain"], o["status"], o.get("mechanism") or "",
                    o.get("detail") or "", o["rule"], f"{o['confidence']:.2f}",
                    " ".join(map(str, ev.get("observations", []))), " ".join(map(str, ev.get("packets", []))),
                    ev.get("sentence", "")])
    return buf.getvalue()


def emit(command: str, fmt: str, objects: list[dict[str, Any]], *, problems: Sequence[Mapping[str, Any]] = (),
         table: Any = None, **named: Any) -> None:
    """Write verdict objects in ``fmt``.  ``table``: a callable that prints the table form."""
    if fmt == "json":
        click.echo(dumps_json(envelope(command, objects, problems=problems, **named)))
    elif fmt == "jsonl":
        for o in objects:
            click.echo(json.dumps(o, ensure_ascii=False))
    elif fmt == "csv":
        click.echo(csv_text(objects), nl=False)
    elif table is not None:
        table()
    else:  # pragma: no cover - a programming error
        raise click.UsageError(f"--format {fmt} does not apply here")
