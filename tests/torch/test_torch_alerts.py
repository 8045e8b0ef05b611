"""Alerts in a real PyTorch loop: a changed parameter set is not a spike; a jump is."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

import gradwatch


def _unfreeze_run(spike_at: int | None = None):
    torch.manual_seed(0)
    backbone = torch.nn.Linear(16, 16)
    head = torch.nn.Linear(16, 1)
    with torch.no_grad():
        head.weight.mul_(300.0)  # the backbone's gradient is ~100x the head's
    model = torch.nn.Sequential(backbone, head)
    backbone.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the same gradient scale all along
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    with gradwatch.watch(model, opt, sinks=["memory"], alert_every=0) as watch:
        for step in range(1, 121):
            if step == 51:
                backbone.requires_grad_(True)  # unfrozen: its parameters now have gradients
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            (loss * (50.0 if step == spike_at else 1.0)).backward()
            opt.step()
        return list(watch.records), [e for e in watch.events if e.kind == "exploding"]


def test_unfreezing_a_backbone_with_100x_the_heads_norm_raises_no_exploding_alert():
    records, exploding = _unfreeze_run()
    assert records[50].global_norm > 50 * records[49].global_norm  # the global norm jumps ...
    assert records[50].param_norms["1.weight"] == pytest.approx(records[49].param_norms["1.weight"], rel=1e-5)
    assert "0.weight" not in records[49].param_norms and "0.weight" in records[50].param_norms
    assert exploding == []  # ... and nothing exploded


def test_a_real_50x_spike_after_the_unfreeze_is_caught_at_its_step():
    _, exploding = _unfreeze_run(spike_at=100)
    assert [e.step for e in exploding] == [100]


def _set_forget_bias(lstm, layer: int, value: float) -> None:
    h = lstm.hidden_size
    with torch.no_grad():
        getattr(lstm, f"bias_ih_l{layer}")[h : 2 * h] = value
        getattr(lstm, f"bias_hh_l{layer}")[h : 2 * h] = 0.0


def test_the_remedy_quotes_the_alerted_recurrences_forget_bias_as_it_is_when_written():
    """Found in pytorch/examples' word_language_model (SGD, lr 20): an alert at step 120
    on recurrence l1 quoted the bias l0 had at attach. The remedy reads the alerted
    recurrence's bias when it writes the alert."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
    _set_forget_bias(lstm, 0, 2.5)
    _set_forget_bias(lstm, 1, -3.0)
    opt = torch.optim.SGD(lstm.parameters(), lr=0.0)
    x = torch.randn(6, 40, 3)
    with gradwatch.watch(lstm, opt, sinks=["memory"], profile_every=1, alert_every=0) as watch:
        for step in range(1, 4):
            if step == 3:
                _set_forget_bias(lstm, 1, -4.25)  # training moved it (here: by hand)
            opt.zero_grad()
            lstm(x)[0].pow(2).mean().backward()
            opt.step()
        events = [e for e in watch.events if e.kind == "vanishing"]
    assert events and all("(recurrence 'l1')" in e.message for e in events), [e.message for e in events]
    first, last = events[0].message, events[-1].message
    assert "(it is -3 now)" in first and "(it is -4.25 now)" in last, (first, last)
    assert "2.5" not in last
