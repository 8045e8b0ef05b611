"""Construction from the registry: the options' policy, sinks and detectors as objects.

Built-ins and plugins come through the same hooks (``gradwatch_register_*``), so a
plugin's policy or sink is resolved exactly like ``"zclip"`` or ``"jsonl:PATH"``. Every
problem is a :class:`~gradwatch.ConfigError` naming the option, raised before training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from gradwatch.errors import ConfigError
from gradwatch.options import Options
from gradwatch.policies import ZClip, is_policy

if TYPE_CHECKING:
    from gradwatch.sinks import Sink
    from gradwatch.view import MonitorView

__all__ = ["build_detectors", "build_sinks", "registered", "resolve_policy"]


def registered(pm: pluggy.PluginManager, hook: str) -> list[type]:
    """The classes every plugin registers through ``hook`` (lists concatenated)."""
    out: list[type] = []
    for lst in getattr(pm.hook, hook)():
        out.extend(lst or ())
    return out


def resolve_policy(spec: Any, options: Options, pm: pluggy.PluginManager) -> Any:
    """The policy object of ``policy=spec``: None, a registry name, or a policy object."""
    if spec is None:
        return None
    if isinstance(spec, str):
        registry = {getattr(c, "name", None): c for c in registered(pm, "gradwatch_register_policies")}
        cls = registry.get(spec)
        if cls is not None:
            if spec == "fixed":
                return cls(options.max_norm)
            if cls is ZClip:
                return cls(max_norm=options.max_norm if options.max_norm_given else None)
            return cls()
        resolved = pm.hook.gradwatch_resolve_policy(spec=spec, options=options)
        if resolved is not None:
            return resolved
        names = ", ".join(repr(k) for k in sorted(k for k in registry if k))
        raise ConfigError(
            f"gradwatch option policy={spec!r} is not a known policy: expected None, one of {names}, or a policy "
            f"object from gradwatch.policies.",
            option="policy",
            value=spec,
        )
    if is_policy(spec):
        return spec
    resolved = pm.hook.gradwatch_resolve_policy(spec=spec, options=options)
    if resolved is not None:
        return resolved
    raise ConfigError(
        f"gradwatch option policy={spec!r} is not a policy: expected None, a name such as 'zclip', or an object "
        f"with name, init(), update(stats, state, ops), config(), dump_state() and load_state() (see "
        f"gradwatch.policies; unit-wise policies: unit_factor() and decision()).",
        option="policy",
        value=spec,
    )


def build_sinks(specs: Sequence[Any], pm: pluggy.PluginManager, view: MonitorView) -> list[Sink]:
    """One sink per spec: ``"scheme:arg"`` strings through the registry, objects as given."""
    classes: dict[Any, Any] = {getattr(c, "scheme", None): c for c in registered(pm, "gradwatch_register_sinks")}
    sinks: list[Sink] = []
    try:
        for spec in specs:
            if isinstance(spec, str):
                scheme, _, arg = spec.partition(":")
                cls = classes.get(scheme)
                if cls is None:
                    known = ", ".join(sorted(repr(k + (":..." if k in ("jsonl", "tensorboard") else "")) for k in classes if k))
                    raise ConfigError(
                        f"gradwatch option sinks: {spec!r} is not a known sink: expected one of {known} or a sink object.",
                        option="sinks",
                        value=spec,
                    )
                sinks.append(cls.from_spec(arg or None, view))
            elif all(callable(getattr(spec, m, None)) for m in ("write_record", "write_event", "close")):
                sinks.append(spec)
            else:
                raise ConfigError(
                    f"gradwatch option sinks: {spec!r} is neither a sink name nor an object with write_record, "
                    f"write_event and close.",
                    option="sinks",
                    value=spec,
                )
    except BaseException:
        for s in sinks:  # those already built may hold files: give them back
            try:
                s.close()
            except Exception:  # noqa: BLE001, S110 - the ConfigError is what matters
                pass
        raise
    return sinks


def build_detectors(options: Options, pm: pluggy.PluginManager) -> list[Any]:
    """One detector of each registered class, built with the run's options."""
    return [cls(options) for cls in registered(pm, "gradwatch_register_detectors")]
