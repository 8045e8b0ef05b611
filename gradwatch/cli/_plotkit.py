"""What every plot of ``gradwatch report`` shares: the Agg figure, saving, log-axis
helpers, colours and markers, and making strings from a run file safe to draw.

Importing this module imports matplotlib (see :mod:`gradwatch.cli.plots`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gradwatch.cli.summary import run_color
from gradwatch.formatting import printable

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
    """Runs 0..n-1's colours: run i has colour i in every plot and in the report's tables."""
    return [run_color(i) for i in range(n)]


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    with warnings.catch_warnings():
        # A name in a script the font lacks is drawn as a box; no warning per glyph.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
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
        clamp_log_axis(ax, float(v.min()), float(v.max()))
        return True
    return False


def clamp_log_axis(ax: Any, lo: float, hi: float) -> None:
    """Limits of a log axis drawing positive values from ``lo`` to ``hi`` that matplotlib's
    log locator can tick: at most MAX_DECADES decades (what lies below leaves the bottom
    of the plot), and a top no higher than LOG_TOP (its ticks a stride above the top would
    pass the float range, and drawing fails with OverflowError; a value above it, such as
    a norm of 1e293 in a run file, leaves the top of the plot)."""
    top = min(hi * 10, LOG_TOP)
    if top / lo > 10.0**MAX_DECADES or hi * 10 > LOG_TOP:
        ax.set_ylim(min(max(lo / 10, top / 10.0**MAX_DECADES), top / 10), top)


#: Decades a log axis shows at most (below that, a curve leaves the bottom of the plot).
MAX_DECADES = 120
#: The highest top a log axis gets (see :func:`clamp_log_axis`).
LOG_TOP = 1e250


def _safe_name(s: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in s)[:60] or "run"


def _text(s: object, limit: int = 60) -> str:
    """A string from a run file, safe for matplotlib: printable, cut to ``limit``, and
    every ``$`` escaped, so a name like ``cost_$x_$`` is drawn as written instead of
    being parsed as mathtext (which fails on it and would stop the report)."""
    return printable(s, limit).replace("$", r"\$")
