"""gradwatch writes into the user's own tf.summary writer during model.fit."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")
tf = pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")
ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from tf_helpers import data, make_model, tape_step, twin

import gradwatch
from gradwatch_tf import GradWatchCallback


def test_tf_summary_writer_gets_norms_spectral_norms_and_alerts(tmp_path):
    model = make_model("LSTM")
    truth_model = twin(model)
    x, y = data(n=8)
    x[4, 0, 0] = np.nan  # third batch of two: skipped, and an alert
    truth_opt = keras.optimizers.SGD(0.05)
    truth = [tape_step(truth_model, x[i : i + 2], y[i : i + 2], truth_opt if i != 4 else None) for i in range(0, 8, 2)]
    writer = tf.summary.create_file_writer(str(tmp_path))
    model.compile(keras.optimizers.SGD(0.05), "mse")
    cb = GradWatchCallback(log_every=2, profile_every=1, on_nonfinite="skip", sinks=[gradwatch.TensorBoardSink(writer=writer)])
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    with writer.as_default():
        tf.summary.scalar("loss", 1.0, step=4)  # the user's own summary, same writer
    writer.flush()
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])  # tf.summary v2 writes tensors
    assert {"loss", "grad_norm/global", "grad_norm/rnn", "grad_norm/head", "spectral/rnn/lstm_cell/recurrent_kernel[f]"} <= tags
    norms = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("grad_norm/global")}
    assert sorted(norms) == [2, 4]
    assert norms[2] == pytest.approx(truth[1][1], rel=1e-5)
    assert norms[4] == pytest.approx(truth[3][1], rel=1e-5)
    layer_tag = next(t for t in tags if t.startswith("alerts/nonfinite"))
    (alert,) = acc.Tensors(layer_tag)
    assert alert.step == 3
    assert "Non-finite gradient" in tf.make_ndarray(alert.tensor_proto).item().decode()
