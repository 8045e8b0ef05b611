"""NaN/Inf gradients: named, skipped (weights and optimizer state bitwise unchanged) or
raised before anything changes."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn
from torch_helpers import SeqRegressor, optimizer_state_snapshot, snapshot, states_equal

import gradwatch
import gradwatch_torch

BAD_STEP = 3
BAD_PARAM = "rnn.weight_hh_l0"


def _loop(model, opt, steps, inject=True, on_bad=None):
    gen = torch.Generator().manual_seed(7)
    for step in range(1, steps + 1):
        x = torch.randn(6, 2, 4, generator=gen)
        opt.zero_grad()
        model(x).backward()
        if inject and step == BAD_STEP:
            dict(model.named_parameters())[BAD_PARAM].grad[0, 0] = float("nan")
            if on_bad is not None:
                on_bad()
        opt.step()


def _model_and_adam():
    model = SeqRegressor(nn.LSTM, 4, 8)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)


def test_nan_is_named_in_record_and_event():
    model, opt = _model_and_adam()
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        _loop(model, opt, BAD_STEP)
        rec = w.records[-1]
        events = [e for e in w.events if e.kind == "nonfinite"]
    assert rec.step == BAD_STEP and rec.nonfinite == (BAD_PARAM,)
    assert events and events[0].param == BAD_PARAM and BAD_PARAM in events[0].message


def test_skip_leaves_weights_and_adam_state_bitwise_unchanged():
    model, opt = _model_and_adam()
    saved = {}

    def remember():
        saved["w"] = snapshot(model)
        saved["s"] = optimizer_state_snapshot(opt)

    with gradwatch_torch.watch(model, opt, on_nonfinite="skip", sinks=["memory"]) as w:
        _loop(model, opt, BAD_STEP, on_bad=remember)
        assert w.records[-1].skipped
        after_w, after_s = snapshot(model), optimizer_state_snapshot(opt)
        assert all(torch.equal(a, b) for a, b in zip(after_w, saved["w"]))
        assert states_equal(after_s, saved["s"])
        # and training continues normally afterwards
        _loop(model, opt, 2, inject=False)
        assert not w.records[-1].skipped
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_equals_a_run_that_never_saw_the_bad_batch():
    model, opt = _model_and_adam()
    ref, ref_opt = copy.deepcopy(model), None
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=1e-2)
    with gradwatch_torch.watch(model, opt, on_nonfinite="skip", sinks=["memory"]):
        _loop(model, opt, BAD_STEP + 2)
    gen = torch.Generator().manual_seed(7)
    for step in range(1, BAD_STEP + 3):
        x = torch.randn(6, 2, 4, generator=gen)
        ref_opt.zero_grad()
        ref(x).backward()
        if step != BAD_STEP:
            ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_raise_happens_before_anything_changes():
    model, opt = _model_and_adam()
    saved = {}

    def remember():
        saved["w"] = snapshot(model)
        saved["s"] = optimizer_state_snapshot(opt)

    with (
        gradwatch_torch.watch(model, opt, on_nonfinite="raise", sinks=["memory"]),
        pytest.raises(gradwatch.NonFiniteGradientError) as info,
    ):
        _loop(model, opt, BAD_STEP, on_bad=remember)
    assert info.value.step == BAD_STEP and BAD_PARAM in info.value.params
    assert isinstance(info.value, FloatingPointError)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), saved["w"]))
    assert states_equal(optimizer_state_snapshot(opt), saved["s"])


def test_warn_lets_the_step_happen():
    model, opt = _model_and_adam()
    with gradwatch_torch.watch(model, opt, on_nonfinite="warn", sinks=["memory"]) as w:
        _loop(model, opt, BAD_STEP)
        assert not w.records[-1].skipped
    assert not torch.isfinite(dict(model.named_parameters())[BAD_PARAM]).all()
