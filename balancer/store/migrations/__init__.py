"""Alembic migrations of the balancer's metadata store.

No ``alembic.ini`` is needed: :func:`alembic_config` builds the configuration in code and points
``script_location`` at this package's own directory, so migrations run from an installed package and
from any working directory.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(url: str | None = None, *, connection: Connection | None = None) -> Config:
    """An Alembic configuration for this package, bound to ``url`` or to an open ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    if url is not None:
        # ConfigParser interpolation would read a "%" of a URL-escaped password as a reference.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest revision shipped with this package."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade_to_head(connection: Connection) -> str | None:
    """Migrate the database behind ``connection`` to the newest revision and return that revision.

    Synchronous, like all of Alembic: from async code, run it through ``AsyncConnection.run_sync``, so
    the same async driver (aiosqlite or asyncpg) migrates and serves. The caller owns the transaction
    and commits it.
    """
    command.upgrade(alembic_config(connection=connection), "head")
    return MigrationContext.configure(connection).get_current_revision()
