"""The chosen architecture of a searched one as a plain model, with the trained weights sliced to it.

Kernels become the chosen kernel's centre, channel counts the chosen ones;
masks disappear and a skipped block leaves only its shortcut. Format wrappers
keep their choices and the formats they hold, so the result goes through the
formats file and the TFLite export like any model `apply` made.
"""

from __future__ import annotations

import keras
import numpy as np

from fliqs_keras import blocks, layers
from fliqs_keras.search_model import SearchModel, architecture_layers, searchable_layers


def _plain(layer: keras.layers.Layer) -> keras.layers.Layer | None:
    """The plain layer of `layer`'s current choices; None where the layer passes its (first) input on."""
    if isinstance(layer, blocks.ChannelMask):
        return None
    if isinstance(layer, blocks.SkippableAdd):
        return keras.layers.Add(name=layer.name) if layer.chosen_size("block") else None
    if isinstance(layer, blocks.MaskedConv2D):
        return keras.layers.Conv2D.from_config(layer.plain_config())
    if isinstance(layer, blocks.MaskedDepthwiseConv2D):
        return keras.layers.DepthwiseConv2D.from_config(layer.plain_config())
    return layer.__class__.from_config(layer.get_config())


def _clone(layer: keras.layers.Layer) -> keras.layers.Layer | None:
    if not layers.is_searchable(layer):
        return _plain(layer)
    return layers.wrap(
        _plain(layer.layer), layer.weight_formats, layer.activation_formats,
        weight_decision=layer.weight_decision, activation_decision=layer.activation_decision,
        quantize_config=layer.quantize_config, activation_momentum=layer.activation_momentum,
        initial_formats={name: fmt.name for name, fmt in layer.current_formats().items()}, name=layer.name)


def _call(layer, *args, **kwargs):
    if layer is None:
        first = args[0]
        return first[0] if isinstance(first, (list, tuple)) else first
    return layer(*args, **kwargs)


def _slice(value: np.ndarray, shape: tuple[int, ...], centred: int) -> np.ndarray:
    """The part of `value` a layer of `shape` keeps: leading channels, the centre of the first `centred` axes."""
    index = []
    for axis, (have, want) in enumerate(zip(value.shape, shape)):
        start = (have - want) // 2 if axis < centred else 0
        index.append(slice(start, start + want))
    return value[tuple(index)]


def _copy_sliced(source: keras.layers.Layer, target: keras.layers.Layer):
    inner = source.layer if layers.is_searchable(source) else source
    kernel = inner.kernel if isinstance(inner, blocks.MaskedDepthwiseConv2D) else None
    values = []
    for have, want in zip(source.weights, target.weights):
        if have.name != want.name:
            raise ValueError(f"Layer {source.name!r}: weight {have.name!r} has no counterpart in the plain model "
                             f"(found {want.name!r}).")
        value = np.asarray(keras.ops.convert_to_numpy(have.value))
        values.append(_slice(value, tuple(want.shape), 2 if have is kernel else 0))
    target.set_weights(values)


def chosen_architecture(model: keras.Model) -> keras.Model:
    """The plain model of the architecture `model` holds now (after a search: the chosen one).

    Args:
        model: a model of architecture blocks (`blocks`), searchable in its
            formats (`fliqs_keras.apply`) or not.

    Returns:
        A `SearchModel` of plain layers in the formats `model` holds (its
        format decisions and clips carried over), ready for `export.to_tflite`;
        a plain Functional model when `model` searches no formats.

    Raises:
        ValueError: for a model without architecture decisions.
    """
    if not architecture_layers(model):
        raise ValueError(f"Model {model.name!r} has no architecture decisions: it is plain already.")
    view = keras.Model(model.inputs, model.outputs, name=model.name)
    cloned = keras.models.clone_model(view, clone_function=_clone, call_function=_call)
    inputs = cloned.inputs[0] if len(cloned.inputs) == 1 else cloned.inputs
    outputs = cloned.outputs[0] if len(cloned.outputs) == 1 else cloned.outputs
    searched = bool(searchable_layers(cloned))
    plain = (SearchModel if searched else keras.Model)(inputs, outputs, name=model.name)
    sources = {layer.name: layer for layer in model.layers}
    for layer in plain.layers:
        if layer.weights:
            _copy_sliced(sources[layer.name], layer)
    if searched:
        plain.search_config = getattr(model, "search_config", None)
    return plain
