"""Balancer secrets: named secrets the balancer generates once, such as the one node fleet tokens
derive from, so restarts and replicas sharing the database agree on them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "balancer_secrets",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("secret", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_balancer_secrets")),
    )


def downgrade() -> None:
    op.drop_table("balancer_secrets")
