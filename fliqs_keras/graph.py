"""Walking a Keras model: its layers, the calls between them, and the attributes Keras keeps private.

Every read of a private Keras attribute (a layer's recorded calls, a model's
loss tracker, MultiHeadAttention's projections) is here, so that a change of
Keras touches one module.
"""

from __future__ import annotations

from typing import Callable, Iterator

import keras
from keras.src.models.functional import Functional


def walk_layers(model: keras.Model, prefix: str = "") -> Iterator[tuple[str, keras.layers.Layer]]:
    """(path, layer) for every layer, nested models included (the models themselves too)."""
    for layer in model.layers:
        path = prefix + layer.name
        yield path, layer
        if isinstance(layer, keras.Model):
            yield from walk_layers(layer, path + "/")


def is_graph_model(model: keras.Model) -> bool:
    """Whether `model` is a Sequential or Functional model (a graph of layers that can be cloned)."""
    return isinstance(model, (keras.Sequential, Functional))


def call_count(layer: keras.layers.Layer) -> int:
    """How many times `layer` is called in the model graphs it belongs to."""
    return len(getattr(layer, "_inbound_nodes", []))


def call_shapes(layer: keras.layers.Layer) -> list[tuple[list[tuple], list[tuple]]]:
    """Per call of `layer` in a model graph: (its input shapes, its output shapes)."""
    return [([tuple(t.shape) for t in node.input_tensors], [tuple(t.shape) for t in node.output_tensors])
            for node in getattr(layer, "_inbound_nodes", [])]


def reads_model_input(layer: keras.layers.Layer, model: keras.Model) -> bool:
    """Whether a call of `layer` takes one of `model`'s inputs directly."""
    inputs = {id(t) for t in model.inputs}
    return any(id(t) in inputs for node in getattr(layer, "_inbound_nodes", []) for t in node.input_tensors)


def sole_producer(layer: keras.layers.Layer) -> keras.layers.Layer | None:
    """The layer whose output alone feeds `layer`'s single call, and which feeds nothing else; else None."""
    if call_count(layer) != 1:
        return None
    parents = layer._inbound_nodes[0].parent_nodes
    if len(parents) != 1:
        return None
    producer = parents[0].operation
    if call_count(producer) != 1 or len(producer._outbound_nodes) != 1:
        return None
    return producer


def nearest_upstream(layer: keras.layers.Layer, keep: Callable[[keras.layers.Layer], bool]) -> set:
    """The nearest layers `keep` accepts that feed `layer`'s calls through any others; None stands for a model input.

    Layers that `keep` rejects are passed through (activations, adds,
    pooling); a nested model counts as an input, its inside not walked.
    """
    found, seen = set(), set()
    pending = list(getattr(layer, "_inbound_nodes", []))
    while pending:
        node = pending.pop()
        for parent in node.parent_nodes:
            operation = parent.operation
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            if keep(operation):
                found.add(operation)
            elif isinstance(operation, (keras.layers.InputLayer, keras.Model)) or not parent.parent_nodes:
                found.add(None)
            else:
                pending.append(parent)
    return found


def output_producers(model: keras.Model, keep: Callable[[keras.layers.Layer], bool]) -> set:
    """The nearest layers `keep` accepts that compute `model`'s outputs (None: an output read from an input)."""
    found = set()
    for tensor in model.outputs:
        operation = tensor._keras_history.operation
        found |= {operation} if keep(operation) else nearest_upstream(operation, keep)
    return found


def loss_tracker(model: keras.Model):
    """The `keras.metrics.Mean` that `fit` feeds each batch's loss (its running mean is the logged loss)."""
    return model._loss_tracker


def attention_parts(mha: keras.layers.MultiHeadAttention) -> dict:
    """MultiHeadAttention's projections (``query``, ``key``, ``value``, ``output``) and its head sizes."""
    return {"query": mha._query_dense, "key": mha._key_dense, "value": mha._value_dense,
            "output": mha._output_dense, "heads": mha._num_heads, "key_dim": mha._key_dim,
            "value_dim": mha._value_dim or mha._key_dim}
