"""From the float export model to a mixed-precision TFLite flatbuffer.

Converts through a SavedModel, names each quantized layer's ops, and quantizes
them op by op with the LiteRT quantizer, the trained scales and clips in
place of its own ranges.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import tempfile
from typing import Any

import numpy as np

from fliqs_keras import formats
from fliqs_keras.export import legalize
from fliqs_keras.export.fixed import ExportedWeight
from fliqs_keras.export.legalize import LayerPlan

_CONV_2D, _DEPTHWISE_CONV_2D, _FULLY_CONNECTED = 3, 4, 9
WEIGHT_OPS = {_CONV_2D: "CONV_2D", _DEPTHWISE_CONV_2D: "DEPTHWISE_CONV_2D", _FULLY_CONNECTED: "FULLY_CONNECTED"}
PASS_THROUGH = {17: "MAX_POOL_2D", 22: "RESHAPE"}  # run in integers, on their input's grid
_SATURATING = (55, 57)  # MAXIMUM, MINIMUM: stay float (no INT8 MINIMUM rule); the grid passes through
SIGNATURE = "serving_default"


def convert(model) -> bytes:
    """The float TFLite flatbuffer of a Keras model with one input, at batch size 1."""
    import tensorflow as tf

    if len(model.inputs) != 1:
        raise ValueError(f"TFLite export takes models with one input; {model.name!r} has {len(model.inputs)}.")
    spec = tf.TensorSpec((1,) + tuple(model.inputs[0].shape[1:]), model.inputs[0].dtype)
    with tempfile.TemporaryDirectory() as directory:
        model.export(directory, format="tf_saved_model", input_signature=[spec], verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory)
        return bytes(converter.convert())


def builtin_code(model_t, op) -> int:
    """The builtin operator code of `op` in a flatbuffer model."""
    code = model_t.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def tensor_array(model_t, tensor) -> np.ndarray:
    """A constant float32 tensor's values."""
    data = model_t.buffers[tensor.buffer].data
    return np.frombuffer(np.asarray(data, np.uint8).tobytes(), np.float32).reshape(tensor.shape)


def name_layers(model_t, kernels: dict[str, ExportedWeight]) -> dict[str, int]:
    """Renames the ops of the exported kernels; returns {layer path: op index}.

    Raises ValueError naming the layers whose kernel is not found in the file.
    """
    graph = model_t.subgraphs[0]
    wanted = {path: np.sort(k.values.ravel()) for path, k in kernels.items()}
    found = {}
    for index, op in enumerate(graph.operators):
        if builtin_code(model_t, op) not in WEIGHT_OPS or len(op.inputs) < 2:
            continue
        weight = graph.tensors[op.inputs[1]]
        if model_t.buffers[weight.buffer].data is None or weight.type != 0:  # 0: FLOAT32
            continue
        values = np.sort(tensor_array(model_t, weight).ravel())
        for path, reference in wanted.items():
            if path not in found and values.shape == reference.shape and np.array_equal(values, reference):
                found[path] = index
                weight.name = f"fliqs/{path}/kernel".encode()
                graph.tensors[op.outputs[0]].name = f"fliqs/{path}".encode()
                break
    missing = sorted(set(kernels) - set(found))
    if missing:
        raise ValueError(f"The converted model has no op with the exported kernel of layers {missing}: the "
                         "converter changed their weights (an op it fused?), so they cannot be quantized as trained.")
    return found


def widen_outputs(model_t, plans: list[LayerPlan], named: dict[str, int]) -> list[LayerPlan]:
    """Integer layers that compute a model output get INT16 activations.

    An integer op rounds its output to its activation type. At INT8 the
    model's logits would be rounded to 256 levels over their calibrated
    range, which the Keras model never does; INT16 keeps them. Its input
    still arrives on the trained INT8 grid where an INT8 op produced it.
    """
    graph = model_t.subgraphs[0]
    outputs = set(graph.outputs)
    result = []
    for plan in plans:
        op = graph.operators[named[plan.layer]] if plan.layer in named else None
        if op is not None and plan.activation_bits == 8 and set(op.outputs) & outputs:
            plan = dataclasses.replace(plan, activation_bits=16, notes=plan.notes + (
                "computes a model output: INT16 activations so that the output is not rounded to INT8",))
        result.append(plan)
    return result


