"""Format annotations in a TFLite file's metadata, and the check that the tensors honour them.

A kernel whose format TFLite cannot run is stored as its exact codes (FLOAT16,
with a scale tensor) or its exact values (float32), annotated with its format;
`verify_annotations` checks them bit for bit. Metadata is zlib-compressed JSON.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zlib
from typing import Any

import keras
import numpy as np

from fliqs_keras import formats, quantizers

FORMATS_METADATA = "fliqs_formats"
ANNOTATION_METADATA = "fliqs_annotations"


@dataclasses.dataclass
class AnnotationCheck:
    """What `verify_annotations` found: the tensors checked, and per failing tensor why."""

    checked: list[str]
    failures: dict[str, str]

    @property
    def ok(self) -> bool:
        """Whether every annotated tensor honours its format."""
        return not self.failures


def add_metadata(tflite: bytes, entries: dict[str, Any]) -> bytes:
    """`tflite` with each ``{name: JSON-serialisable}`` entry in its metadata (replacing same names)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model_t = _model(tflite)
    model_t.metadata = [m for m in (model_t.metadata or []) if _text(m.name) not in entries]
    for name, value in entries.items():
        buffer = schema.BufferT()
        text = json.dumps(value, separators=(",", ":")).encode()
        buffer.data = np.frombuffer(zlib.compress(text, 9), np.uint8)
        model_t.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = name, len(model_t.buffers) - 1
        model_t.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model_t))


def read_metadata(tflite: bytes | str | pathlib.Path) -> dict[str, Any]:
    """The JSON metadata entries of a TFLite file (those that parse as JSON).

    Raises:
        ValueError: when the file is not a readable TFLite flatbuffer.
    """
    return {name: value for name, value in _metadata(_model(tflite)).items() if not isinstance(value, _Unreadable)}


class _Unreadable(str):
    """A metadata entry that does not parse as JSON: why."""


def _metadata(model_t) -> dict[str, Any]:
    result = {}
    for entry in model_t.metadata or []:
        data = model_t.buffers[entry.buffer].data
        try:
            raw = buffer_bytes(data)
            # JSON never starts with "x", a zlib stream always does (deflate, 32K window).
            result[_text(entry.name)] = json.loads((zlib.decompress(raw) if raw[:1] == b"x" else raw).decode())
        except (ValueError, UnicodeDecodeError, TypeError, zlib.error) as error:
            result[_text(entry.name)] = _Unreadable(f"{type(error).__name__}: {error}")
    return result


def _model(tflite: bytes | str | pathlib.Path):
    from ai_edge_litert.tools import flatbuffer_utils

    where = str(tflite) if isinstance(tflite, (str, pathlib.Path)) else "the TFLite content"
    try:
        return flatbuffer_utils.read_model_from_bytearray(_bytes(tflite))
    except OSError as error:
        raise ValueError(f"Cannot read {where}: {error}.") from None
    except Exception as error:  # noqa: BLE001 - the flatbuffer reader raises struct, index and type errors alike
        raise ValueError(f"{where} is not a readable TFLite flatbuffer (truncated or corrupt?): "
                         f"{type(error).__name__}: {error}.") from None


def annotation(layer: str, fmt: formats.Format, scale: np.ndarray, channel_axis: int,
               scale_tensor: str | None = None) -> dict[str, Any]:
    """The metadata entry of one annotated kernel: its layer, format, channel axis and scales.

    With `scale_tensor`, the kernel holds the codes and that tensor the
    scales; without, the kernel holds the values and the entry the scales.
    """
    entry = {"layer": layer, "format": fmt.name, "channel_axis": channel_axis}
    if scale_tensor is not None:
        entry["scale_tensor"] = scale_tensor
    else:
        entry["scale"] = [float(s) for s in np.asarray(scale, np.float32)]
    return entry


