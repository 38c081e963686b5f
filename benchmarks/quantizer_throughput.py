"""Throughput of the fake quantizers against TensorFlow's native ops, side by side.

* FP8 E4M3: `fake_quant(x, "e4m3")` against the `tf.cast` round trip through
  `float8_e4m3fn` (both at unit scale; the cast is TensorFlow's own rounding).
* INT8: `fake_quant(x, "int8", clip)` against
  `tf.quantization.fake_quant_with_min_max_vars(x, -clip, clip, 8, narrow_range=True)`.
* The same two with the format given as a grid tensor read from a variable:
  the switchable form a searchable layer uses inside a training step.

Each is timed as a `tf.function` graph and under XLA (`jit_compile=True`, the
way Keras compiles a training step), on the same tensor in one run, median of
`--repeats` calls. Writes JSON (elements per second, ratios to the native op,
and whether the 2x target holds) and a PNG bar plot.

    .venv/bin/python benchmarks/quantizer_throughput.py [--elements=4194304] [--tag=cpu]
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from fliqs_keras import quantizers  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("elements", 1 << 22, "Elements of the float32 tensor quantized per call.")
flags.DEFINE_integer("repeats", 30, "Timed calls per case (median reported).")
flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON and PNG go.")
flags.DEFINE_string("tag", "", "Suffix of the output files, e.g. the device ('gpu').")

TARGET_RATIO = 2.0
CLIP = 3.0


def _cases():
    """name -> (python function, native reference name or None)."""
    table = quantizers.grid_table(["int4", "e4m3", "int8"])
    e4m3_index = tf.Variable(1)
    int8_index = tf.Variable(2)
    fp8 = tf.dtypes.experimental.float8_e4m3fn
    return {
        "e4m3_native_cast": (lambda x: tf.cast(tf.cast(x, fp8), tf.float32), None),
        "e4m3_fake_quant": (lambda x: quantizers.fake_quant(x, "e4m3"), "e4m3_native_cast"),
        "e4m3_fake_quant_switchable": (
            lambda x: quantizers.fake_quant(x, tf.gather(table, e4m3_index)),
            "e4m3_native_cast",
        ),
        "int8_native_fake_quant": (
            lambda x: tf.quantization.fake_quant_with_min_max_vars(
                x, -CLIP, CLIP, num_bits=8, narrow_range=True
            ),
            None,
        ),
        "int8_fake_quant": (lambda x: quantizers.fake_quant(x, "int8", clip=CLIP), "int8_native_fake_quant"),
        "int8_fake_quant_switchable": (
            lambda x: quantizers.fake_quant(x, tf.gather(table, int8_index), clip=CLIP),
            "int8_native_fake_quant",
        ),
    }


def _time(function, x, repeats: int) -> float:
    for _ in range(3):
        function(x)
    tf.test.experimental.sync_devices()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(x)
        tf.test.experimental.sync_devices()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _plot(results: dict, path: pathlib.Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["cases"])
    modes = ["graph", "xla"]
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.4
    for offset, mode in enumerate(modes):
        values = [results["cases"][name][mode]["gelements_per_s"] for name in names]
        bars = axis.bar(np.arange(len(names)) + (offset - 0.5) * width, values, width, label=mode)
        axis.bar_label(bars, fmt="%.2f", fontsize=7)
    axis.set_xticks(np.arange(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=8)
    axis.set_ylabel("G elements / s")
    axis.set_title(title, fontsize=10)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv):
    del argv
    x = tf.constant(np.random.default_rng(0).normal(0, 1, FLAGS.elements).astype(np.float32))
    results = {
        "benchmark": "quantizer_throughput",
        "elements": FLAGS.elements,
        "repeats": FLAGS.repeats,
        "tensorflow": tf.__version__,
        "device": (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))[0].name,
        "host": platform.processor() or platform.machine(),
        "target": f"fake_quant time <= {TARGET_RATIO}x the native op's",
        "cases": {},
    }
    cases = _cases()
    for name, (function, _) in cases.items():
        results["cases"][name] = {}
        for mode, jit in (("graph", False), ("xla", True)):
            seconds = _time(tf.function(function, jit_compile=jit), x, FLAGS.repeats)
            results["cases"][name][mode] = {
                "seconds": seconds,
                "gelements_per_s": FLAGS.elements / seconds / 1e9,
            }
    summary = []
    for name, (_, native) in cases.items():
        if native is None:
            continue
        for mode in ("graph", "xla"):
            ratio = results["cases"][name][mode]["seconds"] / results["cases"][native][mode]["seconds"]
            results["cases"][name][mode]["time_ratio_to_native"] = ratio
            summary.append({"case": name, "mode": mode, "time_ratio_to_native": ratio,
                            "meets_target": ratio <= TARGET_RATIO})
    results["summary"] = summary

    output_dir = pathlib.Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = "quantizer_throughput" + (f"_{FLAGS.tag}" if FLAGS.tag else "")
    (output_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    _plot(results, output_dir / f"{stem}.png",
          f"Fake quantizer throughput, {FLAGS.elements:,} float32 elements, {results['device']}")
    for row in summary:
        print(f"{row['case']:<28}{row['mode']:<6} time / native = {row['time_ratio_to_native']:.2f}"
              f"  {'ok' if row['meets_target'] else 'ABOVE TARGET'}")
    print(f"wrote {output_dir / stem}.json and .png")


if __name__ == "__main__":
    app.run(main)
