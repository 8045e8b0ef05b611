"""The core's policy definitions run in graph (TensorFlow ops, XLA) give the numbers the
host run with numpy gives, on the same norms; AGC's factors against a numpy reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")
keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")

from gradwatch import _numerics
from gradwatch.policies import AGC, AutoClip, FixedNorm, ZClip
from gradwatch_tf import _tensors
from gradwatch_tf._ops import TF
from gradwatch_tf._step import DevicePolicy
from tests.reference import agc_clip


def _device(policy):
    return DevicePolicy(policy, lambda init, dtype, name: tf.Variable(init, dtype=dtype, trainable=False, name=name))


def _norms(n: int = 60, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    seq = list(np.exp(rng.normal(0.0, 0.5, size=n)))
    seq[10] = 40.0  # a spike
    seq[20] = math.nan  # non-finite: no state change, scale 1
    seq[30] = math.inf
    return [float(v) for v in seq]


REFERENCES = [
    lambda: FixedNorm(1.5),
    lambda: AutoClip(percentile=10.0),
    lambda: AutoClip(percentile=75.0, history=7),
    lambda: ZClip(alpha=0.9, z_threshold=1.5, warmup=5),
    lambda: ZClip(alpha=0.97, z_threshold=2.5, warmup=3, max_norm=2.0),
]


def _replay(graph, norms, jit=False):
    decide = tf.function(graph.run, jit_compile=True) if jit else graph.run
    out = []
    for n in norms:
        thr, scale = decide(tf.constant(n, tf.float64))
        out.append((float(thr.numpy()), float(scale.numpy())))
    return out


@pytest.mark.parametrize("make_ref", REFERENCES, ids=["fixed", "autoclip", "autoclip-history", "zclip", "zclip-cap"])
def test_graph_policy_matches_numpy_reference(make_ref):
    ref = make_ref()
    graph = _device(make_ref())
    norms = _norms()
    expected = [ref.decide(n) for n in norms]
    got = _replay(graph, norms)
    for (thr, scale), d in zip(got, expected):
        assert thr == pytest.approx(d.threshold, rel=1e-12, abs=1e-12) or (math.isinf(thr) and math.isinf(d.threshold))
        assert scale == pytest.approx(d.scale, rel=1e-12, abs=1e-12)
    got_state, ref_state = graph.state_dict(), ref.state_dict()
    assert got_state.keys() == ref_state.keys() and got_state["config"] == ref_state["config"]
    for key, value in ref_state["state"].items():
        np.testing.assert_allclose(got_state["state"][key], value, rtol=1e-12)


@pytest.mark.parametrize("make_ref", REFERENCES[1:4:2], ids=["autoclip", "zclip"])
def test_graph_policy_runs_under_xla_and_resumes_from_json(make_ref):
    norms = _norms(40, seed=3)
    ref = make_ref()
    expected = [ref.decide(n) for n in norms]
    first = _device(make_ref())
    got = _replay(first, norms[:17], jit=True)
    state = json.loads(json.dumps(first.state_dict()))
    second = _device(make_ref())
    second.load_state_dict(state)
    got += _replay(second, norms[17:], jit=True)
    for (thr, scale), d in zip(got, expected):
        assert scale == pytest.approx(d.scale, rel=1e-12, abs=1e-12)
        assert thr == pytest.approx(d.threshold, rel=1e-12) or (math.isinf(thr) and math.isinf(d.threshold))
    # The state layout is the reference policy's: the core can load it.
    fresh = make_ref()
    fresh.load_state_dict(second.state_dict())


@pytest.mark.parametrize("shape", [(3, 5), (5,), (2, 2, 3, 4), ()])
def test_agc_factor_matches_numpy_reference_on_last_unit_axis(shape):
    rng = np.random.default_rng(0)
    param = rng.standard_normal(shape).astype(np.float32)
    grad = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if len(shape) == 2:
        param[:, 0] = 0.0  # a zero unit: the eps floor decides
    ref = AGC(clip_factor=0.05, eps=1e-3)
    expected = agc_clip(param, grad, ref.clip_factor, ref.eps, unit_axis=-1)
    p_norm = _tensors.unitwise_norm(tf.constant(param))
    factor = ref.unit_factor(p_norm, _tensors.unitwise_norm(tf.constant(grad)), TF)
    np.testing.assert_allclose((grad * factor).numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        np.broadcast_to(_tensors.unitwise_norm(tf.constant(param)).numpy(), shape),
        np.broadcast_to(_numerics.unitwise_norm(param, -1), shape),
        rtol=1e-5,
    )


def test_a_policy_that_cannot_run_on_tf_ops_is_refused_loudly():
    from gradwatch import GradwatchError

    class NumpyOnly(ZClip):
        def update(self, stats, state, ops=None):
            return float(stats.norm), state  # a host float: not an array op

    with pytest.raises(GradwatchError, match="cannot run inside the TensorFlow graph"):
        _device(NumpyOnly())


def _unit(x):
    return (x / np.linalg.norm(x)).astype(np.float32)


def test_power_iteration_reaches_the_exact_largest_singular_value_from_a_cold_start():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 24)).astype(np.float32)
    v = tf.Variable(_unit(rng.standard_normal(24)))
    sigma = float(_tensors.power_iteration(tf.constant(w), v).numpy())
    assert sigma == pytest.approx(np.linalg.norm(w.astype(np.float64), 2), rel=1e-4)


def test_power_iteration_recovers_when_the_top_two_singular_values_swapped():
    # The warm vectors are mostly the runner-up and the third right singular vectors, as
    # after the top two singular values crossed between two profiles.
    rng = np.random.default_rng(1)
    u, _, vt = np.linalg.svd(rng.standard_normal((32, 32)))
    s = np.linspace(1.0, 0.2, 32)
    s[:2] = [1.5, 1.45]
    w = (u * s) @ vt
    v = tf.Variable(_unit(vt[1] + 0.01 * vt[0]))
    second = tf.Variable(_unit(vt[2]))
    sigma = float(_tensors.power_iteration(tf.constant(w.astype(np.float32)), v, second).numpy())
    assert sigma == pytest.approx(np.linalg.norm(w.astype(np.float32).astype(np.float64), 2), rel=1e-4)
    # The vector kept for the next profile is the top right singular vector.
    assert abs(float(np.dot(v.numpy(), vt[0]))) == pytest.approx(1.0, abs=1e-3)
