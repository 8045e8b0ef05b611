"""flash-linear-attention's gated linear recurrences (GLA, HGRN, RWKV-6) against autograd on
fla's own pure-torch reference recurrences.

fla runs its layers through Triton kernels, which need a GPU driver: on this CPU machine
each layer's kernels are replaced (monkeypatch, as test_modern's Mamba-2 test does) by
fla's own reference functions (``fla.ops.gla.naive.naive_recurrent_gla``,
``fla.ops.hgrn.naive.naive_recurrent_hgrn``, ``fla.ops.rwkv6.recurrent_naive``, the norms'
``*_ref``), and one test runs fla's real Triton kernels in Triton's CPU interpreter to
check that the stand-ins compute what the kernels do. The reference for the propagation is
the Jacobian of the final state with respect to the state j steps before, by autograd
through the naive recurrence restarted from that state (the initial state requiring grad),
for every j: no diagonal assumption.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")
try:  # fla imports triton at import time (the Makefile installs both beside the venv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fla.layers  # noqa: F401
except Exception as exc:  # noqa: BLE001 - any import failure means: not testable here
    pytest.skip(
        f"flash-linear-attention is not importable here ({type(exc).__name__}: {exc}); `make test` runs this file "
        "in its own suite with fla and triton on the path (tests/run_suites.py)",
        allow_module_level=True,
    )

import torch.nn.functional as F
from test_modern import _capture, check, row_jacobian
from torch import nn

from gradwatch.through_time.families import GATES, REMEDIES

P = 8  # the probed sequences


# -- fla's kernels replaced by fla's own torch references ----------------------------------
def _rms_norm_gated(
    x, g, weight, bias, activation="swish", residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6
):
    from fla.modules.norm.layernorm import rms_norm_ref

    y = rms_norm_ref(x.float(), weight, bias, eps=eps)
    return (y * (F.silu(g.float()) if activation in ("swish", "silu") else torch.sigmoid(g.float()))).to(x.dtype)


def _group_norm(
    x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False, is_rms_norm=False, num_groups=1
):
    from fla.modules.norm.layernorm import group_norm_ref

    return group_norm_ref(
        x, weight, bias, num_groups, residual=residual, eps=eps, is_rms_norm=is_rms_norm, prenorm=prenorm
    )


def _causal_conv1d(x, weight, bias=None, residual=None, initial_state=None, activation=None, cu_seqlens=None, **_):
    """ShortConvolution's depthwise causal convolution (B, T, D), weight (D, W), in torch."""
    assert initial_state is None and cu_seqlens is None and residual is None
    width = weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=width - 1, groups=x.shape[-1])[..., : x.shape[1]]
    y = y.transpose(1, 2)
    return (F.silu(y) if activation in ("silu", "swish") else y), None


def _gla(q, k, v, gk=None, g=None, initial_state=None, output_final_state=False, cu_seqlens=None, **_):
    """fla's naive GLA; a packed batch (``cu_seqlens``, fla's unpadded mask) one sequence at a time."""
    from fla.ops.gla.naive import naive_recurrent_gla

    gk = gk if gk is not None else g
    if cu_seqlens is None:
        return naive_recurrent_gla(q, k, v, gk, initial_state, output_final_state)
    cut = lambda t, a, b: t[:, a:b]
    parts = [
        naive_recurrent_gla(*(cut(t, a, b) for t in (q, k, v, gk)))[0]
        for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())
    ]
    return torch.cat(parts, 1), None


def _hgrn(x, g, initial_state=None, output_final_state=False, **_):
    from fla.ops.hgrn.naive import naive_recurrent_hgrn

    return naive_recurrent_hgrn(x, g, initial_state, output_final_state)


def _rwkv6(r, k, v, w, u, scale=1.0, initial_state=None, output_final_state=False, **_):
    """The layer passes (B, T, H, K); fla's naive recurrence takes (B, H, T, K)."""
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    heads = lambda t: t.transpose(1, 2)
    o, ht = naive_recurrent_rwkv6(heads(r), heads(k), heads(v), heads(w), u, scale, initial_state, output_final_state)
    return o.transpose(1, 2), ht


