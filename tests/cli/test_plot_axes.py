"""The figures' axes (issue 19, "Pictures"): no figure flattens a curve, a run that
underflows does not squash the others, empty through-time panels say why, a rate of 0
is visible, one colour per run everywhere."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import gradwatch
from gradwatch import StepStats

pytest.importorskip("matplotlib")


def _norms_run(path: Path, norms: np.ndarray, name: str) -> gradwatch.jsonl.Run:
    m = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=10, profile_every=0, run_name=name, vanish_floor=0)
    m.bind(["w"])
    for v in norms:
        m.process(StepStats(np.array([float(v) ** 2])))
    m.close()
    return gradwatch.read_run(path)


def _finite(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[np.isfinite(a) & (a > 0)]


@pytest.fixture
def runs(tmp_path: Path) -> list:
    rng = np.random.default_rng(0)
    steady = rng.lognormal(0.0, 0.05, 120)  # 0.9 .. 1.1: flat on any shared log axis
    big = 1e5 * rng.lognormal(0.0, 0.3, 120)
    dying = np.concatenate([rng.lognormal(0.0, 0.3, 60), np.geomspace(1e-2, 1e-40, 60)])  # float underflow
    return [
        _norms_run(tmp_path / "steady.jsonl", steady, "steady"),
        _norms_run(tmp_path / "big.jsonl", big, "big"),
        _norms_run(tmp_path / "dying.jsonl", dying, "dying"),
    ]


def test_every_global_norm_panel_fits_its_own_run(runs) -> None:
    from gradwatch.cli.plot_norms import PANEL_DECADES, global_norm_figure

    fig, caption = global_norm_figure(runs, [r.name for r in runs])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 3
    for ax, run in zip(panels, runs):
        lo, hi = ax.get_ylim()
        data = _finite(run.steps.global_norm)
        top = data.max()
        shown = data[data >= top / 10.0**PANEL_DECADES]
        assert lo <= shown.min() and shown.max() <= hi, (run.name, lo, hi)
        decades = math.log10(hi / lo) if ax.get_yscale() == "log" else math.log10(hi / max(lo, hi * 1e-3))
        assert decades <= 1.1 * PANEL_DECADES + 0.01, (run.name, decades)  # 5% padding each side
        # not flattened: the run's own values cover a real share of its panel
        span = math.log10(shown.max() / shown.min())
        assert span >= 0.3 * decades or ax.get_yscale() == "linear", (run.name, span, decades)
    assert "each norm axis fitted to its run" in caption
    dying = panels[2]
    assert any("steps below" in t.get_text() for t in dying.texts)


def test_similar_runs_keep_one_shared_scale(tmp_path: Path) -> None:
    from gradwatch.cli.plot_norms import global_norm_figure

    rng = np.random.default_rng(1)
    runs = [_norms_run(tmp_path / f"r{i}.jsonl", rng.lognormal(0.0, 0.8, 80), f"r{i}") for i in range(3)]
    fig, caption = global_norm_figure(runs, [r.name for r in runs])
    assert len({ax.get_ylim() for ax in fig.axes if ax.get_visible()}) == 1
    assert "same norm scale" in caption


def _dead_relu_run(path: Path, steps: int = 20, length: int = 30) -> gradwatch.jsonl.Run:
    """Propagation 1 at j=0 then exactly 0 (dead ReLUs): rate 0, horizon 1."""
    m = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=5, profile_every=5, run_name="dead", vanish_floor=0)
    m.bind(["rnn.weight_hh_l0", "head.weight"])
    for _ in range(steps):
        prof = m.profile_due()
        gains = np.zeros(length)
        gains[0] = 1.0
        sens = np.zeros(length)
        m.process(StepStats(np.array([0.0, 0.01]), temporal={"rnn": sens} if prof else {},
                            propagation={"rnn": {"l0": gains}} if prof else {}))
    m.close()
    return gradwatch.read_run(path)


def test_temporal_figure_of_a_dead_layer_is_never_empty(tmp_path: Path) -> None:
    from gradwatch.cli.plots import plot_temporal

    run = _dead_relu_run(tmp_path / "dead.jsonl")
    made = plot_temporal(run, "dead", tmp_path / "temporal_dead.png")
    assert made is not None and made[0].stat().st_size > 0
    import matplotlib.image

    img = matplotlib.image.imread(made[0])
    assert img.shape[0] > 100
    # rebuild to inspect the axes
    from gradwatch.cli import plots

    fig_axes: list = []
    orig = plots._save
    plots._save = lambda fig, path: fig_axes.extend(fig.axes) or path  # type: ignore[assignment]
    try:
        plot_temporal(run, "dead", tmp_path / "again.png")
    finally:
        plots._save = orig
    prop, sens = fig_axes[0], fig_axes[1]
    lo, hi = prop.get_xlim()
    assert lo <= 0 and hi >= 29  # the whole sequence, not -0.04..0.04
    ys = np.concatenate([np.asarray(ln.get_ydata(), float) for ln in prop.lines[:-2]])
    assert np.isfinite(ys).any()  # the gain 1 at j=0 is drawn
    assert any("exactly 0" in t.get_text() for t in prop.texts)
    assert any("exactly 0" in t.get_text() or "no finite" in t.get_text() for t in sens.texts)
    slo, shi = sens.get_xlim()
    assert slo <= 1 and shi >= 30


def test_a_rate_of_zero_is_visible_in_dynamics(tmp_path: Path) -> None:
    from gradwatch.cli import plots

    run = _dead_relu_run(tmp_path / "dead.jsonl")
    captured: list = []
    orig = plots._save
    plots._save = lambda fig, path: captured.append(fig) or path  # type: ignore[assignment]
    try:
        plots.plot_dynamics([run], ["dead"], tmp_path / "dynamics.png")
    finally:
        plots._save = orig
    ax_rate = captured[0].axes[0]
    rates = np.asarray(ax_rate.lines[0].get_ydata(), float)
    assert (rates == 0).all()
    lo, hi = ax_rate.get_ylim()
    assert ax_rate.get_yscale() == "linear" and lo < 0 < hi and hi >= 1.0


def test_a_run_has_one_colour_in_every_plot(runs, tmp_path: Path) -> None:
    from matplotlib.colors import to_hex

    from gradwatch.cli import plots

    dead = _dead_relu_run(tmp_path / "dead.jsonl")
    allruns = [*runs, dead]
    labels = [r.name for r in allruns]
    figs: list = []
    orig = plots._save
    plots._save = lambda fig, path: figs.append(fig) or path  # type: ignore[assignment]
    try:
        g, _ = plots.global_norm_figure(allruns, labels)
        plots.plot_temporal_compare(allruns, labels, tmp_path / "c.png")
        plots.plot_dynamics(allruns, labels, tmp_path / "d.png")
    finally:
        plots._save = orig
    want = to_hex(plots.run_color(3))
    panel = [ax for ax in g.axes if ax.get_visible()][3]
    assert to_hex(panel.lines[0].get_color()) == want
    compare, dyn = figs
    assert to_hex(compare.axes[0].lines[0].get_color()) == want  # the only run with propagation
    assert to_hex(dyn.axes[0].lines[0].get_color()) == want
