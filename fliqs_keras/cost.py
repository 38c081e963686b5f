"""What a searchable model costs in a given assignment of formats (and architecture choices).

MACs and parameters per searchable layer from the model's built shapes; BOPs
(MACs x bits_w x bits_a), weight size, or a per-(layer, format) table
(`cost_tables`: given by hand, or measured on LiteRT). A layer of a searched
architecture counts only the part its choices use (`architecture.CostFactor`).
`CostModel` holds them as arrays for the compiled step.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any, Mapping

import keras
import numpy as np
from keras import ops

from fliqs_keras import architecture, blocks, cost_tables, formats, layers
from fliqs_keras.graph import attention_parts, call_shapes, walk_layers

METRICS = ("bops", "size", "table", "latency")
TABLE_METRICS = ("table", "latency")
FLOAT_BITS = 32


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """The shape facts of one searchable layer."""

    path: str
    layer_type: str
    macs: int
    params: int
    fixed_bops: int  # BOPs no format choice changes (attention matmuls in float32)
    weight_decision: str | None
    activation_decision: str | None
    weight_choices: tuple[formats.Format, ...]
    activation_choices: tuple[formats.Format, ...]
    # MACs and params are at the largest architecture; each factor scales them by the part a choice uses.
    factors: tuple[architecture.CostFactor, ...] = ()

    def scale(self, chosen: Mapping[str, Any] | None = None) -> Fraction:
        """The part of the layer that architecture choices ``{decision: choice}`` use (1: the largest, None)."""
        result = Fraction(1)
        for factor in self.factors:
            result *= factor.fraction(chosen[factor.decision]) if chosen is not None else max(factor.fractions)
        return result


def _node_shapes(layer) -> list[tuple[list, list]]:
    shapes = call_shapes(layer)
    if not shapes:
        raise ValueError(
            f"Layer {layer.name!r} has no call recorded in a model graph, so its MACs cannot be counted: "
            "cost needs a Functional or Sequential model built on a keras.Input."
        )
    return shapes


def _static(layer, shape) -> tuple[int, ...]:
    if any(dim is None for dim in shape[1:]):
        raise ValueError(
            f"Layer {layer.name!r} has a dynamic shape {shape}; cost needs static shapes "
            "(give keras.Input a full shape, e.g. (224, 224, 3))."
        )
    return tuple(shape[1:])


def _kernel_macs(layer, input_shape, output_shape) -> int:
    """The kernel's size times the positions it is applied at."""
    kernel = tuple(layer.kernel.shape)
    if isinstance(layer, keras.layers.EinsumDense):
        # Positions are the input elements over the dims the kernel contracts.
        if "..." in layer.equation:
            raise ValueError(f"Layer {layer.name!r}: MACs of EinsumDense equations with '...' are not counted.")
        operands = layer.equation.split("->")[0].split(",")
        contracted = [dim for letter, dim in zip(operands[0][-len(input_shape):], input_shape)
                      if letter in operands[1]]
        positions = int(np.prod(_static(layer, input_shape))) // int(np.prod(contracted))
    else:
        # Conv and Dense: output positions = output elements / output channels
        # (in x multiplier channels for a depthwise kernel).
        channels = kernel[-2] * kernel[-1] if isinstance(layer, keras.layers.DepthwiseConv2D) else kernel[-1]
        positions = int(np.prod(_static(layer, output_shape))) // channels
    return positions * int(np.prod(kernel))


def _attention_macs(mha, input_shapes) -> tuple[int, int]:
    """(projection MACs, attention matmul MACs) of one MultiHeadAttention call."""
    query = _static(mha, input_shapes[0])
    value = _static(mha, input_shapes[1]) if len(input_shapes) > 1 else query
    key = _static(mha, input_shapes[2]) if len(input_shapes) > 2 else value
    query_positions = int(np.prod(query[:-1]))
    key_positions = int(np.prod(key[:-1]))
    value_positions = int(np.prod(value[:-1]))
    parts = attention_parts(mha)
    projections = (
        query_positions * int(np.prod(parts["query"].kernel.shape))
        + key_positions * int(np.prod(parts["key"].kernel.shape))
        + value_positions * int(np.prod(parts["value"].kernel.shape))
        + query_positions * int(np.prod(parts["output"].kernel.shape))
    )
    matmuls = query_positions * key_positions * parts["heads"] * (parts["key_dim"] + parts["value_dim"])
    return projections, matmuls