@pytest.fixture
def on_cpu(monkeypatch):
    """The three layers' Triton kernels replaced by fla's torch references; the arguments
    of each recurrence call are kept in ``calls`` (the first is the layer's)."""
    import fla.modules.causal_conv1d.ops as conv
    import fla.modules.norm.fused_norm_gate as fng
    import fla.modules.norm.layernorm as ln
    from fla.layers import gla, hgrn, rwkv6
    from fla.modules.token_shift import token_shift_ref

    calls = []

    def spy(fn):
        def run(*args, **kwargs):
            calls.append({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
            return fn(*args, **kwargs)

        return run

    for name in ("fused_recurrent_gla", "chunk_gla", "fused_chunk_gla"):
        monkeypatch.setattr(gla, name, spy(_gla))
    for name in ("fused_recurrent_hgrn", "chunk_hgrn"):
        monkeypatch.setattr(hgrn, name, spy(_hgrn))
    for name in ("fused_recurrent_rwkv6", "chunk_rwkv6"):
        monkeypatch.setattr(rwkv6, name, spy(_rwkv6))
    monkeypatch.setattr(hgrn, "swiglu", lambda x, y: F.silu(x) * y)
    monkeypatch.setattr(rwkv6, "token_shift", lambda x, cu_seqlens=None, **_: token_shift_ref(x, cu_seqlens))
    monkeypatch.setattr(fng, "rms_norm_gated", _rms_norm_gated)
    monkeypatch.setattr(ln, "group_norm", _group_norm)
    monkeypatch.setattr(conv, "causal_conv1d", _causal_conv1d)
    return calls


class Mixer(nn.Module):
    """An input projection and the fla layer (its output is the first of a tuple)."""

    def __init__(self, d_in, layer):
        super().__init__()
        self.inp, self.mixer = nn.Linear(d_in, layer.hidden_size), layer

    def forward(self, x):
        return self.mixer(self.inp(x))[0]


def _jacobians(final, steps):
    """jacs[j - 1] = d S_T / d S_{T-j}: ``final(start, state)`` runs the naive recurrence of
    the probed rows from step ``start`` (state None: from zero) and returns its final state."""
    jacs = []
    for j in range(1, steps):
        state = final(0, None, steps - j)  # S_{T-j}: the state after the first T - j steps
        jacs.append(
            row_jacobian(
                lambda st, j=j, shape=state.shape: final(steps - j, st.reshape(shape), steps), state.reshape(P, -1)
            )
        )
    return jacs


# -- GLA ------------------------------------------------------------------------------------
def _gla_model(**kw):
    from fla.layers import GatedLinearAttention

    layer = GatedLinearAttention(hidden_size=8, expand_k=1.0, expand_v=0.5, num_heads=2, gate_low_rank_dim=4, **kw)
    model = Mixer(3, layer)
    with torch.no_grad():  # gates spread over (0, 1): decays that differ across steps and keys
        layer.gk_proj[1].weight.mul_(4.0)
        layer.gk_proj[1].bias.uniform_(-1.0, 3.0)
    return model


def _gla_reference(calls):
    from fla.ops.gla.naive import naive_recurrent_gla

    c = calls[0]
    q, k, v, gk = (c[n][:P] for n in ("q", "k", "v", "gk"))
    return lambda a, st, b: naive_recurrent_gla(q[:, a:b], k[:, a:b], v[:, a:b], gk[:, a:b], st, True)[1]


@pytest.mark.parametrize("captured", [True, False])
@pytest.mark.parametrize(
    "kw",
    [
        {"gate_logit_normalizer": 2},
        {"gate_logit_normalizer": 1, "clamp_min": -0.4},
        {"num_kv_heads": 1, "gate_logit_normalizer": 2},
    ],
)
def test_gla_against_autograd_on_its_naive_recurrence(on_cpu, monkeypatch, captured, kw):
    model = _gla_model(**kw)
    x = torch.randn(10, 12, 3)
    model(x)
    jacs = _jacobians(_gla_reference(on_cpu), x.shape[1])
    used = _capture(monkeypatch, captured)
    gains, top = check(model, "mixer", lambda: model(x), jacs)
    assert used and all(u == captured for u in used)
    assert gains[-1] < 0.9 * top[-1]  # keys that forget and keys that keep: RMS and max differ


def test_gla_left_padding_leaves_the_state_as_it_was(on_cpu):
    """fla removes the masked tokens before the scan (unpad, then one packed sequence per
    row): the reference restarts fla's naive recurrence on each row's real tokens, the
    kernel's own inputs; a state before the first real token is the initial state."""
    from fla.ops.gla.naive import naive_recurrent_gla

    model = _gla_model(gate_logit_normalizer=1)
    x = torch.randn(9, 10, 3)
    mask = torch.ones(9, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[4, :6] = 0
    mask[8, :9] = 0  # a row past the probed ones
    run = lambda: model.mixer(model.inp(x), attention_mask=mask)[0]
    run()
    c = on_cpu[0]
    cu = c["cu_seqlens"].tolist()
    steps = x.shape[1]
    per_row = []
    for p in range(P):
        q, k, v, gk = (c[n][:, cu[p] : cu[p + 1]] for n in ("q", "k", "v", "gk"))
        length = cu[p + 1] - cu[p]

        def final(a, st, b, q=q, k=k, v=v, gk=gk):
            return naive_recurrent_gla(q[:, a:b], k[:, a:b], v[:, a:b], gk[:, a:b], st, True)[1]

        shape = (1, *final(0, None, length).shape[1:])
        rows = []
        for j in range(1, steps):
            start = max(length - j, 0)  # at or before the first real token: the initial state
            state = final(0, None, start) if start else torch.zeros(shape)
            step = lambda st, a=start, f=final, s=shape, n=length: f(a, st.reshape(s), n)
            rows.append(row_jacobian(step, state.reshape(1, -1)))
        per_row.append(rows)
    jacs = [torch.cat([rows[j] for rows in per_row]) for j in range(steps - 1)]
    holder = nn.Module()
    holder.inp, holder.mixer = model.inp, model.mixer
    check(holder, "mixer", run, jacs)


def test_gla_packed_sequences_restart_the_state(on_cpu):
    """fla's packed batch (``cu_seqlens``, B = 1): each sequence starts from a zero state,
    so d S_T / d S_{T-j} is 0 once j reaches back before the last sequence's first token.
    The reference runs the naive recurrence per sequence, chained only within one."""
    from fla.ops.gla.naive import naive_recurrent_gla

    model = _gla_model(gate_logit_normalizer=1)
    x = torch.randn(1, 12, 3)
    cu = torch.tensor([0, 3, 5, 12])
    run = lambda: model.mixer(model.inp(x), cu_seqlens=cu)[0]
    run()
    c = on_cpu[0]
    q, k, v, gk = (c[n] for n in ("q", "k", "v", "gk"))
    last = int(cu[-2])

    def final(a, st, b):
        """The state after token b - 1 from ``st``, the state after token a - 1 (None:
        zero); ``st`` is dropped when the last sequence starts at token a or later."""
        if st is not None and a <= last < b:  # (0 * st: a graph for autograd, a zero Jacobian)
            return naive_recurrent_gla(q[:, last:b], k[:, last:b], v[:, last:b], gk[:, last:b], None, True)[1] + 0 * st
        return naive_recurrent_gla(q[:, a:b], k[:, a:b], v[:, a:b], gk[:, a:b], st, True)[1]

    steps = x.shape[1]
    jacs = []
    for j in range(1, steps):
        state = final(0, None, steps - j)
        jacs.append(
            row_jacobian(lambda st, j=j, s=state.shape: final(steps - j, st.reshape(s), steps), state.reshape(1, -1))
        )
    holder = nn.Module()
    holder.inp, holder.mixer = model.inp, model.mixer
    gains, _ = check(holder, "mixer", run, jacs)
    assert gains[steps - last - 1] > 0 and (gains[steps - last :] == 0).all()


# -- HGRN -----------------------------------------------------------------------------------
def _hgrn_model(**kw):
    from fla.layers import HGRNAttention

    layer = HGRNAttention(hidden_size=6, layer_idx=1, **kw)
    with torch.no_grad():
        layer.f_proj.weight.mul_(3.0)
    return Mixer(3, layer)


@pytest.mark.parametrize("captured", [True, False])
@pytest.mark.parametrize(("bounded", "short_conv"), [(False, False), (True, False), (False, True)])
def test_hgrn_against_autograd_on_its_naive_recurrence(on_cpu, monkeypatch, captured, bounded, short_conv):
    """The forget gate as the scan got it: after the short convolution when there is one
    (captured: the convolution's output; recomputed: f_proj, then the convolution)."""
    from fla.ops.hgrn.naive import naive_recurrent_hgrn

    layer = _hgrn_model(use_short_conv=short_conv).mixer
    bound = torch.linspace(0.1, 0.9, 6) if bounded else None  # HGRNModel's lower bound of layer 1

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.mixer = nn.Linear(3, 6), layer

        def forward(self, x):
            return self.mixer(self.inp(x), lower_bound=bound)[0]

    model = Model()
    x = torch.randn(10, 12, 3)
    model(x)
    c = on_cpu[0]
    i, g = c["x"][:P], c["g"][:P]
    jacs = _jacobians(lambda a, st, b: naive_recurrent_hgrn(i[:, a:b], g[:, a:b], st, True)[1], x.shape[1])
    used = _capture(monkeypatch, captured)
    check(model, "mixer", lambda: model(x), jacs)
    assert used and all(u == captured for u in used)


# -- RWKV-6 ---------------------------------------------------------------------------------
def _rwkv6_model():
    from fla.layers import RWKV6Attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fla's note on its RWKV implementation
        layer = RWKV6Attention(
            hidden_size=8, num_heads=2, expand_k=1.0, expand_v=0.5, proj_low_rank_dim=2, gate_low_rank_dim=4
        )
    with torch.no_grad():  # fla initialises w's LoRA down-projection to 0: data-dependent decays need it
        layer.w_proj.linear.lora[0].weight.normal_(0.0, 1.0)
        layer.x_proj[0].mu.uniform_(-1.0, 1.0)
        layer.w_proj.linear.lora[2].bias.uniform_(-3.0, 1.0)
        layer.x_bias.normal_(0.0, 0.5)
        layer.bonus.normal_(0.0, 0.5)  # u, the current token's own term (0 at fla's initialisation)
    layer.gate_fn = F.silu  # the output gate's swish (fla's is a Triton kernel), outside the recurrence
    return Mixer(3, layer)


@pytest.mark.parametrize("captured", [True, False])
def test_rwkv6_against_autograd_on_its_naive_recurrence(on_cpu, monkeypatch, captured):
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    model = _rwkv6_model()
    x = torch.randn(10, 12, 3)
    model(x)
    c = on_cpu[0]
    r, k, v, w = (c[n][:P].transpose(1, 2) for n in ("r", "k", "v", "w"))  # (P, H, T, K)
    u = c["u"]
    final = lambda a, st, b: naive_recurrent_rwkv6(
        r[:, :, a:b], k[:, :, a:b], v[:, :, a:b], w[:, :, a:b], u, 1.0, st, True
    )[1]
    jacs = _jacobians(final, x.shape[1])
    used = _capture(monkeypatch, captured)
    gains, top = check(model, "mixer", lambda: model(x), jacs)
    assert used and all(u == captured for u in used)
    assert gains[-1] < 0.5 * top[-1]


def test_rwkv7_is_not_measured_as_diagonal(on_cpu):
    """RWKV-7's transition has a rank-one correction: no decay adapter claims it."""
    from fla.layers import RWKV7Attention

    from gradwatch_torch.recurrences import declared

    assert not any(d.matches(RWKV7Attention) for d in declared() if d.decay is not None)


def test_fla_families_have_gates_and_remedies():
    for kind in ("gla", "hgrn", "rwkv6"):
        assert kind in GATES and set(REMEDIES[kind]) == {"vanishing", "exploding"}


# -- the stand-ins against fla's real Triton kernels (Triton's CPU interpreter) --------------
_INTERPRETED = """
import warnings; warnings.filterwarnings("ignore")
import triton.runtime.autotuner as at
at.Autotuner.do_bench = property(lambda self: (lambda fn, quantiles=None: [1.0, 1.0, 1.0]))  # no GPU timer
import torch, test_fla
torch.manual_seed(0)
models = [test_fla._gla_model(gate_logit_normalizer=2), test_fla._rwkv6_model(), test_fla._hgrn_model().eval(), test_fla._hgrn_model(use_short_conv=True).eval()]
x = torch.randn(3, 12, 3)
with torch.no_grad():
    out = [m(x) for m in models]
torch.save((models, x, out), {path!r})
"""


def test_stand_ins_compute_what_flas_triton_kernels_compute(on_cpu, tmp_path):
    """fla's own kernels (the fused_recurrent GLA, RWKV-6 and HGRN, the gated RMS norm, the
    group norm, the token shift, swiglu, the short convolution) run in Triton's interpreter in a child process (the
    interpreter is chosen at import); the same layers' outputs with the stand-ins must match.
    (HGRN in eval mode: its chunk kernel, used when grad is on, does not run in the
    interpreter of triton 3.9: "mask has unsupported dtype".)"""
    path = tmp_path / "interpreted.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    got = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_INTERPRETED.format(path=str(path)))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if got.returncode != 0 and "InterpreterError" in got.stderr:
        pytest.skip(f"Triton's interpreter cannot run these kernels here: {got.stderr[-300:]}")
    assert got.returncode == 0, got.stderr[-2000:]
    models, x, want = torch.load(path, weights_only=False)
    with torch.no_grad():
        for model, w in zip(models, want):
            torch.testing.assert_close(model(x), w, rtol=1e-4, atol=1e-5)
