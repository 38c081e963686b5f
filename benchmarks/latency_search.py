"""A search for latency measured on LiteRT against a search for BOPs, at the same budget.

For MobileNetV2 (keras.applications, alpha 0.5, 96x96) and ResNet-18 (CIFAR
stem, 32x32) on the offline MNIST digits (resized, three channels), each model
trains one epoch in float; then, over weights in INT4, INT8, E4M3 or FP16 with
INT8 inputs:

* the latency table is measured (`measure.measure_latency`, timed);
* uniform INT8 and INT4 (INT8 inputs) train one epoch of QAT and are exported,
  as is the float file;
* per seed, a FLIQS search for BOPs and one for latency, each at --budget of
  its own metric (``int8*1.1``: 1.1 times the uniform INT8 model's BOPs, or
  its table latency), keeping formats within it (``max_cost_ratio=1``), are
  exported;
* the files are timed interleaved with the table's reference file, which gives
  the machine's speed now against the table's (`measure.reference_file`);
* the table's predictions are checked against the whole files of the uniform
  formats, the searched formats and --random_policies random ones.

Per file: measured latency (raw, and at the table's speed), predicted latency,
bytes, held-out accuracy and agreement with its Keras model.

    .venv/bin/python benchmarks/latency_search.py [--models=mobilenet_v2,resnet18] [--seeds=3]

Writes latency_search.json and latency_search.png to --output_dir.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# Run as a script, its folder comes first on the path; the repository's root lets it share deploy.py's helpers.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402

from benchmarks import deploy  # noqa: E402  (its flags: --models, --train_examples, --agreement_inputs, --invokes)

FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 3, "Seeds of each search.")
flags.DEFINE_string("budget", "int8*1.1", "The searches' target, each in its own metric.")
flags.DEFINE_integer("random_policies", 10, "Random policies whose whole files check the table's additivity.")
flags.DEFINE_integer("threads", 1, "LiteRT interpreter threads.")

MODELS = ("mobilenet_v2", "resnet18")
SEARCH_SPACE = {"weights": ["int4", "int8", "e4m3", "fp16"], "activations": ["int8"]}
UNIFORM = {"int8": "int8", "int4": {"weights": ["int4"], "activations": ["int8"]}}
TARGETS = {"additivity": 0.15, "on_target": 0.10, "measure_seconds": 180.0}


def _search(float_model, train, cost: str, table: str | None, seed: int):
    import fliqs_keras

    searchable = fliqs_keras.apply(deploy._copy(float_model), deploy._space(SEARCH_SPACE))
    deploy._compile(searchable, 2e-4)
    config = fliqs_keras.SearchConfig(cost=cost, cost_table=table, target=FLAGS.budget, quality="loss",
                                      warmup=0.2, freeze_at=0.8, max_cost_ratio=1.0, seed=seed)
    searchable.fit(*train, epochs=1, batch_size=32, verbose=0, callbacks=[fliqs_keras.FliqsSearch(config)])
    return searchable


def run_model(name: str, directory: pathlib.Path) -> dict:
    """Measures the table, trains and searches, exports and times one model's files."""
    import keras
    import numpy as np

    import fliqs_keras
    from fliqs_keras import batch_norm, cost, export, measure, runtime

    train, held_out = deploy._data(deploy.SIZES[name])
    keras.utils.set_random_seed(0)
    float_model = deploy._model(name)
    deploy._compile(float_model, 1e-3)
    float_model.fit(*train, epochs=1, batch_size=32, verbose=0)
    batch_norm.reestimate(float_model, train[0], max_examples=deploy.REESTIMATION_EXAMPLES)
    template = fliqs_keras.apply(deploy._copy(float_model), deploy._space(SEARCH_SPACE))
    started = time.perf_counter()
    table = measure.measure_latency(template, threads=FLAGS.threads, progress=False)
    measure_seconds = time.perf_counter() - started
    table_path = directory / f"{name}_latency.json"
    table.save(table_path)
    logging.info("%s: latency table in %.0f s, factors %s", name, measure_seconds, table.context_factors)
    latency_costs = cost.CostModel(template, "latency", table)
    bops_costs = cost.CostModel(template, "bops")

    models = {f"uniform {fmt}": deploy._uniform(float_model, formats, train) for fmt, formats in UNIFORM.items()}
    for seed in range(FLAGS.seeds):
        for metric in ("bops", "latency"):
            started = time.perf_counter()
            models[f"{metric} search seed {seed}"] = _search(float_model, train, metric,
                                                              str(table_path) if metric == "latency" else None, seed)
            logging.info("%s: %s search seed %d in %.0f s", name, metric, seed, time.perf_counter() - started)
    contents, files = {"float": deploy._plain(float_model, "float32", train[0])}, {}
    files["float"] = deploy._predictions(contents["float"], float_model, held_out)
    for label, searchable in models.items():
        path = directory / f"{name}_{label.replace(' ', '_')}.tflite"
        result = export.to_tflite(searchable, path, held_out[0], verify_samples=len(held_out[0]), min_agreement=0.0)
        contents[label] = path.read_bytes()
        # By layer: the uniform models' decisions are named apart from the template's.
        weights = {plan.layer: plan.weight_format for plan in result.layers}
        files[label] = {**deploy._predictions(contents[label], searchable, held_out), "formats": weights,
                        "predicted_ms": table.cost(weights), "bops": cost.bops(searchable)}
    rng = np.random.default_rng(1234)
    choices = fliqs_keras.decisions(template)
    random_policies = [{n: c[int(rng.integers(len(c)))].name for n, c in choices.items()}
                       for _ in range(FLAGS.random_policies)]
    for index, (policy, content) in enumerate(zip(random_policies, measure.whole_files(template, random_policies))):
        contents[f"random {index}"] = content
        files[f"random {index}"] = {"formats": policy, "predicted_ms": latency_costs.cost(policy),
                                    "bops": bops_costs.cost(policy)}
    contents["reference"] = measure.reference_file(template, table)
    timings = runtime.time_files(contents, threads=FLAGS.threads, invokes=FLAGS.invokes)
    reference_ms = table.cost(measure.weight_formats(template, table.reference))
    speed = timings["reference"].median_ms / reference_ms  # > 1: the machine runs slower now than for the table
    for label, content in contents.items():
        if label == "reference":
            continue
        measured = timings[label].median_ms
        files[label].update({"bytes": len(content), "measured_ms": measured, "measured_at_table_speed_ms":
                             measured / speed})
        if "predicted_ms" in files[label]:
            files[label]["prediction_error"] = files[label]["predicted_ms"] / (measured / speed) - 1
    return {"input_size": deploy.SIZES[name], "params": int(float_model.count_params()),
            "measure_seconds": measure_seconds, "speed_now_over_table": speed, "table": table.to_dict(),
            "latency_budget_ms": latency_costs.target(FLAGS.budget), "bops_budget": bops_costs.target(FLAGS.budget),
            "files": files}


