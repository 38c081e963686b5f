"""The one-shot search through model.fit: determinism, resumption, distribution, bad input."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import fliqs_keras
from fliqs_keras import cost, data
from fliqs_keras.search_step import SearchStep

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits():
    (x_train, y_train), (x_test, y_test) = data.mnist_digits(seed=0)
    return (x_train[:1536], y_train[:1536]), (x_train[-512:], y_train[-512:]), (x_test, y_test)


def _searchable(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2")(x)
    outputs = keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(x))
    model = fliqs_keras.apply(keras.Model(inputs, outputs), ["int2", "int4", "int8"])
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _search(digits, epochs=2, seed=0, callbacks=(), steps_per_execution=1, **options):
    (x, y), held_out, _ = digits
    model = _searchable()
    if steps_per_execution != 1:
        model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      steps_per_execution=steps_per_execution)
    options = {"target": "int4", "validation_data": held_out, "learning_rate": 0.05, "seed": seed, **options}
    search = fliqs_keras.FliqsSearch(**options)
    keras.utils.set_random_seed(seed)
    history = model.fit(x, y, epochs=epochs, batch_size=64, shuffle=False, verbose=0,
                        callbacks=[search, *callbacks])
    return model, search, history


def test_search_logs_learns_and_freezes_the_argmax_policy(digits, tmp_path):
    model, search, history = _search(digits, epochs=3, log_dir=str(tmp_path / "tb"))
    for key in ("reward", "quality", "cost_ratio", "expected_cost_ratio", "entropy"):
        assert np.isfinite(history.history[key]).all(), key
    chosen = fliqs_keras.chosen_formats(model)
    assert set(chosen) == {"conv1", "conv2", "logits"}
    # The layers hold the chosen formats: evaluation runs them, with the trained weights.
    assert {w.name: w.current_formats()[w.name].name for w in fliqs_keras.searchable_layers(model)} == chosen
    assert cost.bops(model) == cost.CostModel(model).cost(chosen)
    assert int(model.controller.updates.numpy()) > 0
    # One record at the start, one at the end of each epoch.
    assert [r["epoch"] for r in search.history] == [0, 0, 1, 2]
    assert set(search.history[0]["probabilities"]["conv1"]) == {"int2", "int4", "int8"}
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tb"))
    json.dumps(chosen)


def test_warmup_keeps_the_policy_uniform_and_the_end_reports_an_unsettled_policy(digits, caplog):
    with caplog.at_level(logging.WARNING):
        # 24 steps, 23 of them warm-up; the one after it is the policy's first update, whose advantage is
        # zero with the sampled credit (the baseline starts at its reward).
        model, search, _ = _search(digits, epochs=1, warmup=0.99, cost_credit="sampled")
    np.testing.assert_array_equal(model.controller.logits.numpy(), 0.0)
    # A uniform policy's argmax is every layer's first choice, int2: a quarter of the INT4 target.
    assert search.final_cost_ratio == pytest.approx(0.25)
    assert search.unsettled == {name: pytest.approx(np.log(3)) for name in ("conv1", "conv2", "logits")}
    warning = [r.getMessage() for r in caplog.records if "has not settled" in r.getMessage()]
    assert len(warning) == 1 and "0.250 of the target" in warning[0] and "freeze_at" in warning[0]


def test_the_end_reports_a_settled_policy_off_the_target(digits, caplog):
    (x, y), held_out, _ = digits
    model = _searchable()
    model.controller.logits.assign(np.tile([0.0, 0.0, 20.0], (3, 1)).astype("float32"))  # settled on int8
    search = fliqs_keras.FliqsSearch(target="int4", validation_data=held_out, warmup=0.9)
    with caplog.at_level(logging.WARNING):
        model.fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0, callbacks=[search])
    assert search.unsettled == {} and search.final_cost_ratio == pytest.approx(4.0)
    warning = [r.getMessage() for r in caplog.records if "FliqsSearch: the policy" in r.getMessage()]
    assert len(warning) == 1 and "settled on formats that cost 4.000 of the target" in warning[0]
    assert "Raise beta" in warning[0]


def test_max_cost_ratio_keeps_the_most_probable_formats_within_the_budget(digits, tmp_path, caplog):
    (x, y), _, _ = digits
    seen = []

    class Formats(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append({w.name: w.current_formats()[w.name].name for w in fliqs_keras.searchable_layers(self.model)})

    model = _searchable()
    # Settled on INT8 everywhere (4x the INT4 target); conv2 is the least sure of it.
    model.controller.logits.assign(np.array([[0.0, 3.0, 6.0], [0.0, 2.0, 3.0], [0.0, 1.0, 6.0]], np.float32))
    search = fliqs_keras.FliqsSearch(target="int4", quality="loss", warmup=0.5, freeze_at=0.75,
                                     max_cost_ratio=1.0, entropy_weight=0.0, learning_rate=1e-6)
    # absl's own logger level, not only the root's: other tests may have parsed absl's flags.
    with caplog.at_level(logging.INFO, logger="absl"):
        model.fit(x[:512], y[:512], epochs=1, batch_size=64, verbose=0, callbacks=[search, Formats()])
    chosen = fliqs_keras.chosen_formats(model)
    costs = cost.CostModel(model)
    assert costs.cost(chosen) <= costs.target("int4") and search.final_cost_ratio <= 1.0
    assert chosen != {"conv1": "int8", "conv2": "int8", "logits": "int8"}
    assert search.budget_changes == {n: ("int8", f) for n, f in chosen.items() if f != "int8"}
    assert seen[6:] == [chosen, chosen]  # the kept formats train from the freeze (step 6 of 8) on
    assert {w.name: w.current_formats()[w.name].name for w in fliqs_keras.searchable_layers(model)} == chosen
    assert any("kept the most probable formats found within it" in r.getMessage() for r in caplog.records)
    # Kept 0.77 of the target: the end names the budget as the cause, not the reward.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert search.final_cost_ratio < 0.9 and len(warnings) == 1, warnings
    assert "the argmax formats cost 4.000 of the target, over max_cost_ratio=1" in warnings[0]
    assert "Raise max_cost_ratio" in warnings[0] and "beta" not in warnings[0]
    model.save(tmp_path / "kept.keras")
    assert fliqs_keras.chosen_formats(keras.models.load_model(tmp_path / "kept.keras")) == chosen
    with pytest.raises(ValueError, match="max_cost_ratio must be a number > 0"):
        fliqs_keras.FliqsSearch(quality="loss", max_cost_ratio=0.0)
    with pytest.raises(ValueError, match=r"max_cost_ratio=0.1 allows at most .* below the cheapest formats"):
        model.fit(x[:64], y[:64], epochs=1, verbose=0,
                  callbacks=[fliqs_keras.FliqsSearch(quality="loss", max_cost_ratio=0.1)])


def test_same_seed_same_policy_and_steps_per_execution_does_not_matter(digits):
    first, _, _ = _search(digits, seed=3)
    again, _, _ = _search(digits, seed=3)
    multi, _, _ = _search(digits, seed=3, steps_per_execution=4)
    np.testing.assert_array_equal(first.controller.logits.numpy(), again.controller.logits.numpy())
    np.testing.assert_allclose(first.controller.logits.numpy(), multi.controller.logits.numpy(), atol=1e-5)
    assert fliqs_keras.chosen_formats(first) == fliqs_keras.chosen_formats(multi)


@pytest.mark.slow  # a search run whole and again interrupted and resumed (17 s)
def test_an_interrupted_search_resumes_to_the_same_policy(digits, tmp_path):
    reference, _, _ = _search(digits, epochs=3, seed=4)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        _search(digits, epochs=3, seed=4, callbacks=[backup, Interrupt()])
    resumed, _, _ = _search(digits, epochs=3, seed=4, callbacks=[backup])
    np.testing.assert_allclose(resumed.controller.logits.numpy(), reference.controller.logits.numpy(), atol=1e-5)
    assert fliqs_keras.chosen_formats(resumed) == fliqs_keras.chosen_formats(reference)


def test_search_state_survives_a_keras_file(digits, tmp_path):
    model, _, _ = _search(digits, epochs=1)
    model.save(tmp_path / "searched.keras")
    loaded = keras.models.load_model(tmp_path / "searched.keras")
    assert isinstance(loaded, fliqs_keras.SearchModel)
    np.testing.assert_array_equal(loaded.controller.logits.numpy(), model.controller.logits.numpy())
    assert float(loaded.controller.baseline.numpy()) == float(model.controller.baseline.numpy())
    assert fliqs_keras.chosen_formats(loaded) == fliqs_keras.chosen_formats(model)


def test_quality_from_the_training_loss_needs_no_held_out_data(digits):
    model, _, history = _search(digits, epochs=1, quality="loss", validation_data=None)
    assert np.all(np.array(history.history["quality"]) < 0)


def test_nan_loss_skips_the_policy_update_and_keeps_the_policy(digits):
    (x, y), held_out, _ = digits
    model = _searchable()
    search = fliqs_keras.FliqsSearch(target="int4", validation_data=held_out, warmup=0.0, learning_rate=0.05)
    model.fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0, callbacks=[search])
    logits = model.controller.logits.numpy().copy()
    updates = int(model.controller.updates.numpy())
    bad = x[:128].copy()
    bad[0, 0, 0, 0] = np.nan
    model.fit(bad, y[:128], epochs=1, batch_size=64, verbose=0, callbacks=[search])
    # The poisoned batch gives a NaN reward: the update is skipped and counted, the policy stays finite,
    # and the weights keep their last finite values.
    assert int(model.controller.skipped.numpy()) == 1
    assert np.isfinite(model.controller.logits.numpy()).all()
    assert int(model.controller.updates.numpy()) == updates + 1
    assert np.isfinite(logits).all()
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)
    assert np.isfinite(model.evaluate(x[:256], y[:256], verbose=0)[0])


def test_a_nan_input_that_max_pooling_hides_from_the_loss_is_undone_too(digits):
    (x, y), held_out, _ = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    hidden = keras.layers.MaxPooling2D()(keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(inputs))
    outputs = keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(hidden))
    model = fliqs_keras.apply(keras.Model(inputs, outputs), ["int4", "int8"])
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    search = fliqs_keras.FliqsSearch(target="int4", validation_data=held_out, warmup=0.0)
    bad = x[:64].copy()
    bad[0, 0, 0, 0] = np.nan
    losses = []

    class Loss(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))

    model.fit(bad, y[:64], epochs=1, batch_size=64, verbose=0, callbacks=[search, Loss()])
    # The pooled-away NaN leaves the loss finite but not the gradients: the step is undone all the same.
    assert np.isfinite(losses).all()
    assert int(model.controller.skipped.numpy()) == 1 and int(model.controller.updates.numpy()) == 0
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)


@pytest.mark.slow  # an 8-epoch MNIST search in a process of its own: 90 s
def test_search_on_the_jax_backend(tmp_path):
    """JAX's step is a pure function of the state: the search's assignments must reach it, and back."""
    script = ROOT / "tests" / "jax_search.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "jax.json").read_text())
    assert report["backend"] == "jax"
    # It learns and settles within the budget (the same search as on TensorFlow above, other random draws).
    assert report["unsettled"] == {} and report["max_entropy"] < 0.1, report
    assert 0.8 <= report["final_cost_ratio"] <= 1.1 and report["bops_ratio"] == pytest.approx(
        report["final_cost_ratio"]), report
    assert report["test_accuracy"] > 0.9, report
    assert report["updates"] == report["steps"] - report["warmup_steps"], report
    # Each record after the warm-up holds a policy of its own, read inside the epoch; the warm-up's are uniform.
    assert report["distinct_records"] == report["records_after_warmup"] + 1, report
    assert report["reloaded_policy"] == report["policy"] and report["reloaded_logits_equal"], report
    # 8 steps: 3 set to INT2, then 5 to INT8, from a callback.
    assert all(counts == [3, 0, 5] for counts in report["clip_counts"].values()), report
    kept = report["kept"]
    assert report["kept_cost_ratio"] <= 1.0 and report["kept_seen_after_freeze"] == [kept, kept], report
    assert report["budget_changes"] == {n: ["int8", f] for n, f in kept.items() if f != "int8"}, report
    assert report["nan_skipped"] == 1 and report["nan_updates"] == 5 and report["weights_finite"], report


def test_exact_cost_credit_costs_each_alternative_and_settles_on_the_target(digits):
    model = _searchable()
    search = fliqs_keras.FliqsSearch(target="int4", quality="loss", cost_credit="exact")
    search.set_model(model)
    step = SearchStep(model, search.config, search.costs, search.target, total_steps=10)
    names, choices = model.decision_names, fliqs_keras.decisions(model)
    sample = [0, 2, 1]
    alternatives = keras.ops.convert_to_numpy(step._alternative_costs(model, np.array(sample, np.int32)))
    costs = cost.CostModel(model)
    for d, name in enumerate(names):
        for k, fmt in enumerate(choices[name]):
            policy = {n: choices[n][k if j == d else sample[j]] for j, n in enumerate(names)}
            assert alternatives[d, k] == pytest.approx(costs.cost(policy), rel=1e-6), (name, fmt)

    # Against REINFORCE on the whole reward, same seed: the cost term no longer adds noise, so the
    # policy settles further and its argmax lands on the target.
    runs = {credit: _search(digits, epochs=3, cost_credit=credit, beta=4.0, quality="loss", validation_data=None)
            for credit in ("sampled", "exact")}
    entropy = {credit: float(np.mean(model.controller.entropy())) for credit, (model, _, _) in runs.items()}
    assert entropy["exact"] < entropy["sampled"] - 0.2, entropy
    assert runs["exact"][1].final_cost_ratio == pytest.approx(1.0, abs=0.05)
    assert np.isfinite(runs["exact"][2].history["reward"]).all()


def test_bad_input(digits):
    _, held_out, _ = digits
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    plain.compile("sgd", "mse")
    with pytest.raises(ValueError, match="needs a model made by fliqs_keras.apply"):
        plain.fit(np.zeros((4, 3)), np.zeros((4, 2)), verbose=0,
                  callbacks=[fliqs_keras.FliqsSearch(validation_data=held_out)])
    model = _searchable()
    with pytest.raises(ValueError, match=r"between .* and .*"):
        model.fit(*digits[0], epochs=1, verbose=0,
                  callbacks=[fliqs_keras.FliqsSearch(target=1.0, validation_data=held_out)])
    with pytest.raises(ValueError, match="validation_data does not fit the model"):
        model.fit(*digits[0], epochs=1, verbose=0,
                  callbacks=[fliqs_keras.FliqsSearch(validation_data=(np.zeros((8, 14, 14, 1)), np.zeros(8)))])
    with pytest.raises(ValueError, match="needs validation_data"):
        fliqs_keras.FliqsSearch()
    with pytest.raises(ValueError, match="Unknown cost_credit 'noisy'"):
        fliqs_keras.FliqsSearch(quality="loss", cost_credit="noisy")
    with pytest.raises(ValueError, match="multiplicative reward scales the quality"):
        fliqs_keras.FliqsSearch(quality="loss", cost_credit="exact", reward="multiplicative")
    with pytest.raises(ValueError, match="as many labels"):
        model.fit(*digits[0], epochs=1, verbose=0,
                  callbacks=[fliqs_keras.FliqsSearch(validation_data=(held_out[0], held_out[1][:3]))])


@pytest.mark.slow  # a search under MirroredStrategy, compiled per replica (22 s)
def test_mirrored_strategy_replicas_draw_identical_formats(tmp_path):
    script = ROOT / "tests" / "mirrored_search.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "mirrored.json").read_text())
    assert report["replicas"] == 2
    assert report["steps"] > 0 and report["identical"], report
    assert report["loss_finite"] and report["updates"] > 0, report
    assert report["kept_cost_ratio"] <= 0.5 and report["kept_in_layers"], report
    # Batch-norm re-estimation outside strategy.run reaches every replica's copy of the statistics.
    assert report["bn_copies"] == 2 and report["bn_variance_scale"] > 1e-3, report
    assert report["bn_mean_error"] < 1e-5 and report["bn_variance_error"] < 1e-5 * report["bn_variance_scale"], report


@pytest.mark.slow
def test_search_on_mnist_digits_meets_the_int4_budget_and_settles():
    (x_train, y_train), (x_test, y_test) = data.mnist_digits(seed=0)
    held = len(x_train) // 8
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D()(x)
    outputs = keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(x))
    model = fliqs_keras.apply(keras.Model(inputs, outputs), ["int2", "int4", "int8"])
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    search = fliqs_keras.FliqsSearch(target="int4", validation_data=(x_train[:held], y_train[:held]),
                                     learning_rate=0.05, entropy_weight=1.0)
    model.fit(x_train[held:], y_train[held:], epochs=8, batch_size=64, verbose=0, callbacks=[search])
    assert abs(cost.bops(model) / cost.bops(model, "int4") - 1) <= 0.10
    assert float(np.max(model.controller.entropy().numpy())) < 0.1
    assert search.unsettled == {} and abs(search.final_cost_ratio - 1) <= 0.10
    assert model.evaluate(x_test, y_test, verbose=0)[1] > 0.9


def test_history_records_the_probabilities_every_few_steps_and_the_figure_draws_them(digits, tmp_path):
    from fliqs_keras import plots

    model, search, _ = _search(digits, epochs=1, record_every=5)
    steps = [record["step"] for record in search.history]
    assert steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] == 24  # 1536 / 64 steps
    assert all(b - a <= 5 for a, b in zip(steps, steps[1:]))
    for record in search.history:
        for row in record["probabilities"].values():
            assert sum(row.values()) == pytest.approx(1.0, abs=1e-5)
    first = search.history[0]["probabilities"]
    assert all(p == pytest.approx(1 / 3) for row in first.values() for p in row.values())  # uniform at the start
    chosen = fliqs_keras.chosen_formats(model)
    path = plots.search_figure(search.history, chosen, search.costs, tmp_path / "search.png")
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="No probabilities were recorded"):
        plots.search_figure([], chosen, search.costs, tmp_path / "x.png")
    with pytest.raises(ValueError, match="record_every"):
        fliqs_keras.FliqsSearch(quality="loss", record_every=-1)


def test_freeze_at_trains_the_argmax_formats_alone_for_the_rest_of_the_run(digits):
    seen = []

    class Formats(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            layers = fliqs_keras.searchable_layers(self.model)
            seen.append(({w.name: w.current_formats()[w.name].name for w in layers}, logs["searching"]))

    model, search, history = _search(digits, epochs=2, freeze_at=0.5, record_every=1, callbacks=[Formats()])
    total, frozen_from = 48, 24  # 2 x 1536 / 64 steps
    # The policy learns from the end of the warm-up (12 steps) to the freeze, and never after.
    assert int(model.controller.updates.numpy()) == frozen_from - total // 4
    probabilities = [r["probabilities"] for r in search.history if r["step"] >= frozen_from]
    assert len(probabilities) == total - frozen_from + 1 and all(p == probabilities[0] for p in probabilities)
    chosen = fliqs_keras.chosen_formats(model)
    assert [s for _, s in seen] == [1.0] * frozen_from + [0.0] * (total - frozen_from)
    assert all(formats == chosen for formats, _ in seen[frozen_from:])
    assert len({tuple(sorted(f.items())) for f, _ in seen[:frozen_from]}) > 1  # sampled while searching
    assert np.isnan(history.history["quality"][-1]) and np.isfinite(history.history["quality"][0])
    for bad in (0.25, 0.1, 1.5):
        with pytest.raises(ValueError, match="freeze_at"):
            fliqs_keras.FliqsSearch(quality="loss", warmup=0.25, freeze_at=bad)


def test_high_first_warmup_draws_the_widest_formats_first_then_adds_narrower_ones(digits):
    def drawn(**options):
        seen = []

        class Formats(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                layers = fliqs_keras.searchable_layers(self.model)
                seen.append({w.current_formats()[w.name].name for w in layers})

        _search(digits, epochs=2, quality="loss", validation_data=None, warmup=0.5, callbacks=[Formats()],
                **options)
        return seen

    # 48 steps, a warm-up of 24 in three parts of 8 (three widths: INT8, INT4, INT2).
    seen = drawn(warmup_draws="high_first")
    assert all(formats == {"int8"} for formats in seen[:8])
    assert set().union(*seen[8:16]) == {"int8", "int4"}
    assert "int2" in set().union(*seen[16:24])
    # Uniform draws (the default) give INT2 from the start, with the same seed.
    assert "int2" in set().union(*drawn()[:8])
    with pytest.raises(ValueError, match="Unknown warmup_draws 'low_first'"):
        fliqs_keras.FliqsSearch(quality="loss", warmup_draws="low_first")
    with pytest.raises(ValueError, match="warmup=0 leaves none"):
        fliqs_keras.FliqsSearch(quality="loss", warmup=0.0, warmup_draws="high_first")
