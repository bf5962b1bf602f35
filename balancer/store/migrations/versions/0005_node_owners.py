"""Node ownership: the key a node id belongs to, and the one node id a node key may register.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("owner_key_id", sa.String(128), nullable=True))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("node_id", sa.String(256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("node_id")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("owner_key_id")
