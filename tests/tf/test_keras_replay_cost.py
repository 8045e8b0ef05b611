"""The Keras (JAX / torch) replay's cost model spaces its replays by the plan's rule,
profile spacing included: with profiles 10 steps apart a replay may take 1.5% of all
training (REPLAY_SHARE_OF_TRAINING), not only 5% of the profiled steps. Runs on any
Keras backend (the site is found and priced from shapes; nothing is traced)."""

from __future__ import annotations

import math

import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs keras")

from gradwatch import Options  # noqa: E402
from gradwatch.through_time.plan import REPLAY_SHARE, REPLAY_SHARE_OF_TRAINING  # noqa: E402
from gradwatch_tf._ksites import PortableThroughTime  # noqa: E402


def _period(profile_every: int) -> int:
    inp = keras.Input((7, 12))
    model = keras.Model(inp, keras.layers.LSTM(128)(inp))  # keras-io addition_rnn's encoder
    through = PortableThroughTime(model, Options(profile_every=profile_every), lambda *a: None)
    (site,) = through.sites
    return through._period(site, keras.ops.zeros((32, 7, 12)))


def test_spaced_profiles_replay_more_of_them():
    every_step, every_tenth = _period(1), _period(10)
    # the same replay against a budget 3x larger per profiled step (0.15 of a step, not 0.05)
    ratio = REPLAY_SHARE_OF_TRAINING * 10 / REPLAY_SHARE
    assert every_step > 3, every_step
    assert math.ceil((every_step - 1) / ratio) <= every_tenth <= math.ceil(every_step / ratio), (every_step, every_tenth)
