"""``gradwatch report``: turn run files (JSONL) into a terminal summary, PNG plots and a
self-contained ``report.html``. The numbers come from :mod:`gradwatch.cli.summary`;
matplotlib is optional and imported only to plot.

Everything taken from a run file is untrusted: it is made printable (no control
characters, long names cut) and HTML-escaped here, and made safe for matplotlib in
:mod:`gradwatch.cli.plots`. A plot that fails is left out with a note: the report is
always written.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch.cli.summary import (
    RunSummary,
    _pct,
    fmt,
    format_summary,
    format_table,
    label,
    load_runs,
    run_color,
    summarize,
    table_rows,
)
from gradwatch.formatting import printable
from gradwatch.jsonl import Run, RunFileError

__all__ = ["ReportFiles", "RunSummary", "format_summary", "format_table", "load_runs", "run_report", "summarize", "write_report"]


PLOT_HINT = "gradwatch: plots need matplotlib: pip install 'gradwatch[plot]' (the summary and report.html tables are written without them)."


# -------------------------------------------------------------------------------- HTML
@dataclass
class ReportFiles:
    html: Path
    pngs: list[Path]
    plots_missing: bool  # True when matplotlib is not installed
    #: Plots that could not be drawn (one sentence each); the report was written without them.
    problems: list[str] = field(default_factory=list)


# Tables fit the page: at a desktop width each is an ordinary table (scrolling inside its
# own box only if a run file holds absurdly long names); below 760 px each row becomes a
# block of "column: value" lines (the column name from the cell's data-label), so nothing
# scrolls sideways at 700 px. Numbers never break across lines (1.2e-05 must not become
# "1.2e-" / "05"); messages and paths wrap.
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #ddd}
.tbl{overflow-x:auto;max-width:100%;margin:.6em 0}
table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.name{white-space:nowrap}td.text{overflow-wrap:anywhere;min-width:16em}td.path{overflow-wrap:anywhere}
.sw{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.35em;vertical-align:baseline}
.times{font-weight:bold;white-space:nowrap}
figure{margin:1.2em 0}img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.note{color:#666;font-size:.9em}.warn{color:#a40}code{background:#f5f5f5;padding:0 .2em}
dl.gloss{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;font-size:.92em}
dl.gloss dt{font-weight:bold;white-space:nowrap}dl.gloss dd{margin:0}
@media (max-width:760px){
body{margin:1em auto;padding:0 .6em}
.tbl table,.tbl thead,.tbl tbody,.tbl tr,.tbl td{display:block;width:auto}
.tbl thead{display:none}
.tbl tr{border:1px solid #ccc;margin:0 0 .6em 0;padding:.2em .4em;display:grid;grid-template-columns:1fr 1fr;column-gap:1em}
.tbl td.text,.tbl td.path,.tbl td:first-child{grid-column:1/-1}
.tbl td{border:none;padding:.1em 0;text-align:left;min-width:0;white-space:normal;overflow-wrap:anywhere}
.tbl td.num{text-align:left}
.tbl td::before{content:attr(data-label) ": ";font-weight:bold;color:#555}
dl.gloss{grid-template-columns:1fr}dl.gloss dt{margin-top:.4em}
}
"""

#: Events listed per run in the HTML (the rest are counted in the summary).
MAX_EVENTS_HTML = 200
#: Longest event message shown in the HTML (the run file has it whole).
MAX_MESSAGE_HTML = 2000

_NUMBER = re.compile(r"[-+]?(\d[\d,]*(\.\d+)?(e[-+]?\d+)?%?|\.\d+|nan|inf|-inf|-)( \(\d+(\.\d+)?%\))?|\d+/\d+", re.IGNORECASE)


def _cell(text: str, kind: str | None = None, head: str = "", prefix_html: str = "") -> str:
    """One table cell: printable, escaped, classed (numbers never wrap), labelled with its
    column (shown before the value on narrow screens)."""
    t = printable(text, MAX_MESSAGE_HTML)
    if kind is None:
        kind = "num" if _NUMBER.fullmatch(t.strip()) else ("text" if len(t) > 60 else "name")
    return f"<td class='{kind}' data-label='{html.escape(head)}'>{prefix_html}{html.escape(t)}</td>"


