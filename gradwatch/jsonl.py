"""The JSONL run file: writing (strict JSON) and reading (``read_jsonl``).

Format (schema ``gradwatch/1``): the first line is ``{"type": "header", "schema":
"gradwatch/1", ...}``; every further line is one object with ``"type": "record"`` or
``"type": "event"``, and a run closed cleanly ends with ``"type": "summary"`` (steps, and
the alerts rate limiting held back after the last one written). The file is strict JSON: non-finite floats are written as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` and read back as floats, so a NaN gradient
norm survives the round trip and any JSON tool can open the file. Reading never executes
or unpickles anything: it is ``json.loads`` and dataclass construction.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gradwatch.errors import GradwatchError
from gradwatch.events import GradEvent
from gradwatch.records import StepRecord

__all__ = ["SCHEMA", "Run", "RunFileError", "encode_line", "read_jsonl", "read_run"]

SCHEMA = "gradwatch/1"


class RunFileError(GradwatchError, ValueError):
    """A file is not a gradwatch run file this version can read."""


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


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def event_from_dict(d: Mapping[str, Any]) -> GradEvent:
    return GradEvent(
        kind=str(d["kind"]),
        step=int(d["step"]),
        severity=int(d["severity"]),
        message=str(d["message"]),
        layer=d.get("layer"),
        param=d.get("param"),
        value=_float(d.get("value")),
        threshold=_float(d.get("threshold")),
        suppressed=int(d.get("suppressed", 0)),
    )


class Run:
    """A whole run file in memory: header, records and events in file order."""

    def __init__(
        self,
        path: Path,
        header: dict[str, Any],
        items: list[StepRecord | GradEvent],
        torn: bool,
        summary: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.header = header
        self.items = items
        self.torn = torn
        #: The closing line written by ``Monitor.close()`` (steps, alerts still held back
        #: by rate limiting), or None if the run did not close cleanly.
        self.summary = summary

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


def _iter_lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, is_last) over the non-empty lines of a file."""
    with open(path, encoding="utf-8") as f:
        prev: tuple[int, str] | None = None
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if prev is not None:
                yield prev[0], prev[1], False
            prev = (n, line)
        if prev is not None:
            yield prev[0], prev[1], True


def _open_checked(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise RunFileError(f"{p}: no such file.")
    if p.is_dir():
        raise RunFileError(f"{p}: is a directory, not a gradwatch run file (.jsonl).")
    return p


def read_jsonl(
    path: str | os.PathLike[str], *, _summaries: list[dict[str, Any]] | None = None
) -> Iterator[StepRecord | GradEvent]:
    """Yield the run's ``StepRecord``s and ``GradEvent``s in file order.

    Strict about the header and its schema version (a clear ``RunFileError`` otherwise);
    tolerant of a torn last line, which a crash mid-write can leave: it is dropped with a
    ``RuntimeWarning`` and everything before it is returned.
    """
    p = _open_checked(path)
    first = True
    try:
        for n, text, last in _iter_lines(p):
            try:
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                if last and not first:
                    warnings.warn(f"{p}: line {n} is incomplete (torn write?) and was ignored.", RuntimeWarning, stacklevel=2)
                    return
                raise RunFileError(f"{p}: line {n} is not a JSON object ({exc}); is this a gradwatch run file?") from None
            if first:
                _check_header(p, obj)
                first = False
                continue
            kind = obj.get("type")
            try:
                if kind == "record":
                    yield StepRecord.from_dict(obj)
                elif kind == "event":
                    yield event_from_dict(obj)
                elif kind == "summary" and _summaries is not None:
                    _summaries.append(obj)
                # Unknown line types are skipped: newer writers may add kinds of line.
            except (KeyError, TypeError, ValueError) as exc:
                if last:
                    warnings.warn(f"{p}: line {n} is incomplete and was ignored ({exc}).", RuntimeWarning, stacklevel=2)
                    return
                raise RunFileError(f"{p}: line {n} is a malformed {kind}: {exc!r}.") from None
    except UnicodeDecodeError:
        raise RunFileError(f"{p}: is not a text file; expected a gradwatch run file (.jsonl).") from None
    if first:
        raise RunFileError(f"{p}: is empty; expected a gradwatch run file starting with a header line.")


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header line of a run file, checked."""
    p = _open_checked(path)
    try:
        for n, text, _ in _iter_lines(p):
            try:
                obj = json.loads(text)
            except ValueError:
                raise RunFileError(f"{p}: line {n} is not JSON; is this a gradwatch run file?") from None
            _check_header(p, obj)
            return dict(obj)
    except UnicodeDecodeError:
        raise RunFileError(f"{p}: is not a text file; expected a gradwatch run file (.jsonl).") from None
    raise RunFileError(f"{p}: is empty; expected a gradwatch run file starting with a header line.")


def read_run(path: str | os.PathLike[str]) -> Run:
    """The whole run file: header, and records and events in file order."""
    header = read_header(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summaries: list[dict[str, Any]] = []
        items = list(read_jsonl(path, _summaries=summaries))
    torn = any(issubclass(w.category, RuntimeWarning) for w in caught)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return Run(Path(path), header, items, torn, summaries[-1] if summaries else None)


def _check_header(p: Path, obj: Any) -> None:
    if not isinstance(obj, dict) or obj.get("type") != "header":
        raise RunFileError(f"{p}: the first line is not a gradwatch header; is this a gradwatch run file?")
    schema = obj.get("schema")
    if schema != SCHEMA:
        raise RunFileError(
            f"{p}: schema {schema!r} is not supported by this gradwatch (it reads {SCHEMA!r}); "
            f"use the gradwatch version that wrote the file."
        )
