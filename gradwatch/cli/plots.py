"""PNG plots of run files for ``gradwatch report`` (matplotlib, Agg canvas, no pyplot).

Importing this module imports matplotlib: :mod:`gradwatch.cli.report` imports it lazily and
goes on without plots when matplotlib is missing. No pyplot: figures are built on the Agg
canvas directly, so nothing global (the user's backend, open windows) is touched.

Non-finite numbers never reach matplotlib's log axes: NaN/Inf norms are masked and shown
as markers on the top edge; exact zeros (float underflow of a vanished gradient) are
masked on log axes and said so in the caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gradwatch.jsonl import Run

__all__ = ["plot_all"]

DPI = 110
_KIND_MARKERS = {"exploding": "^", "vanishing": "v", "nonfinite": "X", "skipped": "s", "clipped": "o"}
_KIND_COLORS = {
    "exploding": "#d62728",
    "vanishing": "#1f77b4",
    "nonfinite": "#000000",
    "skipped": "#9467bd",
    "clipped": "#7f7f7f",
}
_STYLES = ["-", "--", ":", "-."]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _positive(a: object) -> np.ndarray:
    """Values usable on a log axis; everything else (<= 0, NaN, Inf) becomes NaN."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def _scale_y(ax, values: object = None) -> bool:
    """Log scale when the drawn values span at least a decade, linear otherwise (a log axis
    over a narrow range only produces unreadable tick labels). Returns True for log."""
    if values is None:
        values = np.concatenate([np.asarray(ln.get_ydata(), dtype=np.float64) for ln in ax.lines] or [np.zeros(0)])
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size and float(v.max()) >= 10 * float(v.min()):
        ax.set_yscale("log")
        return True
    return False


def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)[:60] or "run"


