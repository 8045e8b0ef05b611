"""Sinks: where records and events go.

A sink receives every event as it happens and one window-summarised record every
``log_every`` steps. Built-in sinks are named by a string spec in the ``sinks`` option:

========================  ==============================================================
``"logging"``             the standard logger ``"gradwatch"``: one line per event, an INFO
                          summary line per flush
``"memory"``              keeps flushed records and events in lists (bounded by ``keep``)
``"jsonl:PATH"``          the run file (see :mod:`gradwatch.jsonl`), one line per record or
                          event, each written whole and flushed
``"tensorboard:DIR"``     TensorBoard scalars (:mod:`gradwatch.tensorboard`)
========================  ==============================================================

Any object with ``write_record``, ``write_event`` and ``close`` is a sink too. A sink that
raises is disabled after one ERROR line: training never sees the exception.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import logging
import os
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from gradwatch.errors import ConfigError
from gradwatch.events import GradEvent
from gradwatch.formatting import summary_line
from gradwatch.jsonl import SCHEMA, encode_line
from gradwatch.records import StepRecord

if TYPE_CHECKING:
    from gradwatch.view import MonitorView

__all__ = ["LOGGER_NAME", "JsonlSink", "LoggingSink", "MemorySink", "Sink", "check_writable_dir", "now_iso"]

LOGGER_NAME = "gradwatch"
logger = logging.getLogger(LOGGER_NAME)


@runtime_checkable
class Sink(Protocol):
    """What a sink implements. Plugins register sink classes through
    ``gradwatch_register_sinks``; such a class also has a ``scheme`` (the part before the
    colon of its spec string) and a classmethod ``from_spec(arg, view)`` (``view``: a
    :class:`~gradwatch.view.MonitorView`). A sink may
    also have ``write_summary(dict)``, called once at close with the step count and the
    alerts rate limiting held back, so no count is lost."""

    def write_record(self, record: StepRecord) -> None: ...

    def write_event(self, event: GradEvent) -> None: ...

    def close(self) -> None: ...


class LoggingSink:
    """Events and summaries on the standard logger ``"gradwatch"``.

    Events keep their severity (WARNING for vanishing and exploding, ERROR for non-finite),
    so they show with Python's default logging set-up; the per-flush summary is INFO.
    """

    scheme: ClassVar[str] = "logging"

    def __init__(self, logger_: logging.Logger | None = None) -> None:
        self.logger = logger_ or logger

    @classmethod
    def from_spec(cls, arg: str | None, view: MonitorView) -> LoggingSink:
        return cls(logging.getLogger(arg) if arg else None)

    def write_record(self, record: StepRecord) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(summary_line(record))

    def write_event(self, event: GradEvent) -> None:
        self.logger.log(event.severity, "[gradwatch] %s", event.message)

    def write_summary(self, summary: dict[str, Any]) -> None:
        for s in summary.get("suppressed", ()):
            n, layer = s["count"], s["layer"]
            where = f" for layer {layer!r}" if layer else ""
            self.logger.info(
                "[gradwatch] %d further %r alert%s%s since step %d %s held back by rate limiting "
                "(alert_every); the records hold every step.",
                n, s["kind"], "s" if n > 1 else "", where, s["first_step"], "were" if n > 1 else "was",
            )

    def close(self) -> None:
        return None


class MemorySink:
    """Keeps flushed records and events in memory (bounded), for tests and notebooks."""

    scheme: ClassVar[str] = "memory"

    def __init__(self, keep: int = 1000) -> None:
        self.records: deque[StepRecord] = deque(maxlen=keep)
        self.events: deque[GradEvent] = deque(maxlen=keep)
        self.summary: dict[str, Any] | None = None
        self.closed = False

    @classmethod
    def from_spec(cls, arg: str | None, view: MonitorView) -> MemorySink:
        return cls(view.options.keep)

    def write_record(self, record: StepRecord) -> None:
        self.records.append(record)

    def write_event(self, event: GradEvent) -> None:
        self.events.append(event)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.summary = summary

    def close(self) -> None:
        self.closed = True


_open_files: weakref.WeakSet[JsonlSink] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:  # pragma: no cover - runs at interpreter exit
    for sink in list(_open_files):
        sink.close()


def check_writable_dir(option_value: str, d: Path) -> None:
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ConfigError(
            f"gradwatch sink {option_value!r}: cannot write under {str(d)!r} ({str(probe)!r} is not a writable "
            f"directory).",
            option="sinks",
            value=option_value,
        )


class JsonlSink:
    """The run file: a header line, then one strict-JSON line per record or event.

    The file is opened at the first write, not at construction, so that in distributed
    runs the ranks that write nothing create nothing. Each line is written whole and
    flushed, so a crash leaves at most one torn last line, which ``read_jsonl`` tolerates.
    """

    scheme: ClassVar[str] = "jsonl"

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(
                f"gradwatch sink 'jsonl:{path}': {str(path)!r} is a directory; give a file path such as "
                f"'jsonl:{Path(path) / 'run.jsonl'}'.",
                option="sinks",
                value=f"jsonl:{path}",
            )
        check_writable_dir(f"jsonl:{path}", self.path.parent)
        self._header = header or {}
        self._view: MonitorView | None = None
        self._f: Any = None
        self._closed = False

    @classmethod
    def from_spec(cls, arg: str | None, view: MonitorView) -> JsonlSink:
        if not arg:
            raise ConfigError("gradwatch sink 'jsonl:' needs a path, e.g. 'jsonl:runs/run.jsonl'.", option="sinks", value="jsonl:")
        sink = cls(arg)
        sink._view = view
        return sink

    def _file(self) -> Any:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", encoding="utf-8")
            _open_files.add(self)
            header = {"type": "header", "schema": SCHEMA}
            header.update(self._view.header() if self._view is not None else {})
            header.update(self._header)
            self._write(header)
        return self._f

    def _write(self, obj: dict[str, Any]) -> None:
        f = self._f
        f.write(encode_line(obj) + "\n")
        f.flush()

    def write_record(self, record: StepRecord) -> None:
        if self._closed:
            return
        self._file()
        self._write({"type": "record", **record.to_dict()})

    def write_event(self, event: GradEvent) -> None:
        if self._closed:
            return
        self._file()
        self._write({"type": "event", **event.to_dict()})

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The closing line: written at close only if the file was opened (a rank that
        wrote nothing still creates nothing)."""
        if self._closed or self._f is None:
            return
        self._write({"type": "summary", **summary})

    def close(self) -> None:
        self._closed = True
        if self._f is not None and not self._f.closed:
            self._f.close()
        _open_files.discard(self)


def _builtin_sinks() -> tuple[type, ...]:
    from gradwatch.tensorboard import TensorBoardSink

    return (LoggingSink, MemorySink, JsonlSink, TensorBoardSink)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
