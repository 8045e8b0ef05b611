"""The parameters a PyTorch watch follows, kept up to date as the model and optimizer change.

Users change the parameter set while training: a backbone unfrozen and handed to the
optimizer with ``optimizer.add_param_group``, a new head registered on the model, a layer
frozen with ``requires_grad_(False)``, a branch the batch does not reach. gradwatch follows
all of it:

- The *bound* set is every parameter of the model, frozen ones included (so unfreezing
  needs no rebind), then every parameter of the optimizer's groups that the model does
  not hold, named ``param_groups[g].params[i]`` (the place the user put it).
- At each step a bound parameter is *present* when it requires grad and has a gradient
  (:meth:`gradwatch_torch._tensors.GradGroups.grads`); absent ones are left out of the
  record, the global norm, the clip and the checks, never counted as zero.
- A change of the bound set is noticed without walking the model at each step: two global
  registration hooks of ``torch.nn`` mark the set stale when a parameter or a submodule is
  registered on a module of the watched tree; the optimizer's groups are compared by a
  signature of a few integers; and every :data:`FULL_CHECK_EVERY` steps the model is
  walked anyway, which also catches what no hook announces (``del model.head``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["FULL_CHECK_EVERY", "ParamSet", "describe_change", "drop_grads", "sparse_grad_positions", "unwrap_model"]

#: Steps between two walks of the model that do not wait for a hook. A walk costs about
#: a microsecond per parameter; every 1000 steps it is lost in the noise of any step.
FULL_CHECK_EVERY = 1000


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose ``named_parameters()`` names the user knows.

    ``DistributedDataParallel`` / ``DataParallel`` keep it in ``.module``;
    ``torch.compile`` in ``._orig_mod``. Their own names would carry a ``module.`` or
    ``_orig_mod.`` prefix the user never wrote.
    """
    for _ in range(8):
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(getattr(model, "module", None), nn.Module):
            model = cast(nn.Module, model.module)
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = cast(nn.Module, model._orig_mod)
        else:
            break
    return model


def sparse_grad_positions(root: nn.Module, named: Sequence[tuple[str, Any]]) -> list[int]:
    """Positions of parameters whose gradient is sparse (``nn.Embedding(sparse=True)``)."""
    ids = {id(m.weight) for m in root.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "sparse", False)}
    return [i for i, (_, p) in enumerate(named) if id(p) in ids]


def _optimizer_signature(optimizer: torch.optim.Optimizer | None) -> tuple[int, ...]:
    """A few integers that change when a group or a parameter list of ``optimizer`` does
    (``add_param_group`` appends a group; ``load_state_dict`` replaces the lists)."""
    if optimizer is None:
        return ()
    groups = optimizer.param_groups
    sig = [id(groups), len(groups)]
    for g in groups:
        params = g["params"]
        sig.append(id(params))
        sig.append(len(params))
    return tuple(sig)


class ParamSet:
    """The bound parameters of one watch and the cheap test that they are still current.

    Holds the model and optimizer weakly; :meth:`collect` lists the bound set,
    :meth:`stale` (the per-step test) says whether it may have changed since.
    """

    def __init__(self, root: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self._root = weakref.ref(root)
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else None
        self._tree: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._signature: tuple[int, ...] = ()
        self._identity: list[tuple[str, int]] = []
        self._countdown = FULL_CHECK_EVERY
        self._dirty = True
        me = weakref.ref(self)

        def on_register(module: nn.Module, name: str, value: Any) -> None:
            # Runs for every registration in the process: one set lookup, nothing else.
            this = me()
            if this is not None and not this._dirty and module in this._tree:
                this._dirty = True

        hooks = torch.nn.modules.module
        self._handles = [
            hooks.register_module_parameter_registration_hook(on_register),
            hooks.register_module_module_registration_hook(on_register),
        ]

    def remove(self) -> None:
        """Remove the global registration hooks; idempotent."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def stale(self) -> bool:
        """May the bound set have changed since :meth:`collect`? (the hot path: a flag, a
        counter and the optimizer's signature; a few hundred nanoseconds)"""
        if self._dirty:
            return True
        self._countdown -= 1
        if self._countdown <= 0:
            return True
        opt = self._optimizer() if self._optimizer is not None else None
        return _optimizer_signature(opt) != self._signature

    def collect(self) -> tuple[list[tuple[str, Tensor]], bool]:
        """The bound set now, and whether it differs from the previous one (by name or by
        tensor: replacing ``model.fc.weight`` with a new Parameter is a change)."""
        root = self._root()
        if root is None:
            return [], False
        named: list[tuple[str, Tensor]] = list(root.named_parameters())
        held = {id(p) for _, p in named}
        opt = self._optimizer() if self._optimizer is not None else None
        if opt is not None:
            for gi, group in enumerate(opt.param_groups):
                for pi, p in enumerate(group["params"]):
                    if id(p) not in held:
                        held.add(id(p))
                        named.append((f"param_groups[{gi}].params[{pi}]", p))
        self._tree = weakref.WeakSet(root.modules())
        self._signature = _optimizer_signature(opt)
        self._countdown = FULL_CHECK_EVERY
        self._dirty = False
        identity = [(n, id(p)) for n, p in named]
        changed = identity != self._identity
        self._identity = identity
        return named, changed


def describe_change(before: list[str], after: list[str], limit: int = 4) -> str:
    """``"+2 (head2.weight, head2.bias), -0"``: what a rebind added and removed."""

    def part(sign: str, names: list[str]) -> str:
        if not names:
            return f"{sign}0"
        shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
        return f"{sign}{len(names)} ({shown})"

    old, new = set(before), set(after)
    added = [n for n in after if n not in old]
    removed = [n for n in before if n not in new]
    return f"{part('+', added)}, {part('-', removed)}"


def drop_grads(params: Sequence[Tensor], optimizer: torch.optim.Optimizer | None) -> None:
    """Make the coming optimizer step a no-op: every gradient becomes None.

    Zeroing is not enough: weight decay and momentum would still move the weights and
    Adam would still advance its state; with ``grad is None`` every built-in optimizer
    skips the parameter entirely.
    """
    for p in params:
        p.grad = None
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
