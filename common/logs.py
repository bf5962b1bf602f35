"""structlog setup shared by both processes: JSON for machines, console for people.

No log line carries a secret, in either format: tracebacks are plain (source lines, never the values
of local variables, which hold keys and tokens), secrets are held as ``common.secret.Secret`` (masked
when printed), and one last processor masks what slips through in text anyway: a bearer credential,
the password of a URL, and any field named like a credential.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

from common.secret import MASK

# Fields that only ever hold a credential, whatever their value looks like.
_CREDENTIAL_FIELDS = frozenset({"authorization", "password", "api_key", "secret", "hf_token"})
_BEARER = re.compile(r"(?i)\b(bearer\s+)(?!<)[^\s'\",;}\]]+")
# The lowest level each chatty library logs at, even under debug.
_THIRD_PARTY_FLOORS = {
    "httpx": logging.DEBUG,
    "httpcore": logging.DEBUG,
    "huggingface_hub": logging.DEBUG,
    "alembic": logging.DEBUG,
    "sqlalchemy": logging.INFO,  # statements (the engine hides their parameters), never rows
    "aiosqlite": logging.WARNING,  # its debug lines are each statement with its parameters
}
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^/:@\s'\"]*:)[^@\s'\"]+@")


def mask_text(text: str) -> str:
    """``text`` with bearer credentials and URL passwords masked."""
    if "earer" not in text and "://" not in text:  # the common case: nothing to look at
        return text
    return _URL_PASSWORD.sub(r"\1***@", _BEARER.sub(rf"\g<1>{MASK}", text))


def mask_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The last processor before rendering: masks credential fields and credentials inside text."""
    for key, value in event.items():
        if key.lower() in _CREDENTIAL_FIELDS and value:
            event[key] = MASK
        elif isinstance(value, str):
            event[key] = mask_text(value)
    return event


def human_bytes(n: float) -> str:
    """``876 MB``, ``87.6 MB``, ``1.2 GB``: decimal units, three significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.3g} TB"  # unreachable: the loop returns at TB


def readable_progress(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Console only: a download's progress also reads as ``Download progress: 10% (87.6 MB / 876 MB)``."""
    if event.get("event") == "download.progress" and "bytes" in event and event.get("total_bytes"):
        done, total = event["bytes"], event["total_bytes"]
        shown = f"Download progress: {event.get('percent', 0)}% ({human_bytes(done)} / {human_bytes(total)})"
        event["event"] = f"download.progress {shown}"
    return event


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time: a logger made (and cached) while stderr was
    redirected keeps working once the redirection ends and its file is closed."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """Routes structlog and the standard library's logging to stderr in one format."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Both formats turn an exception into plain text here, so the masking below sees it: no rich or
    # better-exceptions rendering, which prints every frame's local variables (keys and tokens among them).
    final: list[structlog.types.Processor] = [structlog.processors.format_exc_info, mask_secrets]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    if fmt != "json":
        final.append(readable_progress)
    structlog.configure(
        processors=[*shared, *final, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Third-party chatter stays at warning unless asked for debug, down to each one's floor: below it,
    # database drivers log query parameters and rows (key hashes, the fleet token's secret).
    for noisy, floor in _THIRD_PARTY_FLOORS.items():
        logging.getLogger(noisy).setLevel(max(floor, logging.WARNING if numeric > logging.DEBUG else numeric))
