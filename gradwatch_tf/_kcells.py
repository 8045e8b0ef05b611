"""The recurrences of Keras' own cells in ``keras.ops``, for the replay
(:mod:`gradwatch_tf._kreplay`): every Keras backend (JAX inside ``jit``, torch, TensorFlow
in graph and under XLA).

Written from keras/src/layers/rnn: one class per cell (SimpleRNNCell, LSTMCell, GRUCell
with ``reset_after`` either way), each giving the forward step with the factors of its
state Jacobian, and the closed-form vector-Jacobian product (probe rows carried back) and
Jacobian-vector product (tangents carried forward) built from those factors. Any leading
shape: a state part is [b, u] in the forward loop, probe rows and tangents [b, k, u]
against factors [b, 1, u]. Activations: closed forms for tanh / sigmoid / relu / linear;
on TensorFlow any other elementwise one, its derivative by autodiff.

Dropout: the cell's own masks of the call (input and recurrent, one per gate where the
cell draws one per gate, ``implementation=1``) are applied exactly as the cell does, when
the caller captured them (TensorFlow's forward-pass hook does: :func:`dropout_masks`).
Without them a layer with dropout in training is left unmeasured, never measured wrong
(:func:`supported`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gradwatch_tf._knumpy import backend, ops

__all__ = ["GATE_ORDER", "KCELLS", "KCell", "capture_dropout", "dropout_masks", "gate_blocks", "has_dropout", "supported"]

#: Keras' gate order in the columns of ``recurrent_kernel`` (units, k * units).
GATE_ORDER: dict[str, tuple[str, ...]] = {
    "LSTMCell": ("i", "f", "c", "o"),
    "GRUCell": ("z", "r", "h"),
    "SimpleRNNCell": ("",),
}


def gate_blocks(cells: list[Any]) -> list[tuple[str, Any, int, int]]:
    """(name, recurrent kernel, first column, end column) of every gate block of the
    cells' recurrent kernels, named ``<kernel path>[f]`` (a SimpleRNN's without a suffix):
    the blocks whose largest singular values the spectral norms are, on every backend."""
    out = []
    for cell in cells:
        kernel, gates = getattr(cell, "recurrent_kernel", None), GATE_ORDER.get(type(cell).__name__)
        if kernel is None or gates is None or len(kernel.shape) != 2:
            continue
        units = int(kernel.shape[0])
        if int(kernel.shape[1]) != units * len(gates):
            continue
        out += [(kernel.path + (f"[{g}]" if g else ""), kernel, i * units, (i + 1) * units) for i, g in enumerate(gates)]
    return out


def _tanh(z: Any) -> tuple[Any, Any]:
    y = ops.tanh(z)
    return y, 1.0 - y * y


def _sigmoid(z: Any) -> tuple[Any, Any]:
    y = ops.sigmoid(z)
    return y, y * (1.0 - y)


def _relu(z: Any) -> tuple[Any, Any]:
    return ops.relu(z), ops.cast(z > 0, "float32")


def _linear(z: Any) -> tuple[Any, Any]:
    return z, ops.ones_like(z)


#: Activations replayed, by the Keras function's name: value and derivative.
FORMS: dict[str, Callable[[Any], tuple[Any, Any]]] = {
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "relu": _relu,
    "linear": _linear,
}


def _form(act: Any) -> Callable[[Any], tuple[Any, Any]] | None:
    if act is None:
        return _linear
    form = FORMS.get(getattr(act, "__name__", ""))
    if form is None and callable(act) and backend() == "tensorflow":
        return _autodiff(act)
    return form


def _autodiff(act: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, Any]]:
    """act(z) and its elementwise derivative by TensorFlow's autodiff (the gradient of
    sum(act(z))): any activation the cell was given. TensorFlow only: backend code because
    keras.ops has no derivative, and only there was it supported before."""

    def form(z: Any) -> tuple[Any, Any]:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(z)
            y = tf.cast(act(z), tf.float32)
        g = tape.gradient(y, z)
        return y, tf.zeros_like(z) if g is None else g

    return form


def _weight(v: Any) -> Any:
    return ops.stop_gradient(ops.cast(getattr(v, "value", v), "float32"))


def supported(cell: Any, training: bool, *, masks: bool = False) -> bool:
    """The replay knows this cell's Jacobian exactly: one of Keras' own cells, activations
    it can differentiate, and, in a training call with dropout, the call's masks
    (``masks``: the caller captures them)."""
    model = KCELLS.get(type(cell).__name__)
    if model is None:
        return False
    if any(_form(getattr(cell, a, None)) is None for a in ("activation", "recurrent_activation") if hasattr(cell, a)):
        return False
    return masks or not (training and has_dropout(cell))


def has_dropout(cell: Any) -> bool:
    """The cell draws dropout masks in training (an input or a recurrent dropout rate)."""
    return float(getattr(cell, "dropout", 0.0) or 0.0) > 0 or float(getattr(cell, "recurrent_dropout", 0.0) or 0.0) > 0


def dropout_masks(cell: Any, training: bool, input_mask: Any, recurrent_mask: Any) -> tuple[Any, Any]:
    """The masks the cell's call applied, as (input, recurrent), each None, a tensor or a
    list of one per gate: the cell's own test (SimpleRNNCell: any mask it drew; LSTM and
    GRU: 0 < rate < 1) on the masks it handed out during the call."""

    def applies(rate: Any, mask: Any) -> bool:
        if not training or mask is None:
            return False
        return type(cell).__name__ == "SimpleRNNCell" or 0.0 < float(rate) < 1.0

    dp = input_mask if applies(getattr(cell, "dropout", 0.0), input_mask) else None
    rdp = recurrent_mask if applies(getattr(cell, "recurrent_dropout", 0.0), recurrent_mask) else None
    return dp, rdp


def capture_dropout(cells: Iterable[tuple[Any, dict[str, Any]]]) -> Callable[[], None]:
    """For each (cell, slot): record in ``slot`` ("input", "recurrent") the dropout masks
    the cell hands out during a call (the first of each kind: Keras draws them once per
    call, before its loop, and reuses them at every step), so a replay applies the very
    masks the layer used; the cells' methods are wrapped on the instance. Returns the
    function that restores them all."""
    undo: list[Callable[[], None]] = []
    for cell, slot in cells:
        for attr, key in (("get_dropout_mask", "input"), ("get_recurrent_dropout_mask", "recurrent")):
            original = getattr(cell, attr, None)
            if original is None or attr in vars(cell):
                continue

            def get(step_input: Any, _original: Any = original, _key: str = key, _slot: Any = slot) -> Any:
                mask = _original(step_input)
                _slot.setdefault(_key, mask)
                return mask

            object.__setattr__(cell, attr, get)

            def restore(_cell: Any = cell, _attr: str = attr, _get: Any = get) -> None:
                if vars(_cell).get(_attr) is _get:
                    object.__delattr__(_cell, _attr)

            undo.append(restore)

    def restore_all() -> None:
        for fn in reversed(undo):
            fn()

    return restore_all


class KCell:
    """The recurrence of one Keras cell: forward step, per-step factors, VJP and JVP."""

    gate_name: str | None = None
    parts = 1  # state parts: h, or (h, c)
    gates = 1  # blocks of the kernels
    n_factors = 1  # per-step tensors like a state part

    def __init__(self, cell: Any, input_mask: Any = None, recurrent_mask: Any = None) -> None:
        """``input_mask`` / ``recurrent_mask``: the dropout masks the call applied (see
        :func:`dropout_masks`), cut to the replayed sequences: [b, F] / [b, u], or a list
        of one per gate."""
        self.units = int(cell.units)
        self.kernel = _weight(cell.kernel)
        self.recurrent = _weight(cell.recurrent_kernel)
        self.recurrent_t = ops.transpose(self.recurrent)
        self.bias = _weight(cell.bias) if getattr(cell, "bias", None) is not None else None
        self.act = _form(getattr(cell, "activation", None))
        self.ract = _form(getattr(cell, "recurrent_activation", None))
        self.dp = input_mask
        rdp = recurrent_mask
        self.rdp = None if rdp is None else (list(rdp) if isinstance(rdp, (list, tuple)) else [rdp] * self.gates)
        if self.rdp is not None:  # per gate: h * m_g against U_g (cut here, outside the loops)
            self.rdp3 = [m[:, None, :] for m in self.rdp]  # against rows [b, k, u]
            self.blocks = [self.block(g) for g in range(self.gates)]
            self.blocks_t = [ops.transpose(w) for w in self.blocks]
        self.all = tuple(range(self.gates))
        self._w = {self.all: (self.recurrent, self.recurrent_t)}

    def project(self, x: Any) -> Any:
        """The input projection of every step at once: [b, T, F] -> [b, T, G*u], the
        input dropout masks as the cell applies them."""
        u, dp = self.units, self.dp
        if isinstance(dp, (list, tuple)):
            z = ops.concatenate(
                [ops.matmul(x * dp[g][:, None, :], self.kernel[:, g * u : (g + 1) * u]) for g in range(self.gates)], -1
            )
        else:
            z = ops.matmul(x if dp is None else x * dp[:, None, :], self.kernel)
        bias = self.input_bias()
        return z if bias is None else z + bias

    def _mask(self, g: int, like: Any) -> Any:
        return self.rdp[g] if len(like.shape) == 2 else self.rdp3[g]  # type: ignore[index]

    def rec(self, h: Any, gates: tuple[int, ...]) -> Any:
        """h ([b, u] or rows [b, k, u]) through the recurrent kernel's blocks ``gates``,
        each gate's recurrent dropout mask first. Linear in h: also its own JVP."""
        if self.rdp is None:
            return ops.matmul(h, self._w[gates][0])
        return ops.concatenate([ops.matmul(h * self._mask(g, h), self.blocks[g]) for g in gates], -1)

    def rec_back(self, d: Any, gates: tuple[int, ...]) -> Any:
        """The VJP of :meth:`rec`: d [b, k, len(gates) * u] -> [b, k, u]."""
        if self.rdp is None:
            return ops.matmul(d, self._w[gates][1])
        u = self.units
        out = None
        for i, g in enumerate(gates):
            term = ops.matmul(d[..., i * u : (i + 1) * u], self.blocks_t[g]) * self._mask(g, d)
            out = term if out is None else out + term
        return out

    def input_bias(self) -> Any:
        return self.bias

    def block(self, g: int) -> Any:
        u = self.units
        return self.recurrent[:, g * u : (g + 1) * u]

    def step(self, xz: Any, states: list[Any]) -> tuple[list[Any], list[Any], Any]:
        """One step on [b, ...]: new states, the Jacobian's factors, the keep gate (None
        for a SimpleRNN)."""
        raise NotImplementedError

    def vjp(self, us: list[Any], f: list[Any]) -> list[Any]:
        """Rows [b, k, u] per part at s_t -> rows at s_{t-1}; factors [b, 1, u]."""
        raise NotImplementedError

    def jvp(self, ts: list[Any], f: list[Any]) -> list[Any]:
        """Tangents [b, k, u] per part at s_{t-1} -> at s_t; factors [b, 1, u]."""
        raise NotImplementedError


