"""optimizer.step(closure): the record is that step's gradient (the closure's first
evaluation), the clip is what the optimizer applies, LBFGS gets one record and one profile
per step. Ground truth: norms read from p.grad inside the tests' own closures, and
clip_grad_norm_ / unwatched runs."""

from __future__ import annotations

import copy
import logging

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn
from torch_helpers import optimizer_state_snapshot, snapshot, states_equal

import gradwatch
import gradwatch_torch


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _grad_norms(model):
    return {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}


def _total(model):
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()


class ClosureLoop:
    """A user's closure loop; reads the gradient of every evaluation, independently of gradwatch."""

    def __init__(self, model, opt, seed=1, spike_at=None, nan_at=None, clip=None):
        self.model, self.opt = model, opt
        self.gen = torch.Generator().manual_seed(seed)
        self.spike_at, self.nan_at, self.clip = spike_at, nan_at, clip
        self.evals: list[dict] = []  # per evaluation: {param: norm}, "total"
        self.first: list[dict] = []  # the first evaluation of each step

    def run(self, steps):
        for step in range(1, steps + 1):
            x, y = torch.randn(8, 5, generator=self.gen), torch.randn(8, 3, generator=self.gen)
            start = len(self.evals)

            def closure(step=step, x=x, y=y, start=start):
                self.opt.zero_grad()
                loss = nn.functional.mse_loss(self.model(x), y)
                if step == self.spike_at:
                    loss = loss * 1000.0
                loss.backward()
                if step == self.nan_at and len(self.evals) == start:
                    self.model[0].weight.grad[0, 0] = float("nan")
                self.evals.append({**_grad_norms(self.model), "total": _total(self.model)})
                if self.clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
                return loss

            self.opt.step(closure)
            self.first.append(self.evals[start])


def test_sgd_closure_records_this_steps_gradient():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loop = ClosureLoop(model, opt)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        loop.run(4)
        records = w.records
    assert [r.step for r in records] == [1, 2, 3, 4]
    for rec, seen in zip(records, loop.first):
        assert rec.global_norm == pytest.approx(seen["total"], rel=1e-6)
        for name, norm in rec.param_norms.items():
            assert norm == pytest.approx(seen[name], rel=1e-6)


def test_sgd_closure_spike_is_reported_at_its_own_step():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    loop = ClosureLoop(model, opt, spike_at=30)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        loop.run(31)
        spikes = [e.step for e in w.events if e.kind == "exploding"]
        norms = [r.global_norm for r in w.records]
    assert spikes == [30]
    assert norms[29] == pytest.approx(loop.first[29]["total"], rel=1e-6)


def test_adam_closure_fixed_policy_equals_clip_grad_norm_inside_the_closure():
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    with gradwatch_torch.watch(model, opt, policy="fixed", max_norm=0.05, sinks=["memory"]) as w:
        ClosureLoop(model, opt).run(5)
        clips = [r.clip for r in w.records]
    ClosureLoop(ref, ref_opt, clip=0.05).run(5)
    assert all(c is not None and c.scale < 1.0 for c in clips)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sgd_closure_clip_is_logged_only_when_applied():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = ClosureLoop(model, opt)
    applied = []
    with gradwatch_torch.watch(model, opt, policy="fixed", max_norm=0.05, sinks=["memory"]) as w:
        hook = opt.register_step_post_hook(lambda *_: applied.append(_total(model)))
        loop.run(3)
        hook.remove()
        scales = [r.clip.scale for r in w.records]
    for seen, scale, after in zip(loop.first, scales, applied):
        assert scale < 1.0 and after == pytest.approx(seen["total"] * scale, rel=1e-5)


def test_adam_closure_skip_leaves_weights_and_state_bitwise_unchanged():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    ClosureLoop(model, opt).run(2)  # Adam state exists before the watch
    before_w, before_s = snapshot(model), optimizer_state_snapshot(opt)
    with gradwatch_torch.watch(model, opt, on_nonfinite="skip", sinks=["memory"]) as w:
        ClosureLoop(model, opt, nan_at=1).run(1)
        rec = w.records[-1]
    assert rec.skipped and rec.nonfinite == ("0.weight",)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), before_w))
    assert states_equal(optimizer_state_snapshot(opt), before_s)


def test_sgd_closure_raise_leaves_step_before_any_change():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ClosureLoop(model, opt).run(1)
    before_w, before_s = snapshot(model), optimizer_state_snapshot(opt)
    with (
        gradwatch_torch.watch(model, opt, on_nonfinite="raise", sinks=["memory"]),
        pytest.raises(gradwatch.NonFiniteGradientError) as info,
    ):
        ClosureLoop(model, opt, nan_at=1).run(1)
    assert info.value.step == 1 and info.value.params == ("0.weight",)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), before_w))
    assert states_equal(optimizer_state_snapshot(opt), before_s)


# -- LBFGS ---------------------------------------------------------------------------------


def _lbfgs(model, **kw):
    return torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=6, history_size=5, **kw)