def layer_costs(model: keras.Model) -> list[LayerCost]:
    """The shape facts of every searchable layer of `model`, in layer order."""
    result = []
    for path, layer in walk_layers(model):
        if not layers.is_searchable(layer):
            continue
        inner = layer.layer
        macs = fixed = 0
        for input_shapes, output_shapes in _node_shapes(layer):
            if isinstance(inner, keras.layers.MultiHeadAttention):
                projections, matmuls = _attention_macs(inner, input_shapes)
                macs += projections
                fixed += matmuls * FLOAT_BITS * FLOAT_BITS
            else:
                macs += _kernel_macs(inner, input_shapes[0], output_shapes[0])
        params = sum(int(np.prod(v.shape)) for _, v in layer.quantize_config.get_weights(inner))
        factors = tuple(inner.cost_factors()) if blocks.is_architecture(inner) else ()
        if len({f.decision for f in factors}) != len(factors):
            raise ValueError(f"Layer {path!r}: one architecture decision sets two of its dimensions; its cost "
                             "would not be a product of independent factors.")
        result.append(LayerCost(
            path, type(inner).__name__, macs, params, fixed,
            layer.weight_decision if layer.weight_formats else None,
            layer.activation_decision if layer.activation_formats else None,
            layer.weight_formats, layer.activation_formats, factors))
    if not result:
        raise ValueError(
            f"Model {model.name!r} has no searchable layers: cost is counted for models made by "
            "fliqs_keras.apply."
        )
    return result


def bits(fmt: formats.Format | None) -> int:
    """Bits per value of `fmt`; None (float) counts as float32."""
    return FLOAT_BITS if fmt is None else fmt.bits


