"""The Monitor engine, driven from numpy."""

from __future__ import annotations

import json
import logging
import math
import tracemalloc

import numpy as np
import pytest

from gradwatch import ConfigError, MemorySink, NonFiniteGradientError
from tests.core.helpers import feed, monitor


def test_observe_norms_match_numpy():
    rng = np.random.default_rng(0)
    grads = {"enc.w": rng.normal(size=(5, 3)), "enc.b": rng.normal(size=5), "head.w": rng.normal(size=(2, 5))}
    r = monitor().observe(grads)
    assert r.step == 1
    for k, g in grads.items():
        assert r.param_norms[k] == pytest.approx(np.linalg.norm(g.ravel()), rel=1e-12)
    enc = np.sqrt(np.sum(grads["enc.w"] ** 2) + np.sum(grads["enc.b"] ** 2))
    assert r.layer_norms["enc"] == pytest.approx(enc, rel=1e-12)
    assert r.layer_norms["head"] == pytest.approx(np.linalg.norm(grads["head.w"]), rel=1e-12)
    flat = np.concatenate([g.ravel() for g in grads.values()])
    assert r.global_norm == pytest.approx(np.linalg.norm(flat), rel=1e-12)
    assert r.clip is None and not r.skipped and r.nonfinite == ()


def test_float16_gradients_do_not_overflow():
    g = np.full(1000, 60000.0, dtype=np.float16)  # the square overflows float16
    r = monitor().observe({"w": g})
    assert r.global_norm == pytest.approx(60000.0 * math.sqrt(1000), rel=1e-3)
    assert r.nonfinite == ()


def test_clip_gradients_applies_the_fixed_decision():
    m = monitor(policy="fixed", max_norm=1.0)
    grads = {"a.w": np.array([3.0, 4.0])}
    r = m.observe(grads)
    out = m.clip_gradients(grads, r)
    assert np.linalg.norm(out["a.w"]) == pytest.approx(1.0, rel=1e-5)
    assert r.clip.threshold == 1.0 and r.clip.scale < 1


def test_agc_through_observe_needs_params_and_reports_the_scale():
    m = monitor(policy="agc")
    w = {"l.w": np.ones((2, 2))}
    g = {"l.w": np.ones((2, 2))}
    with pytest.raises(ConfigError, match="params="):
        m.observe(g)
    r = m.observe(g, params=w)
    out = m.clip_gradients(g, r, params=w)
    assert r.clip.policy == "agc" and r.clip.threshold == 0.01
    assert r.clip.scale == pytest.approx(np.linalg.norm(out["l.w"]) / np.linalg.norm(g["l.w"]))


def test_zclip_string_caps_only_when_max_norm_is_given():
    assert monitor(policy="zclip").policy.max_norm is None
    assert monitor(policy="zclip", max_norm=5.0).policy.max_norm == 5.0
    assert monitor(policy="fixed").policy.max_norm == 1.0


def test_on_nonfinite_raise_names_the_parameter_after_emitting():
    m = monitor(on_nonfinite="raise")
    with pytest.raises(NonFiniteGradientError) as err:
        m.observe({"enc.w": np.ones(3), "dec.w": np.array([1.0, np.nan])})
    assert err.value.step == 1 and err.value.params == ("dec.w",) and err.value.layer == "dec"
    assert isinstance(err.value, FloatingPointError)
    assert "'dec.w'" in str(err.value)
    assert [e.kind for e in m.events] == ["nonfinite"]


def test_on_nonfinite_skip_marks_the_record_and_leaves_policy_state_alone():
    m = monitor(on_nonfinite="skip", policy="autoclip")
    m.observe({"w": np.ones(2)})
    before = m.policy.state_dict()
    r = m.observe({"w": np.array([np.inf, 1.0])})
    assert r.skipped and r.clip is None and r.nonfinite == ("w",)
    assert m.policy.state_dict() == before
    assert {e.kind for e in m.events} == {"nonfinite", "skipped"}


