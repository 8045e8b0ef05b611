"""The alert lines a user's training log would show, printed under each demo run's
progress bar.

gradwatch sends alerts to the standard logger ``"gradwatch"``; with Python's default
logging set-up a WARNING reads ``WARNING:gradwatch:<message>``. While a demo run trains,
a handler collects the WARNING and ERROR lines; after the run they are printed that way,
each distinct alert once (alerts whose messages differ only in their numbers are one
line, followed by how many there were and at which steps).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["AlertEcho", "echo_alerts"]

_NUM = re.compile(r"[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?", re.IGNORECASE)
_STEP = re.compile(r"\bat step (\d+)")


class AlertEcho(logging.Handler):
    """Collects the ``gradwatch`` logger's WARNING+ records of one run."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        """``LEVEL:gradwatch:message`` per distinct alert, repeats counted after it."""
        groups: dict[str, list[logging.LogRecord]] = {}
        for rec in self.records:
            groups.setdefault(f"{rec.levelname}:{_NUM.sub('#', rec.getMessage())}", []).append(rec)
        out = []
        for recs in groups.values():
            first = recs[0]
            line = f"{first.levelname}:{first.name}:{first.getMessage()}"
            if len(recs) > 1:
                steps = [int(m.group(1)) for r in recs if (m := _STEP.search(r.getMessage()))]
                where = f", steps {min(steps)}–{max(steps)}" if steps else ""
                line += f"  [×{len(recs)} similar{where}]"
            out.append(line)
        return out

    def print(self, stream: TextIO, label: str) -> None:
        lines = self.lines()
        if not lines:
            stream.write(f"    {label}: no alert in the log\n")
        for line in lines:
            stream.write(f"    {line}\n")
        stream.flush()


@contextmanager
def echo_alerts(logger_name: str = "gradwatch") -> Iterator[AlertEcho]:
    """Attach an :class:`AlertEcho` to the logger for the duration of the block."""
    log = logging.getLogger(logger_name)
    handler = AlertEcho()
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
