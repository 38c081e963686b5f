"""A study: the experiment grid as data, read from a JSON file in benchmarks/studies/."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

EPOCHS = {"mnist": 8, "digits8": 20}
UNIFORM = ("fp32", "int2", "int3", "int4", "int8", "e4m3", "e2m1")
# The uniform formats that choose the comparison budget.
LADDER = ("int2", "int3", "int4", "int8")
SPACES = {
    "int": ("int2", "int3", "int4", "int8"),
    "fp": ("e2m1", "e2m3", "e4m3"),
    "int+fp": ("int2", "int3", "int4", "int8", "e2m1", "e2m3", "e4m3"),
}
TARGETS = {"int": ("int3", "int4", "int6"), "fp": ("int5", "int6", "int7"), "int+fp": ("int3", "int4", "int6")}
BASELINE_SPACE = "int"
FREEZE_AT = 0.75
# FLIQS variants: `FliqsSearch` settings over the benchmark's own (`methods.FLIQS_DEFAULTS`), searched in
# BASELINE_SPACE. What each was for and what it measured: docs/experiments/.
_LOSS_BUDGET = {"quality": "loss", "freeze_at": FREEZE_AT, "max_cost_ratio": 1.0}
_SHORT = {"quality": "loss", "warmup": 0.1, "learning_rate": 0.1, "freeze_at": FREEZE_AT}
VARIANTS: dict[str, dict[str, Any]] = {
    "fliqs-h256": {"held_out_batch_size": 256},
    "fliqs-loss": {"quality": "loss"},
    "fliqs-short": _SHORT,
    "fliqs-budget": {"freeze_at": FREEZE_AT, "max_cost_ratio": 1.0},
    "fliqs-loss-budget": _LOSS_BUDGET,
    "fliqs-loss-budget-beta4": {**_LOSS_BUDGET, "beta": 4.0},
    "fliqs-short-beta4": {**_SHORT, "max_cost_ratio": 1.0, "beta": 4.0},
    "fliqs-loss-budget-exact": {**_LOSS_BUDGET, "cost_credit": "exact"},
    "fliqs-loss-exact": {"quality": "loss", "cost_credit": "exact"},
    "fliqs-loss-budget-exact-high": {**_LOSS_BUDGET, "cost_credit": "exact", "warmup_draws": "high_first"},
    "fliqs-loss-budget-exact-high50": {**_LOSS_BUDGET, "cost_credit": "exact", "warmup_draws": "high_first",
                                       "warmup": 0.5},
}
METHODS = ("uniform", "fliqs", "random", "sensitivity", "progressive", "supernet", "hgq2")
DATASETS = ("mnist", "digits8")
MODELS = ("digits_resnet", "digits_mobilenet")


@dataclasses.dataclass(frozen=True)
class Study:
    """One grid of runs and the name of its results.

    Args:
        name: the stem of its results (``benchmarks/results/<name>.json``) and resume files.
        model: ``digits_resnet`` or ``digits_mobilenet`` (`fliqs_keras.models`).
        width: the model's width multiplier.
        datasets: ``mnist`` (5,000 28x28 digits) and/or ``digits8`` (1,797 8x8 digits).
        seeds: seeds of every run (initial weights, data order, format draws).
        more_seeds_at_budget: further seeds for what the comparison budget compares.
        methods: methods to run (`METHODS`).
        variants: FLIQS variants, in order (``fliqs``: the default settings in every space).
        curves: also every uniform format, FLIQS at three targets per space and the
            baselines at uniform INT3's BOPs; off: only what the comparison needs.
        controls: also the controls (retrained policies, uniform draws, the ceiling,
            the maximal policies).
        batch_size: of every run.
        epochs: of every run (None: 8 for mnist, 20 for digits8).

    Raises:
        ValueError: for an unknown model, dataset, method or variant, naming it.
    """

    name: str
    model: str = "digits_resnet"
    width: float = 1.0
    datasets: tuple[str, ...] = DATASETS
    seeds: tuple[int, ...] = (0, 1, 2)
    more_seeds_at_budget: tuple[int, ...] = (3, 4)
    methods: tuple[str, ...] = METHODS
    variants: tuple[str, ...] = ("fliqs",)
    curves: bool = True
    controls: bool = True
    batch_size: int = 64
    epochs: int | None = None

    def __post_init__(self):
        for field in ("datasets", "seeds", "more_seeds_at_budget", "methods", "variants"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        for field, allowed in (("model", MODELS),):
            if getattr(self, field) not in allowed:
                raise ValueError(f"Study {self.name!r}: unknown {field} {getattr(self, field)!r}; one of {allowed}.")
        for field, allowed in (("datasets", DATASETS), ("methods", METHODS), ("variants", ("fliqs", *VARIANTS))):
            unknown = sorted(set(getattr(self, field)) - set(allowed))
            if unknown:
                raise ValueError(f"Study {self.name!r}: unknown {field} {unknown}; known: {list(allowed)}.")
        if self.width <= 0 or self.batch_size < 1 or (self.epochs is not None and self.epochs < 1):
            raise ValueError(f"Study {self.name!r}: width, batch_size and epochs must be positive.")

    @property
    def model_label(self) -> str:
        return self.model if self.width == 1 else f"{self.model} (width {self.width:g})"

    def epochs_of(self, dataset: str) -> int:
        return self.epochs or EPOCHS[dataset]


def load(path: str | pathlib.Path) -> Study:
    """The study in a JSON file; ValueError names a field it does not know."""
    path = pathlib.Path(path)
    fields = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(Study)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown study fields {unknown}; known: {sorted(known)}.")
    return Study(**fields)
