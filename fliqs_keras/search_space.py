"""Which layers are searched, with which format choices, in which decisions.

A `SearchSpace` is an ordered set of rules from a layer name, a Keras class
name or ``"*"`` to a list of formats (searched), one format (fixed) or None
(float). Rules and decisions: docs/search_space.md.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import keras

from fliqs_keras import formats

DEFAULT_CHOICES = ("int4", "int8")
_FLOAT = ("float", "none")


@dataclasses.dataclass(frozen=True)
class Choices:
    """The formats a layer may take for its weights and for its activations.

    Empty tuples mean "left in float". `fixed` is true when there is a single
    choice for each.
    """

    weights: tuple[formats.Format, ...]
    activations: tuple[formats.Format, ...]

    @property
    def is_float(self) -> bool:
        """Whether the layer is left in float (no weight or input formats)."""
        return not self.weights and not self.activations

    @property
    def fixed(self) -> bool:
        """Whether every decision has a single choice (fixed-format QAT)."""
        return len(self.weights) <= 1 and len(self.activations) <= 1


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule of a search space: its key, what the key matches, and its choices."""

    key: str
    kind: str  # "default", "type" or "name"
    choices: Choices


@dataclasses.dataclass(frozen=True)
class Resolution:
    """What the search space says of one layer."""

    choices: Choices
    rule: str | None  # None: no rule matches the layer
    weight_decision: str
    activation_decision: str


def _formats_of(value: Any, where: str) -> tuple[formats.Format, ...]:
    if value is None or (isinstance(value, str) and value.strip().lower() in _FLOAT):
        return ()
    values = [value] if isinstance(value, (str, formats.IntFormat, formats.FloatFormat)) else value
    try:
        values = list(values)
    except TypeError:
        raise ValueError(
            f"Search space entry {where!r}: expected a format name, a list of them or None, "
            f"got {value!r}."
        ) from None
    if not values:
        raise ValueError(
            f"Search space entry {where!r} has an empty list of formats; use None to leave "
            "the layer in float."
        )
    result = []
    for item in values:
        try:
            fmt = formats.get(item)
        except ValueError as error:
            raise ValueError(f"Search space entry {where!r}: {error}") from None
        if fmt in result:
            raise ValueError(f"Search space entry {where!r} lists {fmt.name} twice.")
        result.append(fmt)
    return tuple(result)


def _choices_of(value: Any, where: str, separate: bool) -> Choices:
    if isinstance(value, Mapping):
        unknown = set(value) - {"weights", "activations"}
        if unknown:
            raise ValueError(
                f"Search space entry {where!r}: unknown keys {sorted(unknown)}; expected "
                "'weights' and 'activations'."
            )
        if not separate:
            raise ValueError(
                f"Search space entry {where!r} gives weights and activations apart; that needs "
                "SearchSpace(..., separate_activations=True)."
            )
        return Choices(
            _formats_of(value.get("weights"), f"{where}.weights"),
            _formats_of(value.get("activations"), f"{where}.activations"),
        )
    fmts = _formats_of(value, where)
    return Choices(fmts, fmts)


