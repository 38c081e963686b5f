"""Measured cost tables: each searchable layer exported alone and timed on LiteRT, or its bytes counted.

`measure_latency` exports every searchable layer alone, at its input shape and
through the same export path as the whole model, once per weight format, and
times the files interleaved on the LiteRT interpreter; then it fits, on whole
files, how the layers cost inside the file. `measure_size` counts bytes.
`cached_latency` keeps a table beside a run's output. How and why:
docs/latency.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Any, Mapping

import keras
import numpy as np
from absl import logging

from fliqs_keras import formats, graph, layers, runtime
from fliqs_keras.cost_tables import COMPARED, CONTEXT_FACTORS, CostTable, load, provenance
from fliqs_keras.search_model import SearchModel, decisions

_QUANTIZE, _DEQUANTIZE = 114, 6
_EXAMPLES = 8


@dataclasses.dataclass
class _Layer:
    """One searchable layer cut out of its model: its files per weight format, and its boundary files."""

    files: dict[str, bytes]
    integer: dict[str, bool]
    quantize: bytes | None = None
    dequantize: bytes | None = None


def _isolated(wrapper, path: str) -> SearchModel:
    """`wrapper`'s layer alone at its input shape, with its weights and choices; fresh input clips."""
    shapes = graph.call_shapes(wrapper)
    if len(shapes) != 1:
        raise ValueError(f"Layer {path!r} is called {len(shapes)} times; measured tables need one call per layer.")
    inputs = shapes[0][0]
    if any(dim is None for shape in inputs for dim in shape[1:]):
        raise ValueError(f"Layer {path!r} has a dynamic input shape {inputs}; measuring needs static shapes.")
    if len(set(inputs)) != 1:
        raise ValueError(f"Layer {path!r} takes inputs of different shapes {inputs}; measured tables time layers "
                         "with one input shape (self-attention, convolutions, dense layers).")
    clone = type(wrapper).from_config(wrapper.get_config())
    x = keras.Input(inputs[0][1:], name="x")
    model = SearchModel(inputs=x, outputs=clone(*([x] * len(inputs))), name="isolated")
    clone.layer.set_weights(wrapper.layer.get_weights())
    clone.calibrate_weights()
    return model


def _check_keys(model: keras.Model):
    """ValueError for a layer whose cost would not be fixed by its weight format alone."""
    for path, wrapper in graph.walk_layers(model):
        if not layers.is_searchable(wrapper):
            continue
        if not wrapper.weight_formats:
            raise ValueError(f"Layer {path!r} searches only its input format; measured tables key a layer's cost "
                             "by its weight format.")
        if not wrapper.joint and len(wrapper.activation_formats) > 1:
            raise ValueError(
                f"Layer {path!r} searches its input format ({[f.name for f in wrapper.activation_formats]}) apart "
                "from its weight format; measured tables key a layer's cost by its weight format: give it one "
                "input format, or one decision for both.")


def _boundary(content: bytes, kind: int) -> bytes | None:
    """The file cut down to its input QUANTIZE (kind 114) or output DEQUANTIZE (6) op; None without one."""
    from ai_edge_litert.tools import flatbuffer_utils

    from fliqs_keras.export import tflite

    model_t = flatbuffer_utils.read_model_from_bytearray(content)
    subgraph = model_t.subgraphs[0]
    for op in subgraph.operators:
        if tflite.builtin_code(model_t, op) != kind:
            continue
        if kind == _QUANTIZE and list(op.inputs) == list(subgraph.inputs):
            subgraph.outputs = list(op.outputs)
        elif kind == _DEQUANTIZE and list(op.outputs) == list(subgraph.outputs):
            subgraph.inputs = list(op.inputs)
        else:
            continue
        subgraph.operators = [op]
        model_t.signatureDefs = []
        return bytes(flatbuffer_utils.convert_object_to_bytearray(model_t))
    return None


