"""Engines for the metadata store: SQLite (embedded, the default) or PostgreSQL (through asyncpg).

SQLite gets the settings every connection needs (WAL, foreign keys, a busy timeout); PostgreSQL gets a
bounded connection pool that survives database restarts and idle-connection reapers.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

# How long a connection waits for another writer's lock before failing with "database is locked".
BUSY_TIMEOUT_MS = 5000

# PostgreSQL pool. Writes are serialised inside one balancer and reads are short, so a few connections
# carry the load; the bound matters once replicas share a server (each holds up to size + overflow).
DEFAULT_POOL_SIZE = 5  # connections kept open (LLMLB_DATABASE_POOL_SIZE)
POOL_MAX_OVERFLOW = 5  # extra connections opened under a burst, closed when returned
POOL_TIMEOUT_S = 10  # how long a caller waits for a free connection before failing
# While the database is unreachable a caller fails within these bounds, not the driver's minute or
# the kernel's minutes: opening a connection, and any one statement on a pooled connection.
CONNECT_TIMEOUT_S = 5
COMMAND_TIMEOUT_S = 15
# Reopen connections older than this, before a firewall or PgBouncer drops them as idle.
POOL_RECYCLE_S = 1800
# The async driver each backend is used through when a URL names none (e.g. "postgresql://...").
ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def is_postgresql(url: URL) -> bool:
    return url.get_backend_name() == "postgresql"


def is_memory_sqlite(url: URL) -> bool:
    """True for an in-memory SQLite URL: each engine would see its own empty database."""
    database = url.database or ""
    return is_sqlite(url) and (database in ("", ":memory:") or url.query.get("mode") == "memory")


def async_url(url: str | URL) -> URL:
    """``url`` with the backend's async driver when it names none: ``postgresql://`` → asyncpg."""
    parsed = make_url(url)
    driver = ASYNC_DRIVERS.get(parsed.get_backend_name())
    if "+" not in parsed.drivername and driver is not None:
        return parsed.set(drivername=f"{parsed.drivername}+{driver}")
    return parsed


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _on_begin), so reads inside a transaction see one snapshot.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _on_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN")


def _install_sqlite_hooks(engine: Engine) -> None:
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _on_connect)
        event.listen(engine, "begin", _on_begin)


def make_async_engine(
    url: str | URL, *, pool_size: int = DEFAULT_POOL_SIZE, pooled: bool = True
) -> AsyncEngine:
    """The engine the store's coroutines use; ``pooled=False`` for a one-off use such as migrating."""
    parsed = async_url(url)
    # Parameters are key hashes and secrets: never in a log line or an error's message.
    options: dict[str, Any] = {"hide_parameters": True}
    if not pooled:
        options["poolclass"] = NullPool
    elif is_postgresql(parsed):
        options |= {
            "pool_size": pool_size,
            "max_overflow": POOL_MAX_OVERFLOW,
            "pool_timeout": POOL_TIMEOUT_S,
            "pool_recycle": POOL_RECYCLE_S,
            # A connection the server closed (restart, failover) is replaced before use, not failed.
            "pool_pre_ping": True,
        }
    if parsed.get_driver_name() == "asyncpg":
        connect_args: dict[str, Any] = {
            # Names the balancer's connections in pg_stat_activity for whoever runs the database.
            "server_settings": {"application_name": "llmlb-balancer"},
            "timeout": CONNECT_TIMEOUT_S,
        }
        if pooled:  # a migration may legitimately run long; the serving pool's statements may not
            connect_args["command_timeout"] = COMMAND_TIMEOUT_S
        options["connect_args"] = connect_args
    engine = create_async_engine(parsed, **options)
    _install_sqlite_hooks(engine.sync_engine)
    return engine
