"""The run file: strict JSON, non-finite round trip, tolerant of torn lines, strict schema."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

import gradwatch
from gradwatch import GradEvent, RunFileError, StepRecord, read_jsonl
from tests.core.helpers import feed, monitor


def _strict(path):
    def no_constants(token):
        raise AssertionError(f"bare {token} token in the run file")

    return [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]


def test_round_trip_keeps_nan_and_inf(tmp_path):
    path = tmp_path / "run.jsonl"
    m = monitor(sinks=[f"jsonl:{path}"], log_every=1, policy="fixed")
    m.bind(["enc.w", "dec.w"])
    written = [
        feed(m, norms=np.array([1.0, 2.0]), temporal={"rnn": [1e-30, 0.5, 1.0]}, spectral={"rnn.w[f]": 1.1}),
        feed(m, norms=np.array([math.nan, 2.0])),
        feed(m, norms=np.array([math.inf, 1.0])),
    ]
    m.close()
    lines = _strict(path)
    assert lines[0]["type"] == "header" and lines[0]["schema"] == "gradwatch/1"
    items = list(read_jsonl(path))
    records = [i for i in items if isinstance(i, StepRecord)]
    events = [i for i in items if isinstance(i, GradEvent)]
    assert [r.step for r in records] == [1, 2, 3]
    assert math.isnan(records[1].global_norm) and math.isnan(records[1].param_norms["enc.w"])
    assert records[2].global_norm == math.inf and records[2].param_norms["enc.w"] == math.inf
    assert records[0].param_norms == dict(written[0].param_norms)
    assert records[0].temporal["rnn"].norms == (1e-30, 0.5, 1.0)
    assert records[0].spectral == {"rnn.w[f]": 1.1}
    assert records[0].clip == written[0].clip
    assert records[1].nonfinite == ("enc.w",)
    assert {e.kind for e in events} >= {"nonfinite", "clipped"}
    assert all(isinstance(e.severity, int) for e in events)


def test_events_come_before_the_flushed_record_in_file_order(tmp_path):
    path = tmp_path / "run.jsonl"
    m = monitor(sinks=[f"jsonl:{path}"], log_every=3)
    m.bind(["w"])
    for n in [1.0, math.nan, 1.0]:
        feed(m, norms=np.array([n]))
    m.close()
    kinds = [type(i).__name__ for i in read_jsonl(path)]
    assert kinds == ["GradEvent", "StepRecord"]


def test_window_of_a_flushed_record_keeps_a_spike_between_flushes(tmp_path):
    path = tmp_path / "run.jsonl"
    m = monitor(sinks=[f"jsonl:{path}"], log_every=10)
    m.bind(["w"])
    for i in range(20):
        feed(m, norms=np.array([50.0 if i == 4 else 1.0]))
    m.close()
    recs = [i for i in read_jsonl(path) if isinstance(i, StepRecord)]
    assert [r.step for r in recs] == [10, 20]
    assert recs[0].window.norm_max == 50.0 and recs[0].window.first_step == 1 and recs[0].window.steps == 10
    assert recs[1].window.norm_max == 1.0
    assert recs[0].window.norm_mean == pytest.approx((50 + 9) / 10)


def test_close_flushes_the_partial_window(tmp_path):
    path = tmp_path / "run.jsonl"
    m = monitor(sinks=[f"jsonl:{path}"], log_every=50)
    m.bind(["w"])
    for _ in range(7):
        feed(m, norms=np.array([1.0]))
    m.close()
    (rec,) = list(read_jsonl(path))
    assert rec.step == 7 and rec.window.steps == 7


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


HEADER = '{"type":"header","schema":"gradwatch/1"}'
RECORD = '{"type":"record","step":1,"global_norm":"NaN","param_norms":{"w":"Infinity"}}'


def test_torn_last_line_warns_and_keeps_the_rest(tmp_path):
    path = tmp_path / "run.jsonl"
    _write(path, [HEADER, RECORD, '{"type":"record","step":2,"glo'])
    with pytest.warns(RuntimeWarning, match="line 3"):
        items = list(read_jsonl(path))
    assert len(items) == 1 and math.isnan(items[0].global_norm) and items[0].param_norms["w"] == math.inf


def test_other_schema_version_is_a_clear_error(tmp_path):
    path = tmp_path / "run.jsonl"
    _write(path, ['{"type":"header","schema":"gradwatch/2"}', RECORD])
    with pytest.raises(RunFileError, match="gradwatch/2.*gradwatch/1"):
        list(read_jsonl(path))


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty"),
        ("hello world\n", "not a JSON object"),
        ('{"type":"record","step":1}\n', "not a gradwatch header"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "run.jsonl"
    path.write_text(content)
    with pytest.raises(RunFileError, match=match):
        list(read_jsonl(path))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RunFileError, match="no such file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))
    with pytest.raises(RunFileError, match="directory"):
        list(read_jsonl(tmp_path))


def test_reading_executes_nothing(tmp_path):
    path = tmp_path / "run.jsonl"
    evil = '{"type":"record","step":1,"global_norm":1.0,"param_norms":{"__import__(\'os\').system(\'touch PWNED\')":1.0}}'
    _write(path, [HEADER, evil])
    (rec,) = list(read_jsonl(path))
    assert not (tmp_path / "PWNED").exists()
    assert list(rec.param_norms) == ["__import__('os').system('touch PWNED')"]


def test_read_run_collects_header_records_events(tmp_path):
    path = tmp_path / "r.jsonl"
    m = monitor(sinks=[f"jsonl:{path}"], log_every=1, run_name="baseline")
    m.bind(["w"])
    feed(m, norms=np.array([math.nan]))
    m.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = gradwatch.read_run(path)
    assert run.name == "baseline" and run.header["options"]["log_every"] == 1
    assert len(run.records) == 1 and run.events[0].kind == "nonfinite" and not run.torn


def test_alerts_held_back_at_close_reach_the_run_file(tmp_path):
    path = tmp_path / "run.jsonl"
    m = monitor(sinks=[f"jsonl:{path}"], alert_every=100, log_every=10)
    m.bind(["w"])
    for _ in range(30):
        feed(m, norms=np.array([math.nan]))
    m.close()
    run = gradwatch.read_run(path)
    assert [e.kind for e in run.events] == ["nonfinite"]
    assert run.summary["steps"] == 30
    assert run.suppressed == [{"kind": "nonfinite", "layer": "w", "count": 29, "first_step": 2}]
    assert run.events[0].suppressed + sum(s["count"] for s in run.suppressed) + 1 == 30
