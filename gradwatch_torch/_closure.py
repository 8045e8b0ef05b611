"""Optimizers that evaluate a closure inside ``step()``: the record is that step's gradient.

``optimizer.step(closure)`` (LBFGS; SGD, Adam and the other built-ins given a closure;
Lightning's automatic optimization) computes the gradient *inside* ``step()``, after the
step pre-hooks have run. Measured in the pre-hook, gradwatch would read the previous
step's gradient and clip a gradient the closure then overwrites. So when ``step()`` gets a
closure, the pre-hook hands the optimizer a wrapper of it instead (a pre-hook may return
new ``(args, kwargs)``). The wrapper runs the user's closure and, right after the step's
*first* evaluation, measures, decides and acts, before the optimizer reads the gradient.

Per optimizer:

- The ``torch.optim`` built-ins other than LBFGS evaluate the closure once, first thing in
  ``step()``: the clip gradwatch decides is the gradient the optimizer applies, ``skip``
  drops the gradients so the step is a no-op, ``raise`` leaves ``step()`` before anything
  changed.
- LBFGS evaluates the closure up to ``max_eval`` times in one step (its iterations and
  line search), each at new weights. The record is the first evaluation: the gradient at
  the weights the step starts from. The recurrent probes collect during that evaluation
  only, so a profile covers one pass over the sequence. A clipping policy is refused at
  ``watch()`` (:func:`refuse_policy` says why). ``skip`` works: LBFGS finds no gradient and
  returns at once; its evaluation counter is put back, so its state is as it was.
- Any other optimizer that evaluates the closure more than once in a step (SAM-style
  optimizers, say): the first evaluation is measured and clipped, and one warning says
  that the later evaluations reached the optimizer as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gradwatch.errors import ConfigError, NonFiniteGradientError

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch import StepRecord

__all__ = ["ClosureSteps", "refuse_policy"]

logger = logging.getLogger("gradwatch")

_LBFGS_COUNTERS = ("func_evals", "n_iter")


def refuse_policy(optimizer: object, policy: Any, option: object) -> None:
    """Raise ``ConfigError`` for a clipping policy on an optimizer whose step cannot use it."""
    if policy is None or not isinstance(optimizer, torch.optim.LBFGS):
        return
    name = getattr(policy, "name", policy)
    raise ConfigError(
        f"policy={name!r} cannot clip for torch.optim.LBFGS: LBFGS evaluates the closure up to max_eval times in "
        "one step() and builds its line search and curvature pairs from the loss and gradient of every "
        "evaluation, so a clip decided on the first evaluation is not what LBFGS uses, and rescaling each evaluation "
        "would make gradients disagree with the losses its line search compares. Watch LBFGS with policy=None (the "
        "records, alerts and on_nonfinite work), and bound its steps with its own lr, max_iter or "
        "line_search_fn='strong_wolfe'.",
        option="policy",
        value=option,
    )


def _closure_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Any] | None:
    """The closure passed to ``step()`` (``args[0]`` is the optimizer itself)."""
    closure = kwargs.get("closure")
    if closure is None and len(args) > 1:
        closure = args[1]
    return closure if callable(closure) else None


def _replace_closure(args: tuple[Any, ...], kwargs: dict[str, Any], new: Callable[..., Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if kwargs.get("closure") is not None:
        return args, {**kwargs, "closure": new}
    return (args[0], new, *args[2:]), kwargs


class ClosureSteps:
    """The closure side of one watched optimizer.

    ``measure`` is the attachment's measuring point (it may raise
    ``NonFiniteGradientError``); ``collect(flag)`` lets the recurrent probes collect, or
    not, until the end of the step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, measure: Callable[[], StepRecord | None], collect: Callable[[bool], None], clips: bool) -> None:
        self._measure = measure
        self._collect = collect
        self._clips = clips
        self._name = type(optimizer).__name__
        self._lbfgs = isinstance(optimizer, torch.optim.LBFGS)
        self._calls = 0
        self._record: StepRecord | None = None
        self._counters: tuple[Any, dict[str, Any] | None] | None = None
        self._warned = False

    def begin(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Step pre-hook part: the new ``(args, kwargs)`` with the closure wrapped, or
        None when ``step()`` got no closure (then the caller measures now)."""
        self._collect(True)
        self._calls = 0
        self._record = None
        closure = _closure_of(args, kwargs)
        if closure is None:
            return None
        self._counters = _save_counters(optimizer) if self._lbfgs else None

        def measured_closure(*a: Any, **kw: Any) -> Any:
            return self._evaluate(optimizer, closure, a, kw)

        return _replace_closure(args, kwargs, measured_closure)

    def end(self, optimizer: torch.optim.Optimizer) -> None:
        """Step post-hook part: probes collect again; a skipped LBFGS step leaves no trace."""
        self._collect(True)
        if self._counters is not None and self._record is not None and self._record.skipped:
            _restore_counters(optimizer, self._counters)
        self._counters = None
        self._record = None

    def _evaluate(self, optimizer: torch.optim.Optimizer, closure: Callable[..., Any], a: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        self._calls += 1
        if self._calls > 1:
            if self._calls == 2:
                self._warn_later_evaluations()
            try:
                return closure(*a, **kw)
            except BaseException:
                self._collect(True)  # the step ends here: no post-hook will run
                raise
        loss = closure(*a, **kw)
        try:
            self._record = self._measure()
        except NonFiniteGradientError:
            if self._counters is not None:  # "raise": LBFGS state exactly as before the step
                _restore_counters(optimizer, self._counters)
            raise
        # Later evaluations in this step (LBFGS's line search) are not this step's gradient.
        self._collect(False)
        return loss

    def _warn_later_evaluations(self) -> None:
        """Once: a policy's clip or a skip covered the first evaluation only."""
        if self._warned or self._lbfgs:
            return
        rec = self._record
        skipped = rec is not None and rec.skipped
        if not (self._clips or skipped):
            return
        self._warned = True
        acted = "dropped its gradients to skip the step" if skipped else "applied the policy's clip to it"
        logger.warning(
            "gradwatch: %s evaluated the closure more than once in one step(). gradwatch measured the first "
            "evaluation and %s; the later evaluations reach %s unclipped and unchecked. With this optimizer use "
            "policy=None and on_nonfinite='warn', or clip inside the closure. (Shown once.)",
            self._name,
            acted,
            self._name,
        )


def _save_counters(optimizer: torch.optim.Optimizer) -> tuple[Any, dict[str, Any] | None]:
    """LBFGS keeps its evaluation counters in the state of its first parameter."""
    p0 = optimizer.param_groups[0]["params"][0]
    state = optimizer.state.get(p0)
    return p0, None if state is None else {k: state[k] for k in _LBFGS_COUNTERS if k in state}


def _restore_counters(optimizer: torch.optim.Optimizer, saved: tuple[Any, dict[str, Any] | None]) -> None:
    p0, before = saved
    state = optimizer.state.get(p0)
    if state is None:
        return
    if before is None and set(state) <= set(_LBFGS_COUNTERS):
        del optimizer.state[p0]
        return
    for k in _LBFGS_COUNTERS:
        if before is not None and k in before:
            state[k] = before[k]
        else:
            state.pop(k, None)
