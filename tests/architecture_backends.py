"""Helper of test_architecture: a joint search on the JAX backend, or under MirroredStrategy on two CPUs.

Run in its own process (`jax` or `mirrored`, then a folder), since the backend
and the logical devices are fixed when Keras and TensorFlow start. Writes
<mode>.json to the folder.
"""

import json
import os
import pathlib
import sys

MODE = sys.argv[1]
os.environ["KERAS_BACKEND"] = "jax" if MODE == "jax" else "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

if MODE == "mirrored":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import contextlib  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fliqs_keras  # noqa: E402
from fliqs_keras import architecture, data, models  # noqa: E402

STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 1))


def main(output_dir):
    (x, y), _ = data.sklearn_digits(seed=0)
    if MODE == "mirrored":
        strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
        scope = strategy.scope()
    else:
        scope = contextlib.nullcontext()
    keras.utils.set_random_seed(0)
    with scope:
        space = models.searchable_mobilenet_v2((8, 8, 1), 10, width=0.5, small_input=True, stages=STAGES)
        model = fliqs_keras.apply(space, ["int4", "int8"])
        model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rows = [i for i, n in enumerate(model.decision_names) if "/" in n]
    draws = []

    class Draws(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            draws.append(tuple(self.model.format_state.current_indices()[rows].tolist()))

    search = fliqs_keras.FliqsSearch(target="int8*0.5", validation_data=(x[:128], y[:128]), warmup=0.25,
                                     learning_rate=0.1)
    history = model.fit(x[128:], y[128:], batch_size=64, epochs=2, verbose=0, callbacks=[search, Draws()])
    plain = fliqs_keras.export.chosen_architecture(model)
    difference = np.abs(keras.ops.convert_to_numpy(plain(x[:64], training=False))
                        - keras.ops.convert_to_numpy(model(x[:64], training=False))).max()
    report = {
        "updates": int(keras.ops.convert_to_numpy(model.controller.updates)),
        "loss_finite": bool(np.isfinite(history.history["loss"]).all()),
        "architecture_decisions": sum(architecture.is_architecture(f)
                                      for f in fliqs_keras.chosen_formats(model).values()),
        "distinct_draws": len(set(draws)),
        "export_max_difference": float(difference),
    }
    (pathlib.Path(output_dir) / f"{MODE}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[2])
