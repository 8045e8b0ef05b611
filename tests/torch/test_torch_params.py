"""The parameter set followed as it changes (param groups, new modules, freezing), absent
parameters left out rather than counted as zero, and every dtype measured as
torch.nn.utils.clip_grad_norm_ measures it. Ground truth: p.grad read by the tests,
get_total_norm / clip_grad_norm_, unwatched runs."""

from __future__ import annotations

import copy
import logging

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn
from torch_helpers import optimizer_state_snapshot, snapshot, states_equal

import gradwatch_torch


class Net(nn.Module):
    """A body and a head; ``grow()`` registers a second head, as a user adding a task would."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)
        self.extra: nn.Module | None = None

    def grow(self, opt=None):
        self.extra = nn.Linear(8, 3)
        if opt is not None:
            opt.add_param_group({"params": self.extra.parameters()})

    def forward(self, x):
        h = torch.tanh(self.body(x))
        out = self.head(h)
        return out if self.extra is None else out + self.extra(h)


def _steps(model, opt, n, gen, before_step=None):
    for _ in range(n):
        x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if before_step is not None:
            before_step()
        opt.step()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None and p.requires_grad}


def test_a_param_group_added_after_watch_is_measured():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    seen = {}
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        _steps(model, opt, 2, gen)
        model.grow(opt)
        _steps(model, opt, 1, gen, before_step=lambda: seen.update(_grads(model)))
        rec = w.records[-1]
    assert set(rec.param_norms) == set(seen) and "extra.weight" in seen
    for name, g in seen.items():
        assert rec.param_norms[name] == pytest.approx(g.norm().item(), rel=1e-6)
    assert rec.global_norm == pytest.approx(torch.nn.utils.get_total_norm(list(seen.values())).item(), rel=1e-6)
    assert rec.layer_norms["extra"] == pytest.approx(
        (seen["extra.weight"].square().sum() + seen["extra.bias"].square().sum()).sqrt().item(), rel=1e-6
    )


def test_fixed_clipping_covers_a_param_group_added_after_watch():
    model = Net()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    with gradwatch_torch.watch(model, opt, policy="fixed", max_norm=1e-3, sinks=["memory"]):
        _steps(model, opt, 2, torch.Generator().manual_seed(1))
        torch.manual_seed(7)
        model.grow(opt)
        _steps(model, opt, 3, torch.Generator().manual_seed(2))
    clip = lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)
    _steps(ref, ref_opt, 2, torch.Generator().manual_seed(1), before_step=clip)
    torch.manual_seed(7)
    ref.grow(ref_opt)
    _steps(ref, ref_opt, 3, torch.Generator().manual_seed(2), before_step=clip)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_skip_covers_a_nan_in_a_param_group_added_after_watch():
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    with gradwatch_torch.watch(model, opt, on_nonfinite="skip", sinks=["memory"]) as w:
        _steps(model, opt, 2, gen)
        model.grow(opt)
        _steps(model, opt, 1, gen)
        before_w, before_s = snapshot(model), optimizer_state_snapshot(opt)
        _steps(model, opt, 1, gen, before_step=lambda: model.extra.weight.grad.fill_(float("nan")))
        rec = w.records[-1]
        events = [e for e in w.events if e.kind == "nonfinite"]
    assert rec.skipped and rec.nonfinite == ("extra.weight",)
    assert events and events[-1].param == "extra.weight"
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), before_w))
    assert states_equal(optimizer_state_snapshot(opt), before_s)


def test_a_backbone_unfrozen_after_watch_is_measured():
    model = Net()
    model.body.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    seen = {}
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        _steps(model, opt, 2, gen)
        first = set(w.records[0].param_norms)
        model.body.requires_grad_(True)
        opt.add_param_group({"params": model.body.parameters(), "lr": 0.01})
        _steps(model, opt, 1, gen, before_step=lambda: seen.update(_grads(model)))
        rec = w.records[-1]
    assert first == {"head.weight", "head.bias"}
    assert rec.param_norms["body.weight"] == pytest.approx(seen["body.weight"].norm().item(), rel=1e-6)
    assert rec.global_norm == pytest.approx(torch.nn.utils.get_total_norm(list(seen.values())).item(), rel=1e-6)


def test_a_parameter_held_only_by_the_optimizer_is_named_by_its_group():
    model = Net()
    scale = nn.Parameter(torch.tensor(2.0))
    opt = torch.optim.SGD([*model.parameters()], lr=0.1)
    opt.add_param_group({"params": [scale]})
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        opt.zero_grad()
        (model(torch.randn(4, 5)) * scale).square().mean().backward()
        g = scale.grad.abs().item()
        opt.step()
        rec = w.records[-1]
    assert rec.param_norms["param_groups[1].params[0]"] == pytest.approx(g, rel=1e-6)


def test_a_layer_frozen_after_watch_is_absent_not_zero():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    seen = {}
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        _steps(model, opt, 1, gen)
        model.body.requires_grad_(False)
        _steps(model, opt, 1, gen, before_step=lambda: seen.update(_grads(model)))
        rec = w.records[-1]
    assert set(rec.param_norms) == {"head.weight", "head.bias"} and set(rec.layer_norms) == {"head"}
    assert rec.global_norm == pytest.approx(torch.nn.utils.get_total_norm(list(seen.values())).item(), rel=1e-6)


def test_a_frozen_layer_with_a_stale_zero_gradient_is_absent():
    """zero_grad(set_to_none=False) leaves a zero .grad on the frozen layer: not this step's gradient."""
    model = Net()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        model(torch.randn(4, 5)).sum().backward()
        model.body.requires_grad_(False)
        model.zero_grad(set_to_none=False)
        model(torch.randn(4, 5)).sum().backward()
        opt.step()
        rec = w.records[-1]
    assert model.body.weight.grad is not None and "body.weight" not in rec.param_norms


