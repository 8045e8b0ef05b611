"""Rich displays for notebooks: what a ``Watch``, a run read back with
:func:`gradwatch.read_run`, a list of events and a ``StepRecord`` look like in Jupyter.

Everything here is plain strings built from the records' fields (numpy only; no
matplotlib until :func:`plot` is called), HTML-escaped, with an inline SVG sparkline of
the global norm. The through-time table has the report's column names (``rate/step``,
``horizon`` as h/T) and treats a profile whose ``horizon`` is None as *not measured*.

``watch.events`` stays a plain list: ``gradwatch.display.events_html(watch.events)``
shows it as a table (the Watch's own display includes the last alerts).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.formatting import fmt, printable

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from gradwatch.events import GradEvent
    from gradwatch.jsonl import Run
    from gradwatch.records import StepRecord
    from gradwatch.watch import Watch

__all__ = [
    "EventGroup",
    "events_html",
    "group_events",
    "plot",
    "record_html",
    "record_repr",
    "run_html",
    "sparkline_svg",
    "through_time_rows",
    "watch_html",
]

#: Longest ``repr`` of a StepRecord (one line).
MAX_REPR = 300
#: Alerts shown by a Watch's or run's display (the newest).
LAST_ALERTS = 5

_STYLE = (
    "font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;font-size:13px;line-height:1.4;"
    "max-width:100%"
)
_TABLE = "border-collapse:collapse;margin:.3em 0"
_CELL = "border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top"


# ------------------------------------------------------------------------ StepRecord
def record_repr(record: StepRecord) -> str:
    """One line of at most :data:`MAX_REPR` characters: the step, the global norm, the
    largest layer, the clip, non-finite parameters and the through-time summary."""
    parts = [f"step={record.step}", f"global_norm={fmt(record.global_norm)}"]
    layers = record.layer_norms
    if layers:
        finite = [(v, k) for k, v in layers.items() if math.isfinite(v)]
        top = max(finite)[1] if finite else next(iter(layers))
        parts.append(f"layers={len(layers)} (max {printable(top, 40)!r} {fmt(layers[top])})")
    if record.clip is not None:
        parts.append(f"clip={record.clip.policy}@{fmt(record.clip.threshold)}x{fmt(record.clip.scale)}")
    if record.skipped:
        parts.append("skipped")
    if record.nonfinite:
        parts.append(f"nonfinite={len(record.nonfinite)}")
    tt = []
    for layer, prof in record.temporal.items():
        if prof.horizon is None or not prof.recurrences:
            tt.append(f"{printable(layer, 30)}: not measured")
        else:
            tt.append(f"{printable(layer, 30)}: {fmt(prof.gain)}/step h {prof.horizon}/{len(prof.propagation)}")
    if tt:
        parts.append("temporal={" + ", ".join(tt) + "}")
    text = "StepRecord(" + ", ".join(parts) + ")"
    if len(text) > MAX_REPR:
        text = text[: MAX_REPR - 2] + "…)"
    return text


def record_html(record: StepRecord) -> str:
    """A StepRecord in a notebook: its one-line summary and its through-time table."""
    e = html.escape
    rows = through_time_rows([record])
    table = _through_time_table(rows) if rows else ""
    return f"<div style='{_STYLE}'><code>{e(record_repr(record))}</code>{table}</div>"


# ------------------------------------------------------------------------ sparkline
def sparkline_svg(values: Sequence[float] | np.ndarray, width: int = 260, height: int = 44) -> str:
    """An inline SVG line of ``values`` (a log scale when they span a decade), NaN/Inf and
    values <= 0 left as gaps; long series are reduced to block maxima so no spike is lost."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return ""
    if v.size > 2 * width:  # block maxima: one point per half pixel
        edges = np.linspace(0, v.size, width + 1).astype(int)
        with np.errstate(all="ignore"):
            v = np.array([np.nanmax(np.where(np.isfinite(v[a:b]), v[a:b], np.nan)) if b > a and np.isfinite(v[a:b]).any()
                          else np.nan for a, b in zip(edges[:-1], edges[1:])])
    ok = np.isfinite(v) & (v > 0)
    if not ok.any():
        return f"<svg width='{width}' height='{height}' role='img'><text x='4' y='{height // 2}' font-size='11' fill='#888'>no finite norm</text></svg>"
    lo, hi = float(v[ok].min()), float(v[ok].max())
    log = hi >= 10 * lo
    y = np.where(ok, np.log10(np.where(ok, v, 1.0)) if log else v, np.nan)
    ylo, yhi = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
    span = (yhi - ylo) or 1.0
    pad = 3
    xs = pad + (width - 2 * pad) * (np.arange(v.size) / max(1, v.size - 1))
    ys = pad + (height - 2 * pad) * (1 - (y - ylo) / span)
    segs, cur = [], []
    for x_, y_, good in zip(xs, ys, ok):
        if good:
            cur.append(f"{x_:.1f},{y_:.1f}")
        elif cur:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    lines = "".join(
        f"<polyline fill='none' stroke='#1f77b4' stroke-width='1.2' points='{' '.join(s)}'/>" if len(s) > 1
        else f"<circle cx='{s[0].split(',')[0]}' cy='{s[0].split(',')[1]}' r='1.5' fill='#1f77b4'/>"
        for s in segs
    )
    title = html.escape(f"global norm, min {fmt(lo)}, max {fmt(hi)}" + (" (log scale)" if log else ""))
    return (
        f"<svg width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' "
        f"style='vertical-align:middle;background:#fafafa'><title>{title}</title>{lines}</svg>"
    )


