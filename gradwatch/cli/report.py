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


# Wide tables scroll inside their own box instead of pushing the page wider than its
# column; numbers never break across lines (1.2e-05 must not become "1.2e-" / "05");
# long messages and paths wrap.
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #ddd}
.tbl{overflow-x:auto;max-width:100%;margin:.6em 0}
table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3;white-space:nowrap}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.name{white-space:nowrap}td.text{min-width:24em;overflow-wrap:anywhere}td.path{overflow-wrap:anywhere;min-width:12em}
figure{margin:1.2em 0}img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.note{color:#666;font-size:.9em}.warn{color:#a40}code{background:#f5f5f5;padding:0 .2em}
"""

#: Events listed per run in the HTML (the rest are counted in the summary).
MAX_EVENTS_HTML = 200
#: Longest event message shown in the HTML (the run file has it whole).
MAX_MESSAGE_HTML = 2000

_NUMBER = re.compile(r"[-+]?(\d[\d,]*(\.\d+)?(e[-+]?\d+)?%?|\.\d+|nan|inf|-inf|-)( \(\d+(\.\d+)?%\))?|\d+/\d+", re.IGNORECASE)


def _cell(text: str, kind: str | None = None) -> str:
    """One table cell: printable, escaped, classed (numbers never wrap)."""
    t = printable(text, MAX_MESSAGE_HTML)
    if kind is None:
        kind = "num" if _NUMBER.fullmatch(t.strip()) else ("text" if len(t) > 60 else "name")
    return f"<td class='{kind}'>{html.escape(t)}</td>"


def _table_html(head: Sequence[str], rows: Sequence[Sequence[str]], kinds: Mapping[str, str] | None = None) -> str:
    e = html.escape
    kinds = kinds or {}
    out = ["<div class='tbl'><table><thead><tr>", *(f"<th>{e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(_cell(str(c), kinds.get(h)) for h, c in zip(head, r)) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _events_html(run: Run) -> str:
    events = run.events
    if not events:
        return "<p class='note'>No events.</p>"
    rows = [
        [
            str(ev.step),
            ev.kind,
            ev.level_name,
            ev.layer or "",
            fmt(ev.value) if ev.value is not None else "",
            ev.message,
        ]
        for ev in events[:MAX_EVENTS_HTML]
    ]
    more = (
        f"<p class='note'>{len(events) - MAX_EVENTS_HTML} more events are in the run file.</p>"
        if len(events) > MAX_EVENTS_HTML
        else ""
    )
    return _table_html(["step", "kind", "severity", "layer", "value", "message"], rows, {"message": "text"}) + more


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
    parts.append(
        "<p class='note'>gain: fitted factor by which the gradient reaching the layer's input changes per timestep "
        "going back in time (below 1: vanishing, above 1: exploding); horizon: timesteps back from the peak until "
        "the gradient falls below 1/1000 of it; earliest/peak: the first timestep's gradient over the largest "
        "(last profile of the run). clipped: share of all steps gradwatch's own policy scaled down (clipping done "
        "before optimizer.step() by your code, e.g. clip_grad_norm_, is not counted: gradwatch measures after it).</p>"
    )
    parts.append(_table_html(head, rows))
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
            parts.append(
                f"<figure><img alt='{e(heading)}' src='data:image/png;base64,{data}'>"
                f"<figcaption><b>{e(heading)}.</b> {e(caption)} <span class='note'>({e(path.name)})</span>"
                "</figcaption></figure>"
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
        parts.append(_table_html(["run", "kind", "layer", "count"], kind_rows))
    for r in runs:
        parts.append(f"<h3>{e(label(r))}</h3>")
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

