"""Checked decoding of run-file lines into records, events and columns.

A run file can come from anywhere (a colleague, an issue tracker, a crashed disk), so
every field the reader uses is checked for its type and range before it is used, and
anything else raises :class:`Invalid` (a ``ValueError``), which the reader turns into one
``RunFileError`` sentence naming the file, the line and the field. Fields the reader
does not use are left alone (a newer writer may add some). Nothing is executed,
imported or unpickled: the input is what ``json.loads`` made of the line, and the output
frozen dataclasses of plain values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from gradwatch.events import GradEvent
from gradwatch.records import ClipDecision, GateStats, Propagation, StepRecord, TemporalProfile, WindowStats

__all__ = ["Invalid", "decode_columns", "decode_event", "decode_header", "decode_record", "decode_summary"]

T = TypeVar("T")

#: Largest step number accepted: every step is exactly representable as a float too.
MAX_STEP = 2**53
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class Invalid(ValueError):
    """A field of a line does not have the type or range the reader needs."""


def _int(v: Any, what: str, lo: int = 0, hi: int = MAX_STEP) -> int:
    if type(v) is not int or not lo <= v <= hi:
        shown = repr(v) if isinstance(v, (int, float, str, bool, type(None))) else f"a JSON {_kind(v)}"
        raise Invalid(f"{what} must be a whole number from {lo} to {hi}, not {shown[:40]}")
    return v


def _num(v: Any, what: str) -> float:
    t = type(v)
    if t is float:
        return v  # type: ignore[no-any-return]
    if t is int:
        try:
            return float(v)
        except OverflowError:
            raise Invalid(f"{what} is a number too large for a float") from None
    if t is str and v in _NONFINITE:
        return _NONFINITE[v]
    raise Invalid(f"{what} must be a number (or \"NaN\", \"Infinity\", \"-Infinity\"), not a JSON {_kind(v)}")


def _opt_num(v: Any, what: str) -> float | None:
    return None if v is None else _num(v, what)


def _str(v: Any, what: str) -> str:
    if type(v) is not str:
        raise Invalid(f"{what} must be a string, not a JSON {_kind(v)}")
    return v  # type: ignore[no-any-return]


def _opt_str(v: Any, what: str) -> str | None:
    return None if v is None else _str(v, what)


def _dict(v: Any, what: str, optional: bool = True) -> dict[str, Any]:
    if v is None and optional:
        return {}
    if type(v) is not dict:
        raise Invalid(f"{what} must be a JSON object, not a JSON {_kind(v)}")
    return v  # type: ignore[no-any-return]


def _list(v: Any, what: str, optional: bool = True) -> list[Any]:
    if v is None and optional:
        return []
    if type(v) is not list:
        raise Invalid(f"{what} must be a JSON array, not a JSON {_kind(v)}")
    return v  # type: ignore[no-any-return]


def _nums(v: Any, what: str, optional: bool = True) -> tuple[float, ...]:
    return tuple(_num(x, what) for x in _list(v, what, optional))


def _map(v: Any, what: str, item: Callable[[Any, str], T]) -> dict[str, T]:
    return {k: item(x, f"{what}[{k[:40]!r}]") for k, x in _dict(v, what).items()}


def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


# ---------------------------------------------------------------------------- lines
def decode_header(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The header's fields the reader and the report use, checked; the whole header
    (unused fields included) is returned."""
    _opt_str(obj.get("run_name"), "run_name")
    _opt_str(obj.get("backend"), "backend")
    _opt_str(obj.get("created"), "created")
    opts = _dict(obj.get("options"), "options")
    _opt_str(opts.get("policy"), "options.policy")
    if "log_every" in opts:
        _int(opts["log_every"], "options.log_every", 1)
    _map(obj.get("recurrent_layers"), "recurrent_layers", _str)
    _map(obj.get("layer_types"), "layer_types", _str)
    if "resumed_at" in obj:
        _int(obj["resumed_at"], "resumed_at")
    return dict(obj)


def _profile(p: Any, what: str) -> TemporalProfile:
    d = _dict(p, what, optional=False)
    recs = {}
    for k, r in _dict(d.get("recurrences"), f"{what}.recurrences").items():
        at = f"{what}.recurrences[{k[:40]!r}]"
        r = _dict(r, at, optional=False)
        recs[k] = Propagation(
            _nums(r.get("gains"), f"{at}.gains"),
            _num(r.get("rate"), f"{at}.rate"),
            _int(r.get("horizon"), f"{at}.horizon"),
            _nums(r.get("max_gains"), f"{at}.max_gains") if r.get("max_gains") is not None else (),
        )
    hor = d.get("horizon")
    return TemporalProfile(
        norms=_nums(d.get("norms"), f"{what}.norms"),
        gain=_num(d.get("gain"), f"{what}.gain"),
        # None: not measured. Files written before that said 0 for a profile without recurrences.
        horizon=None if hor is None or not recs else _int(hor, f"{what}.horizon"),
        propagation=_nums(d.get("propagation"), f"{what}.propagation"),
        recurrences=MappingProxyType(recs),
    )


def _gate(g: Any, what: str) -> GateStats:
    d = _dict(g, what, optional=False)
    return GateStats(_str(d.get("gate"), f"{what}.gate"), _num(d.get("mean"), f"{what}.mean"), _num(d.get("log_path_gain"), f"{what}.log_path_gain"))


