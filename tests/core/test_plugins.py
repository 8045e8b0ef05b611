"""The plugin system: every hook exercised on a fresh manager, isolation, dispatch."""

from __future__ import annotations

import inspect
import logging
from typing import Any, ClassVar

import numpy as np
import pytest

import gradwatch
from gradwatch import GradwatchError, Monitor, hookspecs
from gradwatch.arrayops import NUMPY
from gradwatch.hookspecs import hookimpl
from gradwatch.plugins import make_plugin_manager
from gradwatch.policies import Clip, Policy


def fresh(*plugins: Any):
    pm = make_plugin_manager(load_entrypoints=False)
    for p in plugins:
        pm.register(p)
    return pm


class HalfPolicy(Policy):
    """A toy plugin policy: always halves the gradient (the pure-function protocol)."""

    name: ClassVar[str] = "half"

    def config(self) -> dict:
        return {}

    def init(self):
        return None

    def update(self, stats, state, ops=NUMPY):
        return Clip(stats.norm / 2, ops.asarray(0.5, "float64")), state


class ListSink:
    scheme: ClassVar[str] = "list"

    def __init__(self, arg):
        self.arg, self.records, self.events = arg, [], []

    @classmethod
    def from_spec(cls, arg, view):
        return cls(arg)

    def write_record(self, record):
        self.records.append(record)

    def write_event(self, event):
        self.events.append(event)

    def close(self):
        pass


class BigDetector:
    name: ClassVar[str] = "big"

    def __init__(self, options):
        self.options = options

    def check(self, record, view):
        if record.global_norm > 5:
            return [gradwatch.GradEvent("exploding", record.step, logging.WARNING, "big norm", value=record.global_norm)]
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_hook_gradwatch_register_policies():
    class P:
        @hookimpl
        def gradwatch_register_policies(self):
            return [HalfPolicy]

    m = Monitor(plugin_manager=fresh(P()), policy="half", sinks=[])
    assert m.observe({"w": np.ones(4)}).clip.scale == 0.5
    assert m.state_dict()["policy"]["policy"] == "half"


def test_hook_gradwatch_register_sinks():
    class P:
        @hookimpl
        def gradwatch_register_sinks(self):
            return [ListSink]

    m = Monitor(plugin_manager=fresh(P()), sinks=["list:abc"], log_every=1)
    m.observe({"w": np.ones(4)})
    (sink,) = m.sinks
    assert sink.arg == "abc" and [r.step for r in sink.records] == [1]


def test_hook_gradwatch_register_detectors():
    class P:
        @hookimpl
        def gradwatch_register_detectors(self):
            return [BigDetector]

    m = Monitor(plugin_manager=fresh(P()), sinks=[])
    m.observe({"w": np.full(4, 10.0)})
    assert [e.message for e in m.events] == ["big norm"]


def test_hook_gradwatch_register_recurrences():
    from gradwatch.through_time.families import Recurrence, declarations

    def decay(module, args, kwargs, output):
        return None

    class P:
        @hookimpl
        def gradwatch_register_recurrences(self):
            return [Recurrence("mypkg.layers.MyScan", decay=decay, kind="myscan"), "not a declaration"]

    class Q:
        @hookimpl
        def gradwatch_register_recurrences(self):
            return [Recurrence("mypkg.cells.MyCell", step=True, kind="mycell")]

    got = declarations(fresh(P(), Q()))
    assert sorted(r.kind for r in got) == ["mycell", "myscan"]
    scan = next(r for r in got if r.kind == "myscan")

    class Base:
        pass

    Base.__module__, Base.__qualname__ = "mypkg.layers", "MyScan"

    class Sub(Base):
        pass

    assert scan.matches(Sub) and not scan.matches(int)
    assert declarations(fresh()) == []


