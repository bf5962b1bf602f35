"""Keys, tokens and passwords held in memory: a type whose ``repr`` and ``str`` never show the value.

A secret in a plain ``str`` reaches the log the first time something prints the object that holds it
(a config, a request, a traceback's locals). Held as ``Secret``, it prints as ``Secret('**********')``
wherever it goes; the value is read only where it is sent or compared, through ``reveal()``.
"""

from __future__ import annotations

import hmac
from typing import Final
from urllib.parse import urlsplit

MASK: Final = "**********"


class Secret:
    """One secret value; falsy when empty, equal to another ``Secret`` of the same value."""

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value

    def reveal(self) -> str:
        """The value itself, for the one place that sends or compares it."""
        return self._value

    def matches(self, presented: str | None) -> bool:
        """Whether ``presented`` is this secret (never true for an empty one), in constant time."""
        if presented is None or not self._value:
            return False
        return hmac.compare_digest(presented.encode(), self._value.encode())

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __repr__(self) -> str:
        return f"Secret('{MASK}')" if self._value else "Secret('')"

    __str__ = __repr__

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:  # pragma: no cover  # pickled as itself
        return Secret, (self._value,)


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
