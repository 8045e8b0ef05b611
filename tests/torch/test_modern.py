"""The recurrences people train now, against autograd on the packages' own recurrences.

For each family a small model is built from the package, a forward runs on a small batch,
and the exact d s_T / d s_{T-j} is taken with ``torch.autograd`` by replaying the
package's own scan (or step function) from a state that requires grad, at every j: the
whole Jacobian (no diagonal assumption), its largest singular value and RMS gain per
probed sequence, aggregated by the core's rule (max / median over the first min(B, 8)).
What a watched training step records (``records[-1].temporal[layer].recurrences["l0"]``)
and what the probe hands over (max_gains included) must match to 1e-4 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn

import gradwatch_torch
from gradwatch.through_time.families import GATES, REMEDIES, Recurrence
from gradwatch.through_time.fit import aggregate
from gradwatch.through_time.ops import NUMPY_TENSORS
from gradwatch_torch._probing import ProbeContext
from gradwatch_torch._recurrent import install
from gradwatch_torch.recurrences import find_modern_probes, unregister_recurrence

RTOL = 1e-4


# -- the reference ------------------------------------------------------------------------
def row_jacobian(f, h):
    """(P, S, S) Jacobian of f: (P, S) -> (P, S'), rows (sequences) independent."""
    h = h.detach().clone().requires_grad_()
    out = f(h).reshape(h.shape[0], -1)
    rows = [torch.autograd.grad(out[:, a].sum(), h, retain_graph=True, allow_unused=True)[0] for a in range(out.shape[1])]
    rows = [torch.zeros_like(h) if r is None else r for r in rows]
    return torch.stack(rows, 1).reshape(h.shape[0], out.shape[1], -1).double()


def expected(jacs):
    """jacs[j - 1] = d s_T / d s_{T-j} (P, S, S) for j = 1 .. T-1 -> (gains, max_gains) (T,)."""
    p, s = jacs[0].shape[0], jacs[0].shape[1]
    log_rms, log_top = [np.zeros(p)], [np.zeros(p)]
    for jac in jacs:
        sv = torch.linalg.svdvals(jac).numpy()
        with np.errstate(divide="ignore"):  # a reset state: gain exactly 0
            log_top.append(np.log(sv[:, 0]))
            log_rms.append(np.log(np.sqrt((sv**2).sum(1) / s)))
    gains, top = aggregate(np.array(log_rms), np.array(log_top), NUMPY_TENSORS)
    return np.asarray(gains), np.asarray(top)


def close(got, want, what):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-300)
    assert rel.max() <= RTOL, f"{what}: worst relative error {rel.max():.3g} at j={int(rel.argmax())}: {got} vs {want}"


# -- what gradwatch measures --------------------------------------------------------------
def probed(model, layer_name, run):
    """The probe's own (labels, gains, max_gains) for one forward (profiled step 1)."""
    ctx = ProbeContext(lambda: True, lambda: 1, 1, sum(p.numel() for p in model.parameters()))
    probes = {p.name: p for p in find_modern_probes(model, ctx)}
    probe = probes[layer_name]
    handles = install(probe, probe._module())
    try:
        run()
        got = probe.take_propagation()
    finally:
        for h in handles:
            h.remove() if hasattr(h, "remove") else h()
        for p in probes.values():
            p.close()
    assert got is not None
    labels, gains, top = got
    assert labels == ("l0",)
    return gains[0].double().numpy(), top[0].double().numpy()


def recorded(model, run, layer):
    """One watched training step (profile_every=1): the layer's recorded propagation."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    w = gradwatch_torch.watch(model, opt, profile_every=1, sinks=[])
    try:
        loss = run()
        loss.backward()
        opt.step()
        opt.zero_grad()
        prof = w.records[-1].temporal[layer]
        return prof
    finally:
        w.close()


def check(model, layer, run, jacs):
    gains, top = expected(jacs)
    got_gains, got_top = probed(model, layer, run)
    close(got_gains, gains, "gains (probe)")
    close(got_top, top, "max_gains (probe)")
    prof = recorded(model, lambda: run().pow(2).mean(), layer)
    prop = prof.recurrences["l0"]
    close(prop.gains, gains, "gains (record)")
    if prop.max_gains:  # once attach carries the max_gains segment (the lead's change)
        close(prop.max_gains, top, "max_gains (record)")
    return gains, top


def _capture(monkeypatch, captured):
    """Built-in decays read their input from the forward (a hook on a submodule) or, where
    that submodule never runs (a fused kernel), recompute it: both paths, each checked used."""
    from gradwatch_torch import _modern

    used = []
    if not captured:
        monkeypatch.setattr(_modern.DiagonalProbe, "inner_hook", lambda self, *a: None)
    real = _modern._matching
    monkeypatch.setattr(_modern, "_matching", lambda *a: used.append(real(*a) is not None) or real(*a))
    return used


# -- minGRU / minLSTM (mingru-pytorch) ----------------------------------------------------
@pytest.mark.parametrize("captured", [True, False])
def test_mingru_against_autograd_on_its_own_scan(monkeypatch, captured):
    mg = pytest.importorskip("minGRU_pytorch", reason="mingru-pytorch is not installed (pip install gradwatch[modern])")
    model = nn.Sequential(nn.Linear(3, 6), mg.minGRU(6))
    with torch.no_grad():  # a gate spread so the decays differ across steps and channels
        model[1].to_hidden_and_gate.weight.mul_(3.0)
    x = torch.randn(10, 12, 3)
    h = model(x).detach()  # (B, T, D): the state (expansion 1, no projection)
    layer = model[1]
    u = model[0](x).detach()
    steps = x.shape[1]
    jacs = []
    for j in range(1, steps):
        s = h[:8, steps - 1 - j]  # the state j steps before the last
        tail = u[:8, steps - j :]
        jacs.append(row_jacobian(lambda st, tail=tail: layer(tail, prev_hidden=st[:, None])[:, -1], s))
    used = _capture(monkeypatch, captured)
    check(model, "1", lambda: model(x), jacs)
    assert used and all(u == captured for u in used)


def _captured_scan(monkeypatch, module, name="heinsen_associative_scan_log"):
    seen = {}
    real = getattr(module, name)

    def spy(log_coeffs, log_values):
        seen["args"] = (log_coeffs.detach(), log_values.detach())
        return real(log_coeffs, log_values)

    monkeypatch.setattr(module, name, spy)
    return seen, real


def _heinsen_jacobians(real, log_coeffs, log_values):
    """d h_T / d h_{T-j} by the package's scan restarted from h_{T-j} (as its prev_hidden does)."""
    h = real(log_coeffs, log_values)
    steps = h.shape[1]
    jacs = []
    for j in range(1, steps):
        s = h[:8, steps - 1 - j]

        def from_state(st, j=j):
            lv = torch.cat([st.log()[:, None], log_values[:8, steps - j :]], dim=1)
            lc = torch.nn.functional.pad(log_coeffs[:8, steps - j :], (0, 0, 1, 0))
            return real(lc, lv)[:, -1]

        jacs.append(row_jacobian(from_state, s))
    return jacs


