"""What a person reads in the report: every step plotted, one panel per run, tables that
fit their column, layers they can find, the command that is really installed."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

import gradwatch
from gradwatch import StepStats
from gradwatch.cli import main
from tests.cli.helpers import ROOT

pytest.importorskip("matplotlib", reason="the plots of gradwatch report need matplotlib")


def _run(path, steps=100, log_every=50, run_name=None, policy=None, seed=0):
    rng = np.random.default_rng(seed)
    m = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=log_every, run_name=run_name, policy=policy)
    m.bind(["enc.w", "dec.w"])
    fed = []
    for _ in range(steps):
        sq = rng.lognormal(0.0, 0.5, size=2) ** 2
        fed.append(math.sqrt(float(sq.sum())))
        m.process(StepStats(sq))
    m.close()
    return path, fed


def test_global_norm_plot_draws_every_step_with_default_log_every(tmp_path):
    from gradwatch.cli.plots import global_norm_figure

    path, fed = _run(tmp_path / "a.jsonl")
    run = gradwatch.read_run(path)
    fig, caption = global_norm_figure([run], ["a"])
    (line,) = [ln for ln in fig.axes[0].lines if ln.get_linestyle() == "-"]
    assert line.get_xdata().tolist() == list(range(1, 101))
    assert line.get_ydata().tolist() == pytest.approx(fed, rel=1e-12)
    assert "every step is drawn" in caption


def test_summary_percentiles_are_over_every_step(tmp_path, capsys):
    path, fed = _run(tmp_path / "a.jsonl")
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    from gradwatch.cli.summary import fmt

    assert f"median {fmt(float(np.percentile(fed, 50)))}" in text and f"max {fmt(max(fed))}" in text


def test_five_runs_get_one_panel_each_on_shared_scales(tmp_path):
    from gradwatch.cli.plots import global_norm_figure

    runs = [gradwatch.read_run(_run(tmp_path / f"r{i}.jsonl", seed=i)[0]) for i in range(5)]
    labels = [f"run {i}" for i in range(5)]
    fig, _ = global_norm_figure(runs, labels)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title(loc="left") for ax in visible] == labels
    assert len({ax.get_ylim() for ax in visible}) == 1  # comparable at a glance
    assert all(len([ln for ln in ax.lines if ln.get_linestyle() == "-"]) == 1 for ax in visible)


def test_long_run_is_drawn_in_blocks_that_keep_every_spike(tmp_path):
    from gradwatch.cli.plots import global_norm_figure

    path = tmp_path / "long.jsonl"
    m = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=1000)
    m.bind(["w"])
    for step in range(1, 20_001):
        m.process(StepStats(np.array([1e6 if step == 12_345 else 1.0])))
    m.close()
    fig, caption = global_norm_figure([gradwatch.read_run(path)], ["long"])
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() == pytest.approx(1e3)  # sqrt(1e6): the spike is in the band
    assert "blocks" in caption


class _Tables(HTMLParser):
    """Each table's wrapper div and each numeric-looking cell's class."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.tables_in_scroll = []
        self.cells: list[tuple[str, str]] = []
        self._cell: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables_in_scroll.append(any(t == "div" and a.get("class") == "tbl" for t, a in self.stack))
        if tag == "td":
            self._cell = {"class": attrs.get("class", ""), "text": ""}
        self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append((self._cell["class"], self._cell["text"]))
            self._cell = None
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def test_html_tables_scroll_and_numbers_do_not_wrap(tmp_path):
    path, _ = _run(tmp_path / "a.jsonl", policy="zclip")
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    html = (tmp_path / "rep" / "report.html").read_text()
    css = re.search(r"<style>(.*?)</style>", html, re.DOTALL).group(1)
    assert re.search(r"\.tbl\{[^}]*overflow-x:auto", css)
    assert re.search(r"td\.num\{[^}]*white-space:nowrap", css)
    parser = _Tables()
    parser.feed(html)
    assert parser.tables_in_scroll and all(parser.tables_in_scroll)
    numeric = [(c, t) for c, t in parser.cells if re.fullmatch(r"[-+]?\d[\d.]*(e[-+]\d+)?%?( \([\d.]+%\))?", t)]
    assert numeric and all(c == "num" for c, _ in numeric), [x for x in numeric if x[0] != "num"][:5]


def test_heatmap_rows_of_a_sequential_say_what_each_layer_is(tmp_path):
    from gradwatch.cli.plots import layer_labels

    path = tmp_path / "seq.jsonl"
    lines = [
        {"type": "header", "schema": "gradwatch/1", "layer_types": {"0": "Linear", "2": "Linear"}},
        {"type": "record", "step": 1, "global_norm": 1.0, "param_norms": {"0.weight": 1, "0.bias": 0, "2.weight": 0, "4.weight": 0}},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    run = gradwatch.read_run(path)
    assert layer_labels(run, ["0", "2", "4"]) == ["0 (Linear)", "2 (Linear)", "4 (weight)"]


def test_recurrent_layer_rows_say_their_kind(tmp_path):
    from gradwatch.cli.plots import layer_labels

    path = tmp_path / "rnn.jsonl"
    path.write_text(json.dumps({"type": "header", "schema": "gradwatch/1", "recurrent_layers": {"enc": "lstm"}}) + "\n")
    assert layer_labels(gradwatch.read_run(path), ["enc", "head"]) == ["enc (LSTM)", "head"]


def test_resumed_run_says_so_in_the_summary(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    m = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=10)
    m.bind(["w"])
    for step in range(1, 31):
        m.process(StepStats(np.array([float(step)])))
    state = m.state_dict()
    for _ in range(5):  # the timeline the resumed run replaces
        m.process(StepStats(np.array([1e6])))
    m.close()
    m = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=10)
    m.bind(["w"])
    m.load_state_dict(state)
    for step in range(31, 41):
        m.process(StepStats(np.array([float(step)])))
    m.close()
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "40 steps" in out and "Resumed from a checkpoint at step 30" in out
    assert re.search(r"min 1 .* max 6\.32\n", out)  # sqrt(1) .. sqrt(40): the abandoned 1e6 is not there


def test_demo_points_at_a_command_that_exists(tmp_path):
    """After `make demo` the venv is not activated: `gradwatch` is not on the PATH."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"
    code = "from gradwatch.cli import installed_command; print(installed_command())"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    cmd = res.stdout.strip()
    assert res.returncode == 0 and cmd.split()[0] != "gradwatch", cmd
    first = cmd.split()[0]
    if first.endswith("gradwatch"):
        assert os.access(ROOT / first, os.X_OK) or os.access(first, os.X_OK)
        check = subprocess.run([str(ROOT / first) if not os.path.isabs(first) else first, "--version"], capture_output=True, text=True, timeout=60, check=False)
        assert check.returncode == 0 and check.stdout.startswith("gradwatch ")


def test_file_written_before_per_step_norms_still_reports_and_says_so(tmp_path, capsys):
    path = tmp_path / "old.jsonl"
    lines = [{"type": "header", "schema": "gradwatch/1", "run_name": "old"}]
    for step in (50, 100):
        window = {"first_step": step - 49, "last_step": step, "steps": 50, "norm_min": 0.5, "norm_mean": 1.0,
                  "norm_max": 2.0 * step, "clipped": 0, "skipped": 0, "nonfinite": 0}
        lines.append({"type": "record", "step": step, "global_norm": 1.0, "window": window})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "global norm (flushed steps only)" in out and "max 200" in out and "no per-step norms" in out
    assert (tmp_path / "rep" / "global_norm.png").exists()
