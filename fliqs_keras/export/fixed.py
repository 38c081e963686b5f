"""The searched model with its chosen formats frozen into Keras layers, without wrappers.

`fixed_model` holds quantized weights and rounds the quantized layers' inputs
(`InputQuantizer`); `float_model` folds batch norms into the quantized layers
before them, for the converter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np

from fliqs_keras import formats, layers, quantizers
from fliqs_keras.graph import sole_producer, walk_layers
from fliqs_keras.search_model import check_plain


@keras.saving.register_keras_serializable(package="fliqs_keras")
class InputQuantizer(keras.layers.Wrapper):
    """A plain layer whose inputs are rounded onto fixed formats at fixed clips.

    Args:
        layer: the layer to call (weights already in their format).
        inputs: per input slot of the layer: None (left as is) or a dict with
            ``format``, ``clip`` and ``signed``.
        input_names: the layer's names of those slots (``input``, or MHA's
            ``query``, ``value``, ``key``), for inputs passed by keyword.
    """

    def __init__(self, layer: keras.layers.Layer, inputs: list[dict[str, Any] | None],
                 input_names: tuple[str, ...] = ("input",), **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        self.input_specs = [None if spec is None else dict(spec) for spec in inputs]
        self.input_names = tuple(input_names)
        self._grids = []
        for spec in self.input_specs:
            if spec is None:
                self._grids.append(None)
                continue
            frozen = layers.FrozenInput("input", formats.get(spec["format"]), float(spec["clip"]),
                                        bool(spec["signed"]))
            self._grids.append(np.asarray(frozen.grid, np.float32))

    def build(self, *shapes, **kwargs):
        # The inner layer builds itself on its first call, with its own argument
        # names: no compute_output_shape here, so symbolic calls trace `call`.
        self.built = True

    def _round(self, slot, x):
        spec = self.input_specs[slot] if slot < len(self.input_specs) else None
        if spec is None or x is None:
            return x
        return quantizers.fake_quant(x, self._grids[slot], clip=spec["clip"])

    def call(self, *args, **kwargs):
        args = [self._round(slot, x) for slot, x in enumerate(args)]
        for slot, name in enumerate(self.input_names):
            if name in kwargs:
                kwargs[name] = self._round(slot, kwargs[name])
        return self.layer(*args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "inputs": self.input_specs, "input_names": list(self.input_names)}


@keras.saving.register_keras_serializable(package="fliqs_keras")
class SaturatedInput(keras.layers.Wrapper):
    """A layer whose (single) input is first clipped to [low, high] (low None: only from above)."""

    def __init__(self, layer: keras.layers.Layer, low: float | None, high: float, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        self.low, self.high = low, float(high)

    def build(self, *shapes, **kwargs):
        self.built = True

    def call(self, inputs, **kwargs):
        inputs = keras.ops.minimum(inputs, self.high)
        if self.low is not None:
            inputs = keras.ops.maximum(inputs, self.low)
        return self.layer(inputs, **kwargs)

    def get_config(self):
        return {**super().get_config(), "low": self.low, "high": self.high}


@keras.saving.register_keras_serializable(package="fliqs_keras")
class FoldedNorm(keras.layers.Layer):
    """The identity, in the place (and under the name) of a batch norm folded into the layer before it."""

    def call(self, inputs, **kwargs):
        return inputs

    def compute_output_shape(self, input_shape, **kwargs):
        return input_shape


@dataclasses.dataclass(frozen=True)
class ExportedWeight:
    """A quantized kernel as exported: ``values == codes * scale`` element for element, in float32.

    `scale` has one entry per channel of the TFLite tensor (output channels;
    for a depthwise kernel, input channels times the multiplier).
    """

    layer: str
    path: str
    fmt: formats.Format
    values: np.ndarray  # in the Keras layout
    scale: np.ndarray

    @property
    def key(self) -> str:
        """The layer path; for a weight of a sublayer (attention's ``_query_dense.kernel``), and that sublayer."""
        return self.layer if self.path == "kernel" else f"{self.layer}/{self.path.removesuffix('.kernel')}"

    @property
    def tensor_name(self) -> str:
        """The name of its tensor in the TFLite file (its op's output is named ``fliqs/<key>``)."""
        return f"fliqs/{self.key}/kernel"


_FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
_PROJECTIONS = (keras.layers.EinsumDense, keras.layers.MultiHeadAttention)


def _folds(model: keras.Model) -> dict[str, keras.layers.BatchNormalization]:
    """{path of a quantized layer: the batch norm that alone consumes its output, right after it}."""
    result = {}
    for prefix, container in [("", model)] + [(p + "/", l) for p, l in walk_layers(model)
                                               if isinstance(l, keras.Model)]:
        for norm in container.layers:
            if not isinstance(norm, keras.layers.BatchNormalization):
                continue
            producer = sole_producer(norm)
            axis = norm.axis if isinstance(norm.axis, int) else None
            if (producer is not None and layers.is_searchable(producer) and isinstance(producer.layer, _FOLDABLE)
                    and axis in (-1, len(norm.input.shape) - 1) and producer.weight_formats):
                result[prefix + producer.name] = norm
    return result


def _norm_factors(norm: keras.layers.BatchNormalization) -> tuple[np.ndarray, np.ndarray]:
    """(multiplier, offset) per channel: ``norm(y) == y * multiplier + offset`` in inference."""
    variance = keras.ops.convert_to_numpy(norm.moving_variance).astype(np.float32)
    mean = keras.ops.convert_to_numpy(norm.moving_mean).astype(np.float32)
    gamma = keras.ops.convert_to_numpy(norm.gamma).astype(np.float32) if norm.scale else np.ones_like(mean)
    beta = keras.ops.convert_to_numpy(norm.beta).astype(np.float32) if norm.center else np.zeros_like(mean)
    multiplier = (gamma / np.sqrt(variance + np.float32(norm.epsilon))).astype(np.float32)
    return multiplier, (beta - mean * multiplier).astype(np.float32)


def _codes(frozen: layers.FrozenWeight, scale_full: np.ndarray) -> np.ndarray:
    """The format's values at unit scale, snapped onto its grid (exact: the values are on it)."""
    grid = quantizers.grid_tensor(frozen.fmt)
    return keras.ops.convert_to_numpy(quantizers.quantize_dequantize(
        keras.ops.convert_to_tensor((frozen.values / scale_full).astype(np.float32)), grid))


def _export_kernel(wrapper, path: str, frozen: layers.FrozenWeight, norm) -> tuple[ExportedWeight, np.ndarray | None]:
    """The kernel (BN-folded when `norm` is given) and the folded bias (or None)."""
    kernel_shape = frozen.values.shape
    shape = [1] * len(kernel_shape)
    shape[frozen.channel_axis] = -1
    scale_full = np.broadcast_to(frozen.scale.reshape(shape), kernel_shape).astype(np.float32)
    codes = _codes(frozen, scale_full)
    bias = None
    if norm is not None:
        multiplier, offset = _norm_factors(norm)
        inner = wrapper.layer
        if isinstance(inner, keras.layers.DepthwiseConv2D):
            factor = multiplier.reshape(kernel_shape[-2], kernel_shape[-1])
            factor = factor.reshape((1,) * (len(kernel_shape) - 2) + factor.shape)
        else:
            factor = multiplier.reshape((1,) * (len(kernel_shape) - 1) + (-1,))
        scale_full = (scale_full * factor).astype(np.float32)
        old_bias = (keras.ops.convert_to_numpy(inner.bias).astype(np.float32) if inner.use_bias
                    else np.zeros_like(multiplier))
        bias = (old_bias * multiplier + offset).astype(np.float32)
    values = (codes * scale_full).astype(np.float32)
    if isinstance(wrapper.layer, keras.layers.DepthwiseConv2D):
        per_channel = scale_full.reshape(-1, kernel_shape[-2] * kernel_shape[-1])[0]
    else:
        per_channel = scale_full.reshape(-1, kernel_shape[-1])[0]
    return ExportedWeight(path, frozen.path, frozen.fmt, values, per_channel.astype(np.float32)), bias


def _clone(model: keras.Model, clone_layer) -> keras.Model:
    """A plain Functional copy of `model` with its layers made by `clone_layer`."""
    # Through a plain Functional view: cloning a SearchModel would make a SearchModel.
    view = keras.Model(model.inputs, model.outputs, name=model.name)
    cloned = keras.models.clone_model(view, clone_function=clone_layer, recursive=True)
    inputs = cloned.inputs[0] if len(cloned.inputs) == 1 else cloned.inputs
    outputs = cloned.outputs[0] if len(cloned.outputs) == 1 else cloned.outputs
    return keras.Model(inputs, outputs, name=model.name)


def _inner_clone(wrapper, **overrides):
    config = {**wrapper.layer.get_config(), **overrides}
    return wrapper.layer.__class__.from_config(config)


def _copy_plain_weights(source: keras.Model, target: keras.Model, skip=frozenset()):
    by_name = {layer.name: layer for layer in target.layers}
    for layer in source.layers:
        clone = by_name[layer.name]
        if isinstance(layer, keras.Model):
            _copy_plain_weights(layer, clone, skip)
        elif not layers.is_searchable(layer) and layer.weights and id(layer) not in skip:
            clone.set_weights(layer.get_weights())


def _layer_at(model: keras.Model, path: str):
    layer = model
    for part in path.split("/"):
        layer = layer.get_layer(part)
    return layer.layer if isinstance(layer, (InputQuantizer, SaturatedInput)) else layer


def _searchable(model: keras.Model) -> dict[str, Any]:
    check_plain(model, "The export")
    wrappers = {path: layer for path, layer in walk_layers(model) if layers.is_searchable(layer)}
    if not wrappers:
        raise ValueError(f"Model {model.name!r} has no searchable layers: make it with fliqs_keras.apply.")
    return wrappers


def _quantized_values(wrapper) -> list[np.ndarray]:
    """The inner layer's weights, the quantized ones in their current format."""
    quantized = {id(v): q for v, q in wrapper._quantized_weights()}
    return [np.asarray(keras.ops.convert_to_numpy(quantized.get(id(v), v))) for v in wrapper.layer.weights]


def fixed_model(model: keras.Model) -> keras.Model:
    """The searchable `model` in its current formats without wrappers.

    Raises ValueError for a model without searchable layers, or a layer whose
    current input format never trained (no clip).
    """
    wrappers = _searchable(model)
    frozen_inputs = {path: w.frozen_inputs() for path, w in wrappers.items()}

    def substitute(wrapper):
        path = next(p for p, w in wrappers.items() if w is wrapper)
        specs = [None if f is None else {"format": f.fmt.name, "clip": f.clip, "signed": f.signed}
                 for f in frozen_inputs[path]]
        inner = _inner_clone(wrapper)
        return InputQuantizer(inner, specs, wrapper.input_names) if any(s is not None for s in specs) else inner

    def clone_layer(layer):
        return substitute(layer) if layers.is_searchable(layer) else layer.__class__.from_config(layer.get_config())

    fixed = _clone(model, clone_layer)
    _copy_plain_weights(model, fixed)
    for path, wrapper in wrappers.items():
        _layer_at(fixed, path).set_weights(_quantized_values(wrapper))
    return fixed


def float_model(model: keras.Model, saturate: dict[str, tuple[float | None, float]] | None = None
                ) -> tuple[keras.Model, dict[str, ExportedWeight]]:
    """The model for the TFLite converter, and each quantized kernel as exported by `ExportedWeight.key`.

    `saturate` maps layer paths to (low or None, high): that layer's input is
    clipped to it first (where the TFLite tensor cannot saturate by itself).
    """
    saturate = saturate or {}
    wrappers = _searchable(model)
    folds = _folds(model)
    kernels, biases = {}, {}
    for path, wrapper in wrappers.items():
        frozen = [w for w in wrapper.frozen_weights() if w.path == "kernel"]
        if frozen and isinstance(wrapper.layer, _FOLDABLE):
            kernels[path], biases[path] = _export_kernel(wrapper, path, frozen[0], folds.get(path))
        elif isinstance(wrapper.layer, _PROJECTIONS):
            for weight in wrapper.frozen_weights():
                exported = ExportedWeight(path, weight.path, weight.fmt, weight.values, weight.scale)
                kernels[exported.key] = exported
    # A folded batch norm becomes the identity, so the converter has nothing left to fold.
    folded = {id(norm) for norm in folds.values()}

    def clone_layer(layer):
        if layers.is_searchable(layer):
            path = next(p for p, w in wrappers.items() if w is layer)
            inner = _inner_clone(layer, use_bias=True) if biases.get(path) is not None else _inner_clone(layer)
            return SaturatedInput(inner, *saturate[path]) if path in saturate else inner
        if id(layer) in folded:
            return FoldedNorm(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    exported = _clone(model, clone_layer)
    _copy_plain_weights(model, exported, skip=folded)
    for path, wrapper in wrappers.items():
        values = _quantized_values(wrapper)
        if path in biases:
            values[0] = kernels[path].values
            if biases[path] is not None:
                values = [kernels[path].values, biases[path]]
        _layer_at(exported, path).set_weights(values)
    return exported, kernels
