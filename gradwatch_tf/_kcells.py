"""The recurrences of Keras' own cells in ``keras.ops``, for the portable replay
(:mod:`gradwatch_tf._kreplay`): every Keras backend (JAX inside ``jit``, torch, TensorFlow).

The same equations as :mod:`gradwatch_tf._cells` (written from keras/src/layers/rnn):
one class per cell (SimpleRNNCell with tanh / sigmoid / relu / linear, LSTMCell, GRUCell
with ``reset_after`` either way), each giving the forward step with the factors of its
state Jacobian, and the closed-form vector-Jacobian product (probe rows carried back) and
Jacobian-vector product (tangents carried forward) built from those factors. Any leading
shape: a state part is [b, u] in the forward loop, probe rows and tangents [b, k, u]
against factors [b, 1, u]. Dropout masks are not replayed here (a layer with dropout in
training is left unmeasured, never measured wrong: :func:`supported`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keras import ops

__all__ = ["KCELLS", "KCell", "supported"]


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
    return _linear if act is None else FORMS.get(getattr(act, "__name__", ""))


def _weight(v: Any) -> Any:
    return ops.stop_gradient(ops.cast(getattr(v, "value", v), "float32"))


def supported(cell: Any, training: bool) -> bool:
    """The replay knows this cell's Jacobian exactly: one of Keras' own cells, usual
    activations, and no dropout in a training call (its masks are not replayed here)."""
    model = KCELLS.get(type(cell).__name__)
    if model is None:
        return False
    if any(_form(getattr(cell, a, None)) is None for a in ("activation", "recurrent_activation") if hasattr(cell, a)):
        return False
    return not (
        training and (float(getattr(cell, "dropout", 0.0)) > 0 or float(getattr(cell, "recurrent_dropout", 0.0)) > 0)
    )


class KCell:
    """The recurrence of one Keras cell: forward step, per-step factors, VJP and JVP."""

    gate_name: str | None = None
    parts = 1  # state parts: h, or (h, c)
    gates = 1  # blocks of the kernels
    n_factors = 1  # per-step tensors like a state part

    def __init__(self, cell: Any) -> None:
        self.units = int(cell.units)
        self.kernel = _weight(cell.kernel)
        self.recurrent = _weight(cell.recurrent_kernel)
        self.recurrent_t = ops.transpose(self.recurrent)
        self.bias = _weight(cell.bias) if getattr(cell, "bias", None) is not None else None
        self.act = _form(getattr(cell, "activation", None))
        self.ract = _form(getattr(cell, "recurrent_activation", None))

    def project(self, x: Any) -> Any:
        """The input projection of every step at once: [b, T, F] -> [b, T, G*u]."""
        z = ops.matmul(x, self.kernel)
        bias = self.input_bias()
        return z if bias is None else z + bias

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
        y, dy = self.act(xz + ops.matmul(states[0], self.recurrent))  # type: ignore[misc]
        return [y], [dy], None

    def vjp(self, us: list[Any], f: list[Any]) -> list[Any]:
        return [ops.matmul(us[0] * f[0], self.recurrent_t)]

    def jvp(self, ts: list[Any], f: list[Any]) -> list[Any]:
        return [f[0] * ops.matmul(ts[0], self.recurrent)]


class _LSTM(KCell):
    gate_name = "forget"
    parts = 2
    gates = 4
    n_factors = 6

    def step(self, xz: Any, states: list[Any]) -> tuple[list[Any], list[Any], Any]:
        h, c = states
        zi, zf, zg, zo = ops.split(xz + ops.matmul(h, self.recurrent), 4, axis=-1)
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
        return [ops.matmul(dz, self.recurrent_t), dc * f[5]]

    def jvp(self, ts: list[Any], f: list[Any]) -> list[Any]:
        th, tc = ts
        ti, t_f, tg, to = ops.split(ops.matmul(th, self.recurrent), 4, axis=-1)
        c = f[5] * tc + f[2] * t_f + f[3] * ti + f[4] * tg
        return [f[1] * to + f[0] * c, c]


class _GRU(KCell):
    gate_name = "update"
    gates = 3
    n_factors = 5

    def __init__(self, cell: Any) -> None:
        super().__init__(cell)
        self.reset_after = bool(getattr(cell, "reset_after", True))
        u = self.units
        self.zr = self.recurrent[:, : 2 * u]
        self.zr_t = ops.transpose(self.zr)
        self.hh = self.block(2)
        self.hh_t = ops.transpose(self.hh)

    def input_bias(self) -> Any:
        if self.bias is None:
            return None
        return self.bias[0] if self.reset_after else self.bias

    def step(self, xz: Any, states: list[Any]) -> tuple[list[Any], list[Any], Any]:
        h = states[0]
        u = self.units
        mi = ops.matmul(h, self.recurrent if self.reset_after else self.zr)
        if self.reset_after and self.bias is not None:
            mi = mi + self.bias[1]
        z, dz = self.ract(xz[..., :u] + mi[..., :u])  # type: ignore[misc]
        r, dr = self.ract(xz[..., u : 2 * u] + mi[..., u : 2 * u])  # type: ignore[misc]
        other = mi[..., 2 * u :] if self.reset_after else h  # what r multiplies
        ap = xz[..., 2 * u :] + (r * other if self.reset_after else ops.matmul(r * h, self.hh))
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
            return [u * z + ops.matmul(ops.concatenate([dzp, da * r_fac, da * r], -1), self.recurrent_t)]
        drh = ops.matmul(da, self.hh_t)
        return [u * z + drh * r + ops.matmul(ops.concatenate([dzp, drh * r_fac], -1), self.zr_t)]

    def jvp(self, ts: list[Any], f: list[Any]) -> list[Any]:
        th = ts[0]
        z, a_fac, z_fac, r_fac, r = f
        u = self.units
        if self.reset_after:
            tm = ops.matmul(th, self.recurrent)
            tap = r * tm[..., 2 * u :] + r_fac * tm[..., u : 2 * u]
        else:
            tm = ops.matmul(th, self.zr)
            tap = ops.matmul(r * th + r_fac * tm[..., u : 2 * u], self.hh)
        return [z * th + z_fac * tm[..., :u] + a_fac * tap]


KCELLS: dict[str, type[KCell]] = {"SimpleRNNCell": _SimpleRNN, "LSTMCell": _LSTM, "GRUCell": _GRU}
