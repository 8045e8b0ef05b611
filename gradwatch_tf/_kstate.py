"""The portable step's state and arithmetic (:mod:`gradwatch_tf.portable`): gradwatch's
Keras variables, a core policy run with ``keras.ops``, what the step needs, clipping."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch import Layout
from gradwatch.policies import ClipStats
from gradwatch_tf._kops import KERAS_OPS, widest

__all__ = ["DEFAULT_WATCH_CAPACITY", "JaxState", "PortablePolicy", "clip", "known_layers", "traced"]

#: Ring rows for ``gradwatch.watch`` when nothing reads after each step.
DEFAULT_WATCH_CAPACITY = 256

RECURRENT = ("SimpleRNN", "LSTM", "GRU", "RNN", "Bidirectional")


def known_layers(model: Any) -> dict[str, str]:
    """Paths of the model's layers (nested models walked into) and their class names."""
    out: dict[str, str] = {}

    def visit(layer: Any) -> None:
        for sub in getattr(layer, "_layers", []) or []:
            if isinstance(sub, keras.Model):
                visit(sub)
            elif isinstance(getattr(sub, "path", None), str):
                out[sub.path] = type(sub).__name__

    visit(model)
    return out


def _value(v: Any) -> Any:
    return v.value if hasattr(v, "value") else v


def traced(x: Any) -> bool:
    """True while ``x`` is a JAX tracer (inside ``jax.jit``): no host reads there."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return isinstance(x, jax.core.Tracer)


class Vars:
    """gradwatch's in-step state: Keras variables, created outside any trace."""

    def __init__(self) -> None:
        self.all: list[Any] = []

    def make(self, initial: Any, dtype: str, name: str) -> Any:
        arr = np.asarray(initial)
        v = keras.Variable(
            arr.astype(widest(dtype)) if dtype != "bool" else arr.astype(bool),
            dtype=widest(dtype),
            trainable=False,
            name=name,
        )
        self.all.append(v)
        return v


class PortablePolicy:
    """A core policy (:mod:`gradwatch.policies`) run in the step with ``keras.ops``, its
    state in Keras variables (one per field of the policy's state dataclass)."""

    def __init__(self, policy: Any, make: Callable[[Any, str, str], Any]) -> None:
        self.policy = policy
        init = policy.init()
        self._cls = type(init)
        self._vars: dict[str, Any] = {}
        for f in dataclasses.fields(init):
            arr = np.asarray(getattr(init, f.name))
            kind = "bool" if arr.dtype == bool else ("int64" if np.issubdtype(arr.dtype, np.integer) else "float64")
            self._vars[f.name] = make(arr, kind, f"gradwatch_{policy.name}_{f.name}")

    def run(self, norm: Any) -> tuple[Any, Any]:
        clip, new = self.policy.update(
            ClipStats(norm), self._cls(**{k: v.value for k, v in self._vars.items()}), KERAS_OPS
        )
        for k, v in self._vars.items():
            v.assign(ops.cast(getattr(new, k), v.dtype))
        return clip.threshold, clip.scale

    def state_dict(self) -> dict[str, Any]:
        values = {}
        for k, v in self._vars.items():
            arr = np.asarray(keras.ops.convert_to_numpy(v.value))
            ref = np.asarray(getattr(self.policy.init(), k))
            values[k] = arr.astype(ref.dtype)
        return self.policy.dump_state(self._cls(**values))  # type: ignore[no-any-return]

    def load_state_dict(self, state: Any) -> None:
        st = self.policy.load_state(state)
        for k, v in self._vars.items():
            v.assign(np.asarray(getattr(st, k)).astype(keras.backend.standardize_dtype(v.dtype)))


@dataclasses.dataclass
class Graph:
    """What the step needs (the names :class:`RingReader` reads)."""

    layout: Layout
    n_params: int
    index: dict[int, int]
    path_index: dict[str, int]
    step_var: Any
    halted: Any
    active: Any
    ring: Any
    capacity: int
    on_nonfinite: str
    policy: PortablePolicy | None = None
    unitwise: Any = None
    profile_ok: bool = True


