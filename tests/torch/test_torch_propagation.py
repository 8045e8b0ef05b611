"""Propagation through time (the product of the state Jacobians) against exact ground truth.

The reference is written here from the layer's weights: a float64 cell per kind, the
stack unrolled sequence by sequence (each over its own length, both directions), checked
against the layer's own output, and every step's Jacobian taken with ``torch.func.jacrev``
and multiplied out. gains[j] = ||ds_T/ds_{T-j}||_F / sqrt(dim s), the median (on logs) over
the first min(B, 8) sequences, and max_gains[j] = its largest singular value, the max over
them, in processing order, padded steps as the identity (shared/API.md, "Through time").
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gradwatch_torch
from gradwatch_torch import _recurrent

KINDS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


# -- the reference ------------------------------------------------------------------------
def _weights(module, sfx):
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    return [None if t is None else t.detach().double() for t in (getattr(module, n + sfx, None) for n in names)]


def _cell(kind, w, hidden):
    """s -> s' for one step, float64, written from the equations in the PyTorch docs."""
    w_ih, w_hh, b_ih, b_hh, w_hr = w
    b_ih = torch.zeros(w_ih.shape[0], dtype=torch.float64) if b_ih is None else b_ih
    b_hh = torch.zeros(w_hh.shape[0], dtype=torch.float64) if b_hh is None else b_hh

    def step(s, x):
        if kind == "lstm":
            p = w_hh.shape[1]
            h, c = s[:p], s[p:]
            a = w_ih @ x + b_ih + w_hh @ h + b_hh
            i, f, g, o = a.split(hidden)
            c2 = f.sigmoid() * c + i.sigmoid() * g.tanh()
            m = o.sigmoid() * c2.tanh()
            return torch.cat([m if w_hr is None else w_hr @ m, c2])
        if kind == "gru":
            gi, gh = w_ih @ x + b_ih, w_hh @ s + b_hh
            r = (gi[:hidden] + gh[:hidden]).sigmoid()
            z = (gi[hidden : 2 * hidden] + gh[hidden : 2 * hidden]).sigmoid()
            n = (gi[2 * hidden :] + r * gh[2 * hidden :]).tanh()
            return (1 - z) * n + z * s
        a = w_ih @ x + b_ih + w_hh @ s + b_hh
        return a.tanh() if kind == "rnn_tanh" else a.relu()

    return step


def _gains(step, s0, xs, valid):
    """Exact gains of one sequence in processing order (valid[t] False: identity)."""
    s, jacs = s0, []
    for t in range(len(xs)):
        if not valid[t]:
            jacs.append(torch.eye(s.shape[0], dtype=torch.float64))
            continue
        jacs.append(torch.func.jacrev(step)(s, xs[t]))
        s = step(s, xs[t])
    prod, out, top = torch.eye(s.shape[0], dtype=torch.float64), [1.0], [1.0]
    for j in range(1, len(xs)):
        prod = prod @ jacs[len(xs) - j]
        out.append(prod.norm().item() / math.sqrt(s.shape[0]))
        top.append(torch.linalg.matrix_norm(prod, ord=2).item())
    return np.array(out), np.array(top)


