"""Summaries of run files: what the terminal and the report tables say about each run.

Everything here reads only what the run file holds: one record per ``log_every`` steps
(each with the window's min / mean / max global norm and its clipped / skipped /
non-finite counts, and the latest temporal profiles and spectral norms) and every event.
Percentiles of the global norm are therefore over the flushed steps, while clipped and
skipped counts cover every step.
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

from gradwatch.jsonl import Run, RunFileError, read_run

__all__ = ["RunSummary", "fmt", "format_summary", "format_table", "label", "load_runs", "summarize", "table_rows"]


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
