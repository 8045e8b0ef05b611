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

from gradwatch.cli._plotkit import (
    _STYLES,
    _colors,
    _figure,
    _positive,
    _safe_name,
    _save,
    _scale_y,
    _text,
    clamp_log_axis,
)
from gradwatch.cli.plot_norms import global_norm_figure, layer_labels, plot_global_norm, plot_layer_heatmap
from gradwatch.cli.summary import run_color
from gradwatch.formatting import printable
from gradwatch.jsonl import Run

__all__ = ["global_norm_figure", "layer_labels", "plot_all", "run_color"]


# ------------------------------------------------------------------ temporal profiles
def _sample(points: list[tuple[int, Any]], k: int) -> list[tuple[int, Any]]:
    if len(points) <= k:
        return points
    idx = sorted(set(np.linspace(0, len(points) - 1, k).round().astype(int).tolist()))
    return [points[i] for i in idx]


def _profile_points(run: Run, layer: str, k: int = 5) -> list[tuple[int, np.ndarray]]:
    """Sensitivity profiles (||dL/dx_t||) at up to ``k`` points of training."""
    prof = [(r.step, np.asarray(r.temporal[layer].norms, dtype=np.float64)) for r in run.records if layer in r.temporal and r.temporal[layer].norms]
    # Flushed records repeat the latest profile when none was taken in the window: dedupe.
    uniq: list[tuple[int, np.ndarray]] = []
    for s, a in prof:
        if not uniq or a.shape != uniq[-1][1].shape or not np.array_equal(a, uniq[-1][1], equal_nan=True):
            uniq.append((s, a))
    return _sample(uniq, k)


def _propagation_points(run: Run, layer: str, k: int = 4) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Propagation gains per recurrence at up to ``k`` points of training."""
    uniq: list[tuple[int, dict[str, np.ndarray]]] = []
    for r in run.records:
        prof = r.temporal.get(layer)
        if prof is None or not prof.recurrences:
            continue
        recs = {name: np.asarray(_gains(p), dtype=np.float64) for name, p in prof.recurrences.items()}
        if uniq and recs.keys() == uniq[-1][1].keys() and all(np.array_equal(recs[n], uniq[-1][1][n], equal_nan=True) for n in recs):
            continue
        uniq.append((r.step, recs))
    return _sample(uniq, k)


def _gains(p: object) -> tuple[float, ...]:
    """What a recurrence's rate and horizon are fitted on: ``max_gains`` (largest singular
    value over the probed sequences) where the records carry it, else the RMS ``gains``."""
    return tuple(getattr(p, "max_gains", ()) or getattr(p, "gains", ()))


def _uses_max_gains(run: Run) -> bool:
    return any(getattr(p, "max_gains", ()) for r in run.records for prof in r.temporal.values() for p in prof.recurrences.values())


def _gain_label(max_gains: bool) -> str:
    return "largest gain ‖∂s_T/∂s_(T−j)‖₂" if max_gains else "gain ‖∂s_T/∂s_(T−j)‖ / √dim s"


def _zeros_on_edge(ax: Any, x: np.ndarray, y: np.ndarray, color: Any) -> int:
    """Mark exact zeros (a log axis cannot draw them) on the panel's bottom edge; how many."""
    y = np.asarray(y, dtype=np.float64)
    zero = y == 0
    if zero.any():
        ax.scatter(np.asarray(x)[zero], np.full(int(zero.sum()), 0.015), transform=ax.get_xaxis_transform(), marker="v",
                   color=color, s=12, zorder=4, clip_on=False)
    return int(zero.sum())


def _thresholds(run: Run) -> tuple[float, float]:
    """The run's own vanish_ratio and explode_ratio (header options), else the defaults."""
    opts = run.header.get("options") if isinstance(run.header.get("options"), dict) else {}
    out = []
    for key, default in (("vanish_ratio", 1e-3), ("explode_ratio", 1e3)):
        v = opts.get(key, default) if opts else default
        out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0 else default)
    return out[0], out[1]


#: Recurrent layers drawn per run, and spectral-norm lines per run (the figure stays readable).
MAX_RECURRENT = 8
MAX_SPECTRAL = 16
MAX_RECURRENCES = 4


def _recurrent_layers(run: Run) -> list[str]:
    out: list[str] = []
    for r in run.records:
        for name in r.temporal:
            if name not in out:
                out.append(name)
    return out


def _clamp_decades(ax: Any) -> None:
    """A log axis over at most MAX_DECADES decades (a vanished gain can reach 1e-300)."""
    v = np.concatenate([np.asarray(ln.get_ydata(), dtype=np.float64) for ln in ax.lines] or [np.zeros(0)])
    v = v[np.isfinite(v) & (v > 0)]
    if v.size:
        clamp_log_axis(ax, float(v.min()), float(v.max()))


