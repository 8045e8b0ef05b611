"""The JSONL run file: writing (strict JSON) and reading (``read_jsonl``, ``read_run``).

Format (schema ``gradwatch/1``): the first line is ``{"type": "header", "schema":
"gradwatch/1", ...}``; every further line is one object with ``"type"``:

* ``"record"``: a window's :class:`~gradwatch.StepRecord`, once per ``log_every`` steps
  (and at every flush: ``close()``, the end of ``fit``, an exception, exit);
* ``"norms"``: the same window's steps column by column, every step's global norm
  (:mod:`gradwatch._columns`);
* ``"event"``: a :class:`~gradwatch.GradEvent`, when it happens;
* ``"header"`` again, with ``"resumed_at": step``: a watch resumed from a checkpoint taken
  at that step continued the file here. The steps after it that the earlier process had
  already written belong to a timeline the resumed run replaced: readers drop them;
* ``"summary"``: the closing line (steps, and the alerts rate limiting held back).

The file is strict JSON: non-finite floats are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` and read back as floats, so a NaN gradient norm
survives the round trip and any JSON tool can open the file. Lines of an unknown type
are skipped (a newer writer may add some).

Reading treats the file as untrusted input: only regular files are opened (a symlink to
``/dev/zero`` or a FIFO is refused before a byte is read), a line is at most
:data:`MAX_LINE_BYTES` long and nested at most :data:`MAX_DEPTH` deep, every field used is
checked (:mod:`gradwatch._decode`), and anything else is one :class:`RunFileError`
naming the file and the line. Nothing is executed, imported or unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from gradwatch._columns import StepSeries
from gradwatch._decode import Invalid, Row, decode_columns, decode_event, decode_header, decode_record, decode_summary
from gradwatch.errors import GradwatchError
from gradwatch.events import GradEvent
from gradwatch.records import StepRecord

__all__ = ["MAX_DEPTH", "MAX_LINE_BYTES", "SCHEMA", "Run", "RunFileError", "encode_line", "read_header", "read_jsonl", "read_run"]

SCHEMA = "gradwatch/1"
#: Longest line read (a record of a model with 10,000 parameters is about 0.6 MB).
MAX_LINE_BYTES = 32 * 2**20
#: Deepest nesting of objects and arrays read (gradwatch writes at most 6).
MAX_DEPTH = 32


class RunFileError(GradwatchError, ValueError):
    """A file is not a gradwatch run file this version can read."""


# ------------------------------------------------------------------------------ writing
def _plain(obj: Any) -> Any:
    """Replace non-finite floats by strict-JSON strings, recursively."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def encode_line(obj: Mapping[str, Any]) -> str:
    """One strict-JSON line (no newline) for the run file."""
    return json.dumps(_plain(obj), allow_nan=False, separators=(",", ":"))


def event_from_dict(d: Mapping[str, Any]) -> GradEvent:
    """A ``GradEvent`` from the fields of an event line (checked)."""
    return decode_event(d)


# ------------------------------------------------------------------------------ reading
class Run:
    """A whole run file in memory: header, records and events in file order, and the
    per-step series.

    When the file was continued by resumed watches, ``items`` and ``steps`` are the run
    as the final model lived it: what an earlier process wrote after the checkpoint a
    resumption went back to is left out (counted in ``dropped``).
    """

    def __init__(
        self,
        path: Path,
        header: dict[str, Any],
        items: list[StepRecord | GradEvent],
        torn: bool,
        summary: dict[str, Any] | None = None,
        *,
        steps: StepSeries | None = None,
        resumed_at: list[int] | None = None,
        dropped: int = 0,
    ) -> None:
        self.path = path
        self.header = header
        self.items = items
        self.torn = torn
        #: The closing line written by ``Monitor.close()`` (steps, alerts still held back
        #: by rate limiting), or None if the run did not close cleanly.
        self.summary = summary
        #: Every step's global norm, clip decision, skipped and non-finite flags (from the
        #: ``"norms"`` lines; the flushed records only for files written without them).
        self.steps = steps if steps is not None else StepSeries.from_records(self.records)
        #: The steps at which a resumed watch continued the file, in file order.
        self.resumed_at = list(resumed_at or [])
        #: Records and events of abandoned timelines (written after a checkpoint that a
        #: resumption went back to), left out of ``items``.
        self.dropped = dropped

    @property
    def suppressed(self) -> list[dict[str, Any]]:
        """Alerts held back by rate limiting after the last one of their kind was written:
        ``[{"kind", "layer", "count", "first_step"}]`` from the summary line."""
        return list((self.summary or {}).get("suppressed") or [])

    @property
    def records(self) -> list[StepRecord]:
        return [i for i in self.items if isinstance(i, StepRecord)]

    @property
    def events(self) -> list[GradEvent]:
        return [i for i in self.items if isinstance(i, GradEvent)]

    @property
    def name(self) -> str:
        return str(self.header.get("run_name") or self.path.stem)

    def _repr_html_(self) -> str:
        """Notebook display (see :mod:`gradwatch.display`)."""
        from gradwatch.display import run_html

        return run_html(self)


