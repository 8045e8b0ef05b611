"""The PyTorch trainer callbacks passed to Keras' ``model.fit`` say which callback Keras needs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "module, trainer, says",
    [
        ("gradwatch_torch.lightning", "lightning", "Lightning"),
        ("gradwatch_torch.transformers", "transformers", "Hugging Face"),
    ],
)
def test_a_torch_trainer_callback_given_to_keras_fit_names_the_keras_callback(module, trainer, says):
    for needed in ("keras", trainer):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"{needed} is not installed")
    # Keras on its torch backend, in a process of its own (importing Keras here would pick a backend for
    # the whole test session). Before the fix: AttributeError "no attribute 'set_model'" / "'on_batch_end'".
    code = (
        "import numpy as np, keras\n"
        f"from {module} import GradWatchCallback\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]); m.compile('sgd', 'mse')\n"
        "try:\n"
        "    m.fit(np.zeros((4, 3)), np.zeros((4, 1)), epochs=1, verbose=0, callbacks=[GradWatchCallback()])\n"
        "except TypeError as e:\n"
        "    print('TypeError:', e)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("TypeError:")]
    assert "gradwatch_tf.GradWatchCallback" in line and says in line and module in line
