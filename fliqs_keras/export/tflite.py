"""From the float export model to a mixed-precision TFLite flatbuffer.

Converts through a SavedModel, names each quantized layer's ops, quantizes
them op by op with the LiteRT quantizer, the trained scales and clips in
place of its own ranges, and stores floating-point weights as FLOAT16 codes.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import tempfile
from typing import Any

import numpy as np

from fliqs_keras import formats
from fliqs_keras.export import float16, legalize
from fliqs_keras.export.annotations import constant_values
from fliqs_keras.export.fixed import ExportedWeight
from fliqs_keras.export.legalize import LayerPlan

_CONV_2D, _DEPTHWISE_CONV_2D, _FULLY_CONNECTED, _BATCH_MATMUL = 3, 4, 9, 126
WEIGHT_OPS = {_CONV_2D: "CONV_2D", _DEPTHWISE_CONV_2D: "DEPTHWISE_CONV_2D", _FULLY_CONNECTED: "FULLY_CONNECTED",
              _BATCH_MATMUL: "BATCH_MATMUL"}
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


def quantized_dimension(model_t, op) -> int:
    """The axis of an op's weight tensor that TFLite gives a scale per entry: its output channels."""
    code = builtin_code(model_t, op)
    if code == _DEPTHWISE_CONV_2D:
        return 3
    if code == _BATCH_MATMUL:
        rank = len(model_t.subgraphs[0].tensors[op.inputs[1]].shape)
        return rank - 2 if op.builtinOptions is not None and op.builtinOptions.adjY else rank - 1
    return 0


def channels_along(values: np.ndarray, kernel: ExportedWeight, axis: int) -> bool:
    """Whether axis `axis` of a tensor holds `kernel`'s trained channels, in their order.

    A converter may transpose and reshape a kernel (an einsum's becomes a
    FULLY_CONNECTED matrix); each channel keeps its values.
    """
    channels = kernel.scale.size
    if values.shape[axis] != channels:
        return False
    got = np.sort(np.moveaxis(values, axis, -1).reshape(-1, channels), axis=0)
    want = np.sort(kernel.values.reshape(-1, channels), axis=0)
    return got.shape == want.shape and np.array_equal(got, want)


def name_layers(model_t, kernels: dict[str, ExportedWeight], required) -> dict[str, int]:
    """Names the ops of the exported kernels; returns {kernel key: op index}.

    A kernel is found where an op's constant weight holds its values with its
    channels along the op's output channels. Raises ValueError naming the
    `required` kernels that are not found.
    """
    graph = model_t.subgraphs[0]
    wanted = {key: np.sort(k.values.ravel()) for key, k in kernels.items()}
    found = {}
    for index, op in enumerate(graph.operators):
        if builtin_code(model_t, op) not in WEIGHT_OPS or len(op.inputs) < 2:
            continue
        weight = graph.tensors[op.inputs[1]]
        if model_t.buffers[weight.buffer].data is None or weight.type != 0:  # 0: FLOAT32
            continue
        array = constant_values(model_t, weight)
        values = np.sort(array.ravel())
        for key, reference in wanted.items():
            if key not in found and values.shape == reference.shape and np.array_equal(values, reference) and (
                    channels_along(array, kernels[key], quantized_dimension(model_t, op))):
                found[key] = index
                weight.name = kernels[key].tensor_name.encode()
                graph.tensors[op.outputs[0]].name = f"fliqs/{key}".encode()
                break
    missing = sorted(set(required) - set(found))
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


