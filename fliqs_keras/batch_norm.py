"""Batch-norm re-estimation: moving statistics measured on the model as it will run.

After a search the moving statistics mix every format drawn; `reestimate`
replaces them with those of the finished model, in its chosen formats,
without changing a weight.
"""

from __future__ import annotations

from typing import Any, Iterable

import keras
import numpy as np
from absl import logging

from fliqs_keras.graph import call_count, walk_layers


def _batches(data: Any, batch_size: int, max_examples: int | None) -> Iterable[Any]:
    """Model inputs in batches, from an array or from an iterable of ``x`` or ``(x, ...)`` batches."""
    if hasattr(data, "shape"):
        array = np.asarray(data)
        stop = len(array) if max_examples is None else min(len(array), max_examples)
        for start in range(0, stop, batch_size):
            yield array[start:min(start + batch_size, stop)]
        return
    seen = 0
    for batch in data:
        x = batch[0] if isinstance(batch, tuple) else batch
        if max_examples is not None:
            x = keras.tree.map_structure(lambda t: t[:max_examples - seen], x)
        size = len(keras.tree.flatten(x)[0])
        if size:
            yield x
        seen += size
        if max_examples is not None and seen >= max_examples:
            return


def _batch_norms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    top = set(id(layer) for layer in model.layers)
    result = []
    for path, layer in walk_layers(model):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        if id(layer) not in top:
            raise ValueError(
                f"Batch norm {path!r} sits inside a nested model: re-estimation reaches the batch norms of the "
                "top-level functional graph only. Flatten the model, or re-estimate the nested model itself.")
        if call_count(layer) != 1:
            raise ValueError(f"Batch norm {path!r} is called {call_count(layer)} times; its statistics "
                             "would mix its calls, so it cannot be re-estimated.")
        result.append(layer)
    return result


def reestimate(model: keras.Model, data: Any, batch_size: int = 256, max_examples: int | None = 4096) -> int:
    """Sets every batch norm's moving mean and variance to those of its inputs on `data`.

    Args:
        model: a built functional model (a `SearchModel` or any Keras
            functional model); its batch norms must be in its top-level graph.
        data: training inputs: an array (for a model of one input), or an
            iterable (a `tf.data.Dataset` among them) of ``x`` or
            ``(x, y, ...)`` batches, ``x`` in the structure of the model's inputs.
        batch_size: examples per forward pass when `data` is an array.
        max_examples: at most this many examples are read (None: all of them).

    Returns:
        The number of batch norms re-estimated.

    The batch norms are visited in graph order, each from a forward pass in
    inference mode up to its input, so each sees the earlier ones already
    re-estimated: one pass over the examples per batch norm.
    """
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(f"Model {model.name!r} is not a built functional model; re-estimation follows its graph.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}.")
    norms = _batch_norms(model)
    saved = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in norms]
    try:
        count = _reestimate_in_order(norms, model, data, batch_size, max_examples)
    except Exception:
        for layer, (mean, variance) in zip(norms, saved):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)
        raise
    logging.debug("Re-estimated %d batch norms of %r on %d examples.", len(norms), model.name, count)
    return len(norms)


def _reestimate_in_order(norms, model, data, batch_size, max_examples) -> int:
    """Re-estimates `norms` in order; returns the number of examples each saw."""
    examples = 0
    for layer in norms:
        probe = keras.Model(model.input, layer.input)
        axis = layer.axis % len(layer.input.shape)
        examples, count, total, squares = 0, 0, 0.0, 0.0
        for x in _batches(data, batch_size, max_examples):
            examples += len(keras.tree.flatten(x)[0])
            features = np.asarray(keras.ops.convert_to_numpy(probe(x, training=False)), np.float64)
            reduce = tuple(a for a in range(features.ndim) if a != axis)
            count += int(np.prod([features.shape[a] for a in reduce]))
            total = total + features.sum(axis=reduce)
            squares = squares + np.square(features).sum(axis=reduce)
        if not count:
            raise ValueError("reestimate got no examples: `data` is empty; every batch norm keeps its statistics.")
        mean = total / count
        variance = np.maximum(squares / count - np.square(mean), 0.0)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(variance))):
            raise ValueError(f"Batch norm {layer.name!r}: its inputs on `data` are not finite; every batch "
                             "norm keeps its statistics.")
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(variance.astype(np.float32))
    return examples
