"""Declaring a recurrence gradwatch does not know, and finding the ones it does.

A user (or a package, through its plugin) declares a layer once::

    import gradwatch_torch

    # a diagonal / gated linear recurrence h_t = a_t * h_{t-1} + b_t: say what log a_t is
    gradwatch_torch.register_recurrence(MyScan, decay=lambda m, args, kwargs, out: -F.softplus(m.gate(args[0])),
                                        kind="myscan", gate="forget")
    # a cell called once per timestep, h = cell(x_t, h)
    gradwatch_torch.register_recurrence(MyCell, step=True)

and every watch attached afterwards measures its propagation on profiled steps (the
``"l0"`` recurrence of the layer's ``TemporalProfile``). A package ships the same
declaration through the ``gradwatch`` entry-point group with the hook
``gradwatch_register_recurrences`` (:mod:`gradwatch.hookspecs`), naming its module type
as ``"package.module.Class"`` so that loading the plugin imports nothing::

    from gradwatch.hookspecs import hookimpl
    from gradwatch.through_time.families import Recurrence

    @hookimpl
    def gradwatch_register_recurrences():
        return [Recurrence("mypkg.layers.MyScan", decay=my_decay, kind="myscan")]

Order of matching: declarations registered in the process (the latest first), then the
plugins', then gradwatch's built-in ones (minGRU, minLSTM, Mamba, Mamba-2, xLSTM's mLSTM
and sLSTM, RG-LRU; see :mod:`gradwatch_torch._modern` and :mod:`gradwatch_torch._slstm`).
A module that matches none but is called in a loop within one step (the state it
returned passed back as its next call's state) is probed as a loop cell all the same (:mod:`gradwatch_torch._loops`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from gradwatch.through_time.families import Recurrence

__all__ = ["Recurrence", "declared", "find_modern_probes", "register_recurrence", "unregister_recurrence"]

logger = logging.getLogger("gradwatch")

_REGISTERED: list[Recurrence] = []


def register_recurrence(
    module_type: type | str,
    *,
    decay: Callable[..., Any] | None = None,
    step: bool = False,
    kind: str | None = None,
    gate: str | None = None,
) -> Recurrence:
    """Declare a recurrent module type (see the module docstring); returns the declaration.

    ``decay(module, args, kwargs, output) -> log_a`` of shape (B, T, ...) for a diagonal
    recurrence (called on profiled steps, under ``no_grad``, with batch-shaped tensors cut
    to the probed rows), or a pair (scale (B, T, E), rate (E, N)) for log a = scale * rate
    per (e, n) (Mamba's Δ_t A, cheaper); ``step=True`` for a cell called in a loop. ``kind`` names the
    family in records and alerts ("custom" or "cell" by default); ``gate`` the gate that
    sets the decay. Applies to watches attached from now on.
    """
    rec = Recurrence(module_type, decay=decay, step=step, kind=kind or ("cell" if step else "custom"), gate=gate or ("state" if step else "decay"))
    _REGISTERED.insert(0, rec)
    return rec


def unregister_recurrence(rec: Recurrence) -> None:
    """Undo :func:`register_recurrence` (a declaration not registered is ignored)."""
    if rec in _REGISTERED:
        _REGISTERED.remove(rec)


def declared() -> list[Recurrence]:
    """Every declaration in matching order: the process's, the plugins', the built-ins."""
    from gradwatch_torch._modern import BUILTIN

    plugins: list[Recurrence] = []
    try:
        from gradwatch.plugins import get_plugin_manager
        from gradwatch.through_time.families import declarations

        plugins = declarations(get_plugin_manager())
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the watch
        logger.error("gradwatch: gradwatch_register_recurrences failed (%s: %s); plugin recurrences are ignored.", type(exc).__name__, exc)
    return [*_REGISTERED, *plugins, *BUILTIN]


def find_modern_probes(root: nn.Module, ctx: Any, skip: set[int] | None = None) -> list[Any]:
    """A probe for every declared recurrence under ``root`` (diagonal or loop cell), and a
    loop-detecting probe on every other module of the user's own classes. ``skip``: ids of
    modules probed already (nn.RNN, nn.LSTMCell, ...)."""
    from gradwatch_torch._loops import LoopProbe, candidate
    from gradwatch_torch._modern import SLSTM, DiagonalProbe
    from gradwatch_torch._slstm import SLSTMProbe

    specs = declared()
    skip = set(skip or ())
    probes: list[Any] = []
    covered: set[int] = set()
    for name, m in root.named_modules():
        if id(m) in skip or any(id(p) in covered for p in _ancestors(root, name)):
            continue
        spec = next((s for s in specs if s.matches(type(m))), None)
        label = name or type(m).__name__.lower()
        if spec is not None:
            if spec is SLSTM:
                probes.append(SLSTMProbe(label, m, ctx, spec))
            else:
                probes.append(DiagonalProbe(label, m, ctx, spec) if spec.decay is not None else LoopProbe(label, m, ctx, spec))
            covered.add(id(m))
        elif m is not root and candidate(m):
            probes.append(LoopProbe(label, m, ctx, None))
    return probes


def _ancestors(root: nn.Module, name: str) -> list[nn.Module]:
    """The modules above ``name`` (a declared layer's own submodules are not probed again)."""
    if not name:
        return []
    out, mod = [root], root
    parts = name.split(".") if name else []
    for part in parts[:-1]:
        mod = getattr(mod, part)
        out.append(mod)
    return out