def _unitwise_norm(x: Any) -> Any:
    """Norm of each unit (a column of a Keras ``(in, out)`` kernel; a vector is one unit),
    broadcastable to ``x`` (AGC, Brock et al. 2021)."""
    x = ops.cast(x, "float32")
    nd = len(ops.shape(x))
    if nd <= 1:
        return ops.ones_like(x) * ops.sqrt(ops.sum(ops.square(x)))
    return ops.sqrt(ops.sum(ops.square(x), axis=tuple(range(nd - 1)), keepdims=True))


def clip(
    g: Any, grads: list[Any], tvars: list[Any], idx: list[Any], norm: Any, active: Any
) -> tuple[Any, Any, list[Any], list[Any]]:
    f = widest("float64")
    one = ops.ones((), f)
    if g.unitwise is not None:
        pol = g.unitwise
        new_grads: list[Any] = []
        per_clipped: list[Any] = [ops.zeros((), f)] * g.n_params
        after_each = []
        for j, (x, v) in enumerate(zip(grads, tvars)):
            if x is None:
                new_grads.append(x)
                continue
            factor = pol.unit_factor(_unitwise_norm(_value(v)), _unitwise_norm(x), KERAS_OPS)
            factor = ops.where(active, factor, ops.ones_like(factor))
            new_grads.append(x * ops.cast(factor, keras.backend.standardize_dtype(x.dtype)))
            a = ops.cast(ops.sum(ops.square(ops.cast(x, "float32") * factor)), f)
            after_each.append(a)
            if idx[j] is not None:
                per_clipped[idx[j]] = a
        after = ops.sqrt(ops.sum(ops.stack(after_each))) if after_each else ops.zeros((), f)
        clip = pol.decision(norm, after, KERAS_OPS)
        return clip.threshold, clip.scale, new_grads, per_clipped
    if g.policy is not None:
        thr, scale = g.policy.run(norm)
        scale = ops.where(active, ops.cast(scale, f), one)
        return (
            thr,
            scale,
            [x * ops.cast(scale, keras.backend.standardize_dtype(x.dtype)) if x is not None else x for x in grads],
            [],
        )
    return ops.convert_to_tensor(np.nan, f), one, grads, []


class JaxState:
    """On JAX, gradwatch's variables travel through a ``fit``'s jitted state as the
    optimizer's (a mixin of :class:`gradwatch_tf.portable.PortableAttachment`)."""

    _in_optimizer: bool
    _ready: bool
    _outer: Any
    _vars: Vars
    _model_ref: Any

    def enter_optimizer(self) -> None:
        """On JAX, append gradwatch's variables to the (outer) optimizer's, so a jitted
        step carries them in its state; :meth:`leave_optimizer` takes them out."""
        if keras.backend.backend() != "jax" or self._in_optimizer or not self._ready:
            return
        store = self._outer._variables
        store.extend(self._vars.all)
        self._in_optimizer = True

    def leave_optimizer(self) -> None:
        if not self._in_optimizer:
            return
        values = [self._current(v) for v in self._vars.all]  # while the fit's state has them
        self._in_optimizer = False
        store = self._outer._variables
        ours = {id(v) for v in self._vars.all}
        store[:] = [v for v in store if id(v) not in ours]
        for v, value in zip(self._vars.all, values):  # a purged value (JAX fit) comes back
            if value is not None:
                v.assign(value)

    def _current(self, v: Any) -> Any:
        """The variable's value now, on the host (see :meth:`_live`)."""
        value = self._live(v)
        return None if value is None else np.asarray(keras.ops.convert_to_numpy(value))

    def _live(self, v: Any) -> Any:
        """The variable's value now, left where it is (a device array): in a JAX ``fit``
        the live one is in the model's ``_jax_state`` (the variable itself is stale or
        purged until the fit syncs)."""
        model = self._model_ref()
        state = getattr(model, "_jax_state", None) if model is not None else None
        if self._in_optimizer and state and not getattr(model, "_jax_state_synced", True):
            values = state.get("optimizer_variables")
            if values is not None:
                for ref, val in zip(self._outer.variables, values):
                    if ref is v:
                        return val
        try:
            return v.value
        except Exception:  # noqa: BLE001 - a purged variable (no value) outside a fit
            return None
