"""What a database that cannot be reached looks like to the store, and the one error callers see for it.

Every store method runs inside :func:`mapped`, so a dead server, a refused or timed-out connection, a
pool with no connection to give, or a SQLite file that cannot be opened all reach the doors as one
``unavailable`` error (HTTP 503, gRPC UNAVAILABLE) instead of an internal error with a driver message.
Errors that say something about the request itself (a constraint, a value too long) pass unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import structlog
from sqlalchemy import exc as sa_exc

from common.errors import ErrorCode, LlmlbError

log = structlog.get_logger(__name__)

MESSAGE = "the balancer's database is unreachable; try again"
RETRY_AFTER_S = 2.0  # what HTTP clients are told to wait: a restart or failover takes seconds

# asyncpg's own errors for a connection that is gone or refused, when they surface unwrapped or as
# the cause of SQLAlchemy's wrapper: the server shut down, is starting, or dropped the connection.
_ASYNCPG_UNREACHABLE: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, "the database system is starting up"
    asyncpg.exceptions.InterfaceError,  # e.g. "connection is closed"
)


class StoreUnavailable(LlmlbError):
    """The store's database could not be reached; the operation did nothing and may be retried."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(ErrorCode.UNAVAILABLE, MESSAGE, retry_after_s=RETRY_AFTER_S)
        self.reason = reason  # the driver's own words, for the log only


def is_unreachable(error: BaseException) -> bool:
    """True when ``error`` means the database could not be reached, not that the request was wrong."""
    if isinstance(error, (OSError, sa_exc.TimeoutError, *_ASYNCPG_UNREACHABLE)):
        return True  # OSError covers refused connections, resets and connect timeouts (TimeoutError)
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated or isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
            return True
        cause = error.orig.__cause__ if error.orig is not None else None
        return isinstance(error.orig, _ASYNCPG_UNREACHABLE) or isinstance(
            cause, (OSError, *_ASYNCPG_UNREACHABLE)
        )
    return False


@contextmanager
def mapped(operation: str) -> Iterator[None]:
    """Runs a store operation; a database that cannot be reached raises :class:`StoreUnavailable`."""
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as error:
        if not is_unreachable(error):
            raise
        log.warning("store.unavailable", operation=operation, error=repr(error))
        raise StoreUnavailable(repr(error)) from error
