"""The run file keeps every step: per-step norms, the tail at every way a run can end,
resumption that appends, and one writer per path.

References are numbers written in the tests (the norms fed, their L2 sums), files
written by hand, and what another process sees; never gradwatch's own output.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gradwatch
from gradwatch import ConfigError, NonFiniteGradientError, StepStats
from tests.core.helpers import monitor

NAMES = ["enc.w", "dec.w"]


def _norms(step: int) -> np.ndarray:
    """Per-parameter gradient norms of step ``step`` (deterministic, varied)."""
    return np.array([1.0 + 0.5 * math.sin(step), 0.1 * step])


def _expected_global(step: int) -> float:
    return float(np.sqrt(np.sum(_norms(step) ** 2)))


def _feed(m: gradwatch.Monitor, steps: range) -> None:
    for s in steps:
        m.process(StepStats(_norms(s) ** 2))


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_script(body: str, tmp_path, *, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        """
        import math, sys
        import numpy as np
        import gradwatch
        from gradwatch import StepStats
        def norms(step):
            return np.array([1.0 + 0.5 * math.sin(step), 0.1 * step])
        """
    ) + textwrap.dedent(body)
    script = tmp_path / "script.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=check, **kwargs)


# ----------------------------------------------------------------------- per-step norms
def test_every_step_global_norm_is_in_the_file_not_only_flushed_ones(tmp_path):
    path = tmp_path / "run.jsonl"
    m = monitor(sinks=[f"jsonl:{path}"], log_every=50)
    m.bind(NAMES)
    _feed(m, range(1, 101))
    m.close()
    run = gradwatch.read_run(path)
    assert [r.step for r in run.records] == [50, 100]
    assert run.steps.step.tolist() == list(range(1, 101))
    assert run.steps.global_norm.tolist() == pytest.approx([_expected_global(s) for s in range(1, 101)], rel=1e-12)
    assert run.steps.per_step


def test_per_step_columns_hold_each_steps_clip_scale_and_skip(tmp_path):
    path = tmp_path / "run.jsonl"
    m = monitor(sinks=[f"jsonl:{path}"], log_every=8, policy="fixed", max_norm=1.5, on_nonfinite="skip")
    m.bind(NAMES)
    for s in range(1, 21):
        sq = _norms(s) ** 2
        if s == 7:
            sq[0] = math.nan
        m.process(StepStats(sq))
    m.close()
    steps = gradwatch.read_run(path).steps
    # clip_grad_norm_'s coefficient: max_norm / (norm + 1e-6), at most 1
    expected_scale = [math.nan if s == 7 else min(1.0, 1.5 / (_expected_global(s) + 1e-6)) for s in range(1, 21)]
    got = steps.clip_scale.tolist()
    assert math.isnan(got[6]) and got[:6] + got[7:] == pytest.approx(expected_scale[:6] + expected_scale[7:], rel=1e-9)
    assert np.flatnonzero(steps.skipped).tolist() == [6] and np.flatnonzero(steps.nonfinite).tolist() == [6]
    assert np.all(steps.clip_threshold[np.arange(20) != 6] == 1.5)


def test_per_step_norms_cost_about_20_bytes_a_step(tmp_path):
    """The size stated in docs/API.md and the README: measured here on typical norms."""
    path = tmp_path / "run.jsonl"
    rng = np.random.default_rng(0)
    m = monitor(sinks=[f"jsonl:{path}"], log_every=50)
    m.bind(NAMES)
    for _ in range(1000):
        m.process(StepStats(rng.lognormal(0.0, 1.0, size=2) ** 2))
    m.close()
    col_bytes = sum(len(line) + 1 for line in path.read_text().splitlines() if '"type":"norms"' in line)
    assert 15 <= col_bytes / 1000 <= 22


# ------------------------------------------------------------------ the tail reaches the file
def test_loop_that_raises_inside_with_keeps_every_step(tmp_path):
    path = tmp_path / "run.jsonl"
    m = monitor(sinks=[f"jsonl:{path}"], log_every=50)
    m.bind(NAMES)
    with pytest.raises(RuntimeError, match="boom"), gradwatch.Watch(m):
        _feed(m, range(1, 26))
        raise RuntimeError("boom")
    assert gradwatch.read_run(path).steps.step.tolist() == list(range(1, 26))


def test_nonfinite_raise_writes_every_step_before_it_raises(tmp_path):
    """A notebook catches the error and the process lives on: the file is complete now,
    not at some later close."""
    path = tmp_path / "run.jsonl"
    m = monitor(sinks=[f"jsonl:{path}"], log_every=50, on_nonfinite="raise")
    m.bind(NAMES)
    _feed(m, range(1, 25))
    with pytest.raises(NonFiniteGradientError):
        m.process(StepStats(np.array([math.inf, 1.0])))
    steps = gradwatch.read_run(path).steps  # m is not closed
    assert steps.step.tolist() == list(range(1, 26)) and steps.nonfinite.tolist() == [False] * 24 + [True]


def test_script_whose_loop_raises_without_close_keeps_every_step(tmp_path):
    path = tmp_path / "run.jsonl"
    res = _run_script(
        f"""
        m = gradwatch.Monitor(sinks=["jsonl:{path}"], log_every=50)
        m.bind(["enc.w", "dec.w"])
        for step in range(1, 101):
            if step == 26:
                raise OverflowError("loss overflowed at batch 25")
            m.process(StepStats(norms(step) ** 2))
        """,
        tmp_path,
    )
    assert res.returncode == 1 and "OverflowError" in res.stderr
    run = gradwatch.read_run(path)
    assert run.steps.global_norm.tolist() == pytest.approx([_expected_global(s) for s in range(1, 26)], rel=1e-12)
    assert run.summary is not None and run.summary["steps"] == 25


def test_script_that_ends_without_close_keeps_every_step(tmp_path):
    path = tmp_path / "run.jsonl"
    _run_script(
        f"""
        m = gradwatch.Monitor(sinks=["jsonl:{path}"], log_every=50)
        m.bind(["enc.w", "dec.w"])
        for step in range(1, 31):
            m.process(StepStats(norms(step) ** 2))
        """,
        tmp_path,
        check=True,
    )
    assert gradwatch.read_run(path).steps.step.tolist() == list(range(1, 31))


def test_sigterm_turned_into_exit_keeps_every_step(tmp_path):
    """The README's recipe for schedulers that send SIGTERM (SLURM, docker stop)."""
    path = tmp_path / "run.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            f"""
            import signal, sys, time
            import numpy as np
            import gradwatch
            from gradwatch import StepStats
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            m = gradwatch.Monitor(sinks=["jsonl:{path}"], log_every=50)
            m.bind(["w"])
            for step in range(1, 13):
                m.process(StepStats(np.array([float(step)])))
            print("ready", flush=True)
            time.sleep(60)
            """
        )],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.terminate()
    assert proc.wait(timeout=60) == 143
    assert gradwatch.read_run(path).steps.global_norm.tolist() == pytest.approx([math.sqrt(s) for s in range(1, 13)])


def test_monitor_dropped_without_close_writes_its_tail(tmp_path):
    """A sweep that rebinds its monitor each trial, never closing it. In a fresh
    interpreter: inside pytest, a frame kept by some other test's traceback can hold the
    monitor past its last reference, which is not what this tests."""
    path = tmp_path / "run.jsonl"
    _run_script(
        f"""
        import gc
        m = gradwatch.Monitor(sinks=["jsonl:{path}"], log_every=50)
        m.bind(["enc.w", "dec.w"])
        for step in range(1, 8):
            m.process(StepStats(norms(step) ** 2))
        del m
        gc.collect()
        import os
        os._exit(0)  # no atexit: only dropping the monitor may have written the tail
        """,
        tmp_path,
        check=True,
    )
    assert gradwatch.read_run(path).steps.step.tolist() == list(range(1, 8))


def test_multiprocessing_child_without_close_keeps_every_step(tmp_path):
    """``torch.multiprocessing.spawn`` ranks end with os._exit: no atexit there."""
    path = tmp_path / "run.jsonl"
    _run_script(
        f"""
        import multiprocessing as mp
        def train():
            m = gradwatch.Monitor(sinks=["jsonl:{path}"], log_every=50)
            m.bind(["enc.w", "dec.w"])
            for step in range(1, 18):
                m.process(StepStats(norms(step) ** 2))
        if __name__ == "__main__":
            p = mp.get_context("spawn").Process(target=train)
            p.start(); p.join()
            sys.exit(p.exitcode)
        """,
        tmp_path,
        check=True,
    )
    assert gradwatch.read_run(path).steps.step.tolist() == list(range(1, 18))


def test_forked_child_that_exits_never_writes_the_parents_file(tmp_path):
    path = tmp_path / "run.jsonl"
    _run_script(
        f"""
        import os
        m = gradwatch.Monitor(sinks=["jsonl:{path}"], log_every=5)
        m.bind(["enc.w", "dec.w"])
        for step in range(1, 8):  # one flushed window, two steps pending
            m.process(StepStats(norms(step) ** 2))
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # runs atexit in the child: the parent's pending steps must not be written twice
        os.waitpid(pid, 0)
        for step in range(8, 11):
            m.process(StepStats(norms(step) ** 2))
        m.close()
        """,
        tmp_path,
        check=True,
    )
    lines = _lines(path)
    assert [line["type"] for line in lines].count("header") == 1
    assert [line["step"] for line in lines if line["type"] == "record"] == [5, 10]
    assert gradwatch.read_run(path).steps.step.tolist() == list(range(1, 11))


# ------------------------------------------------------------------------------ resuming
def test_resume_appends_and_reads_back_as_one_run_in_order(tmp_path):
    """The README's recipe: a checkpoint at step 30; the first process ran on to step 45
    and died; the resumed process replays 31..60 from the checkpoint."""
    path = tmp_path / "run.jsonl"
    first = monitor(sinks=[f"jsonl:{path}"], log_every=20)
    first.bind(NAMES)
    _feed(first, range(1, 31))
    state = json.loads(json.dumps(first.state_dict()))
    for _ in range(31, 46):  # the abandoned timeline: different numbers
        first.process(StepStats(np.array([7.0, 7.0])))
    first.close()
    before = path.read_text()

    second = monitor(sinks=[f"jsonl:{path}"], log_every=20)
    second.bind(NAMES)
    second.load_state_dict(state)
    _feed(second, range(31, 61))
    second.close()

    assert path.read_text().startswith(before)  # appended, nothing truncated
    headers = [line for line in _lines(path) if line["type"] == "header"]
    assert len(headers) == 2 and "resumed_at" not in headers[0] and headers[1]["resumed_at"] == 30
    run = gradwatch.read_run(path)
    assert run.steps.global_norm.tolist() == pytest.approx([_expected_global(s) for s in range(1, 61)], rel=1e-12)
    assert [r.step for r in run.records] == [20, 40, 60]
    assert run.resumed_at == [30] and run.dropped == 2  # record 40 and the closing flush at 45 of the first process
    assert run.summary["steps"] == 60


def test_read_jsonl_of_a_resumed_file_yields_steps_in_order(tmp_path):
    path = tmp_path / "run.jsonl"
    lines = [
        '{"type":"header","schema":"gradwatch/1"}',
        '{"type":"record","step":10,"global_norm":1.0}',
        '{"type":"record","step":20,"global_norm":2.0}',
        '{"type":"header","schema":"gradwatch/1","resumed_at":10}',
        '{"type":"record","step":20,"global_norm":3.0}',
        '{"type":"record","step":30,"global_norm":4.0}',
    ]
    path.write_text("".join(line + "\n" for line in lines))
    got = [(r.step, r.global_norm) for r in gradwatch.read_jsonl(path)]
    assert got == [(10, 1.0), (20, 3.0), (30, 4.0)]


def test_resume_cuts_a_torn_last_line_before_appending(tmp_path):
    path = tmp_path / "run.jsonl"
    first = monitor(sinks=[f"jsonl:{path}"], log_every=5)
    first.bind(NAMES)
    _feed(first, range(1, 11))
    state = first.state_dict()
    first.close()
    with open(path, "a") as f:
        f.write('{"type":"record","step":11,"glob')  # a crash mid-write
    second = monitor(sinks=[f"jsonl:{path}"], log_every=5)
    second.bind(NAMES)
    second.load_state_dict(state)
    _feed(second, range(11, 16))
    second.close()
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        run = gradwatch.read_run(path)
    assert run.steps.step.tolist() == list(range(1, 16)) and not run.torn


def test_resume_onto_a_file_that_is_not_a_run_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"these": "are my notes"}\n')
    m = monitor(sinks=[f"jsonl:{path}"])
    m.bind(NAMES)
    state = monitor().state_dict()
    with pytest.raises(ConfigError, match="notes.jsonl"):
        m.load_state_dict(state)
    m.close()
    assert path.read_text() == '{"these": "are my notes"}\n'


def test_resume_onto_a_new_path_says_where_the_file_starts(tmp_path):
    m = monitor(log_every=5)
    m.bind(NAMES)
    _feed(m, range(1, 13))
    state = m.state_dict()
    path = tmp_path / "later.jsonl"
    second = monitor(sinks=[f"jsonl:{path}"], log_every=5)
    second.bind(NAMES)
    second.load_state_dict(state)
    _feed(second, range(13, 16))
    second.close()
    assert _lines(path)[0]["resumed_at"] == 12
    assert gradwatch.read_run(path).steps.step.tolist() == [13, 14, 15]


# --------------------------------------------------------------------- one writer per path
def test_two_live_watches_on_one_path_are_refused_at_construction(tmp_path):
    path = tmp_path / "run.jsonl"
    first = monitor(sinks=[f"jsonl:{path}"], log_every=1)
    first.bind(NAMES)
    _feed(first, range(1, 3))
    with pytest.raises(ConfigError) as err:
        monitor(sinks=[f"jsonl:{tmp_path / '.' / 'run.jsonl'}"])  # the same file, spelled otherwise
    msg = str(err.value)
    assert str(path) in msg and "close" in msg.lower() and "run-2.jsonl" in msg
    _feed(first, range(3, 5))
    first.close()
    assert gradwatch.read_run(path).steps.step.tolist() == [1, 2, 3, 4]  # the first run is intact


def test_path_is_free_again_once_the_first_watch_is_closed(tmp_path):
    path = tmp_path / "run.jsonl"
    monitor(sinks=[f"jsonl:{path}"]).close()
    monitor(sinks=[f"jsonl:{path}"]).close()


def test_a_path_another_process_is_writing_is_refused_until_it_stops(tmp_path):
    path = tmp_path / "run.jsonl"
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            f"""
            import sys
            import numpy as np
            import gradwatch
            from gradwatch import StepStats
            m = gradwatch.Monitor(sinks=["jsonl:{path}"], log_every=1)
            m.bind(["w"])
            m.process(StepStats(np.array([1.0])))
            print("ready", flush=True)
            sys.stdin.readline()
            m.close()
            """
        )],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        with pytest.raises(ConfigError, match="another process"):
            monitor(sinks=[f"jsonl:{path}"])
    finally:
        writer.communicate("\n", timeout=60)
    assert writer.returncode == 0
    monitor(sinks=[f"jsonl:{path}"]).close()  # the lock went with the process
    assert os.path.getsize(path) > 0
