"""The ``kzprobe`` command line: thin click + rich wiring over the packages.

Every sub-command lives in its own module and is imported only when it is invoked.  That is
what keeps ``kzprobe --help`` fast: scapy alone costs about a second to import, and trio,
httpx and SQLAlchemy add more.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from kzprobe import __version__

#: name -> ("module", "attribute", "one-line help").  The help text is here so that
#: ``kzprobe --help`` can list commands without importing them.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("kzprobe.commands", "run", "Probe a target list and print a verdict per target."),
    "targets": ("kzprobe.commands", "targets", "Show a target list (built-in or imported)."),
    "verdicts": ("kzprobe.commands", "verdicts", "Show the verdicts of a stored run."),
    "report": ("kzprobe.commands", "report", "Write a blocking report for a stored run."),
    "helper": ("kzprobe.helper.cli", "helper", "Run the control helper (outside the censored network)."),
    "import-ooni": ("kzprobe.ooni.cli", "import_ooni", "Import and classify OONI Web Connectivity files."),
    "export": ("kzprobe.ooni.cli", "export", "Export stored runs as OONI JSON, JSONL or CSV."),
    "lab": ("kzprobe.lab.cli", "lab", "A simulated censored ISP in network namespaces (root)."),
    "replay": ("kzprobe.replay.cli", "replay", "Classify censorship from packet captures."),
    "trace": ("kzprobe.trace.cli", "trace", "Locate the censoring hop (TTL-limited sweeps)."),
    "db": ("kzprobe.storage.cli", "db", "Database maintenance: upgrade the schema in place."),
    "collector": ("kzprobe.collector.cli", "collector", "Receive volunteers' uploads (and manage their tokens)."),
    "upload": ("kzprobe.collector.upload_cli", "upload", "Upload stored runs to a collector (resumable)."),
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = COMMANDS.get(cmd_name)
        if spec is None:
            return None
        module_name, attr, _ = spec
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a sub-package that is not built yet, or a missing dependency
            raise click.ClickException(f"'{cmd_name}' is unavailable: {exc}") from None
        command: click.Command = getattr(module, attr)
        return command

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's standalone mode, except that every error is one line on stderr (click prints
        the usage block and a hint before a usage error: four lines for one mistake)."""
        base: Any = super().main
        if not kwargs.pop("standalone_mode", True):
            return base(*args, standalone_mode=False, **kwargs)
        try:
            rv = base(*args, standalone_mode=False, **kwargs)
        except click.exceptions.ClickException as exc:
            msg = exc.format_message().replace("\n", " ")
            if isinstance(exc, click.exceptions.UsageError) and exc.ctx is not None:
                msg += f" (see '{exc.ctx.command_path} --help')"
            click.echo(f"Error: {msg}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        if isinstance(rv, int) and not isinstance(rv, bool):
            sys.exit(rv)
        sys.exit(0)

    def invoke(self, ctx: click.Context) -> Any:
        """The one error boundary: whatever a command raises becomes one line on stderr.

        A user's mistake or an environment problem names the file, option or URL; anything
        else is a bug: one line plus the path of a log holding the traceback (exit 70).  trio
        wraps exceptions in groups, so the leaf is what is judged.
        """
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit,
                KeyboardInterrupt):
            raise
        except BaseException as exc:
            raise _boundary(exc) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Use the static help so that listing commands imports nothing.
        rows = [(name, spec[2]) for name, spec in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class InternalError(click.ClickException):
    exit_code = 70


def _boundary(exc: BaseException) -> BaseException:
    from kzprobe import errors

    leaves = [e for e in errors.leaves(exc) if type(e).__name__ != "Cancelled"] or [exc]
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt | SystemExit | click.exceptions.ClickException
                      | click.exceptions.Exit | click.exceptions.Abort):
            return leaf
    for leaf in leaves:
        line = errors.user_error_line(leaf)
        if line is not None:
            return click.ClickException(line)
    leaf = leaves[0]
    log = errors.write_crash_log(exc, sys.argv[1:])
    first = (str(leaf).splitlines() or [""])[0][:200]
    return InternalError(f"internal error: {type(leaf).__name__}: {first} (traceback in {log}; please report it)")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kzprobe")
def main() -> None:
    """kzprobe measures website blocking from inside a country, and shows how it is done.

    Each target is probed step by step (DNS, TCP, TLS with SNI, HTTP), every observation is
    stored in SQLite, and each target gets a verdict (ok, down, inconclusive, or blocked by
    dns / ip / dpi) with the evidence behind it.
    """


def run_main(argv: list[str] | None = None) -> Any:
    return main.main(args=argv, prog_name="kzprobe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_main())