def _window(w: Any) -> WindowStats | None:
    if w is None:
        return None
    d = _dict(w, "window", optional=False)
    first, last = _int(d.get("first_step"), "window.first_step"), _int(d.get("last_step"), "window.last_step")
    if first > last:
        raise Invalid(f"window.first_step ({first}) is after window.last_step ({last})")
    return WindowStats(
        first_step=first,
        last_step=last,
        steps=_int(d.get("steps"), "window.steps"),
        norm_min=_num(d.get("norm_min"), "window.norm_min"),
        norm_mean=_num(d.get("norm_mean"), "window.norm_mean"),
        norm_max=_num(d.get("norm_max"), "window.norm_max"),
        clipped=_int(d.get("clipped", 0), "window.clipped"),
        skipped=_int(d.get("skipped", 0), "window.skipped"),
        nonfinite=_int(d.get("nonfinite", 0), "window.nonfinite"),
    )


def decode_record(d: Mapping[str, Any]) -> StepRecord:
    clip = d.get("clip")
    c = None
    if clip is not None:
        cd = _dict(clip, "clip", optional=False)
        c = ClipDecision(_num(cd.get("threshold"), "clip.threshold"), _num(cd.get("scale"), "clip.scale"), _str(cd.get("policy"), "clip.policy"))
    skipped = d.get("skipped", False)
    if type(skipped) is not bool:
        raise Invalid(f"skipped must be true or false, not a JSON {_kind(skipped)}")
    return StepRecord(
        step=_int(d.get("step"), "step", 1),
        global_norm=_num(d.get("global_norm"), "global_norm"),
        param_norms=MappingProxyType(_map(d.get("param_norms"), "param_norms", _num)),
        layer_norms=MappingProxyType(_map(d.get("layer_norms"), "layer_norms", _num)),
        clip=c,
        skipped=skipped,
        nonfinite=tuple(_str(x, "nonfinite[]") for x in _list(d.get("nonfinite"), "nonfinite")),
        temporal=MappingProxyType(_map(d.get("temporal"), "temporal", _profile)),
        spectral=MappingProxyType(_map(d.get("spectral"), "spectral", _num)),
        gates=MappingProxyType(_map(d.get("gates"), "gates", _gate)),
        window=_window(d.get("window")),
    )


def decode_event(d: Mapping[str, Any]) -> GradEvent:
    kind = _str(d.get("kind"), "kind")
    if not kind or len(kind) > 64:
        raise Invalid(f"kind must be a short name such as 'exploding', not {kind[:40]!r}")
    return GradEvent(
        kind=kind,  # type: ignore[arg-type]
        step=_int(d.get("step"), "step"),
        severity=_int(d.get("severity"), "severity", 0, 100),
        message=_str(d.get("message"), "message"),
        layer=_opt_str(d.get("layer"), "layer"),
        param=_opt_str(d.get("param"), "param"),
        value=_opt_num(d.get("value"), "value"),
        threshold=_opt_num(d.get("threshold"), "threshold"),
        suppressed=_int(d.get("suppressed", 0), "suppressed"),
        worse_when=_opt_str(d.get("worse_when"), "worse_when"),
    )


def decode_summary(d: Mapping[str, Any]) -> dict[str, Any]:
    """The closing line: ``steps`` and the alerts rate limiting still held back."""
    held = []
    for s in _list(d.get("suppressed"), "suppressed"):
        e = _dict(s, "suppressed[]", optional=False)
        held.append(
            {
                "kind": _str(e.get("kind"), "suppressed[].kind"),
                "layer": _opt_str(e.get("layer"), "suppressed[].layer"),
                "count": _int(e.get("count"), "suppressed[].count"),
                "first_step": _int(e.get("first_step"), "suppressed[].first_step"),
            }
        )
    out = dict(d)
    out["steps"] = _int(d.get("steps", 0), "steps")
    out["suppressed"] = held
    return out


#: step -> (global norm, clip threshold, clip scale, skipped, nonfinite)
Row = tuple[float, float, float, bool, bool]


def decode_columns(d: Mapping[str, Any]) -> dict[int, Row]:
    """A ``"norms"`` line (:mod:`gradwatch._columns`) as step -> row."""
    first = _int(d.get("first_step"), "first_step", 1)
    values = _nums(d.get("values"), "values", optional=False)
    n = len(values)
    if first + n - 1 > MAX_STEP:
        raise Invalid(f"first_step + len(values) exceeds {MAX_STEP}")
    thr = _column(d.get("clip_threshold"), n, "clip_threshold")
    scale = _column(d.get("clip_scale"), n, "clip_scale")
    skipped = _steps_in(d.get("skipped_steps"), first, n, "skipped_steps")
    nonfinite = _steps_in(d.get("nonfinite_steps"), first, n, "nonfinite_steps")
    return {first + i: (values[i], thr[i], scale[i], first + i in skipped, first + i in nonfinite) for i in range(n)}


def _column(v: Any, n: int, what: str) -> list[float]:
    if v is None:
        return [math.nan] * n
    if type(v) is list:
        if len(v) != n:
            raise Invalid(f"{what} has {len(v)} entries for {n} values")
        return [math.nan if x is None else _num(x, what) for x in v]
    return [_num(v, what)] * n


def _steps_in(v: Any, first: int, n: int, what: str) -> set[int]:
    """Step numbers that must lie in the line's own steps."""
    return {_int(x, what, first, first + n - 1) for x in _list(v, what)}
