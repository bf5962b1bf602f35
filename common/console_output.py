"""How both command lines draw for people, on rich: tables, status colours and transfer progress.

On a terminal: coloured states, tables with a ruled header, progress bars redrawn in place. Piped (or
on a dumb terminal): plain text that scripts can read, the same columns without colour, and a progress
line per change at most every few seconds. ``NO_COLOR`` turns colours off, on a terminal too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TextIO

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

# Plain progress: a transfer's line is printed again after this long at the soonest, unless its state
# changed (a state change is printed at once).
PLAIN_EVERY_S = 3.0
# Wide enough that no table or line is ever wrapped or cut for a script.
_PLAIN_WIDTH = 1_000_000

# The first word of a state, as the CLIs print states, -> its colour.
STATUS_STYLES: dict[str, str] = {
    "ready": "green",
    "online": "green",
    "present": "green",
    "fetched": "green",
    "yes": "green",
    "downloading": "cyan",
    "loading": "cyan",
    "waiting": "yellow",
    "pending": "yellow",
    "draining": "yellow",
    "failed": "bold red",
    "error": "bold red",
    "offline": "red",
    "no": "red",
}


def console(file: TextIO | None = None, *, terminal: bool | None = None) -> Console:
    """A console on ``file`` (default: stdout at the time of each print), coloured only on a terminal.

    ``terminal`` overrides the look at ``file`` (True: draw as on a terminal, as tests do).
    """
    out = Console(file=file, force_terminal=terminal, highlight=False, emoji=False)
    if not out.is_terminal:
        out.width = _PLAIN_WIDTH
    return out


def is_live(out: Console) -> bool:
    """Whether ``out`` may redraw in place: a terminal that understands cursor movement."""
    return out.is_terminal and not out.is_dumb_terminal


def status_style(state: str) -> str:
    """The colour of a state in words (``failed: no space`` -> red); "" when it has none."""
    word = state.split(":", 1)[0].split(None, 1)[0].lower() if state.strip() else ""
    return STATUS_STYLES.get(word, "")


def status_text(state: str) -> Text:
    return Text(state, style=status_style(state))


def print_table(
    rows: Sequence[Sequence[str]],
    *,
    status_columns: Iterable[str] = (),
    right: Iterable[str] = (),
    out: Console | None = None,
) -> None:
    """Prints rows as a table, the first row being the header.

    Cells in the ``status_columns`` (named by header) are coloured by their state, those in ``right``
    aligned right. Piped, each line is the cells padded to their column's width, two spaces apart.
    """
    out = out or console()
    header, body = rows[0], rows[1:]
    coloured, right_aligned = set(status_columns), set(right)
    live = is_live(out)
    table = Table(
        box=box.SIMPLE_HEAD if live else None,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if live else "",
        highlight=False,
    )
    for name in header:
        table.add_column(name, no_wrap=not live, justify="right" if name in right_aligned else "left")
    for row in body:
        table.add_row(
            *(
                status_text(cell) if name in coloured else Text(cell)
                for name, cell in zip(header, row, strict=True)
            )
        )
    if live:
        out.print(table)
        return
    with out.capture() as captured:
        out.print(table)
    for line in captured.get().splitlines():
        out.print(line.rstrip(), markup=False, highlight=False, soft_wrap=True)


def human_bytes(n: int) -> str:
    """Bytes the way people read sizes: ``253.1 MB``."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


class _StatusColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return status_text(str(task.fields.get("status", "")))


class TransferProgress:
    """Progress of several transfers (a model on a node, a file): one bar each with bytes, rate and ETA,
    redrawn in place on a terminal; piped, plain lines. ``finish`` ends with a line saying what happened.

    Use as a context manager, or call ``start`` and ``stop``. ``clock`` is injectable for tests.
    """

    def __init__(
        self, out: Console, *, every_s: float = PLAIN_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.out = out
        self.live = is_live(out)
        self._every_s = every_s
        self._clock = clock
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            _StatusColumn(),
            console=out,
            disable=not self.live,  # piped: the tasks still measure rate and ETA for the plain lines
            get_time=clock,
        )
        self._tasks: dict[Hashable, TaskID] = {}
        self._labels: dict[Hashable, str] = {}
        self._shown: dict[Hashable, tuple[str, int, float]] = {}  # status, tenth, when: last plain line

    def __enter__(self) -> TransferProgress:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._bars.start()

    def stop(self) -> None:
        self._bars.stop()

    def add(self, key: Hashable, label: str, *, total: int = 0, status: str = "waiting") -> None:
        """A transfer to follow, under ``label``; a key already added is left as it is."""
        if key in self._tasks:
            return
        self._labels[key] = label
        self._tasks[key] = self._bars.add_task(label, total=total or None, status=status)

    def update(self, key: Hashable, *, done: int, total: int, status: str) -> None:
        """The transfer's bytes so far, of ``total`` (0: not known yet), and its state in words."""
        task_id = self._tasks[key]
        self._bars.update(task_id, completed=done, total=total or None, status=status)
        if not self.live:
            self._plain_line(key, self._bars.tasks[self._index(task_id)])

    def finish(self, outcome: str) -> None:
        """Stops the bars (their last state stays on screen) and prints ``outcome`` as the last line."""
        self.stop()
        self.out.print(outcome, markup=False, highlight=False, soft_wrap=True)

    def _index(self, task_id: TaskID) -> int:
        return next(i for i, t in enumerate(self._bars.tasks) if t.id == task_id)

    def _plain_line(self, key: Hashable, task: Task) -> None:
        status = str(task.fields.get("status", ""))
        fraction = task.percentage / 100 if task.total else (1.0 if status == "ready" else 0.0)
        tenth, now = int(fraction * 10), self._clock()
        last = self._shown.get(key)
        if last is not None and (last[0] == status and (last[1] == tenth or now - last[2] < self._every_s)):
            return
        self._shown[key] = (status, tenth, now)
        width = max(len(label) for label in self._labels.values())
        size = human_bytes(int(task.completed)) + (f" / {human_bytes(int(task.total))}" if task.total else "")
        line = f"{self._labels[key]:<{width}}  {fraction:>4.0%}  {size}"
        if not task.finished and task.speed:
            line += f"  {human_bytes(int(task.speed))}/s"
            if task.time_remaining is not None:
                line += f", {_duration(task.time_remaining)} left"
        self.out.print(f"{line}  {status}", markup=False, highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
