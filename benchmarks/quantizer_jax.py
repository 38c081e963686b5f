"""The fake quantizers on the JAX backend: bit-exactness and throughput on any device.

The numerics are written in `keras.ops`, so they run unchanged on JAX; this is
how they are checked on a GPU where no TensorFlow is installed. It checks, on
the default JAX device under `jax.jit`:

* bit-exactness of `fake_quant` at unit scale against the `ml_dtypes` cast, for
  every format `ml_dtypes` has, on all codes, all ties and random values;
* throughput of E4M3 against the native `jnp` cast round trip through
  `float8_e4m3fn`, and of INT8 against a plain `jnp` fake-quant expression
  (round, clip, rescale), in one run.

    KERAS_BACKEND=jax python benchmarks/quantizer_jax.py [--tag=h100]
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import time

os.environ["KERAS_BACKEND"] = "jax"

from absl import app, flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fliqs_keras import formats, quantizers  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("elements", 1 << 24, "Elements of the float32 tensor quantized per call.")
flags.DEFINE_integer("repeats", 50, "Timed calls per case (median reported).")
flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON goes.")
flags.DEFINE_string("tag", "", "Suffix of the output file, e.g. the device.")

EXACT_FORMATS = ["e5m2", "e4m3", "e4m3_ieee", "e3m4", "e2m3", "e3m2", "e2m1", "bf16", "fp16"]
CLIP = 3.0


def _check_values(fmt, rng) -> np.ndarray:
    dtype = fmt.ml_dtype
    codes = np.arange(2 ** (8 * dtype.itemsize), dtype=np.uint16 if dtype.itemsize == 2 else np.uint8)
    values = codes.view(dtype).astype(np.float32)
    values = np.unique(values[np.isfinite(values) & (values >= 0)])
    ties = ((values[1:].astype(np.float64) + values[:-1]) / 2).astype(np.float32)
    spread = np.exp2(rng.uniform(np.log2(fmt.smallest_subnormal) - 2, np.log2(fmt.max_value), 100_000))
    x = np.concatenate([values, ties, spread.astype(np.float32)])
    x = x[x <= fmt.max_value]
    return np.concatenate([x, -x])


def _exactness() -> dict:
    rng = np.random.default_rng(0)
    quantize = jax.jit(lambda x, grid: quantizers.fake_quant(x, grid))
    report = {}
    for name in EXACT_FORMATS:
        fmt = formats.get(name)
        x = _check_values(fmt, rng)
        got = np.asarray(quantize(jnp.asarray(x), jnp.asarray(fmt.grid, jnp.float32)))
        want = x.astype(fmt.ml_dtype).astype(np.float32)
        report[name] = {"values": int(x.size), "mismatches": int((got.view(np.int32) != want.view(np.int32)).sum())}
    return report


def _time(function, x, repeats: int) -> float:
    for _ in range(3):
        function(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _throughput() -> dict:
    x = jnp.asarray(np.random.default_rng(1).normal(0, 1, FLAGS.elements).astype(np.float32))
    e4m3 = jnp.asarray(formats.get("e4m3").grid, jnp.float32)
    int8 = jnp.asarray(formats.get("int8").grid, jnp.float32)
    scale = np.float32(CLIP / 127)
    cases = {
        "e4m3_native_cast": lambda v: v.astype(jnp.float8_e4m3fn).astype(jnp.float32),
        "e4m3_fake_quant": lambda v: quantizers.fake_quant(v, e4m3),
        "int8_native_expression": lambda v: jnp.clip(jnp.round(v / scale), -127, 127) * scale,
        "int8_fake_quant": lambda v: quantizers.fake_quant(v, int8, clip=CLIP),
    }
    seconds = {name: _time(jax.jit(f), x, FLAGS.repeats) for name, f in cases.items()}
    return {
        "seconds": seconds,
        "gelements_per_s": {name: FLAGS.elements / s / 1e9 for name, s in seconds.items()},
        "time_ratio_to_native": {
            "e4m3": seconds["e4m3_fake_quant"] / seconds["e4m3_native_cast"],
            "int8": seconds["int8_fake_quant"] / seconds["int8_native_expression"],
        },
    }


def main(argv):
    del argv
    results = {
        "benchmark": "quantizer_jax",
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "elements": FLAGS.elements,
        "exactness": _exactness(),
        "throughput": _throughput(),
    }
    output_dir = pathlib.Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / ("quantizer_jax" + (f"_{FLAGS.tag}" if FLAGS.tag else "") + ".json")
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