class _SimpleRNN(KCell):
    def step(self, xz: Any, states: list[Any]) -> tuple[list[Any], list[Any], Any]:
        y, dy = self.act(xz + self.rec(states[0], self.all))  # type: ignore[misc]
        return [y], [dy], None

    def vjp(self, us: list[Any], f: list[Any]) -> list[Any]:
        return [self.rec_back(us[0] * f[0], self.all)]

    def jvp(self, ts: list[Any], f: list[Any]) -> list[Any]:
        return [f[0] * self.rec(ts[0], self.all)]


class _LSTM(KCell):
    gate_name = "forget"
    parts = 2
    gates = 4
    n_factors = 6

    def step(self, xz: Any, states: list[Any]) -> tuple[list[Any], list[Any], Any]:
        h, c = states
        zi, zf, zg, zo = ops.split(xz + self.rec(h, self.all), 4, axis=-1)
        i, di = self.ract(zi)  # type: ignore[misc]
        f, df = self.ract(zf)  # type: ignore[misc]
        g, dg = self.act(zg)  # type: ignore[misc]
        o, do = self.ract(zo)  # type: ignore[misc]
        c_new = f * c + i * g
        ac, dac = self.act(c_new)  # type: ignore[misc]
        # dc_t = u_c + u_h o act'(c_t); dz_o = u_h act(c_t) o'; dz_f = dc c_{t-1} f';
        # dz_i = dc g i'; dz_g = dc i g'; u_c(t-1) = dc f; u_h(t-1) = dz U^T.
        return [o * ac, c_new], [o * dac, ac * do, c * df, g * di, i * dg, f], f

    def vjp(self, us: list[Any], f: list[Any]) -> list[Any]:
        uh, uc = us
        dc = uc + uh * f[0]
        dz = ops.concatenate([dc * f[3], dc * f[2], dc * f[4], uh * f[1]], -1)
        return [self.rec_back(dz, self.all), dc * f[5]]

    def jvp(self, ts: list[Any], f: list[Any]) -> list[Any]:
        th, tc = ts
        ti, t_f, tg, to = ops.split(self.rec(th, self.all), 4, axis=-1)
        c = f[5] * tc + f[2] * t_f + f[3] * ti + f[4] * tg
        return [f[1] * to + f[0] * c, c]


