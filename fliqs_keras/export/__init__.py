"""Export a searched model: the fixed Keras model, the formats file, and a verified TFLite file.

`to_tflite` writes the file and checks it against the Keras model in the
LiteRT interpreter; `ExportVerificationError` says by how much it disagrees.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
from typing import Any

import keras
import numpy as np
from absl import logging

from fliqs_keras import files, formats, graph
from fliqs_keras.export import annotations, float16, legalize, tflite
from fliqs_keras.export.annotations import AnnotationCheck, verify_annotations
from fliqs_keras.export.architecture import chosen_architecture
from fliqs_keras.export.fixed import ExportedWeight, InputQuantizer, fixed_model, float_model
from fliqs_keras.export.legalize import LayerPlan
from fliqs_keras.formats_file import build_formats_file, check_matches, load_formats_file, save_formats_file
from fliqs_keras.quiet import quiet
from fliqs_keras.search_model import SearchModel


class ExportVerificationError(RuntimeError):
    """The TFLite file disagrees with the Keras model beyond the threshold."""


@dataclasses.dataclass
class Verification:
    """How the TFLite file compares with the Keras model in its chosen formats."""

    path: str
    samples: int
    argmax_agreement: float
    max_abs_difference: float
    layers: list[LayerPlan]
    annotations: AnnotationCheck
    weight_bytes: dict[str, int]

    def __str__(self) -> str:
        return (f"{self.path}: argmax agreement {self.argmax_agreement:.4f} on {self.samples} inputs, "
                f"max |difference| {self.max_abs_difference:.4g}; {len(self.annotations.checked)} annotated "
                f"tensors, {'all exact' if self.annotations.ok else 'FAILING: ' + str(self.annotations.failures)}"
                f"\n{legalize.report(self.layers)}")

    def summary(self) -> str:
        """Two lines: the file and its agreement, and how each quantized layer runs."""
        size = pathlib.Path(self.path).stat().st_size if pathlib.Path(self.path).exists() else 0
        integer = sum(p.activation_bits is not None for p in self.layers)
        dynamic = sum(p.dynamic for p in self.layers)
        dequantized = sum(p.weight_bits is not None and p.activation_bits is None and not p.dynamic
                          for p in self.layers)
        halves = sum(p.float16 for p in self.layers)
        in_float = len(self.layers) - integer - dynamic - dequantized
        annotated = len(self.annotations.checked)
        checked = (f"{annotated} annotated weight tensors {'exact' if self.annotations.ok else 'NOT exact'}"
                   if annotated else "no annotated weight tensors")
        return (f"TFLite {self.path} ({size:,} bytes): argmax agreement {self.argmax_agreement:.4f} with Keras on "
                f"{self.samples} inputs, {checked}\n"
                f"  quantized layers: {integer} run integer kernels, {dynamic} integer weights with inputs "
                f"quantized per invoke, {dequantized} dequantize integer weights, {in_float} run in float "
                f"({halves} of them with FLOAT16 weights); str(verification) has the per-layer table")


def to_tflite(model: keras.Model, path: str | pathlib.Path, representative_data: Any, *,
              verify_samples: int = 500, min_agreement: float = 0.95) -> Verification:
    """Writes the TFLite file of a searchable model in its current formats; returns its verification.

    Args:
        model: a model made by `fliqs_keras.apply`, after its search (or QAT).
        path: the ``.tflite`` file to write.
        representative_data: inputs (an array of examples, or an iterable of
            examples or batches) for calibrating the tensors the search did
            not quantize and for the verification.
        verify_samples: how many of them the verification runs.
        min_agreement: the least argmax agreement with the Keras model accepted.

    Raises:
        ExportVerificationError: agreement below `min_agreement`, or an
            annotated tensor that is not exact.
        ValueError: a model not made by `apply`, a format never trained, or
            inputs that do not fit the model.
    """
    if not isinstance(model, SearchModel):
        raise ValueError(f"to_tflite needs a model made by fliqs_keras.apply, got {type(model).__name__}.")
    path = files.destination(path)
    examples = _examples(representative_data, model)
    content, plans, kernels = tflite_content(model, examples)
    files.write_bytes(path, content)
    check = verify_annotations(content)
    with quiet():
        agreement, difference = _compare(model, content, examples[:verify_samples])
    result = Verification(str(path), min(len(examples), verify_samples), agreement, difference, plans, check,
                          _weight_bytes(content, kernels))
    logging.debug("fliqs_keras.export: %s", result)
    if not check.ok:
        raise ExportVerificationError(f"Annotated tensors of {path} are not exact: {check.failures}")
    if agreement < min_agreement:
        raise ExportVerificationError(
            f"{path} agrees with the Keras model on {agreement:.4f} of {result.samples} argmaxes (< {min_agreement}); "
            f"max |difference| {difference:.4g}. The file is written for inspection.\n{legalize.report(plans)}")
    return result


_CALIBRATION = 200


def tflite_content(model: SearchModel, examples: np.ndarray, *, int16_outputs: bool = True
                   ) -> tuple[bytes, list[LayerPlan], dict[str, ExportedWeight]]:
    """The TFLite file of `model` in its current formats, with its layer plans and exported kernels; unverified.

    Args:
        model: a model made by `apply`.
        examples: an array of inputs, for calibration.
        int16_outputs: integer layers that compute a model output run with
            INT16 activations (`tflite.widen_outputs`). False where the model
            is one layer cut out of a larger one, whose output another layer
            reads (`cost_tables` times such layers).
    """
    record = build_formats_file(model)
    _check_range(examples, model, record)
    plans = legalize.plan(record)
    exported, kernels = float_model(model, saturate=_saturation(plans, record))
    with quiet():
        float_tflite = tflite.convert(exported)
        quantized = tflite.quantize(float_tflite, plans, kernels, record, examples[:_CALIBRATION],
                                    int16_outputs=int16_outputs)
    plans = quantized.plans
    annotated, embedded = _file_metadata(record, plans, kernels, quantized.axes)
    content = annotations.add_metadata(quantized.content, {annotations.FORMATS_METADATA: embedded,
                                                           annotations.ANNOTATION_METADATA: annotated})
    return content, plans, kernels


def _file_metadata(record: dict[str, Any], plans: list[LayerPlan], kernels: dict[str, ExportedWeight],
                   axes: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The annotations, and the formats file as the TFLite file embeds it.

    Scales the file's tensors already hold (quantization parameters, the
    FLOAT16 kernels' scale tensors, the annotations) are named, not repeated.
    """
    by_layer = {plan.layer: plan for plan in plans}
    annotated, embedded = {}, copy.deepcopy(record)
    for key, axis in axes.items():
        kernel = kernels[key]
        plan = by_layer[kernel.layer]
        if plan.annotated:
            annotated[kernel.tensor_name] = annotations.annotation(
                kernel.layer, kernel.fmt, kernel.scale, axis,
                scale_tensor=float16.scale_name(kernel.tensor_name) if plan.float16 else None)
        if plan.annotated or plan.weight_bits is not None:
            embedded["layers"][kernel.layer]["weight_scales"][kernel.path] = kernel.tensor_name
    return annotated, embedded


