"""Alembic environment: runs the store's migrations on a connection handed in, or on a URL."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from balancer.store.engine import is_sqlite, make_async_engine
from balancer.store.tables import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
        render_as_batch=is_sqlite(connection.engine.url),
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """Write the migration SQL for ``sqlalchemy.url`` instead of running it (``alembic upgrade --sql``)."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Migrate the connection the caller passed in ``config.attributes``, else one opened from the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("no connection and no sqlalchemy.url to migrate")
    asyncio.run(_run_on_url(url))


async def _run_on_url(url: str) -> None:
    # The store's own async driver, so no second (blocking) driver is needed for migrations.
    engine = make_async_engine(url, pooled=False)
    try:
        async with engine.begin() as owned:
            await owned.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