def _table_html(
    head: Sequence[str],
    rows: Sequence[Sequence[str]],
    kinds: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
) -> str:
    """A table; ``colors`` maps a run's name to its plot colour (a swatch in its "run" cell)."""
    e = html.escape
    kinds = kinds or {}
    colors = colors or {}
    out = ["<div class='tbl'><table><thead><tr>", *(f"<th>{e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for h, c in zip(head, r):
            sw = f"<span class='sw' style='background:{colors[str(c)]}'></span>" if h == "run" and str(c) in colors else ""
            cells.append(_cell(str(c), kinds.get(h), h, sw))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _events_html(run: Run) -> str:
    """The run's alerts, near-identical ones grouped ("×6, steps 10–60": same kind and
    layer, a message that differs only in its numbers, shown as the first one wrote it)."""
    from gradwatch.display import group_events

    events = run.events
    if not events:
        return "<p class='note'>No events.</p>"
    groups = group_events(events)
    rows = []
    for g in groups[:MAX_EVENTS_HTML]:
        values = [ev.value for ev in (g.first, g.last) if ev.value is not None]
        value = fmt(values[0]) if len(values) == 1 or (values and values[0] == values[-1]) else (
            f"{fmt(values[0])} … {fmt(values[-1])}" if values else "")
        rows.append([f"×{g.count}" if g.count > 1 else "1", g.step_text, g.kind, g.first.level_name, g.layer or "",
                     value, g.first.message])
    more = (
        f"<p class='note'>{len(groups) - MAX_EVENTS_HTML} more kinds of alert are in the run file.</p>"
        if len(groups) > MAX_EVENTS_HTML
        else ""
    )
    note = (
        "<p class='note'>Alerts of one kind for one layer whose messages differ only in their numbers are one row: "
        "×n is how many (repeats rate limiting held back included), steps the first and last; the message is the "
        "first one.</p>"
        if any(g.count > 1 for g in groups)
        else ""
    )
    return note + _table_html(["alerts", "steps", "kind", "severity", "layer", "value", "message"], rows,
                              {"message": "text", "steps": "num", "alerts": "num"}) + more


#: The summary table's columns, defined (the glossary of report.html).
GLOSSARY = (
    ("propagation", "how a gradient survives going back through a recurrent layer's state: the gain of the state "
     "Jacobian product ∂s_T/∂s_(T−j) over j steps back, measured on the step's own sequences (its largest singular "
     "value where the run records it, max over the probed sequences). Vanishing and exploding alerts are judged on "
     "it."),
    ("rate/step", "the per-step factor of the propagation, fitted over every j (below 1: it vanishes going back, "
     "above 1: it explodes)."),
    ("horizon", "h/T: the steps back until the propagation's gain falls below vanish_ratio (1e-3 by default), out "
     "of the T steps of the sequence; T/T: it never does. '-' where propagation was not measured."),
    ("sensitivity", "‖∂L/∂x_t‖, the gradient of the loss with respect to the layer's input at timestep t: which "
     "timesteps the loss draws on. A model that uses the first input peaks there, which is healthy; it is not what "
     "the alerts judge."),
    ("x_1/peak", "sensitivity at the first timestep over its largest value (last profile of the run); '-' where "
     "no gradient reached the layer's input at any timestep."),
    ("events", "alerts by kind over the whole run, rate-limited repeats included."),
    ("clipped", "share of all steps gradwatch's own policy scaled down (clipping done by your code before "
     "optimizer.step(), e.g. clip_grad_norm_, is not counted: gradwatch measures after it)."),
    ("norm p50, norm max", "median and largest global gradient L2 norm over every step, before gradwatch's clipping."),
)


def _glossary_html() -> str:
    e = html.escape
    items = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in GLOSSARY)
    return f"<dl class='gloss'>{items}</dl>"


def write_report(
    runs: Sequence[Run],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "gradwatch report",
    intro_html: str = "",
    extra: Mapping[str, Mapping[str, str]] | None = None,
    summaries: Sequence[RunSummary] | None = None,
    notes: Sequence[str] = (),
) -> ReportFiles:
    """Write the PNG plots and ``report.html`` (images embedded as base64) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = list(summaries) if summaries is not None else [summarize(r) for r in runs]
    plots: list[tuple[Path, str, str]] = []
    problems: list[str] = []
    missing = False
    try:
        from gradwatch.cli import plots as _plots
    except ImportError:
        missing = True
    else:
        plots = _plots.plot_all(runs, out, [label(r) for r in runs], problems=problems)
    e = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        intro_html,
    ]
    for n in [*notes, *problems]:
        parts.append(f"<p class='warn'>{e(printable(n, 400))}</p>")
    head, rows = table_rows(summaries, extra)
    parts.append("<h2>Summary</h2>")
    colors = {sm.name: run_color(i) for i, sm in enumerate(summaries)}
    parts.append(_table_html(head, rows, colors=colors))
    parts.append(_glossary_html())
    detail_rows = [
        [
            s.name,
            s.backend,
            s.policy,
            str(s.steps),
            fmt(s.norm_percentiles.get("p5", math.nan)),
            fmt(s.norm_percentiles.get("p50", math.nan)),
            fmt(s.norm_percentiles.get("p95", math.nan)),
            fmt(s.norm_max),
            f"{s.clipped_steps} ({_pct(s.clipped_share)})" if s.has_policy else "no policy",
            str(s.skipped_steps),
            str(s.nonfinite_steps),
            str(s.path),
        ]
        for s in summaries
    ]
    parts.append(
        _table_html(
            ["run", "backend", "policy", "steps", "norm p5", "p50", "p95", "max", "clipped steps", "skipped",
             "non-finite steps", "file"],
            detail_rows,
            {"file": "path"},
            colors,
        )
    )
    for s in summaries:
        for note in s.notes:
            parts.append(f"<p class='warn'><b>{e(s.name)}</b>: {e(note)}</p>")
    if missing:
        parts.append(f"<p class='warn'>{e(PLOT_HINT)}</p>")
    else:
        parts.append("<h2>Plots</h2>")
        for path, heading, caption in plots:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            # The image is embedded (report.html is self-contained); the PNG beside it opens full size.
            parts.append(
                f"<figure><a href='{e(path.name)}' title='open full size'><img alt='{e(heading)}' "
                f"src='data:image/png;base64,{data}'></a>"
                f"<figcaption><b>{e(heading)}.</b> {e(caption)} <a class='note' href='{e(path.name)}'>Open full size "
                f"({e(path.name)})</a></figcaption></figure>"
            )
    parts.append("<h2>Events</h2>")
    kind_rows = [
        [s.name, kind, layer, str(n)] for s in summaries for (kind, layer), n in sorted(s.events_by_kind_layer.items())
    ]
    if kind_rows:
        parts.append(
            "<p class='note'>Counts include repeats that rate limiting (alert_every) held back and reported with a "
            "later alert; repeats still held back when the run ended are not in the run file. The clipped and "
            "skipped shares in the summary count every step.</p>"
        )
        parts.append(_table_html(["run", "kind", "layer", "count"], kind_rows, colors=colors))
    for i, r in enumerate(runs):
        parts.append(f"<h3><span class='sw' style='background:{run_color(i)}'></span>{e(label(r))}</h3>")
        parts.append(_events_html(r))
    parts.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(parts), encoding="utf-8")
    return ReportFiles(html_path, [p for p, _, _ in plots], missing, problems)


def run_report(paths: Sequence[str], out_dir: str, stdout: Any, stderr: Any) -> int:
    """``gradwatch report``: exit status 0, or 2 for a file it cannot read."""
    try:
        runs, notes = load_runs(paths)
    except RunFileError as exc:
        print(f"gradwatch report: {printable(exc, 600)}", file=stderr)
        return 2
    for n in notes:
        print(f"gradwatch report: warning: {printable(n, 600)} Reporting everything before it.", file=stderr)
    summaries = [summarize(r) for r in runs]
    for s in summaries:
        print(format_summary(s), file=stdout)
        print(file=stdout)
    if len(summaries) > 1:
        print(format_table(summaries), file=stdout)
        print(file=stdout)
    try:
        files = write_report(runs, out_dir, summaries=summaries, notes=notes)
    except OSError as exc:
        print(f"gradwatch report: cannot write to {printable(out_dir)}: {exc.strerror or exc}", file=stderr)
        return 2
    if files.plots_missing:
        print(PLOT_HINT, file=stderr)
    for problem in files.problems:
        print(f"gradwatch report: warning: {printable(problem, 600)}", file=stderr)
    print(f"wrote {printable(files.html, 300)} and {len(files.pngs)} PNG plots in {printable(files.html.parent, 300)}", file=stdout)
    return 0

