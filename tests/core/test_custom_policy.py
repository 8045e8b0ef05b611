"""A clipping policy of the user's own, written exactly as README "Policies" says."""

from __future__ import annotations

import math

import pytest


def _readme_policy_namespace():
    """The custom policy of README "Policies", exactly as written there (its code block)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Policies") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = "\n".join(line for line in block.splitlines() if not line.startswith("watch = gradwatch.watch("))
    ns: dict = {}
    exec(compile(code, "README.md#policies", "exec"), ns)  # noqa: S102 - our own README
    return ns


def test_the_readme_custom_policy_works_end_to_end_with_its_state_round_trip():
    import json

    from tests.core.helpers import feed_global_norms, monitor

    HalfPeak = _readme_policy_namespace()["HalfPeak"]
    norms = [1.0, 4.0, 3.0, float("nan"), 1.5, 10.0, 2.0, 30.0]
    whole = monitor(policy=HalfPeak(), alert_every=0)
    feed_global_norms(whole, norms)
    # by hand: threshold = half the largest finite norm of the previous steps
    peaks = [0.0, 1.0, 4.0, 4.0, 4.0, 4.0, 10.0, 10.0]
    for r, n, peak in zip(whole.records, norms, peaks):
        assert r.clip.policy == "half_peak"
        want = 1.0 if not math.isfinite(n) or peak == 0 or n <= 0.5 * peak else 0.5 * peak / (n + 1e-6)
        assert r.clip.scale == pytest.approx(want)
    assert [r.clip.clipped for r in whole.records] == [False, True, True, False, False, True, False, True]

    first = monitor(policy=HalfPeak(), alert_every=0)
    feed_global_norms(first, norms[:5])
    state = json.loads(json.dumps(first.state_dict()))
    assert state["policy"]["state"] == {"peak": 4.0}
    resumed = monitor(policy=HalfPeak(), alert_every=0)
    resumed.load_state_dict(state)
    feed_global_norms(resumed, norms[5:])
    assert [(r.clip.threshold, r.clip.scale) for r in resumed.records] == [
        (r.clip.threshold, r.clip.scale) for r in whole.records[5:]
    ]
