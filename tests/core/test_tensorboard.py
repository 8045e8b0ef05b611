"""The TensorBoard sink writes files TensorBoard itself can read."""

from __future__ import annotations

import numpy as np
import pytest

from gradwatch._tfevents import crc32c
from tests.core.helpers import feed, monitor


def test_crc32c_known_vector():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_scalars_are_readable_by_tensorboard(tmp_path):
    ea_mod = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard not installed"
    )
    m = monitor(sinks=[f"tensorboard:{tmp_path}"], log_every=2, policy="fixed")
    m.bind(["rnn.w", "head.w"])
    for i in range(6):
        feed(
            m,
            norms=np.array([3.0, 4.0 + i]),
            temporal={"rnn": 0.5 ** np.arange(20)[::-1]},
            propagation={"rnn": {"l0": 0.9 ** np.arange(20)}},
            spectral={"rnn.w[f]": 1.25},
        )
    m.close()
    acc = ea_mod.EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"grad/global_norm", "grad_layer/rnn", "clip/threshold", "temporal/rnn/gain", "spectral/rnn.w[f]"} <= tags
    norms = acc.Scalars("grad/global_norm")
    assert [e.step for e in norms] == [2, 4, 6]
    assert norms[-1].value == pytest.approx(np.hypot(3.0, 9.0), rel=1e-6)
    assert acc.Scalars("temporal/rnn/gain")[0].value == pytest.approx(0.9, rel=1e-6)  # the propagation rate
