"""``kzprobe db``: database maintenance (schema upgrades)."""

from __future__ import annotations

import click


@click.group("db")
def db() -> None:
    """Database maintenance: `kzprobe db upgrade` brings a database to this kzprobe's schema."""


@db.command("upgrade")
@click.option("--db", "db_url", default=None, metavar="PATH|URL",
              help="SQLite path or SQLAlchemy URL (default: ~/.local/share/kzprobe/kzprobe.db or $KZPROBE_DB).")
def upgrade(db_url: str | None) -> None:
    """Upgrade a database in place to the current schema (a no-op when it is current).

    Everything stored is kept. Back up a PostgreSQL database first; on PostgreSQL the whole
    upgrade is one transaction, on SQLite tables are copied and a failure can leave a half-
    upgraded file (keep the copy).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from kzprobe.storage import StorageError, resolve_db_url
    from kzprobe.storage.upgrade import upgrade as do_upgrade

    try:
        url = resolve_db_url(db_url)
        result = do_upgrade(url)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    except (SQLAlchemyError, ValueError) as exc:
        first = (str(exc).splitlines() or [exc.__class__.__name__])[0]
        raise click.ClickException(f"{db_url or url}: cannot upgrade: {first}") from None
    except Exception as exc:  # alembic.util.CommandError: e.g. a revision this kzprobe does not know
        if exc.__class__.__name__ != "CommandError":
            raise
        raise click.ClickException(f"{db_url or url}: cannot upgrade: {exc}") from None
    shown = _redact(url)
    if result.before is None:
        click.echo(f"{shown}: created at schema {result.after}")
    elif result.changed:
        click.echo(f"{shown}: upgraded from schema {result.before} to {result.after}")
    else:
        click.echo(f"{shown}: already at schema {result.after}; nothing to do")


def _redact(url: str) -> str:
    """A URL fit to print: without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown as given; it has no password field to hide
        return url
