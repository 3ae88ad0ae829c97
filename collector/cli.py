"""``kzprobe collector``: receive volunteers' uploads; ``kzprobe collector token ...``: manage tokens."""

from __future__ import annotations

import logging
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import click

DB_HELP = ("SQLite path or SQLAlchemy URL, e.g. postgresql+psycopg://user@/kzprobe?host=/run/postgresql "
           "(default: $KZPROBE_COLLECTOR_DB, else ~/.local/share/kzprobe/collector.db).")


def _default_db() -> str:
    env = os.environ.get("KZPROBE_COLLECTOR_DB")
    if env:
        return env
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return str(base / "kzprobe" / "collector.db")


def _store(db: str | None) -> Any:
    from kzprobe.storage import StorageError, Store

    try:
        return Store(db or _default_db())
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None


def _parse_listen(value: str) -> tuple[str, int]:
    from kzprobe.helper.cli import _parse_listen as parse

    try:
        return parse(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc}", param_hint="--listen") from None


@click.group("collector", invoke_without_command=True)
@click.option("--db", default=None, metavar="PATH|URL", help=DB_HELP)
@click.option("--listen", default="127.0.0.1:8790", show_default=True, metavar="ADDR:PORT",
              help="Address and port to listen on (port 0: any free port, printed when ready).")
@click.option("--log-addresses", is_flag=True, help="Log each request's client address (off by default: "
              "volunteers' addresses are sensitive, and runs never record them).")
@click.option("--max-body", default=16, show_default=True, type=click.IntRange(1, 256), metavar="MiB",
              help="Largest request body accepted (larger: 413).")
@click.option("--writers", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Batches written at once on PostgreSQL (SQLite: always 1).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Serve HTTPS with this certificate chain (PEM); needs --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="Key for --tls-cert.")
@click.pass_context
def collector(ctx: click.Context, db: str | None, listen: str, log_addresses: bool, max_body: int, writers: int,
              tls_cert: str | None, tls_key: str | None) -> None:
    """Run the collector: volunteers upload runs to it with `kzprobe upload URL`.

    Each volunteer needs a token (`kzprobe collector token add NAME`); runs are attributed to the
    token's name, never to an address. Uploads are idempotent: a retried batch is never stored
    twice. Without a sub-command, serve.
    """
    ctx.ensure_object(dict)
    ctx.obj["db"] = db
    if ctx.invoked_subcommand is not None:
        return
    from kzprobe.collector.app import Limits
    from kzprobe.collector.server import CollectorOptions

    host, port = _parse_listen(listen)
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    store = _store(db)
    opts = CollectorOptions(db=store.url, host=host, port=port, log_addresses=log_addresses, tls_cert=tls_cert,
                            tls_key=tls_key, limits=Limits(max_body=max_body * 1024 * 1024, writers=writers))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="kzprobe collector: %(message)s")
    _serve(opts, store)


def _serve(opts: Any, store: Any) -> None:
    import trio

    from kzprobe.collector.server import serve
    from kzprobe.helper.cli import _startup_oserror

    started = False

    def ready(url: str) -> None:
        nonlocal started
        started = True
        click.echo(f"kzprobe collector listening on {url}", err=True)
        sys.stderr.flush()

    try:
        trio.run(partial(serve, opts, store, ready=ready))
    except BaseException as exc:  # sorted below; anything else is re-raised
        os_err = _startup_oserror(exc) if not started else None
        if os_err is not None:
            raise click.ClickException(f"cannot listen on {opts.bind}: {os_err.strerror or os_err}") from None
        raise
    finally:
        store.close()
    click.echo("kzprobe collector stopped", err=True)


@collector.group("token")
def token() -> None:
    """Upload tokens: one per volunteer, shown once, stored as a salted scrypt hash."""


def _db_of(ctx: click.Context, db: str | None) -> str | None:
    """The leaf's --db, else the group's (`kzprobe collector --db URL token add NAME`)."""
    return db or (ctx.obj or {}).get("db")


@token.command("add")
@click.argument("name")
@click.option("--db", default=None, metavar="PATH|URL", help=DB_HELP)
@click.pass_context
def token_add(ctx: click.Context, name: str, db: str | None) -> None:
    """Create NAME's token and print it (this is the only time it is shown)."""
    from kzprobe.collector import tokens

    store = _store(_db_of(ctx, db))
    try:
        secret = tokens.add(store.session, name)
    except tokens.TokenError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()
    click.echo(secret)
    click.echo(f"token for {name!r} created; it is shown only now. The volunteer saves it to a file and runs "
               "`kzprobe upload --token-file FILE URL`.", err=True)


@token.command("list")
@click.option("--db", default=None, metavar="PATH|URL", help=DB_HELP)
@click.pass_context
def token_list(ctx: click.Context, db: str | None) -> None:
    """List tokens by name (never the tokens themselves)."""
    from kzprobe.collector import tokens

    store = _store(_db_of(ctx, db))
    try:
        rows = tokens.listing(store.session)
    finally:
        store.close()
    if not rows:
        click.echo("no tokens", err=True)
    for t in rows:
        state = "revoked " + _when(t.revoked) if t.revoked else "active"
        click.echo(f"{t.name}\tcreated {_when(t.created)}\t{state}")


@token.command("revoke")
@click.argument("name")
@click.option("--db", default=None, metavar="PATH|URL", help=DB_HELP)
@click.pass_context
def token_revoke(ctx: click.Context, name: str, db: str | None) -> None:
    """Revoke NAME's token: its uploads get 401 from now on (runs already stored stay)."""
    from kzprobe.collector import tokens

    store = _store(_db_of(ctx, db))
    try:
        tokens.revoke(store.session, name)
    except tokens.TokenError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()
    click.echo(f"token {name!r} revoked", err=True)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) if t else "-"
