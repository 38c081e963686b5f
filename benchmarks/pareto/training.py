"""How every run of a study trains: the data splits, the model, the optimizer and the evaluation."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

import fliqs_keras
from benchmarks.pareto.study import FREEZE_AT, SPACES, Study
from fliqs_keras import cost, data, formats, models

REESTIMATED = "accuracy_bn_reestimated"


def splits_of(dataset: str):
    """((x_fit, y_fit), held_out, test) of an offline dataset, the same for every run."""
    if dataset == "mnist":
        (x_train, y_train), test = data.mnist_digits(seed=0)
    elif dataset == "digits8":
        (x_train, y_train), test = data.sklearn_digits(seed=0)
    else:
        raise ValueError(f"Unknown dataset {dataset!r}; expected mnist or digits8.")
    (x_fit, y_fit), held = data.held_out_split(x_train, y_train, fraction=0.125, seed=0)
    return (x_fit, y_fit), held, test


@dataclasses.dataclass
class Context:
    """A study on one dataset: what every method's run needs."""

    study: Study
    dataset: str
    splits: tuple

    @classmethod
    def of(cls, study: Study, dataset: str) -> "Context":
        return cls(study, dataset, splits_of(dataset))

    @property
    def epochs(self) -> int:
        return self.study.epochs_of(self.dataset)

    def build(self, seed: int) -> keras.Model:
        """The study's float model with the initial weights of `seed`."""
        keras.utils.set_random_seed(seed)
        shape = (28, 28, 1) if self.dataset == "mnist" else (8, 8, 1)
        return getattr(models, self.study.model)(shape, width=self.study.width)

    def searchable(self, seed: int, space: str) -> fliqs_keras.SearchModel:
        return fliqs_keras.apply(self.build(seed), list(SPACES[space]))

    def steps(self, epochs: int) -> int:
        """Training steps of a run: the schedule's length, and where a search's freeze falls."""
        return epochs * -(-len(self.splits[0][0]) // self.study.batch_size)

    def freeze_step(self) -> int:
        """The step at which a search with ``freeze_at=FREEZE_AT`` keeps its formats (as `FliqsSearch` counts it)."""
        return math.ceil(FREEZE_AT * self.steps(self.epochs))

    def compile(self, model: keras.Model, steps: int = 1):
        # Cosine decay to zero: without it, low-bit QAT ends noisy and the seeds' spread hides the gaps.
        schedule = keras.optimizers.schedules.CosineDecay(2e-3, decay_steps=steps)
        model.compile(keras.optimizers.Adam(schedule), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])

    def train(self, model: keras.Model, seed: int, callbacks=(), reestimate: bool = True) -> dict:
        """Trains; the test accuracy as trained and, unless `reestimate` is off, after batch-norm re-estimation."""
        (x, y), _, (x_test, y_test) = self.splits
        self.compile(model, self.steps(self.epochs))
        keras.utils.set_random_seed(seed)
        model.fit(x, y, epochs=self.epochs, batch_size=self.study.batch_size, verbose=0, callbacks=list(callbacks))
        result = {"accuracy": float(model.evaluate(x_test, y_test, verbose=0)[1])}
        if reestimate:
            # Last, so that every other number of the run is the model as trained.
            fliqs_keras.reestimate_batch_norm(model, x, max_examples=None)
            result[REESTIMATED] = float(model.evaluate(x_test, y_test, verbose=0)[1])
        return result


def layer_costs(searchable) -> tuple[list[str], dict[str, np.ndarray]]:
    """Per decision (one per layer, joint weights and inputs) and format: its BOPs."""
    model = cost.CostModel(searchable, "bops")
    names = list(model.decisions)
    table = {}
    for name in SPACES["int+fp"] + ("fp32",):
        fmt = formats.get(name)
        table[name] = np.array([model.layer_cost(e, fmt, fmt) for e in model.layers])
    return names, table