def test_minlstm_against_autograd_on_its_own_scan(monkeypatch):
    pytest.importorskip("minGRU_pytorch", reason="mingru-pytorch is not installed (pip install gradwatch[modern])")
    from minGRU_pytorch import minLSTM as ml

    model = nn.Sequential(nn.Linear(3, 5), ml.minLSTM(5))
    with torch.no_grad():
        model[1].to_hidden_and_f_i_gate.weight.mul_(3.0)
    x = torch.randn(9, 11, 3)
    seen, real = _captured_scan(monkeypatch, ml)
    model(x)
    jacs = _heinsen_jacobians(real, *seen["args"])
    used = _capture(monkeypatch, True)
    check(model, "1", lambda: model(x), jacs)
    assert used and all(used)


# -- Mamba (mambapy) ------------------------------------------------------------------------
@pytest.mark.parametrize("captured", [True, False])
def test_mamba_against_autograd_on_its_own_pscan(monkeypatch, captured):
    pytest.importorskip("mambapy", reason="mambapy is not installed (pip install gradwatch[modern])")
    from mambapy import mamba

    cfg = mamba.MambaConfig(d_model=4, n_layers=2, d_state=4, dt_max=0.5)
    model = mamba.Mamba(cfg)
    x = torch.randn(10, 13, 4)
    seen = {}
    real = mamba.pscan

    def spy(a, bx):
        seen.setdefault("args", (a.detach(), bx.detach()))  # the first layer's scan
        return real(a, bx)

    monkeypatch.setattr(mamba, "pscan", spy)
    model(x)
    monkeypatch.setattr(mamba, "pscan", real)
    d_a, bx = seen["args"]  # (B, L, ED, N)
    hs = real(d_a, bx)
    steps, shape = hs.shape[1], hs.shape[2:]
    jacs = []
    for j in range(1, steps):
        s = hs[:8, steps - 1 - j].reshape(min(8, hs.shape[0]), -1)

        def from_state(st, j=j):  # h_{T-j+1} = dA h_{T-j} + BX, then the package's scan on
            first = d_a[:8, steps - j] * st.reshape(-1, *shape) + bx[:8, steps - j]
            tail = torch.cat([first[:, None], bx[:8, steps - j + 1 :]], dim=1)
            return real(d_a[:8, steps - j :].contiguous(), tail.contiguous())[:, -1]

        jacs.append(row_jacobian(from_state, s))
    used = _capture(monkeypatch, captured)
    check(model, "layers.0.mixer", lambda: model(x), jacs)
    assert used and all(u == captured for u in used)


