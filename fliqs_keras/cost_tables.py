"""Cost tables: a cost per (layer, weight format), given by hand or measured (`measure`).

A measured table also holds what a sum of layers misses: the cost of moving
between float and integer tensors where neighbouring layers differ, and the
fixed cost of the ops no decision changes, so that `CostTable.cost` predicts a
whole file; and where it was measured, so that loading it elsewhere says so.
How and why: docs/latency.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping

from absl import logging

from fliqs_keras import files, formats, runtime

KIND = "fliqs_keras.cost_table"
UNITS = ("ms", "bytes")
# The provenance entries that must agree, per unit, for a measured table to hold here.
COMPARED = {"ms": runtime.COMPARED + ("fliqs_keras",), "bytes": ("fliqs_keras",)}
# What `measure` fits, besides the fixed cost, of how layers cost inside the whole file.
CONTEXT_FACTORS = ("integer", "float", "conversions")


@dataclasses.dataclass(frozen=True)
class CostTable:
    """The cost of every searchable layer in each of its weight formats, and how the layers add up.

    Args:
        layers: ``{layer path: {format name: cost}}``.
        unit: ``"ms"``, ``"bytes"`` or ``""`` (a table given by hand).
        fixed: the cost of everything no decision changes (unsearched ops,
            the invoke itself).
        integer: ``{path: {format: whether the layer's inputs are integer}}``:
            where a layer runs integer kernels between float neighbours, its
            input is quantized and its output dequantized in the file.
        quantize: ``{path: cost of quantizing the layer's input}``.
        dequantize: ``{path: cost of dequantizing its output}``.
        producers: ``{path: [paths of the searchable layers feeding it]}``,
            ``""`` for a model input.
        outputs: the paths that compute a model output.
        provenance: where the costs were measured (`runtime.provenance`).
        reference: the formats of the whole file timed beside every layer
            (`reference_file`), whose median sets the table's speed.
        context_factors: how much slower (> 1) integer layers, float layers
            and the conversions between them run inside the whole file than
            alone (`CONTEXT_FACTORS`); the costs include them.
        calibration: the whole files the factors and `fixed` were fitted
            on: ``[{"formats": {decision: format}, "measured_ms": time}]``.
    """

    layers: dict[str, dict[str, float]]
    unit: str = ""
    fixed: float = 0.0
    integer: dict[str, dict[str, bool]] = dataclasses.field(default_factory=dict)
    quantize: dict[str, float] = dataclasses.field(default_factory=dict)
    dequantize: dict[str, float] = dataclasses.field(default_factory=dict)
    producers: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    reference: dict[str, str] = dataclasses.field(default_factory=dict)
    context_factors: dict[str, float] = dataclasses.field(default_factory=dict)
    calibration: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.unit not in UNITS + ("",):
            raise ValueError(f"Unknown cost table unit {self.unit!r}; expected one of {UNITS} or ''.")
        if not isinstance(self.layers, dict) or not self.layers:
            raise ValueError("A cost table needs a non-empty {layer path: {format: cost}}.")
        clean = {}
        for path, row in self.layers.items():
            if not isinstance(row, dict) or not row:
                raise ValueError(f"Cost table entry {path!r} must be a non-empty {{format: cost}}.")
            clean[path] = {}
            for name, value in row.items():
                fmt = formats.get(name)
                if not _finite(value) or value < 0:
                    raise ValueError(f"Cost table entry {path!r}/{name!r} must be a number >= 0, got {value!r}.")
                clean[path][fmt.name] = float(value)
        object.__setattr__(self, "layers", clean)
        if not _finite(self.fixed):
            raise ValueError(f"The cost table's fixed cost must be a finite number, got {self.fixed!r}.")
        for name in ("quantize", "dequantize"):
            bad = {k: v for k, v in getattr(self, name).items() if not _finite(v) or v < 0}
            if bad:
                raise ValueError(f"Cost table {name} costs must be numbers >= 0, got {bad}.")
        unknown = sorted(({p for ps in self.producers.values() for p in ps} - {""}) - set(clean))
        if unknown:
            raise ValueError(f"The cost table's producers name layers it has no costs for: {unknown}.")

    # --- the cost of a whole file ---------------------------------------------------------------

    def is_integer(self, path: str, fmt: str) -> bool:
        """Whether the layer at `path` runs on integer inputs in weight format `fmt`."""
        return bool(self.integer.get(path, {}).get(formats.get(fmt).name, False))

    def consumers(self) -> dict[str, list[str]]:
        """``{path: [paths of the layers it feeds]}``, ``""`` for a model output."""
        result = {path: [] for path in self.layers}
        for path, feeding in self.producers.items():
            for producer in feeding:
                if producer:
                    result[producer].append(path)
        for path in self.outputs:
            result[path].append("")
        return result

    def cost(self, weight_formats: Mapping[str, Any]) -> float:
        """The cost of the file with each of its searchable layers in a weight format (``{path: format}``).

        A layer the mapping does not give counts as float (no conversions).

        Raises:
            ValueError: naming a layer the table lacks or a format its row lacks.
        """
        chosen = {path: formats.get(fmt).name for path, fmt in weight_formats.items()}
        total = self.fixed
        for path, name in chosen.items():
            if name not in self.layers.get(path, {}):
                raise ValueError(f"The cost table has no cost for layer {path!r} in {name}.")
            total += self.layers[path][name]
        integer = {path: self.is_integer(path, fmt) for path, fmt in chosen.items()}
        for path, feeding in self.producers.items():
            if integer.get(path) and not all(p and integer.get(p) for p in feeding):
                total += self.quantize.get(path, 0.0)
        for path, fed in self.consumers().items():
            if integer.get(path) and not all(c and integer.get(c) for c in fed):
                total += self.dequantize.get(path, 0.0)
        return float(total)

    # --- files -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The table as JSON values."""
        values = dataclasses.asdict(self)
        values["outputs"] = list(self.outputs)
        return {"kind": KIND, **values}

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Writes the table as JSON (atomically); returns the path."""
        files.write_text(path, json.dumps(self.to_dict(), indent=1))
        return pathlib.Path(path)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CostTable":
        """A table from `to_dict`'s values, or from a plain ``{path: {format: cost}}``."""
        if values.get("kind") != KIND:
            return cls(layers=dict(values))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields - {"kind"})
        if unknown:
            raise ValueError(f"Unknown cost table entries {unknown}.")
        kept = {k: v for k, v in values.items() if k in fields}
        kept["outputs"] = tuple(kept.get("outputs", ()))
        return cls(**kept)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load(source: Any, threads: int | None = None) -> CostTable:
    """A cost table from a JSON file, a dict or a `CostTable`; a measured one whose provenance differs is flagged.

    Args:
        source: a path, ``{path: {format: cost}}``, `to_dict`'s values, or a table.
        threads: the interpreter threads the table is meant for, checked
            against a latency table's own.

    Returns:
        The table; a latency or size table measured under another runtime,
        version, thread count, CPU or fliqs_keras is returned with a warning
        naming each difference (`stale` lists them).

    Raises:
        ValueError: for a file that cannot be read or a malformed table.
    """
    if isinstance(source, CostTable):
        table = source
    elif isinstance(source, Mapping):
        table = CostTable.from_dict(source)
    else:
        try:
            values = json.loads(pathlib.Path(source).read_text())
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"Cannot read cost table {str(source)!r}: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"Cost table {str(source)!r} must map layer paths to {{format: cost}}.")
        try:
            table = CostTable.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Cost table {str(source)!r}: {error}") from None
    differing = stale(table, threads)
    if differing:
        logging.warning("fliqs_keras: the cost table was measured elsewhere, so its costs may not hold here: %s.",
                        "; ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in differing.items()))
    return table


def stale(table: CostTable, threads: int | None = None) -> dict[str, tuple[Any, Any]]:
    """``{entry: (recorded, here)}`` for each provenance entry of a measured table that differs here."""
    if not table.unit:
        return {}
    here = provenance(table.provenance.get("threads", 1) if threads is None else threads)
    return {key: (table.provenance.get(key), here.get(key)) for key in COMPARED[table.unit]
            if table.provenance.get(key) != here.get(key)}


def provenance(threads: int) -> dict[str, Any]:
    """`runtime.provenance` and the fliqs_keras version: where a table measured now holds."""
    from fliqs_keras import __version__

    return {**runtime.provenance(threads), "fliqs_keras": __version__}


__all__ = ["CONTEXT_FACTORS", "COMPARED", "CostTable", "KIND", "UNITS", "load", "provenance", "stale"]
