"""MirroredStrategy over two logical CPU devices (a subprocess: the devices must be
configured before TensorFlow initialises them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")
pytest.importorskip("keras", reason="the Keras backend needs Keras 3")

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    sys.path.insert(0, sys.argv[1])
    from tf_helpers import data, make_model, tape_step
    from gradwatch_tf import GradWatchCallback

    x, y = data(n=8)
    x[4:6, 2, 1] = np.nan  # third batch of two is non-finite
    truth_model = make_model("LSTM")
    truth = [tape_step(truth_model, x[i:i + 2], y[i:i + 2]) for i in (0, 2)]
    truth_weights = None

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = make_model("LSTM")
        model.compile(keras.optimizers.SGD(0.0), "mse")
    from gradwatch_tf import _kkept
    # "compiled": the host's replay traced at step 1's read; "numpy": a short fit's default,
    # the same replay on numpy (gradwatch_tf._knumpy), nothing traced
    _kkept.BACKGROUND_COMPILE = sys.argv[2] == "numpy"
    cb = GradWatchCallback(on_nonfinite="skip", sinks=["memory"], profile_every=1)
    before = [w.copy() for w in model.get_weights()]
    model.fit(x[:6], y[:6], batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    recs = cb.records
    # Through time, measured beside the step from what it kept (gradwatch_tf._tfhost):
    # the first replica's shard (the first sequence of each batch of two), against the
    # float64 reference; the gate blocks' largest singular values against numpy's SVD.
    from gradwatch.through_time.reference import propagation_from_jacobians
    from tests.contract.adapters import KerasAdapter, Recurrence
    from tests.contract.test_contract_through_time import _run
    cell = model.get_layer("rnn").cell
    ref = Recurrence("rnn", "l0", *KerasAdapter()._torch_layout(cell))
    want_gains = [
        list(propagation_from_jacobians(np.stack([_run(ref, x[i].astype(np.float64), np.ones(6, bool))[0]]))[0])
        for i in (0, 2)
    ]
    rk = cell.recurrent_kernel.numpy()
    u = rk.shape[0]
    want_sigma = sorted(float(np.linalg.norm(rk[:, g * u:(g + 1) * u], 2)) for g in range(4))
    iterations = int(model.optimizer.iterations.numpy())
    restored = "apply" not in vars(model.optimizer)
    unchanged = all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    # The lean train function (steps not profiled) under the strategy: steps 2, 4 and 5.
    import gradwatch_tf.callback as callback_module
    callback_module.LEAN_SAVING = 1e9
    lean_cb = GradWatchCallback(sinks=["memory"], profile_every=3)
    xs, ys = np.concatenate([x[:4]] * 3), np.concatenate([y[:4]] * 3)
    model.fit(xs, ys, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[lean_cb])
    lean = lean_cb.records
    print(json.dumps({
        "lean_traced": lean_cb._functions._lean is not None,
        "lean_norms": [r.global_norm for r in lean],
        "lean_profiled": [r.step for r in lean if r.temporal],
        "lean_temporal": list(lean[2].temporal["rnn"].norms),
        "replicas": strategy.num_replicas_in_sync,
        "norms": [r.global_norm for r in recs],
        "truth": [t[1] for t in truth],
        "temporal": [list(recs[i].temporal["rnn"].norms) for i in (0, 1)],
        "truth_temporal": [list(t[2]) for t in truth],
        "skipped": [r.skipped for r in recs],
        "gains": [list(recs[i].temporal["rnn"].recurrences["l0"].gains) for i in (0, 1)],
        "want_gains": want_gains,
        "sigma": [sorted(recs[i].spectral.values()) for i in (0, 1)],
        "want_sigma": want_sigma,
        "iterations": iterations,
        "restored": restored,
        "unchanged": unchanged,
    }))
    """
)


@pytest.mark.parametrize("host", ["compiled", "numpy"])
def test_mirrored_strategy_reports_the_global_norm(tmp_path, host):
    script = tmp_path / "mirrored.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent), host],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["lean_traced"] and out["lean_profiled"] == [1, 3, 6]
    assert out["lean_norms"] == pytest.approx([out["truth"][i % 2] for i in range(6)], rel=1e-4)
    assert out["lean_temporal"] == pytest.approx(out["truth_temporal"][0], rel=1e-3)
    assert out["norms"][:2] == pytest.approx(out["truth"], rel=1e-4)
    for got, want in zip(out["temporal"], out["truth_temporal"]):
        assert got == pytest.approx(want, rel=1e-3)
    for got, want in zip(out["gains"], out["want_gains"]):
        assert got == pytest.approx(want, rel=1e-4)
    for got in out["sigma"]:
        assert got == pytest.approx(out["want_sigma"], rel=1e-3)
    assert out["skipped"] == [False, False, True]
    assert out["iterations"] == 2
    assert out["restored"]
    assert out["unchanged"]  # learning rate 0: only the skipped step could have moved them
