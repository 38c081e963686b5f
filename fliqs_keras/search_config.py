"""The search's settings as one frozen, validated, serialisable value.

`FliqsSearch` builds a `SearchConfig` from its keyword arguments (or takes
one); the search step reads it and nothing changes it. The `.keras` file and
the formats file store it with the model.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from fliqs_keras import controller

QUALITIES = ("accuracy", "loss")
COST_CREDITS = ("sampled", "exact")
WARMUP_DRAWS = ("uniform", "high_first")
# FLIQS's policy learning rate, right for runs of many thousand policy steps.
PAPER_LEARNING_RATE = 5e-3
# How far, in logits, the default learning rate lets the policy move over its steps: Adam moves a logit by
# about the learning rate per step where its gradient keeps its sign.
SETTLING_DISTANCE = 20.0


def policy_learning_rate(policy_steps: int) -> float:
    """The default policy learning rate for a search whose policy learns for `policy_steps` steps."""
    return max(PAPER_LEARNING_RATE, SETTLING_DISTANCE / max(int(policy_steps), 1))


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Every setting of a FLIQS search (see `FliqsSearch` for what each does).

    Args:
        cost: ``"bops"``, ``"size"``, ``"table"`` or ``"latency"``.
        target: a number, a format (``"int4"``: the cost of the uniform INT4
            model) or a format times a factor (``"int4*1.2"``).
        beta: weight of the cost term in the reward (>= 0).
        reward: ``"absolute"``, ``"one_sided"`` or ``"multiplicative"``.
        quality: ``"accuracy"`` on held-out data or ``"loss"``.
        held_out_size: held-out examples kept; held_out_batch_size: per step.
        warmup: fraction of the steps with uniform draws and a frozen policy.
        warmup_draws: ``"uniform"`` or ``"high_first"``.
        freeze_at: fraction of the steps after which the chosen formats train alone.
        max_cost_ratio: the kept formats' cost limit over the target, or None.
        cost_credit: ``"exact"`` or ``"sampled"``; None: ``"exact"`` for an
            additive reward, else ``"sampled"``.
        entropy_weight, entropy_schedule: the entropy penalty's maximum and shape.
        learning_rate: the policy's; None: `policy_learning_rate` of the
            steps the policy learns.
        baseline_momentum: of the reward baseline (EMA).
        seed: of the format draws.
        total_steps: training steps, where Keras cannot tell.
        cost_table: for ``cost="table"`` or ``"latency"``: a JSON file, a
            dict or a `cost_tables.CostTable`.

    Raises:
        ValueError: naming the first setting that is out of range or unknown.
    """

    cost: str = "bops"
    target: Any = "int4"
    beta: float = 1.0
    reward: str = "absolute"
    quality: str = "accuracy"
    held_out_size: int = 2048
    held_out_batch_size: int = 16
    warmup: float = 0.25
    warmup_draws: str = "uniform"
    freeze_at: float = 1.0
    max_cost_ratio: float | None = None
    cost_credit: str | None = None
    entropy_weight: float = 0.5
    entropy_schedule: str = "cosine"
    learning_rate: float | None = None
    baseline_momentum: float = 0.99
    seed: int = 0
    total_steps: int | None = None
    cost_table: Any = None

    def __post_init__(self):
        if isinstance(self.cost_table, os.PathLike):
            object.__setattr__(self, "cost_table", os.fspath(self.cost_table))
        if hasattr(self.cost_table, "to_dict"):  # a cost_tables.CostTable: kept as its JSON values, as it is saved
            object.__setattr__(self, "cost_table", self.cost_table.to_dict())
        if self.quality not in QUALITIES:
            raise ValueError(f"Unknown quality {self.quality!r}; expected one of {QUALITIES}.")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}.")
        if self.warmup_draws not in WARMUP_DRAWS:
            raise ValueError(f"Unknown warmup_draws {self.warmup_draws!r}; expected one of {WARMUP_DRAWS}.")
        if self.warmup_draws != "uniform" and self.warmup == 0:
            raise ValueError(f"warmup_draws={self.warmup_draws!r} orders the warm-up's draws, but warmup=0 leaves "
                             "none.")
        if not self.warmup < self.freeze_at <= 1:
            raise ValueError(f"freeze_at must be a fraction in (warmup, 1], here ({self.warmup}, 1], "
                             f"got {self.freeze_at}.")
        if self.max_cost_ratio is not None and not (_number(self.max_cost_ratio) and self.max_cost_ratio > 0):
            raise ValueError(f"max_cost_ratio must be a number > 0 or None, got {self.max_cost_ratio}.")
        if not _number(self.beta):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}.")
        controller.reward(1.0, 1.0, 1.0, self.beta, self.reward)  # the reward kind, and beta >= 0
        if self.cost_credit is None:
            object.__setattr__(self, "cost_credit", "sampled" if self.reward == "multiplicative" else "exact")
        if self.cost_credit not in COST_CREDITS:
            raise ValueError(f"Unknown cost_credit {self.cost_credit!r}; expected one of {COST_CREDITS}.")
        if self.cost_credit == "exact" and self.reward == "multiplicative":
            raise ValueError("cost_credit='exact' needs a reward whose cost term is added to the quality "
                             "('absolute' or 'one_sided'); the multiplicative reward scales the quality by "
                             "the cost, so its cost part cannot be credited apart.")
        controller.entropy_weight(0, 2, 0, self.entropy_weight, self.entropy_schedule)
        if not _number(self.entropy_weight) or self.entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, got {self.entropy_weight}.")
        for name in ("held_out_size", "held_out_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.learning_rate is not None and not (_number(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate (the policy's) must be a finite number > 0, got {self.learning_rate!r}.")
        if not (_number(self.baseline_momentum) and 0 <= self.baseline_momentum < 1):
            raise ValueError(f"baseline_momentum must be in [0, 1), got {self.baseline_momentum!r}.")
        if self.total_steps is not None and not (isinstance(self.total_steps, (int, np.integer))
                                                 and self.total_steps >= 1):
            raise ValueError(f"total_steps must be an integer >= 1 or None, got {self.total_steps!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-serialisable values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SearchConfig":
        """The config of `to_dict`; ValueError naming unknown settings."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"Unknown search settings {unknown}.")
        return cls(**values)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)
