"""The one home of the current and the kept choice of every decision: formats, and architecture choices.

Layers read their choice index from a `FormatState`; `chosen_formats`, `report`, the
cost, the formats file and the export read the same state through them, and
`set_formats` and the search step write it. A `SearchModel` owns one state for
all its decisions; a wrapper used alone keeps a private one.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import keras
import numpy as np
from keras import ops

from fliqs_keras import architecture


@keras.saving.register_keras_serializable(package="fliqs_keras")
class FormatState(keras.layers.Layer):
    """The choice index each decision holds now (`current`) and the one a search keeps (`kept`).

    Args:
        decisions: ``{decision: [format or architecture choice names]}`` in decision order.

    Raises:
        ValueError: for no decisions, or a decision without choices.
    """

    def __init__(self, decisions: Mapping[str, Sequence[Any]], **kwargs):
        super().__init__(**kwargs)
        if not decisions:
            raise ValueError("A FormatState needs at least one decision.")
        self.choices = {str(name): tuple(architecture.choice(f) for f in fmts) for name, fmts in decisions.items()}
        for name, fmts in self.choices.items():
            if not fmts:
                raise ValueError(f"Decision {name!r} has no format choices.")
        self.names = list(self.choices)
        self._positions = {name: i for i, name in enumerate(self.names)}
        size = len(self.names)
        # Every replica draws the same formats: keep the first replica's.
        self.current = self.add_weight(name="current", shape=(size,), dtype="int32", initializer="zeros",
                                       trainable=False, aggregation="only_first_replica")
        # The formats a search keeps in place of its argmax from its freeze on (a budget's); -1: none.
        self.kept = self.add_weight(name="kept", shape=(size,), dtype="int32",
                                    initializer=keras.initializers.Constant(-1), trainable=False,
                                    aggregation="only_first_replica")
        self.built = True

    def position(self, decision: str) -> int:
        """The row of `decision`; ValueError naming the known decisions when it is not one."""
        if decision not in self._positions:
            raise ValueError(f"Unknown decision {decision!r}; the decisions are {self.names}.")
        return self._positions[decision]

    def index(self, decision: str):
        """The current choice index of `decision`, an int32 scalar tensor (read inside compiled steps)."""
        return ops.take(self.current.value, self.position(decision))

    def assign(self, indices):
        """Makes `indices` (int [decisions], a tensor inside a compiled step) the current choices."""
        self.current.assign(ops.cast(indices, "int32"))

    def set(self, mapping: Mapping[str, Any]):
        """Sets the current format of the decisions named in ``{decision: format}``, the others unchanged.

        Raises:
            ValueError: for an unknown decision, or a format not among its choices.
        """
        current = np.asarray(keras.ops.convert_to_numpy(self.current.value)).copy()
        for name, fmt in mapping.items():
            current[self.position(name)] = self.choice_index(name, fmt)
        self.current.assign(current)

    def choice_index(self, decision: str, fmt: Any) -> int:
        """The index of `fmt` among the choices of `decision`; ValueError naming both when absent."""
        fmt = architecture.choice(fmt)
        choices = self.choices[self.names[self.position(decision)]]
        if fmt not in choices:
            raise ValueError(f"Decision {decision!r}: {fmt.name} is not among its choices "
                             f"{[f.name for f in choices]}.")
        return choices.index(fmt)

    def current_indices(self) -> np.ndarray:
        """The choice index each decision holds now, as a NumPy array."""
        return np.asarray(keras.ops.convert_to_numpy(self.current.value), np.int32)

    def formats(self) -> dict[str, architecture.Choice]:
        """The format (or architecture choice) each decision holds now."""
        return {name: self.choices[name][int(i)] for name, i in zip(self.names, self.current_indices())}

    def keep(self, indices=None):
        """Keeps `indices` ([decisions]) as the search's choice from its freeze on; None clears it.

        Raises:
            ValueError: unless `indices` holds one valid choice per decision.
        """
        if indices is None:
            self.kept.assign(np.full((len(self.names),), -1, np.int32))
            return
        indices = np.asarray(indices, np.int32)
        sizes = [len(self.choices[n]) for n in self.names]
        if indices.shape != (len(sizes),) or not all(0 <= i < n for i, n in zip(indices.tolist(), sizes)):
            raise ValueError(f"keep() needs one valid choice index per decision (choices {sizes}), "
                             f"got {indices.tolist()}.")
        self.kept.assign(indices)

    def kept_or(self, fallback):
        """The kept choices where set, else `fallback` (int [decisions]), as an int32 tensor."""
        kept = self.kept.value
        return ops.where(kept >= 0, kept, ops.cast(fallback, "int32"))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(),
                "decisions": {name: [f.name for f in fmts] for name, fmts in self.choices.items()}}