def check_tensor(values: np.ndarray, entry: dict[str, Any]) -> str | None:
    """Why `values` do not honour `entry`, or None when every value is ``code * scale`` exactly."""
    values = np.asarray(values, np.float32)
    scale = np.asarray(entry["scale"], np.float32)
    axis = entry["channel_axis"]
    if values.shape[axis] != scale.size and scale.size != 1:
        return f"{scale.size} scales for {values.shape[axis]} channels"
    shape = [1] * values.ndim
    shape[axis] = -1
    scale = scale.reshape(shape) if scale.size != 1 else scale.reshape(())
    grid = quantizers.grid_tensor(formats.get(entry["format"]))
    codes = keras.ops.convert_to_numpy(quantizers.quantize_dequantize(
        keras.ops.convert_to_tensor(np.asarray(values / scale, np.float32)), grid))
    rebuilt = (codes * scale).astype(np.float32)
    bad = np.flatnonzero(rebuilt.view(np.int32) != values.view(np.int32))
    if bad.size:
        first = np.unravel_index(bad[0], values.shape)
        return (f"{bad.size} of {values.size} values are not {entry['format']} codes times the scale "
                f"(first at {tuple(int(i) for i in first)}: {values[first]!r}, nearest {rebuilt[first]!r})")
    return None


def verify_annotations(tflite: bytes | str | pathlib.Path) -> AnnotationCheck:
    """Checks every annotated tensor of a TFLite file.

    Metadata that is missing or does not parse fails the check: nothing
    checked is never reported as exact.

    Raises:
        ValueError: when the file is not a readable TFLite flatbuffer.
    """
    model_t = _model(tflite)
    annotations = _metadata(model_t).get(ANNOTATION_METADATA)
    if annotations is None:
        return AnnotationCheck([], {ANNOTATION_METADATA: "the file has no such metadata (not written by "
                                                          "fliqs_keras.export.to_tflite?)"})
    if isinstance(annotations, _Unreadable) or not isinstance(annotations, dict):
        return AnnotationCheck([], {ANNOTATION_METADATA: f"the metadata cannot be read as annotations: {annotations}"})
    tensors = {_text(t.name): t for graph in model_t.subgraphs for t in graph.tensors}
    checked, failures = [], {}
    for name, entry in annotations.items():
        checked.append(name)
        tensor = tensors.get(name)
        if tensor is None:
            failures[name] = "no tensor of that name in the file"
            continue
        try:
            problem = _check_annotated(model_t, tensors, tensor, entry)
        except (KeyError, TypeError, ValueError) as error:
            problem = f"its annotation cannot be read: {type(error).__name__}: {error}"
        if problem:
            failures[name] = problem
    return AnnotationCheck(checked, failures)


_CONSTANT_TYPES = {0: np.float32, 1: np.float16}  # TFLite FLOAT32, FLOAT16


def buffer_bytes(data) -> bytes:
    """A flatbuffer buffer's data as bytes (the reader gives a uint8 array, or bytes for some files)."""
    return bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data, np.uint8).tobytes()


def constant_values(model_t, tensor) -> np.ndarray | None:
    """A FLOAT32 or FLOAT16 constant's values as float32, or None for any other tensor."""
    data = model_t.buffers[tensor.buffer].data
    if tensor.type not in _CONSTANT_TYPES or data is None:
        return None
    values = np.frombuffer(buffer_bytes(data), _CONSTANT_TYPES[tensor.type])
    return values.astype(np.float32).reshape(tensor.shape)


def _check_annotated(model_t, tensors: dict[str, Any], tensor, entry: dict[str, Any]) -> str | None:
    """Why an annotated tensor breaks its entry: FLOAT16 codes with a scale tensor, or float32 values."""
    values = constant_values(model_t, tensor)
    if "scale_tensor" not in entry:
        if values is None or tensor.type != 0:
            return "not a float32 constant tensor"
        return check_tensor(values, entry)
    if values is None or tensor.type != 1:
        return "not a float16 constant tensor"
    holder = tensors.get(entry["scale_tensor"])
    scale = None if holder is None else constant_values(model_t, holder)
    channels = values.shape[entry["channel_axis"]]
    if scale is None or scale.size != channels or not np.all(np.isfinite(scale) & (scale > 0)):
        return f"its scale tensor {entry['scale_tensor']!r} is missing or not {channels} positive finite floats"
    return check_tensor(values, {**entry, "scale": [1.0]})


def _bytes(tflite) -> bytes:
    return pathlib.Path(tflite).read_bytes() if isinstance(tflite, (str, pathlib.Path)) else bytes(tflite)


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)