def _saturation(plans: list[LayerPlan], record: dict[str, Any]) -> dict[str, tuple[float | None, float]]:
    """Inputs narrower than INT8 run in INT8 tensors with their own step, whose range
    reaches past the clip; an explicit clip before the layer saturates them as trained."""
    result = {}
    for plan in plans:
        entry = record["layers"][plan.layer]
        if plan.activation_bits == 8 and "input" in entry["input_clips"] and (
                formats.get(plan.activation_format).bits < 8):
            clip, signed = entry["input_clips"]["input"], entry["input_signed"]["input"]
            result[plan.layer] = (-clip if signed else None, clip)
    return result


def _examples(data: Any, model: keras.Model) -> np.ndarray:
    shape = tuple(model.inputs[0].shape[1:])
    wanted = np.dtype(model.inputs[0].dtype)
    if isinstance(data, np.ndarray) or hasattr(data, "shape"):
        array = _input_array(data, wanted)
    else:
        parts = []
        for item in data:
            item = item[0] if isinstance(item, (tuple, list)) else item
            item = _input_array(item, wanted)
            parts.append(item if item.shape != shape else item[None])
            if sum(len(p) for p in parts) >= 1000:
                break
        if not parts:
            raise ValueError("representative_data is empty.")
        array = np.concatenate(parts)
    if array.shape[1:] != shape:
        raise ValueError(f"representative_data has examples of shape {array.shape[1:]}; the model takes {shape}.")
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    if bad.any():
        raise ValueError(f"representative_data has {int(bad.sum())} of {len(array)} examples with NaN or infinite "
                         f"values (the first at index {int(np.argmax(bad))}); they would calibrate non-finite "
                         "scales into the file.")
    return array


