"""What every backend promises, checked the same way on each (see docs/BACKENDS.md)."""

from __future__ import annotations

import gc
import json
import math
import weakref

import numpy as np
import pytest

import gradwatch
from tests.contract.adapters import watch


def _equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_records_match_the_frameworks_own_gradients(backend):
    model, opt = backend.build()
    with watch(backend, model, opt) as w:
        for step in range(3):
            truth = backend.true_global_norm(model, step)
            backend.train_step(model, opt, step)
            assert w.records[-1].global_norm == pytest.approx(truth, rel=1e-5)
        assert [r.step for r in w.records] == [1, 2, 3]


def test_close_leaves_nothing_attached(backend):
    model, opt = backend.build()
    w = watch(backend, model, opt, profile_every=1)
    backend.train_step(model, opt, 0)
    assert backend.leftovers(model, opt), "the watch installed nothing: the check below would be vacuous"
    w.close()
    assert backend.leftovers(model, opt) == []
    w.close()  # idempotent
    before = len(w.records)
    backend.train_step(model, opt, 1)
    assert len(w.records) == before


def test_the_watch_keeps_no_strong_reference_to_the_model(backend):
    model, opt = backend.build()
    w = watch(backend, model, opt)
    backend.train_step(model, opt, 0)
    ref = weakref.ref(model)
    del model, opt
    gc.collect()
    assert ref() is None
    assert len(w.records) == 1
    w.close()


def test_watching_a_model_twice_is_an_error_until_closed(backend):
    model, opt = backend.build()
    with watch(backend, model, opt), pytest.raises(gradwatch.GradwatchError, match="already watched"):
        watch(backend, model, opt)
    with watch(backend, model, opt) as again:  # closed: watching it again is fine
        backend.train_step(model, opt, 0)
        assert len(again.records) == 1


def test_observe_only_training_is_bitwise_as_if_unwatched(backend):
    model, opt = backend.build()
    ref_model, ref_opt = backend.clone(model, opt)
    with watch(backend, model, opt, profile_every=1):
        for step in range(4):
            backend.train_step(model, opt, step)
    for step in range(4):
        backend.train_step(ref_model, ref_opt, step)
    assert _equal(backend.weights(model), backend.weights(ref_model))
    assert _equal(backend.opt_state(opt), backend.opt_state(ref_opt))


def test_skip_is_bitwise_a_step_not_taken(backend):
    model, opt = backend.build()
    ref_model, ref_opt = backend.clone(model, opt)
    with watch(backend, model, opt, on_nonfinite="skip") as w:
        backend.train_step(model, opt, 0)
        backend.train_step(model, opt, 1, nan=True)
        backend.train_step(model, opt, 2)
        rec = w.records
    assert [r.skipped for r in rec] == [False, True, False]
    assert [e.kind for e in w.events if e.kind in ("nonfinite", "skipped")] == ["nonfinite", "skipped"]
    backend.train_step(ref_model, ref_opt, 0)  # the same run without the bad batch
    backend.train_step(ref_model, ref_opt, 2)
    assert _equal(backend.weights(model), backend.weights(ref_model))
    assert _equal(backend.opt_state(opt), backend.opt_state(ref_opt))


def test_raise_happens_before_any_change(backend):
    model, opt = backend.build()
    with watch(backend, model, opt, on_nonfinite="raise") as w:
        backend.train_step(model, opt, 0)
        weights, state = backend.weights(model), backend.opt_state(opt)
        with pytest.raises(Exception) as err:  # TF wraps it in an OpError inside a tf.function
            backend.train_step(model, opt, 1, nan=True)
        assert "Non-finite gradient" in str(err.value)
        assert _equal(backend.weights(model), weights) and _equal(backend.opt_state(opt), state)
        assert w.records[-1].step == 2 and w.records[-1].nonfinite


def test_fixed_equals_the_frameworks_own_clipping(backend):
    model, opt = backend.build()
    ref_model, ref_opt = backend.clone(model, opt)
    with watch(backend, model, opt, policy="fixed", max_norm=0.05) as w:
        for step in range(3):
            backend.train_step(model, opt, step)
        assert all(r.clip is not None and r.clip.scale < 1 for r in w.records)
    for step in range(3):
        backend.train_step(ref_model, ref_opt, step, clip=0.05)
    for a, b in zip(backend.weights(model), backend.weights(ref_model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resume_is_exact(backend):
    options = {"policy": "zclip", "profile_every": 2, "log_every": 3}
    straight, straight_opt = backend.build()
    with watch(backend, straight, straight_opt, **options) as w:
        for step in range(8):
            backend.train_step(straight, straight_opt, step)
        expected = w.records[4:]
    first, first_opt = backend.build()
    with watch(backend, first, first_opt, **options) as w1:
        for step in range(4):
            backend.train_step(first, first_opt, step)
        state = json.loads(json.dumps(w1.state_dict()))
    model, opt = backend.clone(first, first_opt)
    with watch(backend, model, opt, **options) as w2:
        w2.load_state_dict(state)
        for step in range(4, 8):
            backend.train_step(model, opt, step)
        got = w2.records
    assert [r.step for r in got] == [r.step for r in expected] == [5, 6, 7, 8]
    assert [r.global_norm for r in got] == [r.global_norm for r in expected]
    assert [r.clip for r in got] == [r.clip for r in expected]
    assert [bool(r.temporal) for r in got] == [bool(r.temporal) for r in expected]
    assert _equal(backend.weights(model), backend.weights(straight))


def test_the_profiling_schedule_is_the_same(through_time):
    backend = through_time
    model, opt = backend.build()
    with watch(backend, model, opt, profile_every=3) as w:
        for step in range(10):
            backend.train_step(model, opt, step)
        profiled = [r.step for r in w.records if r.temporal]
    assert profiled == [s for s in range(1, 11) if gradwatch.profile_due(s, 3)] == [1, 3, 6, 9]


def test_profile_every_0_measures_norms_only(backend):
    model, opt = backend.build()
    with watch(backend, model, opt, profile_every=0) as w:
        backend.train_step(model, opt, 0)
        (r,) = w.records
    assert not r.temporal and not r.spectral and math.isfinite(r.global_norm)


def test_the_run_file_header_names_each_layers_type(backend, tmp_path):
    """The report labels its rows "rnn (LSTM)": the header must carry the class names."""
    model, opt = backend.build()
    path = tmp_path / "run.jsonl"
    with watch(backend, model, opt, sinks=[f"jsonl:{path}"], log_every=1):
        backend.train_step(model, opt, 0)
    types = gradwatch.read_run(path).header["layer_types"]
    assert types == {"rnn": "LSTM", "head": "Linear" if backend.name == "torch" else "Dense"}
