"""Which byte ranges of a ``.partial`` file hold downloaded bytes: the piece map and its sidecar.

A download splits a file into pieces of ``piece_bytes`` and fetches several at once, each written in
place. The sidecar ``<file>.partial.pieces`` (a small JSON file, replaced atomically) records, per
piece, how many of its bytes from the piece's start are written, and which source wrote them; a
killed download resumes each piece where the sidecar says it stopped. A ``.partial`` without a
sidecar is the older plain prefix: its length is the filled prefix, and it resumes from there.

The sidecar never claims a byte that is not on disk, whatever stops the node (SIGKILL, a crash, a
power cut): a checkpoint copies the map, syncs the file's data, and only then saves the copy. It is
taken often (``Checkpoints``), so a kill loses at most about 1 % of the file or half a second of
transfer, whichever is less; the syncs run in an I/O thread, batched, never one per write.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SIDECAR_SUFFIX = ".pieces"
CHECKPOINT_EVERY_S = 0.5  # the sidecar is at most this far behind the bytes written...
CHECKPOINT_SHARE = 0.01  # ...or this share of the file's bytes, whichever comes first


def sidecar_path(partial: Path) -> Path:
    return partial.with_name(partial.name + SIDECAR_SUFFIX)


@dataclass(slots=True)
class PieceMap:
    """Per piece: bytes filled from its start, and the sources that wrote them."""

    size: int
    piece_bytes: int
    filled: list[int] = field(default_factory=list)
    writers: list[list[str]] = field(default_factory=list)

    @classmethod
    def empty(cls, size: int, piece_bytes: int) -> PieceMap:
        count = max(1, -(-size // piece_bytes)) if size else 0
        return cls(size, piece_bytes, [0] * count, [[] for _ in range(count)])

    @classmethod
    def from_prefix(cls, size: int, piece_bytes: int, prefix: int) -> PieceMap:
        """The map of a plain-prefix ``.partial`` holding its first ``prefix`` bytes."""
        pieces = cls.empty(size, piece_bytes)
        for index in range(len(pieces.filled)):
            start, end = pieces.bounds(index)
            pieces.filled[index] = max(0, min(prefix, end) - start)
            if pieces.filled[index]:
                pieces.writers[index] = ["unknown"]  # an older node's bytes: no record of their source
        return pieces

    def bounds(self, index: int) -> tuple[int, int]:
        start = index * self.piece_bytes
        return start, min(self.size, start + self.piece_bytes)

    def complete(self, index: int) -> bool:
        start, end = self.bounds(index)
        return self.filled[index] >= end - start

    def done_bytes(self) -> int:
        return sum(self.filled)

    def prefix(self) -> int:
        """Bytes from the file's start that are all filled: what can be hashed (or served) in order."""
        held = 0
        for index in range(len(self.filled)):
            start, end = self.bounds(index)
            held = start + self.filled[index]
            if self.filled[index] < end - start:
                return held
        return self.size

    def ranges(self) -> list[tuple[int, int]]:
        """The filled byte ranges ``[start, end)``, in order, adjacent ones merged."""
        out: list[tuple[int, int]] = []
        for index, filled in enumerate(self.filled):
            if not filled:
                continue
            start = self.bounds(index)[0]
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], start + filled)
            else:
                out.append((start, start + filled))
        return out

    def reset(self, index: int) -> None:
        self.filled[index] = 0
        self.writers[index] = []

    def copy(self) -> PieceMap:
        return PieceMap(self.size, self.piece_bytes, list(self.filled), [list(w) for w in self.writers])

    def to_json(self) -> str:
        return json.dumps(
            {
                "size": self.size,
                "piece_bytes": self.piece_bytes,
                "filled": self.filled,
                "writers": self.writers,
            }
        )

    def save(self, partial: Path) -> None:
        """Replaces the sidecar atomically and durably: after a kill or a power cut, the old map or the
        new one, never half of one. Callers sync the bytes it claims first (``write_checkpoint``)."""
        target = sidecar_path(partial)
        tmp = target.with_name(target.name + ".tmp")
        with tmp.open("w") as fh:
            fh.write(self.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        # The folder is not synced: a rename lost to a power cut leaves the older map, which claims less.
        os.replace(tmp, target)


class Checkpoints:
    """When a download's piece map is saved: once ``every_s`` has passed or ``share`` of the file has
    arrived since the last save, whichever comes first, and only when something changed.

    A kill loses what arrived since the last checkpoint; the byte rule bounds that at any speed, the
    time rule keeps a slow download's sidecar fresh, and both bound the syncs to a few per second or
    about ``1 / share`` per file. ``clock`` is injectable, so the rule is tested without waiting.
    """

    def __init__(
        self,
        size: int,
        *,
        every_s: float = CHECKPOINT_EVERY_S,
        share: float = CHECKPOINT_SHARE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._every_s = every_s
        self._every_bytes = max(1, int(size * share))
        self._clock = clock
        self._saved_at = clock()
        self._saved: list[int] | None = None  # the filled counts last saved; None: nothing saved yet

    def next_in(self, pieces: PieceMap) -> float | None:
        """Seconds until a checkpoint of ``pieces`` is due: 0 now, None while nothing changed."""
        if self._saved is None:
            return 0.0
        if pieces.filled == self._saved:
            return None
        if pieces.done_bytes() - sum(self._saved) >= self._every_bytes:
            return 0.0
        return max(0.0, self._saved_at + self._every_s - self._clock())

    def due(self, pieces: PieceMap) -> bool:
        return self.next_in(pieces) == 0.0

    def take(self, pieces: PieceMap) -> PieceMap:
        """The map to save now, copied on the thread that fills it: it claims only bytes already
        written, and the sync that follows makes them durable before the map says so."""
        self._saved_at = self._clock()
        self._saved = list(pieces.filled)
        return pieces.copy()


def write_checkpoint(
    fd: int, partial: Path, pieces: PieceMap, sync: Callable[[int], None] = os.fdatasync
) -> None:
    """Blocking (run it in an I/O thread): makes the bytes ``pieces`` claims durable, then the sidecar
    that claims them. In the other order a crash could leave a map claiming bytes the disk never got."""
    sync(fd)
    pieces.save(partial)


def load_pieces(partial: Path, size: int, piece_bytes: int) -> PieceMap:
    """The map of what ``partial`` holds; empty when it is missing or does not fit ``size``.

    A sidecar made with another piece size is read with its own, so a changed
    ``XLLM_DOWNLOAD_PIECE_MB`` never throws away bytes already fetched.
    """
    try:
        have = partial.stat().st_size
    except OSError:
        return PieceMap.empty(size, piece_bytes)
    try:
        raw = json.loads(sidecar_path(partial).read_text())
    except (OSError, ValueError):
        raw = None
    if isinstance(raw, dict) and raw.get("size") == size and int(raw.get("piece_bytes", 0)) > 0:
        pieces = PieceMap.empty(size, int(raw["piece_bytes"]))
        filled = raw.get("filled", [])
        writers = raw.get("writers", [])
        if len(filled) == len(pieces.filled) and have == size:
            for index, value in enumerate(filled):
                start, end = pieces.bounds(index)
                pieces.filled[index] = max(0, min(int(value), end - start))
                if index < len(writers) and isinstance(writers[index], list):
                    pieces.writers[index] = [str(w) for w in writers[index]]
            return pieces
        return PieceMap.empty(size, piece_bytes)
    if have > size:
        return PieceMap.empty(size, piece_bytes)
    return PieceMap.from_prefix(size, piece_bytes, have)  # a plain prefix, as older nodes wrote


def held_bytes(partial: Path) -> int:
    """Bytes a ``.partial`` holds: the sidecar's filled count, else the plain prefix's length."""
    try:
        raw = json.loads(sidecar_path(partial).read_text())
        return sum(int(v) for v in raw["filled"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return partial.stat().st_size
    except OSError:
        return 0


def discard(partial: Path) -> None:
    """Removes a ``.partial`` and its sidecar."""
    for path in (partial, sidecar_path(partial)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def discard_sidecar(partial: Path) -> None:
    """Removes the sidecar once its ``.partial`` has been verified and renamed into place."""
    with contextlib.suppress(FileNotFoundError):
        sidecar_path(partial).unlink()
