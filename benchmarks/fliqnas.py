"""FLIQNAS: the joint architecture and format search against format-only, architecture-only and random policies.

On the offline digits (the 5,000 MNIST digits and scikit-learn's 8x8 digits),
with the searchable MobileNetV2 (`models.searchable_mobilenet_v2`: kernel
{3, 5, 7} and expansion {3, 6} per block, skip of a stage's later blocks,
stage widths {0.5, 0.75, 1.0}; its first --stages stages at --width), and
formats INT4 or INT8 per layer, all at one BOPs budget (--budget times the
BOPs of the plain MobileNetV2 of the family, kernel 3, in uniform INT8):

* joint: one search of the architecture and the formats together;
* formats: a format search of the plain MobileNetV2 (kernel 3, expansion 6, full width);
* architecture: a search of the architecture in float (FP32 weights, float
  inputs; the budget over the QAT format's bits), then the chosen plain model in
  uniform --qat_format, trained from scratch as long again;
* random: random joint policies within 90-100% of the budget, each trained
  from scratch in its formats as long as a search;
* retrained: the joint search's best policy, trained from scratch in its formats.

Every run trains --epochs epochs (of its dataset), per seed, and its batch norms are
re-estimated in its final model before the test (`batch_norm.reestimate`). Also times the joint search step
against the format-only search step on the same largest network (the plain
MobileNetV2 with kernel 7), interleaved.

    .venv/bin/python benchmarks/fliqnas.py [--datasets=mnist,digits8] [--seeds=5] [--epochs=3,8]

Writes fliqnas.json and fliqnas.png to --output_dir.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fliqs_keras  # noqa: E402
from fliqs_keras import architecture, cost, data, files, models  # noqa: E402
from fliqs_keras.export import chosen_architecture, fixed_model  # noqa: E402
from fliqs_keras.models.mobilenet_v2 import BLOCKS  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["mnist", "digits8"], "mnist (5,000 MNIST digits) and/or digits8 (8x8 digits).")
flags.DEFINE_integer("seeds", 5, "Seeds per method.")
flags.DEFINE_list("epochs", ["3", "8"], "Training epochs of every run: one per dataset, or one for all.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("stages", 3, "MobileNetV2 stages in the space (7: the whole network).")
flags.DEFINE_float("width", 0.5, "MobileNetV2 width multiplier.")
flags.DEFINE_float("budget", 0.5, "BOPs budget, times the plain MobileNetV2's (kernel 3) in uniform INT8.")
flags.DEFINE_list("formats", ["int4", "int8"], "Formats each layer chooses from.")
flags.DEFINE_string("qat_format", "int8", "The architecture-only search's uniform QAT format.")
flags.DEFINE_integer("timed_steps", 40, "Training steps timed per round, after 5 untimed ones.")
flags.DEFINE_integer("timing_rounds", 3, "Interleaved timing rounds of the joint and the format-only step.")
flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON and PNG go.")

METHODS = ("joint", "formats", "architecture", "random")
EPOCHS = [0]  # the epochs of the dataset being run


def _dataset(name: str):
    (x, y), test = data.mnist_digits(seed=0) if name == "mnist" else data.sklearn_digits(seed=0)
    (x, y), held = data.held_out_split(x, y, seed=0)
    return (x, y), held, test


def _family(name: str) -> dict:
    shape = (28, 28, 1) if name == "mnist" else (8, 8, 1)
    return dict(input_shape=shape, classes=10, width=FLAGS.width, small_input=name != "mnist",
                stages=BLOCKS[:FLAGS.stages])


def _compiled(model):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _fit(model, train, callbacks=()):
    model.fit(*train, batch_size=FLAGS.batch_size, epochs=EPOCHS[0], verbose=0, callbacks=list(callbacks))


def _accuracy(model, train, test) -> float:
    """Test accuracy after the batch norms are re-estimated in the final model (a search's averaged every draw)."""
    fliqs_keras.reestimate_batch_norm(model, train[0])
    return float(model.evaluate(*test, batch_size=256, verbose=0)[-1])


def _search(model, target, held, seed):
    return fliqs_keras.FliqsSearch(target=target, validation_data=held, seed=seed, max_cost_ratio=1.0)


def _architecture(choices: dict) -> dict:
    """The architecture part of a policy, counted: kernel sizes, expansions, skipped blocks, stage widths."""
    picked = {n: architecture.get(c) for n, c in choices.items() if architecture.is_architecture(c)}
    return {"kernels": [int(c.value) for n, c in picked.items() if c.kind == "kernel"],
            "expansions": [int(c.value) for n, c in picked.items() if c.kind == "expand"],
            "skipped": sorted(n.split("/")[0] for n, c in picked.items() if c.kind == "block" and not c.value),
            "widths": {n.split("/")[0]: c.value for n, c in picked.items() if c.kind == "width"},
            "int4_layers": sum(c == "int4" for c in choices.values())}


def _joint(name, train, held, test, budget, seed):
    keras.utils.set_random_seed(seed)
    model = _compiled(fliqs_keras.apply(models.searchable_mobilenet_v2(**_family(name)), FLAGS.formats))
    _fit(model, train, [_search(model, budget, held, seed)])
    choices = fliqs_keras.chosen_formats(model)
    plain = chosen_architecture(model)
    bops = cost.CostModel(model).cost(choices)
    exported = cost.bops(plain)
    if abs(exported - bops) > 1e-6 * bops:
        raise RuntimeError(f"The exported model costs {exported} BOPs, the searched choices {bops}.")
    return {"accuracy": _accuracy(model, train, test), "bops": bops, "policy": choices, **_architecture(choices)}


def _formats_only(name, train, held, test, budget, seed):
    keras.utils.set_random_seed(seed)
    model = _compiled(fliqs_keras.apply(models.mobilenet_v2(**_family(name)), FLAGS.formats))
    _fit(model, train, [_search(model, budget, held, seed)])
    choices = fliqs_keras.chosen_formats(model)
    return {"accuracy": _accuracy(model, train, test), "bops": cost.bops(model), **_architecture(choices)}


def _architecture_only(name, train, held, test, budget, seed):
    keras.utils.set_random_seed(seed)
    space = fliqs_keras.SearchSpace({"*": {"weights": "fp32", "activations": None}}, separate_activations=True)
    model = _compiled(fliqs_keras.apply(models.searchable_mobilenet_v2(**_family(name)), space))
    # The budget is for the QAT model: the float search's BOPs count 32 x 32 bits per MAC.
    qat_bits = fliqs_keras.formats.get(FLAGS.qat_format).bits
    _fit(model, train, [_search(model, budget * (32 * 32) / (qat_bits * qat_bits), held, seed)])
    float_accuracy = _accuracy(model, train, test)
    choices = fliqs_keras.chosen_formats(model)
    keras.utils.set_random_seed(seed)
    plain = fixed_model(chosen_architecture(model))
    qat = _compiled(fliqs_keras.apply(keras.models.clone_model(plain), FLAGS.qat_format))
    _fit(qat, train)
    return {"accuracy": _accuracy(qat, train, test), "bops": cost.bops(qat), "float_accuracy": float_accuracy,
            **_architecture(choices)}


def _trained_from_scratch(name, train, test, choices, seed):
    keras.utils.set_random_seed(seed)
    model = fliqs_keras.apply(models.searchable_mobilenet_v2(**_family(name)), FLAGS.formats)
    fliqs_keras.set_formats(model, choices)
    plain = _compiled(chosen_architecture(model))
    _fit(plain, train)
    return {"accuracy": _accuracy(plain, train, test), "bops": cost.bops(plain), **_architecture(choices)}


def _random(name, train, held, test, budget, seed):
    model = fliqs_keras.apply(models.searchable_mobilenet_v2(**_family(name)), FLAGS.formats)
    costs, choices = cost.CostModel(model), fliqs_keras.decisions(model)
    rng = np.random.default_rng(seed)
    for draws in range(1, 100_001):
        policy = {n: choices[n][rng.integers(len(choices[n]))].name for n in model.decision_names}
        if 0.9 * budget <= costs.cost(policy) <= budget:
            break
    else:
        raise RuntimeError(f"No random policy within 90-100% of the budget in {draws} draws.")
    return {**_trained_from_scratch(name, train, test, policy, seed), "draws": draws}


class _StepTimer(keras.callbacks.Callback):
    def __init__(self, skip: int):
        super().__init__()
        self.skip, self.times, self._start = skip, [], None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if batch >= self.skip:
            self.times.append(time.perf_counter() - self._start)


def _step_times(name, train, held, budget) -> dict:
    """Median step time of the joint search and of the format-only search on the largest network, interleaved."""
    family = _family(name)
    largest = dict(family, kernel_size=7)
    built = {"joint": _compiled(fliqs_keras.apply(models.searchable_mobilenet_v2(**family), FLAGS.formats)),
             "formats": _compiled(fliqs_keras.apply(models.mobilenet_v2(**largest), FLAGS.formats))}
    steps = 5 + FLAGS.timed_steps
    x, y = train[0][:steps * FLAGS.batch_size], train[1][:steps * FLAGS.batch_size]
    medians = {key: [] for key in built}
    for _ in range(FLAGS.timing_rounds):
        for key, model in built.items():
            timer = _StepTimer(skip=5)
            model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0,
                      callbacks=[_search(model, budget, held, 0), timer])
            medians[key].append(statistics.median(timer.times))
    best = {key: min(values) for key, values in medians.items()}
    return {"seconds": best, "rounds": medians, "ratio": best["joint"] / best["formats"]}


