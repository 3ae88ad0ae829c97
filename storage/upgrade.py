"""Schema versions: recognise a database's revision, upgrade it in place with Alembic.

Alembic is imported only by :func:`upgrade` (``kzprobe db upgrade``).  Opening a database
(:class:`kzprobe.storage.Store`) only reads the revision with one query: a new database is made
from the models and stamped with :data:`HEAD_REVISION`, a current one is used as is, and an
older one is refused with the command that upgrades it -- never migrated behind the user's back,
because on a shared PostgreSQL a migration is the operator's decision.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection

from kzprobe.storage.models import HEAD_REVISION

#: Release schema versions (``meta.schema_version``) from before Alembic -> their revision.
LEGACY_REVISIONS = {"1": "0001"}


def revision_of(conn: Connection) -> str | None:
    """The database's Alembic revision; None for an empty database."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables:
        rev = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        if rev is not None:
            return str(rev)
    if "runs" not in tables:
        return None
    version = None
    if "meta" in tables:
        version = conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()
    # kzprobe 0.1.0 wrote schema_version 1 and no alembic_version.
    return LEGACY_REVISIONS.get(str(version or "1"), f"schema-{version}")


def stamp(conn: Connection, revision: str = HEAD_REVISION) -> None:
    """Record ``revision`` as Alembic does (a one-row table), without importing Alembic."""
    conn.execute(text("CREATE TABLE IF NOT EXISTS alembic_version "
                      "(version_num VARCHAR(32) NOT NULL, CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"))
    conn.execute(text("DELETE FROM alembic_version"))
    conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:r)"), {"r": revision})


@dataclass(frozen=True, slots=True)
class UpgradeResult:
    before: str | None
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def alembic_config(conn: Connection) -> object:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "kzprobe.storage:migrations")
    cfg.attributes["connection"] = conn
    return cfg


def script_head() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(None)).get_current_head()  # type: ignore[arg-type]
    assert head is not None
    return head


def upgrade(url: str) -> UpgradeResult:
    """Upgrade the database at ``url`` to the head revision, in one transaction where the
    database allows it (PostgreSQL: all or nothing; SQLite: per statement, copied tables)."""
    from alembic import command

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            before = revision_of(conn)
            if before is not None and before.startswith("schema-"):
                raise ValueError(f"unknown schema version {before[7:]} (newer than this kzprobe?)")
            if before is not None and "alembic_version" not in inspect(conn).get_table_names():
                stamp(conn, before)
            command.upgrade(alembic_config(conn), "head")  # type: ignore[arg-type]
            after = revision_of(conn)
    finally:
        engine.dispose()
    assert after is not None
    return UpgradeResult(before, after)
