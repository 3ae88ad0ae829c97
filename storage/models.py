"""SQLAlchemy 2 typed models.  SQLite by default; any SQLAlchemy URL works.

Structured step details are stored as JSON rather than as one column per field: the three
sources (live, pcap, OONI) fill different subsets, and the observation model is the contract.
The columns the analyst filters on (step, vantage, failure, address, ...) are real columns.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Bump when the schema changes; stored in the ``meta`` table and checked on open.  Every bump
#: comes with an Alembic migration in ``storage/migrations/versions`` (``kzprobe db upgrade``).
SCHEMA_VERSION = 4
#: The Alembic revision these models correspond to (tests check it is the migrations' head).
#: A new database is created from the models and stamped with it, without importing Alembic.
HEAD_REVISION = "0004"


def new_uid() -> str:
    """A run's globally unique id: random, so it says nothing about the volunteer."""
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class RunRow(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(16), default="live")
    software: Mapped[str] = mapped_column(String(64), default="kzprobe")
    software_version: Mapped[str] = mapped_column(String(32))
    started: Mapped[float] = mapped_column(Float)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: "running", "done", "interrupted" (Ctrl-C / SIGTERM), "deadline" (--deadline ran out),
    #: "failed" (internal error).  "abandoned" is never stored: it is how a "running" row whose
    #: process is gone is shown (see ``pid`` / ``host_boot``).
    state: Mapped[str] = mapped_column(String(16), default="running")
    #: The process measuring this run, and an identity that pid reuse cannot fake: the kernel's
    #: boot id plus the process's start time (clock ticks since boot, /proc/PID/stat field 22).
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    host_boot: Mapped[str | None] = mapped_column(String(64), nullable=True)
    proc_start: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: Last sign of life of the measuring process (wall clock), refreshed while it measures.
    heartbeat: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: resolver, network_name, asn, country, no_network ...  Never the probe's public IP
    #: unless the volunteer opted in.
    vantage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Global id: the same run on a volunteer's machine and on a collector (uploads key on it).
    uid: Mapped[str] = mapped_column(String(36), default=new_uid)
    #: The declared vantage as real columns (copies of ``vantage``'s keys) so that analysts'
    #: filters (--network, --asn, --country) are plain indexed SQL on SQLite and PostgreSQL alike.
    network_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    asn: Mapped[str | None] = mapped_column(String(16), nullable=True)
    country: Mapped[str | None] = mapped_column(String(8), nullable=True)
    classifier_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: On a collector: the name of the token that uploaded the run (never a client address).
    submitter: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (
        Index("ix_runs_uid", "uid", unique=True),
        Index("ix_runs_vantage", "network_name", "asn", "country"),
        Index("ix_runs_started", "started"),
    )


class TargetRow(Base):
    __tablename__ = "targets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    domain: Mapped[str] = mapped_column(String(255))
    category: Mapped[str] = mapped_column(String(16), default="")
    claim: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: When the target's measurement completed (all its observations committed); None means not
    #: measured yet, which is what ``run --resume`` measures and what shows as ``not_measured``.
    measured: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Position in the run's probe order (list order or --shuffle SEED), so a resume keeps it.
    position: Mapped[int] = mapped_column(Integer, default=0)


class ObservationRow(Base):
    __tablename__ = "observations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    target: Mapped[str] = mapped_column(Text)
    step: Mapped[str] = mapped_column(String(8))
    vantage: Mapped[str] = mapped_column(String(8))
    source: Mapped[str] = mapped_column(String(8))
    domain: Mapped[str] = mapped_column(String(255))
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    t_start: Mapped[float] = mapped_column(Float)
    t_end: Mapped[float] = mapped_column(Float)
    failure: Mapped[str | None] = mapped_column(String(200), nullable=True)
    purpose: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    packets: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: On a collector: the volunteer's sequence number (its local observation id).  Unique per
    #: run, so a retried batch cannot store an observation twice.  NULL in a volunteer's database.
    seq: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (
        Index("ix_obs_run_target", "run_id", "target"),
        Index("ix_obs_run_seq", "run_id", "seq", unique=True),
    )


class VerdictRow(Base):
    __tablename__ = "verdicts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    target: Mapped[str] = mapped_column(Text)
    domain: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    mechanism: Mapped[str | None] = mapped_column(String(8), nullable=True)
    detail: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rule: Mapped[str] = mapped_column(String(64))
    confidence: Mapped[float] = mapped_column(Float)
    sentence: Mapped[str] = mapped_column(Text)
    observations: Mapped[list[Any]] = mapped_column(JSON, default=list)
    packets: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: Which classifier decided (``kzprobe.storage.classifier.classifier_version()``); NULL for
    #: verdicts stored before schema 2.
    classifier_version: Mapped[str | None] = mapped_column(String(64), nullable=True)

    # For the analyst's report (kzprobe.report.query), which groups verdicts in the database:
    # (target, run_id, ...) lets "GROUP BY target" stream in index order instead of sorting every
    # verdict, and (run_id, status, ...) answers per-run counts and "blocked rows only" from the
    # index alone.  Both are covering for those queries (the row id is part of every index).
    __table_args__ = (
        Index("ix_verdicts_cell", "target", "run_id", "status", "mechanism"),
        Index("ix_verdicts_run_state", "run_id", "status", "mechanism", "detail"),
    )


class TraceRow(Base):
    __tablename__ = "traces"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    target: Mapped[str] = mapped_column(Text)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class UploadRow(Base):
    """The volunteer's upload queue: per (run, collector), the highest sequence number the
    collector acknowledged.  Observations are sent in id order, so one number is the queue."""

    __tablename__ = "uploads"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    collector: Mapped[str] = mapped_column(String(255))
    acked_seq: Mapped[int] = mapped_column(Integer, default=0)
    opened: Mapped[bool] = mapped_column(Boolean, default=False)
    closed: Mapped[bool] = mapped_column(Boolean, default=False)
    updated: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (Index("ix_uploads_run_collector", "run_id", "collector", unique=True),)


class TokenRow(Base):
    """A collector's upload token: only a salted scrypt hash of its secret is kept."""

    __tablename__ = "collector_tokens"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The public half of the token (``kzp_<key_id>_<secret>``): finds the row without the secret.
    key_id: Mapped[str] = mapped_column(String(32))
    salt: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(128))
    created: Mapped[float] = mapped_column(Float)
    revoked: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_tokens_key_id", "key_id", unique=True),)


class OoniImportRow(Base):
    """An imported OONI measurement's key -> its run.  Committed in the same transaction as the
    run, so re-importing (or resuming an import killed half-way) skips exactly what is stored."""

    __tablename__ = "ooni_imports"
    #: ``uid:<measurement_uid>``, ``rid:<report_id> <input>`` or ``sha256:<hash of the bytes>``.
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
