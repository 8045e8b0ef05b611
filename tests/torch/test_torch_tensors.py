"""On-device maths of the torch backend against torch's own functions and the numpy
reference of the core."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradwatch.policies import AGC
from gradwatch_torch._gates import lstm_forget_stats, packed_lstm_forget_stats
from gradwatch_torch._tensors import (
    GradGroups,
    SpectralTracker,
    agc_factors,
    apply_agc_,
    packed_timestep_sq_norms,
    scale_grads_,
    timestep_sq_norms,
)
from tests.reference import agc_clip


def _params_with_grads(dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, dt in enumerate(dtypes):
        p = nn.Parameter(torch.randn(3 + i, 2, generator=gen).to(dt))
        p.grad = torch.randn(3 + i, 2, generator=gen).to(dt)
        params.append(p)
    return params


def test_norms_match_vector_norm_per_parameter_in_bound_order():
    params = _params_with_grads([torch.float32, torch.float64, torch.float32, torch.bfloat16, torch.float16])
    got = GradGroups(params).norms()
    assert got.dtype == torch.float64  # a float64 parameter keeps float64 statistics
    want = torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in params])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    # float32 / float64 entries are exact to their precision
    torch.testing.assert_close(got[[0, 1, 2]], want[[0, 1, 2]], rtol=1e-6, atol=0)


def test_missing_gradient_counts_as_zero():
    params = _params_with_grads([torch.float32] * 3)
    params[1].grad = None
    got = GradGroups(params).norms()
    assert got[1].item() == 0.0
    assert got[0].item() == pytest.approx(params[0].grad.norm().item(), rel=1e-6)


def test_half_precision_gradients_do_not_overflow():
    p = nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    p.grad = torch.full((1000,), 60000.0, dtype=torch.float16)
    # the sum of squares (3.6e12) overflows fp16 (max 65504); computed in fp32 it does not
    got = GradGroups([p]).norms()
    assert torch.isfinite(got).all()
    assert got.item() == pytest.approx(60000.0 * 1000**0.5, rel=1e-3)


def test_nonfinite_gradient_gives_nonfinite_norm():
    params = _params_with_grads([torch.float32] * 2)
    params[1].grad[0, 0] = float("nan")
    got = GradGroups(params).norms()
    assert torch.isfinite(got[0]) and not torch.isfinite(got[1])


def test_scale_grads_multiplies_in_place_and_skips_exact_one():
    params = _params_with_grads([torch.float32, torch.float64])
    before = [p.grad.clone() for p in params]
    ids = [id(p.grad) for p in params]
    scale_grads_([p.grad for p in params], 0.25)
    for p, b, i in zip(params, before, ids):
        assert id(p.grad) == i
        assert torch.equal(p.grad, b * 0.25)
    snap = [p.grad.clone() for p in params]
    scale_grads_([p.grad for p in params], 1.0)
    assert all(torch.equal(p.grad, s) for p, s in zip(params, snap))


@pytest.mark.parametrize("shape", [(8, 5), (6, 3, 2, 2), (7,), ()])
def test_agc_matches_numpy_reference(shape):
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = (
        torch.randn(shape, generator=gen, dtype=torch.float64)
        * torch.logspace(-3, 1, steps=max(1, p.numel())).reshape(shape)
        if shape
        else torch.tensor(5.0, dtype=torch.float64)
    )
    ref = agc_clip(p.numpy(), g.numpy(), clip_factor=0.05, eps=1e-3, unit_axis=0)
    factors, clipped_sq = agc_factors([p], [g], AGC(0.05, 1e-3))
    g2 = g.clone()
    apply_agc_([g2], factors)
    np.testing.assert_allclose(g2.numpy(), ref, rtol=1e-12, atol=0)
    assert clipped_sq[0].item() == pytest.approx(float(np.sum(ref * ref)), rel=1e-5)


def test_agc_leaves_zero_gradient_and_zero_weights_alone():
    p, g = torch.zeros(4, 3), torch.zeros(4, 3)
    factors, sq = agc_factors([p], [g], AGC(0.01, 1e-3))
    apply_agc_([g], factors)
    assert torch.equal(g, torch.zeros(4, 3)) and sq.item() == 0.0


def test_timestep_norms_both_layouts_and_unbatched():
    g = torch.randn(7, 3, 5)  # (T, B, F)
    want = torch.stack([g[t].double().norm() ** 2 for t in range(7)])
    torch.testing.assert_close(timestep_sq_norms(g, batch_first=False), want)
    torch.testing.assert_close(timestep_sq_norms(g.transpose(0, 1).contiguous(), batch_first=True), want)
    torch.testing.assert_close(timestep_sq_norms(g[:, 0], batch_first=False), g[:, 0].double().square().sum(1))


def test_tiny_timestep_gradients_do_not_underflow_to_zero():
    g = torch.full((4, 2, 3), 1e-25)  # squares (1e-50) underflow float32
    got = timestep_sq_norms(g, batch_first=False).sqrt()
    torch.testing.assert_close(got, torch.full((4,), 1e-25 * 6**0.5, dtype=torch.float64))


def test_packed_timestep_norms_exclude_padding():
    lengths = [5, 3, 2]
    padded = torch.randn(5, 3, 4)
    for b, n in enumerate(lengths):
        padded[n:, b] = 1e6  # padding would dominate if it were counted
    packed = pack_padded_sequence(padded, lengths)
    got = packed_timestep_sq_norms(packed.data, packed.batch_sizes)
    want = torch.stack(
        [sum(padded[t, b].double().square().sum() for b, n in enumerate(lengths) if t < n) for t in range(5)]
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cls,gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_power_iteration_within_5_percent_of_matrix_norm(cls, gates):
    torch.manual_seed(0)
    layer = cls(16, 48)
    tracker = SpectralTracker(gates)
    w = layer.weight_hh_l0
    exact = torch.linalg.matrix_norm(w.detach().reshape(gates, 48, 48), ord=2)
    got = tracker(w)
    torch.testing.assert_close(got, exact, rtol=0.05, atol=0)
    # warm start: the weights move a little, two iterations keep up
    with torch.no_grad():
        w.add_(0.01 * torch.randn_like(w))
    exact = torch.linalg.matrix_norm(w.detach().reshape(gates, 48, 48), ord=2)
    torch.testing.assert_close(tracker(w), exact, rtol=0.05, atol=0)


def test_power_iteration_does_not_touch_global_rng():
    w = nn.LSTM(4, 8).weight_hh_l0
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    SpectralTracker(4)(w)
    assert torch.equal(torch.rand(3), expected)


def test_power_iteration_state_round_trips_through_json():
    import json

    layer = nn.LSTM(4, 8)
    t1 = SpectralTracker(4)
    t1(layer.weight_hh_l0)
    t2 = SpectralTracker(4)
    t2.load_state_dict(json.loads(json.dumps(t1.state_dict())), torch.device("cpu"))
    assert torch.equal(t1(layer.weight_hh_l0), t2(layer.weight_hh_l0))


def _forget_gates_by_unrolling(lstm, x, h0, c0):
    """Ground truth: unroll the LSTM step by step with torch ops, checking the unroll
    reproduces nn.LSTM's output, and return the forget gates (T, B, H)."""
    w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
    b = lstm.bias_ih_l0 + lstm.bias_hh_l0
    h, c = h0, c0
    fs, hs = [], []
    for t in range(x.shape[0]):
        z = x[t] @ w_ih.t() + h @ w_hh.t() + b
        i, f, g, o = z.chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c + i * g
        h = o * c.tanh()
        fs.append(f)
        hs.append(h)
    out, _ = lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
    torch.testing.assert_close(torch.stack(hs), out, rtol=1e-4, atol=1e-5)
    return torch.stack(fs)


