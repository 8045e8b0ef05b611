"""The same Keras checks on every Keras backend (run once per ``KERAS_BACKEND``: jax, torch,
tensorflow), each number against that backend's own autodiff or Keras' own optimizers.

References: the gradients of the backend's own autodiff (``jax.grad`` of
``model.stateless_call``, ``torch.autograd.grad``, ``tf.GradientTape``), Keras'
``Adam(global_clipnorm=c)``, the core's numpy policies replayed on the recorded norms,
and weights that must stay bitwise unchanged when a step is skipped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")

import gradwatch
from gradwatch.policies import AutoClip, ClipStats, ZClip
from gradwatch_tf import GradWatchCallback

BACKEND = keras.backend.backend()
#: float32 sums on JAX without x64; float64 accumulation elsewhere.
RTOL = 1e-5


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 3))
    h = keras.layers.LSTM(4, name="rnn")(inp)
    out = keras.layers.Dense(1, name="head")(h)
    return keras.Model(inp, out)


def _data(n: int = 8, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6, 3)).astype("float32"), rng.standard_normal((n, 1)).astype("float32")


def _host_compiled(cb: GradWatchCallback) -> bool:
    """The callback's host replay (TensorFlow's host profile, JAX's sites) has compiled,
    or started compiling, a replay function (False: only numpy replays so far)."""
    att = cb._kept or cb.watch.attachment
    return bool((getattr(att, "_host", None) or att._tt)._compiled)


def _twin(model: keras.Model) -> keras.Model:
    other = keras.models.clone_model(model)
    other.set_weights(model.get_weights())
    return other


def autodiff_grads(model: keras.Model, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """The MSE loss's gradients by the backend's own autodiff (never through gradwatch)."""
    tvars = model.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, model(x, training=True))
        return [np.asarray(tf.convert_to_tensor(g)) for g in tape.gradient(loss, tvars)]
    if BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_of(trainable):
            pred, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return keras.losses.MeanSquaredError()(y, pred)

        return [np.asarray(g) for g in jax.grad(loss_of)([v.value for v in tvars])]
    import torch

    loss = keras.losses.MeanSquaredError()(torch.as_tensor(y), model(torch.as_tensor(x), training=True))
    return [g.detach().cpu().numpy() for g in torch.autograd.grad(loss, [v.value for v in tvars])]


def _norms(model, grads):
    per = {v.path: float(np.linalg.norm(g.astype(np.float64))) for v, g in zip(model.trainable_variables, grads)}
    return per, math.sqrt(sum(n * n for n in per.values()))


def test_other_backends_never_import_tensorflow():
    """On JAX and torch the callback and watch() run without TensorFlow in the process."""
    import os
    import subprocess
    import sys

    if BACKEND == "tensorflow":
        pytest.skip("TensorFlow is this backend")
    code = (
        "import sys, numpy as np, keras, gradwatch\n"
        "from gradwatch_tf import GradWatchCallback\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]); m.compile('sgd', 'mse')\n"
        "cb = GradWatchCallback(sinks=['memory'])\n"
        "m.fit(np.ones((4, 3), 'float32'), np.ones((4, 1), 'float32'), verbose=0, callbacks=[cb])\n"
        "gradwatch.watch(m, m.optimizer, sinks=['memory']).close()\n"
        "print(len(cb.records), 'tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["1", "False"]


def test_fit_records_the_backends_own_gradient_norms():
    model = _model()
    x, y = _data()
    per, glob = _norms(model, autodiff_grads(_twin(model), x, y))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    cb = GradWatchCallback(sinks=["memory"])
    hist = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, callbacks=[cb])
    (rec,) = cb.records
    assert rec.global_norm == pytest.approx(glob, rel=RTOL)
    assert set(rec.param_norms) == set(per)
    for name, value in per.items():
        assert rec.param_norms[name] == pytest.approx(value, rel=RTOL, abs=1e-9)
    assert set(rec.layer_norms) == {"rnn", "head"}
    assert rec.layer_norms["head"] == pytest.approx(
        math.hypot(*[v for k, v in per.items() if k.startswith("head/")]), rel=RTOL
    )
    assert hist.history["grad_norm"][0] == pytest.approx(glob, rel=RTOL)
    assert "apply" not in vars(model.optimizer)


def test_fixed_policy_equals_adam_global_clipnorm():
    model = _model()
    reference = _twin(model)
    x, y = _data()
    model.compile(keras.optimizers.Adam(0.05), "mse")
    reference.compile(keras.optimizers.Adam(0.05, global_clipnorm=0.01), "mse")
    cb = GradWatchCallback(policy="fixed", max_norm=0.01, sinks=["memory"])
    model.fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False, callbacks=[cb])
    reference.fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False)
    assert [r.step for r in cb.records] == list(range(1, 9))
    assert all(r.clip is not None and r.clip.clipped and r.clip.threshold == pytest.approx(0.01) for r in cb.records)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(model.optimizer.variables) == len(reference.optimizer.variables)  # gradwatch's state is gone


@pytest.mark.parametrize(
    "make", [lambda: AutoClip(percentile=10.0), lambda: ZClip(warmup=3, z_threshold=0.5)], ids=["autoclip", "zclip"]
)
def test_adaptive_policies_decide_as_the_core_policy_does(make):
    """The in-step policy against the core's numpy definition replayed on the recorded
    norms: the same thresholds and scales, step by step."""
    model = _model()
    x, y = _data(16)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    cb = GradWatchCallback(policy=make(), sinks=["memory"])
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    host = make()
    state = host.init()
    assert len(cb.records) == 8
    for rec in cb.records:
        clip, state = host.update(ClipStats(rec.global_norm), state)
        assert rec.clip.threshold == pytest.approx(float(clip.threshold), rel=1e-5)
        assert rec.clip.scale == pytest.approx(float(clip.scale), rel=1e-5)


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_nonfinite_step_changes_nothing(on_nonfinite):
    model = _model()
    x, y = _data()
    y_bad = y.copy()
    y_bad[2:4] = np.nan  # the second batch of 2 has a NaN loss, so NaN gradients
    model.compile(keras.optimizers.Adam(0.01), "mse")
    cb = GradWatchCallback(on_nonfinite=on_nonfinite, sinks=["memory"])
    # One good step, then the NaN step.
    model.fit(x[:2], y[:2], batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    weights = [w.copy() for w in model.get_weights()]
    opt_state = [np.asarray(keras.ops.convert_to_numpy(v.value)).copy() for v in model.optimizer.variables]
    if on_nonfinite == "skip":
        model.fit(x[2:4], y_bad[2:4], batch_size=2, epochs=1, verbose=0, callbacks=[cb])
        assert cb.records[-1].skipped and cb.records[-1].nonfinite
    else:
        with pytest.raises(gradwatch.NonFiniteGradientError):
            model.fit(x[2:4], y_bad[2:4], batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    for a, b in zip(model.get_weights(), weights):
        assert np.array_equal(a, b)
    after = [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in model.optimizer.variables]
    assert len(after) == len(opt_state)
    for a, b in zip(after, opt_state):
        assert np.array_equal(a, b)
    assert "apply" not in vars(model.optimizer)
    # A good step afterwards trains normally again.
    model.fit(x[4:6], y[4:6], batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    assert not cb.records[-1].skipped
    assert any(not np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))


def test_run_file_has_every_step_across_fits(tmp_path):
    path = tmp_path / "run.jsonl"
    model = _model()
    x, y = _data()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    cb = GradWatchCallback(sinks=[f"jsonl:{path}"], log_every=3)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    assert gradwatch.read_run(path).steps.step.tolist() == list(range(1, 9))
    cb.close()
    run = gradwatch.read_run(path)
    np.testing.assert_allclose(run.steps.global_norm, [r.global_norm for r in cb.records], rtol=1e-12)


def test_tensorboard_sink_writes_on_every_backend(tmp_path):
    pytest.importorskip("tensorboard")
    model = _model()
    x, y = _data()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    cb = GradWatchCallback(sinks=[f"tensorboard:{tmp_path}"], log_every=2)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    cb.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.rglob("*"))


def _custom_loop_grads(model, x, y):
    return autodiff_grads(model, x, y)


def test_watch_in_a_custom_loop_matches_the_callback():
    """``gradwatch.watch(model, optimizer)`` around a loop that calls ``optimizer.apply``
    itself (eagerly, on each backend): same norms and clipping as ``global_clipnorm``."""
    model = _model()
    reference = _twin(model)
    x, y = _data()
    opt = keras.optimizers.Adam(0.05)
    ref_opt = keras.optimizers.Adam(0.05, global_clipnorm=0.01)
    with gradwatch.watch(model, opt, policy="fixed", max_norm=0.01, sinks=["memory"]) as watch:
        for i in range(0, 8, 2):
            grads = _custom_loop_grads(model, x[i : i + 2], y[i : i + 2])
            _per, glob = _norms(model, grads)
            opt.apply([keras.ops.convert_to_tensor(g) for g in grads], model.trainable_variables)
            assert watch.records[-1].global_norm == pytest.approx(glob, rel=RTOL)
            ref_grads = _custom_loop_grads(reference, x[i : i + 2], y[i : i + 2])
            ref_opt.apply([keras.ops.convert_to_tensor(g) for g in ref_grads], reference.trainable_variables)
        assert [r.step for r in watch.records] == [1, 2, 3, 4]
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert "apply" not in vars(opt)
    assert len(opt.variables) == len(ref_opt.variables)


def test_nonfinite_flags_name_exactly_the_parameters_with_inf_or_nan():
    """Per-parameter non-finite flags against numpy's ``isfinite`` on gradients made to
    hold +inf, NaN and -inf in three parameters and, in a fourth, finite values whose
    squares overflow float32 (finite: not flagged, the step not skipped for it)."""
    model = _model()
    x, y = _data()
    opt = keras.optimizers.SGD(0.0)
    names = [v.path for v in model.trainable_variables]
    with gradwatch.watch(model, opt, on_nonfinite="skip", sinks=["memory"]) as watch:
        for poison in ({0: np.inf, 2: np.nan, 3: -np.inf, 1: 1e30}, {1: 1e30}):
            grads = [g.copy() for g in _custom_loop_grads(model, x[:2], y[:2])]
            for j, value in poison.items():
                if value == 1e30:
                    grads[j][...] = value
                else:
                    grads[j].reshape(-1)[-1] = value
            opt.apply([keras.ops.convert_to_tensor(g) for g in grads], model.trainable_variables)
            want = tuple(n for n, g in zip(names, grads) if not np.isfinite(g).all())
            rec = watch.records[-1]
            assert sorted(rec.nonfinite) == sorted(want)
            assert rec.skipped == bool(want)
    assert len(watch.records) == 2 and watch.records[-1].nonfinite == ()


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX arithmetic of the compiled step")
def test_jax_square_sums_and_finiteness_inside_jit():
    """The compiled step's per-gradient arithmetic under ``jax.jit`` against numpy: the
    float64 sum of squares, and ``isfinite`` element by element (bfloat16, empty, huge)."""
    import jax
    import jax.numpy as jnp

    from gradwatch_tf.portable import _sq_and_finite

    rng = np.random.default_rng(0)
    cases = [rng.standard_normal((33, 65)).astype("float32"), np.zeros((0, 4), "float32"), np.full(7, 1e30, "float32")]
    for value in (np.inf, -np.inf, np.nan):
        bad = rng.standard_normal(300).astype("float32")
        bad[123] = value
        cases.append(bad)
    f = jax.jit(_sq_and_finite)
    for a in cases:
        sq, ok = f(jnp.asarray(a))
        assert bool(ok) == bool(np.isfinite(a).all())
        if np.isfinite(a).all():
            want = float(np.sum(a.astype(np.float64) ** 2))
            assert float(sq) == pytest.approx(want, rel=1e-6) if want < 3e38 else math.isinf(float(sq))
    half = rng.standard_normal(1000).astype("float32")
    sq, ok = f(jnp.asarray(half, jnp.bfloat16))
    exact = np.asarray(jnp.asarray(half, jnp.bfloat16)).astype(np.float64)
    assert bool(ok) and float(sq) == pytest.approx(float(np.sum(exact**2)), rel=1e-5)


@pytest.mark.parametrize("small_numel", [4096, 300, 0])
def test_per_parameter_norms_of_small_and_large_gradients_keep_their_parameters(monkeypatch, small_numel):
    """Per-parameter norms against the backend's own autodiff on a model whose small and
    large gradients interleave (JAX measures the small ones stacked, the large ones one by
    one: ``portable.SMALL_NUMEL``, here also moved so the split falls elsewhere), with a
    frozen layer between them (no gradient)."""
    from gradwatch_tf import portable

    monkeypatch.setattr(portable, "SMALL_NUMEL", small_numel)
    keras.utils.set_random_seed(3)
    inp = keras.Input((6, 3))
    h = keras.layers.Dense(70, name="wide")(inp)  # 210 and 70
    h = keras.layers.Dense(70, name="frozen", trainable=False)(h)
    h = keras.layers.LSTM(40, name="rnn")(h)  # 11,200, 6,400 and 160
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(h))  # 40 and 1
    x, y = _data()
    per, glob = _norms(model, autodiff_grads(_twin(model), x, y))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    cb = GradWatchCallback(sinks=["memory"])
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, callbacks=[cb])
    (rec,) = cb.records
    assert rec.global_norm == pytest.approx(glob, rel=RTOL)
    assert set(rec.param_norms) == set(per)
    for name, value in per.items():
        assert rec.param_norms[name] == pytest.approx(value, rel=RTOL, abs=1e-9), name
    assert rec.nonfinite == ()


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX arithmetic of the compiled step")
def test_jax_stacked_small_gradients_inside_jit():
    """``portable._grad_stats`` under ``jax.jit`` against numpy, entry by entry in the
    order it reports: small and large gradients, a missing one, +inf, -inf and NaN in
    small and large ones, finite values whose squares overflow float32, bfloat16."""
    import jax
    import jax.numpy as jnp

    from gradwatch_tf.portable import _grad_stats

    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal(3).astype("float32"),
        rng.standard_normal((80, 80)).astype("float32"),  # large
        rng.standard_normal((2, 2)).astype("float32"),
        None,
        rng.standard_normal(4900).astype("float32"),  # large
        np.full(5, 1e30, "float32"),
        rng.standard_normal(7).astype("float32"),
        rng.standard_normal(1).astype("float32"),
    ]
    arrays[2][1, 1] = np.inf
    arrays[4][17] = np.nan
    arrays[6][0] = -np.inf
    half = rng.standard_normal(9).astype("float32")
    cases = [*arrays, half]
    present = [j for j, a in enumerate(cases) if a is not None]

    def run(*xs):
        grads = [None if a is None else xs[present.index(j)] for j, a in enumerate(cases)]
        grads[-1] = grads[-1].astype(jnp.bfloat16)
        sq, ok, _ = _grad_stats(grads)
        return sq, ok

    sq, ok = jax.jit(run)(*[jnp.asarray(cases[j]) for j in present])
    grads = list(cases)
    grads[-1] = np.asarray(jnp.asarray(half, jnp.bfloat16)).astype(np.float32)
    _, _, order = _grad_stats([None if g is None else jnp.asarray(g) for g in grads])
    assert sorted(order) == present
    for k, j in enumerate(order):
        a = grads[j].astype(np.float64)
        assert bool(ok[k]) == bool(np.isfinite(a).all()), j
        if np.isfinite(a).all():
            want = float(np.sum(a**2))
            assert float(sq[k]) == pytest.approx(want, rel=1e-5) if want < 3e38 else math.isinf(float(sq[k])), j


def _propagation_reference(model: keras.Model, x: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """The core's float64 reference (gains, max gains) of the model of
    :func:`test_fit_measures_propagation_inside_the_compiled_step` at its current weights."""
    from gradwatch.through_time.reference import propagation_from_jacobians
    from tests.contract.adapters import KerasAdapter, Recurrence
    from tests.contract.test_contract_through_time import _run

    bi, gru = model.get_layer("bi"), model.get_layer("gru")
    adapter = KerasAdapter()
    outs, want = {}, {}
    for key, sub in (("l0", bi.forward_layer), ("l0_reverse", bi.backward_layer)):
        r = Recurrence("bi", key, *adapter._torch_layout(sub.cell), reverse=sub.go_backwards)
        runs = [_run(r, x[p].astype(np.float64), np.ones(6, bool)) for p in range(8)]
        outs[key] = np.stack([o for _, o in runs])
        want[("bi", key)] = propagation_from_jacobians(np.stack([j for j, _ in runs]))
    r = Recurrence("gru", "l0", *adapter._torch_layout(gru.cell))
    inner = np.concatenate([outs["l0"], outs["l0_reverse"]], -1)
    runs = [_run(r, inner[p], np.ones(6, bool)) for p in range(8)]
    want[("gru", "l0")] = propagation_from_jacobians(np.stack([j for j, _ in runs]))
    return want


@pytest.mark.parametrize("host", ["compiled", "numpy"])
def test_fit_measures_propagation_inside_the_compiled_step(monkeypatch, host):
    """Through time in ``fit`` (jit on JAX, ``tf.function`` on TensorFlow: the step keeps
    the inputs and the weights, the host replays them), against the core's float64
    reference: the gains and max gains of a GRU and of both directions of a Bidirectional
    LSTM, on steps of a large learning rate, each against the weights its gradients
    belonged to (before that step's update). The host's replay either compiled at the
    first profiled step (``compiled``) or, as by default in a fit this short
    (``_kkept.BACKGROUND_MIN_STEPS``), run on numpy (gradwatch_tf._knumpy) with nothing
    compiled; on torch there is no host replay (each step replays in its hook)."""
    if host == "numpy" and BACKEND == "torch":
        pytest.skip("torch Keras replays in its hook: no host replay")
    from gradwatch_tf import _kkept

    monkeypatch.setattr(_kkept, "BACKGROUND_COMPILE", host == "numpy")  # (tests/tf/conftest.py: off on TensorFlow)
    keras.utils.set_random_seed(3)
    inp = keras.Input((6, 3))
    bi = keras.layers.Bidirectional(keras.layers.LSTM(3, return_sequences=True), name="bi")
    gru = keras.layers.GRU(5, return_sequences=True, name="gru")
    model = keras.Model(inp, keras.layers.Dense(1)(gru(bi(inp))))
    model.compile(keras.optimizers.SGD(3.0), "mse")
    x = np.random.default_rng(4).standard_normal((10, 6, 3)).astype("float32")
    y = np.random.default_rng(5).standard_normal((10, 6, 1)).astype("float32")
    cb = GradWatchCallback(profile_every=1, sinks=["memory"])
    wants = []
    for _ in range(3):  # one step per fit: the weights before each step are readable between fits
        wants.append(_propagation_reference(model, x))
        model.fit(x, y, batch_size=10, shuffle=False, verbose=0, callbacks=[cb])
        if BACKEND != "torch":
            assert _host_compiled(cb) == (host == "compiled")
    assert [r.step for r in cb.records] == [1, 2, 3]
    moved = wants[2][("gru", "l0")][0] / wants[1][("gru", "l0")][0]
    assert np.max(np.abs(moved - 1.0)) > 1e-2  # the update moved the gains: a stale version fails
    for rec, want in zip(cb.records, wants):
        for (layer, key), (gains, max_gains) in want.items():
            got = rec.temporal[layer].recurrences[key]
            np.testing.assert_allclose(got.gains, gains, rtol=1e-4)
            np.testing.assert_allclose(got.max_gains, max_gains, rtol=1e-4)


@pytest.mark.parametrize(("spe", "every", "profiled"), [(3, 1, [1, 2, 3, 4, 5, 6]), (4, 2, [1, 2, 4, 6])])
def test_jax_fit_measures_every_due_step_of_an_execution(monkeypatch, spe, every, profiled):
    """On JAX the step keeps each due step's inputs and weights in a slot of its own: the
    host reads after each execution of ``steps_per_execution`` steps, and every profiled
    step in it carries its own propagation and spectral norms (its own batch, its own
    weights: SGD moves them), against the float64 reference and numpy's SVD; three
    profiled steps in one execution of four (1, 2, 4) fill the three slots."""
    if BACKEND != "jax":
        pytest.skip("the kept buffers are JAX's")
    from gradwatch.through_time.reference import propagation_from_jacobians
    from gradwatch_tf import _kkept
    from tests.contract.adapters import KerasAdapter, Recurrence
    from tests.contract.test_contract_through_time import _run

    monkeypatch.setattr(_kkept, "BACKGROUND_COMPILE", False)
    model = _model()
    model.compile(keras.optimizers.SGD(0.5), "mse", steps_per_execution=spe)
    x, y = _data(48)
    twin = _model()
    twin.compile(keras.optimizers.SGD(0.5), "mse")
    twin.set_weights(model.get_weights())
    weights = []  # the cell's weights before each step's update (train_on_batch syncs them)
    for k in range(6):
        weights.append([keras.ops.convert_to_numpy(v).copy() for v in twin.get_layer("rnn").cell.weights])
        twin.train_on_batch(x[8 * k : 8 * k + 8], y[8 * k : 8 * k + 8])
    cb = GradWatchCallback(profile_every=every, sinks=["memory"])
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[cb])
    np.testing.assert_allclose(model.get_weights()[0], twin.get_weights()[0], rtol=1e-5)  # the same training
    assert [r.step for r in cb.records] == [1, 2, 3, 4, 5, 6]
    assert [r.step for r in cb.records if r.temporal.get("rnn") and r.temporal["rnn"].recurrences] == profiled
    assert [r.step for r in cb.records if r.spectral] == profiled
    layer = model.get_layer("rnn")
    for rec in (r for r in cb.records if r.step in profiled):
        k = rec.step - 1
        kernel = np.asarray(weights[k][1], np.float64)  # the recurrent kernel, gates i f c o
        for g, gate in enumerate("ifco"):
            want_sigma = np.linalg.norm(kernel[:, 4 * g : 4 * g + 4], 2)
            assert rec.spectral[f"{layer.cell.recurrent_kernel.path}[{gate}]"] == pytest.approx(want_sigma, rel=2e-3)
        for v, w in zip(layer.cell.weights, weights[k]):
            v.assign(w)
        r = Recurrence("rnn", "l0", *KerasAdapter()._torch_layout(layer.cell))
        runs = [_run(r, x[8 * k + p].astype(np.float64), np.ones(6, bool)) for p in range(8)]
        want = propagation_from_jacobians(np.stack([j for j, _ in runs]))
        got = rec.temporal["rnn"].recurrences["l0"]
        np.testing.assert_allclose(got.gains, want[0], rtol=1e-4)
        np.testing.assert_allclose(got.max_gains, want[1], rtol=1e-4)
        assert len(rec.temporal["rnn"].norms) == 6


def test_jax_kept_copies_are_capped_in_bytes(monkeypatch, caplog):
    """With the kept copies capped (``_kkept.KEPT_BYTES``) to one slot, each execution of
    three profiled steps keeps its last one only (steps 3 and 6 measured, the others left
    out, never given another step's numbers); an INFO line says so."""
    if BACKEND != "jax":
        pytest.skip("the kept buffers are JAX's")
    import logging

    from gradwatch_tf import _kkept

    monkeypatch.setattr(_kkept, "BACKGROUND_COMPILE", False)
    monkeypatch.setattr(_kkept, "KEPT_BYTES", 1)
    model = _model()
    model.compile(keras.optimizers.SGD(0.0), "mse", steps_per_execution=3)
    x, y = _data(48)
    cb = GradWatchCallback(profile_every=1, sinks=["memory"])
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[cb])
    assert [r.step for r in cb.records if r.temporal["rnn"].recurrences] == [3, 6]
    assert all(len(r.temporal["rnn"].norms) == 6 for r in cb.records)  # sensitivity: every step's own
    assert "1 of the 3 profiled steps an execution can hold keep their inputs" in caplog.text


def test_jax_fit_replays_on_numpy_until_the_compile_is_ready(monkeypatch):
    """On JAX the host's replay compiles in a background thread; a fit with fewer steps
    left than BACKGROUND_MIN_STEPS compiles nothing and replays on numpy; one with more
    starts the compile and replays on numpy until it is ready (here the background thread
    is held busy past step 1). Step 1 measured in both, against the float64 reference."""
    if BACKEND != "jax":
        pytest.skip("the host replay's compile is JAX's")
    import threading

    from gradwatch.through_time.reference import propagation_from_jacobians
    from gradwatch_tf import _kkept
    from tests.contract.adapters import KerasAdapter, Recurrence
    from tests.contract.test_contract_through_time import _run

    monkeypatch.setattr(_kkept, "BACKGROUND_COMPILE", True)
    monkeypatch.setattr(_kkept, "BACKGROUND_MIN_STEPS", 4)
    x, y = _data(6)
    first, compiled = {}, {}
    for steps in (3, 6):  # 2 then 5 steps left after step 1
        model = _model()
        model.compile(keras.optimizers.SGD(0.0), "mse")
        cb = GradWatchCallback(profile_every=1, sinks=["memory"])
        gate = threading.Event()
        if steps == 6:
            _kkept._pool().submit(gate.wait)  # the background thread busy until step 1 is read

        class Release(keras.callbacks.Callback):
            def __init__(self, gate):  # type: ignore[no-untyped-def]
                super().__init__()
                self.gate = gate

            def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
                self.gate.set()  # (after the watch's callback, listed first, read step 1)

        try:
            model.fit(
                x[:steps], y[:steps], batch_size=1, epochs=1, verbose=0, shuffle=False, callbacks=[cb, Release(gate)]
            )
        finally:
            gate.set()
        _kkept.compiles_done()
        first[steps] = cb.records[0].temporal["rnn"]
        compiled[steps] = _host_compiled(cb)
        r = Recurrence("rnn", "l0", *KerasAdapter()._torch_layout(model.get_layer("rnn").cell))
        cb.close()
    assert compiled == {3: False, 6: True}
    want = propagation_from_jacobians(np.stack([_run(r, x[0].astype(np.float64), np.ones(6, bool))[0]]))
    for got in first.values():
        np.testing.assert_allclose(got.recurrences["l0"].gains, want[0], rtol=1e-4)
        np.testing.assert_allclose(got.recurrences["l0"].max_gains, want[1], rtol=1e-4)


def test_short_fits_compile_the_replay_once_numpy_replays_have_cost_as_much(monkeypatch):
    """Rent or buy (``_kkept.NUMPY_RENT_S``): short fits replay on numpy and compile
    nothing, until their numpy replays of a layer have taken as long as a compile would;
    then the compile starts (in the background) and later steps use it. Every step
    measured throughout."""
    if BACKEND == "torch":
        pytest.skip("torch Keras replays in its hook: no host replay")
    from gradwatch_tf import _kkept

    monkeypatch.setattr(_kkept, "BACKGROUND_COMPILE", True)
    monkeypatch.setattr(_kkept, "NUMPY_RENT_S", 1e-9)  # one numpy replay pays for the compile
    model = _model()
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = _data(2)
    cb = GradWatchCallback(profile_every=1, sinks=["memory"])
    compiled = []
    for _ in range(3):  # one-step fits: far shorter than BACKGROUND_MIN_STEPS
        model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        compiled.append(_host_compiled(cb))
        _kkept.compiles_done()
    assert compiled == [False, True, True]
    assert all(r.temporal["rnn"].recurrences for r in cb.records)
    gains = [np.asarray(r.temporal["rnn"].recurrences["l0"].gains) for r in cb.records]
    np.testing.assert_allclose(gains[2], gains[0], rtol=1e-4)  # compiled (step 3) = numpy (step 1)


def test_fit_reads_the_device_only_on_flush_and_profiled_steps(monkeypatch):
    """On JAX and torch the host reads gradwatch's ring on flush (log_every) and profiled
    steps and at epoch end only; every step still gets its record."""
    if BACKEND == "tensorflow":
        pytest.skip("TensorFlow reads its ring variable at batch end")
    from gradwatch_tf.portable import PortableAttachment

    reads = []
    original = PortableAttachment._read_ring
    monkeypatch.setattr(PortableAttachment, "_read_ring", lambda self: reads.append(self._last_step) or original(self))
    model = _model()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x, y = _data(12)
    cb = GradWatchCallback(log_every=5, profile_every=0, sinks=["memory"])
    model.fit(x, y, batch_size=1, shuffle=False, verbose=0, callbacks=[cb])
    assert [r.step for r in cb.records] == list(range(1, 13))
    assert reads[:3] == [0, 5, 10], reads  # after steps 5, 10 and 12 (epoch end), nothing between
    assert len(reads) <= 5, reads
