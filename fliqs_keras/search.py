"""`FliqsSearch`: the Keras callback that runs a one-shot format search during `model.fit`.

It builds the compiled `search_step.SearchStep` from its `SearchConfig`,
installs it in the model, keeps a budget at the freeze, logs, and freezes the
chosen formats at the end. How a step works: docs/design.md.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from absl import logging
from keras import ops

from fliqs_keras import budget
from fliqs_keras.cost import CostModel
from fliqs_keras.search_config import SearchConfig
from fliqs_keras.search_model import SearchModel, chosen_formats, decisions
from fliqs_keras.search_step import SearchStep

# A decision with more entropy than this at the end has not chosen (0.1 nats: ~98% on one choice of 4).
SETTLED_NATS = 0.1
# How far the argmax formats' cost may land from the target before the end of the search says so.
COST_TOLERANCE = 0.1


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


class FliqsSearch(keras.callbacks.Callback):
    """Runs the FLIQS one-shot search during `fit` (docs/search.md).

    Takes a `SearchConfig`, or its settings as keyword arguments (below), and
    the data and logging arguments.

    Args:
        config: the search's settings, or None to build them from `settings`.
        cost: ``"bops"``, ``"size"``, ``"table"`` or ``"latency"``
            (milliseconds on LiteRT, from a table `measure.measure_latency`
            measured).
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
            them, as progressive QAT trains high formats first.
        freeze_at: fraction of the training steps after which the argmax
            formats are fixed and the remaining steps train them alone
            (1.0, the default: search to the end, as FLIQS does). Must be
            above `warmup`.
        max_cost_ratio: if set, the formats kept at the freeze (or at the end)
            cost at most this times the target: the argmax when it does, else
            the most probable formats `budget` finds within it. None (the
            default): the argmax, as FLIQS. With ``steps_per_execution=k``
            and a freeze, the budget's formats take over at the first
            execution that starts at or after the freeze step (up to k - 1
            steps train the argmax first).
        cost_credit: ``"exact"`` (the cost term credited to each decision
            exactly, docs/search.md; needs an additive reward,
            ``"absolute"`` or ``"one_sided"``) or ``"sampled"`` (REINFORCE on
            the whole reward, as FLIQS). None (default): ``"exact"`` for an
            additive reward, else ``"sampled"``.
        entropy_weight: the maximum of the entropy penalty; `entropy_schedule`
            is ``"cosine"`` (default), ``"linear"`` or ``"constant"``.
        learning_rate: the controller's Adam learning rate. None (default)
            sets it from the steps the policy learns (after the warm-up,
            before the freeze) as ``max(5e-3, 20 / steps)``:
            5e-3, FLIQS's value, for long runs, and enough for a search of a
            few hundred steps to settle. The value used is `policy_learning_rate`.
        baseline_momentum: of the controller's reward baseline (EMA).
        seed: seed of the format draws.
        total_steps: training steps of the whole run, where Keras cannot tell
            (datasets of unknown length).
        cost_table: for ``cost="table"`` or ``"latency"``: a
            `cost_tables.CostTable`, its JSON file or a dict.
        log_dir: where to write per-decision probabilities for TensorBoard.
        record_every: also record the probabilities in `history` every this
            many steps (0: at the start and at the end of every epoch only).

    Raises:
        ValueError: for a setting out of range (naming it), both a config and
            settings, or ``quality="accuracy"`` without `validation_data`.
    """

    def __init__(self, config: SearchConfig | None = None, *, validation_data: Any = None,
                 log_dir: str | None = None, record_every: int = 0, **settings):
        super().__init__()
        if config is not None and settings:
            raise ValueError(f"Give FliqsSearch a SearchConfig or its settings, not both (got {sorted(settings)}).")
        self.config = config if config is not None else SearchConfig(**settings)
        if self.config.quality == "accuracy" and validation_data is None:
            raise ValueError("quality='accuracy' needs validation_data=(x, y) held out from training "
                             "(or use quality='loss').")
        if record_every < 0:
            raise ValueError(f"record_every must be >= 0, got {record_every}.")
        self.validation_data, self.log_dir, self.record_every = validation_data, log_dir, int(record_every)
        self.step: SearchStep | None = None
        """The search step of the current (or last) `fit`."""
        self.history: list[dict[str, Any]] = []
        """Per record: the epoch, the step and ``{decision: {format: probability}}``."""
        self.final_cost_ratio: float | None = None
        """After `fit`: the cost of the chosen formats over the target."""
        self.unsettled: dict[str, float] = {}
        """After `fit`: the decisions whose policy kept more than `SETTLED_NATS` of entropy."""
        self.budget_changes: dict[str, tuple[str, str]] = {}
        """With `max_cost_ratio`: ``{decision: (argmax format, kept format)}`` where they differ."""
        self._writer = None
        self.held_out = None

    @property
    def policy_learning_rate(self) -> float | None:
        """The policy learning rate of the current (or last) `fit`: the config's, or the one set from its steps."""
        return None if self.step is None else self.step.learning_rate

    # --- set-up -----------------------------------------------------------------------

    def set_model(self, model):
        """Keeps the model Keras trains; a model not made by `fliqs_keras.apply` is an error."""
        if not isinstance(model, SearchModel):
            raise ValueError(
                f"FliqsSearch needs a model made by fliqs_keras.apply, got {type(model).__name__} "
                f"{getattr(model, 'name', '')!r}.")
        super().set_model(model)
        config = self.config
        self.costs = CostModel(model, config.cost, config.cost_table)
        self.target = self.costs.target(config.target)
        self.cost_limit = None if config.max_cost_ratio is None else config.max_cost_ratio * self.target
        if self.cost_limit is not None:
            cheapest = self.costs.bounds()[0]
            if self.cost_limit < cheapest:
                raise ValueError(
                    f"max_cost_ratio={config.max_cost_ratio:g} allows at most {self.cost_limit:.6g} "
                    f"({config.cost}), below the cheapest formats of the search space ({cheapest:.6g}).")
        if config.quality == "accuracy":
            x, y = _held_out_arrays(self.validation_data, config.held_out_size)
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
        model = self.model
        if not model.optimizer.built:
            # Its slots must exist before the step is traced: the step saves and restores them.
            model.optimizer.build(model.trainable_variables)
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        total = self.config.total_steps or (epochs * steps if epochs and steps else None)
        if not total:
            raise ValueError("FliqsSearch cannot tell the number of training steps; pass total_steps=...")
        self.step = SearchStep(model, self.config, self.costs, self.target, total, self.held_out)
        model.format_state.keep(None)
        self._kept, self.budget_changes, self._argmax_cost_ratio = False, {}, None
        model.start_search(self.step, self.config)
        if self.log_dir:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)
        self._epoch = 0
        self._record()

    # --- reporting and the end ---------------------------------------------------------------

    def on_train_batch_begin(self, batch, logs=None):
        if (self.config.max_cost_ratio is not None and self.config.freeze_at < 1 and not self._kept
                and self._epoch_start + batch >= self.step.search_steps):
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
            self._argmax_cost_ratio = argmax_cost / self.target
            logging.info("FliqsSearch: the argmax formats cost %.3f of the target, over max_cost_ratio=%g; kept "
                         "the most probable formats found within it instead, which changes %s.",
                         self._argmax_cost_ratio, self.config.max_cost_ratio,
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
        model.end_search()
        logits = keras.ops.convert_to_numpy(model.controller.logits.value)
        broken = [name for name, row, valid in zip(model.decision_names, logits, model.controller.valid)
                  if not np.isfinite(row[valid]).all()]
        if broken:
            raise FloatingPointError(
                f"FliqsSearch: the policy of decisions {broken} has non-finite logits, so "
                "no formats were chosen. The trained weights are kept, in the formats of the last step: set "
                "formats with fliqs_keras.set_formats before exporting, or search again.")
        if self.config.max_cost_ratio is not None and not self._kept:
            self._keep_within_budget()
        state = model.format_state
        state.assign(state.kept_or(model.controller.argmax()))
        chosen = chosen_formats(model)
        final = self.costs.cost(chosen)
        self.final_cost_ratio = final / self.target
        entropy = keras.ops.convert_to_numpy(model.controller.entropy())
        self.unsettled = {name: float(h) for name, h in zip(model.decision_names, entropy) if h > SETTLED_NATS}
        logging.info("FliqsSearch: chosen formats %s, cost %.4g (%.3f of the target)", chosen, final,
                     self.final_cost_ratio)
        off_target = (self.final_cost_ratio > 1 + COST_TOLERANCE
                      or self.config.reward == "absolute" and self.final_cost_ratio < 1 - COST_TOLERANCE)
        if off_target and self.budget_changes and self.final_cost_ratio < 1:
            # The budget maximises the policy's probability under the limit, not nearness to the target: where the
            # costs have gaps (a latency table), the most probable formats under it can lie far below.
            logging.warning(
                "FliqsSearch: the argmax formats cost %.3f of the target, over max_cost_ratio=%g; the most probable "
                "formats within it cost %.3f of the target. Raise max_cost_ratio (or leave it None) to keep formats "
                "nearer the target.", self._argmax_cost_ratio, self.config.max_cost_ratio, self.final_cost_ratio)
        elif off_target and self.unsettled:
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
                self.final_cost_ratio, self.config.beta, self.config.quality)

