"""Schema 3: the OONI import's de-duplication table.

``ooni_imports`` maps each imported measurement's key (``uid:<measurement_uid>``,
``rid:<report_id> <input>`` or ``sha256:<hash of its bytes>``) to its run.  Runs imported before
this revision have no key: re-importing their files once stores them again (their keys were
never recorded), and from then on re-imports are no-ops.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ooni_imports",
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ooni_imports")
