"""Reading a run file that someone else wrote: anything that is not a run file this
version can read is one ``RunFileError``, never another exception, a hang, or a read
until memory runs out. The files are written by hand (and by hypothesis)."""

from __future__ import annotations

import json
import math
import os
import threading
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradwatch
from gradwatch import RunFileError, read_jsonl, read_run
from gradwatch import jsonl as jsonl_module

HEADER = '{"type":"header","schema":"gradwatch/1","run_name":"r"}'
RECORD = (
    '{"type":"record","step":5,"global_norm":1.5,"param_norms":{"w":1.0,"b":"NaN"},"layer_norms":{"l":1.5},'
    '"clip":{"threshold":1.0,"scale":0.5,"policy":"fixed"},"skipped":false,"nonfinite":["b"],'
    '"temporal":{"rnn":{"norms":[0.1,1.0],"gain":0.9,"horizon":2,"propagation":[1.0,0.5],'
    '"recurrences":{"l0":{"gains":[1.0,0.5],"rate":0.5,"horizon":2}}}},"spectral":{"rnn.w[f]":1.1},'
    '"gates":{"rnn":{"gate":"forget","mean":0.7,"log_path_gain":-3.0}},'
    '"window":{"first_step":1,"last_step":5,"steps":5,"norm_min":1.0,"norm_mean":1.2,"norm_max":1.5,'
    '"clipped":5,"skipped":0,"nonfinite":1}}'
)
EVENT = '{"type":"event","kind":"exploding","step":3,"severity":30,"message":"m","layer":"l","param":null,"value":9.0,"threshold":1.0}'
NORMS = '{"type":"norms","first_step":1,"values":[1.0,1.1,1.2,"Infinity",1.5],"clip_threshold":1.0,"clip_scale":[1,1,1,null,0.5],"skipped_steps":[4],"nonfinite_steps":[4]}'
SUMMARY = '{"type":"summary","steps":5,"suppressed":[{"kind":"exploding","layer":"l","count":2,"first_step":4}]}'
VALID = [HEADER, EVENT, NORMS, RECORD, SUMMARY]