# -- xLSTM mLSTM (xlstm's stabilised recurrent step) -------------------------------------------
def test_mlstm_against_autograd_on_its_recurrent_step():
    pytest.importorskip("xlstm", reason="xlstm is not installed (pip install gradwatch[modern])")
    from xlstm.blocks.mlstm.backends import recurrent_step_stabilized_simple as step
    from xlstm.blocks.mlstm.cell import mLSTMCell, mLSTMCellConfig

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(3, 24)
            self.cell = mLSTMCell(mLSTMCellConfig(context_length=16, embedding_dim=8, num_heads=2))
            with torch.no_grad():  # gates that vary, so the stabiliser switches
                nn.init.normal_(self.cell.fgate.weight, std=0.5)
                nn.init.normal_(self.cell.igate.weight, std=0.8)
                self.cell.fgate.bias.fill_(1.0)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return self.cell(q=q, k=k, v=v)

    model = Model()
    x = torch.randn(9, 12, 3)
    with torch.no_grad():
        q, k, v = model.qkv(x).chunk(3, dim=-1)
        qkv = torch.cat([q, k, v], -1)
        ig = model.cell.igate(qkv).transpose(1, 2)[..., None]  # (B, NH, S, 1)
        fg = model.cell.fgate(qkv).transpose(1, 2)[..., None]
    b, steps, nh, dh = 8, x.shape[1], 2, 4
    heads = lambda t: t.view(t.shape[0], steps, nh, dh).transpose(1, 2)
    qh, kh, vh = heads(q[:b]), heads(k[:b]), heads(v[:b])

    def run(c, n, m, start, stop):
        states = []
        for t in range(start, stop):
            sl = slice(t, t + 1)
            _, (c, n, m) = step(c, n, m, qh[:, :, sl].clone(), kh[:, :, sl].clone(), vh[:, :, sl].clone(), ig[:b, :, sl], fg[:b, :, sl])
            states.append((c, n, m))
        return states

    zeros = (torch.zeros(b, nh, dh, dh), torch.zeros(b, nh, dh, 1), torch.zeros(b, nh, 1, 1))
    traj = run(*zeros, 0, steps)
    jacs = []
    for j in range(1, steps):
        c, n, m = traj[steps - 1 - j]
        jacs.append(row_jacobian(lambda st, j=j, n=n, m=m: run(st.reshape(b, nh, dh, dh), n, m, steps - j, steps)[-1][0], c.reshape(b, -1)))
    check(model, "cell", lambda: model(x), jacs)


# -- a hand-written diagonal cell (accelerated-scan's reference scan), declared by the user -----
class GatedScan(nn.Module):
    """h_t = sigmoid(W_a x_t) * h_{t-1} + W_b x_t, solved by accelerated-scan's reference."""

    def __init__(self, d_in, d):
        super().__init__()
        self.gate = nn.Linear(d_in, d)
        self.inp = nn.Linear(d_in, d)

    def forward(self, x):
        from accelerated_scan.ref import scan

        a = torch.sigmoid(self.gate(x)).transpose(1, 2).contiguous()
        return scan(a, self.inp(x).transpose(1, 2).contiguous()).transpose(1, 2)


def test_user_declared_diagonal_scan_against_autograd():
    pytest.importorskip("accelerated_scan", reason="accelerated-scan is not installed (pip install gradwatch[modern])")
    from accelerated_scan.ref import scan

    rec = gradwatch_torch.register_recurrence(
        GatedScan, decay=lambda m, args, kwargs, out: torch.nn.functional.logsigmoid(m.gate(args[0])), kind="gatedscan", gate="forget"
    )
    try:
        model = GatedScan(3, 6)
        with torch.no_grad():
            model.gate.weight.mul_(3.0)
        x = torch.randn(10, 16, 3)
        with torch.no_grad():
            a = torch.sigmoid(model.gate(x)).transpose(1, 2).contiguous()
            b_ = model.inp(x).transpose(1, 2).contiguous()
        h = scan(a, b_)  # (B, C, T)
        steps = h.shape[2]
        jacs = []
        for j in range(1, steps):
            def from_state(st, j=j):
                tokens = b_[:8, :, steps - j :].clone()
                tokens[:, :, 0] = tokens[:, :, 0] + a[:8, :, steps - j] * st
                if j == 1:  # the reference scan needs two steps or more
                    return tokens[:, :, 0]
                return scan(a[:8, :, steps - j :].contiguous(), tokens.contiguous())[:, :, -1]

            jacs.append(row_jacobian(from_state, h[:8, :, steps - 1 - j]))
        check(model, "gatedscan", lambda: model(x), jacs)
    finally:
        unregister_recurrence(rec)


# -- any module called in a loop ----------------------------------------------------------------
class TanhCell(nn.Module):
    """The user's own cell: h' = tanh(W x + U h + b) (not a torch cell)."""

    def __init__(self, d_in, d, scale=1.0):
        super().__init__()
        self.w = nn.Linear(d_in, d)
        self.u = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.u.weight.mul_(scale)

    def forward(self, x, h):
        return torch.tanh(self.w(x) + self.u(h))


class PairCell(nn.Module):
    """A cell with a tuple state, returning (output, (h, c)) like many research cells."""

    def __init__(self, d_in, d):
        super().__init__()
        self.lin = nn.Linear(d_in + d, 2 * d)

    def forward(self, x, state):
        h, c = state
        f, g = self.lin(torch.cat([x, h], -1)).chunk(2, -1)
        c = torch.sigmoid(f) * c + torch.tanh(g) * 0.5
        h = torch.tanh(c) * 0.9 + 0.1 * h
        return h * 2.0, (h, c)


class Looped(nn.Module):
    def __init__(self, cell, d, pair=False):
        super().__init__()
        self.cell, self.head, self.d, self.pair = cell, nn.Linear(d, 1), d, pair

    def forward(self, x):
        b = x.shape[0]
        h = torch.zeros(b, self.d)
        state = (h, torch.zeros(b, self.d)) if self.pair else h
        outs = []
        for t in range(x.shape[1]):
            if self.pair:
                out, state = self.cell(x[:, t], state)
            else:
                state = out = self.cell(x[:, t], state)
            outs.append(out)
        return self.head(outs[-1])


