"""Notebook displays (gradwatch.display): Watch, run, events, StepRecord."""

from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
import pytest

import gradwatch
from gradwatch import StepStats
from gradwatch.display import events_html, group_events, record_repr, sparkline_svg, through_time_rows
from gradwatch.events import GradEvent
from gradwatch.records import StepRecord, TemporalProfile
from gradwatch.watch import Watch


def _watch(tmp_path=None, steps: int = 30) -> Watch:
    sinks = [f"jsonl:{tmp_path / 'run.jsonl'}"] if tmp_path is not None else []
    m = gradwatch.Monitor(sinks=sinks, profile_every=10, log_every=10, run_name="nb")
    m.bind(["rnn.weight_hh_l0", "head.weight"])
    for step in range(1, steps + 1):
        sq = np.array([0.5, 0.25]) * (1.1**step)
        if step == 7:
            sq[0] = math.nan
        prof = m.profile_due()
        m.process(StepStats(sq, temporal={"rnn": np.linspace(1, 0.1, 20)} if prof else {},
                            propagation={"rnn": {"l0": 0.7 ** np.arange(20)}} if prof else {}))
    return Watch(m)


def test_step_record_repr_is_one_short_line_however_big_the_record():
    layers = {f"encoder.block_{i}.attention.very_long_parameter_name_{i}": float(i) for i in range(10_000)}
    temporal = {f"rnn{i}": TemporalProfile.build(norms=np.linspace(1, 0.1, 50), recurrences={"l0": 0.9 ** np.arange(50)}) for i in range(40)}
    rec = StepRecord(step=12, global_norm=3.25, param_norms=MappingProxyType(layers), layer_norms=MappingProxyType(layers),
                     nonfinite=("a", "b"), temporal=MappingProxyType(temporal))
    text = repr(rec)
    assert "\n" not in text and len(text) <= 300
    assert text.startswith("StepRecord(step=12, global_norm=3.25")
    assert "nonfinite=2" in text and "layers=10000" in text


def test_watch_html_shows_steps_sparkline_through_time_and_last_alerts():
    w = _watch()
    page = w._repr_html_()
    assert "30 steps" in page and "<svg" in page and "<polyline" in page
    for col in ("layer", "recurrence", "rate/step", "horizon"):
        assert f">{col}<" in page
    assert ">20/20<" in page or "/20<" in page  # horizon as h/T
    assert "Last alerts" in page and "Non-finite" in page
    w.close()


def test_run_html_from_read_run(tmp_path):
    w = _watch(tmp_path)
    w.close()
    run = gradwatch.read_run(tmp_path / "run.jsonl")
    page = run._repr_html_()
    assert "gradwatch run nb" in page and "30 steps" in page and "<svg" in page and "rate/step" in page


def test_a_profile_without_propagation_reads_not_measured():
    prof = TemporalProfile.build(norms=np.ones(5))
    rec = StepRecord(step=3, global_norm=1.0, temporal=MappingProxyType({"rnn": prof}))
    rows = through_time_rows([rec])
    assert rows == [("rnn", "-", "not measured", "not measured", 0)]
    assert "not measured" in record_repr(rec)


def test_events_html_groups_near_identical_alerts():
    evs = [GradEvent("vanishing", s, 30, f"Layer 'rnn' vanished after {s % 7} of 30 steps ({0.5 + s / 1000:.3f}/step).", layer="rnn")
           for s in range(10, 70, 10)]
    evs.append(GradEvent("exploding", 80, 30, "Gradient norm spiked at step 80.", layer=None))
    groups = group_events(evs)
    assert [g.count for g in groups] == [6, 1]
    page = events_html(evs)
    assert "×6" in page and "10–60" in page and "(global)" in page
    assert events_html([]).count("No alerts") == 1


def test_sparkline_survives_nan_zero_and_long_series():
    v = np.concatenate([np.geomspace(1, 1e-30, 5000), [np.nan, 0.0, np.inf], np.ones(5000)])
    svg = sparkline_svg(v)
    assert svg.startswith("<svg") and "polyline" in svg and "nan" not in svg.lower().replace("no finite", "")
    assert "no finite norm" in sparkline_svg([np.nan, 0.0])


def test_watch_plot_returns_the_reports_main_figure():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    w = _watch()
    fig = w.plot()
    assert isinstance(fig, Figure)
    ax = [a for a in fig.axes if a.get_visible()][0]
    assert len(ax.lines[0].get_xdata()) == 30
    w.close()