# ------------------------------------------------------------------------ through time
def through_time_rows(records: Sequence[StepRecord]) -> list[tuple[str, str, str, str, int]]:
    """(layer, recurrence, rate/step, horizon h/T, step) of the newest measured profile of
    each recurrent layer; a layer never measured gets one "not measured" row."""
    latest: dict[str, tuple[int, Any]] = {}
    seen: list[str] = []
    for r in records:
        for layer, prof in r.temporal.items():
            if layer not in latest and layer not in seen:
                seen.append(layer)
            if prof.recurrences and prof.horizon is not None:
                latest[layer] = (r.step, prof)
    rows = []
    for layer in seen:
        if layer not in latest:
            rows.append((layer, "-", "not measured", "not measured", 0))
            continue
        step, prof = latest[layer]
        for name, p in prof.recurrences.items():
            gains = getattr(p, "max_gains", ()) or p.gains
            horizon = getattr(p, "horizon", None)
            h = "not measured" if horizon is None else f"{horizon}/{len(gains)}"
            rows.append((layer, name, fmt(p.rate), h, step))
    return rows


def _through_time_table(rows: Sequence[tuple[str, str, str, str, int]]) -> str:
    e = html.escape
    head = "".join(f"<th style='{_CELL};background:#f3f3f3'>{h}</th>" for h in ("layer", "recurrence", "rate/step", "horizon", "step"))
    body = "".join(
        "<tr>" + "".join(f"<td style='{_CELL}'>{e(printable(str(c), 80))}</td>" for c in (layer, rec, rate, hor, step or "-")) + "</tr>"
        for layer, rec, rate, hor, step in rows
    )
    return f"<table style='{_TABLE}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------ events
_NUM = re.compile(r"[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?", re.IGNORECASE)


class EventGroup:
    """Alerts of one kind for one layer whose messages differ only in their numbers."""

    __slots__ = ("count", "first", "kind", "last", "layer", "steps")

    def __init__(self, first: GradEvent) -> None:
        self.first = first
        self.last = first
        self.kind = first.kind
        self.layer = first.layer
        self.count = 0
        self.steps: list[int] = []

    def add(self, ev: GradEvent) -> None:
        self.count += 1 + int(getattr(ev, "suppressed", 0) or 0)
        self.steps.append(ev.step)
        self.last = ev

    @property
    def step_text(self) -> str:
        lo, hi = min(self.steps), max(self.steps)
        return str(lo) if lo == hi else f"{lo}–{hi}"


def group_events(events: Iterable[GradEvent]) -> list[EventGroup]:
    """Near-identical alerts grouped: same kind, layer and message once its numbers are
    blanked; in the order of each group's first alert. A group's ``count`` includes the
    repeats rate limiting held back (``suppressed``)."""
    groups: dict[tuple[str, str | None, str], EventGroup] = {}
    for ev in events:
        key = (ev.kind, ev.layer, _NUM.sub("#", ev.message))
        g = groups.get(key)
        if g is None:
            g = groups[key] = EventGroup(ev)
        g.add(ev)
    return list(groups.values())


