"""Runs the benchmarks in bench/ and records them in bench/RESULTS.md (``make bench``).

``python -m bench`` runs every ``bench_*.py`` and rewrites the file; ``python -m bench bench_a bench_b``
runs only those and replaces only their sections, keeping the header and every other section as it is
(see ``devkit.bench_results``).
"""

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

from devkit.bench_results import Results, dated

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
    modules = sorted(path.stem for path in HERE.glob("bench_*.py"))
    unknown = only - set(modules)
    if unknown:
        print(
            f"no such bench: {', '.join(sorted(unknown))} (there are: {', '.join(modules)})", file=sys.stderr
        )
        return 2
    now = datetime.now(UTC)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU(s), {platform.system()} {platform.release()}"
    fresh: dict[str, str] = {}
    for name in modules:
        if only and name not in only:
            continue
        module = importlib.import_module(f"bench.{name}")
        print(f"running {name} ...", flush=True)
        fresh[name] = asyncio.run(module.run())
    path = HERE / "RESULTS.md"
    if only and path.exists():
        # The header's date stays the full run's; each replaced section says when it was run.
        note = (
            f"Run on {now:%Y-%m-%d %H:%M} UTC ({machine}); sections without such a line are from the "
            "date above."
        )
        results = Results.parse(path.read_text()).replaced({m: dated(t, note) for m, t in fresh.items()})
    else:
        header = [
            "# Benchmark results",
            "",
            "Written by `make bench`; every ratio is measured side by side in one run on one machine.",
            "",
            f"- date: {now:%Y-%m-%d %H:%M} UTC",
            f"- machine: {machine}",
            f"- python: {platform.python_version()}; {_versions()}",
        ]
        results = Results("\n".join(header), tuple(fresh.items()))
    text = results.render()
    path.write_text(text)
    print("\n\n".join(fresh.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
