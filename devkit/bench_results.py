"""How ``bench/RESULTS.md`` is put together: a header, then each bench module's section(s), each
module's block opened by a marker line naming it, so a run of only some benches replaces only theirs.

```
# Benchmark results          <- the header: everything before the first marker
...
<!-- bench: bench_registry -->
## Metadata read path: ...   <- bench_registry's block, up to the next marker
...
<!-- bench: bench_routing -->
## Routing overhead: ...
```

The markers are HTML comments, so the rendered file shows only the sections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MARKER = re.compile(r"^<!-- bench: (?P<module>[A-Za-z0-9_]+) -->$")


def marker(module: str) -> str:
    """The line that opens ``module``'s block."""
    return f"<!-- bench: {module} -->"


@dataclass(frozen=True, slots=True)
class Results:
    """A parsed results file: its header and each module's block, in file order."""

    header: str
    blocks: tuple[tuple[str, str], ...]  # (module, its section text without the marker line)

    @classmethod
    def parse(cls, text: str) -> Results:
        """Splits ``text`` at the marker lines; a file without markers is all header."""
        header: list[str] = []
        blocks: list[tuple[str, list[str]]] = []
        for line in text.splitlines():
            found = _MARKER.match(line.strip())
            if found:
                blocks.append((found["module"], []))
            elif blocks:
                blocks[-1][1].append(line)
            else:
                header.append(line)
        return cls(_joined(header), tuple((module, _joined(lines)) for module, lines in blocks))

    def render(self) -> str:
        """The file's text: the header, then every block under its marker, one blank line apart."""
        parts = [self.header.strip("\n")] if self.header.strip() else []
        parts += [marker(module) + "\n" + body.strip("\n") for module, body in self.blocks]
        return "\n\n".join(parts) + "\n"

    def replaced(self, fresh: dict[str, str]) -> Results:
        """These results with the blocks of the modules in ``fresh`` replaced by their new text.

        Every other block is kept as it is, where it is. A module new to the file is inserted before
        the first block whose module sorts after it (the order a full run writes), else at the end.
        """
        blocks = [(module, fresh.get(module, body)) for module, body in self.blocks]
        present = {module for module, _ in blocks}
        for module in sorted(fresh.keys() - present):
            at = next((i for i, (other, _) in enumerate(blocks) if other > module), len(blocks))
            blocks.insert(at, (module, fresh[module]))
        return Results(self.header, tuple(blocks))


def dated(section: str, note: str) -> str:
    """``section`` with ``note`` as a paragraph under its first heading (for a partial run, so a
    reader knows this block is newer than the header's date)."""
    lines = section.splitlines()
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("## ")), 0)
    return "\n".join([*lines[:at], "", note, *lines[at:]])


def _joined(lines: list[str]) -> str:
    """The lines as one text, without blank lines at either end."""
    return "\n".join(lines).strip("\n")