def _loop_reference(cell, x, pair):
    b = min(8, x.shape[0])
    d = cell.u.weight.shape[0] if not pair else cell.lin.weight.shape[0] // 2
    flat = lambda s: torch.cat(s, -1) if pair else s
    unflat = lambda v: (v[:, :d], v[:, d:]) if pair else v
    step = (lambda xt, s: cell(xt, s)[1]) if pair else cell
    state = (torch.zeros(b, d), torch.zeros(b, d)) if pair else torch.zeros(b, d)
    states = []
    for t in range(x.shape[1]):
        state = step(x[:b, t], state)
        states.append(flat(state).detach())
    steps = len(states)
    jacs = []
    for j in range(1, steps):
        def from_state(v, j=j):
            s = unflat(v)
            for t in range(steps - j, steps):
                s = step(x[:b, t], s)
            return flat(s)

        jacs.append(row_jacobian(from_state, states[steps - 1 - j]))
    return jacs


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_user_cell_in_a_loop_detected_and_exact(scale):
    model = Looped(TanhCell(3, 12, scale), 12)
    x = torch.randn(10, 14, 3)
    jacs = _loop_reference(model.cell, x, pair=False)
    _, top = check(model, "cell", lambda: model(x), jacs)
    assert (top[-1] > 1.0) == (scale > 1.5) or top[-1] < 1e-3


def test_declared_cell_with_a_tuple_state():
    rec = gradwatch_torch.register_recurrence(PairCell, step=True, kind="paircell")
    try:
        model = Looped(PairCell(3, 5), 5, pair=True)
        x = torch.randn(9, 10, 3)
        jacs = _loop_reference(model.cell, x, pair=True)
        check(model, "cell", lambda: model(x), jacs)
    finally:
        unregister_recurrence(rec)


def test_a_module_not_in_a_loop_is_dropped_after_one_profiled_step():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    model = nn.Sequential(Block(), Block())
    ctx = ProbeContext(lambda: True, lambda: 1, 1, 40)
    probes = find_modern_probes(model, ctx)
    handles = [h for p in probes for h in install(p, p._module())]
    model(torch.randn(2, 4))
    assert all(p.take_propagation() is None for p in probes)
    assert all(p._dead for p in probes)
    for h in handles:
        h.remove() if hasattr(h, "remove") else h()


# -- the declaration API and the remedies -------------------------------------------------------
def test_declarations_by_name_and_plugin_hook():
    from gradwatch.hookspecs import hookimpl
    from gradwatch.plugins import get_plugin_manager

    class Plugin:
        @hookimpl
        def gradwatch_register_recurrences(self):
            return [Recurrence(f"{GatedScan.__module__}.GatedScan", decay=lambda m, a, k, o: torch.nn.functional.logsigmoid(m.gate(a[0])), kind="fromplugin")]

    pm = get_plugin_manager()
    plugin = Plugin()
    pm.register(plugin)
    try:
        ctx = ProbeContext(lambda: True, lambda: 1, 1, 40)
        (probe,) = [p for p in find_modern_probes(nn.Sequential(GatedScan(2, 3)), ctx) if p.name == "0"]
        assert probe.kind == "fromplugin"
    finally:
        pm.unregister(plugin)
    with pytest.raises(ValueError):
        Recurrence(GatedScan)
    with pytest.raises(ValueError):
        Recurrence(GatedScan, decay=lambda *a: None, step=True)


def test_every_family_has_remedies_and_a_gate():
    for kind in ("mingru", "minlstm", "mamba", "mlstm", "slstm", "rglru", "cell", "custom"):
        assert {"vanishing", "exploding"} <= set(REMEDIES[kind]) <= {"vanishing", "exploding", "vanishing_no_bias"}
        assert GATES[kind]
        assert all(len(s) > 40 for s in REMEDIES[kind].values())


def test_mingru_on_the_demo_task_is_found_vanishing(caplog):
    """The issue's case: a minGRU on "label = sign of the first of 100 inputs"."""
    mg = pytest.importorskip("minGRU_pytorch", reason="mingru-pytorch is not installed")
    import logging

    model = nn.Sequential(nn.Linear(1, 32), mg.minGRU(32))
    head = nn.Linear(32, 2)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
    w = gradwatch_torch.watch(nn.ModuleDict({"rnn": model, "head": head}), opt, sinks=[])
    x = torch.randn(32, 100, 1)
    y = (x[:, 0, 0] > 0).long()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        loss = torch.nn.functional.cross_entropy(head(model(x)[:, -1]), y)
        loss.backward()
        opt.step()
    prof = w.records[-1].temporal["rnn.1"]
    w.close()
    assert prof.horizon is not None and prof.horizon < 100
    assert any(e.kind == "vanishing" for e in w.events)
    assert math.isfinite(prof.gain) and prof.gain < 1


@pytest.mark.parametrize("family", ["minGRU", "minLSTM"])
@pytest.mark.parametrize("biased", [False, True])
def test_the_vanishing_remedy_fits_whether_the_gate_projection_has_a_bias(family, biased):
    """mingru-pytorch builds its gate projection with bias=False: "bias the gate" alone
    would advise a parameter the layer does not have."""
    pytest.importorskip("minGRU_pytorch", reason="mingru-pytorch is not installed")
    import importlib

    torch.manual_seed(0)
    layer = getattr(importlib.import_module(f"minGRU_pytorch.{family}"), family)(16)
    proj = "to_hidden_and_gate" if family == "minGRU" else "to_hidden_and_f_i_gate"
    assert getattr(layer, proj).bias is None  # the package's own choice
    if biased:  # the remedy followed: a biased projection, its gate part at 0 (still forgetting fast)
        old = getattr(layer, proj)
        new = nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.zero_()
        setattr(layer, proj, new)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    w = gradwatch_torch.watch(layer, opt, sinks=[])
    layer(torch.randn(4, 100, 16)).square().mean().backward()
    opt.step()
    w.close()
    (alert,) = [e for e in w.events if e.kind == "vanishing"]
    if biased:
        assert "has no bias" not in alert.message and "bias" in alert.message
    else:
        assert f"{proj} has no bias (mingru-pytorch builds it with bias=False)" in alert.message
        assert "nn.Linear(..., bias=True)" in alert.message


