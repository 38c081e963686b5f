"""Searchable quantized layers: QuantizeConfigs and the wrappers that apply them.

A wrapper quantizes its layer's weights (per output channel) and inputs (per
tensor) in the format its decision currently holds in a `FormatState`, with a
clip per format; switching formats never retraces.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from fliqs_keras import blocks, clipping, format_state, formats, quantizers

ACTIVATION_FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Candidate clip fractions of max |x| for the running activation clips."""
ACTIVATION_SAMPLE = 4
"""Examples of each training batch on which the activation clip is calibrated."""


@keras.saving.register_keras_serializable(package="fliqs_keras")
class QuantizeConfig:
    """Which weights and inputs of a layer are quantized.

    Args:
        weights: ``{attribute path: first channel axis}``, e.g. ``{"kernel": -1}``
            for Dense and Conv2D, ``{"kernel": 2}`` for DepthwiseConv2D (its
            channels are in x multiplier), ``{"_query_dense.kernel": 1, ...}``
            for the projections inside MultiHeadAttention.
        quantize_inputs: whether the layer's input tensors are quantized.
        per_channel_weights: one clip per output channel (else per tensor).
    """

    def __init__(self, weights: dict[str, int], quantize_inputs: bool = True,
                 per_channel_weights: bool = True):
        if not weights and not quantize_inputs:
            raise ValueError("A QuantizeConfig that quantizes neither weights nor inputs does nothing.")
        self.weights = {str(path): int(axis) for path, axis in weights.items()}
        self.quantize_inputs = bool(quantize_inputs)
        self.per_channel_weights = bool(per_channel_weights)

    def get_weights(self, layer: keras.layers.Layer) -> list[tuple[str, Any]]:
        """The (path, variable) pairs to quantize; a missing path is an error naming it."""
        result = []
        for path in self.weights:
            target = layer
            for part in path.split("."):
                target = getattr(target, part, None)
                if target is None:
                    raise ValueError(
                        f"Layer {layer.name!r} ({type(layer).__name__}) has no weight {path!r} to quantize."
                    )
            result.append((path, target))
        return result

    def channels(self, path: str, shape: Sequence[int]) -> int:
        """How many per-channel scales the weight at `path` of this `shape` has (1: per tensor)."""
        if not self.per_channel_weights:
            return 1
        return int(np.prod(shape[self.weights[path] % len(shape):]))

    def get_config(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "quantize_inputs": self.quantize_inputs,
                "per_channel_weights": self.per_channel_weights}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantizeConfig":
        return cls(**config)

    def __eq__(self, other) -> bool:
        return isinstance(other, QuantizeConfig) and self.get_config() == other.get_config()

    def __repr__(self) -> str:
        return f"QuantizeConfig({self.get_config()})"


_ATTENTION_WEIGHTS = {"_query_dense.kernel": 1, "_key_dense.kernel": 1, "_value_dense.kernel": 1,
                      "_output_dense.kernel": -1}

DEFAULT_CONFIGS: dict[type, QuantizeConfig] = {
    keras.layers.Conv1D: QuantizeConfig({"kernel": -1}),
    keras.layers.Conv2D: QuantizeConfig({"kernel": -1}),
    keras.layers.DepthwiseConv2D: QuantizeConfig({"kernel": 2}),
    keras.layers.Dense: QuantizeConfig({"kernel": -1}),
    keras.layers.EinsumDense: QuantizeConfig({"kernel": -1}),
    keras.layers.MultiHeadAttention: QuantizeConfig(_ATTENTION_WEIGHTS),
    blocks.MaskedConv2D: QuantizeConfig({"kernel": -1}),
    blocks.MaskedDepthwiseConv2D: QuantizeConfig({"kernel": 2}),
}
"""The layer types searched by default (exact types: a subclass may change `call`)."""


def default_config(layer: keras.layers.Layer) -> QuantizeConfig | None:
    """The built-in QuantizeConfig of a layer's exact type, or None when unsupported."""
    return DEFAULT_CONFIGS.get(type(layer))


def _format_names(fmts) -> list[str]:
    return [formats.get(f).name for f in fmts]


