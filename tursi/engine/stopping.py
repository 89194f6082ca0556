"""Stop strings over streamed text: cut at the first match, hold back possible prefixes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopCheck:
    text: str  # text that can be released now
    stopped: bool  # a stop string was found; `text` ends right before it


class StopMatcher:
    """Feed decoded text piece by piece; get back what is safe to emit.

    A match may span any number of pieces: text that could be the start of a stop
    string is held back until the next pieces show it is not.
    """

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self._held = ""

    def feed(self, piece: str) -> StopCheck:
        buffer = self._held + piece
        cut = self._first_match(buffer)
        if cut is not None:
            self._held = ""
            return StopCheck(buffer[:cut], True)
        keep = self._longest_partial(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return StopCheck(buffer[: len(buffer) - keep], False)

    def flush(self) -> str:
        """Release held text at the end of generation (no stop string followed it)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> int | None:
        positions = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        return min(positions) if positions else None

    def _longest_partial(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
