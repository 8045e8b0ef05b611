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
    assert prof.norms[0] / max(prof.norms) < 1e-6  # sensitivity: x_1 barely reaches the loss
    # the alert's reason is propagation: the recurrence loses a gradient within the sequence
    rec = prof.recurrences["l0"]
    assert rec.rate < 0.7 and rec.horizon < 30 and prof.horizon == rec.horizon
    (event,) = [e for e in events if e.kind == "vanishing"]
    assert event.layer == "rnn" and "'l0'" in event.message and event.value == rec.horizon


def test_lstm_with_forget_bias_3_is_not_flagged_vanishing():
    lstm = nn.LSTM(32, 64)
    with torch.no_grad():
        lstm.bias_ih_l0[64:128].fill_(3.0)
        lstm.bias_hh_l0[64:128].fill_(0.0)
    prof, events = _last_step_run(lstm)
    assert prof.norms[0] / max(prof.norms) > 1e-3
    rec = prof.recurrences["l0"]
    assert rec.horizon == 100 and min(rec.gains) > 0.1  # the cell state carries it the whole way
    assert not any(e.kind in ("vanishing", "exploding") for e in events)


def test_relu_rnn_with_recurrent_weight_1_1_identity_is_flagged_exploding():
    rnn = nn.RNN(32, 64, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(1.1 * torch.eye(64))
    prof, events = _last_step_run(rnn)
    assert prof.norms[0] > 1000 * prof.norms[-1]
    rec = prof.recurrences["l0"]
    assert rec.rate == pytest.approx(1.1, rel=0.02) and rec.peak > 1000
    (event,) = [e for e in events if e.kind == "exploding"]
    assert event.layer == "rnn" and event.value == rec.peak


@pytest.mark.parametrize("cls,gates", [(nn.LSTM, "ifgo"), (nn.GRU, "rzn")])
def test_spectral_norms_per_gate_within_1_percent_at_every_profiled_step(cls, gates):
    """Hidden 96 (Lanczos, not the exact path), Adam at a high learning rate so the
    weights move fast; each record is compared with an SVD of the weights it measured."""
    model = SeqRegressor(cls, 4, 96, num_layers=2, bidirectional=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(5, 2, 4)).backward()
            exact = {
                f"rnn.{wname}[{g}]": s.item()
                for wname in (f"weight_hh_l{k}{sfx}" for k in range(2) for sfx in ("", "_reverse"))
                for g, s in zip(gates, torch.linalg.matrix_norm(getattr(model.rnn, wname).detach().reshape(len(gates), 96, 96), ord=2))
            }
            opt.step()
            assert w.records[-1].spectral == pytest.approx(exact, rel=0.01)


def test_plain_rnn_spectral_norm_has_one_block():
    model = SeqRegressor(nn.RNN, 4, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        model(torch.randn(5, 2, 4)).backward()
        opt.step()
        spectral = w.records[-1].spectral
    exact = torch.linalg.matrix_norm(model.rnn.weight_hh_l0.detach(), ord=2).item()
    assert spectral == pytest.approx({"rnn.weight_hh_l0": exact}, rel=0.01)


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


def test_gate_statistics_cover_every_layer_and_start_from_the_users_state():
    """A 2-layer LSTM whose first layer remembers (forget bias 4) and whose second
    forgets (bias -2): the layer's statistics are those of the layer that forgets most,
    computed on the first 8 sequences from the state the user passed."""
    model = SeqRegressor(nn.LSTM, 4, 8, num_layers=2)
    with torch.no_grad():
        model.rnn.bias_ih_l0[8:16].fill_(4.0)
        model.rnn.bias_ih_l1[8:16].fill_(-2.0)
    x = torch.randn(9, 12, 4)
    h0, c0 = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        out, _ = model.rnn(x, (h0, c0))
        model.head(out).square().mean().backward()
        opt.step()
        stats = w.records[-1].gates["rnn"]
    # ground truth: unroll each layer with its own weights from (h0, c0), first 8 sequences
    inp, per_layer = x[:, :8], []
    with torch.no_grad():
        for k in range(2):
            w_ih, w_hh = getattr(model.rnn, f"weight_ih_l{k}"), getattr(model.rnn, f"weight_hh_l{k}")
            b = getattr(model.rnn, f"bias_ih_l{k}") + getattr(model.rnn, f"bias_hh_l{k}")
            h, c, fs, hs = h0[k, :8], c0[k, :8], [], []
            for t in range(9):
                i, f, g, o = (inp[t] @ w_ih.t() + h @ w_hh.t() + b).chunk(4, dim=1)
                c = f.sigmoid() * c + i.sigmoid() * g.tanh()
                h = o.sigmoid() * c.tanh()
                fs.append(f.sigmoid())
                hs.append(h)
            f = torch.stack(fs)
            per_layer.append((f.mean().item(), f.log().sum(0).mean().item()))
            inp = torch.stack(hs)
    torch.testing.assert_close(inp, out[:, :8], rtol=1e-4, atol=1e-5)  # the unroll is the layer
    mean, path = min(per_layer, key=lambda mp: mp[1])
    assert per_layer[1][1] < per_layer[0][1]
    assert stats.mean == pytest.approx(mean, rel=1e-5) and stats.log_path_gain == pytest.approx(path, rel=1e-5)


def _watched_lstm_model():
    model = SeqRegressor(nn.LSTM, 4, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"])
    opt.zero_grad()
    model(torch.randn(5, 2, 4)).backward()
    opt.step()
    return model, opt, w


def _use(model):
    model(torch.randn(5, 2, 4)).backward()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "AveragedModel"])
def test_a_copy_of_a_watched_model_works_and_carries_nothing_of_the_watch(how):
    import pickle

    from torch.optim.swa_utils import AveragedModel

    model, opt, w = _watched_lstm_model()
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        avg = AveragedModel(model)
        avg.update_parameters(model)
        twin = avg.module
    before = [r.step for r in w.records]
    for _ in range(3):
        _use(twin)  # forward and backward through the copy's (inert) hooks
    probe = w._attachment._probes[0]
    assert [r.step for r in w.records] == before and probe._calls == [] and probe._sq is None
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.1)
    with gradwatch_torch.watch(twin, opt2, profile_every=1, sinks=["memory"]) as w2:
        twin.zero_grad()
        _use(twin)
        opt2.step()
        assert w2.records[-1].temporal["rnn"].recurrences  # the copy can be watched on its own
    opt.zero_grad()
    _use(model)
    opt.step()
    assert w.records[-1].temporal["rnn"].recurrences and w.records[-1].step == 2
    w.close()


