"""The plumbing of the recurrent probes: hooks that copies of a model drop, the replay's
schedule and precision rules, and small helpers for module calls.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "REPLAY_FREE",
    "REPLAY_SHARE",
    "TOLERANCE_FULL",
    "TOLERANCE_LOW",
    "CleanCopies",
    "Hook",
    "ProbeContext",
    "capturing",
    "dense_parameter_count",
    "one_thread",
    "outside_backward",
    "probe_input",
    "replay_every",
    "split_call",
    "tolerance",
    "with_input",
]

from gradwatch.through_time.plan import REPLAY_FREE, REPLAY_SHARE

#: Largest deviation of the replayed top layer from the layer's own output (relative to
#: the output's largest value) before the replay is declared wrong. A layer that ran in
#: 16 bits (autocast: the fused kernels' inner products follow it even when the output is
#: float32; ``.half()``) differs from the float32 replay by about 1e-2; a wrong replay
#: (dropout masks not those the layer drew, say) by 0.1 to 1.
TOLERANCE_FULL = 1e-3
TOLERANCE_LOW = 0.05


def capturing(*submodules: str) -> Callable[[Any], Any]:
    """Mark a decay as reading the output of the first of ``submodules`` the layer has,
    when the forward called it (as ``inner=``: its probed rows), instead of recomputing it
    from the layer's input (:class:`gradwatch_torch._modern.DiagonalProbe`)."""

    def mark(fn: Any) -> Any:
        fn.capture = submodules
        return fn

    return mark


def tolerance(out_dtype: torch.dtype, device_type: str) -> float:
    """The self-check's tolerance for a layer whose output has ``out_dtype``, called now
    (inside its forward, so an enclosing autocast is still on)."""
    low = out_dtype in (torch.float16, torch.bfloat16)
    try:
        low = low or (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in (torch.float16, torch.bfloat16))
    except (RuntimeError, TypeError):  # a device type without autocast
        pass
    return TOLERANCE_LOW if low else TOLERANCE_FULL


@contextlib.contextmanager
def one_thread(device_type: str) -> Iterator[None]:
    """Run the replay with one intra-op thread on the CPU, restored right after.

    The replay is a chain of small products and elementwise operations: measured on the
    benchmark shapes, two threads run it 2-5 times slower than one (thread hand-offs
    dominate, worse on a loaded machine). Costs a microsecond; other Python threads using
    torch during the replay would run single-threaded for its duration.
    """
    threads = torch.get_num_threads()
    if device_type != "cpu" or threads <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def outside_backward() -> bool:
    getter = getattr(torch._C, "_current_graph_task_id", None)
    return getter is None or getter() == -1


def probe_input(x: Tensor, on_grad: Callable[[Tensor], None]) -> Tensor:
    """Return a tensor equal to ``x`` whose gradient is reported to ``on_grad``.

    A raw input (no grad) is replaced by ``x.detach().requires_grad_()``: nothing upstream
    needs its gradient, and the user's tensor keeps ``.grad`` None. An input that already
    requires grad (an embedding's output) goes through ``view_as`` so the hook sees the
    gradient coming from this layer only, not from other consumers of the same tensor;
    a view's backward is the identity, so upstream gradients stay bitwise unchanged.
    """
    probe = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
    probe.register_hook(on_grad)
    return probe