class _GRU(KCell):
    gate_name = "update"
    gates = 3
    n_factors = 5
    ZR, HH = (0, 1), (2,)

    def __init__(self, cell: Any, input_mask: Any = None, recurrent_mask: Any = None) -> None:
        super().__init__(cell, input_mask, recurrent_mask)
        self.reset_after = bool(getattr(cell, "reset_after", True))
        u = self.units
        self.zr = self.recurrent[:, : 2 * u]
        self.hh = self.block(2)
        self.hh_t = ops.transpose(self.hh)
        self._w[self.ZR] = (self.zr, ops.transpose(self.zr))

    def input_bias(self) -> Any:
        if self.bias is None:
            return None
        return self.bias[0] if self.reset_after else self.bias

    def _hm(self, h: Any) -> Any:
        """h as the candidate's matmul sees it (reset_after=False): its dropout mask applied."""
        return h if self.rdp is None else h * self._mask(2, h)

    def step(self, xz: Any, states: list[Any]) -> tuple[list[Any], list[Any], Any]:
        h = states[0]
        u = self.units
        mi = self.rec(h, self.all if self.reset_after else self.ZR)
        if self.reset_after and self.bias is not None:
            mi = mi + self.bias[1]
        z, dz = self.ract(xz[..., :u] + mi[..., :u])  # type: ignore[misc]
        r, dr = self.ract(xz[..., u : 2 * u] + mi[..., u : 2 * u])  # type: ignore[misc]
        other = mi[..., 2 * u :] if self.reset_after else self._hm(h)  # what r multiplies
        ap = xz[..., 2 * u :] + (r * other if self.reset_after else ops.matmul(r * other, self.hh))
        hh, dhh = self.act(ap)  # type: ignore[misc]
        # da = u (1 - z) h~'; dz_pre = u (h_prev - h~) z'; reset_after: dr_pre = da m_h r',
        # d m_h = da r; before: d(r h) = da U_h^T, dr_pre = d(r h) h r', u += d(r h) r.
        return [z * h + (1.0 - z) * hh], [z, (1.0 - z) * dhh, (h - hh) * dz, other * dr, r], z

    def vjp(self, us: list[Any], f: list[Any]) -> list[Any]:
        u = us[0]
        z, a_fac, z_fac, r_fac, r = f
        da = u * a_fac
        dzp = u * z_fac
        if self.reset_after:
            return [u * z + self.rec_back(ops.concatenate([dzp, da * r_fac, da * r], -1), self.all)]
        drh = ops.matmul(da, self.hh_t)
        return [u * z + self._hm(drh * r) + self.rec_back(ops.concatenate([dzp, drh * r_fac], -1), self.ZR)]

    def jvp(self, ts: list[Any], f: list[Any]) -> list[Any]:
        th = ts[0]
        z, a_fac, z_fac, r_fac, r = f
        u = self.units
        if self.reset_after:
            tm = self.rec(th, self.all)
            tap = r * tm[..., 2 * u :] + r_fac * tm[..., u : 2 * u]
        else:
            tm = self.rec(th, self.ZR)
            tap = ops.matmul(r * self._hm(th) + r_fac * tm[..., u : 2 * u], self.hh)
        return [z * th + z_fac * tm[..., :u] + a_fac * tap]


KCELLS: dict[str, type[KCell]] = {"SimpleRNNCell": _SimpleRNN, "LSTMCell": _LSTM, "GRUCell": _GRU}
