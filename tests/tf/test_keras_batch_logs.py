"""A batch's logs carry ``grad_norm`` only when it is that batch's own step: on JAX and
torch the host reads gradwatch's statistics on flush and profiled steps only, and the
batches between used to repeat the last read norm as if it were theirs (a TensorBoard
or CSV logger per batch recorded old numbers as new). Any Keras backend."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs keras")

from gradwatch_tf import GradWatchCallback


class _BatchLogs(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float | None] = []

    def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
        value = (logs or {}).get("grad_norm")
        self.seen.append(None if value is None else float(value))


def test_each_batch_shows_its_own_norm_or_none():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.SimpleRNN(4)(inp)))  # profiled steps are read
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x = np.random.default_rng(0).standard_normal((100, 6, 3)).astype("float32")
    y = np.random.default_rng(1).standard_normal((100, 1)).astype("float32")
    cb, logs = GradWatchCallback(sinks=["memory"], profile_every=10, log_every=50), _BatchLogs()
    hist = model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[cb, logs])
    norms = {r.step: r.global_norm for r in cb.records}
    cb.close()
    assert len(logs.seen) == 25
    shown = {step: v for step, v in enumerate(logs.seen, start=1) if v is not None}
    assert 1 in shown and 10 in shown  # a profiled step is always read
    for step, value in shown.items():
        assert value == pytest.approx(norms[step], rel=1e-6), step
    assert hist.history["grad_norm"][0] == pytest.approx(norms[25], rel=1e-6)  # the epoch's last step


def test_the_fit_keeps_keras_async_batch_callbacks_and_logs_reach_every_callback():
    """On JAX and torch Keras runs the batch-end callbacks in a thread (the loop queues the
    next step meanwhile) unless one overrides ``on_train_batch_end``: gradwatch does its
    reads right after the train function instead, so a fit it watches keeps that dispatch,
    and the ``grad_norm`` of a read step is in the logs every callback gets, before or
    after it."""
    if keras.backend.backend() == "tensorflow":
        pytest.skip("Keras calls TensorFlow's batch-end callbacks in the loop (its IS_THREAD_SAFE is False)")
    import threading

    class Where(_BatchLogs):
        async_safe = True  # Keras' own flag: this one may run in its thread pool

        def __init__(self) -> None:
            super().__init__()
            self.threads: set[str] = set()
            self.by_batch: dict[int, float] = {}  # (the pool runs batches in any order)

        def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
            self.threads.add(threading.current_thread().name)
            if (logs or {}).get("grad_norm") is not None:
                self.by_batch[int(batch)] = float(logs["grad_norm"])

    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.SimpleRNN(4)(inp)))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x = np.random.default_rng(0).standard_normal((40, 6, 3)).astype("float32")
    y = np.random.default_rng(1).standard_normal((40, 1)).astype("float32")
    where, cb = Where(), GradWatchCallback(sinks=["memory"], profile_every=5)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[where, cb])
    norms = {r.step: r.global_norm for r in cb.records}
    cb.close()
    assert threading.main_thread().name not in where.threads  # dispatched asynchronously
    shown = {batch + 1: v for batch, v in where.by_batch.items()}
    assert sorted(shown) == [1, 5, 10]  # the profiled steps, listed before gradwatch
    for step, value in shown.items():
        assert value == pytest.approx(norms[step], rel=1e-6), step
    sync, logs = GradWatchCallback(sinks=["memory"], profile_every=5), _BatchLogs()  # a callback that blocks: the same
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[logs, sync])
    assert [s for s, v in enumerate(logs.seen, start=1) if v is not None] == [1, 5, 10]
    sync.close()