def events_html(events: Sequence[GradEvent], limit: int = 20) -> str:
    """A list of ``GradEvent`` as an HTML table (the newest ``limit`` groups), repeats of
    one alert grouped as "×6, steps 10–60"; messages wrap."""
    e = html.escape
    if not events:
        return f"<div style='{_STYLE}'><i>No alerts.</i></div>"
    groups = group_events(events)
    shown = groups[-limit:]
    head = "".join(f"<th style='{_CELL};background:#f3f3f3'>{h}</th>" for h in ("step", "kind", "layer", "message"))
    rows = []
    for g in shown:
        times = f" <b>×{g.count}</b>" if g.count > 1 else ""
        rows.append(
            f"<tr><td style='{_CELL};white-space:nowrap'>{e(g.step_text)}{times}</td>"
            f"<td style='{_CELL}'>{e(printable(g.kind, 30))}</td><td style='{_CELL}'>{e(printable(g.layer or '(global)', 60))}</td>"
            f"<td style='{_CELL};overflow-wrap:anywhere'>{e(printable(g.last.message, 600))}</td></tr>"
        )
    more = f"<div style='color:#666'>{len(groups) - limit} earlier kinds of alert not shown.</div>" if len(groups) > limit else ""
    return (
        f"<div style='{_STYLE}'><table style='{_TABLE}'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"
        f"</table>{more}</div>"
    )


# ------------------------------------------------------------------------ Watch and Run
def _summary_html(title: str, steps: int, norms: np.ndarray, records: Sequence[StepRecord], events: Sequence[GradEvent]) -> str:
    e = html.escape
    finite = norms[np.isfinite(norms)]
    last = f"last {fmt(float(norms[-1]))}" if norms.size else "no norm yet"
    rng = f", min {fmt(float(finite.min()))}, max {fmt(float(finite.max()))}" if finite.size else ""
    rows = through_time_rows(records)
    alerts = [ev for ev in events if ev.kind != "clipped"]
    parts = [
        f"<div style='{_STYLE}'><b>{e(title)}</b> · {steps} step{'s' if steps != 1 else ''}",
        f"<div>{sparkline_svg(norms)} <span style='color:#555'>global gradient norm: {e(last)}{e(rng)}</span></div>",
    ]
    if rows:
        parts.append("<div style='margin-top:.4em'><b>Through time</b> (newest measured profile)</div>" + _through_time_table(rows))
    if alerts:
        parts.append(f"<div style='margin-top:.4em'><b>Last alerts</b> ({len(alerts)} in all)</div>")
        parts.append(events_html(alerts, limit=LAST_ALERTS))
    else:
        parts.append("<div style='color:#555;margin-top:.3em'>No alerts.</div>")
    parts.append("</div>")
    return "".join(parts)


def watch_html(watch: Watch) -> str:
    """``Watch._repr_html_``: step count, norm sparkline, through-time table, last alerts."""
    records = watch.records
    state = "closed" if watch.closed else ("open" if watch.attachment is not None else "detached")
    title = f"gradwatch.Watch ({watch.backend}, {state})"
    norms = np.asarray([r.global_norm for r in records], dtype=np.float64)
    return _summary_html(title, watch.monitor.step_count, norms, records, watch.events)


def run_html(run: Run) -> str:
    """The display of a run read back with :func:`gradwatch.read_run`."""
    steps = run.steps
    n = int(steps.step.max()) if len(steps) else max([r.step for r in run.records] or [0])
    return _summary_html(f"gradwatch run {printable(run.name, 80)}", n, np.asarray(steps.global_norm, dtype=np.float64),
                         run.records, run.events)


def _as_run(watch: Watch) -> Run:
    from dataclasses import replace
    from pathlib import Path

    from gradwatch._columns import StepSeries
    from gradwatch.jsonl import Run

    records = list(watch.records)
    options = watch.monitor.options.public()
    header = {"run_name": options.get("run_name") or "watch", "options": options, "backend": watch.backend}
    items: list[Any] = [*records, *watch.events]
    steps = replace(StepSeries.from_records(records), per_step=True)  # the watch keeps every step it saw
    return Run(Path(str(header["run_name"])), header, items, False, steps=steps)


def plot(target: Watch | Run) -> Figure:
    """The report's main figure (the global norm at every step, alerts on the curve) for a
    Watch or a run, as a matplotlib ``Figure`` (shown inline by Jupyter). Needs
    ``pip install 'gradwatch[plot]'``."""
    try:
        from gradwatch.cli.plot_norms import global_norm_figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("watch.plot() needs matplotlib: pip install 'gradwatch[plot]'") from exc
    from gradwatch.jsonl import Run

    run = target if isinstance(target, Run) else _as_run(target)
    fig, _caption = global_norm_figure([run], [printable(run.name, 60)])
    return fig