def _draw_propagation(ax: Any, run: Run, layer: str, lab: str) -> bool:
    """Gains over j steps back, per recurrence, at a few points of training; True if drawn."""
    from matplotlib import colormaps

    points = _propagation_points(run, layer)
    vanish, explode = _thresholds(run)
    if not points:
        ax.text(0.5, 0.5, "propagation not measured for this layer", transform=ax.transAxes, ha="center", va="center")
        ax.set_axis_off()
        return False
    cmap = colormaps["plasma"]
    zeros = 0
    length = 1
    for i, (step, recs) in enumerate(points):
        col = cmap(0.85 * i / max(1, len(points) - 1))
        for k, (name, gains) in enumerate(list(recs.items())[:MAX_RECURRENCES]):
            label = f"step {step}" + (f", {name}" if len(recs) > 1 else "")
            j = np.arange(gains.size)
            length = max(length, gains.size)
            few = np.count_nonzero(np.isfinite(_positive(gains))) < 8
            ax.plot(j, _positive(gains), color=col, ls=_STYLES[k % len(_STYLES)], lw=1.6, label=label,
                    marker="o" if few else None, ms=4)
            zeros += _zeros_on_edge(ax, j, gains, col)
    ax.axhline(vanish, color="#1f77b4", ls=":", lw=1.2, label=f"vanishing below {vanish:g}")
    ax.axhline(explode, color="#d62728", ls=":", lw=1.2, label=f"exploding above {explode:g}")
    ax.set_yscale("log")  # always: the thresholds are the point of this panel
    _clamp_decades(ax)
    ax.set_xlim(-0.5, max(1, length - 1) + 0.5)
    if zeros:
        ax.text(0.99, 0.04, "▼ gain recorded as exactly 0 (not drawable on a log axis)", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7.5, color="0.3")
    ax.set_xlabel("steps back through the recurrence (j)")
    ax.set_ylabel(_gain_label(_uses_max_gains(run)))
    ax.set_title(_text(f"{lab}: propagation through {layer!r}", 90))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return True


def plot_temporal(run: Run, lab: str, path: Path) -> tuple[Path, str, str] | None:
    layers = _recurrent_layers(run)[:MAX_RECURRENT]
    if not layers:
        return None
    fig = _figure(13, 0.6 + 3.6 * len(layers))
    axes = fig.subplots(len(layers), 2, squeeze=False)
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    zeros = nonfinite = False
    for (ax_p, ax), layer in zip(axes, layers):
        _draw_propagation(ax_p, run, layer, lab)
        points = _profile_points(run, layer)
        length, zero_marks = 1, 0
        for i, (step, norms) in enumerate(points):
            col = cmap(0.85 * i / max(1, len(points) - 1))
            zeros |= bool((norms == 0).any())
            nf = ~np.isfinite(norms)
            nonfinite |= bool(nf.any())
            note = " (all NaN/Inf)" if nf.all() else (" (some NaN/Inf)" if nf.any() else "")
            t = np.arange(1, norms.size + 1)
            length = max(length, norms.size)
            few = np.count_nonzero(np.isfinite(_positive(norms))) < 8
            ax.plot(t, _positive(norms), color=col, lw=1.6, label=f"step {step}{note}", marker="o" if few else None, ms=4)
            zero_marks += _zeros_on_edge(ax, t, norms, col)
        _scale_y(ax)
        ax.set_xlim(0.5, length + 0.5)
        if not points:
            ax.text(0.5, 0.5, "sensitivity not measured for this layer", transform=ax.transAxes, ha="center", va="center")
        elif not any(np.isfinite(_positive(a)).any() for _, a in points):
            ax.text(0.5, 0.5, "no finite, positive input gradient to draw\n(every value 0 or NaN)", transform=ax.transAxes,
                    ha="center", va="center")
            ax.set_yticks([])
        if zero_marks:
            ax.text(0.99, 0.04, "▼ exactly 0", transform=ax.transAxes, ha="right", va="bottom", fontsize=7.5, color="0.3")
        ax.set_xlabel("input timestep t")
        ax.set_ylabel("‖∂L/∂x_t‖")
        ax.set_title(_text(f"sensitivity: which input timesteps of {layer!r} the loss draws on", 90))
        ax.grid(True, which="major", alpha=0.3)
        if points:
            ax.legend(title="training step", fontsize=7, title_fontsize=7, loc="upper left")
    caption = (
        "Left, propagation: the gain of the recurrence's state Jacobian product over j steps back, on the run's own "
        "trajectory; vanishing and exploding are judged on it (dotted lines: the run's thresholds). Right, "
        "sensitivity: the gradient reaching each input timestep; a model that uses the first input peaks there, "
        "which is healthy. Early in training dark blue, late yellow."
    )
    if zeros:
        caption += " Exact zeros (float32 underflow) cannot be drawn on a log axis and are left out."
    if nonfinite:
        caption += " NaN/Inf values are left out."
    return _save(fig, path), f"Through time: {lab}", caption