def _nonnegative_grid(fmt: formats.Format) -> formats.Grid:
    """The grid used for inputs never seen negative: unsigned for integers."""
    if isinstance(fmt, formats.IntFormat) and fmt.signed:
        return formats.IntFormat(fmt.bits, signed=False).grid
    return fmt.grid


@dataclasses.dataclass(frozen=True)
class FrozenWeight:
    """One weight of a layer in its chosen format: ``values == codes * scale`` along `channel_axis`."""

    path: str
    fmt: formats.Format
    values: np.ndarray
    scale: np.ndarray  # float32, one per channel
    channel_axis: int


@dataclasses.dataclass(frozen=True)
class FrozenInput:
    """One input of a layer in its chosen format, at its trained clip."""

    name: str
    fmt: formats.Format
    clip: float
    signed: bool

    @property
    def grid(self) -> formats.Grid:
        """The input's format as the quantizer's `Grid`, on the signed or unsigned side it trained."""
        return self.fmt.grid if self.signed else _nonnegative_grid(self.fmt)


class _SearchableWrapper(keras.layers.Wrapper):
    """State and quantizers shared by the wrappers of each layer family.

    Args:
        layer: the layer to quantize.
        weight_formats, activation_formats: the choices of its weights and of
            its inputs (the inputs default to the weights' choices).
        weight_decision, activation_decision: the decisions they belong to
            (default: the layer's name).
        quantize_config: which weights and inputs are quantized (default:
            the built-in one of the layer's type).
        activation_momentum: momentum of the running input clips.
        initial_formats: ``{decision: format}`` the layer holds when used
            alone (in a SearchModel, the model's state holds them).
    """

    input_names: tuple[str, ...] = ()

    def __init__(
        self,
        layer: keras.layers.Layer,
        weight_formats: Sequence[Any] = ("int8",),
        activation_formats: Sequence[Any] | None = None,
        weight_decision: str | None = None,
        activation_decision: str | None = None,
        quantize_config: QuantizeConfig | dict | None = None,
        activation_momentum: float = 0.9,
        initial_formats: dict[str, str] | None = None,
        **kwargs,
    ):
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        if isinstance(quantize_config, dict):
            quantize_config = keras.saving.deserialize_keras_object(quantize_config)
        self.quantize_config = quantize_config or default_config(layer)
        if self.quantize_config is None:
            raise ValueError(
                f"Layer {layer.name!r} of type {type(layer).__name__} has no built-in QuantizeConfig; "
                f"supported: {sorted(t.__name__ for t in DEFAULT_CONFIGS)}. Pass quantize_config=..."
            )
        self.weight_formats = tuple(formats.get(f) for f in weight_formats)
        activation_formats = weight_formats if activation_formats is None else activation_formats
        self.activation_formats = (
            tuple(formats.get(f) for f in activation_formats) if self.quantize_config.quantize_inputs else ()
        )
        if not self.weight_formats and not self.activation_formats:
            raise ValueError(f"Layer {layer.name!r}: no formats to choose from; leave it unwrapped instead.")
        self.weight_decision = weight_decision or layer.name
        self.activation_decision = activation_decision or self.weight_decision
        self.joint = (
            self.weight_decision == self.activation_decision
            and bool(self.weight_formats) and self.weight_formats == self.activation_formats
        )
        if self.weight_decision == self.activation_decision and not self.joint and (
            self.weight_formats and self.activation_formats
        ):
            raise ValueError(
                f"Layer {layer.name!r}: weights and activations share decision "
                f"{self.weight_decision!r} but have different choices."
            )
        if not 0 <= activation_momentum < 1:
            raise ValueError(f"activation_momentum must be in [0, 1), got {activation_momentum}.")
        self.activation_momentum = float(activation_momentum)
        self._bind(None)
        self._initial_formats: dict[str, str] = {}
        for decision, fmt in (initial_formats or {}).items():
            self.set_format(decision, fmt)

    # --- state -----------------------------------------------------------------

    def _build_state(self):
        if self._format_state is None:
            # Used alone (not in a SearchModel, which binds its own state before any call).
            state = format_state.FormatState(
                {name: [f.name for f in fmts] for name, fmts in self.decisions.items()}, name=f"{self.name}_formats")
            state.set(self._initial_formats)
            self._bind(state, private=True)
        self._fractions = []
        for path, variable in self._weights_to_quantize():
            channels = self.quantize_config.channels(path, variable.shape)
            self._fractions.append(self.add_weight(
                name=path.replace(".", "_").lstrip("_") + "_clip_fractions",
                shape=(len(self.weight_formats), channels), initializer="ones", trainable=False,
                aggregation="mean"))
        self._input_state = []
        for name in self.input_names if self.activation_formats else ():
            rows = len(self.activation_formats)
            self._input_state.append((
                self.add_weight(name=f"{name}_clips", shape=(rows,), initializer="zeros",
                                trainable=False, aggregation="mean"),
                self.add_weight(name=f"{name}_clip_counts", shape=(rows,), dtype="int32",
                                initializer="zeros", trainable=False, aggregation="only_first_replica"),
                self.add_weight(name=f"{name}_negative", shape=(), initializer="zeros",
                                trainable=False, aggregation="mean"),
            ))

    def _bind(self, state: format_state.FormatState, private: bool = False):
        # Not tracked as a sub-layer: the state belongs to the model (or, used alone, to no saved graph),
        # so its variables are saved once, by their owner.
        object.__setattr__(self, "_format_state", state)
        object.__setattr__(self, "_private_state", private)

    def bind_formats(self, state: format_state.FormatState):
        """Makes `state` (a SearchModel's) the source of this layer's current formats.

        The formats the layer held alone carry over into `state`.

        Raises:
            ValueError: when `state` lacks one of this layer's decisions or
                gives it other choices, or the layer already reads another
                model's state.
        """
        if self._format_state is state:
            return
        if self._format_state is not None and not self._private_state:
            raise ValueError(f"Layer {self.name!r} already belongs to another searchable model; build a new model "
                             "with fliqs_keras.apply instead of sharing its layers.")
        for name, choices in self.decisions.items():
            if state.choices.get(name) != choices:
                raise ValueError(f"Layer {self.name!r}: decision {name!r} has choices {_format_names(choices)} "
                                 f"here but {_format_names(state.choices.get(name, ()))} in the model's state.")
        held = self.current_formats() if self._format_state is not None else self._initial_formats
        state.set(held)
        self._bind(state)

    def _weights_to_quantize(self):
        return self.quantize_config.get_weights(self.layer) if self.weight_formats else []

    @property
    def decisions(self) -> dict[str, tuple[formats.Format, ...]]:
        """The decisions this layer takes part in, with their choices."""
        result = {}
        if self.weight_formats:
            result[self.weight_decision] = self.weight_formats
        if self.activation_formats:
            result[self.activation_decision] = self.activation_formats
        return result

    def _weight_index(self):
        return self._format_state.index(self.weight_decision)

    def _activation_index(self):
        return self._format_state.index(self.activation_decision)

    def set_format(self, decision: str, fmt: Any):
        """Makes `fmt` the current choice of `decision` (an assignment: no retrace).

        Raises:
            ValueError: for a decision this layer does not take part in, or a
                format not among its choices.
        """
        if decision not in self.decisions:
            raise ValueError(f"Layer {self.name!r} has no decision {decision!r}; it has {list(self.decisions)}.")
        fmt = formats.get(fmt)
        if fmt not in self.decisions[decision]:
            raise ValueError(
                f"Layer {self.name!r}, decision {decision!r}: {fmt.name} is not among the choices "
                f"{_format_names(self.decisions[decision])}."
            )
        if self._format_state is None:
            self._initial_formats[decision] = fmt.name
            return
        self._format_state.set({decision: fmt})

    def current_formats(self) -> dict[str, formats.Format]:
        """The format each decision of this layer holds now."""
        if self._format_state is None:
            return {name: formats.get(self._initial_formats.get(name, choices[0]))
                    for name, choices in self.decisions.items()}
        held = self._format_state.formats()
        return {name: held[name] for name in self.decisions}

    # --- numerics ------------------------------------------------------------------

    def calibrate_weights(self, fractions=clipping.DEFAULT_FRACTIONS):
        """Chooses, per format and output channel, the MSE-optimal clip fraction of max |w|."""
        for (path, variable), table in zip(self._weights_to_quantize(), self._fractions):
            matrix = self._as_matrix(path, variable)
            rows = [clipping.mse_fraction(matrix, fmt, axis=1, fractions=fractions)
                    for fmt in self.weight_formats]
            table.assign(ops.cast(ops.stack(rows), table.dtype))

    def _as_matrix(self, path, weight):
        channels = self.quantize_config.channels(path, weight.shape)
        weight = ops.convert_to_tensor(weight)
        if blocks.is_architecture(self.layer):
            # Only the part the chosen architecture uses sets the scale: a plain layer of that shape gets the same one.
            weight = self.layer.active_weight(path, weight)
        return ops.reshape(weight, (-1, channels))

    def _quantized_weights(self):
        if not self.weight_formats:
            return []
        index = self._weight_index()
        grid = ops.take(quantizers.grid_table(self.weight_formats), index, axis=0)
        return [(variable, ops.reshape(quantizers.fake_quant(matrix, grid, clip=clip, axis=1), variable.shape))
                for _, variable, matrix, clip in self._weight_clips(index)]

    def _weight_clips(self, index):
        """(path, variable, matrix, per-channel clip) of each quantized weight in choice `index`."""
        for (path, variable), table in zip(self._weights_to_quantize(), self._fractions):
            matrix = self._as_matrix(path, variable)
            yield path, variable, matrix, ops.take(table, index, axis=0) * clipping.max_abs(matrix, axis=1)

    def frozen_weights(self) -> list[FrozenWeight]:
        """The weights in their current format, with the per-channel scales they were quantized at."""
        if not self.weight_formats:
            return []
        index = self._weight_index()
        fmt = self.weight_formats[int(keras.ops.convert_to_numpy(index))]
        values = {id(v): q for v, q in self._quantized_weights()}
        grid = quantizers.grid_tensor(fmt)
        frozen = []
        for path, variable, _, clip in self._weight_clips(index):
            scale = quantizers.scale(grid, ops.cast(clip, "float32"))
            frozen.append(FrozenWeight(
                path, fmt, np.asarray(keras.ops.convert_to_numpy(values[id(variable)])),
                np.asarray(keras.ops.convert_to_numpy(scale), np.float32),
                self.quantize_config.weights[path] % len(variable.shape)))
        return frozen

    def frozen_inputs(self) -> list[FrozenInput | None]:
        """Per input slot: its current format, trained clip and sign; None where inputs stay float.

        Raises ValueError naming the layer when the current format never saw a
        training step (its clip is not calibrated).
        """
        if not self.activation_formats:
            return [None] * len(self.input_names)
        index = int(keras.ops.convert_to_numpy(self._activation_index()))
        fmt = self.activation_formats[index]
        result = []
        for name, (clips, counts, negative) in zip(self.input_names, self._input_state):
            counts = keras.ops.convert_to_numpy(counts)
            if name != self.input_names[0] and not counts.any():  # never passed (MHA's key)
                result.append(None)
                continue
            if counts[index] == 0:
                raise ValueError(
                    f"Layer {self.name!r}: input {name!r} in {fmt.name} has no trained clip (no training step "
                    f"ran in that format); train or fine-tune the model in its chosen formats before export.")
            signed = bool(keras.ops.convert_to_numpy(negative) > 0)
            result.append(FrozenInput(name, fmt, float(keras.ops.convert_to_numpy(clips)[index]), signed))
        return result

    def _quantize_input(self, slot: int, x, training):
        if not self.activation_formats or x is None:
            return x
        clips, counts, negative = self._input_state[slot]
        index = self._activation_index()
        signed = quantizers.grid_table(self.activation_formats)
        unsigned = ops.convert_to_tensor(
            np.asarray([_nonnegative_grid(f) for f in self.activation_formats], np.float32))
        x32 = ops.stop_gradient(ops.cast(x, "float32"))
        batch_negative = ops.cast(ops.min(x32) < 0, "float32")
        if training:
            negative.assign(ops.maximum(negative, batch_negative))
        # A format never calibrated (no training step in it yet) takes its sign
        # and its clip (max |x|) from the batch itself.
        calibrated = ops.take(counts, index) > 0
        is_signed = ops.where(calibrated, negative.value, batch_negative) > 0
        grid = ops.where(is_signed, ops.take(signed, index, axis=0), ops.take(unsigned, index, axis=0))
        if training:
            batch_clip = clipping.mse(x32[:ACTIVATION_SAMPLE], grid, fractions=ACTIVATION_FRACTIONS)
            clipping.update_running(clips, counts, index, batch_clip, self.activation_momentum)
            calibrated = ops.take(counts, index) > 0
        clip = ops.where(calibrated, ops.take(clips, index), ops.max(ops.abs(x32)))
        return quantizers.fake_quant(x, grid, clip=clip)

    def _call_layer(self, *args, **kwargs):
        quantized = self._quantized_weights()
        replaced = {id(variable) for variable, _ in quantized}
        # A scope hides the one around it (JAX's training step maps every variable in one), so the
        # layer's other variables are mapped to the values they have there.
        others = [(v, v.value) for v in self.layer.variables if id(v) not in replaced]
        if blocks.is_architecture(self.layer):
            # It reads its architecture choices from the format state inside the scope too.
            others += [(v, v.value) for v in self._format_state.variables]
        with keras.StatelessScope(state_mapping=quantized + others):
            return self.layer(*args, **kwargs)

    # --- serialisation ---------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "weight_formats": _format_names(self.weight_formats),
            "activation_formats": _format_names(self.activation_formats),
            "weight_decision": self.weight_decision,
            "activation_decision": self.activation_decision,
            "quantize_config": keras.saving.serialize_keras_object(self.quantize_config),
            "activation_momentum": self.activation_momentum,
        })
        if self._format_state is None or self._private_state:
            # Used alone, the layer's current formats are its own to save; in a SearchModel the model saves them.
            config["initial_formats"] = {name: fmt.name for name, fmt in self.current_formats().items()}
        return config


