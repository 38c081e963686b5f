"""Search the number format of every layer in one training run, then export.

    python examples/search.py                                  # offline MNIST digits, a few minutes on 2 cores
    python examples/search.py --dataset=cifar10 --data_dir=~/tensorflow_datasets --model=resnet18 \\
        --search_space=int4,int8,e4m3 --target=int4*1.1 --epochs=90 --strategy=mirrored
    python examples/search.py --dataset=imagenet2012 --data_dir=gs://... --model=resnet50 \\
        --strategy=tpu --tpu=my-tpu --batch_size=1024

It trains the model with the FLIQS search (`fliqs_keras.FliqsSearch`, Keras
progress bar), re-estimates the batch norms' statistics in the chosen
formats (`fliqs_keras.reestimate_batch_norm`; --bn_reestimation_examples=0
keeps those averaged over the search), trains the references (--references:
float and the uniform formats within the budget, on the same data), prints the
chosen format of every layer with its cost, the cost/accuracy table beside the
references with a one-line verdict, and the export's summary, and writes to
--output_dir:

* ``formats.json``: the chosen formats (`fliqs_keras.export.save_formats_file`);
* ``searched.keras``: the searchable model in its chosen formats (reload it
  for `examples/export.py` or further QAT); ``fixed.keras``: the model with
  the formats frozen into its weights (it loads after ``import fliqs_keras``,
  whose `InputQuantizer` rounds the quantized layers' inputs);
* ``model.tflite``: the mixed-precision TFLite file, verified against Keras;
* ``logs/``: TensorBoard logs (losses, reward, cost ratios, probabilities);
* ``search.png``: each layer's chosen format and how its decision's
  probabilities moved during training; ``results.json``: the numbers.

TFDS datasets are read from a prepared local --data_dir; nothing downloads
unless --download is given.
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
MODELS = ("digits_resnet", "digits_mobilenet", "small_cnn", "resnet18", "resnet50", "mobilenet_v2", "vit")
DATASETS = ("mnist", "digits8", "cifar10", "imagenet2012")
OFFLINE_DATASETS = ("mnist", "digits8")
STRATEGIES = ("default", "mirrored", "tpu")
flags.DEFINE_enum("model", "digits_resnet", MODELS, "Model from fliqs_keras.models.")
flags.DEFINE_enum("dataset", "mnist", DATASETS, "mnist and digits8 ship offline; cifar10 and imagenet2012 "
                  "are TFDS datasets read from --data_dir.")
flags.DEFINE_string("data_dir", None, "Local TFDS data directory (for cifar10 and imagenet2012).")
flags.DEFINE_bool("download", False, "Let TFDS download and prepare a missing dataset.")
flags.DEFINE_integer("image_size", None, "Input side for TFDS datasets (default: the dataset's own).")
flags.DEFINE_string("search_space", "int2,int4,int8,e4m3", "Comma-separated formats every supported layer "
                    "chooses among, or a JSON file of a SearchSpace config.")
flags.DEFINE_enum("cost", "bops", ["bops", "size", "table", "latency"], "Cost metric; latency: milliseconds on "
                  "the LiteRT interpreter here, from a table measured on first use and kept in --output_dir.")
flags.DEFINE_string("cost_table", None, "JSON cost table for --cost=table (or a measured one for --cost=latency).")
flags.DEFINE_integer("threads", 1, "LiteRT interpreter threads the latency table is measured with.", lower_bound=1)
flags.DEFINE_string("target", "int4", "Cost target: a number, a format (its uniform cost) or format*factor.")
flags.DEFINE_float("beta", 1.0, "Weight of the cost term in the reward.")
flags.DEFINE_enum("cost_credit", None, ["sampled", "exact"], "How the policy learns the cost term: "
                  "exactly per decision (the default for the absolute reward) or sampled with the quality "
                  "(REINFORCE, as FLIQS).")
flags.DEFINE_enum("warmup_draws", "uniform", ["uniform", "high_first"], "The warm-up's format draws: uniform "
                  "(as FLIQS) or the widest formats first, narrower ones added part by part.")
flags.DEFINE_float("policy_learning_rate", None, "Controller learning rate (default: set from the number of "
                   "steps, FliqsSearch's default; the paper's value is 5e-3).")
flags.DEFINE_float("entropy_weight", 0.5, "Maximum of the entropy penalty.")
flags.DEFINE_float("freeze_at", 1.0, "Fraction of the steps after which the chosen formats are fixed and "
                   "trained alone (1.0: search to the end).")
flags.DEFINE_float("max_cost_ratio", None, "If set, the kept formats cost at most this times the target: the "
                   "most probable policy within it when the argmax costs more (default: the argmax).")
flags.DEFINE_integer("bn_reestimation_examples", 4096, "Training examples on which the batch norms' moving "
                     "statistics are re-estimated after the search, in the chosen formats (0: keep the "
                     "statistics averaged over the search's steps).")
flags.DEFINE_integer("epochs", 8, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Global batch size.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate of the weights.")
flags.DEFINE_integer("seed", 0, "Seed of the weights, the data order and the format draws.")
flags.DEFINE_integer("max_train_examples", None, "Train on at most this many examples (offline datasets).",
                     lower_bound=1)
flags.DEFINE_string("strategy", "default", "default, mirrored (all local devices) or tpu (with --tpu).")
flags.DEFINE_string("tpu", None, "TPU address or name for --strategy=tpu.")
flags.DEFINE_integer("logical_cpus", 0, "Split the CPU into this many logical devices (to try --strategy="
                     "mirrored without accelerators).")
flags.DEFINE_list("references", None, "Models trained beside the search on the same data, epochs and seed, to "
                  "compare with: 'float' and uniform format names, or 'none'. Default: on the offline datasets, "
                  "float and every format of the search space whose uniform cost is within the target's +10%; "
                  "none on TFDS datasets.")
flags.DEFINE_bool("export_tflite", True, "Write and verify the TFLite file.")
flags.DEFINE_string("output_dir", "output/search", "Where the formats file, models, logs and plot go.")

UNSUPPORTED_STRATEGIES = {
    "multi_worker_mirrored": "MultiWorkerMirroredStrategy is not offered: Keras 3's fit fails under it "
                             "(TF 2.21 / Keras 3.15.1: \"Attempt to convert a value (PerReplica ...)\", see the "
                             "Keras issue \"Does Keras 3 work with tf.distribute.MultiWorkerMirroredStrategy?\")",
    "parameter_server": "ParameterServerStrategy is not supported by Keras 3's fit",
}


def _strategy_key(name: str) -> str:
    """The supported strategy `name` means; UsageError (before TensorFlow loads) for any other."""
    key = name.lower().replace("-", "_").replace("strategy", "").strip("_")
    if key in ("multiworkermirrored", "multi_worker", "multi_worker_mirrored"):
        key = "multi_worker_mirrored"
    if key in UNSUPPORTED_STRATEGIES:
        raise app.UsageError(f"--strategy={name}: {UNSUPPORTED_STRATEGIES[key]}. Supported: {', '.join(STRATEGIES)}.")
    if key not in STRATEGIES:
        raise app.UsageError(f"Unknown --strategy={name!r}; supported: {', '.join(STRATEGIES)}.")
    return key


def _strategy(name: str, tpu: str | None):
    import tensorflow as tf

    key = _strategy_key(name)
    if key == "mirrored":
        return tf.distribute.MirroredStrategy()
    if key == "tpu":
        if not tpu:
            raise app.UsageError("--strategy=tpu needs --tpu (the TPU's name or grpc:// address; 'local' on a TPU VM).")
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def _data():
    """(train, held_out, test, representative inputs, input shape, classes); train is arrays or a dataset."""
    from fliqs_keras import data

    if FLAGS.dataset in ("mnist", "digits8"):
        load = data.mnist_digits if FLAGS.dataset == "mnist" else data.sklearn_digits
        (x, y), test = load(seed=0)
        train, held = data.held_out_split(x, y, fraction=0.125, seed=0)
        if FLAGS.max_train_examples:
            train = (train[0][:FLAGS.max_train_examples], train[1][:FLAGS.max_train_examples])
        return train, held, test, held[0], x.shape[1:], 10
    if not FLAGS.data_dir:
        raise app.UsageError(f"--dataset={FLAGS.dataset} is read from a local TFDS directory: pass --data_dir.")
    spec = data.TFDS_DATASETS[FLAGS.dataset]
    splits = data.tfds_splits()

    def pipeline(split, training):
        return data.tfds_pipeline(FLAGS.dataset, split, FLAGS.data_dir, FLAGS.batch_size, training,
                                  image_size=FLAGS.image_size, download=FLAGS.download, seed=FLAGS.seed)

    import numpy as np

    held = pipeline(splits["held_out"], False)
    representative = np.concatenate([x for x, _ in held.take(max(1, 512 // FLAGS.batch_size)).as_numpy_iterator()])
    size = FLAGS.image_size or spec.image_size
    return (pipeline(splits["train"], True), held, pipeline(spec.test_split, False), representative,
            (size, size, 3), spec.classes)


def _model(input_shape, classes):
    from fliqs_keras import models

    small = input_shape[0] <= 64
    if FLAGS.model in ("resnet18", "resnet50"):
        return getattr(models, FLAGS.model)(input_shape, classes, stem="cifar" if small else "imagenet")
    if FLAGS.model == "mobilenet_v2":
        return models.mobilenet_v2(input_shape, classes, small_input=small)
    if FLAGS.model == "vit":
        patch = 4 if small else 16
        if input_shape[0] % patch:
            raise app.UsageError(f"--model=vit needs an input side divisible by its patch {patch}, got {input_shape}.")
        return models.vit(input_shape, classes, patch=patch)
    return getattr(models, FLAGS.model)(input_shape, classes)


def _search_space():
    if FLAGS.search_space.endswith(".json"):
        return json.loads(pathlib.Path(FLAGS.search_space).read_text())
    return FLAGS.search_space


def _check_flags():
    _strategy_key(FLAGS.strategy)
    if FLAGS.dataset not in ("mnist", "digits8") and not FLAGS.data_dir:
        raise app.UsageError(f"--dataset={FLAGS.dataset} is read from a local TFDS directory: pass --data_dir.")
    from fliqs_keras import files

    try:
        files.destination(pathlib.Path(FLAGS.output_dir) / "results.json")
    except ValueError as error:
        raise app.UsageError(f"--output_dir={FLAGS.output_dir}: {error}") from None


def main(argv):
    del argv
    _check_flags()
    if FLAGS.logical_cpus:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * FLAGS.logical_cpus)
    strategy = _strategy(FLAGS.strategy, FLAGS.tpu)

    import keras

    import fliqs_keras
    from fliqs_keras import cost, export, files, measure, plots
    from fliqs_keras.search import COST_TOLERANCE

    named_references = _named_references()
    keras.utils.set_random_seed(FLAGS.seed)
    train, held, test, representative, input_shape, classes = _data()
    output = pathlib.Path(FLAGS.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with strategy.scope():
        searchable = fliqs_keras.apply(_model(input_shape, classes), _search_space())
        searchable.compile(keras.optimizers.Adam(FLAGS.learning_rate),
                           keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    logging.debug("%s", fliqs_keras.report(searchable))
    table = FLAGS.cost_table
    if FLAGS.cost == "latency" and table is None:
        known = set(output.glob("latency_table_*.json"))
        table = measure.cached_latency(searchable, output, threads=FLAGS.threads)
        print(f"{'Using the latency table measured before' if table in known else 'Measured the latency table'} "
              f"({FLAGS.threads} thread{'s' * (FLAGS.threads > 1)}): {table}", flush=True)
        table = str(table)
    search = fliqs_keras.FliqsSearch(
        cost=FLAGS.cost, target=_number_or_text(FLAGS.target), beta=FLAGS.beta, validation_data=held,
        learning_rate=FLAGS.policy_learning_rate, entropy_weight=FLAGS.entropy_weight,
        freeze_at=FLAGS.freeze_at, max_cost_ratio=FLAGS.max_cost_ratio, cost_credit=FLAGS.cost_credit,
        warmup_draws=FLAGS.warmup_draws, seed=FLAGS.seed,
        cost_table=table, log_dir=str(output / "logs" / "policy"), record_every=10)
    _fit(searchable, train, [search, keras.callbacks.TensorBoard(str(output / "logs"))])
    accuracy_as_trained = _test_accuracy(searchable, test)
    accuracy = _reestimated_accuracy(searchable, train, test, accuracy_as_trained)

    chosen = fliqs_keras.chosen_formats(searchable)
    costs = cost.CostModel(searchable, FLAGS.cost, table)
    sizes = cost.CostModel(searchable, "size")
    budget = search.target * (1 + COST_TOLERANCE)
    references = {}
    for name in _reference_names(named_references, costs, budget):
        print(f"Training the {_label(name)} reference ({FLAGS.epochs} epochs, same data and seed)...", flush=True)
        keras.utils.set_random_seed(FLAGS.seed)
        with strategy.scope():
            model = _model(input_shape, classes)
            if name != "float":
                model = fliqs_keras.apply(model, _uniform_space(searchable, name))
            model.compile(keras.optimizers.Adam(FLAGS.learning_rate),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        _fit(model, train, [], verbose=0)
        references[name] = {"cost": _uniform_cost(costs, name), "weight_bytes": _uniform_cost(sizes, name) / 8,
                            "test_accuracy": _reestimated_accuracy(model, train, test)}
    results = {
        "model": FLAGS.model, "dataset": FLAGS.dataset, "search_space": FLAGS.search_space,
        "cost_metric": FLAGS.cost, "target": FLAGS.target, "target_cost": search.target,
        "cost": costs.cost(chosen), "cost_ratio_to_target": costs.cost(chosen) / search.target,
        "uniform_int8_cost": costs.uniform("int8"), "weight_bytes": cost.size_bits(searchable) / 8,
        "test_accuracy": accuracy, "test_accuracy_before_bn_reestimation": accuracy_as_trained,
        "bn_reestimation_examples": FLAGS.bn_reestimation_examples, "formats": chosen, "epochs": FLAGS.epochs,
        "replicas": strategy.num_replicas_in_sync,
        "unsettled_decisions_nats": search.unsettled,
        "policy_entropy_nats": dict(zip(searchable.decision_names, map(float, keras.ops.convert_to_numpy(
            searchable.controller.entropy())))),
        "policy_learning_rate": search.policy_learning_rate,
        "formats_changed_by_budget": {name: {"argmax": a, "kept": k}
                                      for name, (a, k) in search.budget_changes.items()},
        "references": references,
    }
    results["verdict"] = verdict(results["cost"], accuracy, budget, references)
    export.save_formats_file(searchable, output / "formats.json")
    files.save_model(searchable, output / "searched.keras")
    files.save_model(export.fixed_model(searchable), output / "fixed.keras")
    verification = None
    if FLAGS.export_tflite:
        try:
            verification = export.to_tflite(searchable, output / "model.tflite", representative)
            results["tflite_verified"] = True
        except export.ExportVerificationError as error:
            # The search's results stand; the file is kept for inspection, and the run says so loudly.
            logging.error("%s", error)
            results["tflite_verified"], results["tflite_error"] = False, str(error).splitlines()[0]
        else:
            results["tflite_argmax_agreement"] = verification.argmax_agreement
    plots.search_figure(search.history, chosen, costs, output / "search.png", warmup_steps=search.step.warmup_steps,
                        target=search.target, accuracy=accuracy,
                        references={_label(n): (r["cost"], r["test_accuracy"]) for n, r in references.items()})
    files.write_text(output / "results.json", json.dumps(results, indent=2))

    # The tables are this script's output, so they go to stdout.
    print(cost.summary(searchable))
    print()
    print(f"{'':28}{FLAGS.cost:>14}{'x target':>10}{'x int8':>8}{'weight bytes':>14}{'test acc':>10}")
    rows = [(f"{_label(n)} (trained here)", r) for n, r in references.items()]
    rows.append(("searched formats", {"cost": results["cost"], "weight_bytes": results["weight_bytes"],
                                      "test_accuracy": accuracy}))
    for label, row in rows:
        print(f"{label:28}{row['cost']:>14.4g}{row['cost'] / search.target:>10.3f}"
              f"{row['cost'] / results['uniform_int8_cost']:>8.3f}{row['weight_bytes']:>14,.0f}"
              f"{row['test_accuracy']:>10.4f}")
    print(f"{'target (' + FLAGS.target + ')':28}{search.target:>14.4g}")
    print(f"verdict: {results['verdict']}")
    if verification is not None:
        logging.debug("%s", verification)
        print(verification.summary())
    elif FLAGS.export_tflite:
        print(f"TFLITE NOT VERIFIED: {results['tflite_error']}")
    print(f"wrote {', '.join(sorted(p.name for p in output.iterdir()))} to {output}")


def _fit(model, train, callbacks, verbose="auto"):
    if isinstance(train, tuple):
        model.fit(*train, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, callbacks=callbacks, verbose=verbose)
    else:
        model.fit(train, epochs=FLAGS.epochs, callbacks=callbacks, verbose=verbose)


def _reestimated_accuracy(model, train, test, as_trained: float | None = None) -> float:
    """Test accuracy after the batch norms' re-estimation (--bn_reestimation_examples), the same for every model."""
    import fliqs_keras

    if FLAGS.bn_reestimation_examples > 0 and fliqs_keras.reestimate_batch_norm(
            model, train[0] if isinstance(train, tuple) else train, batch_size=FLAGS.batch_size,
            max_examples=FLAGS.bn_reestimation_examples):
        return _test_accuracy(model, test)
    return _test_accuracy(model, test) if as_trained is None else as_trained


