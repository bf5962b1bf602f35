"""Limits and budgets per API key: requests and tokens per minute, requests in flight, tokens per day
and per month, and the models it may use. NULL is no limit, so existing keys keep working unlimited.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTS = ("limit_rpm", "limit_tpm", "limit_parallel", "limit_daily_tokens", "limit_monthly_tokens")


def upgrade() -> None:
    # batch: SQLite alters a table by copying it; PostgreSQL gets plain ALTER TABLE statements.
    with op.batch_alter_table("api_keys") as batch:
        for name in _COUNTS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("allowed_models", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("allowed_models")
        for name in reversed(_COUNTS):
            batch.drop_column(name)