# ------------------------------------------------------------------ global norm over steps
def plot_global_norm(runs: Sequence[Run], labels: Sequence[str], path: Path) -> tuple[Path, str, str]:
    fig = _figure(11, 5.2)
    ax = fig.add_subplot()
    colors = _colors(len(runs))
    any_nonfinite = any_thr = False
    kinds_seen: set[str] = set()
    for run, lab, col in zip(runs, labels, colors):
        recs = run.records
        if not recs:
            continue
        steps = np.array([r.step for r in recs], dtype=np.float64)
        norm = np.array([r.global_norm for r in recs], dtype=np.float64)
        ax.plot(steps, _positive(norm), color=col, lw=1.6, label=lab)
        if any(r.window is not None for r in recs):
            lo = np.array([r.window.norm_min if r.window else np.nan for r in recs])
            hi = np.array([r.window.norm_max if r.window else np.nan for r in recs])
            lo, hi = _positive(lo), _positive(hi)
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax.fill_between(steps, lo, hi, where=ok, color=col, alpha=0.18, lw=0)
        thr = np.array([r.clip.threshold if r.clip is not None else np.nan for r in recs])
        if np.isfinite(thr).any() and all(r.clip is None or r.clip.policy != "agc" for r in recs):
            ax.plot(steps, _positive(thr), color=col, lw=1.1, ls="--", alpha=0.9)
            any_thr = True
        bad = ~np.isfinite(norm) | np.array(
            [bool(r.nonfinite) or (r.window is not None and r.window.nonfinite > 0) for r in recs]
        )
        if bad.any():
            any_nonfinite = True
            ax.scatter(
                steps[bad],
                np.full(int(bad.sum()), 0.97),
                transform=ax.get_xaxis_transform(),
                marker="X",
                color=col,
                s=28,
                zorder=5,
                clip_on=False,
            )
        # Events sit on the run's curve (a vanishing event's value is a ratio, not a norm).
        good = np.isfinite(_positive(norm))
        for ev in run.events:
            kinds_seen.add(ev.kind)
            if ev.kind == "nonfinite" or not good.any():
                ax.scatter(
                    [ev.step],
                    [0.93],
                    transform=ax.get_xaxis_transform(),
                    marker=_KIND_MARKERS.get(ev.kind, "*"),
                    color=_KIND_COLORS.get(ev.kind, "k"),
                    edgecolor=col,
                    s=50,
                    zorder=6,
                    clip_on=False,
                )
                continue
            y = float(np.exp(np.interp(ev.step, steps[good], np.log(norm[good]))))
            ax.scatter(
                [ev.step],
                [y],
                marker=_KIND_MARKERS.get(ev.kind, "*"),
                color=_KIND_COLORS.get(ev.kind, "k"),
                edgecolor=col,
                linewidths=1.2,
                s=55,
                zorder=6,
            )
    drawn = [np.asarray(ln.get_ydata(), dtype=np.float64) for ln in ax.lines]
    for run in runs:
        for r in run.records:
            if r.window is not None:
                drawn.append(np.array([r.window.norm_min, r.window.norm_max]))
    is_log = _scale_y(ax, np.concatenate(drawn) if drawn else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("global gradient L2 norm (before clipping)")
    ax.set_title("Global gradient norm: line = flushed step, band = min..max of each window")
    ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=c, lw=2, label=lab) for lab, c in zip(labels, colors)]
    if any_thr:
        handles.append(Line2D([], [], color="0.3", ls="--", label="clip threshold"))
    for k in sorted(kinds_seen):
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker=_KIND_MARKERS.get(k, "*"),
                color=_KIND_COLORS.get(k, "k"),
                markersize=8,
                label=f"event: {k}",
            )
        )
    if any_nonfinite:
        handles.append(Line2D([], [], ls="", marker="X", color="0.2", markersize=8, label="non-finite norm (top edge)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    any_zero = any(r.global_norm == 0 for run in runs for r in run.records)
    caption = (
        ("Log scale. " if is_log else "")
        + "Events are drawn on their run's curve at their step"
        + ("; non-finite norms cannot be drawn and are marked on the top edge" if any_nonfinite else "")
        + ("; exact zeros (a gradient that underflowed) leave gaps" if any_zero and is_log else "")
        + "."
    )
    return _save(fig, path), "Global gradient norm over training", caption


# ------------------------------------------------------------------ per-layer heatmap
def plot_layer_heatmap(run: Run, lab: str, path: Path) -> tuple[Path, str, str] | None:
    recs = [r for r in run.records if r.layer_norms]
    if not recs:
        return None
    layers: list[str] = []
    for r in recs:
        for name in r.layer_norms:
            if name not in layers:
                layers.append(name)
    steps = np.array([r.step for r in recs], dtype=np.float64)
    data = np.array([[r.layer_norms.get(n, np.nan) for r in recs] for n in layers], dtype=np.float64)
    nonfinite = ~np.isfinite(data)
    pos = _positive(data)
    fig = _figure(11, 1.6 + 0.42 * len(layers))
    ax = fig.add_subplot()
    if steps.size > 1:
        edges = np.concatenate(
            [
                [steps[0] - (steps[1] - steps[0]) / 2],
                (steps[:-1] + steps[1:]) / 2,
                [steps[-1] + (steps[-1] - steps[-2]) / 2],
            ]
        )
    else:
        edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
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
    if nonfinite.any():
        yy, xx = np.nonzero(nonfinite)
        ax.scatter(steps[xx], yy + 0.5, marker="x", color="#d62728", s=18, label="NaN / Inf")
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.25 if len(layers) < 4 else -0.12), fontsize=8, frameon=False)
    ax.set_yticks(np.arange(len(layers)) + 0.5, labels=layers, fontsize=9)
    ax.set_ylim(len(layers), 0)
    ax.set_xlabel("optimizer step")
    ax.set_title(f"{lab}: gradient norm per layer over training")
    caption = (
        "Each row a layer, each column a flushed step; colour on a log scale when the norms span a decade"
        + (", red crosses NaN/Inf" if nonfinite.any() else "")
        + (", grey cells zero or missing" if (~np.isfinite(pos) & ~nonfinite).any() else "")
        + "."
    )
    return _save(fig, path), f"Per-layer gradient norms: {lab}", caption


