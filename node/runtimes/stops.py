"""Stop sequences in streamed text: what may be sent now, and where the answer ends."""

from __future__ import annotations


class StopMatcher:
    """Cuts streamed text at the first stop sequence, holding back text that may start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text safe to emit now, and whether a stop sequence was reached."""
        if not self.stops:
            return text, False
        buffer = self.held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return buffer[:cut], True
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:size]):
                    keep = max(keep, size)
                    break
        self.held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self, text: str = "") -> str:
        out, _ = self.feed(text)
        out, self.held = out + self.held, ""
        return out
