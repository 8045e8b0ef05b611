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

RUNS = ("rnn_tanh", "lstm", "gru", "relu_rnn", "relu_rnn_zclip")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = gradwatch_cmd("demo", "--out", str(out), "--steps", "60")
    assert res.returncode == 0, res.stderr[-2000:]
    return out, res


def _profiles(run, layer="rnn"):
    return [r.temporal[layer] for r in run.records if layer in r.temporal]


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
    assert any(e.kind == "vanishing" and e.layer == "rnn" for e in run.events)
    last = _profiles(run)[-1]
    assert last.earliest_over_peak < 1e-3
    assert last.gain < 1


def test_lstm_does_not_vanish(demo):
    out, _ = demo
    run = gradwatch.read_run(out / "lstm.jsonl")
    assert not any(e.kind == "vanishing" for e in run.events)
    assert all(p.earliest_over_peak >= 1e-3 for p in _profiles(run))
    assert _profiles(run)[-1].horizon == 100


def test_relu_rnn_explodes_and_zclip_clips(demo):
    out, _ = demo
    plain = gradwatch.read_run(out / "relu_rnn.jsonl")
    clipped = gradwatch.read_run(out / "relu_rnn_zclip.jsonl")
    assert any(e.kind in ("exploding", "nonfinite") for e in plain.events)
    assert max(r.window.norm_max for r in plain.records) > 1e3
    assert _profiles(plain)[0].gain > 1  # the gradient grows going back in time
    assert all(r.clip is not None and r.clip.policy == "zclip" for r in clipped.records)
    assert sum(r.window.clipped for r in clipped.records) > 0
    assert all(math.isfinite(r.global_norm) for r in clipped.records)


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
