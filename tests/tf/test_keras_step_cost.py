"""What keeps a watched Keras step cheap (issue 18), checked for what it must not change.

* On torch the step's statistics come from a few torch calls (:mod:`gradwatch_tf._kfast`):
  the squared norms, non-finite flags, global norm and all-finite flag are checked against
  float64 numpy, NaN, Inf and a large but finite gradient included.
* The callback reads nothing from the device on a batch that is not due, and on JAX it
  does not make Keras sync the model state into its variables at every batch (Keras'
  ``Callback.model`` property does that): counted against the same fit unwatched.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")

from gradwatch_tf import GradWatchCallback

BACKEND = keras.backend.backend()


def _model() -> keras.Model:
    inp = keras.Input((6, 3))
    h = keras.layers.LSTM(4, name="rnn")(inp)
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(h))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    return model


def _data(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((n, 6, 3)).astype("float32"), rng.standard_normal((n, 1)).astype("float32")


@pytest.mark.skipif(BACKEND != "torch", reason="the torch arithmetic runs on Keras' torch backend")
def test_torch_stats_match_float64_numpy() -> None:
    import torch

    from gradwatch_tf._kfast import TorchStep

    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((16, 12)).astype("float32"),
        None,  # a variable without gradient this step
        rng.standard_normal(12).astype("float32") * 1e18,  # large: squares near float32's top
        rng.standard_normal((3, 4)).astype("float32"),
        rng.standard_normal(5).astype("float32"),
        rng.standard_normal(7).astype("float32"),
        rng.standard_normal(9).astype("float32") * 1e30,  # finite; its squares are not in float32
    ]
    arrays[3][1, 2] = np.nan
    arrays[4][0] = -np.inf
    grads = [None if a is None else torch.from_numpy(a.copy()) for a in arrays]
    idx = [2, 0, 0, 1, 3, None, 4]  # bound positions in another order; one is not ours
    per_sq, per_nf, norm, all_ok = TorchStep().stats(grads, idx, 5)
    want_sq, want_nf = np.zeros(5), np.zeros(5)
    for a, i in zip(arrays, idx):
        if a is not None and i is not None:
            want_sq[i] = np.sum(np.square(a.astype(np.float64)))
            want_nf[i] = float(not np.isfinite(a).all())
    got_sq = per_sq.numpy()
    assert per_sq.dtype == torch.float64 and per_nf.dtype == torch.float64
    np.testing.assert_array_equal(per_nf.numpy(), want_nf)
    assert np.isnan(got_sq[1]) and np.isinf(got_sq[3])
    # Finite, not flagged: its squared norm is past float32's range (float32 maths, as
    # the keras.ops step computed it: Inf there too).
    assert want_nf[4] == 0 and np.isinf(got_sq[4])
    finite = [0, 2]
    np.testing.assert_allclose(got_sq[finite], want_sq[finite], rtol=1e-6)
    assert not bool(all_ok) and np.isnan(float(norm))
    # All finite: the global norm over every gradient, the one not bound to us included.
    ok = [None if a is None else torch.from_numpy(np.nan_to_num(a, nan=1.0, posinf=2.0, neginf=-2.0)) for a in arrays]
    ok[-1] = None
    _, flags, norm, all_ok = TorchStep().stats(ok, idx, 5)
    want = np.sqrt(
        sum(
            np.sum(np.square(np.nan_to_num(a, nan=1.0, posinf=2.0, neginf=-2.0).astype(np.float64)))
            for a in arrays[:-1]
            if a is not None
        )
    )
    assert bool(all_ok) and not flags.numpy().any()
    assert float(norm) == pytest.approx(want, rel=1e-6)


def test_no_host_read_on_batches_not_due() -> None:
    """profile_every=10, log_every=50, 25 steps: the ring is read at steps 1, 10 and 20
    (profiled; the LSTM is replayed there) and at the epoch's end, never elsewhere, and
    every step still gets its record."""
    x, y = _data(8 * 25)
    model = _model()
    cb = GradWatchCallback(sinks=["memory"], profile_every=10, log_every=50)
    reads: list[int] = []
    seen: list[int] = []

    class Count(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            att = cb.watch.attachment
            original = att.sync_records

            def counted():
                reads.append(len(seen))
                return original()

            att.sync_records = counted

        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)

    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[cb, Count()])
    # The watch's batch end runs before Count's: the read of step k sees k - 1 batches.
    assert reads[:3] == [0, 9, 19]
    assert all(r in (0, 9, 19, 25) for r in reads)
    assert [r.step for r in cb.records] == list(range(1, 26))
    cb.close()


@pytest.mark.skipif(BACKEND != "jax", reason="Keras syncs the JAX state when a callback reads .model")
def test_no_state_sync_per_batch_on_jax() -> None:
    x, y = _data(8 * 12)

    def syncs(callbacks: list) -> int:
        model = _model()
        count = [0]
        original = model.jax_state_sync

        def counted():
            count[0] += 1
            return original()

        model.jax_state_sync = counted
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
        return count[0]

    unwatched = syncs([])
    cb = GradWatchCallback(sinks=["memory"], profile_every=0)
    watched = syncs([cb])
    assert len(cb.records) == 12
    assert watched <= unwatched + 2  # train begin and end may read the model; no batch does
    cb.close()


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow step's fused statistics")
def test_tf_fused_stats_match_float64_numpy() -> None:
    """Small dense gradients go through one segment sum; a sparse and a large one keep
    their own ops; the answers against float64 numpy, NaN, Inf, a large finite gradient,
    a None, and under ``tf.function`` and XLA."""
    import tensorflow as tf

    from gradwatch_tf import _tensors

    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((16, 12)).astype("float32"),
        rng.standard_normal(12).astype("float32") * 1e18,
        rng.standard_normal((3, 4)).astype("float32"),
        rng.standard_normal(5).astype("float32"),
        rng.standard_normal(9).astype("float32") * 1e30,  # finite; its squares are not in float32
        rng.standard_normal(_tensors.FUSE_MAX_NUMEL + 3).astype("float32"),  # large: not fused
    ]
    arrays[2][1, 2] = np.nan
    arrays[3][0] = -np.inf
    values = rng.standard_normal((3, 4)).astype("float32")
    sparse = tf.IndexedSlices(tf.constant(values), tf.constant([2, 0, 2]), tf.constant([5, 4]))
    dense_sparse = np.zeros((5, 4))
    for row, i in zip(values, [2, 0, 2]):
        dense_sparse[i] += row
    grads = [tf.constant(a) for a in arrays] + [None, sparse]
    want_sq = [np.sum(np.square(a.astype(np.float64))) for a in arrays] + [0.0, np.sum(np.square(dense_sparse))]
    want_ok = [bool(np.isfinite(a).all()) for a in arrays] + [True, True]

    def run() -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        return _tensors.grad_stats(grads)

    for fn in (run, tf.function(run), tf.function(run, jit_compile=True)):
        sq, ok = fn()
        got = np.array([float(s) for s in sq])
        assert [bool(o) for o in ok] == want_ok
        assert all(s.dtype == tf.float64 for s in sq)
        assert np.isnan(got[2]) and np.isinf(got[3]) and np.isinf(got[4])  # float32 squares, as before
        finite = [0, 1, 5, 6, 7]
        np.testing.assert_allclose(got[finite], np.array(want_sq)[finite], rtol=1e-6)
    dense = grads[:6]
    graph = tf.function(lambda: _tensors.grad_stats(dense)).get_concrete_function().graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("UnsortedSegmentSum") == 2  # the five small ones: one buffer, two sums
    assert types.count("IsFinite") == 1  # the large one, on its own


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow step's spectral norms")
def test_batched_power_iterations_match_each_block_alone() -> None:
    """One batched loop for blocks of one shape (the first fit traces one loop, not four):
    every block reaches numpy's largest singular value as its own loop does, from warm
    and cold starts and with blocks that settle after different numbers of iterations,
    and the vectors kept for the next profile are the ones its own loop keeps."""
    import tensorflow as tf

    from gradwatch_tf import _tensors

    rng = np.random.default_rng(3)
    ws, starts, seconds = [], [], []
    for k in range(4):
        w = rng.standard_normal((16, 16))
        if k == 1:  # nearly equal top two: many iterations
            u, s, vt = np.linalg.svd(w)
            s[:2] = [2.0, 1.995]
            w = (u * s) @ vt
        ws.append(w.astype(np.float32))
        v = np.linalg.svd(w)[2][0] if k == 2 else rng.standard_normal(16)  # block 2: exact warm start
        starts.append((v / np.linalg.norm(v)).astype(np.float32))
        seconds.append(_tensors.runner_up_start(starts[-1]))

    def variables() -> tuple[list[tf.Variable], list[tf.Variable]]:
        return [tf.Variable(v) for v in starts], [tf.Variable(s) for s in seconds]

    vs, ss = variables()
    batched = [float(x) for x in _tensors.power_iterations([tf.constant(w) for w in ws], vs, ss)]
    vs1, ss1 = variables()
    alone = [float(_tensors.power_iteration(tf.constant(w), v, s)) for w, v, s in zip(ws, vs1, ss1)]
    exact = [np.linalg.norm(w.astype(np.float64), 2) for w in ws]
    np.testing.assert_allclose(batched, exact, rtol=1e-5)
    np.testing.assert_allclose(batched, alone, rtol=1e-6)
    for a, b in zip(vs + ss, vs1 + ss1):
        assert abs(float(np.dot(a.numpy(), b.numpy()))) == pytest.approx(1.0, abs=1e-4)
    # In a graph (as in the train step), under XLA too.
    for jit in (False, True):
        vs2, ss2 = variables()

        def run(vs2: list = vs2, ss2: list = ss2) -> list:
            return _tensors.power_iterations([tf.constant(w) for w in ws], vs2, ss2)

        fn = tf.function(run, jit_compile=jit)
        np.testing.assert_allclose([float(x) for x in fn()], exact, rtol=1e-5)
