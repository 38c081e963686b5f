"""The formats file: a searched model's chosen formats, scales and clips as versioned JSON.

`load_formats_file` checks the schema and names what is wrong, so a corrupt,
truncated or other-version file is an error, never a silent default.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import keras

from fliqs_keras import cost as cost_lib
from fliqs_keras import files, formats, layers
from fliqs_keras.graph import walk_layers
from fliqs_keras.search_config import SearchConfig
from fliqs_keras.search_model import check_plain, decisions

KIND = "fliqs_keras.formats"
VERSION = 1

_LAYER_FIELDS = {
    "type": str, "decisions": list, "weight_format": (str, type(None)), "activation_format": (str, type(None)),
    "weight_scales": dict, "input_clips": dict, "input_signed": dict, "macs": int, "params": int,
    "bops": (int, float), "weight_bytes": (int, float),
}


def build_formats_file(model: keras.Model) -> dict[str, Any]:
    """The formats file of a searchable model in its current formats (after a search: the chosen ones).

    Input clips are those trained in the chosen formats; an input format that
    never ran in training raises a ValueError naming the layer.
    """
    known = decisions(model)
    if not known:
        raise ValueError(f"Model {model.name!r} has no searchable layers: make it with fliqs_keras.apply.")
    check_plain(model, "The formats file")
    costs = cost_lib.CostModel(model, "bops")
    by_path = {entry.path: entry for entry in costs.layers}
    chosen, entries = {}, {}
    for path, layer in walk_layers(model):
        if not layers.is_searchable(layer):
            continue
        current = layer.current_formats()
        chosen.update({name: fmt.name for name, fmt in current.items()})
        weight = current.get(layer.weight_decision) if layer.weight_formats else None
        activation = current.get(layer.activation_decision) if layer.activation_formats else None
        inputs = [i for i in layer.frozen_inputs() if i is not None]
        entry = by_path[path]
        entries[path] = {
            "type": type(layer.layer).__name__,
            "decisions": list(layer.decisions),
            "weight_format": weight.name if weight else None,
            "activation_format": activation.name if activation else None,
            "weight_scales": {w.path: [float(s) for s in w.scale] for w in layer.frozen_weights()},
            "input_clips": {i.name: i.clip for i in inputs},
            "input_signed": {i.name: i.signed for i in inputs},
            "macs": int(entry.macs),
            "params": int(entry.params),
            "bops": float(costs.layer_cost(entry, weight, activation)),
            "weight_bytes": entry.params * cost_lib.bits(weight) / 8,
        }
    record = {
        "kind": KIND,
        "version": VERSION,
        "model": model.name,
        "decisions": chosen,
        "layers": entries,
        "total": {"bops": sum(e["bops"] for e in entries.values()),
                  "weight_bytes": sum(e["weight_bytes"] for e in entries.values())},
    }
    config = getattr(model, "search_config", None)
    if config is not None:
        record["search"] = config.to_dict()
    return record


def save_formats_file(record: Any, path: str | pathlib.Path) -> dict[str, Any]:
    """Writes a formats file (a dict from `build_formats_file`, or a searchable model) as JSON; returns it."""
    if isinstance(record, keras.Model):
        record = build_formats_file(record)
    validate(record, str(path))
    files.write_text(path, json.dumps(record, indent=1, sort_keys=False))
    return record


def load_formats_file(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads and checks a formats file, or the one a TFLite file from `to_tflite` embeds.

    In the embedded one, a weight's scales that the file's tensors hold are
    given as that tensor's name (see docs/export.md).

    Raises:
        ValueError: saying which file and what is wrong.
    """
    path = pathlib.Path(path)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise ValueError(f"Cannot read formats file {str(path)!r}: {error}.") from None
    if content[4:8] == _TFLITE_IDENTIFIER:
        return _from_tflite(content, str(path))
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"Formats file {str(path)!r} is not text (a binary or corrupt file?): it is not "
                         "UTF-8 JSON.") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"Formats file {str(path)!r} is not valid JSON (truncated or corrupt?): {error}.") from None
    validate(record, str(path))
    return record


_TFLITE_IDENTIFIER = b"TFL3"


