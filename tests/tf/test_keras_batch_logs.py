"""A batch's logs carry ``grad_norm`` only when it is that batch's own step: on JAX and
torch the host reads gradwatch's statistics on flush and profiled steps only, and the
batches between used to repeat the last read norm as if it were theirs (a TensorBoard
or CSV logger per batch recorded old numbers as new). Any Keras backend."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs keras")

from gradwatch_tf import GradWatchCallback  # noqa: E402


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
