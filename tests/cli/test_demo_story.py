"""The demo's story is built from each run's own numbers (issue 19): a claim the numbers
contradict is never printed; what did happen is. Synthetic run files, no framework."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import gradwatch
from gradwatch import StepStats
from gradwatch.cli.demo import facts, intro, story
from gradwatch.cli.demo._alerts import echo_alerts
from gradwatch.cli.demo.torch_demo import RUNS


def _run(
    path: Path,
    rate: float,
    length: int = 100,
    steps: int = 20,
    dead: bool = False,
    later: float | None = None,
    spike_at: int | None = None,
    nan_from: int | None = None,
):
    m = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=5, profile_every=5, run_name=path.stem)
    m.bind(["rnn.weight_hh_l0", "head.weight"])
    for step in range(1, steps + 1):
        prof = m.profile_due()
        gains = (rate if later is None or step <= 5 else later) ** np.arange(length)
        sq = np.array([0.0 if dead and step > 5 else 1.0, 1.0]) * (1e8 if step == spike_at else 1.0)
        if nan_from is not None and step >= nan_from:
            sq = sq * np.nan
        m.process(StepStats(sq, temporal={"rnn": np.ones(length)} if prof else {},
                            propagation={"rnn": {"l0": gains}} if prof else {}))
    m.close()
    return gradwatch.read_run(path)


def _result(name: str, accuracy: float):
    spec = next(s for s in RUNS if s.name == name)
    return SimpleNamespace(spec=spec, accuracy=accuracy)


def test_a_tanh_rnn_that_does_not_vanish_is_not_said_to(tmp_path):
    run = _run(tmp_path / "rnn_tanh.jsonl", rate=0.999)
    (sentence,) = story([_result("rnn_tanh", 0.91)], [run])
    assert "vanishes" not in sentence and "reaches all 100 steps" in sentence
    assert "learned the task (accuracy 0.91)" in sentence


def test_a_gru_at_068_has_not_learned_the_task(tmp_path):
    run = _run(tmp_path / "gru.jsonl", rate=0.99)
    (sentence,) = story([_result("gru", 0.68)], [run])
    assert "learned part of the task" in sentence and "learned the task" not in sentence
    assert "no through-time alert" in sentence


def test_an_alert_on_the_gradient_norm_is_not_hidden_behind_no_through_time_alert(tmp_path):
    """The summary table counts every exploding event; the sentence must not read as if
    there were none (the demo's GRU: one spike of its gradient norm, no through-time alert)."""
    run = _run(tmp_path / "gru.jsonl", rate=0.99, steps=40, spike_at=38)
    (sentence,) = story([_result("gru", 1.0)], [run])
    assert "no through-time alert, but 1 alert on the gradient norm itself" in sentence


def test_a_gated_cell_that_vanishes_says_so_with_its_horizon(tmp_path):
    run = _run(tmp_path / "lstm.jsonl", rate=0.8)
    f = facts(_result("lstm", 0.5), run)
    (sentence,) = story([_result("lstm", 0.5)], [run])
    assert f.last is not None and f"vanishes after {f.last[1]} of 100 steps" in sentence
    assert "vanishing alert" in sentence


def test_the_exploding_relu_sentence_uses_the_measured_rate(tmp_path):
    run = _run(tmp_path / "relu_rnn.jsonl", rate=0.896)  # the contradiction the issue found
    (sentence,) = story([_result("relu_rnn", 0.5)], [run])
    assert "grows" not in sentence and "0.896/step" in sentence


def test_the_clipping_pair_reports_dead_relus_and_the_outcome(tmp_path):
    plain = _run(tmp_path / "relu_sgd.jsonl", rate=0.5, length=30, dead=True)
    clipped = _run(tmp_path / "relu_sgd_fixed.jsonl", rate=1.0, length=30)
    text = story([_result("relu_sgd", 0.49), _result("relu_sgd_fixed", 0.95)], [plain, clipped])
    assert "exactly zero gradient" in text[0] and "from step" in text[0]
    assert "policy='fixed'" in text[1]
    assert text[2].startswith("Clipping decided the outcome")
    text = story([_result("relu_sgd", 0.49), _result("relu_sgd_fixed", 0.55)], [plain, clipped])
    assert "did not decide" in text[2]


def test_alert_echo_prints_log_lines_once_with_their_count():
    log = logging.getLogger("gradwatch")
    with echo_alerts() as echo:
        for step in (5, 10, 15):
            log.warning("Layer 'rnn' stalled at step %d: norm %.3g", step, 1e-12 * step)
        log.error("Non-finite gradient at step 7")
        log.info("not an alert")
    lines = echo.lines()
    assert lines[0].startswith("WARNING:gradwatch:Layer 'rnn' stalled at step 5") and "[×3 similar, steps 5–15]" in lines[0]
    assert lines[1] == "ERROR:gradwatch:Non-finite gradient at step 7"
    assert len(lines) == 2


def test_the_mingru_sentence_tells_first_and_last_and_compares_with_the_lstm(tmp_path):
    mingru = _run(tmp_path / "mingru.jsonl", rate=0.7, later=0.8)
    lstm = _run(tmp_path / "lstm.jsonl", rate=0.999)
    f = facts(_result("mingru", 0.5), mingru)
    assert f.first is not None and f.last is not None and f.first[1] < f.last[1] < 100
    _, sentence = story([_result("lstm", 0.93), _result("mingru", 0.5)], [lstm, mingru])
    assert sentence.startswith("The minGRU") and "register_recurrence" in sentence
    assert f"vanishes after {f.first[1]} of 100 steps at the first measurement" in sentence, sentence
    assert f"after {f.last[1]} at the last" in sentence and "vanishing alert" in sentence, sentence
    assert "did not learn the task" in sentence
    assert f"Its horizon ({f.last[1]}/100) is shorter than the LSTM's (100/100), whose accuracy was 0.93" in sentence


def test_a_mingru_that_keeps_its_memory_is_not_said_to_forget(tmp_path):
    run = _run(tmp_path / "mingru.jsonl", rate=0.9999)
    (sentence,) = story([_result("mingru", 0.88)], [run])
    assert "reaches all 100 steps" in sentence and "vanish" not in sentence and "remedy" not in sentence
    assert "learned the task (accuracy 0.88)" in sentence and "LSTM" not in sentence


def test_the_intro_counts_the_runs_each_framework_trains():
    assert "Seven runs" in intro("torch") and "minGRU" in intro("torch") and len(RUNS) == 7
    assert "Six runs" in intro("keras") and "minGRU" not in intro("keras")


def test_an_lstm_alerted_as_exploding_earlier_says_when_and_how_far(tmp_path):
    """Its last measurement reaches every step without exploding, yet it was alerted as
    exploding: the sentence says the peak and its step (read from the records), so the
    two do not read as a contradiction."""
    run = _run(tmp_path / "lstm.jsonl", rate=1.1, later=1.0, spike_at=3)
    f = facts(_result("lstm", 1.0), run)
    assert f.alerts.get("exploding") and f.last[3] <= 1e3
    (sentence,) = story([_result("lstm", 1.0)], [run])
    assert "reaches all 100 steps (1/step) at the last measurement, but its most amplified direction grew up to" in sentence
    peak = 1.1**99
    assert f"grew up to {peak:.3g}x over the sequence at step 5" in sentence
    assert "its gradient norm peaked at" in sentence and "x its median" in sentence


def test_an_lstm_never_exploding_gets_no_peak_clause(tmp_path):
    run = _run(tmp_path / "lstm.jsonl", rate=1.0)
    (sentence,) = story([_result("lstm", 1.0)], [run])
    assert "most amplified direction" not in sentence


def test_a_tanh_rnn_that_vanished_earlier_says_so_beside_its_last_measurement(tmp_path):
    """Keras demo, tanh RNN: 'reaches all 100 steps (0.931/step), 30 vanishing alerts' read
    as a contradiction; the last measurement did not vanish, earlier ones did."""
    run = _run(tmp_path / "rnn_tanh.jsonl", rate=0.8, later=1.0)
    f = facts(_result("rnn_tanh", 0.49), run)
    assert f.alerts.get("vanishing") and f.last[1] == 100
    (sentence,) = story([_result("rnn_tanh", 0.49)], [run])
    assert "reaches all 100 steps (1/step) at the last measurement, but earlier it vanished after as few as 31 of 100 steps (step 5)" in sentence, sentence


def test_diverged_weights_are_told_as_non_finite_gradients_not_as_a_gradient_that_still_flows(tmp_path):
    """Keras demo, ReLU RNN with SGD: 297 non-finite steps were told as 'its recurrent layer
    still got a gradient at the end'."""
    run = _run(tmp_path / "relu_sgd.jsonl", rate=1.0, length=30, nan_from=4)
    (sentence,) = story([_result("relu_sgd", 0.51)], [run])
    assert "its gradient was not finite on 17 steps, the first at step 4" in sentence, sentence
    assert "still got a gradient" not in sentence
