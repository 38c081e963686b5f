"""`apply(model, search_space)`: the searchable copy of a Keras model, its report, and `set_formats`.

The model is cloned with its weights, every layer the search space names is
wrapped, and the report says for every layer what happened and why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
from absl import logging

from fliqs_keras import blocks, formats, layers, formats_file
from fliqs_keras.graph import is_graph_model, walk_layers
from fliqs_keras.search_model import SearchModel, decisions, searchable_layers
from fliqs_keras.search_space import SearchSpace


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One line of the report."""

    path: str
    layer_type: str
    status: str  # "searched", "fixed", "float", "skipped" or "architecture" (a mask or skip of a searched block)
    weight_formats: tuple[str, ...] = ()
    activation_formats: tuple[str, ...] = ()
    decisions: tuple[str, ...] = ()
    reason: str = ""
    current: tuple[str, ...] = ()  # the format each of its decisions holds now


@dataclasses.dataclass
class Report:
    """What `apply` did to every layer, and the rules that matched nothing."""

    layers: list[LayerReport]
    warnings: list[str]

    def __getitem__(self, path: str) -> LayerReport:
        for entry in self.layers:
            if entry.path == path:
                return entry
        raise KeyError(f"No layer {path!r} in the report; layers: {[e.path for e in self.layers]}.")

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-serialisable values."""
        return {"layers": [dataclasses.asdict(e) for e in self.layers], "warnings": list(self.warnings)}

    def __str__(self) -> str:
        width = max([len(e.path) for e in self.layers] + [5])
        type_width = max([len(e.layer_type) for e in self.layers] + [4])
        status_width = max([len(e.status) for e in self.layers] + [8]) + 2
        lines = [f"{'layer':<{width}}  {'type':<{type_width}}  {'status':<{status_width}}details"]
        for e in self.layers:
            if e.status in ("searched", "fixed"):
                detail = "formats " + ", ".join(e.weight_formats or ("float",))
                if e.activation_formats != e.weight_formats:
                    detail += "; inputs " + ", ".join(e.activation_formats or ("float",))
                detail += f"; decision {', '.join(e.decisions)}"
                if e.current:
                    detail += f"; now {', '.join(e.current)}"
            else:
                detail = e.reason
            lines.append(f"{e.path:<{width}}  {e.layer_type:<{type_width}}  {e.status:<{status_width}}{detail}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _check_model(model: Any):
    if not isinstance(model, keras.Model):
        raise ValueError(f"apply needs a keras.Model, got {type(model).__name__}.")
    if not is_graph_model(model):
        raise ValueError(
            f"Model {model.name!r} is a subclassed model ({type(model).__name__}); apply can clone only "
            "Sequential and Functional models. Build it with the Functional or Sequential API, or wrap "
            "its layers yourself with fliqs_keras.layers.wrap(layer, formats) in its __init__."
        )
    if not model.built or (isinstance(model, keras.Sequential) and not model.inputs):
        raise ValueError(
            f"Model {model.name!r} is not built: give it a keras.Input (or call model.build(shape)) "
            "before apply, so that every layer has its weights."
        )
    if searchable_layers(model):
        raise ValueError(
            f"Model {model.name!r} is already searchable (made by fliqs_keras.apply): change its formats with "
            "fliqs_keras.set_formats, or apply the search space to the original model."
        )


def _skip_reason(layer: keras.layers.Layer) -> str:
    if isinstance(layer, keras.Model):
        return "nested model: its layers are listed under it"
    if isinstance(layer, keras.layers.BatchNormalization):
        return "batch norm: no op of its own to quantize (it folds into the preceding layer at export)"
    if isinstance(layer, keras.layers.LayerNormalization):
        return "layer norm: statistics of its input, not a product with weights; it runs in float"
    if blocks.is_architecture(layer):
        return "architecture choice " + ", ".join(layer.decisions)
    if not layer.weights:
        return "no weights to quantize"
    return (f"unsupported layer type {type(layer).__name__}; supported: "
            f"{', '.join(sorted(t.__name__ for t in layers.DEFAULT_CONFIGS))}")


def _status(layer: keras.layers.Layer) -> str:
    return "architecture" if blocks.is_architecture(layer) else "skipped"


def _plan(model: keras.Model, space: SearchSpace):
    """Per layer: its Resolution (wrap) or a LayerReport (no wrap); plus rule warnings."""
    plans, entries, used_rules = {}, [], set()
    decision_choices: dict[str, tuple[tuple[formats.Format, ...], str]] = {}
    for path, layer in walk_layers(model):
        layer_type = type(layer).__name__
        if isinstance(layer, keras.Model) or layers.default_config(layer) is None:
            rule = space.explicit_rule(layer.name, layer_type)
            if rule is not None and not rule.choices.is_float and not isinstance(layer, keras.Model):
                raise ValueError(
                    f"Search space rule {rule.key!r} gives formats to layer {path!r}, but its type "
                    f"{layer_type} cannot be quantized: {_skip_reason(layer)}."
                )
            if rule is not None:
                used_rules.add(rule.key)
            entries.append(LayerReport(path, layer_type, _status(layer), reason=_skip_reason(layer)))
            continue
        resolution = space.resolve(layer.name, layer_type)
        policy = layer.dtype_policy
        if resolution.rule is not None and not resolution.choices.is_float and (
                policy.compute_dtype != "float32" or policy.variable_dtype != "float32"):
            raise ValueError(
                f"Layer {path!r} computes in {policy.compute_dtype} (dtype policy {policy.name!r}); the formats "
                "are simulated exactly in float32, so searchable layers need the 'float32' policy: build the "
                "model after keras.config.set_dtype_policy('float32'), or leave the layer in float with a rule.")
        if resolution.rule is None:
            entries.append(LayerReport(path, layer_type, "float", reason="no rule of the search space names it "
                                       "(a '*' rule searches every supported layer)"))
            continue
        used_rules.add(resolution.rule)
        if resolution.choices.is_float:
            entries.append(LayerReport(path, layer_type, "float", reason=f"left in float by rule {resolution.rule!r}"))
            continue
        decisions = []
        for name, choices in ((resolution.weight_decision, resolution.choices.weights),
                              (resolution.activation_decision, resolution.choices.activations)):
            if not choices or name in decisions:
                continue
            decisions.append(name)
            earlier = decision_choices.setdefault(name, (choices, path))
            if earlier[0] != choices:
                raise ValueError(
                    f"Layers {earlier[1]!r} and {path!r} share decision {name!r} but have different "
                    f"choices ({[f.name for f in earlier[0]]} and {[f.name for f in choices]})."
                )
        plans[id(layer)] = resolution
        entries.append(LayerReport(
            path, layer_type, "fixed" if resolution.choices.fixed else "searched",
            tuple(f.name for f in resolution.choices.weights),
            tuple(f.name for f in resolution.choices.activations), tuple(decisions)))
    warnings = [f"search space rule {rule.key!r} matches no layer" for rule in space.rules
                if rule.key not in used_rules and rule.kind != "default"]
    return plans, entries, warnings


def apply(model: keras.Model, search_space: Any = None) -> SearchModel:
    """Returns the searchable copy of `model` under `search_space`, a `SearchModel`.

    Args:
        model: a built Sequential or Functional model (keras.applications
            models included; nested models are cloned recursively).
        search_space: a `SearchSpace` or anything `SearchSpace.get` takes; None
            means every supported layer searches over `search_space.DEFAULT_CHOICES`.

    Raises:
        ValueError: for a subclassed or unbuilt model, an unknown format, a rule
            that gives formats to a layer that cannot be quantized, or layers
            that share a decision with different choices.
    """
    _check_model(model)
    space = SearchSpace.get(search_space) if search_space is not None else SearchSpace()
    plans, entries, warnings = _plan(model, space)
    if not plans:
        raise ValueError(
            f"The search space wraps no layer of model {model.name!r}:\n"
            + str(Report(entries, warnings))
        )

    def clone_layer(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        resolution = plans.get(id(layer))
        if resolution is None:
            return fresh
        return layers.wrap(
            fresh, resolution.choices.weights, resolution.choices.activations,
            weight_decision=resolution.weight_decision, activation_decision=resolution.activation_decision)

    cloned = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    _copy_weights(model, cloned)
    inputs = cloned.inputs[0] if len(cloned.inputs) == 1 else cloned.inputs
    outputs = cloned.outputs[0] if len(cloned.outputs) == 1 else cloned.outputs
    searchable = SearchModel(inputs=inputs, outputs=outputs, name=model.name)
    for wrapper in searchable_layers(searchable):
        wrapper.calibrate_weights()
    searchable._fliqs_report = Report(entries, warnings)
    for warning in warnings:
        logging.warning("fliqs_keras.apply: %s", warning)
    return searchable


def _copy_weights(source: keras.Model, target: keras.Model):
    by_name = {layer.name: layer for layer in target.layers}
    for layer in source.layers:
        if not layer.weights:
            continue
        clone = by_name[layer.name]
        if isinstance(layer, keras.Model):
            _copy_weights(layer, clone)
        elif layers.is_searchable(clone):
            clone.layer.set_weights(layer.get_weights())
        else:
            clone.set_weights(layer.get_weights())


def set_formats(model: keras.Model, choice: Any):
    """Sets the current format of decisions: one format for all, ``{decision: format}``, or a loaded formats file.

    The layers then compute in these formats, and `chosen_formats`, `report`, the cost,
    the formats file and the export read them.

    Args:
        model: a model made by `apply` (or one holding searchable layers).
        choice: a format for every decision, ``{decision: format}`` for some,
            or a formats file as `export.load_formats_file` returns it.

    Raises:
        ValueError: naming the decision when a format is not among its
            choices, for unknown decisions, or for a formats file written for
            another model.
    """
    wrappers = searchable_layers(model)
    if not wrappers:
        raise ValueError(f"Model {model.name!r} has no searchable layers: make it with fliqs_keras.apply.")
    known = decisions(model)
    if isinstance(choice, dict) and choice.get("kind") == formats_file.KIND:
        formats_file.validate(choice)
        formats_file.check_matches(choice, model)
        choice = choice["decisions"]
    mapping = dict(choice) if isinstance(choice, dict) else {name: choice for name in known}
    unknown = set(mapping) - set(known)
    if unknown:
        raise ValueError(f"Unknown decisions {sorted(unknown)}; the model has {list(known)}.")
    # Inside a JAX `fit` the training state lives outside the variables until a sync (which a
    # callback's `self.model` does, a model captured otherwise does not); the next step then starts
    # from the variables, so the assignment below reaches it.
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()
    if isinstance(model, SearchModel):
        model.format_state.set(mapping)
        return
    for wrapper in wrappers:
        for name in wrapper.decisions:
            if name in mapping:
                wrapper.set_format(name, mapping[name])


def report(model: keras.Model) -> Report:
    """What `apply` did to every layer of `model`, with the format each searched layer holds now.

    Rebuilt from the layers after a reload (rules that matched nothing are
    known only to the model `apply` returned).

    Raises:
        ValueError: for a model without searchable layers.
    """
    wrappers = {path: layer for path, layer in walk_layers(model) if layers.is_searchable(layer)}
    if not wrappers:
        raise ValueError(f"Model {model.name!r} was not made by fliqs_keras.apply: it has no searchable layers.")
    stored = getattr(model, "_fliqs_report", None)
    if stored is None:
        entries = []
        for path, layer in walk_layers(model):
            if path in wrappers:
                fixed = len(layer.weight_formats) <= 1 and len(layer.activation_formats) <= 1
                entries.append(LayerReport(
                    path, type(layer.layer).__name__, "fixed" if fixed else "searched",
                    tuple(f.name for f in layer.weight_formats), tuple(f.name for f in layer.activation_formats),
                    tuple(layer.decisions)))
            else:
                entries.append(LayerReport(path, type(layer).__name__, _status(layer), reason=_skip_reason(layer)))
        stored = Report(entries, [])
    current = {path: tuple(f.name for f in w.current_formats().values()) for path, w in wrappers.items()}
    return Report([dataclasses.replace(e, current=current[e.path]) if e.path in current else e
                   for e in stored.layers], list(stored.warnings))
