"""The one version number of every state gradwatch saves, and its check.

``Watch.state_dict()`` nests the monitor's, the policy's and the backend's state; they
all carry this one version, so a saved state is either readable as a whole or refused as
a whole, with one sentence that says which version was found.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradwatch.errors import ConfigError

__all__ = ["STATE_VERSION", "check_version"]

#: Version 2: policies as pure functions with one state layout (gradwatch 0.2).
STATE_VERSION = 2


def check_version(state: Mapping[str, Any], owner: str) -> None:
    """Raise ``ConfigError`` unless ``state`` is a mapping of this version."""
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"{owner}: a saved gradwatch state must be a dict (from state_dict()); received {type(state).__name__}.",
            option="state",
            value=state,
        )
    version = state.get("version")
    if version != STATE_VERSION:
        raise ConfigError(
            f"{owner}: gradwatch state version {version!r} is not supported (this gradwatch reads version "
            f"{STATE_VERSION}); resume with the gradwatch version that saved it.",
            option="state",
            value=version,
        )