def test_records_and_events_are_bounded_by_keep():
    m = monitor(keep=10, alert_every=0)
    for i in range(100):
        m.observe({"w": np.array([np.nan if i % 2 else 1.0])})
    assert len(m.records) == 10 and m.records[-1].step == 100
    assert len(m.events) == 10


def test_memory_stays_flat_over_many_steps():
    m = monitor(keep=50, profile_every=1)
    prof = 0.9 ** np.arange(50)[::-1]
    m.bind(["a.w", "a.b", "b.w", "b.b"])
    tracemalloc.start()  # traced from here: every live record is traced at both snapshots
    for _ in range(300):
        feed(m, norms=np.ones(4), temporal={"rnn": prof})
    base = tracemalloc.take_snapshot()
    sizes = []
    for _ in range(2):
        for _ in range(3000):
            feed(m, norms=np.ones(4), temporal={"rnn": prof})
        sizes.append(sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename")))
    tracemalloc.stop()
    # The first 3,000 steps replace the kept records (keep=50, ~200 kB with their profiles) by
    # traced ones; the next 3,000 must add nothing (this compared the first number with 200 kB,
    # which the kept records alone nearly reach).
    assert sizes[1] - sizes[0] < 30_000  # bytes: no growth with the number of steps


def test_state_dict_resume_matches_uninterrupted_run():
    rng = np.random.default_rng(5)
    norms = np.exp(rng.normal(0, 0.5, (400, 3)))
    norms[150] *= 80
    norms[320, 1] = np.nan

    def run(ms, rows):
        return [feed(ms, norms=row) for row in rows]

    opts = dict(policy="zclip", log_every=7, alert_every=13)
    a = monitor(**opts)
    a.bind(["x.w", "y.w", "z.w"])
    full = run(a, norms)
    b = monitor(**opts)
    b.bind(["x.w", "y.w", "z.w"])
    first = run(b, norms[:200])
    state = json.loads(json.dumps(b.state_dict()))
    c = monitor(**opts)
    c.bind(["x.w", "y.w", "z.w"])
    c.load_state_dict(state)
    second = run(c, norms[200:])
    assert [r.clip for r in first + second] == [r.clip for r in full]
    assert [r.step for r in second] == list(range(201, 401))
    assert [(e.kind, e.step, e.message) for e in c.events] == [
        (e.kind, e.step, e.message) for e in a.events if e.step > 200
    ]
    sa = next(s for s in a.sinks if isinstance(s, MemorySink))
    sc = next(s for s in c.sinks if isinstance(s, MemorySink))
    assert [r.window for r in sc.records] == [r.window for r in sa.records if r.step > 200]


def test_resume_with_another_policy_is_refused():
    a = monitor(policy="zclip")
    with pytest.raises(ConfigError, match="policy"):
        monitor(policy=None).load_state_dict(a.state_dict())


def test_only_rank_zero_writes_unless_all_ranks():
    m = monitor(log_every=1)
    m.set_distributed(rank=1, world_size=2)
    m.observe({"w": np.array([np.nan])})
    sink = m.sinks[0]
    assert sink.records == [] and sink.events == [] if isinstance(sink.records, list) else len(sink.records) == 0
    assert len(m.events) == 1  # every rank still computes the same records and events
    m2 = monitor(log_every=1, all_ranks=True)
    m2.set_distributed(rank=1, world_size=2)
    m2.observe({"w": np.array([1.0])})
    assert len(m2.sinks[0].records) == 1


def test_profile_due_schedule():
    m = monitor(profile_every=5)
    due = []
    m.bind(["w"])
    for _ in range(12):
        due.append(m.profile_due())
        feed(m, norms=np.ones(1))
    assert [i + 1 for i, d in enumerate(due) if d] == [1, 5, 10]
    assert not monitor(profile_every=0).profile_due()


def test_logging_sink_writes_events_with_their_severity_and_info_summaries(caplog):
    m = monitor(sinks=["logging"], log_every=2)
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        m.observe({"enc.w": np.array([np.nan])})
        m.observe({"enc.w": np.array([1.0])})
    levels = [(r.levelno, r.name) for r in caplog.records]
    assert (logging.ERROR, "gradwatch") in levels and (logging.INFO, "gradwatch") in levels
    summary = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO][-1]
    assert "step 2" in summary and "non-finite on 1 step" in summary


