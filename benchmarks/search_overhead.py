"""Training-step time and peak memory of a small ResNet with 1, 2, 4 and 8 format choices per layer.

Single-path search means the number of choices must not cost time or memory:
each step quantizes every layer in ONE format. This runs, side by side in one
invocation, the float model and the searchable model with 1, 2, 4 and 8
choices per layer, each in its own process (so that peak memory is its own),
switching every layer to a random choice before each step. Target: 8 choices
<= 1.05x the time and memory of 1 choice.

It also times the FLIQS search step itself (4 choices, the policy drawing and
learning inside the step) with the quality from held-out accuracy (one extra
inference pass on a held-out slice, 16 examples by default) and from the
training loss (no extra pass), against fixed-format INT8 QAT (the 1-choice
configuration). Target: <= 1.15x the time, <= 1.05x the memory.

--model=resnet18 runs the same comparison on `fliqs_keras.models.resnet18`
(ImageNet stem and 1000 classes from 128x128 up): the size where the
search's fixed costs are small against a step, and the one to run on a GPU
(peak GPU memory is then reported beside the host's RSS).

With KERAS_BACKEND=jax it runs on Keras's JAX backend (no TensorFlow needed),
which is how it runs on a GPU machine that has JAX but no TensorFlow; the
files then end in `_jax`.

Writes `search_overhead[_<model>_<size>].json` and `.png` to --output_dir.

    .venv/bin/python benchmarks/search_overhead.py [--steps=60] [--rounds=3] [--batch_size=64]
    .venv/bin/python benchmarks/search_overhead.py --model=resnet18 --image_size=224 --batch_size=32 \
        --steps=10 --warmup=3 --rounds=1 --configs=search_accuracy,search_loss
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 60, "Timed training steps per configuration.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds over the configurations; each keeps its best.")
flags.DEFINE_integer("warmup", 8, "Untimed steps first (tracing, compilation).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("image_size", 32, "Side of the synthetic square RGB images.")
flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON and PNG go.")
flags.DEFINE_string("worker", "", "Internal: run one configuration and print its JSON.")
flags.DEFINE_list("configs", [], "Configurations to run (default: all); '1' is always included.")
flags.DEFINE_enum("model", "small_resnet", ["small_resnet", "resnet18"], "The model timed.")
flags.DEFINE_integer("held_out_batch_size", 16, "Held-out examples per step for search_accuracy (FliqsSearch's default).")

CHOICES = {
    1: ["int8"],
    2: ["int4", "int8"],
    4: ["int2", "int4", "int8", "e4m3"],
    8: ["int2", "int3", "int4", "int8", "e5m2", "e4m3", "e3m4", "e2m1"],
}
TARGET = 1.05
SEARCH_TARGETS = {"time": 1.15, "memory": 1.05}
CONFIGS = ["float", "1", "2", "4", "8", "search_accuracy", "search_loss"]


def small_resnet(image_size: int):
    """A CIFAR-style ResNet: a stem and three stages of one basic block each."""
    import keras

    def block(x, filters, stride, name):
        shortcut = x
        y = keras.layers.Conv2D(filters, 3, stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
        y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
        y = keras.layers.ReLU()(y)
        y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
        y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = keras.layers.Conv2D(filters, 1, stride, use_bias=False, name=f"{name}_proj")(shortcut)
        return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))

    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="stem_bn")(x))
    for i, (filters, stride) in enumerate([(16, 1), (32, 2), (64, 2)]):
        x = block(x, filters, stride, f"stage{i + 1}")
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name="small_resnet")


def _model():
    if FLAGS.model == "small_resnet":
        return small_resnet(FLAGS.image_size)
    from fliqs_keras import models

    large = FLAGS.image_size >= 128
    return models.resnet18((FLAGS.image_size, FLAGS.image_size, 3), classes=1000 if large else 10,
                           stem="imagenet" if large else "cifar")


def _backend() -> str:
    import keras

    return keras.backend.backend()


def _gpu_peak_mib() -> float | None:
    if _backend() == "jax":
        import jax

        device = jax.devices()[0]
        return device.memory_stats()["peak_bytes_in_use"] / 2**20 if device.platform == "gpu" else None
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def _batches(x, y):
    """The pool's batches, cycled: tf.data on TensorFlow, a generator on JAX (which may have no TensorFlow)."""
    if _backend() == "jax":
        def cycle():
            while True:
                for start in range(0, len(x) - FLAGS.batch_size + 1, FLAGS.batch_size):
                    yield x[start:start + FLAGS.batch_size], y[start:start + FLAGS.batch_size]

        return cycle()
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size, drop_remainder=True).repeat()


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_worker(config: str) -> dict:
    import keras
    import numpy as np

    import fliqs_keras

    keras.utils.set_random_seed(0)
    steps = FLAGS.warmup + FLAGS.steps
    rng = np.random.default_rng(0)
    # A pool of at most 8 batches, cycled: a 224x224 run must not hold every step's inputs.
    pool = min(steps, 8) * FLAGS.batch_size
    x = rng.normal(0, 1, (pool, FLAGS.image_size, FLAGS.image_size, 3)).astype(np.float32)
    y = rng.integers(0, 10, len(x))
    baseline_mib = _rss_mib()
    model = _model()
    switch = None
    if config.startswith("search"):
        model = fliqs_keras.apply(model, CHOICES[4])
        quality = config.split("_")[1]
        switch = fliqs_keras.FliqsSearch(
            target="int4*1.5", quality=quality, warmup=0.1,
            validation_data=(x[:FLAGS.batch_size * 4], y[:FLAGS.batch_size * 4]) if quality == "accuracy" else None,
            held_out_batch_size=FLAGS.held_out_batch_size)
    elif config != "float":
        choices = CHOICES[int(config)]
        model = fliqs_keras.apply(model, choices)
        names = list(fliqs_keras.decisions(model))

        class Switch(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                fliqs_keras.set_formats(model, {n: choices[rng.integers(len(choices))] for n in names})

        switch = Switch()
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # waits for the step: on a GPU its launch returns before it runs
            times.append(time.perf_counter() - self.start)

    callbacks = [c for c in (switch, Timer()) if c is not None]
    model.fit(_batches(x, y), steps_per_epoch=steps, epochs=1, verbose=0, callbacks=callbacks)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "config": config,
        "gpu_peak_mib": _gpu_peak_mib(),
        "step_seconds_median": statistics.median(times[FLAGS.warmup:]),
        "peak_rss_mib": peak_mib,
        "training_increment_mib": peak_mib - baseline_mib,
        "jit_compile": bool(model.jit_compile),
    }


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [r["config"] for r in results["runs"]]
    labels = [c if c == "float" or c.startswith("search") else f"{c} choice{'s' if c != '1' else ''}"
              for c in configs]
    gpu = all(r.get("gpu_peak_mib") for r in results["runs"])
    figure, axes = plt.subplots(1, 3 if gpu else 2, figsize=(15 if gpu else 10, 4))
    axes[0].bar(labels, [r["step_seconds_median"] * 1000 for r in results["runs"]], color="tab:blue")
    axes[0].set_ylabel("median training step (ms)")
    axes[1].bar(labels, [r["training_increment_mib"] for r in results["runs"]], color="tab:orange")
    axes[1].set_ylabel("peak RSS above start (MiB)")
    if gpu:
        axes[2].bar(labels, [r["gpu_peak_mib"] for r in results["runs"]], color="tab:green")
        axes[2].set_ylabel("peak GPU memory (MiB)")
    for axis in axes:
        axis.tick_params(axis="x", labelsize=8)
    figure.suptitle(f"Single-path search overhead: {results['model']}, batch {results['batch_size']}, "
                    f"{results['image_size']}x{results['image_size']}, {results['device']}, "
                    f"{results.get('backend', 'tensorflow')}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _selected() -> list[str]:
    chosen = FLAGS.configs or CONFIGS
    unknown = set(chosen) - set(CONFIGS)
    if unknown:
        raise ValueError(f"Unknown configurations {sorted(unknown)}; known: {CONFIGS}.")
    return [c for c in CONFIGS if c in chosen or c == "1"]


def _device() -> str:
    if _backend() == "jax":
        import jax

        device = jax.devices()[0]
        return device.device_kind if device.platform == "gpu" else f"CPU ({os.cpu_count()} cores)"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return f"CPU ({os.cpu_count()} cores)"


def summarize(all_runs: list[dict]) -> dict:
    """Per configuration the least disturbed time and memory over the interleaved rounds, and the ratios."""
    runs = []
    for config in [c for c in CONFIGS if any(r["config"] == c for r in all_runs)]:
        mine = [r for r in all_runs if r["config"] == config]
        runs.append({"config": config,
                     "step_seconds_median": min(r["step_seconds_median"] for r in mine),
                     "peak_rss_mib": min(r["peak_rss_mib"] for r in mine),
                     "training_increment_mib": min(r["training_increment_mib"] for r in mine),
                     "gpu_peak_mib": None if mine[0].get("gpu_peak_mib") is None else min(
                         r["gpu_peak_mib"] for r in mine),
                     "jit_compile": mine[0]["jit_compile"], "rounds": mine})
    by_config = {r["config"]: r for r in runs}
    one = by_config["1"]
    results = {
        "benchmark": "search_overhead",
        "model": FLAGS.model,
        "backend": _backend(),
        "device": _device(),
        "batch_size": FLAGS.batch_size,
        "image_size": FLAGS.image_size,
        "steps": FLAGS.steps,
        "held_out_batch_size": FLAGS.held_out_batch_size,
        "aggregation": "per configuration, the least of its rounds for time and for memory",
        "rounds": len(runs[0]["rounds"]),
        "runs": runs,
        "ratios": {},
        "target": f"8 choices <= {TARGET}x the time and memory of 1 choice",
    }
    if "8" in by_config:
        eight = by_config["8"]
        results["ratios"].update({
            "time_8_over_1": eight["step_seconds_median"] / one["step_seconds_median"],
            "memory_increment_8_over_1": eight["training_increment_mib"] / one["training_increment_mib"],
            "peak_rss_8_over_1": eight["peak_rss_mib"] / one["peak_rss_mib"],
        })
        results["meets_target"] = (results["ratios"]["time_8_over_1"] <= TARGET
                                   and results["ratios"]["memory_increment_8_over_1"] <= TARGET)
    if "float" in by_config:
        results["ratios"]["time_1_over_float"] = one["step_seconds_median"] / by_config["float"]["step_seconds_median"]
    searches = [name for name in ("search_accuracy", "search_loss") if name in by_config]
    for name in searches:
        run = by_config[name]
        results["ratios"][f"time_{name}_over_int8_qat"] = run["step_seconds_median"] / one["step_seconds_median"]
        results["ratios"][f"memory_increment_{name}_over_int8_qat"] = (
            run["training_increment_mib"] / one["training_increment_mib"])
        if one["gpu_peak_mib"]:
            results["ratios"][f"gpu_memory_{name}_over_int8_qat"] = run["gpu_peak_mib"] / one["gpu_peak_mib"]
    results["search_target"] = (f"search step <= {SEARCH_TARGETS['time']}x the time and "
                                f"{SEARCH_TARGETS['memory']}x the memory of INT8 QAT (config '1')")
    results["search_meets_target"] = {
        name: results["ratios"][f"time_{name}_over_int8_qat"] <= SEARCH_TARGETS["time"]
        and results["ratios"][f"memory_increment_{name}_over_int8_qat"] <= SEARCH_TARGETS["memory"]
        for name in searches}
    return results


def main(argv):
    del argv
    if FLAGS.worker:
        print(json.dumps(run_worker(FLAGS.worker)))
        return
    all_runs = []
    for _ in range(FLAGS.rounds):
        for config in _selected():
            flags_passed = [f"--{name}={getattr(FLAGS, name)}" for name in
                            ("steps", "warmup", "batch_size", "image_size", "held_out_batch_size", "model")]
            output = subprocess.run(
                [sys.executable, __file__, f"--worker={config}", *flags_passed],
                capture_output=True, text=True, check=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    [str(pathlib.Path(__file__).parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])})
            all_runs.append(json.loads(output.stdout.strip().splitlines()[-1]))
            print(all_runs[-1])
    results = summarize(all_runs)
    output_dir = pathlib.Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = "search_overhead" + ("" if FLAGS.model == "small_resnet" else f"_{FLAGS.model}_{FLAGS.image_size}")
    stem += "" if not FLAGS.configs else "_" + "_".join(_selected())
    backend = _backend()
    stem += "" if backend == "tensorflow" else f"_{backend}"
    (output_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    _plot(results, output_dir / f"{stem}.png")
    print(json.dumps(results["ratios"], indent=2), "meets target:", results.get("meets_target"),
          results["search_meets_target"])


if __name__ == "__main__":
    app.run(main)
