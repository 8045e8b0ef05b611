"""Sinks: where records and events go.

A sink receives every event as it happens and one window-summarised record every
``log_every`` steps. Built-in sinks are named by a string spec in the ``sinks`` option:

========================  ==============================================================
``"logging"``             the standard logger ``"gradwatch"``: one line per event, an INFO
                          summary line per flush
``"memory"``              keeps flushed records and events in lists (bounded by ``keep``)
``"jsonl:PATH"``          the run file (see :mod:`gradwatch.jsonl`), one line per record,
                          event or window of per-step norms, each written whole
``"tensorboard:DIR"``     TensorBoard scalars (:mod:`gradwatch.tensorboard`)
========================  ==============================================================

Any object with ``write_record``, ``write_event`` and ``close`` is a sink too. A sink that
raises is disabled after one ERROR line: training never sees the exception.
"""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import os
import stat
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from gradwatch._columns import StepColumns
from gradwatch._runlock import Claims, lock, locked_elsewhere, repair_tail, unlock
from gradwatch.errors import ConfigError, GradwatchError
from gradwatch.events import GradEvent
from gradwatch.formatting import summary_line
from gradwatch.jsonl import SCHEMA, appendable_problem, encode_line
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
    :class:`~gradwatch.view.MonitorView`). Optional methods, called when present:

    * ``write_summary(dict)``: once at close, with the step count and the alerts rate
      limiting held back, so no count is lost;
    * ``write_step(record)``: every step (records are otherwise flushed once a window),
      for a sink that keeps per-step values; it must be cheap;
    * ``resume(step)``: the monitor was resumed from a ``state_dict`` saved at ``step``
      (a sink that writes a file continues it rather than starting over); may raise
      ``ConfigError`` to refuse."""

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
            # The logger's name already says "gradwatch" (WARNING:gradwatch:... with the
            # default format): no second "[gradwatch]" inside the message.
            self.logger.info(summary_line(record))

    def write_event(self, event: GradEvent) -> None:
        self.logger.log(event.severity, "%s", event.message)

    def write_summary(self, summary: dict[str, Any]) -> None:
        for s in summary.get("suppressed", ()):
            n, layer = s["count"], s["layer"]
            where = f" for layer {layer!r}" if layer else ""
            self.logger.info(
                "%d further %r alert%s%s since step %d %s held back by rate limiting "
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


_claims = Claims()


class JsonlSink:
    """The run file: a header line, then one strict-JSON line per record, event or
    per-step column line (:mod:`gradwatch.jsonl`).

    * Every line is written whole, with one ``write`` to a file opened for appending, so
      a crash leaves at most one torn last line, which ``read_jsonl`` tolerates.
    * The file is opened at the first write, not at construction, so that in distributed
      runs the ranks that write nothing create nothing. A fresh run empties the file
      then; a run resumed with ``load_state_dict`` (:meth:`resume`) continues it after a
      header line that says ``"resumed_at": step``.
    * One writer per path: a second live sink on the same file is refused at ``watch()``
      with a ``ConfigError``, in this process or another one (:mod:`gradwatch._runlock`).
    * Beside each window's record, a ``"norms"`` line holds every step's global norm
      (:mod:`gradwatch._columns`): the report plots every step.
    * A forked child (a DataLoader worker) that inherited the sink writes nothing.
    """

    scheme: ClassVar[str] = "jsonl"

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any] | None = None, *, probe_lock: bool = True) -> None:
        self.path = Path(path)
        spec = f"jsonl:{path}"
        if self.path.is_dir():
            raise ConfigError(
                f"gradwatch sink {spec!r}: {str(path)!r} is a directory; give a file path such as "
                f"'jsonl:{Path(path) / 'run.jsonl'}'.",
                option="sinks",
                value=spec,
            )
        check_writable_dir(spec, self.path.parent)
        self._header = header or {}
        self._view: MonitorView | None = None
        self._fd: int | None = None
        self._pid = os.getpid()
        self._finalizer: weakref.finalize | None = None
        self._closed = False
        self._resume_at: int | None = None
        self._columns = StepColumns()
        self._key = os.path.realpath(self.path)
        self._claimed = not self.path.exists() or self.path.is_file()  # /dev/stdout and the like: no claim, no lock
        if self._claimed:
            self._refuse_second_writer(spec, probe_lock)
            _claims.claim(self._key, self)

    def _refuse_second_writer(self, spec: str, probe_lock: bool) -> None:
        holder = _claims.holder(self._key)
        if holder is not None:
            gc.collect()  # a watch the user dropped (a re-run notebook cell) lets go of the path now
            holder = _claims.holder(self._key)
        fix = (
            f"Close it first (watch.close(), or `with gradwatch.watch(...) as watch:`), or give this run its own "
            f"path, e.g. 'jsonl:{self.path.with_name(self.path.stem + '-2' + self.path.suffix)}'."
        )
        if holder is not None:
            raise ConfigError(
                f"gradwatch sink {spec!r}: another open watch in this process is writing {self._key!r}; two writers "
                f"would interleave their lines and lose both runs. {fix}",
                option="sinks",
                value=spec,
            )
        if probe_lock and locked_elsewhere(self._key):
            raise ConfigError(
                f"gradwatch sink {spec!r}: another process is writing {self._key!r} (it holds the file's lock); two "
                f"writers would interleave their lines and lose both runs. Stop that process first (to continue its "
                f"run here, resume from its checkpoint once it has stopped), or give this run its own path, e.g. "
                f"'jsonl:{self.path.with_name(self.path.stem + '-2' + self.path.suffix)}'.",
                option="sinks",
                value=spec,
            )

    @classmethod
    def from_spec(cls, arg: str | None, view: MonitorView) -> JsonlSink:
        if not arg:
            raise ConfigError("gradwatch sink 'jsonl:' needs a path, e.g. 'jsonl:runs/run.jsonl'.", option="sinks", value="jsonl:")
        # A rank that will write nothing (torchrun sets RANK) does not look at the lock.
        rank = os.environ.get("RANK", "0") or "0"
        sink = cls(arg, probe_lock=rank == "0" or bool(view.options.all_ranks))
        sink._view = view
        return sink

    @property
    def closed(self) -> bool:
        return self._closed

    def __reduce_ex__(self, protocol: object) -> Any:
        # A copy would hold the same open file and write the same window twice.
        raise TypeError(
            f"gradwatch's run-file sink for {str(self.path)!r} holds an open file and cannot be copied or pickled; "
            f"copy or save the model, not the watch."
        )

    # ----------------------------------------------------------------- the file
    def _header_line(self) -> dict[str, Any]:
        header: dict[str, Any] = {"type": "header", "schema": SCHEMA}
        header.update(self._view.header() if self._view is not None else {})
        header.update(self._header)
        return header

    def _file(self) -> int:
        if self._fd is not None:
            return self._fd
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Read-write: a resumed run reads the tail to cut a torn last line off.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            if regular and not lock(fd):
                all_ranks = self._view is not None and self._view.options.all_ranks
                raise GradwatchError(
                    f"{str(self.path)!r} is being written by another process (it holds the file's lock); this run "
                    f"writes nothing to it. Give each run its own path"
                    + (" (with all_ranks=True, one per rank, e.g. f'jsonl:run-rank{rank}.jsonl')." if all_ranks else ".")
                )
            header = self._header_line()
            if self._resume_at is not None and regular and os.fstat(fd).st_size > 0:
                repair_tail(fd)
                header["resumed_at"] = self._resume_at
            else:
                if regular:
                    os.ftruncate(fd, 0)  # a fresh run; emptied only now that the lock is ours
                if self._resume_at:
                    header["resumed_at"] = self._resume_at
            _write_all(fd, header)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # Closes the descriptor if the sink is dropped without close(); not at exit, where
        # gradwatch._exit closes the monitors (and so this sink) properly.
        self._finalizer = weakref.finalize(self, os.close, fd)
        self._finalizer.atexit = False
        return fd

    def _write(self, obj: dict[str, Any]) -> None:
        """One line, opening the file first if need be; nothing in a forked child (a
        DataLoader worker) that inherited this sink: the parent writes this file."""
        if os.getpid() != self._pid:
            return
        _write_all(self._file(), obj)

    def _write_columns(self) -> None:
        if len(self._columns):
            cols, self._columns = self._columns, StepColumns()
            self._write(cols.line())

    # ----------------------------------------------------------------- the sink
    def write_step(self, record: StepRecord) -> None:
        """Every step (not only flushed windows): kept for the next ``"norms"`` line."""
        if self._closed:
            return
        if not self._columns.follows(record.step):
            self._write_columns()
        self._columns.add(record)

    def write_record(self, record: StepRecord) -> None:
        if self._closed:
            return
        self._write_columns()
        self._write({"type": "record", **record.to_dict()})

    def write_event(self, event: GradEvent) -> None:
        if self._closed:
            return
        self._write({"type": "event", **event.to_dict()})

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The closing line: written at close only if the file was opened (a rank that
        wrote nothing still creates nothing)."""
        if self._closed or self._fd is None:
            return
        self._write_columns()
        self._write({"type": "summary", **summary})

    def resume(self, step: int) -> None:
        """The monitor was resumed at ``step`` (``load_state_dict``): continue the file.

        Called before training goes on, so a path that holds something other than a
        gradwatch run file is refused here (``ConfigError``) rather than appended to.
        """
        if self._closed:
            return
        if self._fd is not None:  # already writing: mark the resumption in place
            self._write_columns()
            self._write({**self._header_line(), "resumed_at": int(step)})
            return
        problem = appendable_problem(self.path)
        if problem is not None:
            raise ConfigError(
                f"gradwatch sink 'jsonl:{self.path}': cannot continue {str(self.path)!r}: {problem}. Give the resumed "
                f"run the path of its run file, or a new path.",
                option="sinks",
                value=f"jsonl:{self.path}",
            )
        self._resume_at = int(step)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._fd is not None and self._pid == os.getpid():
                cols, self._columns = self._columns, StepColumns()
                if len(cols):
                    self._write(cols.line())
                unlock(self._fd)
        finally:
            if self._finalizer is not None:
                self._finalizer()  # closes the descriptor (in a forked child: only its copy)
            self._fd = None
            if self._claimed:
                _claims.release(self._key, self)


def _write_all(fd: int, obj: dict[str, Any]) -> None:
    """One line, whole: a single write() in all but the rarest cases (a partial write is
    continued), to a file opened with O_APPEND."""
    data = memoryview((encode_line(obj) + "\n").encode("utf-8"))
    while data:
        data = data[os.write(fd, data) :]


def _builtin_sinks() -> tuple[type, ...]:
    from gradwatch.tensorboard import TensorBoardSink

    return (LoggingSink, MemorySink, JsonlSink, TensorBoardSink)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
