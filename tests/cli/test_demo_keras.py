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
    runs = {
        n: gradwatch.read_run(tmp_path / f"{n}.jsonl")
        for n in ("rnn_tanh", "lstm", "gru", "relu_rnn", "relu_rnn_zclip")
    }
    assert all(r.records[-1].step == 20 for r in runs.values())
    tanh = [r.temporal for r in runs["rnn_tanh"].records if r.temporal]
    assert any(e.kind == "vanishing" for e in runs["rnn_tanh"].events)
    assert next(iter(tanh[-1].values())).earliest_over_peak < 1e-3
    assert not any(e.kind == "vanishing" for e in runs["lstm"].events)
    assert any(r.clip is not None and r.clip.scale < 1 for r in runs["relu_rnn_zclip"].records)
    assert (tmp_path / "report.html").exists()