@pytest.mark.parametrize("batch_first", [False, True])
def test_forget_gate_stats_match_unrolled_lstm(batch_first):
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7)
    x = torch.randn(9, 3, 5)
    h0, c0 = torch.randn(3, 7), torch.randn(3, 7)
    with torch.no_grad():
        f = _forget_gates_by_unrolling(lstm, x, h0, c0)
        out, _ = lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
        xx, oo = (x.transpose(0, 1), out.transpose(0, 1)) if batch_first else (x, out)
        got = lstm_forget_stats(
            xx, oo, h0.unsqueeze(0), lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0, batch_first
        )
    assert got[0].item() == pytest.approx(f.mean().item(), rel=1e-5)
    assert got[1].item() == pytest.approx(f.log().sum(0).mean().item(), rel=1e-5)


def test_forget_gate_stats_packed_exclude_padding():
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7)
    lengths = [6, 4, 2]
    x = torch.randn(6, 3, 5)
    with torch.no_grad():
        per_seq = []
        for b, n in enumerate(lengths):
            z = torch.zeros(1, 7)
            per_seq.append(_forget_gates_by_unrolling(lstm, x[:n, b : b + 1], z, z))
        packed = pack_padded_sequence(x, lengths)
        out, _ = lstm(packed)
        got = packed_lstm_forget_stats(
            packed.data,
            out.data,
            packed.batch_sizes,
            packed.sorted_indices,
            None,
            lstm.weight_ih_l0,
            lstm.weight_hh_l0,
            lstm.bias_ih_l0,
            lstm.bias_hh_l0,
        )
    all_f = torch.cat([f.reshape(-1, 7) for f in per_seq])
    assert got[0].item() == pytest.approx(all_f.mean().item(), rel=1e-5)
    path = torch.stack([f.log().sum(0).squeeze(0) for f in per_seq]).mean()
    assert got[1].item() == pytest.approx(path.item(), rel=1e-5)


def test_forget_gate_stats_on_a_sample_of_the_batch():
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7)
    x = torch.randn(6, 9, 5)
    lengths = [6, 5, 5, 4, 3, 3, 2, 2, 1]
    args = (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
    with torch.no_grad():
        out, _ = lstm(x)
        got = lstm_forget_stats(x, out, None, *args, False, max_batch=3)
        want = lstm_forget_stats(x[:, :3], out[:, :3], None, *args, False)
        torch.testing.assert_close(got, want)
        packed = pack_padded_sequence(x, lengths)
        pout, _ = lstm(packed)
        got = packed_lstm_forget_stats(
            packed.data, pout.data, packed.batch_sizes, packed.sorted_indices, None, *args, max_batch=3
        )
        small = pack_padded_sequence(x[:, :3], lengths[:3])
        sout, _ = lstm(small)
        want = packed_lstm_forget_stats(small.data, sout.data, small.batch_sizes, None, None, *args)
        torch.testing.assert_close(got, want)
