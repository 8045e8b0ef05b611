"""``gradwatch report``: turn run files (JSONL) into a terminal summary, PNG plots and a
self-contained ``report.html``.

Everything here reads only what the run file holds: one record per ``log_every`` steps
(each with the window's min / mean / max global norm and its clipped / skipped /
non-finite counts, and the latest temporal profiles and spectral norms) and every event.
Percentiles of the global norm are therefore over the flushed steps, while clipped and
skipped counts cover every step. matplotlib is optional and imported only to plot.
"""

from __future__ import annotations

import base64
import html
import math
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.jsonl import Run, RunFileError, read_run

__all__ = ["ReportFiles", "RunSummary", "format_summary", "format_table", "load_runs", "summarize", "write_report"]

PLOT_HINT = "gradwatch: plots need matplotlib: pip install 'gradwatch[plot]' (the summary and report.html tables are written without them)."


@dataclass
class RunSummary:
    """What the terminal summary and the HTML tables say about one run."""

    name: str
    path: Path
    backend: str
    policy: str
    steps: int
    records: int
    torn: bool
    norm_percentiles: dict[str, float]  # p5 / p50 / p95 / max over flushed steps (finite norms)
    norm_min: float  # over every step (window minima)
    norm_max: float  # over every step (window maxima)
    clipped_steps: int
    skipped_steps: int
    nonfinite_steps: int
    counted_steps: int  # steps covered by window statistics
    events_by_kind: Counter = field(default_factory=Counter)
    events_by_kind_layer: Counter = field(default_factory=Counter)
    temporal_last: dict[str, dict[str, float]] = field(default_factory=dict)
    spectral_last: dict[str, float] = field(default_factory=dict)

    @property
    def clipped_share(self) -> float:
        return self.clipped_steps / self.counted_steps if self.counted_steps else math.nan