# ------------------------------------------------------------------ temporal profiles
def _profile_points(run: Run, layer: str, k: int = 5) -> list[tuple[int, np.ndarray]]:
    prof = [(r.step, np.asarray(r.temporal[layer].norms, dtype=np.float64)) for r in run.records if layer in r.temporal]
    # Flushed records repeat the latest profile when none was taken in the window: dedupe.
    uniq: list[tuple[int, np.ndarray]] = []
    for s, a in prof:
        if not uniq or a.shape != uniq[-1][1].shape or not np.array_equal(a, uniq[-1][1], equal_nan=True):
            uniq.append((s, a))
    if len(uniq) <= k:
        return uniq
    idx = sorted(set(np.linspace(0, len(uniq) - 1, k).round().astype(int).tolist()))
    return [uniq[i] for i in idx]


def _recurrent_layers(run: Run) -> list[str]:
    out: list[str] = []
    for r in run.records:
        for name in r.temporal:
            if name not in out:
                out.append(name)
    return out


def plot_temporal(run: Run, lab: str, path: Path) -> tuple[Path, str, str] | None:
    layers = _recurrent_layers(run)
    if not layers:
        return None
    fig = _figure(11, 0.6 + 3.6 * len(layers))
    axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    zeros = nonfinite = False
    for ax, layer in zip(axes, layers):
        points = _profile_points(run, layer)
        for i, (step, norms) in enumerate(points):
            col = cmap(0.85 * i / max(1, len(points) - 1))
            zeros |= bool((norms == 0).any())
            nf = ~np.isfinite(norms)
            nonfinite |= bool(nf.any())
            t = np.arange(1, norms.size + 1)
            y = _positive(norms)
            note = " (all NaN/Inf)" if nf.all() else (" (some NaN/Inf)" if nf.any() else "")
            ax.plot(t, y, color=col, lw=1.6, label=f"step {step}{note}")
        _scale_y(ax)
        if not np.isfinite(
            [np.nanmax(_positive(a)) if np.isfinite(_positive(a)).any() else np.nan for _, a in points]
        ).any():
            ax.text(0.5, 0.5, "no finite, positive gradient to draw", transform=ax.transAxes, ha="center", va="center")
        ax.set_xlabel("input timestep t (the loss is at the last timestep)")
        ax.set_ylabel("‖∂L/∂x_t‖")
        ax.set_title(f"{lab}: gradient reaching each input timestep of {layer!r}")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(title="training step", fontsize=8, title_fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    caption = (
        "At several points of training (early = dark blue, late = yellow); log scale where the norms span a decade."
    )
    if zeros:
        caption += " Exact zeros (the gradient underflowed float32: vanished completely) cannot be drawn on a log axis and are left out."
    if nonfinite:
        caption += " NaN/Inf values are left out."
    return _save(fig, path), f"Per-timestep gradient profiles: {lab}", caption


def plot_temporal_compare(runs: Sequence[Run], labels: Sequence[str], path: Path) -> tuple[Path, str, str] | None:
    lines = []
    for run, lab in zip(runs, labels):
        for layer in _recurrent_layers(run):
            last = [r for r in run.records if layer in r.temporal]
            norms = np.asarray(last[-1].temporal[layer].norms, dtype=np.float64)
            lines.append((f"{lab}: {layer}" if len(_recurrent_layers(run)) > 1 else lab, last[-1].step, norms))
    if not lines:
        return None
    fig = _figure(11, 5)
    ax = fig.add_subplot()
    colors = _colors(len(lines))
    zeros = False
    for (lab, step, norms), col in zip(lines, colors):
        pos = _positive(norms)
        peak = np.nanmax(pos) if np.isfinite(pos).any() else np.nan
        zeros |= bool((norms == 0).any())
        ax.plot(np.arange(1, norms.size + 1), pos / peak, color=col, lw=1.8, label=f"{lab} (step {step})")
    ax.axhline(1e-3, color="0.3", ls=":", lw=1.2, label="1/1000 of peak (vanishing below)")
    ax.set_yscale("log")  # always: the 1/1000 line is the point of this plot
    ax.set_xlabel("input timestep t (the loss is at the last timestep)")
    ax.set_ylabel("‖∂L/∂x_t‖ / peak")
    ax.set_title("Last per-timestep profile of each run, relative to its peak")
    ax.grid(True, which="major", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9)
    caption = "Log scale. A line that falls steeply to the left is a gradient that vanishes before reaching the first timesteps."
    if zeros:
        caption += " Lines that stop early went to exactly zero (float32 underflow)."
    return _save(fig, path), "Per-timestep profiles compared", caption


# ------------------------------------------------------------------ gain, horizon, spectral
def plot_dynamics(runs: Sequence[Run], labels: Sequence[str], path: Path) -> tuple[Path, str, str] | None:
    if not any(r.temporal or r.spectral for run in runs for r in run.records):
        return None
    fig = _figure(11, 9.5)
    ax_gain, ax_hor, ax_spec = fig.subplots(3, 1, sharex=True)
    colors = _colors(len(runs))
    any_spec = spec_log = False
    for run, lab, col in zip(runs, labels, colors):
        layers = _recurrent_layers(run)
        for j, layer in enumerate(layers):
            recs = [r for r in run.records if layer in r.temporal]
            steps = [r.step for r in recs]
            name = lab if len(layers) == 1 else f"{lab}: {layer}"
            ls = _STYLES[j % len(_STYLES)]
            ax_gain.plot(steps, _positive([r.temporal[layer].gain for r in recs]), color=col, ls=ls, lw=1.5, label=name)
            ax_hor.plot(steps, [r.temporal[layer].horizon for r in recs], color=col, ls=ls, lw=1.5, label=name)
        names: list[str] = []
        for r in run.records:
            for k in r.spectral:
                if k not in names:
                    names.append(k)
        for j, k in enumerate(names):
            recs = [r for r in run.records if k in r.spectral]
            ax_spec.plot(
                [r.step for r in recs],
                _positive([r.spectral[k] for r in recs]),
                color=col,
                ls=_STYLES[j % len(_STYLES)],
                lw=1.3,
                label=f"{lab}: {k}",
            )
            any_spec = True
    ax_gain.axhline(1.0, color="0.3", lw=1, ls=":")
    gain_log = _scale_y(ax_gain)
    ax_gain.set_ylabel("temporal gain\n(per timestep back)")
    ax_gain.set_title("Temporal gain (<1 vanishing, >1 exploding), horizon and recurrent spectral norms over training")
    ax_hor.set_ylabel("horizon (timesteps)")
    ax_spec.set_ylabel("largest singular value\nof recurrent weights")
    ax_spec.set_xlabel("optimizer step")
    if any_spec:
        spec_log = _scale_y(ax_spec)
        ax_spec.legend(
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            ncol=1 if sum(1 for _ in ax_spec.lines) <= 16 else 2,
        )
    else:
        ax_spec.text(0.5, 0.5, "no spectral norms in these runs", transform=ax_spec.transAxes, ha="center")
    for a in (ax_gain, ax_hor, ax_spec):
        a.grid(True, which="major", alpha=0.3)
    if ax_gain.lines[1:]:
        ax_gain.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    caption = (
        "Gain"
        + (" on a log scale" if gain_log else "")
        + ", 1 dotted; horizon = timesteps back from the peak until the gradient falls "
        "below 1/1000 of it (the sequence length if it never does); spectral norms per gate block"
        + (" on a log scale" if any_spec and spec_log else "")
        + "."
    )
    return _save(fig, path), "Gradient flow through time over training", caption


def plot_all(runs: Sequence[Run], out: Path, labels: Sequence[str]) -> list[tuple[Path, str, str]]:
    """Every plot; returns (png path, heading, caption) in the order the report shows them."""
    made: list[tuple[Path, str, str] | None] = [plot_global_norm(runs, labels, out / "global_norm.png")]
    made.append(plot_temporal_compare(runs, labels, out / "temporal_compare.png"))
    made.append(plot_dynamics(runs, labels, out / "dynamics.png"))
    names = [_safe_name(lab) for lab in labels]
    for run, lab, name in zip(runs, labels, names):
        made.append(plot_temporal(run, lab, out / f"temporal_{name}.png"))
    for run, lab, name in zip(runs, labels, names):
        made.append(plot_layer_heatmap(run, lab, out / f"layers_{name}.png"))
    return [m for m in made if m is not None]