def _same(a, b) -> bool:
    """Deep equality of optimizer state (LBFGS keeps lists of tensors)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _lbfgs_state(opt):
    return [dict(s) for s in opt.state.values()]


def test_lbfgs_records_one_step_per_step_with_the_first_evaluations_gradient():
    model = _mlp()
    opt = _lbfgs(model)
    loop = ClosureLoop(model, opt)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        loop.run(3)
        records = w.records
    assert len(loop.evals) > 3 * 2  # LBFGS evaluated the closure several times per step
    assert [r.step for r in records] == [1, 2, 3]
    for rec, seen in zip(records, loop.first):
        assert rec.global_norm == pytest.approx(seen["total"], rel=1e-6)


def test_lbfgs_observe_only_is_bitwise_identical_to_an_unwatched_run():
    model = _mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = _lbfgs(model), _lbfgs(ref)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]):
        ClosureLoop(model, opt).run(3)
    ClosureLoop(ref, ref_opt).run(3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert _same(_lbfgs_state(opt), _lbfgs_state(ref_opt))


@pytest.mark.parametrize("policy", ["fixed", "zclip", "agc"])
def test_lbfgs_refuses_a_clipping_policy_at_watch(policy):
    model = _mlp()
    with pytest.raises(gradwatch.ConfigError, match="LBFGS") as info:
        gradwatch_torch.watch(model, _lbfgs(model), policy=policy, sinks=["memory"])
    assert info.value.option == "policy" and "policy=None" in str(info.value)
    gradwatch_torch.watch(model, _lbfgs(model), sinks=["memory"]).close()  # nothing was left attached


def test_lbfgs_skip_leaves_weights_and_lbfgs_state_unchanged():
    model = _mlp()
    opt = _lbfgs(model)
    ClosureLoop(model, opt).run(2)
    before_w, before_s = snapshot(model), copy.deepcopy(_lbfgs_state(opt))
    with gradwatch_torch.watch(model, opt, on_nonfinite="skip", sinks=["memory"]) as w:
        loop = ClosureLoop(model, opt, seed=3, nan_at=1)
        loop.run(1)
        assert w.records[-1].skipped
    assert len(loop.evals) == 1  # LBFGS saw no gradient and returned at once
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), before_w))
    assert _same(_lbfgs_state(opt), before_s)


def test_lbfgs_skip_on_the_first_step_leaves_no_lbfgs_state():
    model = _mlp()
    opt = _lbfgs(model)
    with gradwatch_torch.watch(model, opt, on_nonfinite="skip", sinks=["memory"]):
        ClosureLoop(model, opt, nan_at=1).run(1)
    assert len(opt.state) == 0


class CellSeq(nn.Module):
    """An LSTMCell driven over the sequence in Python, as time_sequence_prediction does."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(2, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x):  # x: (T, B, 2)
        h = c = torch.zeros(x.shape[1], 6)
        outs = []
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
            outs.append(self.head(h))
        return torch.stack(outs)


def _cell_profile_reference(model, x, y):
    """Per-timestep ||dL/dx_t|| of one evaluation, by autograd on a copy."""
    ref = copy.deepcopy(model)
    xs = [x[t].clone().requires_grad_() for t in range(x.shape[0])]
    nn.functional.mse_loss(ref(torch.stack(xs)), y).backward()
    return [float(v.grad.norm()) for v in xs]


def test_lbfgs_profiles_one_pass_over_the_sequence_per_step():
    torch.manual_seed(0)
    model = CellSeq()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    x, y = torch.randn(7, 3, 2), torch.randn(7, 3, 1)
    want = _cell_profile_reference(model, x, y)
    evals = []

    def closure():
        evals.append(1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        for _ in range(2):
            opt.step(closure)
        records = w.records
    assert len(evals) > 4
    assert [len(r.temporal["cell"].norms) for r in records] == [7, 7]
    assert records[0].temporal["cell"].norms == pytest.approx(want, rel=1e-5)


def test_lbfgs_sequence_layer_profile_is_the_first_evaluations():
    torch.manual_seed(0)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(2, 6)
            self.head = nn.Linear(6, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    model = Seq()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    x, y = torch.randn(7, 3, 2), torch.randn(7, 3, 1)
    xr = x.clone().requires_grad_()
    nn.functional.mse_loss(copy.deepcopy(model)(xr), y).backward()
    want = xr.grad.square().sum((1, 2)).sqrt().tolist()

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        opt.step(closure)
        got = w.records[0].temporal["rnn"].norms
    assert got == pytest.approx(want, rel=1e-5)


def test_plain_steps_after_closure_steps_are_still_profiled():
    torch.manual_seed(0)
    model = CellSeq()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(5, 2, 2), torch.randn(5, 2, 1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        opt.step(closure)
        closure()
        opt.step()
        lengths = [len(r.temporal["cell"].norms) for r in w.records]
    assert lengths == [5, 5]


def test_an_optimizer_evaluating_the_closure_twice_with_a_policy_warns_once(caplog):
    class TwoLook(torch.optim.Optimizer):
        """Evaluates the closure twice per step and applies the second gradient."""

        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure):
            with torch.enable_grad():
                closure()
                loss = closure()
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=-group["lr"])
            return loss

    model = _mlp()
    opt = TwoLook(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="gradwatch"), gradwatch_torch.watch(model, opt, policy="fixed", max_norm=0.01, sinks=["memory"]) as w:
        ClosureLoop(model, opt).run(3)
        assert len(w.records) == 3
    warnings = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert len(warnings) == 1 and "TwoLook" in warnings[0] and "policy=None" in warnings[0]
