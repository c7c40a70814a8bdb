"""SQLAlchemy models. The schema itself is owned by the Alembic migrations;
a test checks that these models and the migrated schema never drift apart."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    Boolean,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# MySQL's DATETIME drops fractions of a second unless told otherwise.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Service(Base):
    """One agent process on one host: its heartbeat and whether it takes work."""

    __tablename__ = "services"
    __table_args__ = (UniqueConstraint("host", "binary"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    binary: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    updated_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    report_count: Mapped[int] = mapped_column(Integer, default=0)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled_reason: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    # The token of the agent process that holds the host (compute_agent.ownership).
    owner: Mapped[str | None] = mapped_column(String(36))


class Instance(Base):
    """A VM the cloud placed on a host, with what the cloud believes of it."""

    __tablename__ = "instances"
    # (host, deleted): a host's instances; with domain_name: the reaper's
    # look-up among dead rows; deleted_at: the purge's. (host) of the live
    # rows only, where partial indexes exist: once ANALYZE has seen as many
    # dead rows as live ones, SQLite scanned the whole table rather than use
    # (host, deleted) for "deleted = 0" (0003).
    __table_args__ = (
        Index(None, "host", "deleted"),
        Index(None, "host", "deleted", "domain_name"),
        Index(None, "deleted_at"),
        Index(
            "ix_instances_live_host",
            "host",
            sqlite_where=text("deleted = 0"),
            postgresql_where=text("deleted = false"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    display_name: Mapped[str | None] = mapped_column(String(255))
    domain_name: Mapped[str] = mapped_column(String(255))
    vm_state: Mapped[str] = mapped_column(String(16))
    task_state: Mapped[str | None] = mapped_column(String(32))
    power_state: Mapped[str] = mapped_column(String(16))
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    updated_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class InstanceAction(Base):
    """The audit trail: one row per recorded change or request on an instance."""

    __tablename__ = "instance_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_uuid: Mapped[str] = mapped_column(String(36), index=True)
    action: Mapped[str] = mapped_column(String(32))
    field: Mapped[str | None] = mapped_column(String(32))
    old_value: Mapped[str | None] = mapped_column(String(32))
    new_value: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, index=True)