def _cut(wrapper, path: str, output: bool, rng: np.random.Generator) -> _Layer:
    """Every weight format of one layer, exported alone."""
    from fliqs_keras import export, set_formats

    model = _isolated(wrapper, path)
    examples = rng.normal(size=(_EXAMPLES,) + tuple(model.inputs[0].shape[1:])).astype(np.float32)
    result = _Layer({}, {})
    for fmt in wrapper.weight_formats:
        set_formats(model, {wrapper.weight_decision: fmt})
        model(examples, training=True)  # calibrates the input clip of this format
        content, plans, _ = export.tflite_content(model, examples, int16_outputs=output)
        result.files[fmt.name] = content
        result.integer[fmt.name] = plans[0].activation_bits is not None
        if result.integer[fmt.name] and result.quantize is None:
            result.quantize, result.dequantize = _boundary(content, _QUANTIZE), _boundary(content, _DEQUANTIZE)
    return result


def _neighbours(model: keras.Model) -> tuple[dict[str, list[str]], tuple[str, ...]]:
    paths = {id(layer): path for path, layer in graph.walk_layers(model) if layers.is_searchable(layer)}

    def keep(layer):
        return id(layer) in paths

    producers = {path: sorted(paths[id(p)] if p is not None else "" for p in graph.nearest_upstream(layer, keep))
                 for path, layer in graph.walk_layers(model) if keep(layer)}
    outputs = tuple(sorted(paths[id(p)] for p in graph.output_producers(model, keep) if p is not None))
    return producers, outputs


def _cuts(model: keras.Model, outputs: tuple[str, ...], progress: bool, seed: int):
    """(path, key) per searchable layer and ``{key: _Layer}``: layers of the same kind and shapes are cut once."""
    _check_keys(model)
    wrappers = [(path, layer) for path, layer in graph.walk_layers(model) if layers.is_searchable(layer)]
    keys = []
    for path, wrapper in wrappers:
        config = wrapper.layer.get_config()
        config.pop("name", None)
        keys.append(json.dumps([type(wrapper.layer).__name__, config, graph.call_shapes(wrapper),
                                [f.name for f in wrapper.weight_formats],
                                [f.name for f in wrapper.activation_formats], path in outputs],
                               sort_keys=True, default=str))
    unique = list(dict.fromkeys(keys))
    bar = keras.utils.Progbar(len(unique), verbose=1 if progress else 0, unit_name="layer")
    rng = np.random.default_rng(seed)
    cut = {}
    for (path, wrapper), key in zip(wrappers, keys):
        if key not in cut:
            cut[key] = _cut(wrapper, path, path in outputs, rng)
            bar.add(1)
    return [(path, key) for (path, _), key in zip(wrappers, keys)], cut


def _copy(model: SearchModel) -> SearchModel:
    """A copy of `model` with its layer weights and formats, and fresh input clips (calibrated by `whole_files`)."""
    copy = type(model).from_config(model.get_config())
    for source, target in zip(model.layers, copy.layers):
        if layers.is_searchable(source):
            target.layer.set_weights(source.layer.get_weights())
            target.calibrate_weights()
        elif source.weights:
            target.set_weights(source.get_weights())
    return copy


def whole_files(model: SearchModel, assignments: list[Mapping[str, Any]], seed: int = 0) -> list[bytes]:
    """The files of the whole model in each assignment (``{decision: format}``), for timing and counting.

    They are exported from one copy of `model`, whose input clips calibrate
    on random inputs in each assignment; `model` itself is left as it is.
    """
    from fliqs_keras import export, set_formats

    copy = _copy(_checked(model))
    examples = np.random.default_rng(seed).normal(size=(_EXAMPLES,) + tuple(copy.inputs[0].shape[1:]))
    examples = examples.astype(np.float32)
    result = []
    for assignment in assignments:
        set_formats(copy, dict(assignment))
        copy(examples, training=True)
        result.append(export.tflite_content(copy, examples)[0])
    return result


