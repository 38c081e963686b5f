"""Format annotations in a TFLite file's metadata, and the check that the tensors honour them.

A kernel whose format TFLite cannot run is stored as its exact trained
values, annotated with its format and scales; `verify_annotations` checks them
bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
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
        buffer.data = np.frombuffer(json.dumps(value).encode(), np.uint8)
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
            result[_text(entry.name)] = json.loads(np.asarray(data, np.uint8).tobytes().decode())
        except (ValueError, UnicodeDecodeError, TypeError) as error:
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


def annotation(layer: str, fmt: formats.Format, scale: np.ndarray, channel_axis: int) -> dict[str, Any]:
    """The metadata entry of one annotated kernel: its layer, format, channel axis and scales."""
    return {"layer": layer, "format": fmt.name, "channel_axis": channel_axis,
            "scale": [float(s) for s in np.asarray(scale, np.float32)]}


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
        data = model_t.buffers[tensor.buffer].data
        if tensor.type != 0 or data is None:  # 0: FLOAT32 constant
            failures[name] = "not a float32 constant tensor"
            continue
        values = np.frombuffer(np.asarray(data, np.uint8).tobytes(), np.float32).reshape(tensor.shape)
        try:
            problem = check_tensor(values, entry)
        except (KeyError, TypeError, ValueError) as error:
            problem = f"its annotation cannot be read: {type(error).__name__}: {error}"
        if problem:
            failures[name] = problem
    return AnnotationCheck(checked, failures)


def _bytes(tflite) -> bytes:
    return pathlib.Path(tflite).read_bytes() if isinstance(tflite, (str, pathlib.Path)) else bytes(tflite)


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)
