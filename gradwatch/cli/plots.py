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
from typing import Any

import numpy as np

from gradwatch.cli._plotkit import _STYLES, _colors, _figure, _positive, _safe_name, _save, _scale_y, _text
from gradwatch.cli.plot_norms import global_norm_figure, layer_labels, plot_global_norm, plot_layer_heatmap
from gradwatch.formatting import printable
from gradwatch.jsonl import Run

__all__ = ["global_norm_figure", "layer_labels", "plot_all"]


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


#: Recurrent layers drawn per run, and spectral-norm lines per run (the figure stays readable).
MAX_RECURRENT = 8
MAX_SPECTRAL = 16


def _recurrent_layers(run: Run) -> list[str]:
    out: list[str] = []
    for r in run.records:
        for name in r.temporal:
            if name not in out:
                out.append(name)
    return out


def plot_temporal(run: Run, lab: str, path: Path) -> tuple[Path, str, str] | None:
    layers = _recurrent_layers(run)[:MAX_RECURRENT]
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
        ax.set_title(_text(f"{lab}: gradient reaching each input timestep of {layer!r}", 120))
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
        for layer in _recurrent_layers(run)[:MAX_RECURRENT]:
            last = [r for r in run.records if layer in r.temporal]
            norms = np.asarray(last[-1].temporal[layer].norms, dtype=np.float64)
            lines.append((_text(f"{lab}: {layer}" if len(_recurrent_layers(run)) > 1 else lab), last[-1].step, norms))
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
        layers = _recurrent_layers(run)[:MAX_RECURRENT]
        for j, layer in enumerate(layers):
            recs = [r for r in run.records if layer in r.temporal]
            steps = [r.step for r in recs]
            name = _text(lab if len(layers) == 1 else f"{lab}: {layer}")
            ls = _STYLES[j % len(_STYLES)]
            ax_gain.plot(steps, _positive([r.temporal[layer].gain for r in recs]), color=col, ls=ls, lw=1.5, label=name)
            ax_hor.plot(steps, [r.temporal[layer].horizon for r in recs], color=col, ls=ls, lw=1.5, label=name)
        names: list[str] = []
        for r in run.records:
            for k in r.spectral:
                if k not in names:
                    names.append(k)
        for j, k in enumerate(names[:MAX_SPECTRAL]):
            recs = [r for r in run.records if k in r.spectral]
            ax_spec.plot(
                [r.step for r in recs],
                _positive([r.spectral[k] for r in recs]),
                color=col,
                ls=_STYLES[j % len(_STYLES)],
                lw=1.3,
                label=_text(f"{lab}: {k}"),
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


def plot_all(
    runs: Sequence[Run], out: Path, labels: Sequence[str], problems: list[str] | None = None
) -> list[tuple[Path, str, str]]:
    """Every plot; returns (png path, heading, caption) in the order the report shows them.

    A plot that fails (whatever a run file holds) is left out and one sentence about it
    appended to ``problems``: the report is written regardless.
    """
    problems = problems if problems is not None else []
    made: list[tuple[Path, str, str]] = []

    def attempt(what: str, fn: Any, *args: Any) -> None:
        try:
            got = fn(*args)
        except Exception as exc:  # noqa: BLE001 - one plot must not cost the whole report
            problems.append(f"The {what} plot could not be drawn ({type(exc).__name__}: {printable(exc, 160)}); the report is written without it.")
            return
        if got is not None:
            made.append(got)

    attempt("global norm", plot_global_norm, runs, labels, out / "global_norm.png")
    attempt("profiles compared", plot_temporal_compare, runs, labels, out / "temporal_compare.png")
    attempt("gradient flow", plot_dynamics, runs, labels, out / "dynamics.png")
    names: list[str] = []
    for lab in labels:  # distinct file names, even for labels that differ only in punctuation
        base = name = _safe_name(lab)
        k = 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    for run, lab, name in zip(runs, labels, names):
        attempt(f"per-timestep profiles of {lab!r}", plot_temporal, run, lab, out / f"temporal_{name}.png")
    for run, lab, name in zip(runs, labels, names):
        attempt(f"per-layer heatmap of {lab!r}", plot_layer_heatmap, run, lab, out / f"layers_{name}.png")
    return made
