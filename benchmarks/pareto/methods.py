"""The methods a study compares, in a registry with one signature: ``run(context, seed, spec) -> row``.

`spec` is the run's JSON-able parameters (a format, a budget, a policy); the
row has at least the test ``accuracy``, the ``bops`` and the ``policy``
trained (and, for QAT runs, the accuracy after batch-norm re-estimation).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import keras
import numpy as np

import fliqs_keras
from benchmarks.pareto import policies
from benchmarks.pareto.study import BASELINE_SPACE, SPACES, VARIANTS
from benchmarks.pareto.training import Context, layer_costs
from fliqs_keras import budget as budget_search
from fliqs_keras import cost

Method = Callable[[Context, int, dict[str, Any]], dict[str, Any]]
# The benchmark's own search settings under every variant's: a faster policy and a stronger entropy
# penalty than the library's defaults, fixed when the first runs were stored.
FLIQS_DEFAULTS = {"learning_rate": 0.05, "entropy_weight": 1.0}
# The variant whose kept policies the controls retrain, and whose search the ceiling and the maximal
# policies are kept in at its freeze.
RETRAINED = "fliqs-loss-budget"
CALIBRATION_BATCHES = 8
# The sensitivity baseline's assignment is exhaustive up to this many policies.
EXHAUSTIVE = 4 ** 10
# The supernet search scores every maximal policy within the budget when there are at most
# SUPERNET_LIMIT (about a second each), else the distinct ends of SUPERNET_DRAWS random climbs.
SUPERNET_LIMIT = 128
SUPERNET_DRAWS = 100


def uniform(context: Context, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    """QAT of every layer in ``spec["format"]`` (``fp32``: plain float training)."""
    fmt = spec["format"]
    base = context.build(seed)
    model = base if fmt == "fp32" else fliqs_keras.apply(base, fmt)
    return {**context.train(model, seed), "policy": fmt}


def fliqs(context: Context, seed: int, spec: dict[str, Any], callbacks=()) -> dict[str, Any]:
    """The FLIQS search in ``spec["space"]`` at ``spec["target"]``, with ``spec["options"]`` over the defaults."""
    searchable = context.searchable(seed, spec["space"])
    options = {**FLIQS_DEFAULTS, **spec.get("options", {})}
    search = fliqs_keras.FliqsSearch(target=spec["target"], validation_data=context.splits[1], seed=seed, **options)
    trained = context.train(searchable, seed, [search, *callbacks])
    entropy = keras.ops.convert_to_numpy(searchable.controller.entropy())
    row = {**trained, "policy": fliqs_keras.chosen_formats(searchable), "bops": cost.bops(searchable),
           "max_final_entropy_nats": float(entropy.max())}
    if search.config.max_cost_ratio is not None:
        row["formats_changed_by_budget"] = {n: list(change) for n, change in search.budget_changes.items()}
    return row


def retrained(context: Context, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    """QAT of a given policy, ``spec["policy"]`` (``{layer: format}``), from scratch."""
    searchable = context.searchable(seed, BASELINE_SPACE)
    fliqs_keras.set_formats(searchable, spec["policy"])
    return {**context.train(searchable, seed), "policy": spec["policy"], "bops": cost.bops(searchable)}


class _Schedule(keras.callbacks.Callback):
    """Sets the formats of every layer at the start of each epoch, from a list of one entry per epoch."""

    def __init__(self, per_epoch):
        super().__init__()
        self.per_epoch = per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        fliqs_keras.set_formats(self.model, self.per_epoch[epoch])


def progressive(context: Context, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Progressive QAT: the dearest uniform format within ``spec["budget"]``, trained after those above it.

    The first 3/4 of the epochs go in equal shares to the integer choices above
    the final format, from INT8 down; the rest train in the final format.
    """
    searchable = context.searchable(seed, BASELINE_SPACE)
    _, table = layer_costs(searchable)
    ladder = sorted(SPACES[BASELINE_SPACE], key=lambda f: -table[f].sum())
    final = next(f for f in ladder if table[f].sum() <= spec["budget"])
    higher = ladder[:ladder.index(final)]
    epochs = context.epochs
    early = (3 * epochs) // 4
    per_epoch = [higher[i * len(higher) // early] if higher else final for i in range(early)]
    per_epoch += [final] * (epochs - early)
    trained = context.train(searchable, seed, [_Schedule(per_epoch)])
    return {**trained, "policy": final, "schedule": per_epoch, "bops": cost.bops(searchable)}


def _random_policy(context: Context, seed: int, budget: float) -> dict[str, str]:
    names, table = layer_costs(context.searchable(seed, BASELINE_SPACE))
    return policies.random_policy(names, table, seed, budget)


def random(context: Context, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    """QAT of a random integer policy within 5% of ``spec["budget"]`` (`policies.random_policy`)."""
    return retrained(context, seed, {"policy": _random_policy(context, seed, spec["budget"])})


class UniformDraws(keras.callbacks.Callback):
    """Draws every decision's format uniformly at random each step until step `until`, then sets `final`.

    A FLIQS run's warm-up draws, kept up to where `freeze_at` ends the search,
    with no policy learning: what the search's training gives any policy.
    `final` is a format, an assignment, or a function of the model that
    returns one at step `until` (the supernet search's choice).
    """

    def __init__(self, seed, until, final):
        super().__init__()
        self.rng, self.until, self.final, self.step = np.random.default_rng(seed), until, final, 0

    def on_train_begin(self, logs=None):
        choices = fliqs_keras.decisions(self.model)
        self.sizes = [len(choices[name]) for name in self.model.decision_names]

    def on_train_batch_begin(self, batch, logs=None):
        if self.step < self.until:
            self.model.format_state.assign(np.array([self.rng.integers(n) for n in self.sizes], dtype="int32"))
        elif self.step == self.until:
            fliqs_keras.set_formats(self.model, self.final(self.model) if callable(self.final) else self.final)
        self.step += 1


def drawn(context: Context, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    """A control of the search's training: a policy trained after `FREEZE_AT` of the steps in per-step
    uniform draws of every layer's format (a FLIQS run without its policy learning).

    ``spec["final"]`` is ``"random"`` (the random baseline's policy of this
    seed and ``spec["budget"]``) or a format (that uniform model).
    """
    final = spec["final"]
    assignment = _random_policy(context, seed, spec["budget"]) if final == "random" else final
    searchable = context.searchable(seed, BASELINE_SPACE)
    # Draws of their own: the seed's format draws must not repeat the random policy's draws.
    draws = UniformDraws(1000 + seed, context.freeze_step(), assignment)
    return {**context.train(searchable, seed, [draws]), "policy": assignment, "bops": cost.bops(searchable)}


class KeepAtFreeze(keras.callbacks.Callback):
    """From step `at` (a search's freeze), makes the model keep `assignment` instead of what the search learned."""

    def __init__(self, at, assignment):
        super().__init__()
        self.at, self.assignment, self.step = at, assignment, 0

    def on_train_batch_begin(self, batch, logs=None):
        # After the search's own callback: it keeps its policy within the budget at this step first.
        if self.step == self.at:
            choices = fliqs_keras.decisions(self.model)
            self.model.format_state.keep(np.array(
                [[c.name for c in choices[n]].index(self.assignment[n]) for n in self.model.decision_names],
                dtype="int32"))
        self.step += 1


def kept(context: Context, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    """The `RETRAINED` variant's search with ``spec["policy"]`` kept at the freeze instead of the policy it
    learned, at ``spec["budget_format"]``: the search's training, then given formats."""
    keep = KeepAtFreeze(context.freeze_step(), spec["policy"])
    return fliqs(context, seed, {"space": BASELINE_SPACE, "target": spec["budget_format"],
                                 "options": VARIANTS[RETRAINED]}, [keep])


def held_out_accuracy(model, held, batch_size=256) -> float:
    """Accuracy on `held` in training mode, every non-trainable variable restored after.

    Training mode normalises with each batch's own statistics: the moving
    statistics of weights trained in per-step draws mix every format drawn, so
    one-shot searches recalibrate the batch norms of each candidate before
    scoring it (SPOS); batch statistics do that for the price of one pass.
    """
    saved = [v.numpy() for v in model.non_trainable_variables]
    x, y = held
    correct = 0
    try:
        for start in range(0, len(x), batch_size):
            logits = keras.ops.convert_to_numpy(model(x[start:start + batch_size], training=True))
            correct += int((logits.argmax(-1) == y[start:start + batch_size]).sum())
    finally:
        for variable, value in zip(model.non_trainable_variables, saved):
            variable.assign(value)
    return correct / len(x)


def supernet(context: Context, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One-shot supernet search (SPOS's way, with the budget as the constraint): `FREEZE_AT` of the steps in
    per-step uniform draws of every layer's format, then the maximal policy within ``spec["budget"]`` that
    scores best on the held-out slice, trained for the rest."""
    budget = spec["budget"]
    searchable = context.searchable(seed, BASELINE_SPACE)
    names, table = layer_costs(searchable)
    every = policies.maximal(names, table, budget, SUPERNET_LIMIT)
    candidates = every or policies.maximal_draws(names, table, budget, np.random.default_rng(2000 + seed),
                                                 SUPERNET_DRAWS)
    scores, chosen = [], {}

    def best(model):
        for candidate in candidates:
            fliqs_keras.set_formats(model, candidate)
            scores.append(held_out_accuracy(model, context.splits[1]))
        chosen.update(candidates[int(np.argmax(scores))])
        return chosen

    # The draws of `drawn`'s control for this seed: the two differ only in the policy kept.
    draws = UniformDraws(1000 + seed, context.freeze_step(), best)
    trained = context.train(searchable, seed, [draws])
    return {**trained, "policy": chosen, "bops": cost.bops(searchable),
            "candidates": len(candidates), "every_maximal_policy": every is not None,
            "held_out_accuracy": max(scores), "held_out_accuracy_median": float(np.median(scores))}


def _calibrate(context: Context, searchable, x, fmt):
    """Running input clips of every layer in `fmt`, from training-mode passes with frozen batch norms."""
    fliqs_keras.set_formats(searchable, fmt)
    batch = context.study.batch_size
    for start in range(0, CALIBRATION_BATCHES * batch, batch):
        searchable(x[start:start + batch], training=True)


def sensitivity(context: Context, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Post-training search: the sensitivity of each layer in each format, then the best assignment within
    ``spec["budget"]``, scored as post-training quantization and trained with QAT."""
    budget = spec["budget"]
    (x, _), (x_held, y_held), (x_test, y_test) = context.splits
    trained = context.build(seed)
    float_accuracy = context.train(trained, seed, reestimate=False)["accuracy"]
    choices = SPACES[BASELINE_SPACE]
    searchable = fliqs_keras.apply(trained, list(choices) + ["fp32"])
    for layer in searchable.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    context.compile(searchable)
    for fmt in choices + ("fp32",):
        _calibrate(context, searchable, x, fmt)
    names, table = layer_costs(searchable)
    fliqs_keras.set_formats(searchable, "fp32")
    reference = float(searchable.evaluate(x_held, y_held, verbose=0)[0])
    scores = np.zeros((len(choices), len(names)))
    for column, name in enumerate(names):
        for row, fmt in enumerate(choices):
            fliqs_keras.set_formats(searchable, {name: fmt})
            scores[row, column] = float(searchable.evaluate(x_held, y_held, verbose=0)[0]) - reference
        fliqs_keras.set_formats(searchable, {name: "fp32"})
    per_choice = np.stack([table[c] for c in choices])
    columns = np.arange(len(names))
    if len(choices) ** len(names) <= EXHAUSTIVE:
        grid = np.array(list(itertools.product(range(len(choices)), repeat=len(names))))
        totals = per_choice[grid, columns].sum(axis=1)
        penalty = np.where(totals <= budget, scores[grid, columns].sum(axis=1), np.inf)
        best = grid[int(np.argmin(penalty))]
    else:
        # Too many to list: the least summed sensitivity is the most probable policy with the
        # sensitivities as negative log-probabilities, which the budget module's local search finds.
        best = budget_search.most_probable_within(-scores.T, np.ones(scores.T.shape, bool),
                                                  lambda p: per_choice[p, columns].sum(axis=1), budget)
    assignment = {n: choices[i] for n, i in zip(names, best)}
    fliqs_keras.set_formats(searchable, assignment)
    ptq_accuracy = float(searchable.evaluate(x_test, y_test, verbose=0)[1])
    return {**retrained(context, seed, {"policy": assignment}), "ptq_accuracy": ptq_accuracy,
            "float_accuracy": float_accuracy,
            "sensitivity": {n: dict(zip(choices, scores[:, i].round(5).tolist())) for i, n in enumerate(names)}}


def _to_hgq(model: keras.Model) -> keras.Model:
    """The same architecture, initial weights included, with HGQ2's quantized Conv2D and Dense."""
    from hgq.layers import QConv2D, QDense

    def clone(layer):
        config = layer.get_config()
        if type(layer) is keras.layers.Conv2D:
            return QConv2D(**config)
        if type(layer) is keras.layers.Dense:
            return QDense(**config)
        return layer.__class__.from_config(config)

    hgq_model = keras.models.clone_model(model, clone_function=clone)
    for source, target in zip(model.layers, hgq_model.layers):
        if type(source) in (keras.layers.Conv2D, keras.layers.Dense):
            target.kernel.assign(source.kernel)
            if source.use_bias:
                target.bias.assign(source.bias)
        elif source.weights:
            target.set_weights(source.get_weights())
    return hgq_model


def hgq2(context: Context, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    """HGQ2: per-weight bit widths learned under an EBOPs penalty that a PID steers to ``spec["budget"]``."""
    from hgq.utils.sugar import BetaPID, FreeEBOPs

    budget = spec["budget"]
    hgq_model = _to_hgq(context.build(seed))
    # The penalty starts at 30% of a typical loss when EBOPs sit at the budget; the PID (on log EBOPs,
    # once per epoch) then steers beta towards it. HGQ2's default gains are made for long runs.
    callbacks = [FreeEBOPs(), BetaPID(budget, init_beta=0.3 / budget, warmup=1, p=1.0, i=1.0, log=True)]
    # HGQ2's quantizers are not fliqs_keras wrappers, and it is off budget: no re-estimation.
    accuracy = context.train(hgq_model, seed, callbacks, reestimate=False)["accuracy"]
    ebops = float(sum(float(keras.ops.convert_to_numpy(layer.ebops)) for layer in hgq_model.layers
                      if getattr(layer, "enable_ebops", False)))
    return {"accuracy": accuracy, "bops": ebops, "policy": "per-weight fixed point (HGQ2 EBOPs)"}


METHODS: dict[str, Method] = {
    "uniform": uniform, "fliqs": fliqs, "random": random, "sensitivity": sensitivity, "progressive": progressive,
    "supernet": supernet, "hgq2": hgq2, "retrained": retrained, "drawn": drawn, "kept": kept,
}
# The baselines, run at a budget, in the order a cut-short run keeps what matters.
BASELINES = ("random", "sensitivity", "progressive", "supernet", "hgq2")
