"""Through-time diagnostics of recurrent layers, against torch.autograd and torch.linalg."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch_helpers import LastStep, SeqRegressor

import gradwatch_torch

LENGTHS = [5, 7, 2]


def _input(batch_first, packed, requires_grad=False):
    x = torch.randn(3, 7, 4) if batch_first else torch.randn(7, 3, 4)
    x.requires_grad_(requires_grad)
    inp = pack_padded_sequence(x, LENGTHS, batch_first=batch_first, enforce_sorted=False) if packed else x
    return x, inp


def _autograd_profile(model, x, batch_first, packed):
    xr = x.detach().clone().requires_grad_()
    inp = pack_padded_sequence(xr, LENGTHS, batch_first=batch_first, enforce_sorted=False) if packed else xr
    model(inp).backward()
    g = xr.grad
    return (g.square().sum((0, 2)) if batch_first else g.square().sum((1, 2))).sqrt().numpy()


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_profile_matches_autograd_and_keeps_parameter_grads(cls, batch_first, bidirectional, packed):
    model = SeqRegressor(cls, 4, 6, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
    ref = copy.deepcopy(model)
    x, inp = _input(batch_first, packed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        model(inp).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        rec = w.records[-1]
    want = _autograd_profile(ref, x, batch_first, packed)
    np.testing.assert_allclose(rec.temporal["rnn"].norms, want, rtol=1e-5, atol=1e-12)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, ref.parameters()))
    assert x.grad is None  # the user's tensor is untouched


def test_profile_of_an_input_that_requires_grad_counts_this_layer_only():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(4, 4)
            self.rnn = nn.GRU(4, 6)
            self.head = nn.Linear(6, 1)

        def forward(self, x):
            e = self.emb(x)
            out, _ = self.rnn(e)
            return self.head(out).square().mean() + 10.0 * e.square().mean()  # e used twice

    model = TwoUses()
    ref = copy.deepcopy(model)
    x = torch.randn(7, 3, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        model(x).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        got = w.records[-1].temporal["rnn"].norms
    e = ref.emb(x)
    e_rnn = e.detach().requires_grad_()
    out, _ = ref.rnn(e_rnn)
    ref.head(out).square().mean().backward()
    want = e_rnn.grad.square().sum((1, 2)).sqrt().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    ref.zero_grad()
    ref(x).backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, ref.parameters()))


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_cells_in_a_python_loop_form_the_timesteps(cls):
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cls(4, 6)
            self.head = nn.Linear(6, 1)

        def forward(self, x):
            h = None
            for t in range(x.shape[0]):
                h = self.cell(x[t], h)
            hh = h[0] if isinstance(h, tuple) else h
            return self.head(hh).square().mean()

    model = Loop()
    ref = copy.deepcopy(model)
    x = torch.randn(6, 2, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        model(x).backward()
        opt.step()
        got = w.records[-1].temporal["cell"].norms
    xr = x.clone().requires_grad_()
    ref(xr).backward()
    want = xr.grad.square().sum((1, 2)).sqrt().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("use_cells,reentrant", [(False, False), (True, False), (False, True)])
def test_activation_checkpointing_does_not_duplicate_timesteps(use_cells, reentrant):
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRUCell(4, 6) if use_cells else nn.GRU(4, 6)
            self.head = nn.Linear(6, 1)

        def body(self, x):
            if use_cells:
                h = None
                for t in range(x.shape[0]):
                    h = self.rnn(x[t], h)
                return h
            return self.rnn(x)[0][-1]

        def forward(self, x):
            return self.head(checkpoint(self.body, x, use_reentrant=reentrant)).square().mean()

    model = Ckpt()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 2, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        # reentrant checkpointing only back-propagates when an input requires grad
        model(x.clone().requires_grad_() if reentrant else x).backward()
        opt.step()
        got = w.records[-1].temporal["rnn"].norms
    xr = x.clone().requires_grad_()
    ref(xr).backward()
    np.testing.assert_allclose(got, xr.grad.square().sum((1, 2)).sqrt().numpy(), rtol=1e-5)


def _last_step_run(rnn, hidden=64, steps=1):
    model = LastStep(rnn, hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    w = gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"])
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(100, 16, 32)).backward()
        opt.step()
    recs, events = list(w.records), list(w.events)
    w.close()
    return recs[-1].temporal["rnn"], events


def test_tanh_rnn_on_100_steps_is_flagged_vanishing():
    prof, events = _last_step_run(nn.RNN(32, 64, nonlinearity="tanh"))
    assert len(prof.norms) == 100
    assert prof.norms[0] / max(prof.norms) < 1e-6
    assert any(e.kind == "vanishing" and e.layer == "rnn" for e in events)


def test_lstm_with_forget_bias_3_is_not_flagged_vanishing():
    lstm = nn.LSTM(32, 64)
    with torch.no_grad():
        lstm.bias_ih_l0[64:128].fill_(3.0)
        lstm.bias_hh_l0[64:128].fill_(0.0)
    prof, events = _last_step_run(lstm)
    assert prof.norms[0] / max(prof.norms) > 1e-3
    assert not any(e.kind == "vanishing" for e in events)


def test_relu_rnn_with_recurrent_weight_1_1_identity_is_flagged_exploding():
    rnn = nn.RNN(32, 64, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(1.1 * torch.eye(64))
    prof, events = _last_step_run(rnn)
    assert prof.norms[0] > 1000 * prof.norms[-1]
    assert any(e.kind == "exploding" and e.layer == "rnn" for e in events)


@pytest.mark.parametrize("cls,gates", [(nn.LSTM, "ifgo"), (nn.GRU, "rzn")])
def test_spectral_norms_per_gate_within_5_percent(cls, gates):
    model = SeqRegressor(cls, 4, 32, num_layers=2, bidirectional=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 2, 4)).backward()
            opt.step()
            rec = w.records[-1]
            # the record's weights are those before this step's update; recompute from them
        spectral = rec.spectral
    assert len(spectral) == 4 * len(gates)
    # compare with the current weights: the last update moved them by a tiny amount
    for k in range(2):
        for suffix in ("", "_reverse"):
            wname = f"weight_hh_l{k}{suffix}"
            blocks = getattr(model.rnn, wname).detach().reshape(len(gates), 32, 32)
            exact = torch.linalg.matrix_norm(blocks, ord=2)
            for i, g in enumerate(gates):
                assert spectral[f"rnn.{wname}[{g}]"] == pytest.approx(exact[i].item(), rel=0.05)


def test_plain_rnn_spectral_norm_has_one_block():
    model = SeqRegressor(nn.RNN, 4, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        model(torch.randn(5, 2, 4)).backward()
        opt.step()
        spectral = w.records[-1].spectral
    exact = torch.linalg.matrix_norm(model.rnn.weight_hh_l0.detach(), ord=2).item()
    assert spectral == pytest.approx({"rnn.weight_hh_l0": exact}, rel=0.05)


def test_forget_gate_statistics_of_single_layer_lstm():
    model = SeqRegressor(nn.LSTM, 4, 8)
    with torch.no_grad():
        model.rnn.bias_hh_l0[8:16].fill_(2.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(9, 3, 4)
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        model(x).backward()
        opt.step()
        stats = w.records[-1].gates["rnn"]
    # ground truth: unroll with torch.nn.LSTMCell sharing the weights, read f from the gates
    cell = nn.LSTMCell(4, 8)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in model.rnn.state_dict().items()})
    h = c = torch.zeros(3, 8)
    fs = []
    with torch.no_grad():
        for t in range(9):
            z = x[t] @ cell.weight_ih.t() + h @ cell.weight_hh.t() + cell.bias_ih + cell.bias_hh
            fs.append(z[:, 8:16].sigmoid())
            h, c = cell(x[t], (h, c))
    f = torch.stack(fs)
    assert stats.gate == "forget"
    assert stats.mean == pytest.approx(f.mean().item(), rel=1e-5)
    assert stats.log_path_gain == pytest.approx(f.log().sum(0).mean().item(), rel=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_update_gate_statistics_of_single_layer_gru(packed):
    model = SeqRegressor(nn.GRU, 4, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    lengths = [9, 6, 3]
    x = torch.randn(9, 3, 4)
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
    with torch.no_grad():
        model.rnn.bias_ih_l0[8:16].fill_(1.5)
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        model(inp).backward()
        opt.step()
        stats = w.records[-1].gates["rnn"]
    # ground truth: unroll each sequence over its own length with nn.GRUCell
    cell = nn.GRUCell(4, 8)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in model.rnn.state_dict().items()})
    zs, paths = [], []
    with torch.no_grad():
        for b in range(3):
            n = lengths[b] if packed else 9
            h = torch.zeros(1, 8)
            seq = []
            for t in range(n):
                xt = x[t, b : b + 1]
                zt = (
                    xt @ cell.weight_ih[8:16].t()
                    + cell.bias_ih[8:16]
                    + h @ cell.weight_hh[8:16].t()
                    + cell.bias_hh[8:16]
                ).sigmoid()
                seq.append(zt)
                h = cell(xt, h)
            seq = torch.cat(seq)
            zs.append(seq)
            paths.append(seq.log().sum(0))
    assert stats.gate == "update"
    assert stats.mean == pytest.approx(torch.cat(zs).mean().item(), rel=1e-5)
    assert stats.log_path_gain == pytest.approx(torch.stack(paths).mean().item(), rel=1e-5)


def test_profiles_only_on_profiled_steps_and_temporal_with_spectral():
    model = SeqRegressor(nn.GRU, 4, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch_torch.watch(model, opt, profile_every=3, sinks=["memory"]) as w:
        for _ in range(9):
            opt.zero_grad()
            model(torch.randn(5, 2, 4)).backward()
            opt.step()
        with_temporal = {r.step for r in w.records if r.temporal}
        with_spectral = {r.step for r in w.records if r.spectral}
        due = {s for s in range(1, 10) if w.monitor.profile_due(s)}
    assert with_temporal == with_spectral == due
    assert 3 <= len(due) < 9


def test_profile_every_0_installs_no_module_hooks():
    model = SeqRegressor(nn.LSTM, 4, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch_torch.watch(model, opt, profile_every=0, sinks=["memory"]) as w:
        assert not model.rnn._forward_pre_hooks
        model(torch.randn(5, 2, 4)).backward()
        opt.step()
        assert not w.records[-1].temporal and not w.records[-1].spectral


def test_a_bug_in_the_probe_is_logged_once_and_never_breaks_training(monkeypatch, caplog):
    from gradwatch_torch import _recurrent

    def boom(*a, **k):
        raise RuntimeError("probe bug")

    monkeypatch.setattr(_recurrent, "timestep_sq_norms", boom)
    model = SeqRegressor(nn.LSTM, 4, 8)
    ref = copy.deepcopy(model)

    def train(m, watched):
        gen = torch.Generator().manual_seed(3)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        w = gradwatch_torch.watch(m, opt, profile_every=1, sinks=["memory"]) if watched else None
        for _ in range(3):
            opt.zero_grad()
            m(torch.randn(5, 2, 4, generator=gen)).backward()
            opt.step()
        if w is not None:
            assert len(w.records) == 3 and not w.records[-1].temporal
            w.close()

    with caplog.at_level("ERROR", logger="gradwatch"):
        train(model, True)
    assert sum("probe bug" in r.getMessage() for r in caplog.records) == 1
    train(ref, False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