# -- RG-LRU (recurrentgemma's torch layers) ----------------------------------------------------
def _recurrentgemma_torch_layers():
    """recurrentgemma.torch.layers without the package's __init__ (which imports jax/flax)."""
    import importlib
    import importlib.util
    import sys
    import types

    try:
        spec = importlib.util.find_spec("recurrentgemma")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("recurrentgemma is not installed (make test installs it with --no-deps: its pins are for its JAX half)")
    pytest.importorskip("jaxtyping", reason="recurrentgemma's torch layers need jaxtyping")
    root = next(iter(spec.submodule_search_locations))
    saved = {k: sys.modules.get(k) for k in ("recurrentgemma", "recurrentgemma.torch")}
    for name, path in (("recurrentgemma", root), ("recurrentgemma.torch", f"{root}/torch")):
        if name not in sys.modules or not hasattr(sys.modules[name], "torch" if name == "recurrentgemma" else "layers"):
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
    try:
        return importlib.import_module("recurrentgemma.torch.layers")
    except Exception as exc:  # noqa: BLE001
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
        pytest.skip(f"recurrentgemma's torch layers do not import here: {exc}")


def test_rglru_against_autograd_on_its_own_scan():
    layers = _recurrentgemma_torch_layers()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.lru = layers.RGLRU(width=8, num_heads=2)

        def forward(self, x, pos):
            return self.lru(self.inp(x), pos)[0]

    model = Model()
    x = torch.randn(9, 12, 3)
    pos = torch.arange(12).expand(9, 12).clone()
    pos[2, 7] = 0  # a document boundary inside sequence 2: its state resets there
    with torch.no_grad():
        u = model.inp(x)
        a = torch.exp(-8.0 * torch.sigmoid(model.lru.a_gate(u)) * torch.nn.functional.softplus(model.lru.a_param))
        mult = torch.sqrt(1 - a**2)
        reset = (pos == 0)[..., None]
        xs = u * torch.sigmoid(model.lru.input_gate(u)) * (reset + ~reset * mult)
        h, _ = layers.rnn_scan(xs, a, pos == 0, None)
    steps = h.shape[1]
    jacs = []
    for j in range(1, steps):
        def from_state(st, j=j):
            return layers.rnn_scan(xs[:8, steps - j :], a[:8, steps - j :], (pos == 0)[:8, steps - j :], st)[1]

        jacs.append(row_jacobian(from_state, h[:8, steps - 1 - j]))
    gains, top = expected(jacs)
    got_gains, got_top = probed(model, "lru", lambda: model(x, pos))
    close(got_top, top, "max_gains (probe)")
    # gains: the median is over 8 sequences, one of which resets (gain 0 beyond j = 4)
    close(got_gains, gains, "gains (probe)")


