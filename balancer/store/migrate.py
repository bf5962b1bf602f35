"""Migrating a store's database to the newest schema, through the store's own async driver."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL

from balancer.store.engine import is_postgresql, is_sqlite, make_async_engine
from balancer.store.migrations import upgrade_to_head

# The PostgreSQL advisory lock balancers starting together take around migrating: one migrates, the
# others wait and then find the schema at head. Any constant works; this one is "llmlb" in ASCII.
MIGRATION_LOCK_ID = 0x6C6C6D6C62


def private_file(path: Path) -> None:
    """Creates ``path`` (and its directory) readable by its owner only, whatever the umask; an existing
    file is made so too. It holds the fleet token's secret and key hashes: mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


async def migrate(url: URL) -> str | None:
    """Create the database's directory and migrate it to head, through the store's own async driver."""
    if is_sqlite(url) and url.database:
        private_file(Path(url.database))
    engine = make_async_engine(url, pooled=False)
    try:
        # One transaction (DDL is transactional on both engines): a failed migration changes nothing.
        async with engine.begin() as connection:
            if is_postgresql(url):
                await connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            return await connection.run_sync(upgrade_to_head)
    finally:
        await engine.dispose()
