"""The global-norm figure (every step, one panel per run) and the per-layer heatmaps of
``gradwatch report``. Importing this module imports matplotlib."""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gradwatch.cli._plotkit import _KIND_COLORS, _KIND_MARKERS, _colors, _figure, _positive, _save, _text
from gradwatch.cli.summary import fmt
from gradwatch.jsonl import Run
from gradwatch.records import StepRecord

__all__ = ["global_norm_figure", "layer_labels", "plot_global_norm", "plot_layer_heatmap"]


# ------------------------------------------------------------------ global norm over steps
#: Runs drawn in the global-norm figure (one panel each); more are left out, and said so.
MAX_PANELS = 24
#: Up to this many steps a panel draws every step; beyond, each of ~BLOCKS blocks of
#: consecutive steps is drawn as its median (line) and its min..max (band), so no spike
#: is lost and the figure stays readable.
MAX_RAW_STEPS = 1500
BLOCKS = 400


def _blocks(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Block centres, medians, minima and maxima of ``y`` (NaN ignored)."""
    edges = np.linspace(0, x.size, BLOCKS + 1).astype(int)
    cx, med, lo, hi = [], [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        for a, b in itertools.pairwise(edges):
            if b <= a:
                continue
            seg = y[a:b]
            cx.append(float(x[a:b].mean()))
            med.append(np.nanmedian(seg))
            lo.append(np.nanmin(seg))
            hi.append(np.nanmax(seg))
    return np.array(cx), np.array(med), np.array(lo), np.array(hi)


def global_norm_figure(runs: Sequence[Run], labels: Sequence[str]) -> tuple[Figure, str]:
    """The figure (one panel per run, shared scales) and its caption."""
    from gradwatch.cli.summary import ceiling

    shown = list(zip(runs, labels))[:MAX_PANELS]
    n = max(1, len(shown))
    ncols = 1 if n <= 4 else 2
    nrows = math.ceil(n / ncols)
    # One step axis for all panels when the runs are about as long; else each its own, so
    # a short run is not squeezed into a corner of a long one's axis.
    spans = [float(r.steps.step.max()) for r, _ in shown if len(r.steps)] or [1.0]
    share_x = max(spans) <= 2 * min(spans)
    fig = _figure(11, 1.3 + 2.0 * nrows + (0 if share_x else 0.25 * nrows))
    axes = fig.subplots(nrows, ncols, sharex=share_x, squeeze=False)
    colors = _colors(len(shown))  # index i: the same colour as run i in every plot and table
    seen: set[str] = set()  # legend entries needed
    drawn: list[list[np.ndarray]] = []  # per panel: the values its y-range must fit
    blocked = coarse = False
    for ax, (run, lab), col in zip(axes.flat, shown, colors):
        s = run.steps
        x = s.step.astype(np.float64)
        y = _positive(s.global_norm)
        ax.set_title(_text(lab), loc="left", fontsize=9.5, color=col)
        ax.grid(True, which="major", alpha=0.3)
        drawn.append([])
        if not len(s):
            ax.text(0.5, 0.5, "no steps recorded", transform=ax.transAxes, ha="center", va="center", color="0.4")
            continue
        coarse |= not s.per_step
        if x.size > MAX_RAW_STEPS:
            blocked = True
            cx, med, lo, hi = _blocks(x, y)
            ax.fill_between(cx, lo, hi, color=col, alpha=0.25, lw=0)
            ax.plot(cx, med, color=col, lw=1.4)
            drawn[-1] += [lo, hi]
        else:
            ax.plot(x, y, color=col, lw=1.1, marker="." if x.size <= 60 else None, ms=3)
            drawn[-1].append(y)
        thr = s.clip_threshold
        policy = run.header.get("options", {}).get("policy") if isinstance(run.header.get("options"), dict) else None
        if np.isfinite(thr).any() and policy != "agc":
            ax.plot(x, _positive(thr), color="0.25", lw=1.0, ls="--")
            drawn[-1].append(_positive(thr))
            seen.add("threshold")
        bad = s.nonfinite | ~np.isfinite(s.global_norm)
        if bad.any():
            ax.scatter(x[bad], np.full(int(bad.sum()), 0.96), transform=ax.get_xaxis_transform(), marker="X",
                       color="k", s=22, zorder=5, clip_on=False)
            seen.add("nonfinite")
        if s.skipped.any():
            ax.scatter(x[s.skipped], np.full(int(s.skipped.sum()), 0.88), transform=ax.get_xaxis_transform(),
                       marker="s", color=_KIND_COLORS["skipped"], s=16, zorder=5, clip_on=False)
            seen.add("skipped")
        top, at = ceiling(s.global_norm)
        if top is not None:
            ax.axhline(top, color="#d62728", ls=":", lw=1.2)
            ax.text(0.99, 0.04, f"{at}/{len(s)} steps at {fmt(top)}: clipped before gradwatch measured?",
                    transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="#d62728")
            seen.add("ceiling")
        good = np.isfinite(y)
        for ev in run.events[:2000]:
            if ev.kind in ("nonfinite", "skipped", "clipped") or not good.any():
                continue  # marked per step above, or (clipped) one event per step would bury the line
            yv = float(np.exp(np.interp(ev.step, x[good], np.log(y[good]))))
            ax.scatter([ev.step], [yv], marker=_KIND_MARKERS.get(ev.kind, "*"), color=_KIND_COLORS.get(ev.kind, "k"),
                       edgecolor="white", linewidths=0.6, s=46, zorder=6)
            seen.add(f"event:{ev.kind}")
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    share_y, cut = _norm_axes(list(axes.flat[: len(shown)]), drawn)
    is_log = any(ax.get_yscale() == "log" for ax in axes.flat[: len(shown)])
    for col_axes in axes.T:  # the lowest visible panel of each column carries the step axis
        visible = [ax for ax in col_axes if ax.get_visible()]
        if visible:
            visible[-1].xaxis.set_tick_params(labelbottom=True)
            visible[-1].set_xlabel("optimizer step")
    fig.supylabel("global gradient L2 norm")
    fig.suptitle("Global gradient norm at every step, as the optimizer received it (before gradwatch's clipping)")
    handles: list[Line2D] = []  # the runs are named by their panels
    if "threshold" in seen:
        handles.append(Line2D([], [], color="0.25", ls="--", label="gradwatch's clip threshold"))
    if "ceiling" in seen:
        handles.append(Line2D([], [], color="#d62728", ls=":", label="norm ceiling (clipped before gradwatch?)"))
    for k in sorted(x[6:] for x in seen if x.startswith("event:")):
        handles.append(Line2D([], [], ls="", marker=_KIND_MARKERS.get(k, "*"), color=_KIND_COLORS.get(k, "k"),
                              markersize=7, label=f"event: {_text(k)}"))
    if "nonfinite" in seen:
        handles.append(Line2D([], [], ls="", marker="X", color="k", markersize=7, label="NaN/Inf norm (top edge)"))
    if "skipped" in seen:
        handles.append(Line2D([], [], ls="", marker="s", color=_KIND_COLORS["skipped"], markersize=6, label="skipped step"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8.5, frameon=False)
    caption = (
        "One panel per run, "
        + ("on the same step axis" if share_x else "each over its own steps")
        + (", on the same norm scale" if share_y else ", each norm axis fitted to its run (the runs' norms differ too "
           "much for one scale: compare the tick labels)")
        + (f"; norms more than {PANEL_DECADES} decades below a run's largest are marked on the bottom edge"
           if cut else "")
        + ("; log norm axis" if is_log else "")
        + ("; every step is drawn" if not blocked else f"; runs longer than {MAX_RAW_STEPS} steps are drawn as the "
           f"median (line) and min..max (band) of {BLOCKS} blocks of consecutive steps, so no spike is lost")
        + ("; files without per-step norms show one point per log_every steps" if coarse else "")
        + ". Events are drawn on the curve at their step; NaN/Inf norms cannot be drawn and are marked on the top edge"
        + (f". Only the first {MAX_PANELS} of {len(runs)} runs are shown" if len(runs) > MAX_PANELS else "")
        + "."
    )
    return fig, caption


#: Decades of norm one panel shows at most; smaller norms (a gradient that underflowed
#: towards 1e-40) are marked on the panel's bottom edge instead of squashing the curve.
PANEL_DECADES = 20
#: Panels share one norm scale only while every run still spans at least this share of
#: it (in decades): else a run that stays near one value would be drawn as a flat line.
SHARE_FRACTION = 0.3


def _log_range(values: Sequence[np.ndarray]) -> tuple[float, float] | None:
    """log10 of the smallest and largest finite positive value drawn, or None."""
    v = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in values]) if values else np.zeros(0)
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return None
    return math.log10(float(v.min())), math.log10(float(v.max()))


def _norm_axes(axes: list, drawn: list[list[np.ndarray]]) -> tuple[bool, bool]:
    """Give each panel a y-range that fits its run: one shared scale when no run would
    be flattened by it, else one per panel; never more than PANEL_DECADES decades (what
    lies below is marked on the bottom edge). Returns (shared, anything cut)."""
    ranges = [_log_range(d) for d in drawn]
    own: list[tuple[float, float] | None] = []
    cut = False
    for r in ranges:
        if r is None:
            own.append(None)
            continue
        lo, hi = r
        if hi - lo > PANEL_DECADES:
            lo, cut = hi - PANEL_DECADES, True
        own.append((lo, hi))
    real = [r for r in own if r is not None]
    shared = False
    if real:
        u_lo, u_hi = min(r[0] for r in real), max(r[1] for r in real)
        span = u_hi - u_lo
        shared = span <= PANEL_DECADES and (span < 1 or all(r[1] - r[0] >= SHARE_FRACTION * span for r in real))
    for i, (ax, r) in enumerate(zip(axes, own)):
        if r is None:
            continue
        lo, hi = (u_lo, u_hi) if shared else r
        if hi - lo >= 1:  # a decade or more: log axis, padded by 5% of its decades
            pad = 0.05 * (hi - lo)
            ax.set_yscale("log")
            ax.set_ylim(10 ** (lo - pad), 10 ** (hi + pad))
        else:  # a narrow range: linear (log ticks over a fraction of a decade are unreadable)
            a, b = 10**lo, 10**hi
            pad = 0.08 * (b - a) if b > a else 0.05 * b
            ax.set_ylim(max(0.0, a - pad), b + pad)
        floor = 10**lo
        first = np.asarray(drawn[i][0], dtype=np.float64).reshape(-1) if drawn[i] else np.zeros(0)
        small = np.isfinite(first) & (first > 0) & (first < floor * (1 - 1e-9))
        xd = np.asarray(ax.lines[0].get_xdata(), dtype=np.float64) if ax.lines else np.zeros(0)
        if small.any() and xd.size == small.size:  # the curve's points under the panel: marked on its bottom edge
            ax.scatter(xd[small], np.full(int(small.sum()), 0.02), transform=ax.get_xaxis_transform(), marker="v",
                       color="0.35", s=14, zorder=5, clip_on=False)
            ax.text(0.99, 0.06, f"{int(small.sum())} steps below {floor:.0e} (lowest {float(first[small].min()):.1e})",
                    transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.3")
    return shared, cut


def plot_global_norm(runs: Sequence[Run], labels: Sequence[str], path: Path) -> tuple[Path, str, str]:
    fig, caption = global_norm_figure(runs, labels)
    return _save(fig, path), "Global gradient norm over training", caption


# ------------------------------------------------------------------ per-layer heatmap
#: Layers drawn in a heatmap; more are reduced to those with the largest norms.
MAX_LAYERS = 48
_RECURRENT_KINDS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN tanh", "rnn_relu": "RNN ReLU"}


def layer_labels(run: Run, layers: Sequence[str]) -> list[str]:
    """Row labels a person can find in their model: the layer's name with its type from
    the header's facts (``layer_types``, ``recurrent_layers``) when the writer recorded
    them; a layer named by an index alone (``nn.Sequential``: "0", "2") gets its
    parameters' names instead."""
    got = run.header.get("layer_types")
    types: dict[str, str] = got if isinstance(got, dict) else {}
    got = run.header.get("recurrent_layers")
    recurrent: dict[str, str] = got if isinstance(got, dict) else {}
    params: list[str] = next((list(r.param_norms) for r in run.records if r.param_norms), [])
    out = []
    for layer in layers:
        kind = types.get(layer) or _RECURRENT_KINDS.get(recurrent.get(layer, ""), recurrent.get(layer))
        lab = layer
        if kind:
            lab = f"{layer} ({kind})"
        elif re.search(r"(^|[./])\d+$", layer):
            leaves = [p[len(layer) + 1 :] for p in params if p.startswith(layer) and p[len(layer) : len(layer) + 1] in "./" and len(p) > len(layer)]
            if leaves:
                lab = f"{layer} ({', '.join(leaves[:3])}{', …' if len(leaves) > 3 else ''})"
        out.append(_text(lab, 48))
    return out


def _layer_matrix(recs: Sequence[StepRecord], limit: int) -> tuple[list[str], np.ndarray, int]:
    """The ``limit`` layers with the largest peak norm (in model order), their norms per
    record (rows = layers, columns = records) and how many layers the records name.

    Linear in records x layers and bounded in memory: one pass keeps each layer's peak
    (a dict lookup; a ``name in list`` test per name made 200,000 layers take minutes),
    ``argpartition`` picks the top ``limit``, and only those rows are built.
    """
    index: dict[str, int] = {}
    peaks: list[float] = []
    for r in recs:
        for name, v in r.layer_norms.items():
            i = index.get(name)
            if i is None:
                i = index[name] = len(peaks)
                peaks.append(-1.0)
            if v > peaks[i] and math.isfinite(v):  # NaN compares False: never a peak
                peaks[i] = v
    total = len(peaks)
    names = list(index)
    if total > limit:  # keep the largest, in model order
        keep = np.sort(np.argpartition(-np.asarray(peaks), limit - 1)[:limit])
        names = [names[i] for i in keep]
    data = np.array([[r.layer_norms.get(n, np.nan) for r in recs] for n in names], dtype=np.float64)
    return names, data.reshape(len(names), len(recs)), total


def plot_layer_heatmap(run: Run, lab: str, path: Path) -> tuple[Path, str, str] | None:
    recs = [r for r in run.records if r.layer_norms]
    if not recs:
        return None
    layers, data, total = _layer_matrix(recs, MAX_LAYERS)
    steps = np.array([r.step for r in recs], dtype=np.float64)
    if steps.size > 1 and np.any(np.diff(steps) <= 0):  # resumed files are in step order; be safe anyway
        order = np.argsort(steps, kind="stable")
        steps, data = steps[order], data[:, order]
        steps, idx = np.unique(steps, return_index=True)
        data = data[:, idx]
    nonfinite = ~np.isfinite(data)
    pos = _positive(data)
    fig = _figure(11, 1.6 + 0.42 * len(layers))
    ax = fig.add_subplot()
    # Each column spans its record's window (the steps it summarises) when known.
    firsts = {r.step: r.window.first_step for r in recs if r.window is not None}
    if steps.size > 1:
        mids = np.concatenate([[steps[0] - (steps[1] - steps[0]) / 2], (steps[:-1] + steps[1:]) / 2])
    else:
        mids = np.array([steps[0] - 0.5])
    left = np.array([firsts[int(s)] - 0.5 if int(s) in firsts else m for s, m in zip(steps, mids)])
    left = np.maximum.accumulate(np.maximum(left, np.concatenate([[-np.inf], steps[:-1] + 0.5])))
    edges = np.concatenate([left, [steps[-1] + 0.5]])
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="#e0e0e0")
    finite = pos[np.isfinite(pos)]
    if finite.size:
        vmin, vmax = float(finite.min()), float(finite.max())
        if vmax <= vmin:
            vmax = vmin * 10
        log = vmax >= 10 * vmin
        norm = LogNorm(vmin=vmin, vmax=vmax) if log else Normalize(vmin=vmin, vmax=vmax)
        mesh = ax.pcolormesh(
            edges, np.arange(len(layers) + 1), np.ma.masked_invalid(pos), cmap=cmap, norm=norm, shading="flat"
        )
        fig.colorbar(mesh, ax=ax, label="layer gradient norm" + (" (log)" if log else ""), pad=0.01)
    grey = bool((~np.isfinite(pos) & ~nonfinite).any())
    if nonfinite.any():
        yy, xx = np.nonzero(nonfinite)
        ax.scatter(steps[xx], yy + 0.5, marker="x", color="#d62728", s=18, label="NaN / Inf")
    if grey:  # explained in the figure itself, not only in the report's caption
        from matplotlib.patches import Patch

        handles = [Patch(facecolor="#e0e0e0", edgecolor="0.6", label="grey: norm exactly 0 or layer missing (no gradient)")]
    else:
        handles = []
    if nonfinite.any() or grey:
        h0, _ = ax.get_legend_handles_labels()
        fig.legend(handles=[*h0, *handles], loc="outside lower left", fontsize=8, frameon=False, ncol=2)
    ax.set_yticks(np.arange(len(layers)) + 0.5, labels=layer_labels(run, layers), fontsize=9)
    ax.set_ylim(len(layers), 0)
    ax.set_xlabel("optimizer step")
    ax.set_title(_text(f"{lab}: gradient norm per layer over training", 120))
    caption = (
        "Each row a layer (its type, or its parameters for a layer named by an index), each column a flushed "
        "record (one per log_every steps) spanning the steps of its window and coloured by its last step; colour "
        "on a log scale when the norms span a decade"
        + (", red crosses NaN/Inf" if nonfinite.any() else "")
        + (", grey cells zero or missing (a frozen layer has no gradient)" if grey else "")
        + (f"; the {MAX_LAYERS} layers with the largest norms of {total}" if total > MAX_LAYERS else "")
        + "."
    )
    return _save(fig, path), f"Per-layer gradient norms: {lab}", caption
