"""Floating-point weights in the file as FLOAT16 codes and a float32 scale per channel.

Every value of an FP8, FP6, FP4 or FP16 weight is a code of its format times
its channel's scale. The codes are float16 numbers; their products with the
scales are not, so the scales move to a MUL after the op.
"""

from __future__ import annotations

import keras
import numpy as np

from fliqs_keras import formats, quantizers
from fliqs_keras.export.annotations import buffer_bytes

_FLOAT16 = formats.get("fp16")
_MUL, _DEQUANTIZE = 18, 6
_FLOAT32, _FLOAT16_TYPE = 0, 1


def scale_name(weight_name: str) -> str:
    """The name of the float32 scale tensor of the FLOAT16 kernel `weight_name`."""
    return weight_name + "/scale"


def unfit_reason(fmt: formats.Format) -> str | None:
    """Why float16 cannot hold every code of `fmt` exactly, or None when it can."""
    if not isinstance(fmt, formats.FloatFormat):
        return f"{fmt.name} is not a floating-point format"
    if fmt.mantissa_bits > _FLOAT16.mantissa_bits:
        return f"{fmt.name} has {fmt.mantissa_bits} mantissa bits, float16 {_FLOAT16.mantissa_bits}"
    if fmt.max_value > _FLOAT16.max_value:
        return f"{fmt.name} reaches {fmt.max_value:.4g}, float16 only {_FLOAT16.max_value:.6g}"
    if fmt.smallest_subnormal < _FLOAT16.smallest_subnormal:
        return f"{fmt.name} reaches down to {fmt.smallest_subnormal:.4g}, float16 only {_FLOAT16.smallest_subnormal:.4g}"
    return None


def split(values: np.ndarray, fmt: formats.Format, scale: np.ndarray, axis: int
          ) -> tuple[np.ndarray | None, str | None]:
    """(float16 codes, None) with ``float32(codes * scale) == values`` bit for bit, or (None, why not).

    Args:
        values: the float32 weight as the file holds it.
        fmt: its format.
        scale: its float32 scale per channel along `axis`.
        axis: the channel axis of `values`.
    """
    shape = [1] * values.ndim
    shape[axis] = -1
    scale = np.asarray(scale, np.float32).reshape(shape)
    # Snapped onto the format: a quotient can miss its code by a rounding.
    codes = keras.ops.convert_to_numpy(quantizers.quantize_dequantize(
        keras.ops.convert_to_tensor((values / scale).astype(np.float32)), quantizers.grid_tensor(fmt)))
    codes = np.asarray(codes, np.float32)
    halves = codes.astype(np.float16)
    lost = np.flatnonzero(halves.astype(np.float32).view(np.int32) != codes.view(np.int32))
    if lost.size:
        first = codes.ravel()[lost[0]]
        return None, f"{lost.size} of its {codes.size} codes are not float16 numbers (e.g. {first!r})"
    rebuilt = (halves.astype(np.float32) * scale).astype(np.float32)
    wrong = np.flatnonzero(rebuilt.view(np.int32) != values.view(np.int32))
    if wrong.size:
        return None, f"{wrong.size} of its values are not a float16 code times the channel's scale"
    return halves, None


def store(model_t, op_index: int, weight_name: str, halves: np.ndarray, scale: np.ndarray):
    """Rewrites the op at `op_index` to read `halves` through a DEQUANTIZE and scale its output with a MUL.

    The op keeps its bias divided by the scales; its fused activation moves to
    the MUL (an activation like RELU6 does not commute with the scale).
    """
    from ai_edge_litert import schema_py_generated as schema

    graph = model_t.subgraphs[0]
    op = graph.operators[op_index]
    weight = graph.tensors[op.inputs[1]]
    codes = _constant(model_t, graph, schema, weight_name, halves, _FLOAT16_TYPE)
    # The float32 tensor becomes the DEQUANTIZE's output: no data of its own.
    weight_copy = op.inputs[1]
    weight.name, weight.buffer = (weight_name + "/dequantized").encode(), 0
    scale = np.asarray(scale, np.float32)
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        bias = graph.tensors[op.inputs[2]]
        values = np.frombuffer(buffer_bytes(model_t.buffers[bias.buffer].data), np.float32)
        if sum(op.inputs[2] in other.inputs for other in graph.operators) == 1:
            bias.buffer = 0  # nothing else reads the old bias: its data goes with `drop_unused_buffers`
        op.inputs[2] = _constant(model_t, graph, schema, weight_name + "/bias_over_scale",
                                 (values / scale).astype(np.float32), _FLOAT32)
    output = graph.tensors[op.outputs[0]]
    unscaled = _tensor(graph, schema, output.name.decode() + "/unscaled", output.shape, _FLOAT32)
    multiply = schema.OperatorT()
    multiply.opcodeIndex = _opcode(model_t, schema, _MUL, 1)
    multiply.inputs = [unscaled, _constant(model_t, graph, schema, scale_name(weight_name), scale, _FLOAT32)]
    multiply.outputs = [op.outputs[0]]
    multiply.builtinOptionsType = schema.BuiltinOptions.MulOptions
    multiply.builtinOptions = schema.MulOptionsT()
    options = op.builtinOptions
    if options is not None and hasattr(options, "fusedActivationFunction"):
        multiply.builtinOptions.fusedActivationFunction = options.fusedActivationFunction
        options.fusedActivationFunction = schema.ActivationFunctionType.NONE
    op.outputs = [unscaled]
    dequantize = schema.OperatorT()
    dequantize.opcodeIndex = _opcode(model_t, schema, _DEQUANTIZE, 3)
    dequantize.inputs, dequantize.outputs = [codes], [weight_copy]
    graph.operators[op_index:op_index + 1] = [dequantize, op, multiply]


def drop_unused_buffers(model_t):
    """Empties the buffers no tensor or metadata entry refers to any more (the float32 kernels replaced)."""
    used = {tensor.buffer for graph in model_t.subgraphs for tensor in graph.tensors}
    used |= {entry.buffer for entry in model_t.metadata or []}
    for index, buffer in enumerate(model_t.buffers):
        if index not in used:
            buffer.data = None


def _tensor(graph, schema, name: str, shape, tensor_type: int) -> int:
    tensor = schema.TensorT()
    tensor.name, tensor.shape, tensor.type, tensor.buffer = name.encode(), np.asarray(shape, np.int32), tensor_type, 0
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _constant(model_t, graph, schema, name: str, values: np.ndarray, tensor_type: int) -> int:
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(np.ascontiguousarray(values).tobytes(), np.uint8)
    model_t.buffers.append(buffer)
    index = _tensor(graph, schema, name, values.shape, tensor_type)
    graph.tensors[index].buffer = len(model_t.buffers) - 1
    return index


def _opcode(model_t, schema, code: int, version: int) -> int:
    for index, existing in enumerate(model_t.operatorCodes):
        if max(existing.builtinCode, existing.deprecatedBuiltinCode) == code:
            existing.version = max(existing.version, version)
            return index
    entry = schema.OperatorCodeT()
    entry.builtinCode, entry.deprecatedBuiltinCode, entry.version = code, min(code, 127), version
    model_t.operatorCodes.append(entry)
    return len(model_t.operatorCodes) - 1
