"""SQLAlchemy 2 typed models.  SQLite by default; any SQLAlchemy URL works.

Structured step details are stored as JSON rather than as one column per field: the three
sources (live, pcap, OONI) fill different subsets, and the observation model is the contract.
The columns the analyst filters on (step, vantage, failure, address, ...) are real columns.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Bump when the schema changes; stored in the ``meta`` table and checked on open.
SCHEMA_VERSION = 2


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

    __table_args__ = (Index("ix_obs_run_target", "run_id", "target"),)


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


class TraceRow(Base):
    __tablename__ = "traces"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    target: Mapped[str] = mapped_column(Text)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
