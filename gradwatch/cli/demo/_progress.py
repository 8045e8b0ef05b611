"""A plain-text progress bar on stderr (no dependency).

On a terminal it redraws one line with ``\\r``; into a file or pipe it prints a line at
each quarter, so logs of ``make demo`` stay short and readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None, width: int = 24) -> None:
        self.label = label
        self.total = max(1, int(total))
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._next_quarter = 1
        self._last_draw = 0.0
        self._drawn = 0  # length of the line on screen, so a shorter one can blank it out

    def update(self, done: int, info: str = "") -> None:
        now = time.perf_counter()
        if self._tty:
            if done < self.total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            self._redraw(self._line(done, info, now))
        elif done * 4 >= self._next_quarter * self.total:
            while done * 4 >= self._next_quarter * self.total:
                self._next_quarter += 1
            self.stream.write(self._line(done, info, now) + "\n")
            self.stream.flush()

    def close(self, info: str = "") -> None:
        if self._tty:
            self._redraw(self._line(self.total, info, time.perf_counter()))
            self.stream.write("\n")
            self.stream.flush()
        elif self._next_quarter <= 4:
            self.update(self.total, info)

    def _redraw(self, line: str) -> None:
        self.stream.write("\r" + line.ljust(self._drawn))
        self.stream.flush()
        self._drawn = len(line)

    def _line(self, done: int, info: str, now: float) -> str:
        filled = int(self.width * min(done, self.total) / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        return f"  {self.label:<16} [{bar}] {done:>5}/{self.total:<5} {now - self.start:5.1f}s  {info}".rstrip()