# ----------------------------------------------------------------------------- loading
def load_runs(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Run], list[str]]:
    """Read every run file; return the runs and the warnings met (torn last lines).

    Raises :class:`RunFileError` (one clear sentence) for a file that is missing, a
    directory, empty, not JSONL, or of another schema version; ``OSError`` is turned into
    one too, so the command line needs to catch one exception type.
    """
    runs: list[Run] = []
    notes: list[str] = []
    for p in paths:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                run = read_run(p)
            except RunFileError:
                raise
            except OSError as exc:
                raise RunFileError(f"{p}: cannot be read ({exc.strerror or exc}).") from None
        notes.extend(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
        runs.append(run)
    _unique_names(runs)
    return runs, notes


def _unique_names(runs: list[Run]) -> None:
    """Give runs with the same name distinct labels (file stem, then a number)."""
    seen: Counter = Counter(r.name for r in runs)
    used: set[str] = set()
    for r in runs:
        label = r.name
        if seen[label] > 1:
            label = f"{r.name} ({r.path.stem})" if r.path.stem != r.name else r.name
        base, k = label, 2
        while label in used:
            label, k = f"{base} #{k}", k + 1
        used.add(label)
        r.label = label  # type: ignore[attr-defined]


def label(run: Run) -> str:
    return str(getattr(run, "label", run.name))


# --------------------------------------------------------------------------- summaries
def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return a[np.isfinite(a)]


def summarize(run: Run) -> RunSummary:
    records = run.records
    events = run.events
    norms = _finite([r.global_norm for r in records])
    pct = (
        {
            "p5": float(np.percentile(norms, 5)),
            "p50": float(np.percentile(norms, 50)),
            "p95": float(np.percentile(norms, 95)),
            "max": float(norms.max()),
        }
        if norms.size
        else {}
    )
    windows = [r.window for r in records if r.window is not None]
    lo = _finite([w.norm_min for w in windows]) if windows else norms
    hi = _finite([w.norm_max for w in windows]) if windows else norms
    if windows:
        counted = sum(w.steps for w in windows)
        clipped = sum(w.clipped for w in windows)
        skipped = sum(w.skipped for w in windows)
        nonfinite = sum(w.nonfinite for w in windows)
    else:  # records written without window statistics: count what is there
        counted = len(records)
        clipped = sum(1 for r in records if r.clip is not None and r.clip.scale < 1.0)
        skipped = sum(1 for r in records if r.skipped)
        nonfinite = sum(1 for r in records if r.nonfinite)
    steps = max([r.step for r in records] + [e.step for e in events] + [0])
    by_kind: Counter = Counter()
    by_kind_layer: Counter = Counter()
    for e in events:
        n = 1 + int(e.suppressed or 0)  # rate-limited repeats are counted, not lost
        by_kind[e.kind] += n
        by_kind_layer[(e.kind, e.layer or "(global)")] += n
    for held in run.suppressed:  # repeats held back after the last alert written
        by_kind[held["kind"]] += int(held["count"])
        by_kind_layer[(held["kind"], held["layer"] or "(global)")] += int(held["count"])
    temporal: dict[str, dict[str, float]] = {}
    spectral: dict[str, float] = {}
    for r in records:
        for layer, prof in r.temporal.items():
            temporal[layer] = {
                "gain": prof.gain,
                "horizon": float(prof.horizon),
                "length": float(prof.length),
                "earliest_over_peak": prof.earliest_over_peak,
                "step": float(r.step),
            }
        spectral.update(r.spectral)
    policy = run.header.get("options", {}).get("policy") if isinstance(run.header.get("options"), dict) else None
    return RunSummary(
        name=label(run),
        path=run.path,
        backend=str(run.header.get("backend", "?")),
        policy=str(policy) if policy is not None else "none",
        steps=steps,
        records=len(records),
        torn=run.torn,
        norm_percentiles=pct,
        norm_min=float(lo.min()) if lo.size else math.nan,
        norm_max=float(hi.max()) if hi.size else math.nan,
        clipped_steps=clipped,
        skipped_steps=skipped,
        nonfinite_steps=nonfinite,
        counted_steps=counted,
        events_by_kind=by_kind,
        events_by_kind_layer=by_kind_layer,
        temporal_last=temporal,
        spectral_last=spectral,
    )


def fmt(v: float) -> str:
    """Short number: 3 significant digits, scientific when tiny or huge, 'nan'/'inf' kept."""
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v == 0:
        return "0"
    a = abs(v)
    return f"{v:.3g}" if 1e-3 <= a < 1e4 else f"{v:.2e}"


def _pct(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{100 * v:.1f}%"


def format_summary(s: RunSummary) -> str:
    """The multi-line terminal summary of one run."""
    lines = [f"run {s.name}  ({s.path})" + ("  [torn last line ignored]" if s.torn else "")]
    lines.append(f"  backend {s.backend}, policy {s.policy}; {s.steps} steps, {s.records} records")
    if s.norm_percentiles:
        p = s.norm_percentiles
        lines.append(
            f"  global norm: p5 {fmt(p['p5'])}  median {fmt(p['p50'])}  p95 {fmt(p['p95'])}  "
            f"(flushed steps); min {fmt(s.norm_min)}  max {fmt(s.norm_max)} (every step)"
        )
    else:
        lines.append("  global norm: no finite value recorded")
    lines.append(
        f"  clipped {s.clipped_steps}/{s.counted_steps} steps ({_pct(s.clipped_share)}), skipped {s.skipped_steps}, "
        f"non-finite {s.nonfinite_steps}"
    )
    if s.events_by_kind:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(s.events_by_kind.items()))
        lines.append(f"  events: {kinds}")
        for (kind, layer), n in sorted(s.events_by_kind_layer.items()):
            lines.append(f"    {kind:<10} {layer:<28} {n}")
    else:
        lines.append("  events: none")
    for layer, t in s.temporal_last.items():
        lines.append(
            f"  {layer}: last profile (step {int(t['step'])}): gain {fmt(t['gain'])}/timestep, horizon "
            f"{int(t['horizon'])}/{int(t['length'])}, earliest/peak {fmt(t['earliest_over_peak'])}"
        )
    return "\n".join(lines)


def table_rows(
    summaries: Sequence[RunSummary], extra: Mapping[str, Mapping[str, str]] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (one row per run and recurrent layer)."""
    extra = extra or {}
    extra_cols: list[str] = []
    for cols in extra.values():
        for c in cols:
            if c not in extra_cols:
                extra_cols.append(c)
    head = [
        "run",
        *extra_cols,
        "layer",
        "gain",
        "horizon",
        "earliest/peak",
        "events",
        "clipped",
        "norm p50",
        "norm max",
    ]
    rows: list[list[str]] = []
    for s in summaries:
        events = ", ".join(f"{k} {n}" for k, n in sorted(s.events_by_kind.items())) or "none"
        layers: list[tuple[str, dict[str, float] | None]] = list(s.temporal_last.items()) or [("-", None)]
        for layer, t in layers:
            rows.append(
                [
                    s.name,
                    *[str(extra.get(s.name, {}).get(c, "")) for c in extra_cols],
                    layer,
                    fmt(t["gain"]) if t else "-",
                    f"{int(t['horizon'])}/{int(t['length'])}" if t else "-",
                    fmt(t["earliest_over_peak"]) if t else "-",
                    events,
                    _pct(s.clipped_share),
                    fmt(s.norm_percentiles.get("p50", math.nan)),
                    fmt(s.norm_max),
                ]
            )
    return head, rows


def format_table(summaries: Sequence[RunSummary], extra: Mapping[str, Mapping[str, str]] | None = None) -> str:
    head, rows = table_rows(summaries, extra)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in out)


# -------------------------------------------------------------------------------- HTML
@dataclass
class ReportFiles:
    html: Path
    pngs: list[Path]
    plots_missing: bool  # True when matplotlib is not installed


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1.2em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.note{color:#666;font-size:.9em}.warn{color:#a40}code{background:#f5f5f5;padding:0 .2em}
"""

#: Events listed per run in the HTML (the rest are counted in the summary).
MAX_EVENTS_HTML = 200


def _table_html(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    e = html.escape
    out = ["<table><thead><tr>", *(f"<th>{e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
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
    return _table_html(["step", "kind", "severity", "layer", "value", "message"], rows) + more


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
    missing = False
    try:
        from gradwatch import _plots
    except ImportError:
        missing = True
    else:
        plots = _plots.plot_all(runs, out, [label(r) for r in runs])
    e = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        intro_html,
    ]
    for n in notes:
        parts.append(f"<p class='warn'>{e(n)}</p>")
    head, rows = table_rows(summaries, extra)
    parts.append("<h2>Summary</h2>")
    parts.append(
        "<p class='note'>gain: fitted factor by which the gradient reaching the layer's input changes per timestep "
        "going back in time (below 1: vanishing, above 1: exploding); horizon: timesteps back from the peak until "
        "the gradient falls below 1/1000 of it; earliest/peak: the first timestep's gradient over the largest "
        "(last profile of the run). clipped: share of all steps the policy scaled down.</p>"
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
            f"{s.clipped_steps} ({_pct(s.clipped_share)})",
            str(s.skipped_steps),
            str(s.nonfinite_steps),
            str(s.path),
        ]
        for s in summaries
    ]
    parts.append(
        _table_html(
            [
                "run",
                "backend",
                "policy",
                "steps",
                "norm p5",
                "p50",
                "p95",
                "max",
                "clipped steps",
                "skipped",
                "non-finite steps",
                "file",
            ],
            detail_rows,
        )
    )
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
    return ReportFiles(html_path, [p for p, _, _ in plots], missing)


def run_report(paths: Sequence[str], out_dir: str, stdout: Any, stderr: Any) -> int:
    """``gradwatch report``: exit status 0, or 2 for a file it cannot read."""
    try:
        runs, notes = load_runs(paths)
    except RunFileError as exc:
        print(f"gradwatch report: {exc}", file=stderr)
        return 2
    for n in notes:
        print(f"gradwatch report: warning: {n} Reporting everything before it.", file=stderr)
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
        print(f"gradwatch report: cannot write to {out_dir}: {exc.strerror or exc}", file=stderr)
        return 2
    if files.plots_missing:
        print(PLOT_HINT, file=stderr)
    print(f"wrote {files.html} and {len(files.pngs)} PNG plots in {files.html.parent}", file=stdout)
    return 0
