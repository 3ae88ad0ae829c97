"""Baseline: the schema of kzprobe 0.1.0 (SCHEMA_VERSION 1), as its create_all made it.

A database written by 0.1.0 has no alembic_version table; ``kzprobe db upgrade`` recognises it
by ``meta.schema_version = 1`` and stamps it with this revision before upgrading.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("meta", sa.Column("key", sa.String(64), primary_key=True),
                    sa.Column("value", sa.Text(), nullable=False))
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("software", sa.String(64), nullable=False),
        sa.Column("software_version", sa.String(32), nullable=False),
        sa.Column("started", sa.Float(), nullable=False),
        sa.Column("ended", sa.Float(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("vantage", sa.JSON(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
    )
    op.create_table(
        "targets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("domain", sa.String(255), nullable=False),
        sa.Column("category", sa.String(16), nullable=False),
        sa.Column("claim", sa.JSON(), nullable=True),
    )
    op.create_index("ix_targets_run_id", "targets", ["run_id"])
    op.create_table(
        "observations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("step", sa.String(8), nullable=False),
        sa.Column("vantage", sa.String(8), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("domain", sa.String(255), nullable=False),
        sa.Column("address", sa.String(64), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("t_start", sa.Float(), nullable=False),
        sa.Column("t_end", sa.Float(), nullable=False),
        sa.Column("failure", sa.String(200), nullable=True),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("packets", sa.JSON(), nullable=False),
    )
    op.create_index("ix_obs_run_target", "observations", ["run_id", "target"])
    op.create_table(
        "verdicts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("domain", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("mechanism", sa.String(8), nullable=True),
        sa.Column("detail", sa.String(64), nullable=True),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("sentence", sa.Text(), nullable=False),
        sa.Column("observations", sa.JSON(), nullable=False),
        sa.Column("packets", sa.JSON(), nullable=False),
    )
    op.create_index("ix_verdicts_run_id", "verdicts", ["run_id"])
    op.create_table(
        "traces",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
    )
    op.create_index("ix_traces_run_id", "traces", ["run_id"])
    op.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")


def downgrade() -> None:
    for t in ("traces", "verdicts", "observations", "targets", "runs", "meta"):
        op.drop_table(t)
