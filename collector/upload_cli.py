"""``kzprobe upload``: send stored runs to a collector; resumes where it stopped."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from kzprobe.collector.client import TOKEN_ENV


def read_token(token_file: str | None) -> str:
    """The upload token from --token-file, else $KZPROBE_UPLOAD_TOKEN (never a command-line value:
    that would sit in the shell's history and in `ps`)."""
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise click.BadParameter(f"{token_file}: {exc.strerror or exc}", param_hint="--token-file") from None
        token = text.strip()
        if not token or any(c.isspace() for c in token):
            raise click.BadParameter(f"{token_file}: expected one token on one line", param_hint="--token-file")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise click.UsageError(f"no upload token: pass --token-file FILE or set ${TOKEN_ENV}")
    return token


def check_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise click.BadParameter(f"{url!r}: expected http(s)://HOST[:PORT][/PATH], without credentials",
                                 param_hint="URL")
    return url


@click.command("upload")
@click.argument("url", required=False)
@click.option("--db", default=None, metavar="PATH|URL",
              help="The local database (default: ~/.local/share/kzprobe/kzprobe.db or $KZPROBE_DB).")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help=f"File holding the upload token (else ${TOKEN_ENV}).")
@click.option("--status", "show_status", is_flag=True, help="Show what is pending (per run) and exit.")
@click.option("--batch", default=1000, show_default=True, type=click.IntRange(1, 5000),
              help="Observations per request.")
@click.option("--tries", default=8, show_default=True, type=click.IntRange(1, 100),
              help="Attempts per request (exponential backoff with jitter, honouring Retry-After).")
@click.option("--max-delay", default=60.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Longest wait between attempts (s).")
def upload(url: str | None, db: str | None, token_file: str | None, show_status: bool, batch: int, tries: int,
           max_delay: float) -> None:
    """Upload every run and observation URL's collector has not acknowledged yet.

    Safe to interrupt and to repeat: the local database remembers what the collector
    acknowledged, and the collector stores each observation once whatever is sent again.
    Exit status 75 when the collector could not be reached: run it again later.
    """
    from kzprobe.collector.client import Options, TokenRefused, Unreachable, Uploader, UploadError, status
    from kzprobe.commands import _open_store

    if url is not None:
        check_url(url)
    if show_status:
        store = _open_store(db)
        rows = status(store, url)
        store.close()
        pending = 0
        for r in rows:
            done = "closed" if r.closed else ("pending" if r.pending or r.state != "running" else "measuring")
            click.echo(f"run {r.run_id}\t{r.uid}\t{r.state}\t{r.acked}/{r.observations} acknowledged\t{done}")
            pending += r.pending + (0 if r.closed or r.state == "running" else 1)
        click.echo(f"{sum(r.pending for r in rows)} observation(s) and "
                   f"{sum(1 for r in rows if not r.closed)} run(s) not yet closed at "
                   f"{url or 'any collector'}", err=True)
        return
    if url is None:
        raise click.UsageError("URL is required (except with --status)")
    token = read_token(token_file)
    store = _open_store(db)
    up = Uploader(store, Options(url=url, token=token, batch=batch, max_tries=tries, max_delay=max_delay))
    try:
        report = up.upload_all()
    except TokenRefused as exc:
        raise click.ClickException(str(exc)) from None
    except Unreachable as exc:
        click.echo(f"kzprobe upload: {exc}; nothing is lost, run `kzprobe upload {url}` again later", err=True)
        sys.exit(75)
    except UploadError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        up.close()
        store.close()
    for line in report.problems:
        click.echo(f"kzprobe upload: refused: {line}", err=True)
    click.echo(f"uploaded to {url}: {report.runs} run(s), {report.stored} observation(s) stored, "
               f"{report.duplicates} already there, {report.closed} run(s) closed", err=True)
    if report.problems:
        sys.exit(1)


def check_upload_options(url: str, token_file: str | None) -> None:
    """For `kzprobe run --upload`: fail before measuring, not after, on a bad URL or no token."""
    check_url(url)
    read_token(token_file)


def start_background_upload(db_url: str, url: str, token_file: str | None) -> str:
    """Start ``kzprobe upload`` detached from this process and return a line for the user.

    Detached (its own session, no terminal) so that the run returns at once, whether the
    collector is up, slow or down: measuring never waits on it.  The token travels through the
    environment or the file, never the child's command line (visible in ``ps``).
    """
    import subprocess

    from kzprobe.storage import default_db_path

    cmd = [sys.executable, "-m", "kzprobe.cli", "upload", "--db", db_url]
    if token_file:
        cmd += ["--token-file", str(Path(token_file).resolve())]
    cmd.append(url)
    log = default_db_path().parent / "upload.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("ab")
    except OSError:
        out = None
    try:
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=out if out is not None else subprocess.DEVNULL, start_new_session=True,
                         close_fds=True)
    except OSError as exc:
        return f"upload not started ({exc.strerror or exc}); run `kzprobe upload {url}` later"
    finally:
        if out is not None:
            out.close()
    return (f"uploading to {url} in the background (log: {log}); `kzprobe upload --status` shows what is "
            f"pending, and `kzprobe upload {url}` finishes the job if it is interrupted")