def test_loop_cell_is_measured_on_later_profiled_steps_too():
    model = Looped(TanhCell(3, 8, 0.5), 8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    w = gradwatch_torch.watch(model, opt, profile_every=2, sinks=[])
    try:
        for _ in range(5):
            model(torch.randn(6, 9, 3)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        got = {r.step: r.temporal.get("cell") for r in w.records if r.temporal}
    finally:
        w.close()
    measured = [s for s, prof in got.items() if prof is not None and "l0" in prof.recurrences]
    assert len(measured) >= 2, got  # step 1 and at least one later profiled step
    assert all(len(got[s].recurrences["l0"].gains) == 9 for s in measured)


def test_diagonal_layer_measured_on_every_profiled_step_only():
    mg = pytest.importorskip("minGRU_pytorch", reason="mingru-pytorch is not installed (pip install gradwatch[modern])")
    model = nn.Sequential(nn.Linear(2, 4), mg.minGRU(4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    w = gradwatch_torch.watch(model, opt, profile_every=3, sinks=[])
    try:
        for _ in range(7):
            model(torch.randn(5, 6, 2)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        steps = [r.step for r in w.records if "1" in r.temporal and r.temporal["1"].recurrences]
        profiled = [r.step for r in w.records if r.temporal]
        assert len(model[1].to_hidden_and_gate._forward_hooks) == 1  # the decay's input, read from the forward
        import copy

        assert not copy.deepcopy(model)[1].to_hidden_and_gate._forward_hooks  # copies carry nothing of the watch
    finally:
        w.close()
    assert len(steps) >= 2 and steps == profiled, (steps, profiled)
    assert not model[1].to_hidden_and_gate._forward_hooks and "__reduce_ex__" not in vars(model[1].to_hidden_and_gate)


# -- Mamba-2 (mambapy's Mamba2Block, its Triton kernels replaced by pure-torch ones) ------------
def _mamba2_without_triton(monkeypatch):
    """mambapy.mamba2 imports mamba-ssm's Triton kernels at import (no CPU path): import it
    with pure-torch stand-ins for the gated RMSNorm and the chunked SSD scan, the latter a
    plain loop over h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = C_t h_t + D x_t (and
    causal-conv1d's kernel by torch's conv1d: mambapy's own fallback keeps d_conv - 1
    extra steps, which the fused kernels never see)."""
    import sys
    import types

    pytest.importorskip("mambapy", reason="mambapy is not installed (pip install gradwatch[modern])")
    pytest.importorskip("einops", reason="mambapy.mamba2 needs einops")

    class RMSNormGated(nn.Module):
        def __init__(self, d, eps=1e-5, norm_before_gate=False, **_):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

        def forward(self, y, z):
            y = y * torch.nn.functional.silu(z)
            return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def scan(x, dt, a, b, c, chunk_size=None, D=None, z=None, seq_idx=None, initial_states=None, **_):
        h = torch.zeros(x.shape[0], x.shape[2], x.shape[3], b.shape[-1]) if initial_states is None else initial_states
        ys = []
        for t in range(x.shape[1]):
            if seq_idx is not None and t > 0:  # a new document starts from the zero state
                h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).to(h.dtype)[:, None, None, None]
            decay = torch.exp(dt[:, t] * a)[:, :, None, None]  # (B, H, 1, 1)
            h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * b[:, t, 0][:, None, None, :]
            ys.append(torch.einsum("bhpn,bn->bhp", h, c[:, t, 0]) + D[:, None] * x[:, t])
        return torch.stack(ys, 1)

    def causal_conv1d_fn(x, weight, bias=None, activation=None):  # (B, C, L), the first L outputs
        out = torch.nn.functional.conv1d(x, weight[:, None], bias, padding=weight.shape[1] - 1, groups=x.shape[1])
        return torch.nn.functional.silu(out[..., : x.shape[2]])

    stubs = {
        "causal_conv1d": types.ModuleType("causal_conv1d"),
        "mamba_ssm": types.ModuleType("mamba_ssm"),
        "mamba_ssm.ops": types.ModuleType("mamba_ssm.ops"),
        "mamba_ssm.ops.triton": types.ModuleType("mamba_ssm.ops.triton"),
        "mamba_ssm.ops.triton.layernorm_gated": types.ModuleType("mamba_ssm.ops.triton.layernorm_gated"),
        "mamba_ssm.ops.triton.ssd_combined": types.ModuleType("mamba_ssm.ops.triton.ssd_combined"),
    }
    stubs["causal_conv1d"].causal_conv1d_fn = causal_conv1d_fn
    stubs["mamba_ssm.ops.triton.layernorm_gated"].RMSNorm = RMSNormGated
    stubs["mamba_ssm.ops.triton.layernorm_gated"].LayerNorm = nn.LayerNorm
    stubs["mamba_ssm.ops.triton.ssd_combined"].mamba_chunk_scan_combined = scan
    stubs["mamba_ssm.ops.triton.ssd_combined"].mamba_split_conv1d_scan_combined = None
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "mambapy.mamba2", raising=False)
    import mambapy.mamba2 as m2

    monkeypatch.delitem(sys.modules, "mambapy.mamba2")  # the next import sees the real one again
    return m2


@pytest.mark.parametrize("documents", [False, True])
def test_mamba2_against_autograd_on_its_own_block(monkeypatch, documents):
    m2 = _mamba2_without_triton(monkeypatch)
    cfg = m2.Mamba2Config(d_model=8, n_layers=1, d_head=2, d_state=2, use_mem_eff_path=False, A_init_range=(1, 6), dt_max=0.5)
    x = torch.randn(10, 11, 8)
    seq_idx = torch.zeros(10, 11, dtype=torch.int32)
    seq_idx[[1, 3], 5:] = 1  # two sequences hold a second document from step 5 (mamba-ssm's seq_idx)
    layer = "layers.0.mixer"
    if documents:

        class Docs(nn.Module):
            def __init__(self):
                super().__init__()
                self.block = m2.Mamba2Block(cfg)

            def forward(self, u):
                return self.block(u, seq_idx=seq_idx)

        model, layer = Docs(), "block"
    else:
        model, seq_idx = m2.Mamba2(cfg), None
    seen = {}
    real = m2.mamba_chunk_scan_combined

    def spy(xs, dt, a, b, c, **kw):
        seen.setdefault("args", (xs.detach(), dt.detach(), a.detach(), b.detach()))
        return real(xs, dt, a, b, c, **kw)

    monkeypatch.setattr(m2, "mamba_chunk_scan_combined", spy)
    model(x)
    xs, dt, a, b = seen["args"]  # what the block's own forward computed: dt = softplus(. + dt_bias)
    steps, p = xs.shape[1], 8

    def step(h, t):  # h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, on the probed rows
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:p, t] == seq_idx[:p, t - 1]).float()[:, None, None, None]
        return torch.exp(dt[:p, t] * a)[:, :, None, None] * h + (dt[:p, t, :, None] * xs[:p, t])[..., None] * b[:p, t, 0][:, None, None, :]

    shape = (p, xs.shape[2], xs.shape[3], b.shape[-1])  # (P, H, headdim, N)
    states = [torch.zeros(shape)]
    for t in range(steps):
        states.append(step(states[-1], t))

    def from_state(flat, j):
        h = flat.reshape(shape)
        for t in range(steps - j, steps):
            h = step(h, t)
        return h

    jacs = [row_jacobian(lambda s, j=j: from_state(s, j), states[steps - j].reshape(p, -1)) for j in range(1, steps)]
    used = _capture(monkeypatch, True)
    check(model, layer, lambda: model(x), jacs)
    assert used and all(used)
    if documents:  # the reference saw the resets: gain exactly 0 across a boundary
        assert float(jacs[-1][1].abs().max()) == 0.0 and float(jacs[-1][0].abs().max()) > 0.0



# -- xLSTM sLSTM (xlstm's vanilla backend: its own pointwise step, dense through R) ---------------
def test_slstm_against_autograd_on_its_own_step():
    pytest.importorskip("xlstm", reason="xlstm is not installed (pip install gradwatch[modern])")
    from xlstm.blocks.slstm.layer import sLSTMLayer, sLSTMLayerConfig
    from xlstm.blocks.slstm.src.vanilla import slstm_forward_step

    cfg = sLSTMLayerConfig(embedding_dim=8, num_heads=2, backend="vanilla", conv1d_kernel_size=0, dtype="float32")
    model = nn.Sequential(nn.Linear(3, 8), sLSTMLayer(cfg))
    cell = model[1].slstm_cell
    with torch.no_grad():  # a recurrent kernel that matters, gates that move the stabiliser
        cell._recurrent_kernel_.normal_(0.0, 0.6)
        cell._bias_.normal_(0.0, 1.0)
    x = torch.randn(9, 12, 3)
    seen = {}
    real = type(cell).forward

    def spy(self, inp, state=None, lengths=None):
        seen.setdefault("inp", inp.detach())
        return real(self, inp, state, lengths)

    type(cell).forward = spy
    try:
        model(x)
    finally:
        type(cell).forward = real
    wx = cell._permute_input(seen["inp"])[:, :8]  # (S, P, 4H): the cell's own input, probed rows
    steps, r, b = wx.shape[0], cell._recurrent_kernel.detach(), cell._bias.detach()

    def run(s, start):
        for t in range(start, steps):
            s = slstm_forward_step(wx[t : t + 1], s, r, b, cell.pointwise)[0][:, 0]
        return s

    states = [torch.zeros(4, 8, 8)]  # (y, c, n, m) x P x H, from the zero state as the cell starts
    for t in range(steps):
        states.append(slstm_forward_step(wx[t : t + 1], states[-1], r, b, cell.pointwise)[0][:, 0])
    # the whole state (y, c, n, m) of a sequence, 4 x 8 numbers: rows independent, so (P, 32) in and out
    flat = lambda s: s.permute(1, 0, 2).reshape(8, -1)
    unflat = lambda v: v.reshape(8, 4, 8).permute(1, 0, 2)
    jacs = [row_jacobian(lambda v, j=j: flat(run(unflat(v), steps - j)), flat(states[steps - j])) for j in range(1, steps)]
    check(model, "1.slstm_cell", lambda: model(x), jacs)


def _slstm_forget_reference(cell, wx, state=None):
    """(gains, max_gains) of the forget path from the package's own sequential forward in
    float64: its stabilised forget gates f'_t, multiplied out per unit (numpy)."""
    from xlstm.blocks.slstm.src.vanilla import slstm_forward

    p = wx.shape[1]
    s0 = torch.zeros(4, p, cell.config.hidden_size, dtype=torch.float64) if state is None else state.double()
    r, b = cell._recurrent_kernel.detach().double(), cell._bias.detach().double()
    _, _, g = slstm_forward(wx.double(), s0, r, b, cell.pointwise)
    log_f = np.log(g[: wx.shape[0], 1].numpy())  # (T, P, H)
    steps = log_f.shape[0]
    rms, top = [np.zeros(p)], [np.zeros(p)]
    for j in range(1, steps):
        prod = np.exp(log_f[steps - j :].sum(0))  # (P, H): the diagonal of d c_T / d c_{T-j}
        rms.append(np.log(np.sqrt((prod**2).mean(1))))
        top.append(np.log(prod.max(1)))
    gains, tops = aggregate(np.array(rms), np.array(top), NUMPY_TENSORS)
    return np.asarray(gains), np.asarray(tops)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
def test_slstm_with_wide_heads_is_measured_on_its_forget_path(with_state):
    """Heads of 32 units (blocks of 128 numbers, above the dense limit): the forget path,
    gates recomputed from the cell's input and output at once, against the package's own
    sequential forward's gates multiplied out in float64."""
    pytest.importorskip("xlstm", reason="xlstm is not installed (pip install gradwatch[modern])")
    from xlstm.blocks.slstm.layer import sLSTMLayer, sLSTMLayerConfig

    torch.manual_seed(2)
    cfg = sLSTMLayerConfig(embedding_dim=128, num_heads=4, backend="vanilla", conv1d_kernel_size=0, dtype="float32")
    layer = sLSTMLayer(cfg)
    cell = layer.slstm_cell
    with torch.no_grad():  # gates that move the stabiliser, a recurrent kernel that matters
        cell._recurrent_kernel_.normal_(0.0, 0.3)
        cell._bias_.normal_(0.0, 1.5)
    model = nn.Sequential(nn.Linear(3, 128), nn.Identity())
    x = torch.randn(10, 30, 3)
    state = None
    if with_state:
        state = torch.rand(4, 10, 128) + 0.5  # (y, c, n, m): n > 0, so the stabiliser starts at m_0
    run = lambda: cell(model(x).repeat(1, 1, 4), state)[0]  # the cell's input: 4 gate pre-activations
    wx = cell._permute_input(model(x).repeat(1, 1, 4)).detach()[:, :8]
    gains, top = _slstm_forget_reference(cell, wx, None if state is None else state[:, :8])
    holder = nn.Module()
    holder.cell = cell
    got_gains, got_top = probed(holder, "cell", run)
    close(got_gains, gains, "gains (forget path)")
    close(got_top, top, "max_gains (forget path)")
    assert gains[-1] < 0.5 * top[-1]  # decays the check can see: units that forget, units that keep


def test_diagonal_gains_with_a_reset_and_wide_decays_against_numpy():
    """The probe's own reduction (floored exponent, base-2) against float64 numpy products:
    decays from 1 down to e^-60 per step and a state reset (log a = -inf) in one sequence."""
    from gradwatch_torch._modern import _factored, _plain

    gen = torch.Generator().manual_seed(3)
    log_a = -torch.rand(5, 20, 7, generator=gen) ** 3 * 60.0  # (P, T, S)
    log_a[2, 9] = -math.inf
    got = [t.double().numpy() for t in _plain(log_a, 8)]
    la = log_a.double().numpy()
    rms, top = [np.zeros(5)], [np.zeros(5)]
    with np.errstate(divide="ignore"):
        for j in range(1, 20):
            prod = np.exp(la[:, 20 - j :].sum(1))  # (P, S): the diagonal of d s_T / d s_{T-j}
            rms.append(np.log(np.sqrt((prod**2).mean(1))))
            top.append(np.log(prod.max(1)))
    want = aggregate(np.array(rms), np.array(top), NUMPY_TENSORS)
    for g, w, what in zip(got, want, ("gains", "max_gains")):
        seen = np.asarray(w) > 1e-30  # (the gains themselves are float32: below 1e-38 they read 0)
        close(g[seen], np.asarray(w)[seen], what)
        assert (g[~seen] <= 1e-30).all() and seen.sum() >= 8
    scale, rate = torch.rand(5, 20, 6, generator=gen) * 3.0, -torch.rand(6, 4, generator=gen) * 4.0
    got = [t.double().numpy() for t in _factored(scale, rate, 8)]
    want = _plain((scale[..., None] * rate).double(), 8)
    for g, w, what in zip(got, want, ("gains (factored)", "max_gains (factored)")):
        close(g, w.numpy(), what)


def test_a_loop_cell_over_the_state_limit_is_not_measured_and_then_left_alone():
    from gradwatch_torch._loops import LOOP_EXACT_DIM

    model = Looped(TanhCell(3, LOOP_EXACT_DIM + 1), LOOP_EXACT_DIM + 1)
    ctx = ProbeContext(lambda: True, lambda: 1, 1, sum(p.numel() for p in model.parameters()))
    (probe,) = [p for p in find_modern_probes(model, ctx) if p.name == "cell"]
    handles = install(probe, probe._module())
    try:
        model(torch.randn(4, 6, 3)).sum().backward()
        assert probe.take_propagation() is None
        assert probe._dead and probe._plan == (6, LOOP_EXACT_DIM + 1)
        model(torch.randn(4, 6, 3))
        assert probe._calls_this_step == 0  # its hooks returned at once
    finally:
        for h in handles:
            h.remove() if hasattr(h, "remove") else h()
        probe.close()


def test_loop_products_against_numpy_svd_on_rank_deficient_jacobians():
    """The products' logs (Frobenius norm, largest singular value) against float64 numpy, on
    Jacobians with zero columns (an sLSTM's y block while its recurrent kernel is zero) and
    entries over 6 orders of magnitude (where float32 LAPACK eigh failed to converge)."""
    from gradwatch_torch._loops import log_products

    gen = torch.Generator().manual_seed(5)
    jacs = []
    for _ in range(30):
        j = torch.randn(6, 12, 12, generator=gen) * torch.logspace(-3, 3, 12)[None, :, None]
        j[:, :, :4] = 0.0  # no path from the first 4 state numbers
        jacs.append(j)
    log_fro, log_top = log_products(jacs)
    prod = np.broadcast_to(np.eye(12), (6, 12, 12)).copy()
    for j, jac in enumerate(reversed(jacs), start=1):
        prod = prod @ jac.double().numpy()
        close(np.exp(log_fro[j].numpy()), np.linalg.norm(prod, axis=(1, 2)), f"Frobenius norm, j={j}")
        close(np.exp(log_top[j].numpy()), np.linalg.svd(prod, compute_uv=False)[:, 0], f"largest singular value, j={j}")
    assert (log_fro[0] == 0).all() and (log_top[0].abs() < 1e-12).all()


def test_slstm_at_its_default_initialisation_is_measured(caplog):
    """xlstm's defaults (recurrent kernel zero, powerlaw forget bias): float32 LAPACK eigh
    failed to converge on these products and switched the measurement off."""
    pytest.importorskip("xlstm", reason="xlstm is not installed (pip install gradwatch[modern])")
    import logging

    from xlstm.blocks.slstm.layer import sLSTMLayer, sLSTMLayerConfig

    torch.manual_seed(0)
    cfg = sLSTMLayerConfig(embedding_dim=32, num_heads=4, backend="vanilla", conv1d_kernel_size=0, dtype="float32")
    model = nn.Sequential(nn.Linear(8, 32), sLSTMLayer(cfg))
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        prof = recorded(model, lambda: model(torch.randn(4, 40, 8)).pow(2).mean(), "1.slstm_cell")
    assert not caplog.records, caplog.text
    prop = prof.recurrences["l0"]
    assert len(prop.max_gains) == 40 and all(math.isfinite(g) and g > 0 for g in prop.max_gains)
