"""Deployments: how many copies of which model the scheduler keeps, and on which nodes they may run.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("model_id", sa.String(256), nullable=False),
        sa.Column("copies", sa.Integer(), nullable=True),
        sa.Column("min_copies", sa.Integer(), nullable=False),
        sa.Column("max_copies", sa.Integer(), nullable=True),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_id", name=op.f("pk_deployments")),
    )


def downgrade() -> None:
    op.drop_table("deployments")