def _test_accuracy(model, test) -> float:
    if isinstance(test, tuple):
        return float(model.evaluate(*test, batch_size=FLAGS.batch_size, verbose=0, return_dict=True)["accuracy"])
    return float(model.evaluate(test, verbose=0, return_dict=True)["accuracy"])


def _uniform_space(searchable, name: str) -> dict[str, str]:
    """`name` for every layer the search quantized, float for the rest: the model `CostModel.uniform` costs."""
    import re

    import fliqs_keras

    return {re.escape(entry.path.split("/")[-1]): name for entry in fliqs_keras.report(searchable).layers
            if entry.status in ("searched", "fixed")}


def _uniform_cost(costs, name: str) -> float:
    """The cost of every searchable layer in `name` ('float': FP32); NaN where a cost table lacks it."""
    try:
        return costs.uniform("fp32" if name == "float" else name)
    except (KeyError, ValueError):
        return float("nan")


def _label(name: str) -> str:
    return "float" if name == "float" else f"uniform {name}"


def _named_references() -> list[str] | None:
    """The references --references names, checked before any training (None: the default ones)."""
    from fliqs_keras import formats

    if FLAGS.references is None:
        return None
    names = [n.strip().lower() for n in FLAGS.references if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name != "float":
            try:
                formats.get(name)
            except ValueError as error:
                raise app.UsageError(f"--references: {error}") from None
    return names


def _reference_names(named: list[str] | None, costs, budget: float) -> list[str]:
    """The references to train: those named, else float and the uniform formats within the budget."""
    if named is not None:
        return named
    if FLAGS.dataset not in OFFLINE_DATASETS:
        return []
    offered = sorted({f.name for choices in costs.decisions.values() for f in choices}, key=costs.uniform)
    return ["float"] + [name for name in offered if costs.uniform(name) <= budget]


def verdict(cost: float, accuracy: float, budget: float, references: dict[str, dict[str, float]]) -> str:
    """One line: the searched formats against the best uniform reference within `budget`, and against float."""
    parts = []
    if cost > budget:
        parts.append(f"over budget: the searched formats cost {cost / budget:.2f}x the budget")
    uniform = {n: r for n, r in references.items() if n != "float" and r["cost"] <= budget}
    if uniform:
        name, best = max(uniform.items(), key=lambda item: (item[1]["test_accuracy"], -item[1]["cost"]))
        gap = 100 * (accuracy - best["test_accuracy"])
        relation = "beat" if gap > 0 else "match" if gap == 0 else "trail"
        parts.append(f"the searched formats {relation} uniform {name}, the most accurate uniform format within "
                     f"the budget, by {abs(gap):.2f} points at {cost / best['cost']:.2f}x its cost")
    elif references:
        parts.append("no uniform reference fits the budget")
    if "float" in references:
        gap = 100 * (references["float"]["test_accuracy"] - accuracy)
        parts.append(f"{abs(gap):.2f} points {'below' if gap >= 0 else 'above'} float")
    if not references:
        parts.append("no references trained (--references)")
    return "; ".join(parts) + "."


def _number_or_text(value: str):
    try:
        return float(value)
    except ValueError:
        return value


if __name__ == "__main__":
    app.run(main)