def whole_file(model: SearchModel, assignment: Mapping[str, Any], seed: int = 0) -> bytes:
    """The file of the whole model in `assignment` (``{decision: format}``) (`whole_files`)."""
    return whole_files(model, [assignment], seed)[0]


def reference_policy(model: keras.Model) -> dict[str, str]:
    """The formats of the reference file timed beside every layer: every decision at its first choice."""
    return {name: choices[0].name for name, choices in decisions(model).items()}


def measure_size(model: keras.Model, *, progress: bool = True, seed: int = 0) -> CostTable:
    """The bytes every searchable layer adds to the TFLite file in each of its weight formats.

    A layer's bytes in a format are the bytes of its file exported alone
    in it, so that what a format adds besides its weights (the FLOAT16
    storage's ops, quantization parameters, metadata) counts too. The fixed
    part is the whole file in `reference_policy` less the sum of its
    layers (negative where the files alone repeat more headers than the
    unsearched layers add).

    Args:
        model: a model made by `fliqs_keras.apply`, built on static shapes.
        progress: show a Keras progress bar.
        seed: of the random inputs that calibrate the files.

    Raises:
        ValueError: for a model not made by `apply`, a layer searching its
            input format apart from its weights, or dynamic shapes.
    """
    model = _checked(model)
    producers, outputs = _neighbours(model)
    order, cut = _cuts(model, outputs, progress, seed)
    table = {path: {fmt: float(len(content)) for fmt, content in cut[key].files.items()}
             for path, key in order}
    reference = reference_policy(model)
    weights = weight_formats(model, reference)
    whole = len(whole_file(model, reference, seed))
    fixed = whole - sum(table[path][weights[path]] for path in table)
    return CostTable(table, "bytes", float(fixed), producers={}, outputs=outputs,
                     provenance=provenance(1), reference=reference)


