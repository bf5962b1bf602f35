"""Tables of the balancer's metadata store.

Only ``balancer.store`` touches these rows; everything else sees the dataclasses of ``common.types``.
Every change here needs a matching revision under ``balancer/store/migrations/versions`` (a unit test fails
on any drift).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, UOWTransaction, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so migrations can name (and later alter) every constraint.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp; SQLite keeps no zone, so there it is stored as naive UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the store keeps timezone-aware UTC times only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TooLong(ValueError):
    """A text value longer than its column allows."""


def check_lengths(row: Base) -> None:
    """Refuse a string longer than its column, alike on every engine.

    PostgreSQL refuses such a value with a driver error, while SQLite quietly stores it whole; checked
    here, both raise :class:`TooLong`, which callers turn into a clear ``invalid_request``.
    """
    for column in row.__table__.columns:
        length = getattr(column.type, "length", None)
        value = getattr(row, column.key, None)
        if length is not None and isinstance(value, str) and len(value) > length:
            raise TooLong(f"{column.key} is {len(value)} characters long; the limit is {length}")


class CheckedSession(Session):
    """The store's sessions: every row written is checked against its columns' lengths first."""


@event.listens_for(CheckedSession, "before_flush")
def _check_rows(session: Session, _flush: UOWTransaction, _instances: object) -> None:
    for row in (*session.new, *session.dirty):
        if isinstance(row, Base):
            check_lengths(row)


class ModelRow(Base):
    """A catalogue entry; ``deleted_at`` marks a tombstone so a deleted catalogue model is not re-seeded."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(16))
    repo_id: Mapped[str] = mapped_column(String(256))
    revision: Mapped[str] = mapped_column(String(256))
    origin: Mapped[str] = mapped_column(String(2048))
    capabilities: Mapped[list[str]] = mapped_column(JSON)
    tags: Mapped[list[str]] = mapped_column(JSON)
    required_vram_mb: Mapped[int] = mapped_column(Integer)
    chat_template: Mapped[str] = mapped_column(Text)
    from_catalog: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class ManifestFileRow(Base):
    """One file of a model's manifest; ``position`` keeps the manifest's order."""

    __tablename__ = "manifest_files"
    __table_args__ = (UniqueConstraint("model_id", "filename"),)

    model_id: Mapped[str] = mapped_column(
        String(256), ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    filename: Mapped[str] = mapped_column(String(1024))
    format: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    backends: Mapped[list[str]] = mapped_column(JSON)


class NodeRow(Base):
    """A node of the fleet as last registered."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    address: Mapped[str] = mapped_column(String(512))
    backends: Mapped[list[str]] = mapped_column(JSON)
    gpus: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    runtimes: Mapped[list[str]] = mapped_column(JSON)
    version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # The replica holding the node's session (NULL while it has none), and what the node last
    # reported there as JSON (``balancer.fleet.rows.NodeSnapshot``), so every replica can route to it.
    replica_id: Mapped[str | None] = mapped_column(String(64))
    live: Mapped[str | None] = mapped_column(Text)
    # The key that registered the node (or an admin's re-assignment); NULL when keys are off.
    owner_key_id: Mapped[str | None] = mapped_column(String(128))


class NodeCommandRow(Base):
    """A command waiting for a node's acknowledgement; the row is deleted when acknowledged."""

    __tablename__ = "node_commands"
    # AUTOINCREMENT: an acknowledged command's id is never handed to a new command.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(String(256), ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    model_id: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ApiKeyRow(Base):
    """An API key; only the hash of its secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    prefix: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(256), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # The one node id a node key may register; NULL: any node id it owns or that is unclaimed.
    node_id: Mapped[str | None] = mapped_column(String(256))
    # Limits (``common.types.KeyLimits``): NULL or 0 is no limit; NULL or an empty list, every model.
    limit_rpm: Mapped[int | None] = mapped_column(BigInteger)
    limit_tpm: Mapped[int | None] = mapped_column(BigInteger)
    limit_parallel: Mapped[int | None] = mapped_column(BigInteger)
    limit_daily_tokens: Mapped[int | None] = mapped_column(BigInteger)
    limit_monthly_tokens: Mapped[int | None] = mapped_column(BigInteger)
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON)


class SecretRow(Base):
    """A secret the balancer generated for itself, by name (e.g. the one node fleet tokens come from).

    Kept in the store so restarts and replicas sharing the database all use the same one.
    """

    __tablename__ = "balancer_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ReplicaRow(Base):
    """A running balancer replica; its heartbeat (``seen_at``) tells the others it is alive."""

    __tablename__ = "balancer_replicas"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    seen_at: Mapped[datetime] = mapped_column(UtcDateTime())


class UsageRow(Base):
    """Requests and tokens of one API key on one model in one minute (``key_id`` "" when auth is off).

    Written in batches that add to the row (``balancer.usage``); kept so usage survives restarts.
    """

    __tablename__ = "usage"

    key_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    minute: Mapped[datetime] = mapped_column(UtcDateTime(), primary_key=True, index=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)


class DeploymentRow(Base):
    """A deployment (``balancer.scheduler.Deployment``): ``copies`` for a fixed count, else
    ``min_copies``..``max_copies`` autoscaled; ``selector`` the node labels it needs."""

    __tablename__ = "deployments"

    model_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    copies: Mapped[int | None] = mapped_column(Integer)
    min_copies: Mapped[int] = mapped_column(Integer)
    max_copies: Mapped[int | None] = mapped_column(Integer)
    selector: Mapped[dict[str, str]] = mapped_column(JSON)
    memory_mb: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class LeaseRow(Base):
    """A lease one balancer replica holds until ``expires_at`` (renewed while it lives): the scheduler's."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
