"""The recurrences of Keras' own cells, for the replay (:mod:`gradwatch_tf._replay`).

One class per cell (SimpleRNNCell with any activation, LSTMCell, GRUCell with
``reset_after`` either way): the forward step with the factors of its Jacobian, and the
closed-form vector-Jacobian product (backwards, many probe rows) and Jacobian-vector
product (forwards, one tangent) that use those factors. Written from the cells' own code
(keras/src/layers/rnn), dropout masks per gate included (``implementation=1``), and
checked against numpy Jacobians in tests/tf/test_tf_propagation.py. Activations are the
cell's own objects; their derivatives come from autodiff (any elementwise activation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

__all__ = ["CELLS", "RecurrentCell"]


def _weight(v: Any) -> tf.Tensor:
    return tf.stop_gradient(tf.cast(tf.convert_to_tensor(getattr(v, "value", v)), tf.float32))


def _closed_forms() -> dict[Any, Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]]:
    """Keras' usual activations with their derivatives in closed form: the replay runs
    inside the user's step, and each op of its loops runs T times."""
    import keras

    acts = keras.activations
    forms: dict[Any, Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]] = {}

    def tanh(z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        y = tf.tanh(z)
        return y, 1.0 - y * y

    def sigmoid(z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        y = tf.sigmoid(z)
        return y, y * (1.0 - y)

    def relu(z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.nn.relu(z), tf.cast(z > 0, z.dtype)

    def linear(z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return z, tf.ones_like(z)

    for name, fn in (("tanh", tanh), ("sigmoid", sigmoid), ("relu", relu), ("linear", linear)):
        act = getattr(acts, name, None)
        if act is not None:
            forms[act] = fn
    return forms


_FORMS: dict[Any, Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]] | None = None


def _act_and_grad(act: Callable[[Any], Any] | None, z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """act(z) and act'(z) for an elementwise activation: closed forms for Keras' usual
    ones, autodiff for any other (the gradient of sum(act(z)) is the derivative)."""
    global _FORMS
    if act is None:
        return z, tf.ones_like(z)
    if _FORMS is None:
        _FORMS = _closed_forms()
    form = _FORMS.get(act)
    if form is not None:
        return form(z)
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = tf.cast(act(z), tf.float32)
    g = tape.gradient(y, z)
    return y, (tf.zeros_like(z) if g is None else g)


def _act(act: Callable[[Any], Any] | None, z: tf.Tensor) -> tf.Tensor:
    """act(z) alone (the forward loop needs no derivative): one op for Keras' usual ones."""
    if act is None:
        return z
    op = _VALUES.get(act.__name__) if _closed(act) else None
    return op(z) if op is not None else tf.cast(act(z), tf.float32)


_VALUES: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "tanh": tf.tanh,
    "sigmoid": tf.sigmoid,
    "relu": tf.nn.relu,
    "linear": tf.identity,
}


def _closed(act: Any) -> bool:
    global _FORMS
    if _FORMS is None:
        _FORMS = _closed_forms()
    return act in _FORMS


def _mm(a: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """a [..., n] @ w over the last axis, any leading shape (one broadcasting matmul)."""
    return tf.matmul(a, w)


def _dropout_applies(cell: Any, rate: float, mask: Any, training: bool) -> bool:
    """Mirror of the cell's own test (SimpleRNNCell: any mask; LSTM/GRU: 0 < rate < 1)."""
    if not training or mask is None:
        return False
    if type(cell).__name__ == "SimpleRNNCell":
        return True
    return 0.0 < float(rate) < 1.0


class RecurrentCell:
    """The recurrence of one Keras cell: forward step, per-step factors, closed-form VJP."""

    gate_name: str | None = None
    parts = 1  # state parts: h, or (h, c)
    gates = 1  # blocks of the kernels
    n_factors = 1  # per-step tensors [b, u] of the VJP / JVP
    record_widths: tuple[int, ...] = (1,)  # what :meth:`step` records, in units

    def __init__(self, cell: Any, traj: Any, training: bool) -> None:
        self.units = int(cell.units)
        self.kernel = _weight(cell.kernel)
        self.recurrent = _weight(cell.recurrent_kernel)
        self.bias = _weight(cell.bias) if getattr(cell, "bias", None) is not None else None
        self.act = getattr(cell, "activation", None)
        self.ract = getattr(cell, "recurrent_activation", None)
        dp = (
            traj.input_mask
            if _dropout_applies(cell, getattr(cell, "dropout", 0.0), traj.input_mask, training)
            else None
        )
        rdp = traj.recurrent_mask
        self.rdp = rdp if _dropout_applies(cell, getattr(cell, "recurrent_dropout", 0.0), rdp, training) else None
        self._cache: dict[tuple[int, ...], tuple[tf.Tensor, tf.Tensor]] = {}
        # Every block combination the loops use is cut here, outside them.
        for key in {
            tuple(range(self.gates)),
            *((g,) for g in range(self.gates)),
            *([(0, 1)] if self.gates == 3 else []),
        }:
            self._kernels(key)
        self.xz = self._project(traj.x, dp)  # [b, T, G*u]
        # The recurrent masks as [b, 1, u], against probe rows [b, k, u] (made here, once).
        self._masks3 = [m[:, None, :] for m in self._masks()] if self.rdp is not None else []

    # -- helpers over gate blocks -------------------------------------------------
    def _block(self, w: tf.Tensor, g: int) -> tf.Tensor:
        u = self.units
        return w[:, g * u : (g + 1) * u]

    def _project(self, x: tf.Tensor, dp: Any) -> tf.Tensor:
        if isinstance(dp, list):
            z = tf.concat([_mm(x * dp[g][:, None, :], self._block(self.kernel, g)) for g in range(self.gates)], -1)
        else:
            z = _mm(x if dp is None else x * dp[:, None, :], self.kernel)
        bias = self.input_bias()
        return z if bias is None else z + bias

    def input_bias(self) -> tf.Tensor | None:
        return self.bias

    def _kernels(self, gates: Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
        """The recurrent kernel's columns of ``gates`` and their transpose, cut once (not
        inside the loops: the replay runs inside the user's step)."""
        key = tuple(gates)
        if key not in self._cache:  # only from __init__: a tensor made in a loop stays there
            w = (
                self.recurrent
                if len(key) == self.gates
                else tf.concat([self._block(self.recurrent, g) for g in key], 1)
            )
            self._cache[key] = (w, tf.transpose(w))
        return self._cache[key]

    def _masks(self) -> list[tf.Tensor]:
        return self.rdp if isinstance(self.rdp, list) else [self.rdp] * self.gates

    def recurrent_in(self, h: tf.Tensor, gates: Sequence[int]) -> tf.Tensor:
        """h (dropout-masked per gate as the cell does) times the recurrent kernel's
        blocks ``gates``; h is [b, u] or [T, b, u], masks are per sequence. Linear in h:
        it is also its own JVP."""
        if self.rdp is None:
            return _mm(h, self._kernels(gates)[0])
        masks = self._masks()
        return tf.concat([_mm(h * _bcast(masks[g], h), self._kernels([g])[0]) for g in gates], -1)

    def recurrent_back(self, delta: tf.Tensor, gates: Sequence[int]) -> tf.Tensor:
        """The VJP of :meth:`recurrent_in`: delta [b, k, len(gates)*u] -> [b, k, u]."""
        u = self.units
        if self.rdp is None:
            return _mm(delta, self._kernels(gates)[1])
        masks = self._masks3
        out = None
        for i, g in enumerate(gates):
            term = _mm(delta[..., i * u : (i + 1) * u], self._kernels([g])[1]) * masks[g]
            out = term if out is None else out + term
        return out

    # -- the interface ------------------------------------------------------------
    def step(self, xz: tf.Tensor, states: list[tf.Tensor]) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """One step on [b, ...]: the new states and the pre-activations :meth:`factors`
        needs (of widths :attr:`record_widths`, in units)."""
        raise NotImplementedError

    def factors(self, records: list[tf.Tensor], prev: list[tf.Tensor]) -> tuple[list[tf.Tensor], tf.Tensor | None]:
        """The factors of the Jacobian ds_t/ds_{t-1} (``n_factors`` tensors like a
        state part) from a step's records and the states before it, and the keep gate
        (None for a SimpleRNN). Elementwise: one step [b, u] or all of them [T, b, u]."""
        raise NotImplementedError

    def vjp(self, us: list[tf.Tensor], f: list[tf.Tensor]) -> list[tf.Tensor]:
        """Rows u [b, k, u] per state part at s_t -> u ds_t/ds_{t-1}; the step's
        factors arrive as [b, 1, u]."""
        raise NotImplementedError

    def jvp(self, ts: list[tf.Tensor], f: list[tf.Tensor]) -> list[tf.Tensor]:
        """A tangent [b, u] per state part at s_{t-1} -> ds_t/ds_{t-1} tangent; the step's
        factors arrive as [b, u]."""
        raise NotImplementedError


def _bcast(mask: tf.Tensor, h: tf.Tensor) -> tf.Tensor:
    """A [b, u] dropout mask against h of shape [b, u] or [T, b, u]."""
    return mask if h.shape.rank == 2 else mask[None]


class _SimpleRNN(RecurrentCell):
    n_factors = 1
    record_widths = (1,)

    def step(self, xz: tf.Tensor, states: list[tf.Tensor]) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        a = xz + self.recurrent_in(states[0], [0])
        return [_act(self.act, a)], [a]

    def factors(self, records: list[tf.Tensor], prev: list[tf.Tensor]) -> tuple[list[tf.Tensor], tf.Tensor | None]:
        return [_act_and_grad(self.act, records[0])[1]], None

    def vjp(self, us: list[tf.Tensor], f: list[tf.Tensor]) -> list[tf.Tensor]:
        return [self.recurrent_back(us[0] * f[0], [0])]

    def jvp(self, ts: list[tf.Tensor], f: list[tf.Tensor]) -> list[tf.Tensor]:
        return [f[0] * self.recurrent_in(ts[0], [0])]


class _LSTM(RecurrentCell):
    gate_name = "forget"
    parts = 2
    gates = 4
    n_factors = 6
    record_widths = (4, 1)  # z (all gates' pre-activations), c_t

    def step(self, xz: tf.Tensor, states: list[tf.Tensor]) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        h, c = states
        z = xz + self.recurrent_in(h, range(4))
        zi, zf, zg, zo = tf.split(z, 4, axis=-1)
        c_new = _act(self.ract, zf) * c + _act(self.ract, zi) * _act(self.act, zg)
        return [_act(self.ract, zo) * _act(self.act, c_new), c_new], [z, c_new]

    def factors(self, records: list[tf.Tensor], prev: list[tf.Tensor]) -> tuple[list[tf.Tensor], tf.Tensor | None]:
        z, c_new = records
        c = prev[1]
        zi, zf, zg, zo = tf.split(z, 4, axis=-1)
        i, di = _act_and_grad(self.ract, zi)
        f, df = _act_and_grad(self.ract, zf)
        g, dg = _act_and_grad(self.act, zg)
        o, do = _act_and_grad(self.ract, zo)
        ac, dac = _act_and_grad(self.act, c_new)
        # dc_t = u_c + u_h o act'(c_t); dz_o = u_h act(c_t) o'; dz_f = dc c_{t-1} f';
        # dz_i = dc g i'; dz_g = dc i g'; u_c(t-1) = dc f; u_h(t-1) = dz U^T.
        return [o * dac, ac * do, c * df, g * di, i * dg, f], f

    def vjp(self, us: list[tf.Tensor], f: list[tf.Tensor]) -> list[tf.Tensor]:
        uh, uc = us
        e = f
        dc = uc + uh * e[0]
        dz = tf.concat([dc * e[3], dc * e[2], dc * e[4], uh * e[1]], -1)
        return [self.recurrent_back(dz, range(4)), dc * e[5]]

    def jvp(self, ts: list[tf.Tensor], f: list[tf.Tensor]) -> list[tf.Tensor]:
        th, tc = ts
        ti, t_f, tg, to = tf.split(self.recurrent_in(th, range(4)), 4, axis=-1)
        c = f[5] * tc + f[2] * t_f + f[3] * ti + f[4] * tg
        return [f[1] * to + f[0] * c, c]


class _GRU(RecurrentCell):
    gate_name = "update"
    gates = 3
    n_factors = 5
    record_widths = (1, 1, 1, 1)  # z and r pre-activations, the candidate's, what r multiplies

    def __init__(self, cell: Any, traj: Any, training: bool) -> None:
        self.reset_after = bool(getattr(cell, "reset_after", True))
        super().__init__(cell, traj, training)

    def input_bias(self) -> tf.Tensor | None:
        if self.bias is None:
            return None
        return self.bias[0] if self.reset_after else self.bias

    def _mask(self, g: int) -> tf.Tensor:
        return self.rdp[g] if isinstance(self.rdp, list) else self.rdp

    def step(self, xz: tf.Tensor, states: list[tf.Tensor]) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        h = states[0]
        u = self.units
        mi = self.recurrent_in(h, range(3) if self.reset_after else [0, 1])
        if self.reset_after and self.bias is not None:
            mi = mi + self.bias[1]
        zp, rp = xz[:, :u] + mi[:, :u], xz[:, u : 2 * u] + mi[:, u : 2 * u]
        r = _act(self.ract, rp)
        if self.reset_after:
            other = mi[:, 2 * u :]  # what r multiplies: U_h h + b_h
            ap = xz[:, 2 * u :] + r * other
        else:
            other = h * self._mask(2) if self.rdp is not None else h
            ap = xz[:, 2 * u :] + _mm(r * other, self._kernels([2])[0])
        z = _act(self.ract, zp)
        return [z * h + (1.0 - z) * _act(self.act, ap)], [zp, rp, ap, other]

    def factors(self, records: list[tf.Tensor], prev: list[tf.Tensor]) -> tuple[list[tf.Tensor], tf.Tensor | None]:
        zp, rp, ap, other = records
        h = prev[0]
        z, dz = _act_and_grad(self.ract, zp)
        r, dr = _act_and_grad(self.ract, rp)
        hh, dhh = _act_and_grad(self.act, ap)
        # da = u (1 - z) h~'; dz_pre = u (h_prev - h~) z'; reset_after: dr_pre = da m_h r',
        # d m_h = da r; before: d(r h) = da U_h^T, dr_pre = d(r h) h r', u += d(r h) r.
        return [z, (1.0 - z) * dhh, (h - hh) * dz, other * dr, r], z

    def vjp(self, us: list[tf.Tensor], f: list[tf.Tensor]) -> list[tf.Tensor]:
        u = us[0]
        z, a_fac, z_fac, r_fac, r = f
        da = u * a_fac
        dzp = u * z_fac
        out = u * z
        if self.reset_after:
            return [out + self.recurrent_back(tf.concat([dzp, da * r_fac, da * r], -1), range(3))]
        drh = _mm(da, self._kernels([2])[1])
        back_h = drh * r
        if self.rdp is not None:
            back_h = back_h * self._masks3[2]
        return [out + back_h + self.recurrent_back(tf.concat([dzp, drh * r_fac], -1), [0, 1])]

    def jvp(self, ts: list[tf.Tensor], f: list[tf.Tensor]) -> list[tf.Tensor]:
        th = ts[0]
        z, a_fac, z_fac, r_fac, r = f
        u = self.units
        if self.reset_after:
            tm = self.recurrent_in(th, range(3))
            tap = r * tm[:, 2 * u :] + r_fac * tm[:, u : 2 * u]
        else:
            tm = self.recurrent_in(th, [0, 1])
            thm = th * self._mask(2) if self.rdp is not None else th
            tap = _mm(r * thm + r_fac * tm[:, u : 2 * u], self._kernels([2])[0])
        return [z * th + z_fac * tm[:, :u] + a_fac * tap]


CELLS: dict[str, type[RecurrentCell]] = {"SimpleRNNCell": _SimpleRNN, "LSTMCell": _LSTM, "GRUCell": _GRU}