@keras.saving.register_keras_serializable(package="fliqs_keras")
class SearchSpace:
    """Rules that give every layer its format choices.

    Args:
        rules: ``{key: value}`` in priority order for name rules, or a list
            of formats (or ``"int4,int8"``) for every supported layer. None
            means ``{"*": DEFAULT_CHOICES}``. Supported layers that no rule
            matches stay in float.
        separate_activations: one decision for weights and one for
            activations per layer (default: a single decision for both).
        decisions: ``"layer"``, ``"global"`` or ``{group: regex}``.
    """

    def __init__(
        self,
        rules: Mapping[str, Any] | None = None,
        separate_activations: bool = False,
        decisions: str | Mapping[str, str] = "layer",
    ):
        if rules is None:
            rules = {"*": list(DEFAULT_CHOICES)}
        elif isinstance(rules, (str, Sequence)):
            rules = {"*": _format_list(rules)}
        elif not isinstance(rules, Mapping):
            raise ValueError(f"A search space's rules must be a dict, a list of formats or a string of them, "
                             f"got {type(rules).__name__} {rules!r}.")
        rules = dict(rules)
        self.separate_activations = bool(separate_activations)
        self.rules: list[Rule] = []
        for key, value in rules.items():
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"Search space keys must be non-empty strings, got {key!r}.")
            kind = "default" if key == "*" else "type" if _is_type_name(key) else "name"
            if kind == "name":
                try:
                    re.compile(key)
                except re.error as error:
                    raise ValueError(f"Search space key {key!r} is not a valid regex: {error}.") from None
            self.rules.append(Rule(key, kind, _choices_of(value, key, self.separate_activations)))
        if isinstance(decisions, str):
            if decisions not in ("layer", "global"):
                raise ValueError(
                    f"decisions must be 'layer', 'global' or a dict of group regexes, got {decisions!r}."
                )
        elif isinstance(decisions, Mapping):
            for group, pattern in decisions.items():
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as error:
                    raise ValueError(f"Decision group {group!r}: bad regex {pattern!r} ({error}).") from None
            decisions = dict(decisions)
        else:
            raise ValueError(f"decisions must be 'layer', 'global' or a dict, got {decisions!r}.")
        self.decisions = decisions

    @classmethod
    def get(cls, identifier: Any) -> "SearchSpace":
        """A search space from a SearchSpace, a rule dict, a list of formats or "int4,int8"."""
        if isinstance(identifier, SearchSpace):
            return identifier
        if isinstance(identifier, Mapping) and "rules" in identifier:
            return cls.from_config(dict(identifier))
        if isinstance(identifier, (Mapping, str, Sequence)):
            return cls(identifier)
        raise ValueError(f"Cannot make a search space from {identifier!r}.")

    def resolve(self, layer_name: str, layer_type: str) -> Resolution:
        """The choices and decisions of one layer; float choices and rule None when no rule matches it."""
        rule = self._match(layer_name, layer_type)
        weight_decision, activation_decision = self._decision_names(layer_name)
        if rule is None:
            return Resolution(Choices((), ()), None, weight_decision, activation_decision)
        return Resolution(rule.choices, rule.key, weight_decision, activation_decision)

    def explicit_rule(self, layer_name: str, layer_type: str) -> Rule | None:
        """The name rule, else the type rule, that targets a layer; None when only "*" does."""
        for rule in self.rules:
            if rule.kind == "name" and re.fullmatch(rule.key, layer_name):
                return rule
        return next((r for r in self.rules if r.kind == "type" and r.key == layer_type), None)

    def _match(self, layer_name: str, layer_type: str) -> Rule | None:
        rule = self.explicit_rule(layer_name, layer_type)
        return rule or next((r for r in self.rules if r.kind == "default"), None)

    def _decision_names(self, layer_name: str) -> tuple[str, str]:
        if self.decisions == "global":
            base = "global"
        elif isinstance(self.decisions, dict):
            base = next(
                (group for group, pattern in self.decisions.items() if re.fullmatch(pattern, layer_name)),
                layer_name,
            )
        else:
            base = layer_name
        if self.separate_activations:
            return f"{base}/weights", f"{base}/activations"
        return base, base

    def get_config(self) -> dict[str, Any]:
        rules = {}
        for rule in self.rules:
            if self.separate_activations:
                rules[rule.key] = {
                    "weights": [f.name for f in rule.choices.weights] or None,
                    "activations": [f.name for f in rule.choices.activations] or None,
                }
            else:
                rules[rule.key] = [f.name for f in rule.choices.weights] or None
        return {
            "rules": rules,
            "separate_activations": self.separate_activations,
            "decisions": self.decisions,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SearchSpace":
        return cls(**config)

    def __repr__(self) -> str:
        return f"SearchSpace({self.get_config()!r})"


def _format_list(value: str | Sequence[Any]) -> list[Any]:
    """The formats of ``"int4,int8"`` or of a list; ValueError when there are none."""
    names = [n for n in value.split(",") if n.strip()] if isinstance(value, str) else list(value)
    if not names:
        raise ValueError("An empty search space: name at least one format.")
    return names


def _is_type_name(key: str) -> bool:
    """A rule key is a type rule when it names a Keras layer class."""
    return re.fullmatch(r"[A-Z][A-Za-z0-9]*", key) is not None and hasattr(keras.layers, key)