class Hook:
    """A module hook calling one method of a probe, held weakly.

    Copies of the module normally leave it out altogether (:class:`CleanCopies`). Should
    one be pickled or deep-copied anyway (a module class with its own ``__deepcopy__``),
    it becomes ``functools.partial(sys.audit, "gradwatch.detached_hook")``, a
    standard-library no-op that accepts any hook arguments and returns None.
    """

    __slots__ = ("_method", "_probe")

    def __init__(self, probe: Any, method: str) -> None:
        self._probe = weakref.ref(probe)
        self._method = method

    def __call__(self, *args: Any) -> Any:
        probe = self._probe()
        return None if probe is None else getattr(probe, self._method)(*args)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (functools.partial, (sys.audit, "gradwatch.detached_hook"))


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class CleanCopies:
    """While a module is watched, its copies leave gradwatch out.

    Installed as the instance attribute ``module.__reduce_ex__``, which ``pickle``,
    ``copy.deepcopy`` / ``copy.copy`` (and so ``torch.save(model)`` and
    ``AveragedModel``) look up before the class's: it returns the class's own reduction
    with gradwatch's hook entries and itself removed from the state. A copy thus carries
    nothing of the watch: it loads where gradwatch is not installed and with
    ``torch.load(weights_only=True)`` and the user's own ``safe_globals``, and using it
    never touches the original's records. Removed at ``close()``; the module itself is
    otherwise untouched. One object serves every watch of the module (each adds and
    removes its own hook ids).
    """

    __slots__ = ("__weakref__", "_ids", "_module")

    def __init__(self, module: nn.Module) -> None:
        self._module = weakref.ref(module)
        self._ids: set[int] = set()

    @classmethod
    def add(cls, module: nn.Module, ids: list[int]) -> Callable[[], None]:
        """Leave the hooks ``ids`` out of ``module``'s copies; returns the undo."""
        got = module.__dict__.get("__reduce_ex__")
        clean = got if isinstance(got, CleanCopies) else cls(module)
        clean._ids.update(ids)
        module.__dict__["__reduce_ex__"] = clean
        ref = weakref.ref(clean)

        def undo() -> None:
            mine = ref()
            owner = mine._module() if mine is not None else None
            if mine is None or owner is None:
                return
            mine._ids.difference_update(ids)
            if not mine._ids and owner.__dict__.get("__reduce_ex__") is mine:
                del owner.__dict__["__reduce_ex__"]

        return undo

    def __call__(self, protocol: int) -> Any:
        module = self._module()
        if module is None:  # cannot happen while the module is being copied
            raise TypeError("gradwatch: the module of this reduction is gone")
        rv = type(module).__reduce_ex__(module, protocol)
        if not isinstance(rv, tuple) or len(rv) < 3 or not isinstance(rv[2], dict):
            return rv  # a class with its own reduction: gradwatch's hooks copy as no-ops (Hook)
        state = dict(rv[2])
        state.pop("__reduce_ex__", None)
        for key in _HOOK_DICTS:
            hooks = state.get(key)
            if isinstance(hooks, dict) and any(k in self._ids for k in hooks):
                state[key] = type(hooks)((k, v) for k, v in hooks.items() if k not in self._ids)
        return (rv[0], rv[1], state, *rv[3:])


@dataclass(frozen=True)
class ProbeContext:
    """What probes need to know about the watch."""

    due: Callable[[], bool]  # is the coming optimizer step profiled?
    step: Callable[[], int]  # its number (from 1)
    every: int  # profile_every
    model_params: int  # trainable parameters outside embeddings (the step's cost proxy)
    replay_every: int | None = None  # the option: every n-th profiled step, None: the cost model


def replay_every(flops: float, model_params: int, tokens: int, profile_every: int = 1) -> int:
    """Replay on every n-th profiled step (:func:`gradwatch.through_time.plan.replay_every`),
    a training step estimated at 6 x parameters x tokens flops (embedding tables excluded),
    profiles ``profile_every`` steps apart."""
    from gradwatch.through_time.plan import replay_every as every

    return every(flops, 6.0 * max(model_params, 1) * max(tokens, 1), profile_every)


def split_call(args: tuple, kwargs: dict) -> tuple[Any, Any, bool] | None:
    """(input, hx, input given by keyword) of a recurrent module call."""
    if args:
        return args[0], (args[1] if len(args) > 1 else kwargs.get("hx")), False
    if "input" in kwargs:
        return kwargs["input"], kwargs.get("hx"), True
    return None


def with_input(args: tuple, kwargs: dict, new_x: Any, by_keyword: bool) -> tuple[tuple, dict]:
    if not by_keyword:
        return (new_x, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["input"] = new_x
    return args, kwargs


def dense_parameter_count(root: nn.Module) -> int:
    """Trainable parameters outside embedding tables: 6 x this x tokens estimates a
    training step's flops (a lookup costs nothing like a matrix product)."""
    tables = {id(m.weight) for m in root.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    return sum(p.numel() for p in root.parameters() if p.requires_grad and id(p) not in tables)
