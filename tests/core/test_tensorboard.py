"""The TensorBoard sink: files TensorBoard itself reads, tags that overlay, alerts as text,
and a user's own writer (framework-free here; torch and tf writers in their suites)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from gradwatch import ConfigError, TensorBoardSink
from gradwatch._tfevents import crc32c
from tests.core.helpers import feed, monitor


def test_crc32c_known_vector():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def _accumulator(logdir):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator", reason="tensorboard not installed")
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    return acc


def _run(sinks, steps=6, **options):
    """A recurrent run whose layer 'rnn' vanishes through time (gain 0.5 per step)."""
    m = monitor(sinks=sinks, log_every=2, **options)
    m.bind(["rnn.w", "head.w"])
    for i in range(steps):
        feed(
            m,
            norms=np.array([3.0, 4.0 + i]),
            temporal={"rnn": 0.5 ** np.arange(20)[::-1]},
            propagation={"rnn": {"l0": 0.5 ** np.arange(20)}},
            spectral={"rnn.w[f]": 1.25},
        )
    return m


def test_scalars_are_readable_by_tensorboard_under_overlayable_tags(tmp_path):
    _run([f"tensorboard:{tmp_path}"], policy="fixed").close()
    acc = _accumulator(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {
        "grad_norm/global",
        "grad_norm/global_window_max",
        "grad_norm/global_window_mean",
        "grad_norm/rnn",
        "grad_norm/head",
        "clip/threshold",
        "clip/scale",
        "through_time/rnn/rate",
        "through_time/rnn/horizon",
        "spectral/rnn.w[f]",
    } <= tags
    norms = acc.Scalars("grad_norm/global")
    assert [e.step for e in norms] == [2, 4, 6]
    assert norms[-1].value == pytest.approx(np.hypot(3.0, 9.0), rel=1e-6)
    # window of steps 5 and 6: norms hypot(3, 8) and hypot(3, 9), computed here
    assert acc.Scalars("grad_norm/global_window_max")[-1].value == pytest.approx(np.hypot(3.0, 9.0), rel=1e-6)
    assert acc.Scalars("grad_norm/global_window_mean")[-1].value == pytest.approx((np.hypot(3, 8) + np.hypot(3, 9)) / 2, rel=1e-6)
    assert acc.Scalars("grad_norm/head")[-1].value == pytest.approx(9.0, rel=1e-6)
    assert acc.Scalars("through_time/rnn/rate")[0].value == pytest.approx(0.5, rel=1e-6)
    assert acc.Scalars("through_time/rnn/horizon")[0].value == 10  # 0.5**10 < 1e-3 <= 0.5**9


def test_alerts_are_text_summaries_at_their_step(tmp_path):
    m = _run([f"tensorboard:{tmp_path}", "memory"])
    m.close()
    vanishing = [e for e in m.events if e.kind == "vanishing" and e.layer == "rnn"]
    assert vanishing
    acc = _accumulator(tmp_path)
    assert "alerts/vanishing/rnn" in acc.Tags()["tensors"]
    assert acc.SummaryMetadata("alerts/vanishing/rnn").plugin_data.plugin_name == "text"
    texts = acc.Tensors("alerts/vanishing/rnn")
    assert [t.step for t in texts] == [e.step for e in vanishing]
    text = texts[0].tensor_proto.string_val[0].decode()
    assert text.startswith(f"**step {vanishing[0].step}** (WARNING): ")
    assert "recurrent layer 'rnn'" in text


def test_directory_sink_writes_a_custom_scalars_layout_that_matches_its_tags(tmp_path):
    layout_pb2 = pytest.importorskip("tensorboard.plugins.custom_scalar.layout_pb2")
    _run([f"tensorboard:{tmp_path}"], policy="fixed").close()
    acc = _accumulator(tmp_path)
    raw = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    tags = acc.Tags()["scalars"]

    def drawn(title):  # the custom-scalars plugin matches each regex with re.match
        return {t for t in tags if any(re.match(r, t) for r in charts[title])}

    assert {"grad_norm/global", "grad_norm/rnn", "grad_norm/head"} <= drawn("gradient norm: global and per layer")
    assert drawn("global norm and clip threshold") == {"grad_norm/global", "grad_norm/global_window_max", "clip/threshold"}
    assert drawn("through time: rate per step (< 1 vanishing, > 1 exploding)") == {"through_time/rnn/rate"}


class RecordingWriter:
    """Stands for a user's SummaryWriter: anything with add_scalar and add_text."""

    def __init__(self):
        self.scalars, self.texts, self.flushes, self.closed = [], [], 0, False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


def test_a_users_writer_receives_the_same_scalars_and_alerts():
    w = RecordingWriter()
    m = _run([TensorBoardSink(writer=w), "memory"])
    m.close()
    steps = {s for tag, _, s in w.scalars if tag == "grad_norm/global"}
    assert steps == {2, 4, 6}
    assert ("grad_norm/head", pytest.approx(9.0), 6) in w.scalars
    assert {tag for tag, _, _ in w.texts} >= {"alerts/vanishing/rnn"}
    assert w.flushes >= 3 and not w.closed  # the user's writer is flushed, never closed


def test_writer_of_unknown_kind_is_refused_naming_what_it_needs():
    with pytest.raises(ConfigError, match="add_scalar and add_text.*'builtins.object'"):
        TensorBoardSink(writer=object())


def test_directory_and_writer_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        TensorBoardSink(tmp_path, writer=RecordingWriter())
    with pytest.raises(ConfigError, match="exactly one"):
        TensorBoardSink()


def test_two_alerts_of_one_kind_and_layer_at_one_step_both_reach_tensorboard(tmp_path):
    from gradwatch.events import GradEvent

    sink = TensorBoardSink(tmp_path)
    for i in range(2):
        sink.write_event(GradEvent(kind="vanishing", step=7, severity=30, message=f"alert {i}", layer="rnn"))
    sink.close()
    acc = _accumulator(tmp_path)
    got = sorted(t.tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"] if tag.startswith("alerts/") for t in acc.Tensors(tag))
    assert got == ["**step 7** (WARNING): alert 0", "**step 7** (WARNING): alert 1"]


def test_layer_named_like_a_global_curve_gets_its_own_tag():
    from gradwatch.tensorboard import tensorboard_scalars

    m = monitor(log_every=1)
    m.bind(["global.w", "head.w"])
    rec = feed(m, norms=np.array([3.0, 4.0]))
    tags = dict(tensorboard_scalars(rec))
    assert tags["grad_norm/global"] == pytest.approx(5.0)
    assert tags["grad_norm/global_layer"] == pytest.approx(3.0)


def test_through_time_scalars_are_written_at_the_step_they_were_measured_never_as_nan():
    from tests.core.helpers import feed, monitor

    w = RecordingWriter()
    m = monitor(log_every=25, sinks=[TensorBoardSink(writer=w)])
    m.bind(["rnn.w"])
    for step in range(1, 76):
        prop = {"propagation": {"rnn": {"l0": 0.5 ** np.arange(40)}}} if step in (10, 20) else {}
        feed(m, norms=np.ones(1), temporal={"rnn": np.ones(40)}, **prop)  # steps 26-75: profiles without propagation
    tt = [(tag, v, s) for tag, v, s in w.scalars if tag.startswith("through_time/")]
    assert tt == [("through_time/rnn/rate", pytest.approx(0.5), 20), ("through_time/rnn/horizon", 10.0, 20)]
    assert all(math.isfinite(v) for _, v, _ in w.scalars)
    assert {s for tag, _, s in w.scalars if tag == "grad_norm/global"} == {25, 50, 75}