def recipe(plans: list[LayerPlan], operations: dict[str, str]) -> list[dict[str, Any]]:
    """One `ai-edge-quantizer` rule per named layer ({layer: TFLite op name}); ops with no rule stay float."""
    rules = []
    for plan in plans:
        if plan.layer not in operations:
            continue
        # An op's scope is its output names, each followed by ";". The op type
        # is named, not "*", which would also quantize the graph's output.
        rule = {"regex": f"^fliqs/{re.escape(plan.layer)};$", "operation": operations[plan.layer],
                "algorithm_key": "min_max_uniform_quantize"}
        if plan.weight_bits is None:
            rule["algorithm_key"] = "no_quantize"
        elif plan.activation_bits is None:
            rule["op_config"] = {"weight_tensor_config": _weight_config(plan.weight_bits),
                                 "compute_precision": "FLOAT", "explicit_dequantize": True}
        else:
            rule["op_config"] = {"activation_tensor_config": _activation_config(plan.activation_bits),
                                 "weight_tensor_config": _weight_config(plan.weight_bits),
                                 "compute_precision": "INTEGER", "explicit_dequantize": False}
        rules.append(rule)
    return rules


def _weight_config(bits: int) -> dict[str, Any]:
    return {"num_bits": bits, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"}


def _activation_config(bits: int) -> dict[str, Any]:
    # TFLite's INT16 activations are symmetric; INT8 ones carry a zero point.
    return {"num_bits": bits, "symmetric": bits == 16, "granularity": "TENSORWISE", "dtype": "INT"}


def input_range(clip: float, signed: bool, bits: int) -> tuple[float, float]:
    """The (min, max) that makes the TFLite quantizer give a tensor the trained grid of its consumer.

    INT16 (9 to 16 bits): symmetric, step clip / 32767. Up to 8 bits, an INT8
    tensor with the trained step, clip / (2**(bits-1) - 1) signed (zero point
    0) or clip / (2**bits - 1) unsigned (zero point -128); below 8 bits the
    INT8 range reaches past the clip (the export saturates with a MINIMUM).
    """
    if bits > 8:
        return -clip, clip
    if signed:
        step = clip / (2 ** (bits - 1) - 1)
        return -128 * step, 127 * step
    step = clip / (2**bits - 1)
    return 0.0, 255 * step


def trained_ranges(model_t, plans: list[LayerPlan], named: dict[str, int], kernels: dict[str, ExportedWeight],
                   record: dict[str, Any]) -> tuple[dict[str, dict[str, np.ndarray]], dict[int, int]]:
    """The trained weight scales and input clips as {tensor name: {"min", "max"}}.

    Also {op index: activation bits} of the max pools and reshapes between a
    quantized layer's input and the op that produces it: the range goes up
    through them (they keep values on the grid), so that producer rounds its
    output straight onto the trained grid instead of rounding twice, and they
    run in integers.
    """
    graph = model_t.subgraphs[0]
    producers = {t: i for i, op in enumerate(graph.operators) for t in op.outputs}
    uses = {}
    for op in graph.operators:
        for t in op.inputs:
            uses[t] = uses.get(t, 0) + 1
    ranges, owners, passthrough = {}, {}, {}
    for plan in plans:
        if plan.layer not in named or plan.weight_bits is None:
            continue
        op = graph.operators[named[plan.layer]]
        weight = graph.tensors[op.inputs[1]]
        axis = 3 if builtin_code(model_t, op) == _DEPTHWISE_CONV_2D else 0
        shape = [1] * len(weight.shape)
        shape[axis] = -1
        qmax = 2.0 ** (plan.weight_bits - 1) - 1
        widen = legalize.weight_widening(record["layers"][plan.layer]["weight_format"], plan.weight_bits)
        bound = (kernels[plan.layer].scale.astype(np.float64) / widen * qmax).reshape(shape)
        ranges[weight.name.decode()] = {"min": -bound, "max": bound}
        if plan.activation_bits is None:
            continue
        entry = record["layers"][plan.layer]
        clip, signed = entry["input_clips"]["input"], entry["input_signed"]["input"]
        bits = formats.get(entry["activation_format"]).bits
        low, high = input_range(clip, signed, bits)
        tensor = op.inputs[0]
        while True:
            name = graph.tensors[tensor].name.decode()
            if name in owners and ranges[name]["max"].item() != high:
                # One tensor, one range: two consumers with different clips share the wider.
                high = max(high, ranges[name]["max"].item())
                low = min(low, ranges[name]["min"].item())
            owners[name] = plan.layer
            ranges[name] = {"min": np.array([low], np.float64), "max": np.array([high], np.float64)}
            producer = producers.get(tensor)
            code = None if producer is None else builtin_code(model_t, graph.operators[producer])
            if code not in PASS_THROUGH and code not in _SATURATING or uses.get(tensor) != 1:
                break
            upstream = graph.operators[producer].inputs[0]
            if uses.get(upstream) != 1 and code in _SATURATING:
                # Other layers read that tensor too (a residual block's input, say), each
                # through its own saturation: one layer's grid would round the others'.
                break
            if code in PASS_THROUGH:
                passthrough[producer] = 8 if bits <= 8 else 16
            tensor = upstream
    return ranges, passthrough


def quantize(float_tflite: bytes, plans: list[LayerPlan], kernels: dict[str, ExportedWeight],
             record: dict[str, Any], representative_data) -> tuple[bytes, dict[str, int], list[LayerPlan]]:
    """The mixed-precision flatbuffer, {layer: op index} of the named layers, and the plans as carried out."""
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer import calibrator, quantizer, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    model_t = flatbuffer_utils.read_model_from_bytearray(float_tflite)
    named = name_layers(model_t, kernels)
    plans = widen_outputs(model_t, plans, named)
    named_tflite = bytes(flatbuffer_utils.convert_object_to_bytearray(model_t))
    graph = model_t.subgraphs[0]
    trained, passthrough = trained_ranges(model_t, plans, named, kernels, record)
    rules = recipe(plans, {layer: WEIGHT_OPS[builtin_code(model_t, graph.operators[index])]
                           for layer, index in named.items()})
    if not rules:
        return named_tflite, named, plans
    for index, bits in passthrough.items():
        op = graph.operators[index]
        scope = "".join(graph.tensors[t].name.decode() + ";" for t in op.outputs)
        rules.append({"regex": f"^{re.escape(scope)}$", "operation": PASS_THROUGH[builtin_code(model_t, op)],
                      "algorithm_key": "min_max_uniform_quantize", "op_config": {
                          "activation_tensor_config": _activation_config(bits),
                          "weight_tensor_config": _weight_config(8),
                          "compute_precision": "INTEGER", "explicit_dequantize": False}})
    engine = quantizer.Quantizer(named_tflite, rules)
    ranges = {}
    if engine.need_calibration:
        calibration = calibrator.Calibrator(named_tflite, qsv_update_func=qsv_utils.min_max_update)
        manager = recipe_manager.RecipeManager()
        manager.load_quantization_recipe(rules)
        input_name = _input_name(named_tflite)
        samples = [{input_name: np.asarray(x, np.float32)[None]} for x in representative_data]
        calibration.calibrate({SIGNATURE: samples}, manager)
        ranges = dict(calibration.get_model_qsvs())
    for name, value in trained.items():
        if name in ranges and "min" in ranges[name] and np.ndim(ranges[name]["min"]) and value["min"].size == 1:
            shape = np.shape(ranges[name]["min"])
            value = {"min": np.full(shape, value["min"].item()), "max": np.full(shape, value["max"].item())}
        ranges[name] = value
    result = engine.quantize(ranges, enable_progress_report=False)
    return bytes(result.quantized_model), named, plans


def _input_name(tflite: bytes) -> str:
    from ai_edge_litert import interpreter

    runner = interpreter.Interpreter(model_content=tflite).get_signature_runner(SIGNATURE)
    return next(iter(runner.get_input_details()))

