"""Export a saved searchable model: the formats file, the fixed `.keras` model and a verified TFLite file.

    python examples/export.py --model=searched.keras --representative_data=inputs.npy --output=out/
    python examples/export.py --model=searched.keras --formats_file=formats.json ...   # other formats

--model is a `.keras` file of a model made by `fliqs_keras.apply` (saved
after its search or QAT). --formats_file, when given, sets its formats first (the
file is checked against the model). --representative_data is a `.npy` array
of model inputs: it calibrates the tensors the search did not quantize and
feeds the verification. Writes model.tflite, formats.json and fixed.keras to
--output, and prints the verification and the legalization report.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fliqs_keras  # noqa: E402
from fliqs_keras import export  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A .keras file of a searchable model.", required=True)
flags.DEFINE_string("formats_file", None, "A formats file (JSON) to apply before export (default: the model's formats).")
flags.DEFINE_string("representative_data", None, "A .npy file of model inputs.", required=True)
flags.DEFINE_string("output", None, "Directory for model.tflite, formats.json and fixed.keras.", required=True)
flags.DEFINE_float("min_agreement", 0.95, "Least TFLite/Keras argmax agreement accepted.")
flags.DEFINE_integer("verify_samples", 500, "Inputs the verification runs.")


def main(argv):
    del argv
    model = keras.saving.load_model(FLAGS.model)
    if not isinstance(model, fliqs_keras.SearchModel):
        raise app.UsageError(f"--model={FLAGS.model} is not a model made by fliqs_keras.apply.")
    if FLAGS.formats_file:
        chosen = export.load_formats_file(FLAGS.formats_file)
        export.check_matches(chosen, model, FLAGS.formats_file)
        fliqs_keras.set_formats(model, chosen["decisions"])
    inputs = np.load(FLAGS.representative_data)
    output = pathlib.Path(FLAGS.output)
    output.mkdir(parents=True, exist_ok=True)
    export.save_formats_file(model, output / "formats.json")
    export.fixed_model(model).save(output / "fixed.keras")
    result = export.to_tflite(model, output / "model.tflite", inputs, verify_samples=FLAGS.verify_samples,
                              min_agreement=FLAGS.min_agreement)
    # The report is this script's output, so it goes to stdout.
    print(fliqs_keras.cost.summary(model))
    print(result)
    print(f"wrote {output / 'model.tflite'}, {output / 'formats.json'} and {output / 'fixed.keras'}")


if __name__ == "__main__":
    app.run(main)