def measure_latency(model: keras.Model, *, threads: int = 1, invokes: int = 30, warmup: int = 5,
                    calibration: int = 4, progress: bool = True, seed: int = 0) -> CostTable:
    """The LiteRT latency of every searchable layer in each of its weight formats, in milliseconds.

    Each layer is exported alone at its input shape through the same path
    as the whole model (the same kernels, storage and requantization), once
    per weight format; its files, a file of its input's QUANTIZE alone, one
    of its output's DEQUANTIZE alone, an empty file and the whole file in
    `reference_policy` are timed interleaved (`runtime.time_files`, median
    of `invokes`). A layer's cost is its file's time less the empty file's
    (the invoke itself) and, where its inputs are integer, less its
    QUANTIZE and DEQUANTIZE, which the table keeps apart: the whole file
    runs them only where an integer layer meets a float one. Each group's
    times are scaled to the whole file's median over all groups, so that
    the machine's drift between groups cancels. Layers of the same kind and
    shapes are measured once. Last, the whole files of
    `calibration_policies` are timed beside the reference, and what a layer
    costs inside the whole file rather than alone is fitted to them
    (`context_factors`).

    Args:
        model: a model made by `fliqs_keras.apply`, built on static shapes.
        threads: the interpreter's threads.
        invokes: timed invokes per file.
        calibration: random policies timed whole besides the uniform ones,
            for fitting the factors and the fixed cost.
        warmup: untimed invokes per file first.
        progress: show a Keras progress bar.
        seed: of the random inputs.

    Raises:
        ValueError: for a model not made by `apply`, a layer searching its
            input format apart from its weights, a layer called more than
            once, or dynamic shapes.
    """
    model = _checked(model)
    started = time.perf_counter()
    producers, outputs = _neighbours(model)
    order, cut = _cuts(model, outputs, progress, seed)
    exported = time.perf_counter()
    # The first calibration policy is the reference, timed beside every layer as the yardstick.
    policies = calibration_policies(model, calibration, seed)
    wholes, empty = whole_files(model, policies, seed), _empty_file()
    whole = time.perf_counter()
    groups = {}
    bar = keras.utils.Progbar(len(cut), verbose=1 if progress else 0, unit_name="layer timed")
    for key, layer in cut.items():
        contents = {f"format/{fmt}": content for fmt, content in layer.files.items()}
        contents.update({name: content for name, content in (("quantize", layer.quantize),
                                                              ("dequantize", layer.dequantize),
                                                              ("empty", empty), ("whole", wholes[0]))
                         if content is not None})
        groups[key] = {name: t.median_ms for name, t in runtime.time_files(
            contents, threads=threads, invokes=invokes, warmup=warmup, seed=seed).items()}
        bar.add(1)
    # Each group is scaled to the whole file's median time over all groups: the machine's speed drifts
    # between groups (by half on a shared machine), the ratios within a group hold.
    nominal = float(np.median([times["whole"] for times in groups.values()]))
    timed = {}
    for key, times in groups.items():
        scale = nominal / times["whole"]
        quantize = max(times.get("quantize", times["empty"]) - times["empty"], 0.0) * scale
        dequantize = max(times.get("dequantize", times["empty"]) - times["empty"], 0.0) * scale
        timed[key] = ({fmt: max((times[f"format/{fmt}"] - times["empty"]) * scale
                                - (quantize + dequantize if cut[key].integer[fmt] else 0.0), 0.0)
                       for fmt in cut[key].files}, quantize, dequantize)
    alone = CostTable(
        {path: timed[key][0] for path, key in order}, "ms", 0.0,
        integer={path: dict(cut[key].integer) for path, key in order},
        quantize={path: timed[key][1] for path, key in order},
        dequantize={path: timed[key][2] for path, key in order},
        producers=producers, outputs=outputs, provenance=provenance(threads), reference=policies[0])
    times = runtime.time_files({f"policy/{i}": content for i, content in enumerate(wholes)}, threads=threads,
                               invokes=invokes, warmup=warmup, seed=seed)
    measured = [times[f"policy/{i}"].median_ms * nominal / times["policy/0"].median_ms for i in range(len(wholes))]
    logging.info("measure_latency: %d files of %d distinct layers exported in %.0f s, %d whole files in %.0f s, "
                 "all timed in %.0f s", sum(len(c.files) for c in cut.values()), len(cut), exported - started,
                 len(wholes), whole - exported, time.perf_counter() - whole)
    return _fit_context(model, alone, policies, measured)


def calibration_policies(model: keras.Model, random: int, seed: int) -> list[dict[str, str]]:
    """The whole files a latency table is fitted on: every decision at its k-th choice (each k), and `random` draws.

    The first is `reference_policy`.
    """
    choices = decisions(model)
    rng = np.random.default_rng(seed + 1)
    uniform = [{name: c[min(k, len(c) - 1)].name for name, c in choices.items()}
               for k in range(max(len(c) for c in choices.values()))]
    drawn = [{name: c[int(rng.integers(len(c)))].name for name, c in choices.items()} for _ in range(random)]
    return uniform + drawn


def _fit_context(model: keras.Model, alone: CostTable, policies: list[dict[str, str]],
                 measured: list[float]) -> CostTable:
    """The table whose layers cost what they cost inside the whole file, fitted on whole files.

    Inside the whole file a layer runs at another speed than alone (other
    data in the caches; after a float layer, the unsearched ops that follow
    it run in float32 instead of integers). Least squares on the whole files
    of `policies` fit a factor for integer layers, one for float layers, one
    for the conversions between them, and the fixed cost.
    """
    rows = []
    for policy in policies:
        weights = weight_formats(model, policy)
        integer = sum(alone.layers[p][f] for p, f in weights.items() if alone.is_integer(p, f))
        floating = sum(alone.layers[p][f] for p, f in weights.items() if not alone.is_integer(p, f))
        rows.append([1.0, integer, floating, alone.cost(weights) - integer - floating])
    solution = np.linalg.lstsq(np.asarray(rows), np.asarray(measured), rcond=None)[0]
    factors = {name: float(max(value, 0.0)) for name, value in zip(CONTEXT_FACTORS, solution[1:])}

    def in_context(path, fmt, value):
        return value * factors["integer" if alone.is_integer(path, fmt) else "float"]

    fitted = dataclasses.replace(
        alone, fixed=0.0, layers={path: {f: in_context(path, f, cost) for f, cost in row.items()}
                                  for path, row in alone.layers.items()},
        quantize={p: c * factors["conversions"] for p, c in alone.quantize.items()},
        dequantize={p: c * factors["conversions"] for p, c in alone.dequantize.items()})
    residual = [t - fitted.cost(weight_formats(model, p)) for p, t in zip(policies, measured)]
    return dataclasses.replace(fitted, fixed=float(np.mean(residual)), context_factors=factors,
                               calibration=[{"formats": p, "measured_ms": t} for p, t in zip(policies, measured)])