def _open_checked(path: str | os.PathLike[str]) -> tuple[Path, IO[bytes]]:
    """The file opened for reading, if it is a regular file (symlinks followed)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise RunFileError(f"{p}: no such file.") from None
    except OSError as exc:
        raise RunFileError(f"{p}: cannot be read ({exc.strerror or exc}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise RunFileError(f"{p}: is a directory, not a gradwatch run file (.jsonl).")
    if not stat.S_ISREG(st.st_mode):
        raise RunFileError(f"{p}: is not a regular file (a device, FIFO or socket); expected a gradwatch run file (.jsonl).")
    try:
        return p, open(p, "rb")  # closed by the caller
    except OSError as exc:
        raise RunFileError(f"{p}: cannot be read ({exc.strerror or exc}).") from None


def _lines(p: Path, f: IO[bytes]) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, is_last) over the non-empty lines, each at most
    MAX_LINE_BYTES long and valid UTF-8."""
    prev: tuple[int, str] | None = None
    n = 0
    while True:
        try:
            raw = f.readline(MAX_LINE_BYTES + 1)
        except OSError as exc:
            raise RunFileError(f"{p}: cannot be read ({exc.strerror or exc}).") from None
        if not raw:
            break
        n += 1
        if len(raw) > MAX_LINE_BYTES:
            raise RunFileError(f"{p}: line {n} is longer than {MAX_LINE_BYTES // 2**20} MiB; this is not a gradwatch run file.")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RunFileError(f"{p}: line {n} is not UTF-8 text; expected a gradwatch run file (.jsonl).") from None
        if not text.strip():
            continue
        if prev is not None:
            yield prev[0], prev[1], False
        prev = (n, text)
    if prev is not None:
        yield prev[0], prev[1], True


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def _too_deep(text: str) -> bool:
    """Nesting of objects and arrays deeper than MAX_DEPTH (checked before parsing, so a
    line of 100,000 nested arrays costs a scan, not a recursion)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    depth = 0
    for b in _BRACKETS.findall(_STRING.sub("", text)):
        depth += 1 if b in "[{" else -1
        if depth > MAX_DEPTH:
            return True
    return False


def _parse(p: Path, n: int, text: str) -> Any:
    """The JSON value of a line: ``RunFileError`` for a line too deep or too large to
    parse, ``ValueError`` (the caller decides: torn last line or error) for what is not JSON."""
    if _too_deep(text):
        raise RunFileError(f"{p}: line {n} is nested more than {MAX_DEPTH} levels deep; this is not a gradwatch run file.")
    try:
        return json.loads(text)
    except RecursionError:
        raise RunFileError(f"{p}: line {n} is nested too deeply; this is not a gradwatch run file.") from None
    except MemoryError:
        raise RunFileError(f"{p}: line {n} is too large to read.") from None


class _Reader:
    """One pass over a run file: header, items, columns, summaries, resumptions."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.header: dict[str, Any] | None = None
        self.items: list[StepRecord | GradEvent] = []
        self.columns: dict[int, Row] = {}
        self.summaries: list[dict[str, Any]] = []
        self.resumed_at: list[int] = []
        self.dropped = 0
        self.torn: str | None = None
        self.any_columns = False
        p, f = _open_checked(path)
        self.path = p
        with f:
            for n, text, last in _lines(p, f):
                try:
                    obj = _parse(p, n, text)
                    if type(obj) is not dict:
                        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
                except RunFileError:
                    raise
                except ValueError as exc:
                    if last and self.header is not None:
                        self.torn = f"{p}: line {n} is incomplete (torn write?) and was ignored."
                        break
                    raise RunFileError(f"{p}: line {n} is not a JSON object ({_short(exc)}); is this a gradwatch run file?") from None
                try:
                    self._line(p, n, obj)
                except Invalid as exc:
                    raise RunFileError(f"{p}: line {n} is a malformed {_kind_of(obj)}: {exc}.") from None
        if self.header is None:
            raise RunFileError(f"{p}: is empty; expected a gradwatch run file starting with a header line.")

    def _line(self, p: Path, n: int, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if self.header is None:
            _check_header(p, obj)
            self.header = decode_header(obj)
            return
        if kind == "record":
            self.items.append(decode_record(obj))
        elif kind == "event":
            self.items.append(decode_event(obj))
        elif kind == "norms":
            self.columns.update(decode_columns(obj))
            self.any_columns = True
        elif kind == "summary":
            self.summaries.append(decode_summary(obj))
        elif kind == "header":
            _check_header(p, obj)
            decode_header(obj)
            if "resumed_at" not in obj:
                raise RunFileError(
                    f"{p}: line {n} starts another run (a header without \"resumed_at\"): two run files were joined "
                    f"into one; split them at this line."
                )
            self._resume(int(obj["resumed_at"]))

    def _resume(self, at: int) -> None:
        """A watch resumed from its checkpoint at step ``at``: what an earlier process
        wrote after that step is a timeline the resumed run replaced."""
        self.resumed_at.append(at)
        kept = [i for i in self.items if i.step <= at]
        self.dropped += len(self.items) - len(kept)
        self.items = kept
        self.columns = {s: row for s, row in self.columns.items() if s <= at}
        self.summaries.clear()

    def run(self) -> Run:
        assert self.header is not None
        steps = StepSeries.from_columns(self.columns) if self.any_columns else None
        return Run(
            self.path,
            self.header,
            self.items,
            self.torn is not None,
            self.summaries[-1] if self.summaries else None,
            steps=steps,
            resumed_at=self.resumed_at,
            dropped=self.dropped,
        )


def _short(exc: BaseException) -> str:
    """What was wrong with a line that is not JSON, in a few words."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    s = str(exc)
    if "int_max_str_digits" in s or "integer string conversion" in s:
        return "a number with thousands of digits"
    return s if len(s) <= 80 else s[:77] + "..."


def _kind_of(obj: Mapping[str, Any]) -> str:
    k = obj.get("type")
    return f"{k} line" if k in ("record", "event", "norms", "summary", "header") else "line"


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[StepRecord | GradEvent]:
    """Yield the run's ``StepRecord``\\ s and ``GradEvent``\\ s in file order.

    Strict about the header and its schema version, and about every field it uses (a
    clear ``RunFileError`` otherwise); tolerant of a torn last line, which a crash
    mid-write can leave: it is dropped with a ``RuntimeWarning`` and everything before it
    is returned. A file continued by resumed watches reads as one run (see the module).
    """
    reader = _Reader(path)
    if reader.torn:
        warnings.warn(reader.torn, RuntimeWarning, stacklevel=2)
    yield from reader.items


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header line of a run file, checked."""
    p, f = _open_checked(path)
    with f:
        for n, text, _ in _lines(p, f):
            try:
                obj = _parse(p, n, text)
            except RunFileError:
                raise
            except ValueError:
                raise RunFileError(f"{p}: line {n} is not JSON; is this a gradwatch run file?") from None
            _check_header(p, obj)
            try:
                return decode_header(obj)
            except Invalid as exc:
                raise RunFileError(f"{p}: line {n} is a malformed header line: {exc}.") from None
    raise RunFileError(f"{p}: is empty; expected a gradwatch run file starting with a header line.")


def read_run(path: str | os.PathLike[str]) -> Run:
    """The whole run file: header, records and events in file order, per-step series."""
    reader = _Reader(path)
    if reader.torn:
        warnings.warn(reader.torn, RuntimeWarning, stacklevel=2)
    return reader.run()


def appendable_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a resumed watch must not append to ``path`` (None: it may). An absent or
    empty file, or one that is not a regular file, may be written; a regular file must
    start with a gradwatch header of this schema."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return None
    try:
        header = read_header(p)
    except RunFileError as exc:
        return str(exc).removeprefix(f"{p}: ").rstrip(".")
    del header
    return None


def _check_header(p: Path, obj: Any) -> None:
    if not isinstance(obj, dict) or obj.get("type") != "header":
        raise RunFileError(f"{p}: the first line is not a gradwatch header; is this a gradwatch run file?")
    schema = obj.get("schema")
    if schema != SCHEMA:
        shown = repr(schema) if isinstance(schema, (str, int, float, type(None))) else f"a JSON {type(schema).__name__}"
        raise RunFileError(
            f"{p}: schema {shown[:60]} is not supported by this gradwatch (it reads {SCHEMA!r}); "
            f"use the gradwatch version that wrote the file."
        )
