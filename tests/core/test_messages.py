"""What a user reads when something is off: option hints, the backends message, the
log line's format (issue 19, "Messages")."""

from __future__ import annotations

import importlib.util
import logging
import types

import numpy as np
import pytest

import gradwatch
from gradwatch import ConfigError, GradwatchError
from gradwatch.hookspecs import hookimpl
from gradwatch.options import POLICY_KEYWORDS
from gradwatch.plugins import make_plugin_manager
from tests.core.helpers import monitor


@pytest.mark.parametrize(("option", "policy"), sorted(POLICY_KEYWORDS.items()))
def test_a_policy_keyword_given_to_watch_names_the_policy_to_pass(option, policy):
    with pytest.raises(ConfigError, match="Unknown gradwatch option") as err:
        monitor(**{option: 5})
    assert f"policy=gradwatch.{policy}({option}=5)" in str(err.value)
    assert getattr(gradwatch, policy)  # the hint names something that exists


def test_every_policy_keyword_in_the_hints_is_a_real_argument():
    import inspect

    for option, policy in POLICY_KEYWORDS.items():
        assert option in inspect.signature(getattr(gradwatch, policy)).parameters


def _backend_module(name: str) -> types.ModuleType:
    mod = types.ModuleType(f"fake_{name}_plugin")

    @hookimpl
    def gradwatch_attach(target, optimizer, monitor):
        return None

    mod.gradwatch_attach = gradwatch_attach  # type: ignore[attr-defined]
    return mod


def _pm_with(*names: str):
    pm = make_plugin_manager(load_entrypoints=False)
    for n in names:
        pm.register(_backend_module(n), name=n)
    return pm


def test_backends_whose_frameworks_are_missing_are_not_called_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("torch", "keras") else real(n, *a))
    with pytest.raises(GradwatchError) as err:
        gradwatch.watch(object(), plugin_manager=_pm_with("torch", "tf"), sinks=[])
    msg = str(err.value)
    assert "Installed backends: none importable (" in msg
    assert "torch: torch is not installed" in msg and "tf: keras is not installed" in msg
    assert "pip install 'gradwatch[torch]'" in msg


def test_an_importable_backend_is_listed_and_a_missing_one_said_so(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "keras" else object() if n == "torch" else real(n, *a))
    with pytest.raises(GradwatchError, match=r"Installed backends: torch \(tf: keras is not installed\)\."):
        gradwatch.watch(object(), plugin_manager=_pm_with("torch", "tf"), sinks=[])


def test_log_lines_name_gradwatch_once(caplog):
    m = monitor(sinks=["logging"], log_every=2)
    handler = logging.StreamHandler(stream := __import__("io").StringIO())
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    logging.getLogger("gradwatch").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="gradwatch"):
            m.observe({"enc.w": np.array([np.nan])})
            m.observe({"enc.w": np.array([1.0])})
    finally:
        logging.getLogger("gradwatch").removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert any(line.startswith("ERROR:gradwatch:Non-finite") for line in lines), lines
    assert any(line.startswith("INFO:gradwatch:step 2") for line in lines), lines
    assert not any("[gradwatch]" in line for line in lines), lines


def test_latest_profile_is_the_newest_record_with_temporal_data():
    from gradwatch import StepStats
    from gradwatch.watch import Watch, WatchFront

    m = gradwatch.Monitor(sinks=[], profile_every=3, log_every=1)
    m.bind(["rnn.w"])
    w = Watch(m)
    assert w.latest_profile is None
    for _ in range(4):
        temporal = {"rnn": np.array([1.0, 0.5])} if m.profile_due() else {}
        m.process(StepStats(np.array([1.0]), temporal=temporal))
    assert w.records[-1].step == 4 and not w.records[-1].temporal  # what the README used to print: {}
    assert w.latest_profile is not None and w.latest_profile.step == 3 and "rnn" in w.latest_profile.temporal

    class Front(WatchFront):
        def __init__(self, watch: Watch) -> None:
            self.watch = watch

    assert Front(w).latest_profile is w.latest_profile
    w.close()


def test_latest_propagation_skips_a_profiled_step_without_a_replay():
    """A profiled step whose replay the cost model spaced out carries the sensitivity but
    no propagation: latest_profile is that step, latest_propagation the one before with
    gains (its horizon, not None)."""
    from gradwatch import StepStats, TemporalProfile
    from gradwatch.watch import Watch, WatchFront

    m = gradwatch.Monitor(sinks=[], profile_every=2, log_every=1)
    m.bind(["rnn.w"])
    w = Watch(m)
    assert w.latest_propagation is None
    gains = np.array([1.0, 0.5, 0.25, 0.125])
    for step in range(1, 5):
        temporal = {}
        if step == 2:  # replayed
            temporal = {"rnn": TemporalProfile.build(norms=[1.0, 0.5, 0.2, 0.1], recurrences={"l0": gains}, max_gains={"l0": gains})}
        elif step == 4:  # profiled, not replayed: sensitivity only
            temporal = {"rnn": TemporalProfile.build(norms=[1.0, 0.4, 0.2, 0.1])}
        m.process(StepStats(np.array([1.0]), temporal=temporal))
    assert w.latest_profile.step == 4 and w.latest_profile.temporal["rnn"].horizon is None
    got = w.latest_propagation
    assert got is not None and got.step == 2
    assert got.temporal["rnn"].horizon == 4 and got.temporal["rnn"].recurrences["l0"].rate == pytest.approx(0.5)

    class Front(WatchFront):
        def __init__(self, watch: Watch) -> None:
            self.watch = watch

    assert Front(w).latest_propagation is got
    w.close()
