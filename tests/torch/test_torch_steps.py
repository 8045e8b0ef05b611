"""One record per real optimizer step, and a watch that records nothing says so."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn

import gradwatch


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


class _MyAdam(torch.optim.Adam):
    """A subclass whose step() calls the parent's (both wrapped by torch's step hooks once
    an instance of the parent exists)."""

    def step(self, closure=None):  # type: ignore[override]
        return super().step(closure)


def test_subclass_optimizer_calling_super_step_is_measured_once_per_step():
    torch.optim.Adam(nn.Linear(2, 2).parameters())  # a parent instance: Adam.step is now wrapped too
    model = _mlp()
    opt = _MyAdam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(3)
    expected = []
    with gradwatch.watch(model, opt, policy="fixed", max_norm=0.5, sinks=["memory"]) as w:
        for _ in range(10):
            opt.zero_grad()
            x = torch.randn(8, 5, generator=gen) * 10
            nn.functional.mse_loss(model(x), torch.zeros(8, 3)).backward()
            expected.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            opt.step()
        records = w.records
    assert [r.step for r in records] == list(range(1, 11))
    assert [r.global_norm for r in records] == pytest.approx(expected, rel=1e-5)
    assert [r.clip.scale for r in records] == pytest.approx([min(1.0, 0.5 / n) for n in expected], rel=1e-5)
    assert any(r.clip.scale < 1 for r in records)


def test_a_step_that_raised_does_not_stop_the_next_from_being_measured():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    boom = {"on": True}

    def fail(optimizer, args, kwargs):
        if boom["on"]:
            raise RuntimeError("user hook failed")

    with gradwatch.watch(model, opt, sinks=["memory"]) as w:
        opt.register_step_post_hook(fail)
        nn.functional.mse_loss(model(torch.randn(4, 5)), torch.zeros(4, 3)).backward()
        with pytest.raises(RuntimeError):
            opt.step()
        boom["on"] = False
        opt.step()
        assert [r.step for r in w.records] == [1, 2]


def _backward(model):
    nn.functional.mse_loss(model(torch.randn(4, 5)), torch.zeros(4, 3)).backward()


def test_backward_passes_without_any_step_are_reported_once(caplog):
    from gradwatch_torch.attach import NO_STEP_WARNING_AFTER

    model = _mlp()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        w = gradwatch.watch(model, sinks=["memory"])
        for _ in range(NO_STEP_WARNING_AFTER * 2):
            _backward(model)
        during = [r.getMessage() for r in caplog.records if "recorded 0 steps" in r.getMessage()]
        w.close()
        at_close = [r.getMessage() for r in caplog.records if "recorded 0 steps" in r.getMessage()]
    assert len(during) == 1 and "watch.step()" in during[0] and "optimizer" in during[0]
    assert len(at_close) == 2 and "closed" in at_close[1]


def test_no_warning_when_steps_are_recorded(caplog):
    model = _mlp()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with gradwatch.watch(model, sinks=["memory"]) as w:
            for _ in range(NO_STEPS := 20):
                _backward(model)
                w.step()
                model.zero_grad()
        assert len(w.records) == NO_STEPS
    assert not [r for r in caplog.records if "recorded 0 steps" in r.getMessage()]


def test_closing_a_watch_that_never_saw_a_backward_pass_is_silent(caplog):
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        gradwatch.watch(_mlp(), sinks=["memory"]).close()
    assert not caplog.records