def _file(tmp_path, lines, name="run.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_the_hand_written_reference_file_reads_back_exactly(tmp_path):
    run = read_run(_file(tmp_path, VALID))
    (rec,) = run.records
    assert rec.param_norms["w"] == 1.0 and math.isnan(rec.param_norms["b"]) and rec.clip.scale == 0.5
    assert rec.temporal["rnn"].recurrences["l0"].rate == 0.5 and rec.gates["rnn"].mean == 0.7
    assert run.steps.global_norm.tolist()[:3] == [1.0, 1.1, 1.2] and run.steps.global_norm[3] == math.inf
    assert run.steps.skipped.tolist() == [False, False, False, True, False] and math.isnan(run.steps.clip_scale[3])
    assert run.events[0].layer == "l" and run.suppressed[0]["count"] == 2


# ------------------------------------------------------------------- each known failure
@pytest.mark.parametrize(
    "line, field",
    [
        ("[" * 100_000 + "]" * 100_000, "nested"),
        ('{"type":"record","step":' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
        ('{"type":"record","step":1e999,"global_norm":1.0}', "step"),
        ('{"type":"record","step":Infinity,"global_norm":1.0}', "step"),
        ('{"type":"record","step":-Infinity,"global_norm":1.0}', "step"),
        ('{"type":"record","step":NaN,"global_norm":1.0}', "step"),
        ('{"type":"record","step":1' + "0" * 5000 + ',"global_norm":1.0}', "not a JSON object"),
        ('{"type":"record","step":2.5,"global_norm":1.0}', "step"),
        ('{"type":"record","step":true,"global_norm":1.0}', "step"),
        ('{"type":"record","step":1,"global_norm":"big"}', "global_norm"),
        ('{"type":"record","step":1,"global_norm":1' + "0" * 400 + "}", "global_norm"),
        ('{"type":"record","step":1,"global_norm":1.0,"param_norms":[1.0,2.0]}', "param_norms"),
        ('{"type":"record","step":1,"global_norm":1.0,"param_norms":{"w":[1]}}', "param_norms"),
        ('{"type":"record","step":1,"global_norm":1.0,"temporal":{"rnn":{"norms":"x","gain":1,"horizon":1}}}', "temporal"),
        ('{"type":"record","step":1,"global_norm":1.0,"window":{"first_step":9,"last_step":1}}', "window"),
        ('{"type":"record","step":1,"global_norm":1.0,"clip":{"threshold":1.0}}', "clip"),
        ('{"type":"record","step":1,"global_norm":1.0,"skipped":"yes"}', "skipped"),
        ('{"type":"event","kind":"exploding","step":1,"severity":30,"message":"m","layer":["a","b"]}', "layer"),
        ('{"type":"event","kind":"exploding","step":1,"severity":30,"message":{"a":1}}', "message"),
        ('{"type":"event","kind":"exploding","step":1,"severity":1e999,"message":"m"}', "severity"),
        ('{"type":"summary","steps":3,"suppressed":{"kind":"x"}}', "suppressed"),
        ('{"type":"summary","steps":3,"suppressed":[{"kind":"x","count":"many","first_step":1}]}', "suppressed"),
        ('{"type":"summary","steps":3,"suppressed":[1, 2]}', "suppressed"),
        ('{"type":"norms","first_step":1,"values":[1.0],"clip_scale":[1.0,2.0]}', "clip_scale"),
        ('{"type":"norms","first_step":1,"values":[1.0],"skipped_steps":[99]}', "skipped_steps"),
        ('{"type":"norms","first_step":9007199254740990,"values":[1,1,1,1,1,1]}', "first_step"),
        ('{"type":"header","schema":"gradwatch/1"}', "another run"),
        ('{"type":"header","schema":"gradwatch/1","resumed_at":"ten"}', "resumed_at"),
        ("17", "not a JSON object"),
    ],
)
def test_malformed_line_is_one_run_file_error_naming_line_and_field(tmp_path, line, field):
    path = _file(tmp_path, [HEADER, line, EVENT])  # not the last line: no torn-line leniency
    with pytest.raises(RunFileError) as err:
        read_run(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: line 2 ") and field in msg and "\n" not in msg and len(msg) < 400


@pytest.mark.parametrize(
    "header, field",
    [
        ('{"type":"header","schema":"gradwatch/1","run_name":["x"]}', "run_name"),
        ('{"type":"header","schema":"gradwatch/1","options":[1]}', "options"),
        ('{"type":"header","schema":"gradwatch/1","options":{"policy":{"x":1}}}', "options.policy"),
        ('{"type":"header","schema":"gradwatch/1","layer_types":{"0":7}}', "layer_types"),
        ('{"type":"header","schema":{"v":1}}', "schema"),
    ],
)
def test_malformed_header_is_one_run_file_error(tmp_path, header, field):
    with pytest.raises(RunFileError, match=field):
        read_run(_file(tmp_path, [header, RECORD]))


def test_symlink_to_dev_zero_is_refused_without_reading(tmp_path):
    link = tmp_path / "zero.jsonl"
    os.symlink("/dev/zero", link)
    with pytest.raises(RunFileError, match="not a regular file"):
        read_run(link)


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def read() -> None:
        try:
            read_run(fifo)
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            result.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader before failing
        with open(fifo, "w"):
            pass
        pytest.fail("read_run blocked on a FIFO")
    assert isinstance(result[0], RunFileError)


def test_line_longer_than_the_cap_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl_module, "MAX_LINE_BYTES", 1000)
    path = _file(tmp_path, [HEADER, '{"type":"event","message":"' + "x" * 5000 + '"}', EVENT])
    with pytest.raises(RunFileError, match="line 2 is longer than"):
        read_run(path)


def test_file_of_zeros_without_newline_is_refused_within_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl_module, "MAX_LINE_BYTES", 4096)
    path = tmp_path / "zeros.jsonl"
    path.write_bytes(b"\0" * 100_000)
    with pytest.raises(RunFileError, match="longer than"):
        read_run(path)


def test_invalid_utf8_is_a_run_file_error(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_bytes(HEADER.encode() + b"\n" + b'{"type":"event","message":"\xff\xfe"}\n')
    with pytest.raises(RunFileError, match="UTF-8"):
        read_run(path)


def test_unreadable_file_is_a_run_file_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = _file(tmp_path, VALID)
    path.chmod(0)
    with pytest.raises(RunFileError, match="cannot be read"):
        read_run(path)


def test_unknown_line_types_are_skipped(tmp_path):
    run = read_run(_file(tmp_path, [HEADER, '{"type":"from_the_future","x":[1,2]}', RECORD]))
    assert [r.step for r in run.records] == [5]


# ------------------------------------------------------------------------------ fuzzing
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
_KEYS = ["type", "step", "global_norm", "param_norms", "layer_norms", "clip", "skipped", "nonfinite", "temporal",
         "spectral", "gates", "window", "kind", "severity", "message", "layer", "param", "value", "threshold",
         "suppressed", "first_step", "values", "clip_scale", "clip_threshold", "skipped_steps", "nonfinite_steps",
         "steps", "resumed_at", "schema", "run_name", "options"]


def _reads_or_refuses(path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a torn last line is allowed
        try:
            run = read_run(path)
        except RunFileError as exc:
            assert "\n" not in str(exc)
            return
        assert isinstance(run, jsonl_module.Run)
        list(read_jsonl(path))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.sampled_from(VALID[1:]), key=st.sampled_from(_KEYS), value=_json, path_in=st.integers(0, 3))
def test_a_valid_line_with_any_field_replaced_reads_or_is_refused(tmp_path, line, key, value, path_in):
    obj = json.loads(line)
    target = obj
    for _ in range(path_in):  # sometimes replace a field one level down
        subs = [v for v in target.values() if isinstance(v, dict)]
        if not subs:
            break
        target = subs[0]
    target[key] = value
    text = json.dumps(obj, allow_nan=True)
    _reads_or_refuses(_file(tmp_path, [HEADER, text, EVENT]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(_json.map(lambda v: json.dumps(v, allow_nan=True)), st.text(max_size=40)), max_size=5))
def test_any_lines_after_a_header_read_or_are_refused(tmp_path, lines):
    _reads_or_refuses(_file(tmp_path, [HEADER, *(line.replace("\n", " ").replace("\r", " ") for line in lines)]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, sum(len(line) + 1 for line in VALID)), junk=st.binary(max_size=12))
def test_a_valid_file_cut_anywhere_and_followed_by_junk_reads_or_is_refused(tmp_path, cut, junk):
    path = tmp_path / "run.jsonl"
    path.write_bytes("".join(line + "\n" for line in VALID).encode()[:cut] + junk)
    _reads_or_refuses(path)


def test_read_jsonl_is_the_public_reader_of_the_same_checks(tmp_path):
    path = _file(tmp_path, [HEADER, '{"type":"event","kind":"x","step":1,"severity":30,"message":"m","layer":[1]}', EVENT])
    with pytest.raises(RunFileError, match="layer"):
        list(gradwatch.read_jsonl(path))