class CostModel:
    """The cost of every assignment of formats to the decisions of a searchable model.

    Args:
        model: a model made by `fliqs_keras.apply`.
        metric: ``"bops"``, ``"size"`` (bits of the quantized weights),
            ``"table"`` (needs `table`) or ``"latency"`` (needs a table
            `measure.measure_latency` measured, in milliseconds).
        table: for ``"table"`` and ``"latency"``: a `cost_tables.CostTable`,
            its JSON file, or ``{layer path: {format name: cost}}``; the
            weight format of a layer selects its entry.
    """

    def __init__(self, model: keras.Model, metric: str = "bops", table: Any = None):
        if metric not in METRICS:
            raise ValueError(f"Unknown cost metric {metric!r}; expected one of {METRICS}.")
        self.metric = metric
        self.layers = layer_costs(model)
        self.decisions: dict[str, tuple[formats.Format, ...]] = {}
        for entry in self.layers:
            for name, choices in ((entry.weight_decision, entry.weight_choices),
                                  (entry.activation_decision, entry.activation_choices)):
                if name is not None:
                    self.decisions.setdefault(name, choices)
        self.architecture: dict[str, tuple[architecture.ArchitectureChoice, ...]] = {}
        for entry in self.layers:
            for factor in entry.factors:
                self.architecture.setdefault(factor.decision, factor.choices)
        self._architecture_cache: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
        if metric in TABLE_METRICS and self.architecture:
            raise ValueError(f"The {metric!r} cost keys a layer by its format only, and this model also searches "
                             f"its architecture ({len(self.architecture)} decisions); search it in 'bops' or 'size'.")
        if metric in TABLE_METRICS:
            if table is None:
                raise ValueError(f"The {metric!r} cost metric needs table=... (a CostTable, a dict or a JSON file).")
            self.table = cost_tables.load(table)
            if metric == "latency" and self.table.unit != "ms":
                raise ValueError(f"The 'latency' cost metric needs a table in milliseconds "
                                 f"(measure.measure_latency); this one is in {self.table.unit or 'no unit'!r}.")
            missing = [e.path for e in self.layers if e.path not in self.table.layers]
            if missing:
                raise ValueError(f"The cost table has no entry for layers {missing}.")
            # Every pair the search can draw: a missing one would cost NaN in the step and teach nothing.
            lacking = [f"{e.path}/{f.name}" for e in self.layers
                       for f in (e.weight_choices or (formats.get("fp32"),)) if f.name not in self.table.layers[e.path]]
            if lacking:
                raise ValueError(f"The cost table has no cost for {len(lacking)} (layer, format) pairs the search "
                                 f"can draw: {lacking}.")
            self._integer, self._conversions = self._conversion_arrays()
        else:
            self.table = None

    def layer_cost(self, entry: LayerCost, weight: formats.Format | None,
                   activation: formats.Format | None, chosen: Mapping[str, Any] | None = None) -> float:
        """The cost of one layer with its weights in `weight` and its inputs in `activation` (None: float).

        `chosen` gives its architecture choices ``{decision: choice}``; None: the largest.
        """
        if self.metric == "bops":
            return float(entry.macs * entry.scale(chosen) * bits(weight) * bits(activation) + entry.fixed_bops)
        if self.metric == "size":
            return float(entry.params * entry.scale(chosen) * bits(weight))
        name = (weight or formats.get("fp32")).name
        if name not in self.table.layers[entry.path]:
            raise ValueError(f"The cost table has no cost for layer {entry.path!r} in {name}.")
        return self.table.layers[entry.path][name]

    def cost(self, assignment: Mapping[str, Any]) -> float:
        """The total for ``{decision: format or architecture choice}`` (every decision must be given)."""
        chosen = {name: architecture.choice(fmt) for name, fmt in assignment.items()}
        missing = (set(self.decisions) | set(self.architecture)) - set(chosen)
        if missing:
            raise ValueError(f"No format given for decisions {sorted(missing)}.")
        if self.table is not None:
            return self.table.cost({e.path: chosen.get(e.weight_decision) or formats.get("fp32") for e in self.layers})
        return float(sum(self.layer_cost(e, chosen.get(e.weight_decision), chosen.get(e.activation_decision), chosen)
                         for e in self.layers))

    def uniform(self, fmt: Any) -> float:
        """The cost of the model with every searchable layer in `fmt`, whatever its choices (the largest architecture)."""
        fmt = formats.get(fmt)
        if self.table is not None:
            return self.table.cost({e.path: fmt if e.weight_choices else formats.get("fp32") for e in self.layers})
        return float(sum(self.layer_cost(e, fmt if e.weight_choices else None,
                                         fmt if e.activation_choices else None) for e in self.layers))

    def bounds(self) -> tuple[float, float]:
        """The cheapest and dearest cost reachable with the choices of the search space.

        For a table, the cheaper and dearer of every decision at its
        cheapest (dearest) layer entry and every uniform assignment: exact
        for sums of layers, an assignment's true cost where a measured table
        adds costs between layers.
        """
        if self.table is not None:
            totals = [self.cost(assignment) for assignment in self._table_candidates()]
            return min(totals), max(totals)
        totals = []
        for pick in (min, max):
            # Every metric grows with the bit width and with each architecture size, and each layer's
            # cost is a product of one factor per decision.
            totals.append(self.cost({name: pick(choices, key=lambda f: (architecture.rank(f), f.name))
                                     for name, choices in {**self.decisions, **self.architecture}.items()}))
        return totals[0], totals[1]

    def _table_candidates(self):
        rows = {}
        for entry in self.layers:
            if entry.weight_decision is not None:
                rows.setdefault(entry.weight_decision, []).append(self.table.layers[entry.path])
        for pick in (min, max):
            yield {name: pick(choices, key=lambda f: sum(row.get(f.name, math.inf) for row in rows.get(name, [])))
                   for name, choices in self.decisions.items()}
        for width in range(max(len(choices) for choices in self.decisions.values())):
            yield {name: choices[min(width, len(choices) - 1)] for name, choices in self.decisions.items()}

    def _layer_tables(self, decision_order: list[str]):
        """Per layer: decision positions (-1: float) and per-choice costs, as arrays."""
        position = {name: i for i, name in enumerate(decision_order)}
        width = self._width()
        weights = np.array([position.get(e.weight_decision, -1) for e in self.layers], np.int32)
        activations = np.array([position.get(e.activation_decision, -1) for e in self.layers], np.int32)
        bits = np.full((len(decision_order) + 1, width), float(FLOAT_BITS), np.float32)
        for name, choices in self.decisions.items():
            bits[position[name], :len(choices)] = [f.bits for f in choices]
        table = np.zeros((len(self.layers), width), np.float32)
        if self.table is not None:
            for i, e in enumerate(self.layers):
                for k, f in enumerate(e.weight_choices):
                    table[i, k] = self.table.layers[e.path].get(f.name, np.nan)
        return weights, activations, bits, table

    def _width(self) -> int:
        """The most choices of any decision: the width of the controller's rows."""
        return max([len(choices) for choices in {**self.decisions, **self.architecture}.values()])

    def _architecture_arrays(self, decision_order: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per layer and factor: its decision's row (`len(decision_order)`: no factor) and its value per choice.

        Built once per decision order: the budget's local search costs many batches of policies.
        """
        key = tuple(decision_order)
        if key not in self._architecture_cache:
            position = {name: i for i, name in enumerate(decision_order)}
            slots = max(len(e.factors) for e in self.layers)
            rows = np.full((len(self.layers), slots), len(decision_order), np.int32)
            values = np.zeros((len(self.layers), slots, self._width()), np.float32)
            values[..., 0] = 1.0
            for i, entry in enumerate(self.layers):
                for j, factor in enumerate(entry.factors):
                    rows[i, j] = position[factor.decision]
                    values[i, j, :len(factor.fractions)] = [float(f) for f in factor.fractions]
            self._architecture_cache[key] = rows, values
        return self._architecture_cache[key]

    def _architecture_scale(self, picks, decision_order: list[str]):
        """Per layer, the part its architecture choices use, from `picks` ([..., decisions + 1, width]: one-hot
        choices or probabilities, the last row picking choice 0)."""
        if not self.architecture:
            return 1.0
        rows, values = self._architecture_arrays(decision_order)
        chosen = ops.take(picks, rows, axis=-2)  # [..., layers, slots, width]
        return ops.prod(ops.sum(chosen * values, axis=-1), axis=-1)

    def _conversion_arrays(self):
        """A measured table's conversions as arrays, built once: the integer flags and, per kind, its costs and neighbours.

        Returns ``[layers, width]`` 1.0 where a layer's weight choice runs on
        integer inputs, and ``[(costs [layers], neighbours [layers, n])]`` for
        the QUANTIZE (neighbours: producers) and the DEQUANTIZE (consumers);
        a neighbour indexes the layers, then a padding column that counts as
        integer, then the model's ends, which count as float.
        """
        paths = [e.path for e in self.layers]
        position = {path: i for i, path in enumerate(paths)}
        one, zero = len(paths), len(paths) + 1
        width = max(len(choices) for choices in self.decisions.values())
        integer = np.zeros((len(paths), width), np.float32)
        for i, e in enumerate(self.layers):
            for k, f in enumerate(e.weight_choices):
                integer[i, k] = float(self.table.is_integer(e.path, f.name))
        conversions = []
        for costs, neighbours in ((self.table.quantize, self.table.producers),
                                  (self.table.dequantize, self.table.consumers())):
            if not costs:
                continue
            matrix = np.full((len(paths), max([len(neighbours.get(p, [])) for p in paths] + [1])), one, np.int32)
            for i, path in enumerate(paths):
                for j, other in enumerate(neighbours.get(path, [])):
                    matrix[i, j] = position.get(other, zero)
            conversions.append((np.array([costs.get(p, 0.0) for p in paths], np.float32), matrix))
        return integer, conversions

    def _between_layers(self, picks):
        """What a measured table adds to its layers for the weight choices `picks` ([..., layers, width] one-hot).

        The fixed cost, a QUANTIZE where an integer layer reads a float
        tensor (or the model input) and a DEQUANTIZE where a float layer
        (or the model output) reads an integer layer's output. Probabilities
        in place of one-hot picks give its expectation when neighbours'
        decisions are independent.
        """
        chosen_integer = ops.sum(picks * self._integer, axis=-1)
        extended = ops.concatenate([chosen_integer, ops.ones_like(chosen_integer[..., :1]),
                                    ops.zeros_like(chosen_integer[..., :1])], axis=-1)
        total = ops.convert_to_tensor(float(self.table.fixed))
        for costs, neighbours in self._conversions:
            all_integer = ops.prod(ops.take(extended, neighbours, axis=-1), axis=-1)
            total = total + ops.sum(costs * chosen_integer * (1.0 - all_integer), axis=-1)
        return total

    def graph_cost(self, indices, decision_order: list[str]):
        """The cost of choice `indices` ([..., decisions] int, in `decision_order`), in graph ops.

        Leading dimensions are a batch of policies: one step's sample in the
        search step, every neighbour of a policy in `budget`.
        """
        weights, activations, bits, table = self._layer_tables(decision_order)
        # Float layers point at an extra row of 32-bit "choices", selected by index 0.
        w_rows = np.where(weights < 0, len(decision_order), weights)
        a_rows = np.where(activations < 0, len(decision_order), activations)
        indices = ops.cast(indices, "int32")
        padded = ops.concatenate([indices, ops.zeros_like(indices[..., :1])], axis=-1)
        width = bits.shape[1]
        w_pick = ops.one_hot(ops.take(padded, w_rows, axis=-1), width)  # [..., layers, width]
        a_pick = ops.one_hot(ops.take(padded, a_rows, axis=-1), width)
        w_bits = ops.sum(w_pick * bits[w_rows], axis=-1)
        a_bits = ops.sum(a_pick * bits[a_rows], axis=-1)
        if self.metric in ("bops", "size"):
            scale = self._architecture_scale(ops.one_hot(padded, self._width()), decision_order)
        if self.metric == "bops":
            macs = np.array([e.macs for e in self.layers], np.float32)
            fixed = float(sum(e.fixed_bops for e in self.layers))
            return ops.sum(macs * scale * w_bits * a_bits, axis=-1) + fixed
        if self.metric == "size":
            return ops.sum(np.array([e.params for e in self.layers], np.float32) * scale * w_bits, axis=-1)
        # A choice the table lacks stays NaN: no silent zero cost.
        layer_sum = ops.sum(ops.where(w_pick > 0, table, 0.0), axis=(-2, -1))
        return layer_sum + self._between_layers(w_pick)

    def expected_cost(self, probabilities, decision_order: list[str]):
        """The cost expected under a policy ([decisions, max choices] probabilities)."""
        weights, activations, bits, table = self._layer_tables(decision_order)
        p = ops.concatenate([ops.cast(probabilities, "float32"),
                             ops.one_hot(ops.zeros((1,), "int32"), bits.shape[1])], axis=0)
        w_rows = np.where(weights < 0, len(decision_order), weights)
        a_rows = np.where(activations < 0, len(decision_order), activations)
        w_p, a_p = ops.take(p, w_rows, axis=0), ops.take(p, a_rows, axis=0)
        w_bits, a_bits = bits[w_rows], bits[a_rows]
        if self.metric in ("bops", "size"):
            # A layer's architecture decisions are distinct from each other and from its formats: E[product]
            # is the product of expectations.
            scale = self._architecture_scale(p, decision_order)
        if self.metric == "bops":
            macs = np.array([e.macs for e in self.layers], np.float32)
            shared = (weights == activations) & (weights >= 0)
            # One decision for both: E[b^2]; two independent decisions: E[b_w] E[b_a].
            joint = ops.sum(w_p * w_bits * a_bits, axis=1)
            apart = ops.sum(w_p * w_bits, axis=1) * ops.sum(a_p * a_bits, axis=1)
            fixed = float(sum(e.fixed_bops for e in self.layers))
            return ops.sum(macs * scale * ops.where(shared, joint, apart)) + fixed
        if self.metric == "size":
            params = np.array([e.params for e in self.layers], np.float32)
            return ops.sum(params * scale * ops.sum(w_p * w_bits, axis=1))
        layer_sum = ops.sum(w_p * ops.convert_to_tensor(np.nan_to_num(table)))
        return layer_sum + self._between_layers(w_p)

    def target(self, spec: Any) -> float:
        """An absolute target from a number, a format name ("int4": the uniform INT4
        cost) or a format times a factor ("int4*1.25" or ("int4", 1.25)).

        Raises ValueError, naming both bounds, when the target cannot be reached.
        """
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            value = float(spec)
        else:
            factor = 1.0
            if isinstance(spec, (tuple, list)) and len(spec) == 2:
                spec, factor = spec
            elif isinstance(spec, str) and "*" in spec:
                spec, factor_text = spec.split("*", 1)
                try:
                    factor = float(factor_text)
                except ValueError:
                    raise ValueError(f"Bad cost target factor {factor_text!r} in {spec!r}*{factor_text!r}.") from None
            value = self.uniform(formats.get(str(spec).strip())) * float(factor)
        low, high = self.bounds()
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(
                f"Cost target {value:.6g} ({self.metric}) is outside what the search space can reach: "
                f"between {low:.6g} (every decision at its cheapest choice) and {high:.6g} (at its dearest)."
            )
        return value


def _current_assignment(model) -> dict[str, architecture.Choice]:
    """The choice every decision of `model`'s layers holds now: formats, and architecture choices."""
    assignment = {}
    for _, layer in walk_layers(model):
        if layers.is_searchable(layer):
            assignment.update(layer.current_formats())
        inner = layer.layer if layers.is_searchable(layer) else layer
        if blocks.is_architecture(inner):
            assignment.update({name: architecture.get(c) for name, c in inner.current_choices().items()})
    return assignment


def bops(model: keras.Model, fmt: Any = None) -> float:
    """Total BOPs of a searchable model: every layer at `fmt` if given, else in its current formats."""
    cost = CostModel(model, "bops")
    return cost.uniform(fmt) if fmt is not None else cost.cost(_current_assignment(model))


def size_bits(model: keras.Model, fmt: Any = None) -> float:
    """Bits of the quantized weights: every layer at `fmt` if given, else in its current formats."""
    cost = CostModel(model, "size")
    return cost.uniform(fmt) if fmt is not None else cost.cost(_current_assignment(model))


def summary(model: keras.Model) -> str:
    """A table per searchable layer: MACs, params, current format, BOPs and weight bytes.

    A searched architecture's layers count the part their current choices use.
    """
    cost = CostModel(model)
    assignment = _current_assignment(model)
    rows = []
    for e in cost.layers:
        weight = assignment.get(e.weight_decision)
        activation = assignment.get(e.activation_decision)
        name = (weight.name if weight else "float") + (
            "" if activation == weight else f"/{activation.name if activation else 'float'}")
        scale = e.scale(assignment)
        rows.append((e.path, int(e.macs * scale), int(e.params * scale), name,
                     cost.layer_cost(e, weight, activation, assignment), float(e.params * scale * bits(weight) / 8)))
    width = max(len(r[0]) for r in rows + [("layer",)])
    lines = [f"{'layer':<{width}} {'MACs':>14} {'params':>10} {'format':>12} {'GBOPs':>10} {'bytes':>12}"]
    lines += [f"{p:<{width}} {m:>14,} {n:>10,} {f:>12} {b / 1e9:>10.4f} {s:>12,.0f}" for p, m, n, f, b, s in rows]
    lines.append(f"{'total':<{width}} {sum(r[1] for r in rows):>14,} {sum(r[2] for r in rows):>10,} {'':>12} "
                 f"{sum(r[4] for r in rows) / 1e9:>10.4f} {sum(r[5] for r in rows):>12,.0f}")
    return "\n".join(lines)