def test_a_watched_model_saved_whole_loads_without_gradwatch(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    model, _, w = _watched_lstm_model()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    w.close()
    here = Path(__file__).resolve().parent
    # as pytorch/examples' word_language_model loads it: weights_only, its own safe globals
    code = (
        "import sys; sys.modules['gradwatch'] = None; sys.modules['gradwatch_torch'] = None; "
        f"sys.path.insert(0, {str(here)!r}); import torch; from torch_helpers import SeqRegressor; "
        "globs = [SeqRegressor, torch.nn.LSTM, torch.nn.Linear]; "
        f"m = torch.load({str(path)!r}, weights_only=True) if torch.serialization.add_safe_globals(globs) is None else None; "
        "m(torch.randn(5, 2, 4)).backward(); assert not m.rnn._forward_pre_hooks and not m.rnn._forward_hooks; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_close_leaves_nothing_on_the_modules():
    model, _, w = _watched_lstm_model()
    assert model.rnn._forward_pre_hooks and "__reduce_ex__" in model.rnn.__dict__
    w.close()
    rnn = model.rnn
    assert not rnn._forward_pre_hooks and not rnn._forward_hooks and "__reduce_ex__" not in rnn.__dict__
    assert not any(rnn._forward_pre_hooks_with_kwargs) and not any(rnn._forward_hooks_with_kwargs)


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
        if w is not None:  # the profile is off; the layer's other measurements go on
            prof = w.records[-1].temporal["rnn"]
            assert len(w.records) == 3 and prof.norms == () and prof.recurrences and w.records[-1].spectral
            w.close()

    with caplog.at_level("ERROR", logger="gradwatch"):
        train(model, True)
    messages = [r.getMessage() for r in caplog.records if "probe bug" in r.getMessage()]
    assert len(messages) == 1 and "input-gradient profile" in messages[0] and "'rnn'" in messages[0]
    train(ref, False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
