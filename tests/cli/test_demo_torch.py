"""``gradwatch demo`` (PyTorch) at a small --steps: the run files tell the vanishing story."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="gradwatch demo --framework torch needs torch")
pytest.importorskip("matplotlib", reason="the demo's plots need matplotlib")

import gradwatch
from tests.cli.helpers import gradwatch_cmd

RUNS = ("rnn_tanh", "lstm", "gru", "mingru", "relu_rnn", "relu_sgd", "relu_sgd_fixed")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = gradwatch_cmd("demo", "--out", str(out), "--steps", "60")
    assert res.returncode == 0, res.stderr[-2000:]
    return out, res


def _profiles(run, layer="rnn"):
    return [r.temporal[layer] for r in run.records if layer in r.temporal]


def _propagations(run, layer="rnn"):
    """The flushed profiles that carry a propagation measurement."""
    return [p for p in _profiles(run, layer) if p.recurrences]


def test_demo_writes_one_run_file_per_run_plots_and_html(demo):
    out, _ = demo
    for name in RUNS:
        run = gradwatch.read_run(out / f"{name}.jsonl")
        assert run.records and run.records[-1].step == 60 and not run.torn
    html = (out / "report.html").read_text()
    srcs = re.findall(r"""src\s*=\s*["']([^"']*)["']""", html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert (out / "global_norm.png").exists() and (out / "temporal_rnn_tanh.png").exists()


def test_demo_shows_progress_and_a_summary_table(demo):
    _, res = demo
    for name in RUNS:
        assert re.search(rf"{name}\s+\[#+\]\s+60/60", res.stderr), res.stderr
    assert "final acc" in res.stdout and "horizon" in res.stdout
    assert "Traceback" not in res.stderr


def test_vanilla_rnn_vanishes(demo):
    out, _ = demo
    run = gradwatch.read_run(out / "rnn_tanh.jsonl")
    assert any(e.kind == "vanishing" and e.layer == "rnn" and "through time" in e.message for e in run.events)
    last = _propagations(run)[-1]
    assert last.horizon < last.length == 100
    assert last.gain < 0.9


def test_gated_cells_keep_their_propagation_and_raise_no_through_time_alert(demo):
    out, _ = demo
    for name in ("lstm", "gru"):
        run = gradwatch.read_run(out / f"{name}.jsonl")
        assert not any("through time" in e.message for e in run.events), name
        props = _propagations(run)
        assert props and all(p.horizon == 100 for p in props), name


def test_relu_rnn_explodes_through_time(demo):
    out, _ = demo
    run = gradwatch.read_run(out / "relu_rnn.jsonl")
    assert any(e.kind == "exploding" and "through time" in e.message for e in run.events)
    first = _propagations(run)[0]
    assert first.gain > 1.05 and max(first.propagation) > 1e3
    assert max(r.window.norm_max for r in run.records) > 1e3


def test_fixed_clipping_keeps_the_sgd_relu_rnn_alive(demo):
    out, _ = demo
    plain = gradwatch.read_run(out / "relu_sgd.jsonl")
    clipped = gradwatch.read_run(out / "relu_sgd_fixed.jsonl")
    # Unclipped, the first steps kill every ReLU: exactly no gradient reaches the layer
    # after (at 600 steps gradwatch says it stopped learning; here the alert is still held
    # back by alert_every behind the step-1 one).
    assert all(r.layer_norms["rnn"] == 0.0 for r in plain.records[-5:])
    assert _propagations(plain)[-1].horizon == 1
    assert all(r.clip is not None and r.clip.policy == "fixed" for r in clipped.records)
    assert sum(r.window.clipped for r in clipped.records) > 0
    assert all(math.isfinite(r.global_norm) for r in clipped.records)
    assert _propagations(clipped)[-1].horizon == 30


def test_numbers_come_from_training_not_constants(demo):
    out, _ = demo
    # Same seed and steps: the same numbers; the record norms differ from run to run.
    norms = {n: [r.global_norm for r in gradwatch.read_run(out / f"{n}.jsonl").records] for n in RUNS}
    assert len({tuple(v) for v in norms.values()}) == len(RUNS)
    assert all(len(set(v)) > 5 for v in norms.values())


def test_demo_out_dir_default_is_gradwatch_demo():
    from gradwatch.cli import _parser

    args = _parser().parse_args(["demo"])
    assert args.out == "gradwatch-demo" and args.framework == "torch" and args.steps is None
    assert Path(_parser().parse_args(["report", "x.jsonl"]).out) == Path("gradwatch-report")


def test_demo_prints_the_alert_lines_a_log_would_show(demo):
    _, res = demo
    assert re.search(r"^    WARNING:gradwatch:Vanishing gradient through time in recurrent layer 'rnn'", res.stderr, re.M)
    assert re.search(r"^    WARNING:gradwatch:Exploding gradient through time", res.stderr, re.M)
    assert "[gradwatch]" not in res.stderr
    # under each run's progress: the tanh RNN's alert comes before the LSTM's bar
    assert res.stderr.index("WARNING:gradwatch:Vanishing") < res.stderr.index("  lstm ")


def test_demo_story_agrees_with_each_runs_numbers(demo):
    out, res = demo
    said = res.stdout.split("What the numbers say:")[1].split("What happened:")
    numbers, happened = said[0], " ".join(said[1].split())
    assert len([ln for ln in numbers.strip().splitlines() if ln.strip()]) == len(RUNS)
    assert "run" in res.stdout and "rate/step" in res.stdout
    for name, phrase in (("rnn_tanh", "The tanh RNN:"), ("lstm", "The LSTM:"), ("gru", "The GRU:")):
        last = _propagations(gradwatch.read_run(out / f"{name}.jsonl"))[-1]
        sentence = happened.split(phrase)[1].split(" - ")[0]
        if last.horizon < last.length:
            assert f"vanishes after {last.horizon} of {last.length} steps" in sentence, sentence
        else:
            assert f"reaches all {last.length} steps" in sentence and "vanishes" not in sentence, sentence
    assert "grows about 1.1x" not in res.stdout  # no constant claims


def test_the_mingru_row_is_measured_and_its_sentence_agrees_with_its_numbers(demo):
    """Issue 17: a minGRU (the demo's own, declared with register_recurrence) on the same
    task, its propagation measured exactly from its decays, told from its own numbers."""
    out, res = demo
    run = gradwatch.read_run(out / "mingru.jsonl")
    props = _propagations(run)
    assert props, "the minGRU's propagation was not measured"
    first, last = props[0], props[-1]
    assert isinstance(last.horizon, int) and 1 <= last.horizon <= last.length == 100
    assert 0 < last.gain <= 1.0  # a product of decays 1 - z_t in (0, 1)
    # the summary table: a `mingru` row whose horizon is the run file's h/T
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith("mingru "))
    assert f" {last.horizon}/100 " in row, row
    acc = row.split()[1]
    # "What the numbers say" and "What happened" say what the run file says
    numbers = res.stdout.split("What the numbers say:")[1].split("What happened:")[0]
    line = next(ln for ln in numbers.splitlines() if ln.strip().startswith("mingru "))
    items = res.stdout.split("What happened:")[1].split("\nTraining took")[0].split("\n  - ")
    sentence = next(" ".join(i.split()) for i in items if i.startswith("The minGRU"))
    assert f"accuracy {acc}" in line and f"accuracy {acc}" in sentence, (line, sentence)
    if last.horizon < last.length:
        assert f"vanishes after {last.horizon} of 100 steps" in line, line
        assert f"after {last.horizon}" in sentence and "reaches all" not in sentence, sentence
        assert f"after {first.horizon} of 100 steps" in sentence, sentence
    else:
        assert "reaches all 100 steps" in line and "vanishes" not in sentence, sentence
    vanishing = [e for e in run.events if e.kind == "vanishing" and "through time" in e.message]
    assert ("vanishing alert" in sentence) == bool(vanishing), sentence
    if float(acc) < 0.6:
        assert "did not learn the task" in sentence, sentence
    lstm = _propagations(gradwatch.read_run(out / "lstm.jsonl"))[-1]
    assert f"the LSTM's ({lstm.horizon}/100)" in sentence, sentence
    # its alert is printed under its own progress bar, in the words of a minGRU's remedy
    mine = res.stderr.split("  mingru ")[-1].split("  relu_rnn ")[0]
    if vanishing:
        assert "WARNING:gradwatch:Vanishing gradient through time in recurrent layer 'rnn'" in mine, mine
        assert "to_hidden_and_gate" in mine
