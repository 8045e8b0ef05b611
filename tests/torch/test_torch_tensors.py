"""On-device maths of the torch backend against torch's own functions and the numpy
reference of the core."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradwatch.policies import AGC
from gradwatch_torch._gates import gate_statistics, module_gates
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


def _exact_sigma(w, gates):
    return torch.linalg.matrix_norm(w.detach().double().reshape(gates, w.shape[0] // gates, w.shape[1]), ord=2)


@pytest.mark.parametrize("cls,gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
@pytest.mark.parametrize("hidden", [48, 160], ids=["exact", "lanczos"])
def test_spectral_norm_within_1_percent_of_matrix_norm_cold_and_warm(cls, gates, hidden):
    torch.manual_seed(0)
    w = cls(16, hidden).weight_hh_l0
    tracker = SpectralTracker(gates)
    torch.testing.assert_close(tracker(w).double(), _exact_sigma(w, gates), rtol=0.01, atol=0)
    with torch.no_grad():  # a large move: a new random component of the same size
        w.add_(torch.randn_like(w) / hidden**0.5)
    torch.testing.assert_close(tracker(w).double(), _exact_sigma(w, gates), rtol=0.01, atol=0)


def test_spectral_norm_follows_a_new_top_direction_that_overtakes_the_previous_one():
    """The case that fooled a warm power iteration: the previous top singular vector is
    still (almost) a singular vector, now the second one."""
    torch.manual_seed(1)
    n = 128
    u, _ = torch.linalg.qr(torch.randn(n, n))
    v, _ = torch.linalg.qr(torch.randn(n, n))
    s = torch.linspace(1.0, 0.1, n)
    tracker = SpectralTracker(1)
    tracker(u @ torch.diag(s) @ v.t())
    s2 = s.clone()
    s2[0], s2[1] = 1.0, 1.6  # direction 2 grows past direction 1
    w2 = u @ torch.diag(s2) @ v.t()
    assert tracker(w2).item() == pytest.approx(1.6, rel=0.01)


def test_spectral_norm_within_1_percent_along_a_fast_training_run():
    torch.manual_seed(2)
    model = nn.LSTM(8, 96)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    tracker = SpectralTracker(4)
    for _ in range(15):
        opt.zero_grad()
        model(torch.randn(12, 4, 8))[0].square().mean().backward()
        opt.step()
        torch.testing.assert_close(tracker(model.weight_hh_l0).double(), _exact_sigma(model.weight_hh_l0, 4), rtol=0.01, atol=0)


def test_spectral_norm_does_not_touch_global_rng():
    w = nn.LSTM(4, 96).weight_hh_l0
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    SpectralTracker(4)(w)
    assert torch.equal(torch.rand(3), expected)


def test_spectral_state_round_trips_through_json():
    import json

    layer = nn.LSTM(4, 96)
    t1 = SpectralTracker(4)
    t1(layer.weight_hh_l0)
    t2 = SpectralTracker(4)
    t2.load_state_dict(json.loads(json.dumps(t1.state_dict())), torch.device("cpu"))
    assert torch.equal(t1(layer.weight_hh_l0), t2(layer.weight_hh_l0))


def test_gate_statistics_exclude_padding():
    gen = torch.Generator().manual_seed(0)
    log_gate = torch.nn.functional.logsigmoid(torch.randn(5, 3, 4, generator=gen)).double()
    lengths = [5, 2, 3]
    valid = torch.arange(5).unsqueeze(1) < torch.tensor(lengths).unsqueeze(0)
    mean, path = gate_statistics(log_gate, valid)
    lg = log_gate.numpy()
    kept = np.concatenate([lg[:n, b].reshape(-1) for b, n in enumerate(lengths)])
    assert mean.item() == pytest.approx(np.exp(kept).mean(), rel=1e-12)
    assert path.item() == pytest.approx(np.mean([lg[:n, b].sum(axis=0) for b, n in enumerate(lengths)]), rel=1e-12)
    _, full_path = gate_statistics(log_gate, None)
    assert full_path.item() == pytest.approx(lg.sum(axis=0).mean(), rel=1e-12)


def test_module_gates_are_those_of_the_recurrence_that_forgets_most():
    class R:
        def __init__(self, mean, path):
            self.gate_mean, self.gate_path = torch.tensor(mean), torch.tensor(path)

    got = module_gates([R(0.9, -1.0), R(0.4, -30.0), R(0.7, -5.0)])
    assert got.tolist() == pytest.approx([0.4, -30.0])
    assert module_gates([]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_many_small_tensors_are_measured_through_one_flat_copy_exactly(dtype):
    """Issue 20: 2,000-odd small tensors (a few sizes, in mixed order, one large one)
    measured by the fused plan equal each gradient's own norm, NaN and Inf included."""
    from gradwatch_torch._tensors import FUSE_MAX_NUMEL

    gen = torch.Generator().manual_seed(1)
    shapes = [(32, 32), (32,), (7, 3), (1,), (0,)] * 60 + [(FUSE_MAX_NUMEL + 5,)]
    params = []
    for i, shape in enumerate(shapes):
        p = nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * (1 + i % 7)).to(dtype)
        params.append(p)
    params[17].grad.view(-1)[0] = float("nan")
    params[40].grad.view(-1)[-1] = float("inf")
    groups = GradGroups(params)
    assert groups.groups[0].fused is not None
    got = groups.norms()
    want = torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in params]).to(got.dtype)
    assert torch.isnan(got[17]) and torch.isinf(got[40])
    finite = torch.isfinite(want)
    assert finite.sum() == len(params) - 2
    tol = 1e-3 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(got[finite], want[finite], rtol=tol, atol=0)


def test_fused_groups_fall_back_when_a_gradient_is_absent():
    params = [nn.Parameter(torch.zeros(4, 4)) for _ in range(40)]
    for p in params:
        p.grad = torch.randn(4, 4)
    params[3].grad = None
    norms, present = GradGroups(params).measure()
    assert norms[3].item() == 0.0 and present is not None and not present[3] and present.sum() == 39
    torch.testing.assert_close(norms[4], params[4].grad.norm())


@pytest.mark.parametrize("make", [lambda: __import__("gradwatch").FixedNorm(0.5), lambda: __import__("gradwatch").ZClip(warmup=4),
                                  lambda: __import__("gradwatch").AutoClip(history=5)])
def test_device_policy_decides_as_the_host_policy_and_shares_its_state(make):
    """The policy run on torch tensors (quiet steps) against the numpy host policy on the
    same norms (spikes, a NaN), and a state handed over midway."""
    import math

    from gradwatch.clipping import HostPolicy
    from gradwatch_torch._devicepolicy import TorchDevicePolicy

    norms = [1.0, 2.0, 0.3, 5.0, math.nan, 0.7, 40.0, 1.1, 0.9, math.inf, 3.0, 1.0]
    host, dev = HostPolicy(make()), TorchDevicePolicy(make(), torch.device("cpu"))
    for i, n in enumerate(norms):
        want = host.decide(n)
        thr, scale = dev.run(torch.tensor(n, dtype=torch.float64))
        assert float(scale) == pytest.approx(want.scale, rel=1e-12, abs=0)
        assert float(thr) == pytest.approx(want.threshold, rel=1e-12, abs=0)
        if i == 5:  # hand the state over both ways
            fresh = TorchDevicePolicy(make(), torch.device("cpu"))
            fresh.load_state_dict(host.state_dict())
            assert fresh.state_dict() == dev.state_dict()
            dev = fresh
    assert dev.state_dict() == host.state_dict()
