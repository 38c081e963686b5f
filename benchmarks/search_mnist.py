"""FLIQS search against uniform INT4 QAT on the 5,000 real MNIST digits.

For each seed, the same small CNN from the same initial weights is trained
for the same epochs twice: once with the FLIQS search (choices int2, int4,
int8; target: the BOPs of uniform INT4), once as uniform INT4 QAT. Reports
the searched policy, its BOPs relative to the target, the final policy entropy
per decision, and the test accuracy of both; writes `search_mnist.json` and a
PNG (accuracy against BOPs).

    .venv/bin/python benchmarks/search_mnist.py [--seeds=0,1,2] [--epochs=8]
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fliqs_keras  # noqa: E402
from fliqs_keras import cost, data, files, models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (initial weights, data order, format draws).")
flags.DEFINE_integer("epochs", 8, "Training epochs of every run.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("beta", 1.0, "Weight of the cost term in the reward.")
flags.DEFINE_float("policy_learning_rate", 0.05, "Learning rate of the controller.")
flags.DEFINE_float("entropy_weight", 1.0, "Maximum of the entropy penalty.")
flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON and PNG go.")

CHOICES = ["int2", "int4", "int8"]


def _compile(model):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])


def run_seed(seed: int, splits) -> dict:
    (x_train, y_train), (x_held, y_held), (x_test, y_test) = splits
    keras.utils.set_random_seed(seed)
    base = models.small_cnn()

    searched = fliqs_keras.apply(base, CHOICES)
    _compile(searched)
    search = fliqs_keras.FliqsSearch(target="int4", beta=FLAGS.beta, validation_data=(x_held, y_held),
                                     learning_rate=FLAGS.policy_learning_rate,
                                     entropy_weight=FLAGS.entropy_weight, seed=seed)
    keras.utils.set_random_seed(seed)
    searched.fit(x_train, y_train, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, verbose=0,
                 callbacks=[search])

    uniform = fliqs_keras.apply(base, "int4")
    _compile(uniform)
    keras.utils.set_random_seed(seed)
    uniform.fit(x_train, y_train, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, verbose=0)

    target = cost.bops(searched, "int4")
    entropy = keras.ops.convert_to_numpy(searched.controller.entropy())
    return {
        "seed": seed,
        "policy": fliqs_keras.chosen_formats(searched),
        "bops_ratio_to_target": cost.bops(searched) / target,
        "final_entropy_nats": {name: float(h) for name, h in zip(searched.decision_names, entropy)},
        "fliqs_test_accuracy": float(searched.evaluate(x_test, y_test, verbose=0)[1]),
        "int4_qat_test_accuracy": float(uniform.evaluate(x_test, y_test, verbose=0)[1]),
        "int4_bops": target,
        "fliqs_bops": cost.bops(searched),
    }


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for run in results["runs"]:
        axis.scatter(run["fliqs_bops"] / 1e6, run["fliqs_test_accuracy"] * 100, color="tab:red",
                     label="FLIQS (int2/int4/int8)" if run is results["runs"][0] else None)
        axis.scatter(run["int4_bops"] / 1e6, run["int4_qat_test_accuracy"] * 100, color="tab:blue",
                     marker="s", label="uniform INT4 QAT" if run is results["runs"][0] else None)
    axis.set_xlabel("MBOPs")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"MNIST digits, small CNN, {results['epochs']} epochs, seeds {results['seeds']}", fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv):
    del argv
    (x_train, y_train), (x_test, y_test) = data.mnist_digits(seed=0)
    held = len(x_train) // 8  # held out of the training split for the controller's quality signal
    splits = ((x_train[held:], y_train[held:]), (x_train[:held], y_train[:held]), (x_test, y_test))
    runs = [run_seed(int(seed), splits) for seed in FLAGS.seeds]
    for run in runs:
        print(run)
    fliqs = [r["fliqs_test_accuracy"] for r in runs]
    int4 = [r["int4_qat_test_accuracy"] for r in runs]
    results = {
        "benchmark": "search_mnist",
        "seeds": [int(s) for s in FLAGS.seeds],
        "epochs": FLAGS.epochs,
        "choices": CHOICES,
        "target": "bops of uniform int4",
        "runs": runs,
        "fliqs_mean_accuracy": statistics.mean(fliqs),
        "int4_qat_mean_accuracy": statistics.mean(int4),
        "bops_within_10_percent": all(abs(r["bops_ratio_to_target"] - 1) <= 0.1 for r in runs),
        "max_final_entropy_nats": max(max(r["final_entropy_nats"].values()) for r in runs),
        "fliqs_not_below_int4": statistics.mean(fliqs) >= statistics.mean(int4),
    }
    output_dir = pathlib.Path(FLAGS.output_dir)
    files.write_text(output_dir / "search_mnist.json", json.dumps(results, indent=2))
    _plot(results, output_dir / "search_mnist.png")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    app.run(main)
