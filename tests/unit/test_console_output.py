"""What both command lines draw: plain text for scripts when piped, colours and bars on a terminal."""

from __future__ import annotations

import io
import re

import pytest

from common.console_output import TransferProgress, console, print_table

ANSI = re.compile(r"\x1b\[")
ROWS = [
    ["NODE", "STATE", "MODELS"],
    ["node-with-a-long-name", "online", "gemma-3-270m:ready"],
    ["n2", "failed", "-"],
]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _no_colour_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


def test_a_piped_table_is_plain_aligned_text_never_wrapped() -> None:
    out = io.StringIO()
    wide = [*ROWS, ["n3", "offline", ",".join(f"model-{i}:ready" for i in range(40))]]
    print_table(wide, status_columns=["STATE"], out=console(out))
    lines = out.getvalue().splitlines()
    assert not ANSI.search(out.getvalue())
    assert lines[:3] == [
        "NODE                   STATE    MODELS",
        "node-with-a-long-name  online   gemma-3-270m:ready",
        "n2                     failed   -",
    ]
    assert len(lines) == 4 and lines[3].endswith("model-39:ready")  # one line, however long


def test_a_terminal_table_colours_states_and_no_color_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    print_table(ROWS, status_columns=["STATE"], out=console(out, terminal=True))
    drawn = out.getvalue()
    assert "\x1b[32monline" in drawn  # green
    assert "\x1b[1;31mfailed" in drawn  # bold red
    assert "gemma-3-270m:ready" in drawn and "\x1b[32mgemma" not in drawn  # only the state column

    monkeypatch.setenv("NO_COLOR", "1")
    plain = io.StringIO()
    print_table(ROWS, status_columns=["STATE"], out=console(plain, terminal=True))
    assert "online" in plain.getvalue() and "\x1b[32m" not in plain.getvalue()
    assert "\x1b[31m" not in plain.getvalue() and "\x1b[1;31m" not in plain.getvalue()


def test_piped_progress_prints_a_line_per_change_at_most_every_few_seconds_then_the_outcome() -> None:
    out, clock = io.StringIO(), Clock()
    total = 100_000_000
    with TransferProgress(console(out), every_s=3.0, clock=clock) as progress:
        progress.add("a", "gemma-3-270m  node-1")
        progress.update("a", done=0, total=0, status="waiting")
        for second in range(1, 11):  # 10 MB/s for 10 s, reported twice a second
            for half in (0.0, 0.5):
                clock.now = 100.0 + second + half
                progress.update(
                    "a", done=int((second + half) * 10_000_000), total=total, status="downloading"
                )
        progress.update("a", done=total, total=total, status="ready")
        progress.finish("gemma-3-270m is ready")
    text = out.getvalue()
    lines = text.splitlines()
    assert not ANSI.search(text)
    assert lines[0] == "gemma-3-270m  node-1    0%  0 B  waiting"
    assert lines[1] == "gemma-3-270m  node-1   10%  10.0 MB / 100.0 MB  downloading"  # no rate yet
    assert lines[2] == "gemma-3-270m  node-1   40%  40.0 MB / 100.0 MB  10.0 MB/s, 0:06 left  downloading"
    assert 4 <= len(lines) <= 7  # every 3 s at most, not one per report (22 of them)
    assert lines[-2] == "gemma-3-270m  node-1  100%  100.0 MB / 100.0 MB  ready"  # a new state: at once
    assert lines[-1] == "gemma-3-270m is ready"


def test_terminal_progress_draws_bars_in_place_and_ends_with_the_outcome() -> None:
    out = io.StringIO()
    with TransferProgress(console(out, terminal=True)) as progress:
        progress.add("f", "acme/x  w.gguf", total=2_000_000)
        progress.update("f", done=1_000_000, total=2_000_000, status="downloading")
        progress.update("f", done=2_000_000, total=2_000_000, status="fetched")
        progress.finish("acme/x is ready")
    drawn = out.getvalue()
    assert "━" in drawn and "100%" in drawn and "2.0/2.0 MB" in drawn
    assert "\x1b[32mfetched" in drawn
    assert drawn.rstrip().endswith("acme/x is ready")
