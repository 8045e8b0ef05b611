"""The plugin manager: built-in plugin, entry points, and isolated hook calls."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import pluggy

from gradwatch import hookspecs

__all__ = ["BUILTIN_NAME", "ENTRY_POINT_GROUP", "backend_names", "get_plugin_manager", "make_plugin_manager"]

ENTRY_POINT_GROUP = "gradwatch"
BUILTIN_NAME = "gradwatch.builtin"
logger = logging.getLogger("gradwatch")

_default: pluggy.PluginManager | None = None


class _Builtin:
    """Registers the core's own policies, sinks and detectors through the same hooks a
    third-party plugin uses, so the built-ins get no special path."""

    @hookspecs.hookimpl
    def gradwatch_register_policies(self) -> list[type]:
        from gradwatch.policies import BUILTIN_POLICIES

        return list(BUILTIN_POLICIES)

    @hookspecs.hookimpl
    def gradwatch_register_sinks(self) -> list[type]:
        from gradwatch.sinks import _builtin_sinks

        return list(_builtin_sinks())

    @hookspecs.hookimpl
    def gradwatch_register_detectors(self) -> list[type]:
        from gradwatch.detectors import BUILTIN_DETECTORS

        return list(BUILTIN_DETECTORS)


def make_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the hookspecs and the built-in plugin registered.

    ``load_entrypoints=True`` also loads the backends installed under the entry-point
    group ``gradwatch`` (their modules import no framework). Tests pass False and register
    their own small plugins.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(_Builtin(), name=BUILTIN_NAME)
    if load_entrypoints:
        load_entrypoints_into(pm)
    return pm


def load_entrypoints_into(pm: pluggy.PluginManager) -> None:
    """Register every plugin module of the entry-point group ``gradwatch``.

    Unlike ``pm.load_setuptools_entrypoints``, one broken backend does not stop the
    others: it is skipped with a WARNING that names it and the error.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            logger.warning("backend plugin %r (%s) could not be loaded: %s: %s", ep.name, ep.value, type(exc).__name__, exc)
            continue
        pm.register(plugin, name=ep.name)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, created (and entry points loaded) on first use, so
    ``import gradwatch`` itself loads nothing."""
    global _default
    if _default is None:
        _default = make_plugin_manager(load_entrypoints=True)
    return _default


def backend_names(pm: pluggy.PluginManager) -> list[str]:
    """Names of the plugins that implement ``gradwatch_attach`` (the backends)."""
    names = []
    for impl in pm.hook.gradwatch_attach.get_hookimpls():
        names.append(plugin_label(pm, impl.plugin))
    return sorted(set(names))


#: The framework each built-in backend needs (checked with importlib.util.find_spec,
#: which imports nothing). A plugin may declare its own with a module-level
#: ``GRADWATCH_REQUIRES = "module"``.
_FRAMEWORKS = {"torch": "torch", "tf": "keras"}


def backend_requirement(pm: pluggy.PluginManager, name: str) -> str | None:
    """The framework module backend ``name`` needs, if known."""
    plugin = pm.get_plugin(name)
    declared = getattr(plugin, "GRADWATCH_REQUIRES", None)
    return declared if isinstance(declared, str) else _FRAMEWORKS.get(name)


def installed_backends_text(pm: pluggy.PluginManager) -> str:
    """The backends that could attach, for an error message: "torch, tf", or
    "torch (tf: keras is not installed)", or "none importable (...)" when every
    registered backend's framework is missing."""
    import importlib.util

    usable, missing = [], []
    for name in backend_names(pm):
        need = backend_requirement(pm, name)
        try:
            found = need is None or importlib.util.find_spec(need) is not None
        except (ImportError, ValueError):
            found = False
        (usable if found else missing).append(f"{name}: {need} is not installed" if not found else name)
    install = "pip install 'gradwatch[torch]' or 'gradwatch[tf]'"
    if not usable and not missing:
        return f"none ({install})"
    if not usable:
        return f"none importable ({'; '.join(missing)}: {install})"
    return ", ".join(usable) + (f" ({'; '.join(missing)})" if missing else "")


def plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    """A readable name: the entry-point name ("torch"), else the module or class name
    (pluggy names plugins registered without a name by their id)."""
    name = pm.get_name(plugin)
    if name and not name.isdigit():
        return name
    return str(getattr(plugin, "__name__", None) or type(plugin).__name__)


class IsolatedCaller:
    """Calls an announcing hook implementation by implementation, so one plugin that
    raises is disabled (after one ERROR line) without stopping the others or reaching
    the training loop."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.disabled: set[int] = set()

    def call(self, hook_name: str, **kwargs: Any) -> None:
        caller = getattr(self.pm.hook, hook_name)
        impls = caller.get_hookimpls()
        if not impls:
            return
        for impl in impls:
            if id(impl.plugin) in self.disabled:
                continue
            fn: Callable[..., Any] = impl.function
            try:
                fn(*[kwargs[a] for a in impl.argnames])
            except Exception as exc:
                self.disabled.add(id(impl.plugin))
                name = plugin_label(self.pm, impl.plugin)
                logger.error(
                    "plugin %r raised %s in %s; it is disabled for the rest of this run. Training goes on.",
                    name,
                    f"{type(exc).__name__}: {exc}",
                    hook_name,
                    exc_info=sys.exc_info() if logger.isEnabledFor(logging.DEBUG) else None,
                )
