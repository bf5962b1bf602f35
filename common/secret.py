"""Keys, tokens and passwords held in memory: a type whose ``repr`` and ``str`` never show the value.

A secret in a plain ``str`` reaches the log the first time something prints the object that holds it
(a config, a request, a traceback's locals). Held as ``Secret`` (pydantic's
``SecretStr`` with constant-time comparison), it prints as ``Secret('**********')``
wherever it goes; the value is read only where it is sent or compared, through ``reveal()``.
"""

from __future__ import annotations

import hmac
from typing import Final
from urllib.parse import urlsplit

from pydantic import SecretStr

MASK: Final = "**********"


class Secret(SecretStr):
    """One secret value: pydantic's ``SecretStr`` (settings fields of this type validate into it and print
    masked), with a default of empty, ``reveal()``, and comparisons in constant time."""

    def __init__(self, value: str = "") -> None:
        super().__init__(value)

    def reveal(self) -> str:
        """The value itself, for the one place that sends or compares it."""
        return self.get_secret_value()

    def matches(self, presented: str | None) -> bool:
        """Whether ``presented`` is this secret (never true for an empty one), in constant time."""
        value = self.get_secret_value()
        if presented is None or not value:
            return False
        return hmac.compare_digest(presented.encode(), value.encode())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretStr):
            return NotImplemented
        return hmac.compare_digest(self.get_secret_value().encode(), other.get_secret_value().encode())

    __hash__ = SecretStr.__hash__  # equal to a SecretStr of the same value, so hashed as one

    def __repr__(self) -> str:
        return f"Secret('{MASK}')" if self.get_secret_value() else "Secret('')"

    __str__ = __repr__

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:  # pragma: no cover  # pickled as itself
        return Secret, (self.get_secret_value(),)


def secret_or_none(value: str | None) -> Secret | None:
    """``value`` as a ``Secret``; None stays None (a setting that was not given)."""
    return None if value is None else Secret(value)


def masked_url(url: str) -> str:
    """A URL fit for a log line (a database's, an origin's): its password, if any, replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"  # could hold a password anywhere: shown not at all
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()
