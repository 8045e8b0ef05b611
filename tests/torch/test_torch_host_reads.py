"""Issue 20: a quiet step (neither profiled nor flushed) reads nothing back to the host.

What gradwatch's own code reads is counted during whole watched training steps on the CPU
through a ``TorchFunctionMode``: every tensor-to-host conversion (``item``, ``tolist``,
``cpu``, ``numpy``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``,
``__array__``) and every op whose output size depends on the data (``nonzero``,
``masked_select``, ``unique``, ``repeat_interleave``, indexing with a boolean mask), when
the nearest caller outside torch is a file of gradwatch. A deliberate ``.item()`` in
gradwatch's code is counted (the positive control).
"""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn
from torch.overrides import TorchFunctionMode

import gradwatch
import gradwatch_torch
import gradwatch_torch.attach as attach_mod

Tensor = torch.Tensor
_TO_HOST = {
    Tensor.item, Tensor.tolist, Tensor.cpu, Tensor.numpy, Tensor.__bool__, Tensor.__float__,
    Tensor.__int__, Tensor.__index__, Tensor.__array__,
    torch.nonzero, Tensor.nonzero, torch.masked_select, Tensor.masked_select, torch.unique, Tensor.unique,
    torch.repeat_interleave, Tensor.repeat_interleave, torch.argwhere, Tensor.argwhere,
}  # fmt: skip
_OURS = tuple(os.path.dirname(m.__file__) + os.sep for m in (gradwatch, gradwatch_torch))
_TORCH = os.path.dirname(torch.__file__) + os.sep


def _bool_mask(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


class HostReads(TorchFunctionMode):
    """Counts host reads made by gradwatch's own code (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reads = func in _TO_HOST
        if func is Tensor.__getitem__ and _bool_mask(args):
            reads = True
        if reads:
            f = sys._getframe(1)
            while f is not None and f.f_code.co_filename.startswith(_TORCH):
                f = f.f_back
            if f is not None and f.f_code.co_filename.startswith(_OURS):
                self.reads.append(f"{getattr(func, '__name__', func)} at {f.f_code.co_filename}:{f.f_lineno}")
        return func(*args, **kwargs)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(8, 8) for _ in range(20)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _train(model, opt, steps, gen, counter=None):
    """Per step: the reads gradwatch made during the whole step (forward, backward, step)."""
    per_step = []
    for _ in range(steps):
        x = torch.randn(16, 8, generator=gen)
        mode = HostReads()
        with mode:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), torch.zeros(16, 2)).backward()
            opt.step()
        per_step.append(mode.reads)
    return per_step


@pytest.mark.parametrize("policy", [None, "zclip", "fixed", "autoclip"])
def test_quiet_steps_read_nothing_to_the_host(policy):
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, opt, policy=policy, sinks=["memory"]) as w:  # defaults: profile_every=10, log_every=50
        reads = _train(model, opt, 30, gen)
        assert len(w.records) == 30
    for step, got in enumerate(reads, start=1):
        quiet = step != 1 and step % 10 != 0
        if quiet:
            assert got == [], f"step {step}: {got}"
        else:
            assert got, f"step {step} is a read step"


def test_the_counter_sees_a_deliberate_item_in_gradwatchs_code(monkeypatch):
    """The positive control: the same count with one .item() put into gradwatch's hot path."""
    ns: dict = {}
    code = compile("def follow(self):\n    torch.ones(1).item()\n    return orig(self)\n", attach_mod.__file__, "exec")
    exec(code, {"torch": torch, "orig": attach_mod.TorchAttachment._follow_params}, ns)  # noqa: S102 - the positive control
    monkeypatch.setattr(attach_mod.TorchAttachment, "_follow_params", ns["follow"])
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, opt, policy="zclip", sinks=["memory"]):
        reads = _train(model, opt, 3, torch.Generator().manual_seed(0))
    assert len(reads[1]) == 1 and reads[1][0].startswith("item")


