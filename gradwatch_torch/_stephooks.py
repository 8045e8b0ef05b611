"""When a PyTorch watch measures: once per real ``optimizer.step()``, and a word when never.

gradwatch measures inside ``optimizer.step()`` through a step pre-hook, so the user's loop
does not change and only real optimizer steps are measured (micro-batches of gradient
accumulation are not). :class:`OptimizerHooks` installs the pre- and post-hook and makes
sure a step is measured once even when a subclass's ``step()`` calls ``super().step()``.
:class:`BackwardCounter` counts backward passes until the first measured step, so a watch
whose steps never come (no optimizer given, no ``watch.step()`` call) says so instead of
silently recording nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch import HandleGroup
from gradwatch_torch._closure import ClosureSteps

__all__ = ["NO_STEP_WARNING_AFTER", "BackwardCounter", "OptimizerHooks"]

#: Backward passes without a measured step after which a watch says it records nothing.
NO_STEP_WARNING_AFTER = 16


def _on_stack(frame: Any, start: Any) -> bool:
    """Is ``frame`` one of ``start``'s callers (or ``start`` itself)?"""
    f = start
    for _ in range(64):
        if f is None:
            return False
        if f is frame:
            return True
        f = f.f_back
    return False


class OptimizerHooks:
    """The step pre-hook that measures (or hands the closure wrapper over) and the post-hook
    that ends the step; both go into ``handles``, removed with them."""

    def __init__(self, optimizer: torch.optim.Optimizer, closures: ClosureSteps, measure: Callable[[], Any], handles: HandleGroup) -> None:
        self._closures = closures
        self._measure = measure
        self._outer_step: Any = None  # the frame of the optimizer.step() call being measured
        handles.add(optimizer.register_step_pre_hook(self._before))
        handles.add(optimizer.register_step_post_hook(self._after))

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        """Step pre-hook: measure now, or, when step() got a closure, after its first evaluation.

        torch wraps ``step`` per class: a subclass whose ``step()`` calls ``super().step()``
        runs the step hooks twice when the parent's ``step`` was wrapped too (an instance
        of the parent was created earlier). Only the outermost call of a real step is
        measured: the frame of the torch wrapper that called us is kept until that call's
        post-hook, and a pre-hook called while that frame is still on the stack is the
        nested ``super().step()``. (A step that raised leaves a stale frame; it is not on
        the stack of the next step, so that step is measured.)
        """
        caller = sys._getframe(1)  # torch's step wrapper
        outer = self._outer_step
        if outer is not None and _on_stack(outer, caller.f_back):
            return None
        self._outer_step = caller
        replaced = self._closures.begin(optimizer, args, kwargs)
        if replaced is None:
            self._measure()
        return replaced

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._outer_step is not sys._getframe(1):
            return  # the nested super().step() of a subclass: the outer call ends the step
        self._outer_step = None
        self._closures.end(optimizer)


class BackwardCounter:
    """Backward passes before the first measured step: one hook on one parameter's gradient
    accumulation, removed at the first step (or after the warning)."""

    def __init__(self, root: nn.Module, has_optimizer: bool, no_step_yet: Callable[[], bool], warn: Callable[[str], None]) -> None:
        self.count = 0
        self._has_optimizer = has_optimizer
        self._no_step_yet = no_step_yet
        self._warn = warn
        self._hook: Any = None
        param = next((p for p in root.parameters() if p.requires_grad), None)
        register = getattr(param, "register_post_accumulate_grad_hook", None)
        if register is not None:
            self._hook = register(self._on_backward)

    @property
    def active(self) -> bool:
        return self._hook is not None

    def _on_backward(self, param: Tensor) -> None:
        self.count += 1
        if self.count == NO_STEP_WARNING_AFTER and self._no_step_yet():
            self._warn(self.message("after"))
            self.stop()

    def stop(self) -> None:
        handle, self._hook = self._hook, None
        if handle is not None:
            handle.remove()

    def message(self, when: str) -> str:
        if not self._has_optimizer:
            how = "pass the optimizer (gradwatch.watch(model, optimizer)) or call watch.step() after backward()"
        else:
            how = "the watched optimizer's step() was never called; pass the optimizer that trains this model"
        return f"gradwatch recorded 0 steps {when} {self.count} backward passes: {how}."
