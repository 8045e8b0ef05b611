"""Which parameters a Monitor measures and the layer each belongs to.

Built once per :meth:`~gradwatch.Monitor.bind` (at attach, and when the set of
parameters changes), so that every step maps norms to names and layers with numpy
indexing only, never a Python loop per parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np

from gradwatch.errors import GradwatchError

__all__ = ["Binding", "infer_layer"]


def infer_layer(name: str, known: Sequence[str] = ()) -> str:
    """The layer a parameter belongs to: the one rule every backend uses.

    The outermost of the ``known`` layers whose path contains the parameter (so an LSTM's
    ``"lstm/lstm_cell/kernel"`` reports under ``"lstm"``, the layer the user wrote), else
    the name without its last component (``"enc.lstm.weight_hh_l0"`` -> ``"enc.lstm"``,
    ``"dense/kernel"`` -> ``"dense"``); a bare name is its own layer.
    """
    best: str | None = None
    for layer in known:
        if (
            name.startswith(layer)
            and name[len(layer) : len(layer) + 1] in ("/", ".")
            and (best is None or len(layer) < len(best))
        ):
            best = layer
    if best is not None:
        return best
    for sep in ("/", "."):
        if sep in name:
            return name.rsplit(sep, 1)[0]
    return name


_Subset = tuple[Mapping[str, int], np.ndarray, Mapping[str, int], np.ndarray]


class Binding:
    """Bound parameter names (in the order of the norms a backend sends), their layers,
    and the read-only indices every step's :class:`~gradwatch.records.NormMap` shares."""

    __slots__ = ("_subsets", "index", "layer_index", "layer_of_param", "layers", "names", "param_layer")

    def __init__(self, names: Sequence[str], layers: Sequence[str] | None = None) -> None:
        names = tuple(names)
        layers = tuple(layers) if layers is not None else tuple(infer_layer(n) for n in names)
        if len(layers) != len(names):
            raise GradwatchError(f"Monitor.bind: {len(names)} names but {len(layers)} layers.")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise GradwatchError(f"Monitor.bind: parameter name {dup!r} appears twice.")
        uniq = tuple(dict.fromkeys(layers))
        pos = {n: i for i, n in enumerate(uniq)}
        self.names = names
        self.index: Mapping[str, int] = MappingProxyType({n: i for i, n in enumerate(names)})
        self.layers = uniq
        self.layer_index: Mapping[str, int] = MappingProxyType(pos)
        self.layer_of_param = np.array([pos[layer] for layer in layers], dtype=np.intp)
        self.param_layer = dict(zip(names, layers))
        self._subsets: dict[bytes, _Subset] = {}

    def subset(self, present: np.ndarray) -> _Subset:
        """Indices of a record that leaves absent parameters, and layers with no present
        parameter, out: (param index, param positions, layer index, layer positions).

        Cached per presence pattern (a frozen layer repeats one pattern every step), at
        most 64 patterns; a new binding starts with none.
        """
        key = present.tobytes()
        got = self._subsets.get(key)
        if got is None:
            pos = np.flatnonzero(present)
            lpos = np.flatnonzero(np.bincount(self.layer_of_param[pos], minlength=len(self.layers)))
            got = (
                MappingProxyType({self.names[i]: k for k, i in enumerate(pos)}),
                pos,
                MappingProxyType({self.layers[j]: k for k, j in enumerate(lpos)}),
                lpos,
            )
            if len(self._subsets) >= 64:
                self._subsets.clear()
            self._subsets[key] = got
        return got
