"""`FliqsSearch`: the Keras callback that turns `model.fit` into a one-shot format search.

    searchable = fliqs_keras.apply(model, ["int2", "int4", "int8"])
    searchable.compile(optimizer, loss, metrics=["accuracy"])
    searchable.fit(train, epochs=10, callbacks=[
        fliqs_keras.FliqsSearch(cost="bops", target="int4", validation_data=held_out)])
    fliqs_keras.policy(searchable)   # {"conv1": "int8", "conv2": "int4", ...}

It installs a search step in the model's compiled training step. Each step:

1. draws one choice per decision from the policy with noise seeded by
   (seed, step) — uniformly during the warm-up — and makes it current in
   every layer (single path: one format per layer per step); with
   ``warmup_draws="high_first"`` the warm-up draws the widest formats first;
2. trains the shared weights in those formats (the model's own train step);
3. measures the quality Q of the same formats: accuracy on a slice of the
   held-out data (default, TuNAS-style) or minus the loss on the training
   batch (``quality="loss"``, no held-out data needed), and the cost C;
4. after the warm-up, updates the policy with the reward (`controller.reward`)
   and the entropy penalty of the schedule.

With ``cost_credit="exact"`` (the default for additive rewards) the cost term
of the reward is not sampled with the quality: the cost is a known function of
the formats, so each step also costs the sample with each decision set to each
of its choices (the others as drawn), and the controller credits every
decision with its exact share of the cost term (`controller.policy_gradient`);
REINFORCE then carries only the quality's noise. ``"sampled"`` is REINFORCE
on the whole reward, as FLIQS does.

With ``freeze_at < 1`` the search ends early: from that fraction of the steps
on, every step trains the argmax formats and the policy no longer learns, so
the chosen formats get the rest of the run to themselves (still one run, no
retraining). The entropy penalty then reaches its maximum at the freeze step.
The logs' ``searching`` turns 0 there; with the held-out accuracy as the
quality its pass is skipped from then on, and ``quality`` and ``reward`` log
as NaN (not measured).

With ``max_cost_ratio`` set, the formats frozen (at `freeze_at`, else at the
end) are not the argmax but the most probable policy found within that
multiple of the target (`budget`): the argmax of a policy that has not
settled can cost far more than the expected cost the reward steered. The
model's format state keeps them (`FormatState.keep`), so `policy`, the policy file and
the export agree with what the model trained and evaluates in.

A step whose training loss or updated state (weights, batch-norm statistics,
clips) is not finite is undone (every variable it changed restored, on one
replica) and gives the policy no update: a NaN in the inputs can leave the
loss finite (max pooling drops it) and still poison the weights or the
batch norms' moving statistics.

No Python runs between steps, so `steps_per_execution > 1`, `tf.distribute`
(every replica draws the same formats) and TPUs work. The reward, cost ratio,
expected cost ratio and mean policy entropy appear in the Keras logs. At the
end the chosen formats (the argmax, or the budget's) are frozen into the
layers: the model then evaluates in them with the trained weights, no
retraining. A policy that ends more than 10% off the target is reported in a
warning: one that names the unsettled decisions, or, for a settled policy,
one that says the reward traded cost for quality (and in `unsettled` and
`final_cost_ratio`).
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from absl import logging
from keras import ops

from fliqs_keras import budget
from fliqs_keras import controller as controller_lib
from fliqs_keras.cost import CostModel
from fliqs_keras.search_model import SearchModel, decisions, policy

QUALITIES = ("accuracy", "loss")
COST_CREDITS = ("sampled", "exact")
WARMUP_DRAWS = ("uniform", "high_first")
# A decision with more entropy than this at the end has not chosen (0.1 nats: ~98% on one choice of 4).
SETTLED_NATS = 0.1
# How far the argmax policy's cost may land from the target before the end of the search says so.
COST_TOLERANCE = 0.1
# FLIQS's policy learning rate, right for runs of many thousand policy steps.
PAPER_LEARNING_RATE = 5e-3
# How far, in logits, the default learning rate lets the policy move over its steps: Adam moves a logit by
# about the learning rate per step where its gradient keeps its sign.
SETTLING_DISTANCE = 20.0


def policy_learning_rate(policy_steps: int) -> float:
    """The default policy learning rate for a search whose policy learns for `policy_steps` steps."""
    return max(PAPER_LEARNING_RATE, SETTLING_DISTANCE / max(int(policy_steps), 1))


def _held_out_arrays(validation_data: Any, limit: int):
    """(x, y) NumPy arrays of at most `limit` held-out examples."""
    if isinstance(validation_data, (tuple, list)) and len(validation_data) == 2:
        x, y = validation_data
        x, y = np.asarray(x), np.asarray(y)
    elif hasattr(validation_data, "as_numpy_iterator"):
        xs, ys, count = [], [], 0
        for batch in validation_data.as_numpy_iterator():
            if not isinstance(batch, tuple) or len(batch) < 2:
                raise ValueError("validation_data must yield (x, y) batches.")
            if np.ndim(batch[1]) == 0:
                raise ValueError("validation_data yields single examples (scalar labels), not batches: "
                                 "batch it first, e.g. dataset.batch(256).")
            xs.append(batch[0])
            ys.append(batch[1])
            count += len(batch[0])
            if count >= limit:
                break
        if not xs:
            raise ValueError("validation_data is empty.")
        x, y = np.concatenate(xs), np.concatenate(ys)
    else:
        raise ValueError("validation_data must be an (x, y) pair of arrays or a tf.data.Dataset of (x, y) batches.")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"validation_data needs as many labels as inputs (> 0), got {len(x)} and {len(y)}.")
    return x[:limit], y[:limit]


def _draw_order(model: SearchModel) -> tuple[np.ndarray, np.ndarray]:
    """Per decision and choice, how many of the decision's bit widths are wider (0: the widest; the
    largest int32 beyond its choices), and per decision its number of distinct widths."""
    choices = decisions(model)
    narrowness = np.full(model.controller.valid.shape, np.iinfo(np.int32).max, np.int32)
    widths = np.ones(len(model.decision_names), np.float32)
    for row, name in enumerate(model.decision_names):
        ordered = sorted({f.bits for f in choices[name]}, reverse=True)
        narrowness[row, :len(choices[name])] = [ordered.index(f.bits) for f in choices[name]]
        widths[row] = len(ordered)
    return narrowness, widths


class FliqsSearch(keras.callbacks.Callback):
    """Runs the FLIQS one-shot search during `fit` (see the module docstring).

    Args:
        cost: ``"bops"``, ``"size"`` or ``"table"``.
        target: the cost target: a number, a format (``"int4"``: the cost of
            the uniform INT4 model) or a format times a factor (``"int4*1.2"``).
        beta: weight of the cost term in the reward (>= 0).
        reward: ``"absolute"`` (default), ``"one_sided"`` or ``"multiplicative"``.
        quality: ``"accuracy"`` on `validation_data` (default) or ``"loss"``.
        validation_data: held-out (x, y) for the quality signal (needed for
            ``"accuracy"``); at most `held_out_size` examples are kept.
        held_out_batch_size: held-out examples per step. Their inference pass
            is the search step's only sizeable extra work, about h / (3 b) of
            a training step on b examples (a forward pass on h against a
            forward and a backward pass on b): 16 adds about 8% at b = 64 and
            2% at b = 256. The controller averages the noise of a small slice
            over many steps.
        warmup: fraction of the training steps with uniform sampling and a frozen policy.
        warmup_draws: ``"uniform"`` (default, as FLIQS and TuNAS: every
            choice of a decision equally likely through the warm-up) or
            ``"high_first"``: the warm-up in as many equal parts as a decision
            has bit widths, the first drawing only its widest choices and each
            next part adding the next narrower width, the last drawing all of
            them, as progressive QAT trains high formats first. Uniform draws
            of INT2 from the first step can leave a narrow model's weights
            worse for every policy; but a model whose kept policy is mostly
            INT2 then gets too few steps in it (the README's Pareto runs: it
            helps one model and hurts the other).
        freeze_at: fraction of the training steps after which the argmax
            formats are fixed and the remaining steps train them alone
            (1.0, the default: search to the end, as FLIQS does). Must be
            above `warmup`.
        max_cost_ratio: if set, the formats kept at the freeze (or at the end)
            cost at most this times the target: the argmax when it does, else
            the most probable policy `budget` finds within it. None (the
            default): the argmax, as FLIQS. With ``steps_per_execution=k``
            and a freeze, the budget's formats take over at the first
            execution that starts at or after the freeze step (up to k - 1
            steps train the argmax first).
        cost_credit: ``"exact"`` (the cost term credited to each decision
            exactly; see the module docstring; needs an additive reward,
            ``"absolute"`` or ``"one_sided"``) or ``"sampled"`` (REINFORCE on
            the whole reward, as FLIQS). None (default): ``"exact"`` for an
            additive reward, else ``"sampled"``.
        entropy_weight: the maximum of the entropy penalty; `entropy_schedule`
            is ``"cosine"`` (default), ``"linear"`` or ``"constant"``.
        learning_rate: the controller's Adam learning rate. None (default)
            sets it from the steps the policy learns (after the warm-up,
            before the freeze) as ``max(5e-3, SETTLING_DISTANCE / steps)``:
            5e-3, FLIQS's value, for long runs, and enough for a search of a
            few hundred steps to settle. The value used is `policy_learning_rate`.
        baseline_momentum: of the controller's reward baseline (EMA).
        seed: seed of the format draws.
        total_steps: training steps of the whole run, where Keras cannot tell
            (datasets of unknown length).
        cost_table: for ``cost="table"``: a dict or JSON file.
        log_dir: where to write per-decision probabilities for TensorBoard.
        record_every: also record the probabilities in `history` every this
            many steps (0: at the start and at the end of every epoch only).
    """

    def __init__(self, cost: str = "bops", target: Any = "int4", beta: float = 1.0,
                 reward: str = "absolute", quality: str = "accuracy", validation_data: Any = None,
                 held_out_size: int = 2048, held_out_batch_size: int = 16, warmup: float = 0.25,
                 warmup_draws: str = "uniform",
                 freeze_at: float = 1.0, max_cost_ratio: float | None = None, cost_credit: str | None = None,
                 entropy_weight: float = 0.5, entropy_schedule: str = "cosine",
                 learning_rate: float | None = None, baseline_momentum: float = 0.99, seed: int = 0,
                 total_steps: int | None = None, cost_table: Any = None, log_dir: str | None = None,
                 record_every: int = 0):
        super().__init__()
        if quality not in QUALITIES:
            raise ValueError(f"Unknown quality {quality!r}; expected one of {QUALITIES}.")
        if quality == "accuracy" and validation_data is None:
            raise ValueError("quality='accuracy' needs validation_data=(x, y) held out from training "
                             "(or use quality='loss').")
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup}.")
        if warmup_draws not in WARMUP_DRAWS:
            raise ValueError(f"Unknown warmup_draws {warmup_draws!r}; expected one of {WARMUP_DRAWS}.")
        if warmup_draws != "uniform" and warmup == 0:
            raise ValueError(f"warmup_draws={warmup_draws!r} orders the warm-up's draws, but warmup=0 leaves none.")
        if not warmup < freeze_at <= 1:
            raise ValueError(f"freeze_at must be a fraction in (warmup, 1], here ({warmup}, 1], got {freeze_at}.")
        if max_cost_ratio is not None and not (math.isfinite(max_cost_ratio) and max_cost_ratio > 0):
            raise ValueError(f"max_cost_ratio must be a number > 0 or None, got {max_cost_ratio}.")
        controller_lib.reward(1.0, 1.0, 1.0, beta, reward)  # validates beta and the reward kind
        if cost_credit is None:
            cost_credit = "sampled" if reward == "multiplicative" else "exact"
        if cost_credit not in COST_CREDITS:
            raise ValueError(f"Unknown cost_credit {cost_credit!r}; expected one of {COST_CREDITS}.")
        if cost_credit == "exact" and reward == "multiplicative":
            raise ValueError("cost_credit='exact' needs a reward whose cost term is added to the quality "
                             "('absolute' or 'one_sided'); the multiplicative reward scales the quality by "
                             "the cost, so its cost part cannot be credited apart.")
        self.cost_credit = cost_credit
        controller_lib.entropy_weight(0, 2, 0, entropy_weight, entropy_schedule)
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}.")
        self.cost_metric, self.target_spec, self.beta = cost, target, float(beta)
        self.reward_kind, self.quality = reward, quality
        self.validation_data = validation_data
        self.held_out_size, self.held_out_batch_size = int(held_out_size), int(held_out_batch_size)
        self.warmup, self.entropy_max, self.entropy_schedule = float(warmup), float(entropy_weight), entropy_schedule
        self.freeze_at, self.warmup_draws = float(freeze_at), warmup_draws
        self.max_cost_ratio = None if max_cost_ratio is None else float(max_cost_ratio)
        self.learning_rate, self.baseline_momentum, self.seed = learning_rate, baseline_momentum, int(seed)
        if record_every < 0:
            raise ValueError(f"record_every must be >= 0, got {record_every}.")
        for name, value in (("held_out_size", held_out_size), ("held_out_batch_size", held_out_batch_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if learning_rate is not None and not (
                isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate (the policy's) must be a finite number > 0, got {learning_rate!r}.")
        if not (isinstance(baseline_momentum, (int, float)) and 0 <= baseline_momentum < 1):
            raise ValueError(f"baseline_momentum must be in [0, 1), got {baseline_momentum!r}.")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}.")
        self.total_steps_arg, self.cost_table, self.log_dir = total_steps, cost_table, log_dir
        self.record_every = int(record_every)
        self.history: list[dict[str, Any]] = []
        """Per record: the epoch, the step and ``{decision: {format: probability}}``."""
        self.final_cost_ratio: float | None = None
        """After `fit`: the cost of the chosen formats over the target."""
        self.unsettled: dict[str, float] = {}
        """After `fit`: the decisions whose policy kept more than `SETTLED_NATS` of entropy."""
        self.budget_changes: dict[str, tuple[str, str]] = {}
        """With `max_cost_ratio`: ``{decision: (argmax format, kept format)}`` where they differ."""
        self._writer = None

    # --- set-up -----------------------------------------------------------------------

    def set_model(self, model):
        if not isinstance(model, SearchModel):
            raise ValueError(
                f"FliqsSearch needs a model made by fliqs_keras.apply, got {type(model).__name__} "
                f"{getattr(model, 'name', '')!r}.")
        super().set_model(model)
        self.costs = CostModel(model, self.cost_metric, self.cost_table)
        self.target = self.costs.target(self.target_spec)
        self.cost_limit = None if self.max_cost_ratio is None else self.max_cost_ratio * self.target
        if self.cost_limit is not None:
            cheapest = self.costs.bounds()[0]
            if self.cost_limit < cheapest:
                raise ValueError(
                    f"max_cost_ratio={self.max_cost_ratio:g} allows at most {self.cost_limit:.6g} "
                    f"({self.cost_metric}), below the cheapest policy of the search space ({cheapest:.6g}).")
        policy = model.controller
        if self.warmup_draws == "high_first":
            self._narrowness, self._widths = _draw_order(model)
        policy.baseline_momentum, policy.seed = float(self.baseline_momentum), self.seed
        if self.quality == "accuracy":
            x, y = _held_out_arrays(self.validation_data, self.held_out_size)
            try:
                prediction = keras.ops.convert_to_numpy(model(x[:2], training=False))
            except Exception as error:  # noqa: BLE001 - the model names the shape problem
                raise ValueError(
                    f"validation_data does not fit the model: inputs of shape {x.shape[1:]} "
                    f"for a model that takes {tuple(model.inputs[0].shape[1:])} ({error})") from None
            if y.ndim == prediction.ndim and y.shape[-1] == prediction.shape[-1]:
                y = np.argmax(y, axis=-1)
            if y.ndim != 1 and not (y.ndim == 2 and y.shape[1] == 1):
                raise ValueError(f"validation_data labels must be class indices or one-hot, got shape {y.shape}.")
            classes = prediction.shape[-1]
            if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                raise ValueError(f"validation_data labels must be integer class indices, got {y.dtype} values such "
                                 f"as {y.reshape(-1)[:3].tolist()}.")
            outside = (y < 0) | (y >= classes)
            if outside.any():
                raise ValueError(f"validation_data has {int(outside.sum())} labels outside the model's {classes} "
                                 f"classes [0, {classes - 1}], e.g. {y.reshape(-1)[outside.reshape(-1)][:3].tolist()}.")
            # Tensors made here are captured by the traced step as inputs; NumPy
            # arrays would be embedded in the graph as constants, copied by every
            # graph pass.
            self.held_out = (ops.convert_to_tensor(x.astype(model.inputs[0].dtype)),
                             ops.convert_to_tensor(y.reshape(-1).astype(np.int32)))

    def on_train_begin(self, logs=None):
        if not self.model.optimizer.built:
            # Its slots must exist before the step is traced: the step saves and restores them.
            self.model.optimizer.build(self.model.trainable_variables)
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        total = self.total_steps_arg or (epochs * steps if epochs and steps else None)
        if not total:
            raise ValueError("FliqsSearch cannot tell the number of training steps; pass total_steps=...")
        self.total_steps = int(total)
        self.search_steps = max(min(math.ceil(self.freeze_at * self.total_steps), self.total_steps), 1)
        self.warmup_steps = min(int(self.warmup * self.total_steps), self.search_steps - 1)
        self.policy_learning_rate = float(self.learning_rate if self.learning_rate is not None else
                                          policy_learning_rate(self.search_steps - self.warmup_steps))
        self.model.controller.learning_rate = self.policy_learning_rate
        self.model.format_state.keep(None)
        self._kept = False
        self.model.search_step = self._search_step
        self.model.make_train_function(force=True)
        if self.log_dir:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)
        self._epoch = 0
        self._record()

    # --- the compiled search step ----------------------------------------------------------

    def _quality(self, model, step):
        x, y = self.held_out
        size = min(self.held_out_batch_size, len(x))
        start = ops.mod(ops.cast(step, "int32") * size, len(x))
        rows = ops.mod(start + ops.arange(size, dtype="int32"), len(x))
        prediction = model(ops.take(x, rows, axis=0), training=False)
        labels = ops.take(y, rows)
        accuracy = ops.mean(ops.cast(ops.equal(ops.cast(ops.argmax(prediction, axis=-1), "int32"), labels),
                                     "float32"))
        # argmax turns NaN predictions into a class: a broken model must not look accurate.
        return ops.where(ops.all(ops.isfinite(prediction)), accuracy, float("nan"))

    def _search_step(self, model, data, base_train_step):
        policy = model.controller
        step = model.optimizer.iterations
        warm = step < self.warmup_steps
        # Only an asked-for freeze: a later `fit` on the same model counts its steps on from the first's.
        frozen = step >= self.search_steps if self.freeze_at < 1 else ops.zeros((), "bool")
        allowed = None
        if self.warmup_draws == "high_first":
            # In part p of the warm-up (of as many parts as the decision has widths), the p + 1 widest.
            part = ops.floor(ops.cast(step, "float32") / max(self.warmup_steps, 1) * self._widths)
            allowed = ops.logical_or(ops.logical_not(warm), self._narrowness <= ops.cast(part, "int32")[:, None])
        indices = ops.where(frozen, model.format_state.kept_or(policy.argmax()),
                            policy.sample(step, uniform=warm, allowed=allowed))
        model.format_state.assign(indices)
        tracker = model._loss_tracker
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
        if self.quality == "loss":
            quality = -batch_loss
        elif self.freeze_at < 1:
            # Once frozen, the held-out pass would only feed the logs: skip it.
            quality = ops.cond(frozen, lambda: ops.convert_to_tensor(float("nan")),
                               lambda: self._quality(model, step))
        else:
            quality = self._quality(model, step)
        cost = self.costs.graph_cost(indices, model.decision_names)
        value = ops.where(finite,
                          controller_lib.reward(quality, cost, self.target, self.beta, self.reward_kind),
                          float("nan"))
        penalty = controller_lib.entropy_weight(step, self.search_steps, self.warmup_steps, self.entropy_max,
                                                self.entropy_schedule)
        active = ops.logical_not(ops.logical_or(warm, frozen))
        if self.cost_credit == "exact":
            # The reward is additive: the quality is the sampled part, the cost term the known one.
            known = controller_lib.reward(0.0, self._alternative_costs(model, indices), self.target, self.beta,
                                          self.reward_kind)
            policy.update(indices, ops.where(finite, quality, float("nan")), penalty, active, known)
        else:
            policy.update(indices, value, penalty, active=active)
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
        tracker = {id(model._loss_tracker.total), id(model._loss_tracker.count)}
        own = list(model.trainable_variables) + list(model.non_trainable_variables)
        optimizer_state = [v for v in model.optimizer.variables
                           if "float" in str(v.dtype) and v is not model.optimizer.iterations]
        metrics = [v for v in model.metrics_variables if id(v) not in tracker]
        return own, optimizer_state + metrics

    # --- reporting and the end ---------------------------------------------------------------

    def on_train_batch_begin(self, batch, logs=None):
        if (self.max_cost_ratio is not None and self.freeze_at < 1 and not self._kept
                and self._epoch_start + batch >= self.search_steps):
            self._keep_within_budget()

    def _keep_within_budget(self):
        """Makes the controller keep the most probable policy within `max_cost_ratio` of the target."""
        model, controller = self.model, self.model.controller
        names, choices = model.decision_names, decisions(model)
        argmax = keras.ops.convert_to_numpy(controller.argmax())
        kept = budget.most_probable_within(
            keras.ops.convert_to_numpy(controller.log_probabilities()), controller.valid,
            lambda batch: keras.ops.convert_to_numpy(self.costs.graph_cost(batch, names)), self.cost_limit)
        model.format_state.keep(kept)
        self._kept = True
        self.budget_changes = {n: (choices[n][a].name, choices[n][k].name)
                               for n, a, k in zip(names, argmax, kept) if a != k}
        if self.budget_changes:
            argmax_cost = float(keras.ops.convert_to_numpy(self.costs.graph_cost(argmax, names)))
            logging.info("FliqsSearch: the argmax policy costs %.3f of the target, over max_cost_ratio=%g; kept "
                         "the most probable policy found within it instead, which changes %s.",
                         argmax_cost / self.target, self.max_cost_ratio,
                         ", ".join(f"{n}: {a} -> {k}" for n, (a, k) in self.budget_changes.items()))

    def on_train_batch_end(self, batch, logs=None):
        # The step is counted here, not read from the optimizer: a read would stall every step.
        if self.record_every and self._epoch_start + batch + 1 - self.history[-1]["step"] >= self.record_every:
            self._record()
        if (logs and "reward" in logs and not math.isfinite(float(logs["reward"]))
                and float(logs.get("searching", 1.0))):
            logging.warning("FliqsSearch: non-finite reward at batch %d (loss %s): the policy update was "
                            "skipped; the policy and the training state are kept.", batch, logs.get("loss"))

    def _record(self) -> dict[str, Any]:
        model = self.model
        probabilities = keras.ops.convert_to_numpy(model.controller.probabilities())
        choices = decisions(model)
        record = {"epoch": self._epoch, "step": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
                  "probabilities": {name: {f.name: float(p) for f, p in zip(choices[name], row)}
                                    for name, row in zip(model.decision_names, probabilities)}}
        if not self.history or self.history[-1]["step"] != record["step"]:
            self.history.append(record)
        return record

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self.history[-1]["step"]  # recorded at the start and after every epoch

    def on_epoch_end(self, epoch, logs=None):
        model = self.model
        record = self._record()
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default(step=epoch):
                for name, row in record["probabilities"].items():
                    for fmt, p in row.items():
                        tf.summary.scalar(f"fliqs/{name}/{fmt}", p)
                tf.summary.scalar("fliqs/expected_cost_ratio", float(
                    self.costs.expected_cost(model.controller.probabilities(), model.decision_names)) / self.target)
            self._writer.flush()

    def on_train_end(self, logs=None):
        model = self.model
        model.search_step = None
        model.make_train_function(force=True)
        logits = keras.ops.convert_to_numpy(model.controller.logits.value)
        broken = [name for name, row, valid in zip(model.decision_names, logits, model.controller.valid)
                  if not np.isfinite(row[valid]).all()]
        if broken:
            raise FloatingPointError(
                f"FliqsSearch: the policy of decisions {broken} has non-finite logits, so "
                "no formats were chosen. The trained weights are kept, in the formats of the last step: set "
                "formats with fliqs_keras.set_formats before exporting, or search again.")
        if self.max_cost_ratio is not None and not self._kept:
            self._keep_within_budget()
        state = model.format_state
        state.assign(state.kept_or(model.controller.argmax()))
        chosen = policy(model)
        final = self.costs.cost(chosen)
        self.final_cost_ratio = final / self.target
        entropy = keras.ops.convert_to_numpy(model.controller.entropy())
        self.unsettled = {name: float(h) for name, h in zip(model.decision_names, entropy) if h > SETTLED_NATS}
        logging.info("FliqsSearch: final policy %s, cost %.4g (%.3f of the target)", chosen, final,
                     self.final_cost_ratio)
        off_target = (self.final_cost_ratio > 1 + COST_TOLERANCE
                      or self.reward_kind == "absolute" and self.final_cost_ratio < 1 - COST_TOLERANCE)
        if off_target and self.unsettled:
            worst = max(self.unsettled, key=self.unsettled.get)
            logging.warning(
                "FliqsSearch: the policy has not settled (%d decisions keep over %.2f nats of entropy, %r "
                "%.2f) and the formats kept cost %.3f of the target. Train longer, raise the policy's "
                "learning_rate, shorten the warmup or end the search earlier with freeze_at; "
                "max_cost_ratio=1 keeps formats within the target.",
                len(self.unsettled), SETTLED_NATS, worst, self.unsettled[worst], self.final_cost_ratio)
        elif off_target:
            logging.warning(
                "FliqsSearch: the policy settled on formats that cost %.3f of the target: the reward traded "
                "cost for quality (beta=%g against quality=%r). Raise beta to hold the target more tightly.",
                self.final_cost_ratio, self.beta, self.quality)