def test_process_after_close_is_an_error_and_close_is_idempotent():
    m = monitor()
    m.close()
    m.close()
    with pytest.raises(Exception, match="closed"):
        m.observe({"w": np.ones(1)})


def test_records_and_profiles_survive_pickle_and_deepcopy():
    import copy
    import pickle

    m = monitor(policy="fixed")
    r = m.observe(
        {"rnn.w": np.full(3, 2.0), "head.w": np.ones(2)},
        temporal={"rnn": [1.0, 2.0, 4.0]},
        propagation={"rnn": {"l0": [1.0, 0.5, 0.25]}},
    )
    for copy_of in (pickle.loads(pickle.dumps(r)), copy.deepcopy(r)):
        assert copy_of.to_dict() == r.to_dict()
        assert copy_of.param_norms["rnn.w"] == pytest.approx(np.sqrt(12.0))
        assert copy_of.temporal["rnn"].recurrences["l0"].rate == pytest.approx(0.5)


def test_absent_parameters_count_for_nothing_not_for_zero():
    from gradwatch import StepStats

    m = monitor(policy="fixed", max_norm=1.0)
    m.bind(["enc.w", "enc.b", "dec.w"])
    sq = np.array([9.0, 16.0, np.nan])  # dec.w absent this step: its value must not matter
    r = m.process(StepStats(sq, present=np.array([True, True, False])))
    assert dict(r.param_norms) == {"enc.w": 3.0, "enc.b": 4.0}
    assert dict(r.layer_norms) == {"enc": 5.0}
    assert r.global_norm == 5.0 and r.nonfinite == ()
    assert r.clip.scale == pytest.approx(1.0 / (5.0 + 1e-6))


def test_a_frozen_layer_is_not_reported_as_vanished():
    from gradwatch import StepStats

    m = monitor(vanish_floor=1e-6, vanish_patience=3, alert_every=0)
    m.bind(["enc.w", "dec.w"])
    for _ in range(10):  # dec is frozen: absent from every record, never "stopped learning"
        m.process(StepStats(np.array([1.0, 0.0]), present=np.array([True, False])))
    assert m.events == []
    for _ in range(3):  # a present layer whose norm does vanish still alerts
        m.process(StepStats(np.array([1e-20, 1.0])))
    (e,) = m.events
    assert e.kind == "vanishing" and e.layer == "enc"


def test_a_flushed_record_keeps_the_windows_propagation_past_a_later_cheaper_profile():
    """The backends measure propagation on fewer steps than the sensitivity profile: a
    window whose last profile has no propagation still writes the one measured before."""
    m = monitor(log_every=4, profile_every=1)
    m.bind(["rnn.w"])
    sensitivity = np.linspace(1.0, 2.0, 10)
    vanishing = 0.5 ** np.arange(10)
    feed(m, norms=np.ones(1), temporal={"rnn": sensitivity}, propagation={"rnn": {"l0": vanishing}})  # step 1
    feed(m, norms=np.ones(1), temporal={"rnn": sensitivity * 3})  # steps 2-4: sensitivity only
    feed(m, norms=np.ones(1), temporal={"rnn": sensitivity * 5})
    feed(m, norms=np.ones(1))
    (sink,) = m.sinks
    (written,) = sink.records
    prof = written.temporal["rnn"]
    assert written.step == 4
    assert prof.norms == pytest.approx(tuple(sensitivity * 5))  # the newest sensitivity
    assert prof.recurrences["l0"].gains == pytest.approx(tuple(vanishing))  # the window's propagation
    assert prof.horizon == 10 and prof.gain == pytest.approx(0.5)
    # The next window measured none: its record says so rather than repeat the old one.
    for _ in range(4):
        feed(m, norms=np.ones(1), temporal={"rnn": sensitivity})
    assert not sink.records[-1].temporal["rnn"].recurrences
    # In memory, each step keeps exactly what it measured.
    assert not m.records[1].temporal["rnn"].recurrences


