"""Runs every benchmark in bench/ and rewrites bench/RESULTS.md (``make bench``)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _versions() -> str:
    names = ("llmlb", "grpcio", "protobuf", "sqlalchemy", "huggingface_hub")
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join(found)


def main() -> int:
    from common.logs import configure_logging

    configure_logging("console", "warning")
    only = set(sys.argv[1:])
    sections = []
    for path in sorted(HERE.glob("bench_*.py")):
        if only and path.stem not in only:
            continue
        module = importlib.import_module(f"bench.{path.stem}")
        print(f"running {path.stem} ...", flush=True)
        sections.append(asyncio.run(module.run()))
    header = [
        "# Benchmark results",
        "",
        "Written by `make bench`; every ratio is measured side by side in one run on one machine.",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU(s), {platform.system()} {platform.release()}",
        f"- python: {platform.python_version()}; {_versions()}",
        "",
    ]
    text = "\n".join(header + sections) + "\n"
    (HERE / "RESULTS.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
