"""TensorFlow's lean train function: executions without a profiled step run a second
trace that holds none of the profile (no sensitivity probe, whose input gradient was
computed on every step, no replay or spectral conditionals). What a user sees must not
change: the same records and the same weights, bitwise, and a profiled step after lean
ones measured as ``tf.GradientTape`` measures it."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")
tf = pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")

from tf_helpers import make_model, tape_step, twin

from gradwatch_tf import GradWatchCallback
from gradwatch_tf import callback as callback_module
from gradwatch_tf.attach import TFAttachment

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's train functions")


def _data(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6, 3)).astype("float32"), rng.standard_normal((n, 1)).astype("float32")


def _fit(lean: bool, monkeypatch, *, cell: str = "LSTM", steps: int = 17, spe: int = 1, **options):  # type: ignore[no-untyped-def]
    with monkeypatch.context() as m:
        if lean:
            m.setattr(callback_module, "LEAN_SAVING", 1e9)  # worth it at once
        else:
            m.setattr(TFAttachment, "lean_due", lambda self, steps: False)
        model = make_model(cell)
        model.compile(keras.optimizers.Adam(1e-2), "mse", steps_per_execution=spe)
        x, y = _data(4 * steps)
        cb = GradWatchCallback(sinks=["memory"], **options)
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        return model, cb


@pytest.mark.parametrize(("cell", "spe"), [("LSTM", 1), ("GRU", 1), ("LSTM", 3)])
def test_lean_steps_change_no_record_and_no_weight(monkeypatch, cell, spe):
    lean_model, lean_cb = _fit(True, monkeypatch, cell=cell, spe=spe, profile_every=5)
    full_model, full_cb = _fit(False, monkeypatch, cell=cell, spe=spe, profile_every=5)
    try:
        assert lean_cb._functions._lean is not None  # the lean function ran
        assert [r.to_dict() for r in lean_cb.records] == [r.to_dict() for r in full_cb.records]
        assert all(np.array_equal(a, b) for a, b in zip(lean_model.get_weights(), full_model.get_weights()))
        profiled = [r.step for r in lean_cb.records if r.temporal]
        assert profiled == [1, 5, 10, 15]
    finally:
        lean_cb.close()
        full_cb.close()


def test_sensitivity_probe_does_not_run_on_lean_steps(monkeypatch):
    """Steps 16 and 17 are not profiled: with the lean function the probe's variable
    still holds step 15's sums of squares (the full trace rewrote it on every step)."""
    for lean in (True, False):
        _, cb = _fit(lean, monkeypatch, profile_every=5)
        try:
            site = cb._kept._sites[0]
            last = [r for r in cb.records if r.temporal][-1]
            assert last.step == 15
            held = np.allclose(np.square(last.temporal[site.name].norms), site.sq.numpy(), rtol=1e-5)
            assert held is lean
        finally:
            cb.close()


def test_profiled_step_after_lean_steps_matches_gradient_tape(monkeypatch):
    monkeypatch.setattr(callback_module, "LEAN_SAVING", 1e9)
    model = make_model("LSTM")
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x, y = _data(40)
    cb = GradWatchCallback(sinks=["memory"], profile_every=10)
    try:
        model.fit(x[:36], y[:36], batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[cb])  # steps 1-9
        assert cb._functions._lean is not None
        truth = twin(model)
        per, glob, temporal = tape_step(truth, x[36:], y[36:])
        model.fit(x[36:], y[36:], batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[cb])  # step 10
        rec = cb.records[-1]
        assert rec.step == 10
        assert rec.global_norm == pytest.approx(glob, rel=1e-5)
        np.testing.assert_allclose(rec.temporal["rnn"].norms, temporal, rtol=1e-4)
        for path, norm in per.items():
            assert rec.param_norms[path] == pytest.approx(norm, rel=1e-5, abs=1e-12)
    finally:
        cb.close()


def test_short_fit_keeps_one_trace_until_the_lean_one_pays(monkeypatch):
    """The rent-or-buy rule: a fit too short to repay a second trace makes none; once the
    reckoned savings reach the first call's cost, the next unprofiled execution is lean."""
    model = make_model("LSTM")
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x, y = _data(48)
    cb = GradWatchCallback(sinks=["memory"], profile_every=5)
    try:
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        functions = cb._functions
        assert functions._lean is None
        assert functions.trace_cost is not None and 0 < functions.forgone < functions.trace_cost
        functions.forgone = functions.trace_cost
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        assert functions._lean is not None
        assert [r.step for r in cb.records if r.temporal] == [1, 5, 10, 15, 20]
    finally:
        cb.close()


def test_no_recurrent_layer_no_second_trace(monkeypatch):
    monkeypatch.setattr(callback_module, "LEAN_SAVING", 1e9)
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Dense(4)(inp)))
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x = np.random.default_rng(0).standard_normal((40, 3)).astype("float32")
    cb = GradWatchCallback(sinks=["memory"], profile_every=5)
    try:
        model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0, callbacks=[cb])
        assert cb._functions._lean is None
        assert len(cb.records) == 10
    finally:
        cb.close()


def test_a_lean_trace_that_fails_leaves_the_full_function(monkeypatch, caplog):
    """Nothing of the step ran when a trace fails: the full function runs that execution
    and every later one, the fit goes on and every step is recorded."""
    from gradwatch_tf import _intercept

    monkeypatch.setattr(callback_module, "LEAN_SAVING", 1e9)
    calls = []

    def broken(self):  # type: ignore[no-untyped-def]
        def fn(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(1)
            raise TypeError("cannot trace this model twice")

        return fn

    monkeypatch.setattr(_intercept.FitFunctions, "lean_function", broken)
    model = make_model("LSTM")
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x, y = _data(48)
    cb = GradWatchCallback(sinks=["memory"], profile_every=5)
    try:
        with caplog.at_level("WARNING", logger="gradwatch"):
            model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        assert calls == [1]
        assert cb._functions.lean_broken
        assert [r.step for r in cb.records] == list(range(1, 13))
        assert "could not be traced" in caplog.text
    finally:
        cb.close()