def test_quiet_steps_are_recorded_in_order_with_their_own_step_and_events():
    """Records of quiet steps come back at the next read (records, a profiled step,
    close) with their own step numbers; a NaN on a quiet step under "warn" is reported
    with that step; zclip's decisions are those of the host policy on the same norms."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    host = gradwatch.Monitor(policy=gradwatch.ZClip(warmup=5), sinks=[])
    norms = []
    with gradwatch.watch(model, opt, policy=gradwatch.ZClip(warmup=5), sinks=["memory"]) as w:
        for step in range(1, 26):
            opt.zero_grad()
            target = torch.full((16, 2), 100.0 if step == 17 else 0.0)
            nn.functional.mse_loss(model(torch.randn(16, 8, generator=gen)), target).backward()
            if step == 13:
                model.head.bias.grad[0] = float("nan")
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]).double()).item())
            saved = model.head.bias.detach().clone()
            opt.step()
            if step == 13:  # "warn" let the NaN into the weights: put them back
                with torch.no_grad():
                    model.head.bias.copy_(saved)
        assert len(w.attachment._pending) == 5  # 21..25 still on the device (the step count reads them: API.md)
        records = w.records  # reading brings them back
        assert w.monitor.step_count == 25
        events = w.events
    assert [r.step for r in records] == list(range(1, 26))
    assert records[12].nonfinite == ("head.bias",)
    assert [e.step for e in events if e.kind == "nonfinite"] == [13]
    want = [host._host.decide(n) for n in norms]
    for r, d in zip(records, want):
        if r.step == 13:
            continue
        assert r.clip.scale == pytest.approx(d.scale, rel=1e-12) and r.clip.threshold == pytest.approx(d.threshold, rel=1e-12)
    assert records[16].clip.scale < 0.5  # the spike at a quiet step, clipped on the device


def test_the_monitors_step_count_and_records_are_up_to_date_between_host_reads():
    """API.md: watch.monitor.step_count is the optimizer steps seen, even while quiet
    steps' statistics wait on the device."""
    import gradwatch

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, sinks=[], log_every=50, profile_every=10) as w:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(5, 3)).square().mean().backward()
            opt.step()
        assert w.monitor.step_count == 4
        assert [r.step for r in w.monitor.records] == [1, 2, 3, 4]


@pytest.mark.parametrize("policy", [None, "zclip"])
def test_a_read_step_makes_exactly_one_transfer(policy):
    """Issue 20: a profiled or flushed step brings its own row and every quiet step's row
    still on the device to the host in one copy, not one for the pending rows and one for
    the step. Steps 1, 10, 20 are profiled (profile_every=10), 15 is flushed (log_every=15)."""
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, opt, policy=policy, sinks=["memory"], profile_every=10, log_every=15) as w:
        reads = _train(model, opt, 20, torch.Generator().manual_seed(0))
        records = w.records
    assert [r.step for r in records] == list(range(1, 21))
    for step in (1, 10, 15, 20):
        got = reads[step - 1]
        assert len(got) == 1 and got[0].startswith("numpy"), f"step {step}: {got}"
    assert all(reads[s - 1] == [] for s in range(1, 21) if s not in (1, 10, 15, 20))


def test_a_read_step_that_fails_still_records_the_quiet_steps_before_it(monkeypatch, caplog):
    """The read step brings the pending quiet rows in with its own; if packing its own row
    fails, gradwatch stops on this model but the quiet steps already measured are recorded."""

    def broken_cat_to(device, dtype):
        def concat(parts):
            raise RuntimeError("packing failed")

        return concat

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with gradwatch.watch(model, opt, sinks=["memory"], profile_every=6) as w:
        _train(model, opt, 5, torch.Generator().manual_seed(0))
        assert len(w.attachment._pending) == 4  # steps 2..5 on the device
        monkeypatch.setattr(attach_mod, "cat_to", broken_cat_to)
        _train(model, opt, 2, torch.Generator().manual_seed(1))  # step 6 (profiled) fails
        records = w.records
    assert [r.step for r in records] == [1, 2, 3, 4, 5]
    assert "packing failed" in caplog.text and "stops watching" in caplog.text
