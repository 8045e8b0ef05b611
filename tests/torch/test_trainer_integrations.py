"""What the Lightning and Hugging Face callbacks share: imports, log keys, AMP skips.

These run without Lightning or transformers (the trainer packages are only checked for
being absent from ``sys.modules``, or blocked in a subprocess).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

from gradwatch import ClipDecision, StepRecord, TemporalProfile
from gradwatch_torch._trainers import TrainerMetrics, scaler_will_skip

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=False,
    )


def test_importing_gradwatch_torch_imports_no_trainer_package():
    proc = _python(
        """
        import sys
        import gradwatch, gradwatch_torch, gradwatch_torch.attach, gradwatch_torch._trainers
        loaded = [m for m in ("lightning", "pytorch_lightning", "transformers", "accelerate") if m in sys.modules]
        print(loaded)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("gradwatch_torch.lightning", ("lightning", "pytorch_lightning"), "lightning"),
        ("gradwatch_torch.transformers", ("transformers",), "transformers"),
    ],
)
def test_an_integration_without_its_trainer_says_what_to_install(module, blocked, extra):
    proc = _python(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError(name + " is not installed")
        sys.meta_path.insert(0, Block())
        try:
            import {module}
        except ImportError as exc:
            print(exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert f"pip install 'gradwatch[{extra}]'" in proc.stdout


def _record(step, norm, *, clip=None, skipped=False, temporal=None):
    return StepRecord(
        step=step,
        global_norm=norm,
        layer_norms={"rnn": norm * 0.6, "head": norm * 0.8},
        clip=clip,
        skipped=skipped,
        temporal=temporal or {},
    )


def test_metrics_carry_the_latest_step_and_the_window_since_the_last_write():
    m = TrainerMetrics()
    assert m.metrics() == {}
    m.update(_record(1, 3.0, clip=ClipDecision(1.0, 1 / 3, "fixed")))
    m.update(_record(2, 0.5, clip=ClipDecision(1.0, 1.0, "fixed")))
    first = m.metrics()
    assert first == {
        "gradwatch/grad_norm": 0.5,
        "gradwatch/grad_norm_max": 3.0,
        "gradwatch/clipped_steps": 1.0,
        "gradwatch/grad_norm/rnn": 0.3,
        "gradwatch/grad_norm/head": 0.4,
        "gradwatch/clip_threshold": 1.0,
        "gradwatch/clip_scale": 1.0,
    }
    m.update(_record(3, 0.7, clip=ClipDecision(1.0, 1.0, "fixed")))
    second = m.metrics()
    assert second["gradwatch/grad_norm_max"] == 0.7 and second["gradwatch/clipped_steps"] == 0.0


def test_a_nonfinite_step_shows_in_the_window_max_and_a_skip_is_counted():
    m = TrainerMetrics(layers=False)
    m.update(_record(1, math.nan, skipped=True))
    m.update(_record(2, 2.0))
    out = m.metrics()
    assert math.isnan(out["gradwatch/grad_norm_max"]) and out["gradwatch/skipped_steps"] == 1.0
    assert not [k for k in out if k.startswith("gradwatch/grad_norm/")]
    assert "gradwatch/skipped_steps" not in (m.update(_record(3, 1.0)), m.metrics())[1]


def test_policy_warm_up_without_threshold_logs_no_threshold():
    m = TrainerMetrics()
    m.update(_record(1, 1.0, clip=ClipDecision(math.inf, 1.0, "zclip")))
    out = m.metrics()
    assert "gradwatch/clip_threshold" not in out and out["gradwatch/clip_scale"] == 1.0


def test_a_propagation_is_logged_once_on_the_log_whose_window_measured_it_never_again():
    gains = [0.5**j for j in range(8)]
    prof = TemporalProfile.build([1.0] * 8, {"l0": gains})
    m = TrainerMetrics()
    m.update(_record(1, 1.0, temporal={"rnn": prof}))
    m.update(_record(2, 1.0))
    m.update(_record(3, 1.0, temporal={"rnn": TemporalProfile.build([1.0] * 8)}))  # profiled, no propagation
    out = m.metrics()
    assert out["gradwatch/propagation_rate/rnn"] == pytest.approx(0.5, rel=1e-6)
    assert out["gradwatch/horizon/rnn"] == prof.horizon == 8  # 0.5**7 = 7.8e-3: never below 1e-3
    for step in range(4, 64):  # 60 steps profiled without propagation, or not profiled: nothing to log
        m.update(_record(step, 1.0, temporal={"rnn": TemporalProfile.build([1.0] * 8)} if step % 10 == 0 else None))
        assert not [k for k in m.metrics() if "propagation_rate" in k or "horizon" in k]
    faster = TemporalProfile.build([1.0] * 8, {"l0": [0.25**j for j in range(8)]})
    m.update(_record(64, 1.0, temporal={"rnn": faster}))
    m.update(_record(65, 1.0))
    out = m.metrics(new_window=False)  # Lightning's per-step log: the window goes on
    assert out["gradwatch/propagation_rate/rnn"] == pytest.approx(0.25, rel=1e-6) and out["gradwatch/horizon/rnn"] == 5
    assert m.metrics()["gradwatch/horizon/rnn"] == 5  # the logger's write: then the window starts afresh
    assert "gradwatch/horizon/rnn" not in m.metrics()


def test_a_profile_that_was_not_measured_is_never_logged_as_a_number():
    m = TrainerMetrics()
    unmeasured = TemporalProfile.build([1.0] * 8)
    assert unmeasured.horizon is None and math.isnan(unmeasured.gain)
    m.update(_record(1, 1.0, temporal={"rnn": unmeasured}))
    out = m.metrics()
    assert all(isinstance(v, float) and not math.isnan(v) for v in out.values())
    assert not [k for k in out if "propagation_rate" in k or "horizon" in k]


def _scaled_grads(value: float):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale((p * value).sum()).backward()  # value inf: an overflowing scaled gradient
    scaler.unscale_(opt)
    return scaler, opt


def test_scaler_will_skip_when_it_found_inf_after_unscaling():
    assert scaler_will_skip(*_scaled_grads(math.inf))
    assert not scaler_will_skip(*_scaled_grads(1.0))
    scaler, opt = _scaled_grads(1.0)
    assert not scaler_will_skip(torch.amp.GradScaler("cpu", enabled=False), opt)
    assert not scaler_will_skip(None, opt)
    assert not scaler_will_skip(scaler, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))  # not unscaled


def test_per_layer_keys_by_default_only_for_models_of_at_most_16_layers():
    def many(n):
        return StepRecord(step=1, global_norm=1.0, layer_norms={f"block{i}.dense": 0.1 for i in range(n)})

    def layer_keys(layers, n):
        m = TrainerMetrics(layers=layers)
        m.update(many(n))
        return [k for k in m.metrics() if k.startswith("gradwatch/grad_norm/")]

    assert len(layer_keys(None, 16)) == 16
    assert layer_keys(None, 17) == []
    assert len(layer_keys(True, 200)) == 200
    assert layer_keys(False, 3) == []
