"""The tf plugin module loads without TensorFlow and recognises only Keras models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")

from gradwatch.monitor import Monitor
from gradwatch_tf import plugin

ROOT = Path(__file__).resolve().parents[2]


def test_plugin_import_does_not_import_tensorflow():
    code = "import sys, gradwatch_tf, gradwatch_tf.plugin; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


def test_hook_declines_what_is_not_a_keras_model():
    assert plugin.gradwatch_attach(target=object(), optimizer=None, monitor=Monitor(sinks=["memory"])) is None