def _summary(runs: list[dict]) -> dict:
    accuracy = [r["accuracy"] for r in runs]
    return {"accuracy_mean": statistics.mean(accuracy),
            "accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
            "bops_mean": statistics.mean(r["bops"] for r in runs)}


def _plot(results: dict, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    colors = {"joint": "tab:red", "formats": "tab:blue", "architecture": "tab:green", "random": "tab:gray",
              "retrained": "black"}
    for axis, (name, result) in zip(axes[0], results.items()):
        for method in METHODS + ("retrained",):
            runs = result["runs"][method] if method != "retrained" else [result["retrained"]]
            bops = [r["bops"] / 1e6 for r in runs]
            accuracy = [100 * r["accuracy"] for r in runs]
            axis.scatter(bops, accuracy, color=colors[method], alpha=0.6, label=method,
                         marker="*" if method == "retrained" else "o", s=80 if method == "retrained" else 30)
            if method != "retrained":
                summary = result["summary"][method]
                axis.errorbar(summary["bops_mean"] / 1e6, 100 * summary["accuracy_mean"],
                              yerr=100 * summary["accuracy_std"], color=colors[method], capsize=4, marker="s")
        axis.axvline(result["budget"] / 1e6, color="k", linestyle=":", linewidth=1)
        axis.set_title(f"{name}: step time joint / format-only {result['step_time']['ratio']:.2f}x")
        axis.set_xlabel("MBOPs (dotted: the budget)")
        axis.set_ylabel("test accuracy (%)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    with files.replacing(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def main(argv):
    del argv
    output = pathlib.Path(FLAGS.output_dir)
    if len(FLAGS.epochs) not in (1, len(FLAGS.datasets)):
        raise app.UsageError(f"--epochs needs one value or one per dataset, got {FLAGS.epochs}.")
    epochs = [int(e) for e in FLAGS.epochs] * (len(FLAGS.datasets) if len(FLAGS.epochs) == 1 else 1)
    settings = {flag: FLAGS[flag].value for flag in ("datasets", "seeds", "batch_size", "stages", "width",
                                                     "budget", "formats", "qat_format", "timed_steps")}
    results = {}
    for name, count in zip(FLAGS.datasets, epochs):
        EPOCHS[0] = count
        train, held, test = _dataset(name)
        plain = fliqs_keras.apply(models.mobilenet_v2(**_family(name)), FLAGS.formats)
        budget = cost.bops(plain, "int8") * FLAGS.budget
        started = time.time()
        runs = {method: [] for method in METHODS}
        for seed in range(FLAGS.seeds):
            for method, run in (("joint", _joint), ("formats", _formats_only), ("architecture", _architecture_only),
                                ("random", _random)):
                began = time.time()
                runs[method].append({"seed": seed, **run(name, train, held, test, budget, seed),
                                     "seconds": time.time() - began})
                logging.info("%s %s seed %d: accuracy %.4f, %.4g BOPs (%.3f of the budget)", name, method, seed,
                             runs[method][-1]["accuracy"], runs[method][-1]["bops"],
                             runs[method][-1]["bops"] / budget)
        best = max(runs["joint"], key=lambda r: r["accuracy"])
        retrained = {"seed": best["seed"], **_trained_from_scratch(name, train, test, best["policy"], best["seed"])}
        results[name] = {
            "budget": budget, "space": _family(name), "runs": runs, "retrained": retrained,
            "summary": {method: _summary(r) for method, r in runs.items()},
            "step_time": _step_times(name, train, held, budget), "epochs": EPOCHS[0],
            "minutes": (time.time() - started) / 60,
        }
        logging.info("%s: %s", name, json.dumps(results[name]["summary"]))
        # Written after each dataset: a long run keeps what it finished.
        files.write_text(output / "fliqnas.json", json.dumps({"settings": settings, "results": results},
                                                             indent=1, default=str))
        _plot(results, output / "fliqnas.png")


if __name__ == "__main__":
    app.run(main)