def plot_temporal_compare(runs: Sequence[Run], labels: Sequence[str], path: Path) -> tuple[Path, str, str] | None:
    """Each run's latest propagation (its most extreme recurrence) against the thresholds."""
    from gradwatch.records import extreme

    lines = []
    for (run, lab), col in zip(zip(runs, labels), _colors(len(runs))):  # run i: colour i, as in every plot
        layers = _recurrent_layers(run)[:MAX_RECURRENT]
        for k, layer in enumerate(layers):
            last = [r for r in run.records if layer in r.temporal and r.temporal[layer].recurrences]
            if last:
                got = extreme(last[-1].temporal[layer].recurrences)
                if got is None:
                    continue
                gains = np.asarray(_gains(got[1]), dtype=np.float64)
                lines.append((_text(f"{lab}: {layer}" if len(layers) > 1 else lab), last[-1].step, gains, col, _STYLES[k % len(_STYLES)]))
    if not lines:
        return None
    vanish, explode = _thresholds(runs[0])
    fig = _figure(11, 5)
    ax = fig.add_subplot()
    zeros = 0
    for lab, step, gains, col, ls in lines:
        j = np.arange(gains.size)
        few = np.count_nonzero(np.isfinite(_positive(gains))) < 8
        ax.plot(j, _positive(gains), color=col, ls=ls, lw=1.8, label=f"{lab} (step {step})", marker="o" if few else None, ms=4)
        zeros += _zeros_on_edge(ax, j, gains, col)
    ax.axhline(vanish, color="#1f77b4", ls=":", lw=1.2, label=f"vanishing below {vanish:g}")
    ax.axhline(explode, color="#d62728", ls=":", lw=1.2, label=f"exploding above {explode:g}")
    ax.set_yscale("log")
    _clamp_decades(ax)
    ax.set_xlabel("steps back through the recurrence (j)")
    ax.set_ylabel(_gain_label(any(_uses_max_gains(r) for r in runs)))
    ax.set_title("Latest propagation of each run (its most extreme recurrence)")
    ax.grid(True, which="major", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9)
    caption = (
        "Log scale. A line that falls below the blue dotted line within the sequence is a gradient the recurrence "
        "cannot carry that far back (vanishing); one above the red line grows out of bounds (exploding). Lines "
        "that stop early were recorded as exactly zero (float32 underflow, dead units, or where the measurement stopped)"
        + ("; ▼ on the bottom edge marks those zeros" if zeros else "")
        + ". Each run has the colour it has in every other plot."
    )
    return _save(fig, path), "Propagation through time compared", caption


# ------------------------------------------------------------------ gain, horizon, spectral
def _rate_axis(ax: Any) -> bool:
    """The rate panel's y-axis: linear from 0 (a rate of exactly 0, a gradient that does
    not survive one step, sits on the visible bottom line, never below the axis) unless
    the positive rates span more than two decades with no zero among them. True for log."""
    v = np.concatenate([np.asarray(ln.get_ydata(), dtype=np.float64) for ln in ax.lines] or [np.zeros(0)])
    v = v[np.isfinite(v)]
    pos = v[v > 0]
    if pos.size and not (v == 0).any() and pos.max() >= 100 * pos.min():
        ax.set_yscale("log")
        return True
    hi = max(1.0, float(v.max()) if v.size else 1.0)
    ax.set_ylim(-0.04 * hi, 1.06 * hi)
    return False


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
            name = _text(lab if len(layers) == 1 else f"{lab}: {layer}")
            ls = _STYLES[j % len(_STYLES)]
            # A profile without a propagation measurement (horizon None) is skipped, never drawn as 0.
            measured = [r for r in recs if r.temporal[layer].recurrences and r.temporal[layer].horizon is not None]
            steps = [r.step for r in measured]
            rates = np.asarray([r.temporal[layer].gain for r in measured], dtype=np.float64)
            ax_gain.plot(steps, np.where(np.isfinite(rates) & (rates >= 0), rates, np.nan), color=col, ls=ls, lw=1.5,
                         marker=".", label=name)
            ax_hor.plot(steps, [r.temporal[layer].horizon for r in measured], color=col, ls=ls, lw=1.5, marker=".", label=name)
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
    gain_log = _rate_axis(ax_gain)
    ax_gain.set_ylabel("propagation rate\n(per step back)")
    ax_gain.set_title("Propagation rate (<1 vanishing, >1 exploding), horizon and recurrent spectral norms over training")
    ax_hor.set_ylabel("horizon (steps back)")
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
        + ", 1 dotted: the fitted per-step factor of the recurrence's state Jacobian product; horizon = steps back "
        "until its gain falls below vanish_ratio (the sequence length if it never does); spectral norms per gate block"
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
    attempt("propagation compared", plot_temporal_compare, runs, labels, out / "temporal_compare.png")
    attempt("gradient flow", plot_dynamics, runs, labels, out / "dynamics.png")
    names: list[str] = []
    for lab in labels:  # distinct file names, even for labels that differ only in punctuation
        base = name = _safe_name(lab)
        k = 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    for run, lab, name in zip(runs, labels, names):
        attempt(f"through-time plots of {lab!r}", plot_temporal, run, lab, out / f"temporal_{name}.png")
    for run, lab, name in zip(runs, labels, names):
        attempt(f"per-layer heatmap of {lab!r}", plot_layer_heatmap, run, lab, out / f"layers_{name}.png")
    return made
