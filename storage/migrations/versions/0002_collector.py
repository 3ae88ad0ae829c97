"""Schema 2: durable runs (the measuring process's pid, boot id, start time and heartbeat; each
target's measured time and position), run uids and declared vantage columns, observation
sequence numbers, the classifier version of each verdict, the volunteer's upload queue and the
collector's tokens.

Existing runs get a random uid and their vantage columns copied from the ``vantage`` JSON, so
old runs answer the new filters (--network, --asn, --country) like new ones.

Revision ID: 0002
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _text(value: Any, limit: int) -> str | None:
    return None if value is None or value == "" else str(value)[:limit]


def upgrade() -> None:
    with op.batch_alter_table("runs") as b:
        b.add_column(sa.Column("pid", sa.Integer(), nullable=True))
        b.add_column(sa.Column("host_boot", sa.String(64), nullable=True))
        b.add_column(sa.Column("proc_start", sa.Integer(), nullable=True))
        b.add_column(sa.Column("heartbeat", sa.Float(), nullable=True))
        b.add_column(sa.Column("uid", sa.String(36), nullable=True))
        b.add_column(sa.Column("network_name", sa.String(128), nullable=True))
        b.add_column(sa.Column("asn", sa.String(16), nullable=True))
        b.add_column(sa.Column("country", sa.String(8), nullable=True))
        b.add_column(sa.Column("classifier_version", sa.String(64), nullable=True))
        b.add_column(sa.Column("submitter", sa.String(64), nullable=True))
    conn = op.get_bind()
    runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("vantage", sa.JSON),
                    sa.column("uid", sa.String), sa.column("network_name", sa.String),
                    sa.column("asn", sa.String), sa.column("country", sa.String))
    for rid, vantage in conn.execute(sa.select(runs.c.id, runs.c.vantage)).all():
        v = vantage if isinstance(vantage, dict) else json.loads(vantage or "{}")
        conn.execute(runs.update().where(runs.c.id == rid).values(
            uid=str(uuid.uuid4()), network_name=_text(v.get("network_name"), 128),
            asn=_text(v.get("asn"), 16), country=_text(v.get("country"), 8)))
    with op.batch_alter_table("runs") as b:
        b.alter_column("uid", existing_type=sa.String(36), nullable=False)
        b.create_index("ix_runs_uid", ["uid"], unique=True)
        b.create_index("ix_runs_vantage", ["network_name", "asn", "country"])
        b.create_index("ix_runs_started", ["started"])

    # A 0.1.0 run was measured in list order, and all its targets to the end (or it was
    # interrupted, and then nothing says which were done): position = id order, measured unknown.
    with op.batch_alter_table("targets") as b:
        b.add_column(sa.Column("measured", sa.Float(), nullable=True))
        b.add_column(sa.Column("position", sa.Integer(), nullable=False, server_default="0"))
    targets = sa.table("targets", sa.column("id", sa.Integer), sa.column("run_id", sa.Integer),
                       sa.column("position", sa.Integer))
    seen: dict[int, int] = {}
    for tid, run_id in conn.execute(sa.select(targets.c.id, targets.c.run_id).order_by(targets.c.id)).all():
        seen[run_id] = seen.get(run_id, -1) + 1
        conn.execute(targets.update().where(targets.c.id == tid).values(position=seen[run_id]))
    with op.batch_alter_table("targets") as b:
        b.alter_column("position", existing_type=sa.Integer(), server_default=None)

    with op.batch_alter_table("observations") as b:
        b.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        b.create_index("ix_obs_run_seq", ["run_id", "seq"], unique=True)
    with op.batch_alter_table("verdicts") as b:
        b.add_column(sa.Column("classifier_version", sa.String(64), nullable=True))

    op.create_table(
        "uploads",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("collector", sa.String(255), nullable=False),
        sa.Column("acked_seq", sa.Integer(), nullable=False),
        sa.Column("opened", sa.Boolean(), nullable=False),
        sa.Column("closed", sa.Boolean(), nullable=False),
        sa.Column("updated", sa.Float(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
    )
    op.create_index("ix_uploads_run_collector", "uploads", ["run_id", "collector"], unique=True)
    op.create_table(
        "collector_tokens",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("salt", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(128), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("revoked", sa.Float(), nullable=True),
    )
    op.create_index("ix_tokens_key_id", "collector_tokens", ["key_id"], unique=True)
    op.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.drop_table("collector_tokens")
    op.drop_table("uploads")
    with op.batch_alter_table("verdicts") as b:
        b.drop_column("classifier_version")
    with op.batch_alter_table("observations") as b:
        b.drop_index("ix_obs_run_seq")
        b.drop_column("seq")
    with op.batch_alter_table("runs") as b:
        for ix in ("ix_runs_started", "ix_runs_vantage", "ix_runs_uid"):
            b.drop_index(ix)
        for col in ("submitter", "classifier_version", "country", "asn", "network_name", "uid", "heartbeat",
                    "proc_start", "host_boot", "pid"):
            b.drop_column(col)
    with op.batch_alter_table("targets") as b:
        b.drop_column("position")
        b.drop_column("measured")
    op.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
