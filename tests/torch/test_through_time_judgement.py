"""The through-time judgement on real layers (issues 15 and 16), against the float64
reference of gradwatch.through_time.reference computed from the layers' own weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn

import gradwatch
from gradwatch.through_time.reference import cell_jacobians, propagation_from_jacobians


def _reference(rnn: nn.RNNBase, x: torch.Tensor, kind: str) -> tuple[np.ndarray, np.ndarray]:
    w = {n: getattr(rnn, n + "_l0", None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    w = {n: None if t is None else t.detach().double().numpy() for n, t in w.items()}
    jac = np.stack([cell_jacobians(kind, x[:, b].double().numpy(), w) for b in range(min(x.shape[1], 8))])
    return propagation_from_jacobians(jac)


def _one_step(model: nn.Module, x: torch.Tensor, **options):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, profile_every=1, sinks=["memory"], **options) as w:
        model(x)[0].square().mean().backward()
        opt.step()
        return w.records[-1], w.events


def test_exploding_is_judged_on_the_largest_singular_value_not_the_rms_gain():
    """A GRU whose operator-norm gain crosses explode_ratio while its RMS gain stays under
    it: the RMS-based judgement of old stayed silent (issue 16)."""
    torch.manual_seed(0)
    gru = nn.GRU(3, 12)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(12, 12))
        gru.weight_hh_l0[24:].copy_(3.0 * q)  # the candidate block: a large recurrent gain
        gru.bias_hh_l0[12:24].fill_(3.0)  # update gate mostly closed: the state is carried
    x = torch.randn(40, 4, 3)
    gains, top = _reference(gru, x, "gru")
    assert top.max() > 1.5 * gains.max()
    ratio = float(np.sqrt(top.max() * gains.max()))  # between the two peaks: only the largest gain crosses it
    rec, events = _one_step(gru, x, explode_ratio=ratio)
    got = rec.temporal["gru"].recurrences["l0"]
    np.testing.assert_allclose(got.max_gains, top, rtol=1e-4)
    assert any(e.kind == "exploding" and e.layer == "gru" for e in events)


def test_a_few_sequences_that_reset_do_not_make_a_growing_relu_rnn_vanish():
    """3 of 8 ReLU sequences reset (every unit off at one step); the others carry a gradient
    that grows 1.08x per step. No vanishing alert, and never one with a rate above 1."""
    rnn = nn.RNN(2, 6, nonlinearity="relu", bias=False)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(1.08 * torch.eye(6))
        rnn.weight_ih_l0.copy_(torch.ones(6, 2))
    x = torch.rand(30, 8, 2) + 0.1
    x[10, :3] = -1e4  # a reset in 3 sequences: every unit off at step 10
    gains, top = _reference(rnn, x, "rnn_relu")
    rec, events = _one_step(rnn, x)
    got = rec.temporal["rnn"].recurrences["l0"]
    np.testing.assert_allclose(got.max_gains, top, rtol=1e-4)
    assert got.rate == pytest.approx(1.08, rel=1e-3) and got.horizon == 30
    assert not [e for e in events if e.kind == "vanishing" and e.layer == "rnn"]


def test_an_alert_at_step_1_says_it_describes_the_untrained_model():
    torch.manual_seed(1)
    rnn = nn.RNN(3, 8)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.3)
    opt = torch.optim.SGD(rnn.parameters(), lr=1e-3)
    with gradwatch.watch(rnn, opt, profile_every=1, alert_every=2, sinks=["memory"]) as w:
        for _ in range(3):
            opt.zero_grad()
            rnn(torch.randn(40, 4, 3))[0][-1].square().mean().backward()
            opt.step()
        vanish = [e for e in w.events if e.kind == "vanishing" and e.layer == "rnn"]
    assert "at initialisation" in vanish[0].message and vanish[0].step == 1
    assert vanish[-1].step == 3 and "at initialisation" not in vanish[-1].message


def test_remedies_fit_the_forget_bias_the_lstm_already_has():
    torch.manual_seed(2)
    lstm = nn.LSTM(3, 6)
    with torch.no_grad():
        lstm.bias_ih_l0[6:12].fill_(1.0)  # the forget-gate bias Keras also starts from
        lstm.bias_hh_l0[6:12].fill_(0.0)
        lstm.weight_hh_l0.mul_(0.1)
    _, events = _one_step(lstm, torch.randn(200, 4, 3) * 3, vanish_ratio=0.5)
    vanish = [e for e in events if e.kind == "vanishing"]
    assert vanish, "the check below would be vacuous"
    assert "already 1" in vanish[0].message and "(1 to 3)" not in vanish[0].message
    fresh = nn.LSTM(3, 6)  # PyTorch's default: a bias near 0
    _, events = _one_step(fresh, torch.randn(200, 4, 3) * 3, vanish_ratio=0.5)
    assert any("(1 to 3)" in e.message for e in events if e.kind == "vanishing")


def test_an_exploding_alert_does_not_ask_for_the_policy_the_run_already_has():
    rnn = nn.RNN(2, 4, nonlinearity="relu", bias=False)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(1.5 * torch.eye(4))
        rnn.weight_ih_l0.fill_(1.0)
    x = torch.rand(30, 2, 2)
    _, events = _one_step(rnn, x, policy="fixed", max_norm=1.0)
    boom = [e for e in events if e.kind == "exploding" and e.layer == "rnn"]
    assert boom and "your policy 'fixed' already clips" in boom[0].message
    assert "policy='zclip'" not in boom[0].message
    _, events = _one_step(rnn, x)
    assert any("policy='zclip'" in e.message for e in events if e.kind == "exploding" and e.layer == "rnn")


def test_a_recurrent_layer_added_after_watch_is_profiled():
    model = nn.ModuleDict({"first": nn.GRU(3, 4)})
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        later = nn.LSTM(4, 5)
        model["later"] = later
        opt.add_param_group({"params": later.parameters()})
        for _ in range(2):  # seen at the step it joins, profiled from the next forward on
            x = torch.randn(7, 2, 3)
            opt.zero_grad()
            later(model["first"](x)[0])[0].square().mean().backward()
            opt.step()
        rec = w.records[-1]
    assert set(rec.temporal) == {"first", "later"}
    assert rec.temporal["later"].recurrences["l0"].length == 7
    assert w.monitor.meta["recurrent_layers"]["later"] == "lstm"


def test_an_evaluation_forward_between_steps_does_not_leak_into_the_next_record():
    torch.manual_seed(3)
    rnn = nn.GRU(3, 4)
    opt = torch.optim.SGD(rnn.parameters(), lr=0.0)
    with gradwatch.watch(rnn, opt, profile_every=1, sinks=["memory"]) as w:
        for _ in range(2):
            rnn(torch.randn(20, 2, 3))  # evaluation with grad enabled: no backward
            x = torch.randn(11, 2, 3)
            opt.zero_grad()
            rnn(x)[0].square().mean().backward()
            opt.step()
        rec = w.records[-1]
    got = rec.temporal["gru"]
    assert got.recurrences["l0"].length == 11 and len(got.norms) == 11
    gains, top = _reference(rnn, x, "gru")
    np.testing.assert_allclose(got.recurrences["l0"].max_gains, top, rtol=1e-4)
