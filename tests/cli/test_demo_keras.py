"""``gradwatch demo --framework keras`` at a tiny --steps: same files, same story at the start."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("keras", reason="gradwatch demo --framework keras needs Keras 3")
pytest.importorskip("tensorflow", reason="gradwatch demo --framework keras needs TensorFlow")
pytest.importorskip("matplotlib", reason="the demo's plots need matplotlib")

import gradwatch
from tests.cli.helpers import gradwatch_cmd


def test_keras_demo_writes_runs_and_vanilla_rnn_vanishes_but_lstm_does_not(tmp_path):
    res = gradwatch_cmd("demo", "--framework", "keras", "--out", str(tmp_path), "--steps", "20")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert re.search(r"lstm\s+\[#+\]\s+20/20", res.stderr)
    assert "final acc" in res.stdout
    names = ("rnn_tanh", "lstm", "gru", "relu_rnn", "relu_sgd", "relu_sgd_fixed")
    runs = {n: gradwatch.read_run(tmp_path / f"{n}.jsonl") for n in names}
    assert all(r.records[-1].step == 20 for r in runs.values())

    def propagations(name):
        return [p for r in runs[name].records for p in r.temporal.values() if p.recurrences]

    # Judged on the propagation measured in the traced step: tanh vanishes, gated cells
    # carry the gradient over the whole sequence, the 1.1*I ReLU RNN explodes.
    assert any(e.kind == "vanishing" and "through time" in e.message for e in runs["rnn_tanh"].events)
    assert propagations("rnn_tanh")[-1].horizon < 100
    for gated in ("lstm", "gru"):
        assert not any("through time" in e.message for e in runs[gated].events), gated
        assert all(p.horizon == 100 for p in propagations(gated)), gated
    assert any(e.kind == "exploding" and "through time" in e.message for e in runs["relu_rnn"].events)
    assert propagations("relu_rnn")[0].gain > 1.05
    assert any(r.clip is not None and r.clip.policy == "fixed" and r.window.clipped for r in runs["relu_sgd_fixed"].records)
    assert (tmp_path / "report.html").exists()
