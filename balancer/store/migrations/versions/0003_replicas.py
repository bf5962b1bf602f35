"""Replicas: which balancer replica holds each node's session and what the node last reported there,
and a row per running replica whose heartbeat tells the others it is alive.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("replica_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("live", sa.Text(), nullable=True))
    op.create_table(
        "balancer_replicas",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_balancer_replicas")),
    )


def downgrade() -> None:
    op.drop_table("balancer_replicas")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("live")
        batch.drop_column("replica_id")
