"""Engines for the metadata store, with the SQLite settings every connection needs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

# How long a connection waits for another writer's lock before failing with "database is locked".
BUSY_TIMEOUT_MS = 5000


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def is_memory_sqlite(url: URL) -> bool:
    """True for an in-memory SQLite URL: each engine would see its own empty database."""
    database = url.database or ""
    return is_sqlite(url) and (database in ("", ":memory:") or url.query.get("mode") == "memory")


def sync_url(url: str | URL) -> URL:
    """The same database through the backend's default blocking driver (aiosqlite → sqlite3)."""
    parsed = make_url(url)
    return parsed.set(drivername=parsed.get_backend_name())


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


def make_sync_engine(url: str | URL) -> Engine:
    """A blocking engine for migrations; call it from a worker thread, never on the event loop."""
    engine = create_engine(sync_url(url), poolclass=NullPool)
    _install_sqlite_hooks(engine)
    return engine


def make_async_engine(url: str | URL) -> AsyncEngine:
    """The engine the store's coroutines use."""
    engine = create_async_engine(url)
    _install_sqlite_hooks(engine.sync_engine)
    return engine