def _from_tflite(content: bytes, where: str) -> dict[str, Any]:
    from fliqs_keras.export import annotations

    record = annotations.read_metadata(content).get(annotations.FORMATS_METADATA)
    if record is None:
        raise ValueError(f"{where} is a TFLite file without a readable {annotations.FORMATS_METADATA!r} metadata "
                         "entry (not written by fliqs_keras.export.to_tflite, or corrupt).")
    validate(record, where)
    return record


def validate(record: Any, where: str = "record"):
    """Raises ValueError naming the first thing in `record` that breaks the schema."""
    if not isinstance(record, dict) or record.get("kind") != KIND:
        raise ValueError(f"{where} is not a fliqs_keras formats file (no \"kind\": {KIND!r}).")
    version = record.get("version")
    if version != VERSION:
        raise ValueError(f"{where} has formats-file version {version!r}; this fliqs_keras reads version {VERSION}.")
    for key, kind in (("model", str), ("decisions", dict), ("layers", dict), ("total", dict)):
        if not isinstance(record.get(key), kind):
            raise ValueError(f"{where}: field {key!r} is missing or not a {kind.__name__}.")
    for decision, name in record["decisions"].items():
        _check_format(name, f"{where}: decision {decision!r}")
    if "search" in record:
        if not isinstance(record["search"], dict):
            raise ValueError(f"{where}: field 'search' is not an object.")
        try:
            SearchConfig.from_dict(record["search"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: field 'search' is not a valid search config: {error}") from None
    for path, entry in record["layers"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: layer {path!r} is not an object.")
        for field, kind in _LAYER_FIELDS.items():
            if field not in entry or not isinstance(entry[field], kind) or isinstance(entry[field], bool):
                raise ValueError(f"{where}: layer {path!r} has no valid {field!r} (got {entry.get(field)!r}).")
        for field in ("weight_format", "activation_format"):
            if entry[field] is not None:
                _check_format(entry[field], f"{where}: layer {path!r} {field}")
        for decision in entry["decisions"]:
            if decision not in record["decisions"]:
                raise ValueError(f"{where}: layer {path!r} names decision {decision!r}, which has no format.")
        _check_layer_follows_decisions(entry, record["decisions"], f"{where}: layer {path!r}")
        for weight, scales in entry["weight_scales"].items():
            if isinstance(scales, str) and scales:
                continue  # in a TFLite file: the tensor that holds them
            if not isinstance(scales, list) or not scales or not all(_positive(s) for s in scales):
                raise ValueError(f"{where}: layer {path!r} weight {weight!r} needs positive finite scales.")
        for name, clip in entry["input_clips"].items():
            if not _positive(clip) or not isinstance(entry["input_signed"].get(name), bool):
                raise ValueError(f"{where}: layer {path!r} input {name!r} needs a positive clip and a sign.")


def check_matches(record: dict[str, Any], model: keras.Model, where: str = "record"):
    """Raises ValueError when `record` was written for another model (a stale file)."""
    known = decisions(model)
    missing, extra = sorted(set(known) - set(record["decisions"])), sorted(set(record["decisions"]) - set(known))
    if missing or extra:
        raise ValueError(f"{where} does not fit model {model.name!r}: decisions missing from the file {missing}, "
                         f"decisions the model does not have {extra}.")
    for name, fmt in record["decisions"].items():
        if formats.get(fmt) not in known[name]:
            raise ValueError(f"{where}: decision {name!r} chooses {fmt}, which is not among the model's choices "
                             f"{[f.name for f in known[name]]}.")


def _check_layer_follows_decisions(entry: dict[str, Any], chosen: dict[str, str], where: str):
    """A layer's formats are its decisions': one decision for both, or the weights' then the inputs'."""
    held = [(field, entry[field]) for field in ("weight_format", "activation_format") if entry[field] is not None]
    names = entry["decisions"]
    if len(names) == 1:
        pairs = [(field, fmt, names[0]) for field, fmt in held]
    elif len(names) == 2 and len(held) == 2:
        pairs = [(field, fmt, name) for (field, fmt), name in zip(held, names)]
    else:
        raise ValueError(f"{where} has {len(names)} decisions {names} for {len(held)} quantized formats.")
    for field, fmt, name in pairs:
        if formats.get(fmt) != formats.get(chosen[name]):
            raise ValueError(f"{where} has {field} {fmt}, but its decision {name!r} chooses {chosen[name]}.")


def _check_format(name: Any, where: str):
    try:
        formats.get(name)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: {error}") from None


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
