"""The searchable model: a Functional model that owns the format state and the controller.

Without `FliqsSearch` it trains in the formats its layers hold (fixed-format
QAT); with it, each compiled training step also runs the search step.
"""

from __future__ import annotations

from typing import Any

import keras

from fliqs_keras import architecture, blocks, layers
from fliqs_keras.controller import Controller
from fliqs_keras.format_state import FormatState
from fliqs_keras.graph import walk_layers
from fliqs_keras.search_config import SearchConfig


def searchable_layers(model: keras.Model) -> list:
    """Every searchable wrapper in `model`, nested models included, in layer order."""
    return [layer for _, layer in walk_layers(model) if layers.is_searchable(layer)]


def architecture_layers(model: keras.Model) -> list:
    """Every layer of `model` that reads an architecture decision (inside wrappers too), in layer order."""
    found = []
    for _, layer in walk_layers(model):
        inner = layer.layer if layers.is_searchable(layer) else layer
        if blocks.is_architecture(inner):
            found.append(inner)
    return found


def format_decisions(model: keras.Model) -> dict[str, tuple]:
    """The format decisions of a searchable model with their choices, in layer order."""
    result = {}
    for wrapper in searchable_layers(model):
        result.update(wrapper.decisions)
    return result


def decisions(model: keras.Model) -> dict[str, tuple[architecture.Choice, ...]]:
    """Every decision of a searchable model (formats, then any architecture choices) with its choices.

    Raises:
        ValueError: when layers give one decision different choices.
    """
    result = format_decisions(model)
    for layer in architecture_layers(model):
        for name, choices in layer.decisions.items():
            if result.setdefault(name, choices) != choices:
                raise ValueError(f"Decision {name!r} of layer {layer.name!r} has choices "
                                 f"{[c.name for c in choices]}, elsewhere {[c.name for c in result[name]]}.")
    return result


def check_plain(model: keras.Model, what: str):
    """Raises ValueError when `model` still has architecture decisions, which `what` cannot take."""
    found = architecture_layers(model)
    if found:
        raise ValueError(f"{what} needs a plain architecture, but model {model.name!r} still searches one "
                         f"(layer {found[0].name!r}): export the chosen one first, "
                         "fliqs_keras.export.chosen_architecture(model).")


@keras.saving.register_keras_serializable(package="fliqs_keras")
class SearchModel(keras.Model):
    """A Functional model of searchable layers (formats, and any architecture choices) with its policy.

    Built by `fliqs_keras.apply`; constructed like a Functional model
    (``SearchModel(inputs, outputs)``), which is also how it is revived.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        choices = decisions(self)
        if not choices:
            raise ValueError(f"SearchModel {self.name!r} has no searchable layers: build it with fliqs_keras.apply.")
        self.decision_names = list(choices)
        self.format_state = FormatState({name: [f.name for f in fmts] for name, fmts in choices.items()},
                                        name="fliqs_formats")
        for layer in searchable_layers(self) + architecture_layers(self):
            layer.bind_formats(self.format_state)
        self.controller = Controller([len(choices[name]) for name in self.decision_names], name="fliqs_controller")
        self.search_step = None
        self.search_config = None  # the settings of the last search, saved with the model

    def start_search(self, step, config):
        """Makes `step` (a `search_step.SearchStep`) the training step, under search settings `config`."""
        self.search_step, self.search_config = step, config
        self.make_train_function(force=True)

    def end_search(self):
        """Makes the plain training step (fixed-format QAT in the current formats) the training step again."""
        self.search_step = None
        self.make_train_function(force=True)

    def get_config(self):
        config = super().get_config()
        if self.search_config is not None:
            config["fliqs_search"] = self.search_config.to_dict()
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        search = config.pop("fliqs_search", None)
        model = super().from_config(config, custom_objects=custom_objects)
        model.search_config = None if search is None else SearchConfig.from_dict(search)
        return model

    def train_step(self, *args):
        # TensorFlow's step takes (data); JAX's takes (state, data) and returns (logs, state).
        if self.search_step is None:
            return super().train_step(*args)
        if keras.backend.backend() == "jax":
            return self._stateless_search_step(*args)
        (data,) = args
        return self.search_step(self, data, super().train_step)

    def _stateless_search_step(self, state, data):
        """The search step as JAX needs it: a pure function of the training state.

        The search step is written with variable reads and assignments, so it
        runs in a StatelessScope over the whole state (every variable of it
        mapped: JAX's `fit` empties the variables themselves during an epoch),
        and the state after it is read back off the scope.
        """
        groups = (self.trainable_variables, self.non_trainable_variables, self.optimizer.variables,
                  self.metrics_variables)
        mapping = [pair for variables, values in zip(groups, state) for pair in zip(variables, values)]
        base_train_step = super().train_step
        with keras.StatelessScope(state_mapping=mapping) as scope:

            def current():
                return tuple([scope.get_current_value(v) for v in variables] for variables in groups)

            def train_step(data):
                logs, after = base_train_step(current(), data)
                for variables, values in zip(groups, after):
                    for variable, value in zip(variables, values):
                        variable.assign(value)
                return logs

            logs = self.search_step(self, data, train_step)
            return logs, current()


def chosen_formats(model: Any) -> dict[str, str]:
    """The format each decision of a searchable model holds, JSON-serialisable.

    After a search these are the chosen formats (the argmax, or those a cost
    limit kept, `FliqsSearch(max_cost_ratio=...)`); after `set_formats`, the
    ones set. The layers compute in them and the cost, the formats file and
    the export read them.

    Raises:
        ValueError: for a model not made by `fliqs_keras.apply`.
    """
    if not isinstance(model, SearchModel):
        raise ValueError(f"chosen_formats() needs a model made by fliqs_keras.apply, got {type(model).__name__}.")
    return {name: fmt.name for name, fmt in model.format_state.formats().items()}
