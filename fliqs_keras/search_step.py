"""The search's compiled training step: a function of the model's state and a frozen `SearchConfig`.

Draws the formats, trains in them, undoes a non-finite step, scores quality
against cost and updates the policy, with no Python between steps.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from keras import ops

from fliqs_keras import architecture
from fliqs_keras import controller as controller_lib
from fliqs_keras import graph
from fliqs_keras.cost import CostModel
from fliqs_keras.search_config import SearchConfig, policy_learning_rate
from fliqs_keras.search_model import SearchModel, decisions


def _draw_order(model: SearchModel) -> tuple[np.ndarray, np.ndarray]:
    """Per decision and choice, how many of the decision's bit widths (architecture sizes) are wider (0: the
    widest; the largest int32 beyond its choices), and per decision its number of distinct widths."""
    choices = decisions(model)
    narrowness = np.full(model.controller.valid.shape, np.iinfo(np.int32).max, np.int32)
    widths = np.ones(len(model.decision_names), np.float32)
    for row, name in enumerate(model.decision_names):
        ordered = sorted({architecture.rank(f) for f in choices[name]}, reverse=True)
        narrowness[row, :len(choices[name])] = [ordered.index(architecture.rank(f)) for f in choices[name]]
        widths[row] = len(ordered)
    return narrowness, widths


class SearchStep:
    """The compiled search step of one `fit`.

    Args:
        model: the searchable model.
        config: the search's settings.
        costs: the cost model of `model` under `config.cost`.
        target: the cost target, in the cost's units.
        total_steps: the training steps of the whole run.
        held_out: (inputs, int labels) tensors for the held-out accuracy, or None.
    """

    def __init__(self, model: SearchModel, config: SearchConfig, costs: CostModel, target: float,
                 total_steps: int, held_out: Any = None):
        self.config, self.costs, self.target, self.held_out = config, costs, float(target), held_out
        self.total_steps = int(total_steps)
        self.search_steps = max(min(math.ceil(config.freeze_at * self.total_steps), self.total_steps), 1)
        self.warmup_steps = min(int(config.warmup * self.total_steps), self.search_steps - 1)
        self.learning_rate = float(config.learning_rate if config.learning_rate is not None else
                                   policy_learning_rate(self.search_steps - self.warmup_steps))
        self._hyperparameters = {"learning_rate": self.learning_rate,
                                 "baseline_momentum": float(config.baseline_momentum)}
        if config.warmup_draws == "high_first":
            self._narrowness, self._widths = _draw_order(model)

    def _quality(self, model, step):
        x, y = self.held_out
        size = min(self.config.held_out_batch_size, len(x))
        start = ops.mod(ops.cast(step, "int32") * size, len(x))
        rows = ops.mod(start + ops.arange(size, dtype="int32"), len(x))
        prediction = model(ops.take(x, rows, axis=0), training=False)
        labels = ops.take(y, rows)
        accuracy = ops.mean(ops.cast(ops.equal(ops.cast(ops.argmax(prediction, axis=-1), "int32"), labels),
                                     "float32"))
        # argmax turns NaN predictions into a class: a broken model must not look accurate.
        return ops.where(ops.all(ops.isfinite(prediction)), accuracy, float("nan"))

    def __call__(self, model, data, base_train_step):
        """One training step of the search: draw, train, score, update; returns the step's logs."""
        policy = model.controller
        step = model.optimizer.iterations
        warm = step < self.warmup_steps
        # Only an asked-for freeze: a later `fit` on the same model counts its steps on from the first's.
        frozen = step >= self.search_steps if self.config.freeze_at < 1 else ops.zeros((), "bool")
        allowed = None
        if self.config.warmup_draws == "high_first":
            # In part p of the warm-up (of as many parts as the decision has widths), the p + 1 widest.
            part = ops.floor(ops.cast(step, "float32") / max(self.warmup_steps, 1) * self._widths)
            allowed = ops.logical_or(ops.logical_not(warm), self._narrowness <= ops.cast(part, "int32")[:, None])
        indices = ops.where(frozen, model.format_state.kept_or(policy.argmax()),
                            policy.sample(step, uniform=warm, allowed=allowed, seed=self.config.seed))
        model.format_state.assign(indices)
        tracker = graph.loss_tracker(model)
        total, count = ops.copy(tracker.total.value), ops.copy(tracker.count.value)
        own, others = self._protected_variables(model)
        protected = own + others
        saved = [ops.copy(v.value) for v in protected]
        logs = base_train_step(data)
        # The batch's own training loss, read off Keras's running mean: no extra forward pass.
        batch_loss = (tracker.total - total) / ops.maximum(tracker.count - count, 1e-12)
        finite = ops.isfinite(batch_loss)
        # The model's own state (weights, batch-norm statistics, clips); a non-finite optimizer slot
        # makes its weight's update non-finite too, so the slots need no check.
        for variable in own:
            if "float" in str(variable.dtype):
                finite = ops.logical_and(finite, ops.all(ops.isfinite(variable.value)))
        # A non-finite step must not poison the weights: undo its update.
        for variable, value in zip(protected + [tracker.total, tracker.count], saved + [total, count]):
            variable.assign(ops.where(finite, variable.value, value))
        if self.config.quality == "loss":
            quality = -batch_loss
        elif self.config.freeze_at < 1:
            # Once frozen, the held-out pass would only feed the logs: skip it.
            quality = ops.cond(frozen, lambda: ops.convert_to_tensor(float("nan")),
                               lambda: self._quality(model, step))
        else:
            quality = self._quality(model, step)
        cost = self.costs.graph_cost(indices, model.decision_names)
        value = ops.where(finite,
                          controller_lib.reward(quality, cost, self.target, self.config.beta, self.config.reward),
                          float("nan"))
        penalty = controller_lib.entropy_weight(step, self.search_steps, self.warmup_steps, self.config.entropy_weight,
                                                self.config.entropy_schedule)
        active = ops.logical_not(ops.logical_or(warm, frozen))
        if self.config.cost_credit == "exact":
            # The reward is additive: the quality is the sampled part, the cost term the known one.
            known = controller_lib.reward(0.0, self._alternative_costs(model, indices), self.target, self.config.beta,
                                          self.config.reward)
            policy.update(indices, ops.where(finite, quality, float("nan")), penalty, active, known,
                          **self._hyperparameters)
        else:
            policy.update(indices, value, penalty, active=active, **self._hyperparameters)
        expected = self.costs.expected_cost(policy.probabilities(), model.decision_names)
        logs = dict(logs)
        logs.update({"reward": value, "quality": quality, "cost_ratio": cost / self.target,
                     "expected_cost_ratio": expected / self.target, "entropy": ops.mean(policy.entropy()),
                     "searching": ops.cast(ops.logical_not(frozen), "float32")})
        return logs

    def _alternative_costs(self, model, indices):
        """[decisions, max choices]: the cost of `indices` with decision d set to choice k (the rest as drawn).

        Entries beyond a decision's choices mean nothing: the controller ignores them.
        """
        num_choices = model.controller.num_choices
        replaced = np.eye(len(num_choices), dtype=bool)[:, None, :]  # [d, 1, decisions]: the decision set to k
        choice = np.arange(max(num_choices), dtype=np.int32)[None, :, None]  # [1, k, 1]
        alternatives = ops.where(replaced, choice, ops.cast(indices, "int32")[None, None, :])
        return self.costs.graph_cost(alternatives, model.decision_names)

    def _protected_variables(self, model) -> tuple[list, list]:
        """(the model's own variables, the optimizer's and the metrics'): every variable a training step
        changes, restored after a non-finite step. On one replica only: the optimizer's slots cannot be
        assigned per replica under a tf.distribute strategy (JAX runs one program over all devices, so it
        has no such limit and no `distribute_strategy`)."""
        strategy = getattr(model, "distribute_strategy", None)
        if strategy is not None and strategy.num_replicas_in_sync > 1:
            return [], []
        tracker = {id(graph.loss_tracker(model).total), id(graph.loss_tracker(model).count)}
        own = list(model.trainable_variables) + list(model.non_trainable_variables)
        optimizer_state = [v for v in model.optimizer.variables
                           if "float" in str(v.dtype) and v is not model.optimizer.iterations]
        metrics = [v for v in model.metrics_variables if id(v) not in tracker]
        return own, optimizer_state + metrics
