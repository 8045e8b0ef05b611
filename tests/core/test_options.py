"""Option validation: every bad value names the option, the value and what is allowed."""

from __future__ import annotations

import pytest

from gradwatch import ConfigError
from tests.core.helpers import monitor


@pytest.mark.parametrize(
    "option, value, allowed",
    [
        ("policy", "clipper", "'zclip'"),
        ("policy", 3.5, "not a policy"),
        ("max_norm", -1.0, "> 0"),
        ("max_norm", float("nan"), "> 0"),
        ("on_nonfinite", "ignore", "'warn', 'skip', 'raise'"),
        ("log_every", 0, "integer >= 1"),
        ("log_every", 2.5, "integer >= 1"),
        ("profile_every", -1, "integer >= 0"),
        ("sinks", "logging", "a list"),
        ("sinks", ["kafka:topic"], "not a known sink"),
        ("sinks", [object()], "neither a sink name"),
        ("keep", 0, "integer >= 1"),
        ("vanish_ratio", 2.0, "(0, 1)"),
        ("explode_ratio", 0.5, "> 1"),
        ("spike_z", 0, "> 0"),
        ("all_ranks", "yes", "True or False"),
    ],
)
def test_bad_option_raises_config_error_naming_it(option, value, allowed):
    with pytest.raises(ConfigError) as err:
        monitor(**{option: value})
    msg = str(err.value)
    assert err.value.option == option
    shown = value[0] if isinstance(value, list) else value
    assert option in msg and allowed in msg and repr(shown)[:20] in msg
    assert isinstance(err.value, ValueError)


def test_unknown_option_suggests_the_close_one():
    with pytest.raises(ConfigError, match="Did you mean 'log_every'") as err:
        monitor(log_evry=10)
    assert err.value.option == "log_evry"


def test_jsonl_sink_path_problems_are_reported_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="directory"):
        monitor(sinks=[f"jsonl:{tmp_path}"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write"):
        monitor(sinks=[f"jsonl:{blocker}/sub/run.jsonl"])
    with pytest.raises(ConfigError, match="needs a path"):
        monitor(sinks=["jsonl:"])


def test_defaults_are_the_documented_ones():
    m = monitor(sinks=["logging"])
    o = m.options
    assert (o.policy, o.max_norm, o.on_nonfinite, o.log_every, o.profile_every, o.keep) == (
        None, 1.0, "warn", 50, 10, 1000,
    )
    assert m.policy is None