# How far past the trained input clip the representative data may reach before it reads as unscaled.
_RANGE_FACTOR = 10.0


def _check_range(examples: np.ndarray, model: keras.Model, record: dict[str, Any]):
    """ValueError when the examples reach far past the inputs that the layers reading them trained on."""
    largest = float(np.abs(examples).max()) if examples.size else 0.0
    for path, layer in graph.walk_layers(model):
        clip = record["layers"].get(path, {}).get("input_clips", {}).get("input")
        if clip is not None and graph.reads_model_input(layer, model) and largest > _RANGE_FACTOR * clip:
            raise ValueError(
                f"representative_data reaches |x| = {largest:.4g}; layer {path!r}, which reads the model's input, "
                f"trained on inputs clipped at {clip:.4g}: pass the examples scaled as in training.")


def _input_array(data: Any, wanted: np.dtype) -> np.ndarray:
    """`data` as float32; ValueError for integer data given to a model that takes floats (unscaled pixels?)."""
    array = np.asarray(data)
    if np.issubdtype(wanted, np.floating) and not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"representative_data is {array.dtype} (values {array.min()}..{array.max()}) but the model "
                         f"takes {wanted} inputs: pass them as in training (e.g. pixels scaled to floats).")
    return array.astype(np.float32)


def _compare(model: keras.Model, content: bytes, examples: np.ndarray) -> tuple[float, float]:
    from ai_edge_litert import interpreter

    runner = interpreter.Interpreter(model_content=content).get_signature_runner(tflite.SIGNATURE)
    input_name = next(iter(runner.get_input_details()))
    output_name = next(iter(runner.get_output_details()))
    got = np.concatenate([runner(**{input_name: x[None]})[output_name] for x in examples])
    want = keras.ops.convert_to_numpy(model.predict(examples, batch_size=256, verbose=0))
    agreement = float(np.mean(np.argmax(got, -1) == np.argmax(want, -1)))
    return agreement, float(np.max(np.abs(got - want)))


def _weight_bytes(content: bytes, kernels: dict[str, ExportedWeight]) -> dict[str, int]:
    """Bytes of each quantized layer's kernels in the file, by layer."""
    from ai_edge_litert.tools import flatbuffer_utils

    model_t = flatbuffer_utils.read_model_from_bytearray(content)
    graph = model_t.subgraphs[0]
    by_name = {t.name.decode(): t for t in graph.tensors}
    sizes = {}
    for kernel in kernels.values():
        tensor = by_name.get(kernel.tensor_name)
        data = None if tensor is None else model_t.buffers[tensor.buffer].data
        if data is not None:
            sizes[kernel.layer] = sizes.get(kernel.layer, 0) + len(annotations.buffer_bytes(data))
    return sizes


__all__ = [
    "AnnotationCheck", "ExportVerificationError", "ExportedWeight", "InputQuantizer", "LayerPlan", "Verification",
    "build_formats_file", "check_matches", "chosen_architecture", "fixed_model", "float_model", "load_formats_file",
    "save_formats_file", "tflite_content", "to_tflite", "verify_annotations",
]