def _window_run(m, steps, measured):
    """Steps 1..steps of an RNN whose propagation (horizon 10 of 40, rate 0.5) is measured
    only at the steps in ``measured``; every step has a sensitivity profile."""
    m.bind(["rnn.w"])
    for step in range(1, steps + 1):
        prop = {"rnn": {"l0": 0.5 ** np.arange(40)}} if step in measured else None
        feed(m, norms=np.ones(1), temporal={"rnn": np.ones(40)}, **({"propagation": prop} if prop else {}))


def test_a_flushed_record_says_where_its_propagation_was_measured(caplog):
    from gradwatch.formatting import summary_line

    m = monitor(log_every=25, sinks=["memory", "logging"])
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        _window_run(m, 50, measured={1, 10, 20, 50})
    (sink, _) = m.sinks
    at25, at50 = sink.records
    assert at25.step == 25 and at25.temporal.measured_at == {"rnn": 20}
    assert at25.temporal["rnn"].horizon == 10  # kept: the run file loses no measurement
    line25 = summary_line(at25)
    assert "rnn: 0.5/step through time, horizon 10/40 (measured at step 20)" in line25
    assert at50.temporal.measured_at == {"rnn": 50}
    assert "horizon 10/40" in summary_line(at50) and "measured at" not in summary_line(at50)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "step 25:" in r.getMessage()]
    assert infos == [line25]


def test_the_info_line_leaves_out_layers_whose_propagation_was_not_measured():
    from gradwatch import StepRecord, TemporalProfile, WindowStats
    from gradwatch.formatting import summary_line

    unmeasured = TemporalProfile.build(np.ones(40))
    assert unmeasured.horizon is None
    r = StepRecord(step=50, global_norm=1.0, temporal={"rnn": unmeasured}, window=WindowStats(1, 50, 50, 1.0, 1.0, 1.0))
    line = summary_line(r)
    assert "rnn" not in line and "horizon" not in line and "None" not in line and "nan" not in line
    m = monitor(log_every=25)
    _window_run(m, 25, measured=set())
    (written,) = m.sinks[0].records
    assert "horizon" not in summary_line(written) and not written.temporal["rnn"].recurrences


def _flush_lines(caplog, norms, **options):
    from tests.core.helpers import feed_global_norms

    m = monitor(log_every=len(norms), sinks=["logging"], **options)
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        feed_global_norms(m, norms)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.getMessage().startswith("step ")]


def test_the_info_line_says_when_the_norm_sat_at_a_ceiling_every_step(caplog):
    # clip_grad_norm_(max_norm=0.5) before optimizer.step(): 0.5 * n / (n + 1e-6) on every step
    pre = np.random.default_rng(0).lognormal(1.0, 0.5, 20)
    (line,) = _flush_lines(caplog, list(0.5 * pre / (pre + 1e-6)))
    assert "min 0.5, mean 0.5, max 0.5) | 0.5 on every step: clipped before gradwatch measured?" in line
    assert "policy='fixed', max_norm=0.5" in line


@pytest.mark.parametrize(
    "norms, options",
    [
        (list(np.random.default_rng(1).lognormal(0.0, 0.3, 20)), {}),  # a healthy run varies
        ([0.5] * 4, {}),  # too few steps to say
        ([0.5 * (1 - 1e-3 * (i % 2)) for i in range(20)], {}),  # 0.1% apart: not one value
        ([3.0 + 0.1 * i for i in range(20)], {"policy": "fixed", "max_norm": 1.0}),  # gradwatch's own clipping
    ],
)
def test_the_ceiling_note_stays_out_of_lines_it_does_not_describe(caplog, norms, options):
    (line,) = _flush_lines(caplog, norms, **options)
    assert "on every step" not in line