def _median(per):
    """The contract's median over sequences, on logs (even count: geometric mean of the middle two)."""
    logs = np.sort(np.log(np.stack(per)), axis=0)
    n = logs.shape[0]
    return np.exp(0.5 * (logs[(n - 1) // 2] + logs[n // 2]))


def reference(module, seqs, h0=None, c0=None, masks=None):
    """{recurrence: exact median gains, recurrence + ":max": exact max gains} and the top
    layer's outputs per sequence.

    ``seqs``: each sequence (T_b, F) in its own length; ``h0``/``c0`` (L*D, B, .);
    ``masks[l][b]`` the dropout scale applied to layer l's output of sequence b.
    """
    layers, dirs = module.num_layers, 2 if module.bidirectional else 1
    hidden = module.hidden_size
    proj = getattr(module, "proj_size", 0) or hidden
    kind = KINDS[module.mode]
    steps = max(len(x) for x in seqs)
    probed = seqs[:8]
    inputs = [x.double() for x in probed]
    gains = {}
    for layer in range(layers):
        outs = [[None] * len(probed) for _ in range(dirs)]
        for d in range(dirs):
            name = f"l{layer}" + ("_reverse" if d else "")
            step = _cell(kind, _weights(module, f"_l{layer}" + ("_reverse" if d else "")), hidden)
            per = []
            for b, xb in enumerate(inputs):
                k = layer * dirs + d
                s0 = torch.zeros(proj, dtype=torch.float64) if h0 is None else h0[k, b].double()
                if kind == "lstm":
                    s0 = torch.cat([s0, torch.zeros(hidden, dtype=torch.float64) if c0 is None else c0[k, b].double()])
                seq = xb if d == 0 else xb.flip(0)
                pad = torch.zeros(steps - len(seq), seq.shape[1], dtype=torch.float64)
                # processing order: a forward pass is padded after its end, a reversed one before its start
                xs = torch.cat([seq, pad]) if d == 0 else torch.cat([pad, seq])
                valid = [t < len(seq) for t in range(steps)] if d == 0 else [t >= steps - len(seq) for t in range(steps)]
                per.append(_gains(step, s0, xs, valid))
                s, hs = s0, []
                for t in range(len(seq)):
                    s = step(s, seq[t])
                    hs.append(s[:proj])
                hs = torch.stack(hs)
                outs[d][b] = hs if d == 0 else hs.flip(0)
            gains[name] = _median([p[0] for p in per])
            gains[name + ":max"] = np.max(np.stack([p[1] for p in per]), axis=0)
        inputs = [torch.cat([outs[d][b] for d in range(dirs)], dim=-1) for b in range(len(probed))]
        if masks is not None and layer < layers - 1:
            inputs = [inputs[b] * masks[layer][b] for b in range(len(probed))]
    return gains, inputs


def _watched_step(model, inp, hx=None, events=None, **options):
    """One optimizer step of ``model`` on ``inp`` under a watch; returns the record and
    the layer's output (the reference is checked against it); ``events`` collects the
    watch's events."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = {}
    handle = model.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    with gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"], **options) as w:
        out = model(inp, hx) if hx is not None else model(inp)
        o = out[0]
        o = o.data if isinstance(o, nn.utils.rnn.PackedSequence) else o
        o.square().mean().backward()
        opt.step()
        rec = w.records[-1]
        if events is not None:
            events.extend(w.events)
    handle.remove()
    return rec, seen["out"]


def _assert_gains(got, want, rtol):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    ok = want > 1e-30  # below, float32 packing makes 0 / denormals
    np.testing.assert_allclose(got[ok], want[ok], rtol=rtol)


def _sequences(x, batch_first, lengths):
    return [(x[b] if batch_first else x[:, b])[:n] for b, n in enumerate(lengths)]


# -- every kind and layout, exact path (dim s <= 16) -----------------------------------------
LAYOUTS = {
    "plain": {},
    "batch_first+hx": {"batch_first": True, "hx": True},
    "bidirectional+packed+hx": {"bidirectional": True, "packed": True, "hx": True},
    "bidirectional+packed+batch_first": {"bidirectional": True, "packed": True, "batch_first": True},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cls,kw", [(nn.LSTM, {}), (nn.GRU, {}), (nn.RNN, {}), (nn.RNN, {"nonlinearity": "relu"})], ids=["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_every_recurrence_of_a_stack_matches_the_exact_jacobian_product(cls, kw, layout):
    opts = LAYOUTS[layout]
    bf, bidir, packed = opts.get("batch_first", False), opts.get("bidirectional", False), opts.get("packed", False)
    hidden = 4 if cls is nn.LSTM else 7
    model = cls(3, hidden, num_layers=2, bidirectional=bidir, batch_first=bf, **kw)
    dirs = 2 if bidir else 1
    lengths = [6, 4, 2] if packed else [6, 6, 6]
    x = torch.randn(3, 6, 3) if bf else torch.randn(6, 3, 3)
    h0 = torch.randn(2 * dirs, 3, hidden) if opts.get("hx") else None
    c0 = torch.randn(2 * dirs, 3, hidden) if opts.get("hx") and cls is nn.LSTM else None
    hx = (h0, c0) if c0 is not None else h0
    inp = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False) if packed else x
    rec, _ = _watched_step(model, inp, hx)
    want, _ = reference(model, _sequences(x, bf, lengths), h0, c0)
    got = rec.temporal[""].recurrences if "" in rec.temporal else next(iter(rec.temporal.values())).recurrences
    names = {f"l{k}{s}" for k in range(2) for s in ([""] + (["_reverse"] if bidir else []))}
    assert set(got) == names == {k for k in want if not k.endswith(":max")}
    for name in names:
        _assert_gains(got[name].gains, want[name], rtol=1e-4)
        _assert_gains(got[name].max_gains, want[name + ":max"], rtol=1e-4)


def test_lstm_with_projection_bidirectional_and_packed_matches():
    model = nn.LSTM(3, 6, num_layers=2, proj_size=2, bidirectional=True)
    lengths = [5, 3, 4]
    x = torch.randn(5, 3, 3)
    h0, c0 = torch.randn(4, 3, 2), torch.randn(4, 3, 6)
    rec, _ = _watched_step(model, pack_padded_sequence(x, lengths, enforce_sorted=False), (h0, c0))
    want, _ = reference(model, _sequences(x, False, lengths), h0, c0)
    got = rec.temporal["lstm"].recurrences
    for name in ("l0", "l0_reverse", "l1", "l1_reverse"):
        _assert_gains(got[name].gains, want[name], rtol=1e-4)
        _assert_gains(got[name].max_gains, want[name + ":max"], rtol=1e-4)


def test_unbatched_input_is_one_sequence():
    model = nn.GRU(3, 5)
    x = torch.randn(7, 3)
    rec, _ = _watched_step(model, x)
    want, _ = reference(model, [x])
    _assert_gains(rec.temporal["gru"].recurrences["l0"].gains, want["l0"], rtol=1e-4)
    _assert_gains(rec.temporal["gru"].recurrences["l0"].max_gains, want["l0:max"], rtol=1e-4)


def test_only_the_first_eight_sequences_are_probed():
    model = nn.RNN(3, 6)
    x = torch.randn(5, 11, 3)
    rec, _ = _watched_step(model, x)
    want, _ = reference(model, [x[:, b] for b in range(8)])
    _assert_gains(rec.temporal["rnn"].recurrences["l0"].gains, want["l0"], rtol=1e-4)


def test_reversed_direction_equals_a_forward_layer_on_the_reversed_sequences():
    """Processing order, independently of the reference: the reverse half of a
    bidirectional layer is a forward layer run on the sequences reversed."""
    bi = nn.GRU(3, 5, bidirectional=True)
    fwd = nn.GRU(3, 5)
    fwd.load_state_dict({k.replace("_reverse", ""): v for k, v in bi.state_dict().items() if "reverse" in k})
    x = torch.randn(6, 3, 3)
    rec, _ = _watched_step(bi, pack_padded_sequence(x, [6, 6, 6], enforce_sorted=False))
    rec_f, _ = _watched_step(fwd, x.flip(0))
    np.testing.assert_allclose(rec.temporal["gru"].recurrences["l0_reverse"].gains, rec_f.temporal["gru"].recurrences["l0"].gains, rtol=1e-5)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("packed", [False, True])
def test_dropout_between_layers_replays_the_masks_the_layer_drew(cls, packed):
    model = cls(3, 4, num_layers=3, dropout=0.5).train()
    lengths = [7, 5, 6, 3]
    x = torch.randn(7, 4, 3)
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
    torch.manual_seed(11)
    rec, out = _watched_step(model, inp)
    # The masks, drawn here as the kernel draws them (one Bernoulli mask over each layer's
    # whole output, in order, from the RNG state before the call), are the right ones
    # when the reference stack built with them reproduces the layer's output.
    torch.manual_seed(11)
    rows = int(inp.data.shape[0]) if packed else None
    full = [torch.empty((rows, 4) if packed else (7, 4, 4)).bernoulli_(0.5) / 0.5 for _ in range(2)]
    if packed:
        offsets = torch.cumsum(inp.batch_sizes, 0) - inp.batch_sizes
        pos = inp.unsorted_indices
        masks = [[torch.stack([m[offsets[t] + pos[b]] for t in range(n)]).double() for b, n in enumerate(lengths)] for m in full]
    else:
        masks = [[m[:, b].double() for b in range(4)] for m in full]
    want, top = reference(model, _sequences(x, False, lengths if packed else [7] * 4), masks=masks)
    o = nn.utils.rnn.pad_packed_sequence(out[0])[0] if packed else out[0]
    for b, n in enumerate(lengths if packed else [7] * 4):
        torch.testing.assert_close(top[b].float(), o[:n, b], rtol=1e-4, atol=1e-5)
    got = rec.temporal[next(iter(rec.temporal))].recurrences
    for name in ("l0", "l1", "l2"):
        _assert_gains(got[name].gains, want[name], rtol=1e-4)


def test_the_replay_leaves_the_users_rng_and_training_untouched():
    def train(watched):
        torch.manual_seed(5)
        model = nn.LSTM(3, 8, num_layers=2, dropout=0.3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        w = gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) if watched else None
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(6, 4, 3))[0].square().mean().backward()
            opt.step()
        if w is not None:
            assert w.records[-1].temporal["lstm"].recurrences
            w.close()
        return [p.detach().clone() for p in model.parameters()], torch.rand(3)

    a, ra = train(True)
    b, rb = train(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(ra, rb)


# -- the estimate (dim s > 16) ---------------------------------------------------------------
def _fitted_rate(gains):
    g = np.asarray(gains)
    j = np.arange(g.size)
    ok = g > 1e-30
    return math.exp(np.polyfit(j[ok], np.log(g[ok]), 1)[0])


@pytest.mark.parametrize("cls,kw,batch", [(nn.LSTM, {}, 8), (nn.GRU, {}, 8), (nn.RNN, {}, 8), (nn.LSTM, {}, 2), (nn.RNN, {}, 1)], ids=["lstm", "gru", "rnn", "lstm-2-sequences", "rnn-1-sequence"])
def test_estimate_within_a_factor_1_5_at_every_j_and_rate_within_5_percent(cls, kw, batch):
    torch.manual_seed(1)
    model = cls(8, 24, **kw)  # dim s = 48 (LSTM) or 24: estimated
    with torch.no_grad():
        model.weight_hh_l0.mul_(1.5)
    x = torch.randn(30, batch, 8)
    rec, _ = _watched_step(model, x)
    want, _ = reference(model, [x[:, b] for b in range(batch)])
    got = rec.temporal[next(iter(rec.temporal))].recurrences["l0"]
    for mine, exact in ((got.gains, want["l0"]), (got.max_gains, want["l0:max"])):
        ok = exact > 1e-30
        ratio = np.asarray(mine)[ok] / exact[ok]
        assert ratio.min() > 1 / 1.5 and ratio.max() < 1.5, (ratio.min(), ratio.max())
    assert got.rate == pytest.approx(_fitted_rate(want["l0:max"]), rel=0.05)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_bfloat16_sweeps_keep_the_estimate_within_its_factor(cls, monkeypatch):
    """The sweeps of large layers multiply in bfloat16 (where the CPU has AVX512-BF16):
    forced here on a small layer, on any CPU, against the float64 reference."""
    from gradwatch_torch import _sweeps

    monkeypatch.setattr(_sweeps, "LOW_PRECISION_SIZE", 0)
    monkeypatch.setattr(_sweeps, "_bf16_is_fast", lambda device: True)
    seen = []
    real = _sweeps.low_precision
    monkeypatch.setattr(_sweeps, "low_precision", lambda co: seen.append(real(co).w_hh.dtype) or real(co))
    torch.manual_seed(6)
    model = cls(8, 24)
    with torch.no_grad():
        model.weight_hh_l0.mul_(1.5)
    x = torch.randn(40, 8, 8)
    rec, _ = _watched_step(model, x)
    assert seen == [torch.bfloat16]
    want, _ = reference(model, [x[:, b] for b in range(8)])
    got = rec.temporal[next(iter(rec.temporal))].recurrences["l0"]
    for mine, exact in ((got.gains, want["l0"]), (got.max_gains, want["l0:max"])):
        ok = exact > 1e-30
        ratio = np.asarray(mine)[ok] / exact[ok]
        assert ratio.min() > 1 / 1.5 and ratio.max() < 1.5, (ratio.min(), ratio.max())


def test_trained_model_with_a_loss_at_every_timestep():
    torch.manual_seed(2)
    rnn, head = nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 1)
    opt = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), lr=0.05)
    root = nn.ModuleDict({"rnn": rnn, "head": head})
    w = gradwatch_torch.watch(root, opt, profile_every=1, sinks=["memory"])
    for step in range(30):
        x = torch.randn(5, 12, 4)
        y = x.cumsum(1)[..., :1] * 0.1  # every step's target depends on the whole past
        opt.zero_grad()
        loss = (head(rnn(x)[0]) - y).square().mean()
        loss.backward()
        before = copy.deepcopy(rnn)  # the weights this step's record was measured with
        opt.step()
    rec = w.records[-1]
    w.close()
    want, _ = reference(before, [x[b] for b in range(5)])
    _assert_gains(rec.temporal["rnn"].recurrences["l0"].gains, want["l0"], rtol=1e-4)
    assert rec.step == 30 and loss.item() < 1.0


# -- alerts follow the exact horizon ---------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.4, 1.0, 2.5])
def test_vanishing_alert_agrees_with_the_exact_horizon(scale):
    torch.manual_seed(3)
    model = nn.RNN(3, 12)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(12, 12))
        model.weight_hh_l0.copy_(scale * q)
    x = torch.randn(30, 4, 3)
    events = []
    rec, _ = _watched_step(model, x, events=events, vanish_ratio=1e-3)
    want, _ = reference(model, [x[:, b] for b in range(4)])
    below = np.flatnonzero(want["l0:max"] < 1e-3)  # the horizon is judged on the largest gain
    horizon = int(below[0]) if below.size else 30
    got = rec.temporal["rnn"]
    assert got.recurrences["l0"].horizon == horizon == got.horizon
    assert any(e.kind == "vanishing" and e.layer == "rnn" for e in events) == (horizon < 30)
    assert (scale < 1) == (horizon < 30)  # the scales chosen cover both sides


# -- cell loops -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_a_cell_loop_is_one_recurrence(cls):
    cell = cls(3, 5)
    head = nn.Linear(5, 1)
    root = nn.ModuleDict({"cell": cell, "head": head})
    x = torch.randn(9, 4, 3)
    h0 = torch.randn(4, 5)
    state = (h0, torch.randn(4, 5)) if cls is nn.LSTMCell else h0
    opt = torch.optim.SGD(root.parameters(), lr=0.0)
    with gradwatch_torch.watch(root, opt, profile_every=1, sinks=["memory"]) as w:
        s = state
        for t in range(9):
            s = cell(x[t], s)
        head(s[0] if isinstance(s, tuple) else s).sum().backward()
        opt.step()
        prof = w.records[-1].temporal["cell"]
    # the reference of a one-layer module with the cell's weights
    layer = {nn.LSTMCell: nn.LSTM, nn.GRUCell: nn.GRU, nn.RNNCell: nn.RNN}[cls](3, 5)
    layer.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    c0 = state[1].unsqueeze(0) if cls is nn.LSTMCell else None
    want, _ = reference(layer, [x[:, b] for b in range(4)], h0.unsqueeze(0), c0)
    assert len(prof.norms) == 9
    _assert_gains(prof.recurrences["l0"].gains, want["l0"], rtol=1e-4)


def test_a_cell_whose_state_is_changed_between_calls_is_not_taken_for_a_recurrence():
    cell, head = nn.GRUCell(3, 5), nn.Linear(5, 1)
    root = nn.ModuleDict({"cell": cell, "head": head})
    opt = torch.optim.SGD(root.parameters(), lr=0.0)
    with gradwatch_torch.watch(root, opt, profile_every=1, sinks=["memory"]) as w:
        h = None
        for t in range(6):
            h = 0.5 * cell(torch.randn(2, 3), h)  # the recurrence includes the user's own op
        head(h).sum().backward()
        opt.step()
        prof = w.records[-1].temporal["cell"]
    assert len(prof.norms) == 6 and not prof.recurrences


# -- schedule, failures, precision, memory ------------------------------------------------------
def test_replay_every_keeps_the_replay_under_its_share():
    from gradwatch_torch._trajectory import replay_flops

    share = _recurrent.REPLAY_SHARE
    # the benchmark's W1: 2-layer LSTM 64 -> 256, 100 steps, batch 32 (858,634 parameters)
    w1, step1 = replay_flops("lstm", 2, 1, 64, 256, 256, 8, 100), 6 * 858_634 * 3200
    n = _recurrent.replay_every(w1, 858_634, 3200)
    assert w1 / n <= share * step1 < w1 / (n - 1)  # the smallest n under the share
    # W2: 1-layer LSTM 256 under a 20,000-word head (5,666,336 parameters outside the embedding)
    w2, step2 = replay_flops("lstm", 1, 1, 256, 256, 256, 8, 64), 6 * 5_666_336 * 1024
    n2 = _recurrent.replay_every(w2, 5_666_336, 1024)
    assert w2 / n2 <= share * step2 and n2 < n
    # spaced profiles: the replays' share of all steps (profile_every steps apart) is the bound
    from gradwatch.through_time.plan import REPLAY_SHARE_OF_TRAINING as whole

    n10 = _recurrent.replay_every(w1, 858_634, 3200, 10)
    assert w1 / (10 * n10) <= whole * step1 < w1 / (10 * (n10 - 1)) and n10 < n
    assert _recurrent.replay_every(w1 / 15, 858_634, 3200, 10) == 1  # 0.12 of a step: every profiled step
    # tiny replays always run
    assert _recurrent.replay_every(replay_flops("gru", 1, 1, 4, 8, 8, 2, 5), 100, 10) == 1


def test_propagation_is_recorded_on_the_scheduled_profiled_steps(monkeypatch):
    monkeypatch.setattr(_recurrent, "replay_every", lambda flops, params, tokens, every: 3)
    model = nn.GRU(3, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch_torch.watch(model, opt, profile_every=2, sinks=["memory"]) as w:
        for _ in range(14):
            opt.zero_grad()
            model(torch.randn(5, 2, 3))[0].square().mean().backward()
            opt.step()
        with_prop = [r.step for r in w.records if r.temporal and r.temporal["gru"].recurrences]
        profiled = [r.step for r in w.records if r.temporal]
    assert profiled == [1, 2, 4, 6, 8, 10, 12, 14]
    assert with_prop == [1, 6, 12]  # the first profiled step, then every 3rd (step // 2 divisible by 3)


def test_a_failing_replay_turns_off_alone_and_says_which(monkeypatch, caplog):
    def boom(*a, **k):
        raise RuntimeError("replay bug")

    monkeypatch.setattr(_recurrent, "replay", boom)
    model = nn.LSTM(3, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.ERROR, logger="gradwatch"), gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 2, 3))[0].square().mean().backward()
            opt.step()
        rec = w.records[-1]
    messages = [r.getMessage() for r in caplog.records if "replay bug" in r.getMessage()]
    assert len(messages) == 1
    assert "propagation replay" in messages[0] and "'lstm'" in messages[0]
    assert len(rec.temporal["lstm"].norms) == 5 and not rec.temporal["lstm"].recurrences
    assert rec.spectral and not rec.gates


def test_a_forward_that_does_not_match_the_replay_is_caught(caplog):
    model = nn.GRU(3, 6)
    plain = model.forward

    def twisted(x, hx=None):  # the user's own twist on the layer's output
        out, h = plain(x, hx)
        return out + 0.5, h

    model.forward = twisted
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with caplog.at_level(logging.ERROR, logger="gradwatch"), gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
        model(torch.randn(5, 2, 3))[0].square().mean().backward()
        opt.step()
        rec = w.records[-1]
    assert not rec.temporal["gru"].recurrences
    assert any("differ from the layer's own output" in r.getMessage() and "'gru'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell])
def test_bf16_autocast_keeps_every_measurement(cls):
    torch.manual_seed(4)
    layer, head = cls(3, 12), nn.Linear(12, 1)
    root = nn.ModuleDict({"rnn": layer, "head": head})
    x = torch.randn(15, 4, 3)

    def run(autocast):
        opt = torch.optim.SGD(root.parameters(), lr=0.0)
        with gradwatch_torch.watch(root, opt, profile_every=1, sinks=["memory"]) as w:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if cls is nn.LSTMCell:
                    s = None
                    for t in range(15):
                        s = layer(x[t], s)
                    out = s[0]
                else:
                    out = layer(x)[0]
                loss = head(out).float().square().mean()
            loss.backward()
            opt.step()
            return w.records[-1]

    low, full = run(True), run(False)
    prof = low.temporal["rnn"]
    assert len(prof.norms) == 15 and prof.recurrences
    assert bool(low.spectral) == (cls is not nn.LSTMCell)  # spectral norms: sequence layers
    assert bool(low.gates) == (cls is not nn.RNN)
    ratio = np.asarray(prof.recurrences["l0"].gains) / np.asarray(full.temporal["rnn"].recurrences["l0"].gains)
    assert np.all(np.abs(np.log(ratio)) < 0.2)  # bf16 trajectory, same propagation within 20%


def test_nothing_is_held_between_steps():
    import tracemalloc

    model = nn.LSTM(3, 8, num_layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gradwatch_torch.watch(model, opt, profile_every=1, sinks=["memory"], keep=1)
    probe = w._attachment._probes[0]

    def step():
        opt.zero_grad()
        model(torch.randn(10, 4, 3))[0].square().mean().backward()
        opt.step()

    for _ in range(5):
        step()
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    for _ in range(20):
        step()
        assert probe._calls == [] and probe._propagation is None and probe._capture is None and probe._gates is None
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    w.close()
    assert grown < 200_000, grown


# -- DDP --------------------------------------------------------------------------------------
_DDP_WORKER = r'''
import json, os, socket, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch import nn

def run(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    import gradwatch
    torch.manual_seed(0)
    model = nn.LSTM(3, 4, num_layers=2)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
    x = torch.randn(6, 3, 3, generator=torch.Generator().manual_seed(10 + rank))
    with gradwatch.watch(ddp, opt, profile_every=1, sinks=["memory"]) as w:
        ddp(x)[0].square().mean().backward()
        opt.step()
        rec = w.records[-1]
        mine = {"recurrences": {k: list(r.gains) for k, r in rec.temporal["lstm"].recurrences.items()},
                "max": {k: list(r.max_gains) for k, r in rec.temporal["lstm"].recurrences.items()},
                "gates": [rec.gates["lstm"].mean, rec.gates["lstm"].log_path_gain], "x": x.tolist()}
    everyone = [None, None]
    dist.all_gather_object(everyone, mine)
    dist.barrier()  # no rank tears gloo down while another still talks (SIGABRT)
    if rank == 0:
        torch.save({"records": everyone, "state": model.state_dict()}, out)
    dist.destroy_process_group()
    os._exit(0)  # done: no interpreter teardown racing gloo's threads (SIGABRT)

if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(port, sys.argv[1]), nprocs=2, join=True)
'''


def test_under_ddp_every_rank_reports_the_max_and_the_mean_median_over_ranks(tmp_path):
    from pathlib import Path

    from torch_helpers import run_ranks

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    worker, out = tmp_path / "worker.py", tmp_path / "out.pt"
    worker.write_text(_DDP_WORKER)
    run_ranks([worker, out], cwd=Path(__file__).resolve().parents[2])
    got = torch.load(out, weights_only=False)
    rank0, rank1 = got["records"]
    assert rank0["recurrences"] == rank1["recurrences"] and rank0["gates"] == rank1["gates"] and rank0["max"] == rank1["max"]
    model = nn.LSTM(3, 4, num_layers=2)
    model.load_state_dict(got["state"])
    per_rank = [reference(model, [torch.tensor(r["x"])[:, b] for b in range(3)])[0] for r in (rank0, rank1)]
    for name in ("l0", "l1"):
        want = np.exp((np.log(per_rank[0][name]) + np.log(per_rank[1][name])) / 2)  # each rank's median, averaged on logs
        _assert_gains(rank0["recurrences"][name], want, rtol=1e-4)
        _assert_gains(rank0["max"][name], np.maximum(per_rank[0][name + ":max"], per_rank[1][name + ":max"]), rtol=1e-4)


def test_a_dead_relu_layer_has_zero_propagation_and_gain_one_at_j0():
    """Every unit dead: each step's Jacobian is exactly zero (the estimate's dominant
    direction does not exist, any other is as good)."""
    rnn = nn.RNN(4, 32, nonlinearity="relu")
    with torch.no_grad():
        rnn.bias_ih_l0.fill_(-100.0)
    rec, _ = _watched_step(rnn, torch.randn(6, 3, 4))
    gains = rec.temporal["rnn"].recurrences["l0"].gains
    assert gains[0] == pytest.approx(1.0, rel=1e-6) and gains[1:] == (0.0,) * 5


def test_non_finite_weights_give_nan_measurements_that_recover(caplog):
    rnn = nn.RNN(4, 32)
    with caplog.at_level(logging.ERROR, logger="gradwatch"), gradwatch_torch.watch(rnn, profile_every=1, sinks=["memory"]) as w:
        clean = rnn.weight_hh_l0.detach().clone()
        with torch.no_grad():
            rnn.weight_hh_l0.fill_(float("nan"))
        rnn(torch.randn(6, 3, 4))[0].sum().backward()
        w.step()
        with torch.no_grad():
            rnn.weight_hh_l0.copy_(clean)
        rnn.zero_grad()
        rnn(torch.randn(6, 3, 4))[0].sum().backward()
        w.step()
        bad, good = w.records
    assert math.isnan(bad.spectral["rnn.weight_hh_l0"]) and math.isnan(bad.temporal["rnn"].recurrences["l0"].gains[1])
    assert good.spectral["rnn.weight_hh_l0"] == pytest.approx(torch.linalg.matrix_norm(clean, ord=2).item(), rel=0.01)
    assert np.isfinite(good.temporal["rnn"].recurrences["l0"].gains).all()
    assert not caplog.records  # nothing was switched off
