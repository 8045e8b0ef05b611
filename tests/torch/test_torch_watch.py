"""Attaching, measuring and clipping through the public API, against torch.autograd and
torch.nn.utils."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn
from torch_helpers import SeqRegressor

import gradwatch
import gradwatch_torch


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(n=8):
    return torch.randn(n, 5), torch.randn(n, 3)


def _train(model, opt, steps, seed=1, before_step=None):
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if before_step is not None:
            before_step(i)
        opt.step()


def test_watch_dispatches_to_the_torch_backend():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, sinks=["memory"]) as w:
        _train(model, opt, 2)
        assert [r.step for r in w.records] == [1, 2]


def test_param_norms_match_autograd_and_global_norm_matches_get_total_norm():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {}

    def grab(i):
        seen.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        _train(model, opt, 1, before_step=grab)
        rec = w.records[-1]
    assert set(rec.param_norms) == {n for n, _ in model.named_parameters()}
    for name, g in seen.items():
        assert rec.param_norms[name] == pytest.approx(torch.linalg.vector_norm(g).item(), rel=1e-6)
    total = torch.nn.utils.get_total_norm(list(seen.values())).item()
    assert rec.global_norm == pytest.approx(total, rel=1e-6)
    # layer norms aggregate the parameters of each module
    l0 = (seen["0.weight"].square().sum() + seen["0.bias"].square().sum()).sqrt().item()
    assert rec.layer_norms["0"] == pytest.approx(l0, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_reduce_without_overflow(dtype):
    model = nn.Linear(300, 300).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        for p in model.parameters():
            p.grad = torch.full_like(p, 1000.0)  # sum of squares 9e10: far beyond fp16
        opt.step()
        rec = w.records[-1]
    assert rec.nonfinite == ()
    want = (1000.0**2 * (300 * 300 + 300)) ** 0.5
    assert rec.global_norm == pytest.approx(want, rel=1e-3)


def test_fixed_policy_equals_clip_grad_norm():
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    with gradwatch_torch.watch(model, opt, policy="fixed", max_norm=0.05, sinks=["memory"]) as w:
        _train(model, opt, 5)
        clips = [r.clip for r in w.records]
    _train(ref, ref_opt, 5, before_step=lambda i: torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05))
    assert all(c is not None and c.scale < 1.0 for c in clips)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sparse_embedding_gradients_are_measured_and_clipped():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 4, sparse=True)
            self.head = nn.Linear(4, 1)

        def forward(self, idx):
            return self.head(self.emb(idx)).square().mean()

    model = Bag()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.tensor([[1, 1, 2], [3, 1, 4]])
    with gradwatch_torch.watch(model, opt, policy="fixed", max_norm=1e-3, sinks=["memory"]) as w:
        opt.zero_grad()
        model(idx).backward()
        dense = model.emb.weight.grad.to_dense().clone()
        opt.step()
        rec = w.records[-1]
    assert rec.param_norms["emb.weight"] == pytest.approx(dense.norm().item(), rel=1e-6)
    assert rec.clip.scale < 1
    total = (
        (
            model.emb.weight.grad.to_dense().square().sum()
            + model.head.weight.grad.square().sum()
            + model.head.bias.grad.square().sum()
        )
        .sqrt()
        .item()
    )
    assert total == pytest.approx(1e-3, rel=1e-3)


def test_the_log_line_explains_norms_clipped_by_the_loop_before_optimizer_step(caplog):
    """The user's own clip_grad_norm_ before optimizer.step() (lucidrains' minGRU train.py
    does this): gradwatch sees the clipped gradient, and the INFO line says so instead of
    printing "min 0.5, mean 0.5, max 0.5" unexplained."""
    import logging

    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    w = gradwatch_torch.watch(model, opt, log_every=10, sinks=["logging", "memory"])
    pre = []
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        _train(
            model, opt, 10, before_step=lambda i: pre.append(float(nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        )
    w.close()
    assert min(pre) > 0.05  # every step clipped by the loop
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 10:")]
    assert "0.05 on every step: clipped before gradwatch measured?" in line
    assert "policy='fixed', max_norm=0.05" in line
    assert max(r.global_norm for r in w.records) == pytest.approx(0.05, rel=1e-5)  # what the optimizer received


def test_fixed_policy_leaves_gradients_alone_below_threshold():
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    with gradwatch_torch.watch(model, opt, policy="fixed", max_norm=1e6, sinks=["memory"]):
        _train(model, opt, 3)
    _train(ref, ref_opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_agc_policy_matches_numpy_reference():
    from tests.reference import agc_clip

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}

    def grab(i):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    with gradwatch_torch.watch(model, opt, policy="agc", sinks=["memory"]) as w:
        _train(model, opt, 1, before_step=grab)
        rec = w.records[-1]
    assert rec.clip is not None and rec.clip.policy == "agc"
    for n, p in model.named_parameters():
        clipped = agc_clip(before[n].double().numpy(), grads[n].double().numpy(), 0.01, 1e-3, 0)
        want = before[n].double() - torch.from_numpy(clipped)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_observe_mode_leaves_training_bitwise_identical():
    torch.manual_seed(0)
    model = SeqRegressor(nn.LSTM, 4, 8, num_layers=2, dropout=0.2)
    ref = copy.deepcopy(model)

    def run(m, watched):
        torch.manual_seed(5)  # dropout draws from the global RNG: gradwatch must not
        opt = torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-3)
        w = gradwatch_torch.watch(m, opt, profile_every=1, sinks=["memory"]) if watched else None
        for _ in range(6):
            opt.zero_grad()
            m(torch.randn(9, 3, 4)).backward()
            opt.step()
        if w is not None:
            assert len(w.records) == 6 and w.records[-1].temporal
            w.close()

    run(model, True)
    run(ref, False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_only_real_optimizer_steps_are_measured():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        for _ in range(3):  # 3 optimizer steps of 4 accumulated micro-batches each
            opt.zero_grad()
            for _ in range(4):
                x, y = _batch()
                nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert [r.step for r in w.records] == [1, 2, 3]


def test_manual_step_without_optimizer():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch_torch.watch(model, sinks=["memory"], policy="fixed", max_norm=1e-3) as w:
        x, y = _batch()
        nn.functional.mse_loss(model(x), y).backward()
        rec = w.step()
        assert rec is not None and rec.step == 1 and rec.clip.scale < 1
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
        assert total == pytest.approx(1e-3, rel=1e-3)  # clipped in place
        opt.step()


def test_manual_step_with_optimizer_attached_is_an_error():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        gradwatch_torch.watch(model, opt, sinks=["memory"]) as w,
        pytest.raises(gradwatch.GradwatchError, match="twice"),
    ):
        w.step()


def test_grad_scaler_sees_unscaled_gradients():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    grads = {}
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        x, y = _batch()
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.unscale_(opt)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        scaler.step(opt)
        scaler.update()
        rec = w.records[-1]
    for n, g in grads.items():
        assert rec.param_norms[n] == pytest.approx(g.norm().item(), rel=1e-6)


def test_steps_the_grad_scaler_skips_are_not_seen():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with gradwatch_torch.watch(model, opt, sinks=["memory"]) as w:
        for poison in (False, True, False):
            x, y = _batch()
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            if poison:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)  # unscales, finds inf, skips optimizer.step(): no pre-hook
            scaler.update()
        assert [r.step for r in w.records] == [1, 2]
        assert all(not r.nonfinite for r in w.records)


def test_parameter_names_of_ddp_and_compiled_wrappers_are_unwrapped():
    from gradwatch_torch.attach import unwrap_model

    model = _mlp()
    holder = nn.Module()
    holder.module = model
    holder.__class__ = type("DistributedDataParallel", (nn.Module,), {})
    assert unwrap_model(holder) is model


def test_watching_a_model_twice_is_an_error_until_closed():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch_torch.watch(model, opt, sinks=["memory"])
    with pytest.raises(gradwatch.GradwatchError, match="already watched"):
        gradwatch_torch.watch(model, opt, sinks=["memory"])
    w.close()
    gradwatch_torch.watch(model, opt, sinks=["memory"]).close()


def test_close_removes_every_hook_and_is_idempotent():
    model = nn.Sequential(SeqRegressor(nn.LSTM, 4, 8, num_layers=1))
    cellmodel = nn.LSTMCell(4, 4)
    holder = nn.ModuleDict({"a": model, "c": cellmodel})
    opt = torch.optim.SGD(holder.parameters(), lr=0.1)
    w = gradwatch_torch.watch(holder, opt, sinks=["memory"])
    mods = list(holder.modules())
    assert any(m._forward_pre_hooks for m in mods)
    assert opt._optimizer_step_pre_hooks
    w.close()
    w.close()
    for m in mods:
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert not m._forward_pre_hooks_with_kwargs and not m._forward_hooks_with_kwargs
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_watch_keeps_no_strong_reference_to_the_model():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch_torch.watch(model, opt, sinks=["memory"])
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    w.close()


def test_bad_optimizer_argument_is_a_clear_error():
    with pytest.raises(gradwatch.GradwatchError, match="torch.optim.Optimizer"):
        gradwatch_torch.watch(_mlp(), optimizer="adam", sinks=["memory"])


def test_a_bug_in_measuring_never_reaches_the_training_loop(monkeypatch, caplog):
    from gradwatch_torch import _tensors

    model = _mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch_torch.watch(model, opt, sinks=["memory"])

    def boom(self, grads=None):
        raise RuntimeError("injected")

    monkeypatch.setattr(_tensors.GradGroups, "measure", boom)
    with caplog.at_level("ERROR", logger="gradwatch"):
        _train(model, opt, 3)
    assert sum("injected" in r.getMessage() for r in caplog.records) == 1
    _train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    w.close()


def test_torch_compiled_model_trains_correctly_with_gradwatch():
    torch._dynamo.reset()
    model = _mlp()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    with gradwatch_torch.watch(compiled, opt, sinks=["memory"]) as w:
        _train(compiled, opt, 3)
        assert [r.step for r in w.records] == [1, 2, 3]
        assert set(w.records[-1].param_norms) == {n for n, _ in model.named_parameters()}
    _train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), 3)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_torch_compiled_recurrent_model_trains_and_profiles_correctly():
    """Recurrent modules graph-break under torch.compile (torch 2.13 does not trace nn.RNN/LSTM/GRU), so the probes run
    eagerly; inductor compiles the rest. Weights and the first profile match eager."""
    torch._dynamo.reset()
    model = SeqRegressor(nn.LSTM, 4, 8)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model)
    xs = [torch.randn(6, 2, 4) for _ in range(3)]
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    with gradwatch_torch.watch(compiled, opt, profile_every=1, sinks=["memory"]) as w:
        for x in xs:
            opt.zero_grad()
            compiled(x).backward()
            opt.step()
        first = w.records[0].temporal["rnn"].norms
    x0 = xs[0].clone().requires_grad_()
    ref(x0).backward()
    want = x0.grad.square().sum((1, 2)).sqrt().tolist()
    assert first == pytest.approx(want, rel=1e-4)
    ref.zero_grad()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x in xs:
        ref_opt.zero_grad()
        ref(x).backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_memory_stays_flat_over_many_steps():
    import tracemalloc

    model = SeqRegressor(nn.GRU, 3, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(5, 2, 3)
    with gradwatch_torch.watch(model, opt, profile_every=1, keep=50, log_every=10, sinks=["memory"]) as w:

        def run(n):
            for _ in range(n):
                opt.zero_grad()
                model(x).backward()
                opt.step()

        # Trace from the start, so that what is alive at the baseline (the kept records,
        # events, caches) was allocated under tracing too; then only growth counts.
        tracemalloc.start()
        run(400)
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        run(1200)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert len(w.records) <= 50
        assert len(w.events) <= 50
        assert w.records[-1].step == 1600
    # Unbounded growth would be a record's worth (~2 KB) or more per step: > 2 MB here.
    assert grown < 100_000, f"memory grew by {grown} bytes over 1200 steps"


def test_plugin_imports_without_importing_torch_and_ignores_other_objects():
    import subprocess
    import sys

    code = "import sys, gradwatch_torch, gradwatch_torch.plugin; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    from gradwatch_torch.plugin import gradwatch_attach

    assert gradwatch_attach(target=object(), optimizer=None, monitor=None) is None


def _lstm_steps(model, opt, n=3):
    gen = torch.Generator().manual_seed(3)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(5, 2, 4, generator=gen)).backward()
        opt.step()


def _errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_a_failing_optional_measurement_turns_off_only_itself(monkeypatch, caplog):
    from gradwatch_torch import _recurrent

    def boom(self):
        raise RuntimeError("gate bug")

    monkeypatch.setattr(_recurrent.SequenceProbe, "take_gates", boom)
    model = SeqRegressor(nn.LSTM, 4, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level("ERROR", logger="gradwatch"), gradwatch_torch.watch(model, opt, profile_every=1, policy="fixed", max_norm=1e-3, sinks=["memory"]) as w:
        _lstm_steps(model, opt)
        records = w.records
    assert [r.step for r in records] == [1, 2, 3]
    assert all(r.temporal and r.spectral and r.clip is not None and r.clip.scale < 1 and not r.gates for r in records)
    errors = _errors(caplog)
    assert len(errors) == 1
    assert "the forget-gate statistics of recurrent layer 'rnn' failed at step 1" in errors[0]
    assert "this measurement is off for the rest of this run" in errors[0]


def test_a_malformed_probe_result_fails_its_own_measurement_not_the_step(monkeypatch, caplog):
    from gradwatch_torch import _recurrent

    def wrong_size(self):
        return [("weight_hh_l0", ("a", "b"), torch.ones(5))]  # 2 labels, 5 values

    monkeypatch.setattr(_recurrent.SequenceProbe, "spectral", wrong_size)
    model = SeqRegressor(nn.LSTM, 4, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level("ERROR", logger="gradwatch"), gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        _lstm_steps(model, opt)
        records = w.records
    assert len(records) == 3 and all(r.temporal and not r.spectral for r in records)
    errors = _errors(caplog)
    assert len(errors) == 1 and "the spectral norms of recurrent layer 'rnn'" in errors[0]


def test_a_failing_agc_stops_clipping_but_not_measuring(monkeypatch, caplog):
    from gradwatch_torch import attach as attach_mod

    def boom(*a, **k):
        raise RuntimeError("agc bug")

    monkeypatch.setattr(attach_mod, "agc_factors", boom)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level("ERROR", logger="gradwatch"), gradwatch_torch.watch(model, opt, policy="agc", sinks=["memory"]) as w:
        _train(model, opt, 3)
        records = w.records
    assert [r.step for r in records] == [1, 2, 3] and all(r.clip is None for r in records)
    errors = _errors(caplog)
    assert len(errors) == 1 and "unit-wise clipping (policy 'agc') failed at step 1" in errors[0] and "no longer clipped" in errors[0]


def test_a_core_failure_names_what_stopped(monkeypatch, caplog):
    from gradwatch_torch import _tensors

    def boom(self, grads=None):
        raise RuntimeError("injected")

    monkeypatch.setattr(_tensors.GradGroups, "measure", boom)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level("ERROR", logger="gradwatch"), gradwatch_torch.watch(model, opt, sinks=["memory"]):
        _train(model, opt, 2)
    errors = _errors(caplog)
    assert len(errors) == 1
    assert "measuring the gradient norms failed at step 1" in errors[0] and "no more records, clipping or non-finite checks" in errors[0]