def checks(results: dict) -> dict:
    """Each target of docs/benchmarks.md: the measured figure, the bound and whether it holds."""
    found = {}

    def check(key, value, bound, at_most=True):
        found[key] = {"value": round(value, 4), "bound": bound, "met": value <= bound if at_most else value >= bound}

    for model, result in results.items():
        files = result["files"]
        errors = [abs(f["prediction_error"]) for f in files.values() if "prediction_error" in f]
        check(f"{model}: largest additivity error", max(errors), TARGETS["additivity"])
        check(f"{model}: seconds to measure the table", result["measure_seconds"], TARGETS["measure_seconds"])
        budget = result["latency_budget_ms"]
        meeting = [f["accuracy"] for label, f in files.items() if label.startswith(("uniform", "float"))
                   and f["measured_at_table_speed_ms"] <= budget * (1 + TARGETS["on_target"])]
        for label, f in files.items():
            if label.startswith("latency search"):
                check(f"{model}: {label} latency off its target", abs(f["measured_at_table_speed_ms"] / budget - 1),
                      TARGETS["on_target"])
                if meeting:
                    check(f"{model}: {label} accuracy over the best uniform file within the budget",
                          f["accuracy"] - max(meeting), 0.0, at_most=False)
    return found


def plot(results: dict, path: pathlib.Path):
    """Held-out accuracy against measured latency (at the table's speed), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    styles = {"float": ("k", "s"), "uniform int8": ("0.4", "D"), "uniform int4": ("0.4", "v"),
              "bops": ("tab:orange", "o"), "latency": ("tab:blue", "^")}
    for axis, (model, result) in zip(axes[0], results.items()):
        seen = set()
        for label, f in result["files"].items():
            if "accuracy" not in f:
                continue
            kind = label if label.startswith("uniform") else label.split()[0]
            color, marker = styles[kind]
            name = {"bops": "BOPs search", "latency": "latency search"}.get(kind, label)
            axis.scatter(f["measured_at_table_speed_ms"], f["accuracy"], color=color, marker=marker,
                         label=None if name in seen else name)
            seen.add(name)
        axis.axvline(result["latency_budget_ms"], color="tab:blue", linestyle="--", linewidth=0.8,
                     label=f"latency budget ({FLAGS.budget})")
        axis.set_xlabel("measured latency, 1 thread, at the table's speed (ms)")
        axis.set_ylabel("held-out accuracy")
        axis.set_title(model, fontsize=9)
        axis.legend(fontsize=7)
    figure.suptitle("FLIQS searches for BOPs and for LiteRT latency at the same budget", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv):
    del argv
    import fliqs_keras  # noqa: F401  (quiets TensorFlow before Keras starts)

    deploy.run_models(MODELS, run_model, checks, plot, {
        "train_examples": FLAGS.train_examples, "agreement_inputs": FLAGS.agreement_inputs, "invokes": FLAGS.invokes,
        "threads": FLAGS.threads, "seeds": FLAGS.seeds, "budget": FLAGS.budget, "search_space": SEARCH_SPACE,
        "uniform": UNIFORM, "random_policies": FLAGS.random_policies}, "latency_search")


if __name__ == "__main__":
    FLAGS.set_default("models", list(MODELS))
    FLAGS.set_default("output_dir", "benchmarks/results")
    app.run(main)