def reference_file(model: keras.Model, table: CostTable, seed: int = 0) -> bytes:
    """The whole file in the table's reference formats: timed beside other files, it gives the machine's speed.

    The table predicts this file at ``table.cost`` of its formats; a file
    timed in the same run as it compares with the table's predictions
    scaled by the reference's time then over that cost.
    """
    return whole_file(_checked(model), table.reference, seed)


def cached_latency(model: keras.Model, directory: str | pathlib.Path, *, threads: int = 1,
                   progress: bool = True, **settings) -> pathlib.Path:
    """The file of `model`'s latency table in `directory`, measured (`measure_latency`) only when absent.

    The file's name holds a digest of the model's searchable layers (kind,
    configuration, shapes, choices) and of the provenance entries that must
    agree here, so that another model, thread count, runtime or CPU measures
    anew instead of reading a table that does not hold.

    Args:
        model: a model made by `fliqs_keras.apply`.
        directory: where the tables are kept.
        threads: the interpreter's threads.
        progress: show a Keras progress bar while measuring.
        **settings: further arguments of `measure_latency`.

    Returns:
        The table's path.
    """
    model = _checked(model)
    here = provenance(threads)
    shape = [[path, type(layer.layer).__name__, layer.layer.get_config(), graph.call_shapes(layer),
              {name: [f.name for f in choices] for name, choices in layer.decisions.items()}]
             for path, layer in graph.walk_layers(model) if layers.is_searchable(layer)]
    key = json.dumps([shape, {k: here[k] for k in COMPARED["ms"]}], sort_keys=True, default=str)
    path = pathlib.Path(directory) / f"latency_table_{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    if path.exists():
        try:
            load(path, threads)
            logging.info("fliqs_keras: using the latency table measured before, %s", path)
            return path
        except ValueError as error:
            logging.warning("fliqs_keras: measuring the latency table again: %s", error)
    measure_latency(model, threads=threads, progress=progress, **settings).save(path)
    return path


def _checked(model: keras.Model) -> SearchModel:
    if not isinstance(model, SearchModel):
        raise ValueError(f"Measuring a cost table needs a model made by fliqs_keras.apply, got "
                         f"{type(model).__name__} {getattr(model, 'name', '')!r}.")
    return model


def weight_formats(model: keras.Model, assignment: Mapping[str, Any]) -> dict[str, str]:
    """``{layer path: weight format}`` of `assignment` (``{decision: format}``)."""
    return {path: formats.get(assignment[layer.weight_decision]).name
            for path, layer in graph.walk_layers(model) if layers.is_searchable(layer)}


def _empty_file() -> bytes:
    """A float file of one 1x1 dense layer: what an invoke costs with next to nothing to run."""
    from fliqs_keras.export import tflite
    from fliqs_keras.quiet import quiet

    x = keras.Input((1,))
    with quiet():
        return tflite.convert(keras.Model(x, keras.layers.Dense(1)(x)))


__all__ = ["cached_latency", "calibration_policies", "measure_latency", "measure_size", "reference_file",
           "reference_policy", "weight_formats", "whole_file", "whole_files"]