def test_hook_gradwatch_attach_and_dispatch_to_first_answer():
    class Handle:
        backend = "toy"

        def __init__(self, monitor):
            self.monitor, self.closed = monitor, 0

        def step(self):
            return self.monitor.observe({"w": np.ones(1)})

        def sync(self):
            pass

        def close(self):
            self.closed += 1

        def state_dict(self):
            return {"x": 1}

        def load_state_dict(self, state):
            self.loaded = state

    class Toy:
        @hookimpl
        def gradwatch_attach(self, target, optimizer, monitor):
            return Handle(monitor) if isinstance(target, list) else None

    pm = fresh(Toy())
    with gradwatch.watch([], plugin_manager=pm, sinks=[]) as w:
        handle = w.attachment
        assert w.backend == "toy"
        assert w.step().step == 1
        state = w.state_dict()
    assert handle.closed == 1 and w.attachment is None
    w.close()
    assert handle.closed == 1  # idempotent
    assert state["backend"] == {"x": 1} and state["monitor"]["step"] == 1
    with pytest.raises(GradwatchError, match=r"No gradwatch backend recognises an object of type 'builtins.dict'.*Toy"):
        gradwatch.watch({}, plugin_manager=pm, sinks=[])


def test_watch_of_an_unknown_object_names_installed_backends():
    with pytest.raises(GradwatchError, match=r"'builtins.object'\. Installed backends: none"):
        gradwatch.watch(object(), plugin_manager=fresh(), sinks=[])


def test_hook_gradwatch_resolve_policy():
    class P:
        @hookimpl
        def gradwatch_resolve_policy(self, spec, options):
            return HalfPolicy() if spec == ("half", 2) else None

    m = Monitor(plugin_manager=fresh(P()), policy=("half", 2), sinks=[])
    assert m.policy.name == "half"


def test_hook_gradwatch_step_recorded():
    seen: list = []

    class P:
        @hookimpl
        def gradwatch_step_recorded(self, record, view):
            seen.append((record.step, record.global_norm, view.step, view.names))

    m = Monitor(plugin_manager=fresh(P()), sinks=[])
    m.observe({"w": np.full(4, 2.0)})
    m.observe({"w": np.full(4, 3.0)})
    assert seen == [(1, 4.0, 1, ("w",)), (2, 6.0, 2, ("w",))]


def test_hook_gradwatch_event():
    seen: list = []

    class P:
        @hookimpl
        def gradwatch_step_recorded(self, record, view):
            seen.append(("record", record.step))

        @hookimpl
        def gradwatch_event(self, event, view):
            seen.append(("event", event.kind, view.layer_of("w")))

    m = Monitor(plugin_manager=fresh(P()), sinks=[])
    m.observe({"w": np.array([np.nan])})
    assert seen == [("event", "nonfinite", "w"), ("record", 1)]


def test_hooks_receive_a_read_only_view_not_the_monitor():
    got: list = []

    class P:
        @hookimpl
        def gradwatch_step_recorded(self, record, view):
            got.append(view)

    m = Monitor(plugin_manager=fresh(P()), sinks=[])
    m.observe({"w": np.ones(2)})
    (view,) = got
    assert isinstance(view, gradwatch.MonitorView) and not isinstance(view, Monitor)
    assert not hasattr(view, "process") and not hasattr(view, "bind")
    with pytest.raises(AttributeError):
        view.options = None


def test_a_raising_plugin_is_disabled_after_one_error_and_training_goes_on(caplog):
    calls = []

    class Bad:
        @hookimpl
        def gradwatch_step_recorded(self, record, view):
            raise RuntimeError("boom")

    class Good:
        @hookimpl
        def gradwatch_step_recorded(self, record, view):
            calls.append(record.step)

    m = Monitor(plugin_manager=fresh(Bad(), Good()), sinks=[])
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        for _ in range(3):
            m.observe({"w": np.ones(1)})
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "boom" in errors[0].getMessage() and "disabled" in errors[0].getMessage()
    assert calls == [1, 2, 3]


def test_a_raising_sink_is_disabled_after_one_error(caplog):
    class BadSink(ListSink):
        def write_event(self, event):
            raise OSError("disk full")

    good = ListSink(None)
    m = Monitor(plugin_manager=fresh(), sinks=[BadSink(None), good], log_every=1)
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        for _ in range(3):
            m.observe({"w": np.array([np.nan])})  # events every step
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "disk full" in r.getMessage()]
    assert len(errors) == 1
    assert len(m.sinks) == 1 and len(good.records) == 3


def test_entry_points_are_not_loaded_at_import():
    import subprocess
    import sys

    code = "import gradwatch, gradwatch.plugins as p, sys; print(p._default is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_every_hookspec_has_a_test_and_a_docstring():
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("gradwatch_")]
    assert len(specs) == 8
    tests = {n for n in globals() if n.startswith("test_hook_")}
    for name in specs:
        assert any(t.startswith(f"test_hook_{name}") for t in tests), name
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name
