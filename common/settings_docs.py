"""The settings tables of docs/configuration.md, generated from the schemas in ``common.config``.

``python -m common.settings_docs`` rewrites each table between its marker comments
(``<!-- settings:NAME -->`` and ``<!-- /settings:NAME -->``); ``--check`` exits 1 when the page differs
from what the schemas say, which a unit test runs too.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pydantic_settings import BaseSettings

from common.config import BalancerSchema, ClientSchema, NodeSchema
from common.settings import Row, rows

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
TABLES: dict[str, type[BaseSettings]] = {
    "balancer": BalancerSchema,
    "node": NodeSchema,
    "client": ClientSchema,
}
MARKED = re.compile(r"(<!-- settings:(\w+) -->\n).*?(<!-- /settings:\2 -->)", re.DOTALL)


def code(text: str) -> str:
    """A literal in backticks; a sentence (it has spaces) as it is."""
    return text if " " in text or text in ("unset", "none") else f"`{text}`"


def flag_cell(schema: type[BaseSettings], row: Row) -> str:
    if not row.flag:
        return ""
    if schema.model_fields[row.name].annotation is bool:
        return f"`{row.flag}` / `--no-{row.flag.removeprefix('--')}`"
    if row.flag == "--label":
        return "`--label k=v` (repeatable, replaces the variable)"
    return f"`{row.flag}`"


def table(schema: type[BaseSettings]) -> str:
    """The markdown table of ``schema``: variable (older names after), flag, default, meaning."""
    lines = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for row in rows(schema):
        names = f"`{row.env[0]}`" + (
            f" (then {', '.join(f'`{n}`' for n in row.env[1:])})" if row.env[1:] else ""
        )
        cells = (names, flag_cell(schema, row), code(row.default), row.help)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def render(page: str) -> str:
    """``page`` with every marked table regenerated."""

    def replace(match: re.Match[str]) -> str:
        return match.group(1) + table(TABLES[match.group(2)]) + match.group(3)

    return MARKED.sub(replace, page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.settings_docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    args = parser.parse_args(argv)
    page = PAGE.read_text(encoding="utf-8")
    fresh = render(page)
    if args.check:
        if fresh != page:
            print(f"{PAGE} is out of date: run python -m common.settings_docs", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