def recipe(plans: list[LayerPlan], operations: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """One `ai-edge-quantizer` rule per named kernel ({key: (layer, TFLite op name)}); ops with no rule stay float."""
    by_layer = {plan.layer: plan for plan in plans}
    rules = []
    for key, (layer, operation) in operations.items():
        plan = by_layer[layer]
        # An op's scope is its output names, each followed by ";". The op type
        # is named, not "*", which would also quantize the graph's output.
        rule = {"regex": f"^fliqs/{re.escape(key)};$", "operation": operation,
                "algorithm_key": "min_max_uniform_quantize"}
        if plan.weight_bits is None:
            rule["algorithm_key"] = "no_quantize"
        elif plan.dynamic:
            rule["op_config"] = {"weight_tensor_config": _weight_config(plan.weight_bits),
                                 "compute_precision": "INTEGER", "explicit_dequantize": False}
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
    by_layer = {plan.layer: plan for plan in plans}
    for key, index in named.items():
        plan = by_layer[kernels[key].layer]
        if plan.weight_bits is None:
            continue
        op = graph.operators[index]
        weight = graph.tensors[op.inputs[1]]
        shape = [1] * len(weight.shape)
        shape[quantized_dimension(model_t, op)] = -1
        qmax = 2.0 ** (plan.weight_bits - 1) - 1
        widen = legalize.weight_widening(record["layers"][plan.layer]["weight_format"], plan.weight_bits)
        bound = (kernels[key].scale.astype(np.float64) / widen * qmax).reshape(shape)
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


@dataclasses.dataclass
class Quantized:
    """The mixed-precision flatbuffer, the plans as carried out, and each stored kernel's channel axis by key."""

    content: bytes
    plans: list[LayerPlan]
    axes: dict[str, int]


def quantize(float_tflite: bytes, plans: list[LayerPlan], kernels: dict[str, ExportedWeight],
             record: dict[str, Any], representative_data, int16_outputs: bool = True) -> Quantized:
    """Quantizes the named kernels' ops as their plans say, then stores the annotated ones as FLOAT16 codes.

    With `int16_outputs`, integer layers computing a model output get INT16 activations (`widen_outputs`).
    """
    from ai_edge_litert.tools import flatbuffer_utils

    by_layer = {plan.layer: plan for plan in plans}
    model_t = flatbuffer_utils.read_model_from_bytearray(float_tflite)
    named = name_layers(model_t, kernels, {key for key, kernel in kernels.items()
                                           if by_layer[kernel.layer].layer_type not in legalize.DYNAMIC_OPS})
    plans = [_unmatched(plan) if plan.layer_type in legalize.DYNAMIC_OPS and plan.weight_format and not any(
        kernels[key].layer == plan.layer for key in named) else plan
        for plan in (widen_outputs(model_t, plans, named) if int16_outputs else plans)]
    named_tflite = bytes(flatbuffer_utils.convert_object_to_bytearray(model_t))
    graph = model_t.subgraphs[0]
    axes = {key: quantized_dimension(model_t, graph.operators[index]) for key, index in named.items()}
    trained, passthrough = trained_ranges(model_t, plans, named, kernels, record)
    rules = recipe(plans, {key: (kernels[key].layer, WEIGHT_OPS[builtin_code(model_t, graph.operators[index])])
                           for key, index in named.items()})
    content = named_tflite
    if any(rule["algorithm_key"] != "no_quantize" for rule in rules):
        for index, bits in passthrough.items():
            op = graph.operators[index]
            scope = "".join(graph.tensors[t].name.decode() + ";" for t in op.outputs)
            rules.append({"regex": f"^{re.escape(scope)}$", "operation": PASS_THROUGH[builtin_code(model_t, op)],
                          "algorithm_key": "min_max_uniform_quantize", "op_config": {
                              "activation_tensor_config": _activation_config(bits),
                              "weight_tensor_config": _weight_config(8),
                              "compute_precision": "INTEGER", "explicit_dequantize": False}})
        content = _run_quantizer(named_tflite, rules, trained, representative_data)
    content, plans = _store_float16(content, plans, kernels, axes)
    return Quantized(content, plans, axes)


def _run_quantizer(named_tflite: bytes, rules, trained, representative_data) -> bytes:
    """The LiteRT quantizer's output: calibrated ranges, the trained ones in their place."""
    from ai_edge_quantizer import calibrator, quantizer, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

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
    return bytes(engine.quantize(ranges, enable_progress_report=False).quantized_model)


def _unmatched(plan: LayerPlan) -> LayerPlan:
    return dataclasses.replace(plan, weight_bits=None, dynamic=False, annotated=False, notes=(
        f"the converter changed its weights (no op holds them with their channels as outputs): they stay the "
        f"exact {plan.weight_format} values in float32, unannotated; inputs run in float32",))


def _store_float16(content: bytes, plans: list[LayerPlan], kernels: dict[str, ExportedWeight],
                   axes: dict[str, int]) -> tuple[bytes, list[LayerPlan]]:
    """Annotated kernels as FLOAT16 codes where float16 holds every code; the plans say which and why not."""
    from ai_edge_litert.tools import flatbuffer_utils

    annotated = {plan.layer for plan in plans if plan.annotated}
    keys = [key for key in axes if kernels[key].layer in annotated]
    if not keys:
        return content, plans
    model_t = flatbuffer_utils.read_model_from_bytearray(content)
    graph = model_t.subgraphs[0]
    by_output = {graph.tensors[op.outputs[0]].name.decode(): index for index, op in enumerate(graph.operators)
                 if op.outputs}
    stored, reasons = [], {}
    for key in keys:
        kernel = kernels[key]
        index = by_output[f"fliqs/{key}"]
        weight = graph.tensors[graph.operators[index].inputs[1]]
        reason = float16.unfit_reason(kernel.fmt)
        halves = None
        if reason is None:
            halves, reason = float16.split(constant_values(model_t, weight), kernel.fmt, kernel.scale, axes[key])
        if reason is not None:
            reasons.setdefault(kernel.layer, []).append(reason)
        else:
            stored.append((index, key, halves))
    for index, key, halves in sorted(stored, key=lambda item: -item[0]):
        float16.store(model_t, index, kernels[key].tensor_name, halves, kernels[key].scale)
    float16.drop_unused_buffers(model_t)
    float16_layers = {kernels[key].layer for _, key, _ in stored}
    result = []
    for plan in plans:
        if plan.layer in reasons:
            plan = dataclasses.replace(plan, notes=plan.notes + (
                "float32, not float16: " + "; ".join(sorted(set(reasons[plan.layer]))),))
        elif plan.layer in float16_layers:
            plan = dataclasses.replace(plan, float16=True, notes=plan.notes + (
                "stored as FLOAT16 codes (exact) and a float32 scale per channel, applied by a MUL after the op",))
        result.append(plan)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model_t)), result


def _input_name(tflite: bytes) -> str:
    from ai_edge_litert import interpreter

    runner = interpreter.Interpreter(model_content=tflite).get_signature_runner(SIGNATURE)
    return next(iter(runner.get_input_details()))

