"""Helper of test_search: the search on Keras's JAX backend, where a training step is a pure function.

Run in its own process, since the backend is fixed when Keras is imported.
Writes jax.json to the folder given as argument.
"""

import json
import os
import pathlib
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fliqs_keras  # noqa: E402
from fliqs_keras import cost, data  # noqa: E402


def _searchable():
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
    return model


def _formats(model):
    return {w.name: w.current_formats()[w.name].name for w in fliqs_keras.searchable_layers(model)}


def main(output_dir):
    output_dir = pathlib.Path(output_dir)
    (x_train, y_train), (x_test, y_test) = data.mnist_digits(seed=0)
    held = len(x_train) // 8
    report = {"backend": keras.backend.backend()}

    # The search itself: it must learn, settle and meet its target as on TensorFlow.
    model = _searchable()
    search = fliqs_keras.FliqsSearch(target="int4", validation_data=(x_train[:held], y_train[:held]),
                                     learning_rate=0.05, entropy_weight=1.0, record_every=10)
    model.fit(x_train[held:], y_train[held:], epochs=8, batch_size=64, verbose=0, callbacks=[search])
    report.update({
        "bops_ratio": cost.bops(model) / cost.bops(model, "int4"),
        "final_cost_ratio": search.final_cost_ratio, "unsettled": search.unsettled,
        "max_entropy": float(np.max(keras.ops.convert_to_numpy(model.controller.entropy()))),
        "updates": int(keras.ops.convert_to_numpy(model.controller.updates)),
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "warmup_steps": search.step.warmup_steps,
        # Records inside an epoch must read the state of their step, not the values at the epoch's start.
        "distinct_records": len({json.dumps(r["probabilities"], sort_keys=True) for r in search.history}),
        "records_after_warmup": sum(r["step"] > search.step.warmup_steps for r in search.history),
        "test_accuracy": model.evaluate(x_test, y_test, verbose=0)[1],
        "policy": fliqs_keras.chosen_formats(model)})
    model.save(output_dir / "searched.keras")
    loaded = keras.models.load_model(output_dir / "searched.keras")
    report["reloaded_policy"] = fliqs_keras.chosen_formats(loaded)
    report["reloaded_logits_equal"] = bool(np.array_equal(keras.ops.convert_to_numpy(loaded.controller.logits),
                                                          keras.ops.convert_to_numpy(model.controller.logits)))

    # Formats set inside an epoch, on a model the callback holds itself (not its synced `self.model`),
    # reach the next step: the clip counts say which formats trained.
    model = _searchable()
    x, y = x_train[:512], y_train[:512]

    class Switch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            fliqs_keras.set_formats(model, "int2" if batch < 3 else "int8")

    model.fit(x, y, epochs=1, batch_size=64, verbose=0, callbacks=[Switch()])
    counts = {w.name: keras.ops.convert_to_numpy(w._input_state[0][1]).tolist()
              for w in fliqs_keras.searchable_layers(model)}
    report["clip_counts"] = counts

    # max_cost_ratio keeps formats at the freeze, from a callback inside the epoch; they train from then on.
    model = _searchable()
    model.controller.logits.assign(np.array([[0.0, 3.0, 6.0], [0.0, 2.0, 3.0], [0.0, 1.0, 6.0]], np.float32))
    seen = []

    class Formats(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(_formats(self.model))

    search = fliqs_keras.FliqsSearch(target="int4", quality="loss", warmup=0.5, freeze_at=0.75,
                                     max_cost_ratio=1.0, entropy_weight=0.0, learning_rate=1e-6)
    model.fit(x, y, epochs=1, batch_size=64, verbose=0, callbacks=[search, Formats()])
    chosen = fliqs_keras.chosen_formats(model)
    report.update({"kept": chosen, "kept_cost_ratio": search.final_cost_ratio, "kept_seen_after_freeze": seen[6:],
                   "budget_changes": {k: list(v) for k, v in search.budget_changes.items()}})

    # A non-finite loss: that step's update is undone and the policy update skipped.
    model = _searchable()
    search = fliqs_keras.FliqsSearch(target="int4", validation_data=(x_train[:256], y_train[:256]), warmup=0.0,
                                     learning_rate=0.05)
    model.fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0, callbacks=[search])
    bad = x[:128].copy()
    bad[0, 0, 0, 0] = np.nan
    model.fit(bad, y[:128], epochs=1, batch_size=64, verbose=0, callbacks=[search])
    report.update({
        "nan_skipped": int(keras.ops.convert_to_numpy(model.controller.skipped)),
        "nan_updates": int(keras.ops.convert_to_numpy(model.controller.updates)),
        "weights_finite": all(bool(np.isfinite(keras.ops.convert_to_numpy(w)).all()) for w in model.weights)})
    (output_dir / "jax.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