@keras.saving.register_keras_serializable(package="fliqs_keras")
class QuantizeWrapper(_SearchableWrapper):
    """Searchable quantization of a one-input layer: Conv1D, Conv2D, DepthwiseConv2D, Dense, EinsumDense."""

    input_names = ("input",)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._build_state()

    def call(self, inputs, training=None):
        return self._call_layer(self._quantize_input(0, inputs, training))

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


@keras.saving.register_keras_serializable(package="fliqs_keras")
class AttentionQuantizeWrapper(_SearchableWrapper):
    """Searchable quantization of MultiHeadAttention: its four projections and its inputs.

    The attention matmuls themselves (scores and the weighted sum) stay in float.
    """

    input_names = ("query", "value", "key")

    def build(self, query_shape, value_shape, key_shape=None):
        if not self.layer.built:
            self.layer.build(query_shape, value_shape, key_shape)
        self._build_state()

    def call(self, query, value, key=None, training=None, **kwargs):
        query_q = self._quantize_input(0, query, training)
        value_q = query_q if value is query else self._quantize_input(1, value, training)
        key_q = None if key is None else self._quantize_input(2, key, training)
        return self._call_layer(query_q, value_q, key_q, training=training, **kwargs)

    def compute_output_shape(self, query_shape, value_shape, key_shape=None):
        return self.layer.compute_output_shape(query_shape, value_shape, key_shape)


def wrap(layer: keras.layers.Layer, weight_formats, activation_formats=None, **kwargs) -> _SearchableWrapper:
    """The wrapper of the right family for `layer`."""
    cls = AttentionQuantizeWrapper if isinstance(layer, keras.layers.MultiHeadAttention) else QuantizeWrapper
    return cls(layer, weight_formats, activation_formats, **kwargs)


def is_searchable(layer: Any) -> bool:
    """Whether `layer` is a searchable wrapper."""
    return isinstance(layer, _SearchableWrapper)