def test_a_layer_frozen_after_watch_raises_no_vanishing_alert():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        _steps(model, opt, 2, torch.Generator().manual_seed(1))
        model.body.requires_grad_(False)
        _steps(model, opt, 30, torch.Generator().manual_seed(2))
        vanishing = [e for e in w.events if e.kind == "vanishing"]
    assert vanishing == []


def test_a_parameter_without_gradient_this_step_is_absent():
    model = Net()
    model.grow()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        opt.zero_grad()
        h = torch.tanh(model.body(torch.randn(4, 5)))
        model.head(h).square().mean().backward()  # the loss does not reach model.extra
        opt.step()
        rec = w.records[-1]
    assert "extra.weight" not in rec.param_norms and "extra" not in rec.layer_norms
    assert set(rec.param_norms) == {"body.weight", "body.bias", "head.weight", "head.bias"}


def test_a_submodule_registered_after_watch_is_measured_by_a_manual_step():
    model = Net()
    gen = torch.Generator().manual_seed(1)
    with gradwatch_torch.watch(model, sinks=["memory"]) as w:
        model(torch.randn(4, 5, generator=gen)).sum().backward()
        w.step()
        model.grow()
        model.zero_grad()
        model(torch.randn(4, 5, generator=gen)).sum().backward()
        rec = w.step()
    assert rec.param_norms["extra.weight"] == pytest.approx(model.extra.weight.grad.norm().item(), rel=1e-6)


def test_a_replaced_parameter_is_followed():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        model.head.weight = nn.Parameter(torch.randn(3, 8))
        opt.param_groups[0]["params"][2] = model.head.weight
        opt.zero_grad()
        model(torch.randn(4, 5)).sum().backward()
        want = model.head.weight.grad.norm().item()
        opt.step()
        rec = w.records[-1]
    assert rec.param_norms["head.weight"] == pytest.approx(want, rel=1e-6)


class Quiet(nn.Module):
    """``body`` reaches the loss scaled by 1e-13: its gradient stays below vanish_floor (1e-10)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 3)
        self.head = nn.Linear(5, 3)
        self.extra: nn.Module | None = None

    def forward(self, x):
        out = self.head(x) + 1e-13 * self.body(x)
        return out if self.extra is None else out + self.extra(x)


def test_vanishing_counts_survive_a_change_of_the_parameter_set():
    """15 quiet steps, a new layer, 5 more: the alert comes at step 20, not 20 steps after the change."""
    model = Quiet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(1)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        _steps(model, opt, 15, gen)
        model.extra = nn.Linear(5, 3)
        opt.add_param_group({"params": model.extra.parameters()})
        _steps(model, opt, 5, gen)
        alerts = [e.step for e in w.events if e.kind == "vanishing" and e.layer == "body"]
    assert alerts == [20]


def test_the_change_is_announced_once_at_info(caplog):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    with caplog.at_level(logging.INFO, logger="gradwatch"), gradwatch_torch.watch(model, opt, sinks=["memory"]):
        _steps(model, opt, 1, gen)
        model.grow(opt)
        _steps(model, opt, 3, gen)
    lines = [r.getMessage() for r in caplog.records if "watched parameters changed" in r.getMessage()]
    assert len(lines) == 1 and "+2 (extra.weight, extra.bias)" in lines[0] and "step 2" in lines[0]


# -- dtypes --------------------------------------------------------------------------------


class Mixed(nn.Module):
    """Parameters of every dtype clip_grad_norm_ takes: complex64, float16, bfloat16, float64, float32."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
        self.h = nn.Parameter(torch.randn(3, dtype=torch.float16))
        self.b = nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
        self.d = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.f = nn.Parameter(torch.randn(3))

    def forward(self, x):  # x: (B, 3) float32
        z = (x.to(torch.complex64) @ self.c.T).abs().sum(1)
        return (z + (x * self.h.float()).sum(1) + (x * self.b.float()).sum(1) + (x.double() * self.d).sum(1).float() + x @ self.f).square().mean()


