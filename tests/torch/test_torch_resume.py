"""A run resumed from watch.state_dict() through JSON matches an uninterrupted one."""

from __future__ import annotations

import copy
import json

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn
from torch_helpers import SeqRegressor

import gradwatch_torch

HALF = 30


def _steps(model, opt, first, last):
    for step in range(first, last + 1):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(6, 3, 4, generator=gen)
        spike = 50.0 if step in (40, 52) else 1.0  # gradient spikes for the policy to clip
        opt.zero_grad()
        (model(x) * spike).backward()
        opt.step()


@pytest.mark.parametrize("policy", ["zclip", "autoclip"])
def test_resumed_run_matches_uninterrupted_run(policy):
    options = {"policy": policy, "profile_every": 3, "sinks": ["memory"], "keep": 100}
    init = SeqRegressor(nn.LSTM, 4, 8, num_layers=2)

    # uninterrupted
    model = copy.deepcopy(init)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradwatch_torch.watch(model, opt, **options) as w:
        _steps(model, opt, 1, 2 * HALF)
        full = [r.to_dict() for r in w.records]

    # first half, checkpoint through JSON, second half in fresh objects
    model_a = copy.deepcopy(init)
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2)
    with gradwatch_torch.watch(model_a, opt_a, **options) as w:
        _steps(model_a, opt_a, 1, HALF)
        first = [r.to_dict() for r in w.records]
        saved = json.dumps(w.state_dict())
    model_b = copy.deepcopy(init)
    model_b.load_state_dict(model_a.state_dict())
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-2)
    opt_b.load_state_dict(opt_a.state_dict())
    with gradwatch_torch.watch(model_b, opt_b, **options) as w:
        w.load_state_dict(json.loads(saved))
        _steps(model_b, opt_b, HALF + 1, 2 * HALF)
        second = [r.to_dict() for r in w.records]

    assert any(r["clip"] and r["clip"]["scale"] < 1.0 for r in full), "the policy never clipped"
    assert any(r["spectral"] for r in second)
    assert first + second == full
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters()))
