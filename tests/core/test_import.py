"""``import gradwatch`` is light and framework-free."""

from __future__ import annotations

import subprocess
import sys


def test_import_gradwatch_loads_no_framework():
    code = (
        "import sys, gradwatch; "
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'jax', 'matplotlib') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_backend_plugin_modules_import_without_their_frameworks():
    # The entry points must really be installed and loaded (an empty manager would pass
    # the framework check vacuously), and loading them must import no framework.
    code = (
        "import sys\n"
        "from gradwatch.plugins import backend_names, make_plugin_manager\n"
        "pm = make_plugin_manager()\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]\n"
        "print(','.join(backend_names(pm)) + '|' + ','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "tf,torch|"


def test_core_suite_really_runs_without_frameworks():
    import os

    if not os.environ.get("GRADWATCH_BLOCK_FRAMEWORKS"):
        import pytest

        pytest.skip("run by `make test` with GRADWATCH_BLOCK_FRAMEWORKS=1")
    import pytest

    with pytest.raises(ImportError):
        import torch  # noqa: F401
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401