def test_every_dtype_is_measured_as_get_total_norm_measures_it():
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        opt.zero_grad()
        model(torch.randn(6, 3)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.step()  # a second step: measuring did not stop after the first
        records = w.records
    assert len(records) == 2
    rec = records[0]
    for name, g in grads.items():
        wide = torch.complex128 if g.is_complex() else torch.float64
        assert rec.param_norms[name] == pytest.approx(torch.linalg.vector_norm(g.to(wide)).item(), rel=1e-6), name
    want = torch.nn.utils.get_total_norm(list(grads.values())).item()
    assert rec.global_norm == pytest.approx(want, rel=2e-3)  # get_total_norm reduces fp16/bf16 in their own precision


def test_fixed_clipping_of_every_dtype_equals_clip_grad_norm():
    model = Mixed()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    xs = [torch.randn(6, 3) for _ in range(3)]
    with gradwatch_torch.watch(model, opt, policy="fixed", max_norm=0.1, sinks=["memory"]) as w:
        for x in xs:
            opt.zero_grad()
            model(x).backward()
            opt.step()
        assert all(r.clip is not None and r.clip.scale < 1 for r in w.records)
    for x in xs:
        ref_opt.zero_grad()
        ref(x).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        tol = 1e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-5
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


def test_agc_clips_a_complex_weight_unit_by_unit():
    layer = nn.Linear(3, 4, bias=False).to(torch.complex64)
    w0 = layer.weight.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    with gradwatch_torch.watch(layer, opt, policy="agc", sinks=["memory"]) as w:
        layer(torch.randn(5, 3, dtype=torch.complex64)).abs().sum().backward()
        g = layer.weight.grad.clone()
        opt.step()
        rec = w.records[-1]
    # AGC (Brock et al. 2021), per output row: clip ||g_i|| to 0.01 * max(||w_i||, 1e-3).
    cap = 0.01 * w0.abs().square().sum(1, keepdim=True).sqrt().clamp(min=1e-3)
    gn = g.abs().square().sum(1, keepdim=True).sqrt()
    want = w0 - g * torch.where(gn > cap, cap / gn, torch.ones_like(gn))
    assert rec.clip is not None and rec.clip.scale < 1
    torch.testing.assert_close(layer.weight.detach(), want, rtol=1e-5, atol=1e-6)


def test_close_removes_the_registration_hooks():
    from torch.nn.modules import module as nn_module

    before = (len(nn_module._global_parameter_registration_hooks), len(nn_module._global_module_registration_hooks))
    model = Net()
    w = gradwatch_torch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), sinks=["memory"])
    assert len(nn_module._global_parameter_registration_hooks) == before[0] + 1
    w.close()
    after = (len(nn_module._global_parameter_registration_hooks), len(nn_module._global_module_registration_hooks))
    assert after == before


def test_a_deleted_submodule_is_dropped_at_the_next_full_check(monkeypatch):
    import gc
    import weakref

    from gradwatch_torch import _paramset

    monkeypatch.setattr(_paramset, "FULL_CHECK_EVERY", 3)
    model = nn.Sequential(nn.Linear(5, 3))
    model.add_module("unused", nn.Linear(2, 2))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    gone = weakref.ref(model.unused.weight)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        del model.unused  # no torch.nn hook announces a deletion
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(4, 5)).sum().backward()
            opt.step()
        gc.collect()
        assert w.monitor.names == ("0.weight", "0.bias")
        assert gone() is None  # the watch holds nothing of the deleted module
