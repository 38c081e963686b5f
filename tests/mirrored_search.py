"""Helper of test_search: a search, and a batch-norm re-estimation, under MirroredStrategy on two
logical CPU devices.

Run in its own process, since the logical devices must be set before
TensorFlow starts. Writes mirrored.json to the folder given as argument.
"""

import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fliqs_keras  # noqa: E402
from fliqs_keras import data  # noqa: E402


def main(output_dir):
    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    (x, y), _ = data.mnist_digits(seed=0)
    x, y, held_out = x[:512], y[:512], (x[-256:], y[-256:])
    with strategy.scope():
        inputs = keras.Input((28, 28, 1))
        hidden = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(inputs)
        outputs = keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(hidden))
        model = fliqs_keras.apply(keras.Model(inputs, outputs), ["int2", "int4", "int8"])
        model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    search = fliqs_keras.FliqsSearch(target="int4", validation_data=held_out, warmup=0.25, learning_rate=0.05)
    history = model.fit(x, y, epochs=2, batch_size=64, verbose=0, callbacks=[search])

    @tf.function
    def draws(step):
        return strategy.run(lambda: model.controller.sample(step))

    identical, steps = True, 0
    for step in range(0, 200, 7):
        per_replica = strategy.experimental_local_results(draws(tf.constant(step, tf.int64)))
        identical &= all(np.array_equal(per_replica[0].numpy(), r.numpy()) for r in per_replica[1:])
        steps += 1
    # A budget's formats, kept under the strategy: assigned from the callback, read by every replica's step.
    budgeted = fliqs_keras.FliqsSearch(target="int4", quality="loss", freeze_at=0.75, max_cost_ratio=0.5)
    model.fit(x, y, epochs=1, batch_size=64, verbose=0, callbacks=[budgeted])
    kept = fliqs_keras.chosen_formats(model)
    report = {
        "replicas": strategy.num_replicas_in_sync,
        "steps": steps,
        "identical": bool(identical),
        "loss_finite": bool(np.isfinite(history.history["loss"]).all()),
        "updates": int(model.controller.updates.numpy()),
        "kept_cost_ratio": budgeted.final_cost_ratio,
        "kept_in_layers": {w.name: w.current_formats()[w.name].name
                           for w in fliqs_keras.searchable_layers(model)} == kept,
    }
    report.update(_batch_norm_report(strategy, x))
    pathlib.Path(output_dir, "mirrored.json").write_text(json.dumps(report))


def _batch_norm_report(strategy, x):
    """Re-estimates a batch norm whose statistics are MirroredVariables, outside `strategy.run`
    (as examples/search.py does), and reads back every replica's copy."""
    with strategy.scope():
        inputs = keras.Input((28, 28, 1))
        hidden = keras.layers.Conv2D(8, 3, strides=2, use_bias=False, name="conv1")(inputs)
        hidden = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(hidden))
        outputs = keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(hidden))
        model = fliqs_keras.apply(keras.Model(inputs, outputs), ["int2", "int8"])
    fliqs_keras.set_formats(model, "int2")
    fliqs_keras.reestimate_batch_norm(model, x, batch_size=100)
    bn = model.get_layer("bn")
    features = keras.Model(model.input, bn.input)(x, training=False).numpy().reshape(-1, 8).astype(np.float64)
    means = [v.numpy() for v in strategy.experimental_local_results(bn.moving_mean.value)]
    variances = [v.numpy() for v in strategy.experimental_local_results(bn.moving_variance.value)]
    return {
        "bn_copies": len(means),
        "bn_mean_error": max(float(np.max(np.abs(m - features.mean(axis=0)))) for m in means),
        "bn_variance_error": max(float(np.max(np.abs(v - features.var(axis=0)))) for v in variances),
        "bn_variance_scale": float(np.max(features.var(axis=0))),
    }


if __name__ == "__main__":
    main(sys.argv[1])
