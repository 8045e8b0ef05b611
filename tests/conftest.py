"""Shared test set-up.

With GRADWATCH_BLOCK_FRAMEWORKS=1 (how ``make test`` runs tests/core), torch, TensorFlow,
Keras and JAX cannot be imported at all, so the core suite proves it works from numpy
alone even on a machine where the frameworks are installed.
"""

from __future__ import annotations

import os
import sys

BLOCKED = ("torch", "tensorflow", "keras", "jax")

if os.environ.get("GRADWATCH_BLOCK_FRAMEWORKS"):

    class _BlockFrameworks:
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the core suite runs without frameworks")

    sys.meta_path.insert(0, _BlockFrameworks())
