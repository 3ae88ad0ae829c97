"""Alembic environment: always called from :func:`kzprobe.storage.upgrade.upgrade` with an open
connection (there is no alembic.ini; the URL never comes from a file)."""

from __future__ import annotations

from alembic import context

from kzprobe.storage.models import Base

connection = context.config.attributes["connection"]
# render_as_batch: SQLite cannot ALTER most things; Alembic then copies the table instead.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
