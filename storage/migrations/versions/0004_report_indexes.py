"""Schema 4: two covering indexes on verdicts for the analyst's report.

``kzprobe report --format html`` groups verdicts in the database.  ``ix_verdicts_cell`` (target,
run_id, status, mechanism) lets ``GROUP BY target`` stream in index order instead of sorting
every verdict; ``ix_verdicts_run_state`` (run_id, status, mechanism, detail) answers per-run
counts and "blocked verdicts only" from the index alone.  Together they take the report of a
18 M-verdict database (10,000 targets x 20 networks x 90 daily runs) from minutes to seconds.

Revision ID: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_verdicts_cell", "verdicts", ["target", "run_id", "status", "mechanism"])
    op.create_index("ix_verdicts_run_state", "verdicts", ["run_id", "status", "mechanism", "detail"])
    op.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.drop_index("ix_verdicts_run_state", table_name="verdicts")
    op.drop_index("ix_verdicts_cell", table_name="verdicts")
    op.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
