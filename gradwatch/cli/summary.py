"""Summaries of run files: what the terminal and the report tables say about each run.

Everything here reads only what the run file holds: every step's global norm, clip
decision, skipped and non-finite flags (the ``"norms"`` lines), one record per
``log_every`` steps (per-layer norms, the latest temporal profiles and spectral norms),
and every event. Files written before the per-step lines existed have the flushed records
only: percentiles are then over those, and the summary says so.

Every string that came from the file (run, layer and event names) goes through
:func:`gradwatch.formatting.printable` before it reaches the terminal.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradwatch.formatting import CEILING_RTOL, printable
from gradwatch.jsonl import Run, RunFileError, read_run

__all__ = ["RunSummary", "fmt", "format_summary", "format_table", "label", "load_runs", "summarize", "table_rows"]

#: Run i's colour in every plot and in the report's tables (matplotlib's tab10, written
#: out so the HTML needs no matplotlib).
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def run_color(i: int) -> str:
    """The colour of the i-th run of a report (or demo), the same in every figure and table."""
    return RUN_COLORS[i % len(RUN_COLORS)]


#: Largest run file ``gradwatch report`` reads. Reading costs about 6x the file's size in
#: memory and ~0.1 s per MB (200,000 layers x 4 records: 57 MB, 6 s, 330 MB); beyond
#: this a report would take minutes and gigabytes, so it is refused in one line instead.
MAX_REPORT_BYTES = 512 * 2**20


@dataclass
class RunSummary:
    """What the terminal summary and the HTML tables say about one run. Names are
    printable (control characters escaped, long names cut)."""

    name: str
    path: Path
    backend: str
    policy: str
    steps: int
    records: int
    torn: bool
    norm_percentiles: dict[str, float]  # p5 / p50 / p95 / max (finite norms)
    norm_min: float
    norm_max: float
    clipped_steps: int  # steps gradwatch's own policy scaled down
    skipped_steps: int
    nonfinite_steps: int
    counted_steps: int  # steps the counts cover
    per_step: bool = True  # False: the file has flushed records only (one per log_every steps)
    events_by_kind: Counter = field(default_factory=Counter)
    events_by_kind_layer: Counter = field(default_factory=Counter)
    temporal_last: dict[str, dict[str, float]] = field(default_factory=dict)
    spectral_last: dict[str, float] = field(default_factory=dict)
    #: The value the global norm sits at on many steps (see :func:`ceiling`), if any.
    ceiling: float | None = None
    ceiling_steps: int = 0
    resumed_at: list[int] = field(default_factory=list)
    dropped: int = 0
    closed: bool = True  # the file ends with the summary line close() writes
    log_every: int | None = None

    @property
    def clipped_share(self) -> float:
        return self.clipped_steps / self.counted_steps if self.counted_steps else math.nan

    @property
    def has_policy(self) -> bool:
        return self.policy != "none"

    @property
    def notes(self) -> list[str]:
        """Sentences a person needs to read the numbers right."""
        out = []
        if self.ceiling is not None:
            out.append(
                f"The global norm sits at {fmt(self.ceiling)} on {self.ceiling_steps} of {self.counted_steps} steps: the "
                f"gradients were probably clipped before gradwatch measured them (e.g. clip_grad_norm_(..., "
                f"max_norm={fmt(self.ceiling)}) before optimizer.step()). gradwatch sees what the optimizer receives, "
                f"after such clipping, and 'clipped' counts only its own policy; to see the norms before it, let "
                f"gradwatch clip instead (policy='fixed', max_norm={fmt(self.ceiling)})."
            )
        if self.resumed_at:
            at = ", ".join(str(s) for s in self.resumed_at)
            n = self.dropped
            dropped = (
                f"; {n} record{'s' if n > 1 else ''} or event{'s' if n > 1 else ''} that an earlier process wrote after "
                f"that checkpoint {'are' if n > 1 else 'is'} left out (still in the file)"
                if n
                else ""
            )
            out.append(f"Resumed from a checkpoint at step {at}{dropped}.")
        if not self.closed:
            lost = f" (up to {self.log_every - 1} steps after step {self.steps})" if self.log_every and self.log_every > 1 else ""
            out.append(
                f"No closing line: the run is still being written, or its process was killed before gradwatch could "
                f"write its last steps{lost}; a SIGTERM that Python does not handle ends it so (see the README)."
            )
        if not self.per_step:
            out.append(
                "This file has no per-step norms (written by an older gradwatch): percentiles and plots use the "
                "flushed records only, one per log_every steps."
            )
        return out


# ----------------------------------------------------------------------------- loading
def load_runs(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Run], list[str]]:
    """Read every run file; return the runs and the warnings met (torn last lines).

    Raises :class:`RunFileError` (one clear sentence) for a file that is missing, a
    directory, empty, not JSONL, malformed, or of another schema version.
    """
    runs: list[Run] = []
    notes: list[str] = []
    for p in paths:
        _check_size(p)
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


def _check_size(p: str | os.PathLike[str]) -> None:
    """Refuse a regular file larger than :data:`MAX_REPORT_BYTES` before reading it."""
    try:
        st = os.stat(p)
    except OSError:
        return  # read_run says what is wrong with it
    import stat

    if stat.S_ISREG(st.st_mode) and st.st_size > MAX_REPORT_BYTES:
        raise RunFileError(
            f"{printable(p, 200)}: {st.st_size / 2**20:,.0f} MiB is more than a report reads "
            f"({MAX_REPORT_BYTES / 2**20:,.0f} MiB); read it in Python with gradwatch.read_jsonl(path), which streams, "
            f"or write fewer records (a larger log_every)."
        )


def _unique_names(runs: list[Run]) -> None:
    """Give runs printable labels, distinct even when names repeat (file stem, then a number)."""
    names = [printable(r.name, 60) for r in runs]
    seen: Counter = Counter(names)
    used: set[str] = set()
    for r, name in zip(runs, names):
        stem = printable(r.path.stem, 60)
        lab = f"{name} ({stem})" if seen[name] > 1 and stem != name else name
        base, k = lab, 2
        while lab in used:
            lab, k = f"{base} #{k}", k + 1
        used.add(lab)
        r.label = lab  # type: ignore[attr-defined]


def label(run: Run) -> str:
    """The printable label of a run loaded with :func:`load_runs`."""
    return str(getattr(run, "label", None) or printable(run.name, 60))


# --------------------------------------------------------------------------- summaries
def ceiling(norms: np.ndarray) -> tuple[float | None, int]:
    """The value the finite norms sit at on many steps, and on how many.

    A clipped gradient's norm is the clipping threshold (``clip_grad_norm_`` leaves it at
    max_norm·n/(n+1e-6), within 1e-6 of it), while unclipped norms almost never repeat to
    four digits. So: at least 5 steps, and a fifth of them, within CEILING_RTOL of the
    largest norm.
    """
    v = norms[np.isfinite(norms) & (norms > 0)]
    if v.size < 5:
        return None, 0
    top = float(v.max())
    at = int(np.count_nonzero(v >= top * (1 - CEILING_RTOL)))
    if at >= 5 and at >= 0.2 * v.size:
        return top, at
    return None, 0


def summarize(run: Run) -> RunSummary:
    records = run.records
    events = run.events
    series = run.steps
    values = series.global_norm
    norms = values[np.isfinite(values)]
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
    if series.per_step or not windows:
        lo, hi = norms, norms
        counted = len(series)
        clipped = int(np.count_nonzero(series.clipped))
        skipped = int(np.count_nonzero(series.skipped))
        nonfinite = int(np.count_nonzero(series.nonfinite))
    else:  # an older file: the windows of the flushed records count every step
        lo = np.array([w.norm_min for w in windows])
        hi = np.array([w.norm_max for w in windows])
        lo, hi = lo[np.isfinite(lo)], hi[np.isfinite(hi)]
        counted = sum(w.steps for w in windows)
        clipped = sum(w.clipped for w in windows)
        skipped = sum(w.skipped for w in windows)
        nonfinite = sum(w.nonfinite for w in windows)
    steps = max([int(series.step.max()) if len(series) else 0] + [r.step for r in records] + [e.step for e in events])
    by_kind: Counter = Counter()
    by_kind_layer: Counter = Counter()
    for e in events:
        n = 1 + int(e.suppressed or 0)  # rate-limited repeats are counted, not lost
        by_kind[printable(e.kind, 30)] += n
        by_kind_layer[(printable(e.kind, 30), printable(e.layer or "(global)", 60))] += n
    for held in run.suppressed:  # repeats held back after the last alert written
        by_kind[printable(held["kind"], 30)] += int(held["count"])
        by_kind_layer[(printable(held["kind"], 30), printable(held["layer"] or "(global)", 60))] += int(held["count"])
    temporal: dict[str, dict[str, float]] = {}
    spectral: dict[str, float] = {}
    nan = math.nan
    for r in records:
        for layer, prof in r.temporal.items():
            t = temporal.setdefault(
                printable(layer, 60),
                {"gain": nan, "horizon": nan, "length": nan, "peak": nan, "step": nan, "earliest_over_peak": nan},
            )
            if prof.norms:  # sensitivity: the latest input-gradient profile
                t["earliest_over_peak"] = prof.earliest_over_peak
            if prof.recurrences and prof.horizon is not None:  # propagation: the latest measured one
                t.update(gain=prof.gain, horizon=float(prof.horizon), length=float(len(prof.propagation)), peak=_peak_gain(prof), step=float(r.step))
        spectral.update({printable(k, 80): v for k, v in r.spectral.items()})
    options = run.header.get("options")
    policy = options.get("policy") if isinstance(options, dict) else None
    top, at_top = ceiling(values if series.per_step else np.array([r.global_norm for r in records]))
    return RunSummary(
        name=label(run),
        path=run.path,
        backend=printable(run.header.get("backend") or "?", 30),
        policy=printable(policy, 60) if policy is not None else "none",
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
        per_step=series.per_step,
        events_by_kind=by_kind,
        events_by_kind_layer=by_kind_layer,
        temporal_last=temporal,
        spectral_last=spectral,
        ceiling=top,
        ceiling_steps=at_top,
        resumed_at=list(run.resumed_at),
        dropped=run.dropped,
        closed=run.summary is not None,
        log_every=options.get("log_every") if isinstance(options, dict) else None,
    )


def _peak_gain(prof: object) -> float:
    """The largest gain of a profile's recurrences: ``max_gains`` (largest singular value,
    what exploding is judged on) where the records carry it, else the RMS ``gains``."""
    vals: list[float] = []
    for p in getattr(prof, "recurrences", {}).values():
        vals += [g for g in (getattr(p, "max_gains", ()) or getattr(p, "gains", ())) if math.isfinite(g)]
    if not vals:
        vals = [g for g in getattr(prof, "propagation", ()) if math.isfinite(g)]
    return max(vals) if vals else math.nan


def fmt(v: float | None) -> str:
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


def clipped_text(s: RunSummary) -> str:
    """'12/100 steps (12.0%) by 'zclip'', or 'no policy' when gradwatch clipped nothing."""
    if not s.has_policy:
        return "none (no policy: gradwatch only observed)"
    return f"{s.clipped_steps}/{s.counted_steps} steps ({_pct(s.clipped_share)}) by policy {s.policy!r}"


def format_summary(s: RunSummary) -> str:
    """The multi-line terminal summary of one run (printable: safe on any terminal)."""
    lines = [f"run {s.name}  ({printable(s.path, 160)})" + ("  [torn last line ignored]" if s.torn else "")]
    lines.append(f"  backend {s.backend}, policy {s.policy}; {s.steps} steps, {s.records} records")
    where = "every step" if s.per_step else "flushed steps only"
    if s.norm_percentiles:
        p = s.norm_percentiles
        lines.append(
            f"  global norm ({where}): p5 {fmt(p['p5'])}  median {fmt(p['p50'])}  p95 {fmt(p['p95'])}  "
            f"min {fmt(s.norm_min)}  max {fmt(s.norm_max)}"
        )
    else:
        lines.append("  global norm: no finite value recorded")
    lines.append(f"  clipped by gradwatch: {clipped_text(s)}; skipped {s.skipped_steps}, non-finite {s.nonfinite_steps}")
    if s.events_by_kind:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(s.events_by_kind.items()))
        lines.append(f"  events: {kinds}")
        for (kind, layer), n in sorted(s.events_by_kind_layer.items()):
            lines.append(f"    {kind:<10} {layer:<28} {n}")
    else:
        lines.append("  events: none")
    for layer, t in s.temporal_last.items():
        if math.isfinite(t["step"]):
            lines.append(
                f"  {layer}: through time (step {int(t['step'])}): {fmt(t['gain'])}/step, horizon "
                f"{int(t['horizon'])}/{int(t['length'])} steps, largest gain {fmt(t['peak'])}; {_sensitivity_text(t)}"
            )
        else:
            lines.append(f"  {layer}: propagation not measured; {_sensitivity_text(t)}")
    for note in s.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _sensitivity_text(t: Mapping[str, float]) -> str:
    """x_1 over the peak of the last sensitivity profile, or what a NaN there means: no
    gradient reached the layer's input at any timestep (0 / 0; dead units, a detached input)."""
    v = t["earliest_over_peak"]
    return f"input sensitivity x_1/peak {fmt(v)}" if math.isfinite(v) else "input sensitivity 0 at every timestep"


def _x1_cell(t: Mapping[str, float] | None) -> str:
    """The table's x_1/peak: '-' where nothing was measured or no gradient reached the input."""
    return fmt(t["earliest_over_peak"]) if t and math.isfinite(t["earliest_over_peak"]) else "-"


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
        "rate/step",
        "horizon",
        "x_1/peak",
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
                    fmt(t["gain"]) if t and math.isfinite(t["gain"]) else "-",
                    f"{int(t['horizon'])}/{int(t['length'])}" if t and math.isfinite(t["step"]) else "-",
                    _x1_cell(t),
                    events,
                    _pct(s.clipped_share) if s.has_policy else "no policy",
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
