"""Do the library's defaults settle a short search on its target? The README's snippet and the main job.

For each seed: the README's search snippet (`digits_resnet`, INT2/INT4/INT8,
target the BOPs of uniform INT4, `fit`'s batch of 32, 8 epochs, every
`FliqsSearch` option at its default) in this process, and the main job
(`examples/search.py`, its defaults, no TFLite) in a process of its own.
Records each decision's final policy entropy, the chosen formats' cost over
the target, the policy learning rate the default chose and the test accuracy;
writes `defaults.json` and `defaults.png`.

    .venv/bin/python benchmarks/defaults.py [--seeds=0,1,2] [--replot]
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags  # noqa: E402

import keras  # noqa: E402

import fliqs_keras  # noqa: E402
from fliqs_keras import data, files, models  # noqa: E402
from fliqs_keras.search import COST_TOLERANCE, SETTLED_NATS  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (initial weights, data order, format draws).")
flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON and PNG go.")
flags.DEFINE_bool("replot", False, "Only redraw the PNG from the stored JSON.")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_snippet(seed: int) -> dict:
    (x, y), (x_test, y_test) = data.mnist_digits(seed=0)
    (x_train, y_train), held_out = data.held_out_split(x, y, fraction=0.125, seed=0)
    keras.utils.set_random_seed(seed)
    searchable = fliqs_keras.apply(models.digits_resnet(), ["int2", "int4", "int8"])
    searchable.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])
    search = fliqs_keras.FliqsSearch(cost="bops", target="int4", validation_data=held_out, seed=seed)
    searchable.fit(x_train, y_train, epochs=8, verbose=0, callbacks=[search])
    entropy = keras.ops.convert_to_numpy(searchable.controller.entropy())
    return {"run": "readme_snippet", "seed": seed, "cost_ratio": search.final_cost_ratio,
            "entropy_nats": dict(zip(searchable.decision_names, map(float, entropy))),
            "policy_learning_rate": search.policy_learning_rate, "policy": fliqs_keras.chosen_formats(searchable),
            "test_accuracy": float(searchable.evaluate(x_test, y_test, verbose=0)[1])}


def main_job(seed: int) -> dict:
    with tempfile.TemporaryDirectory() as output:
        subprocess.run([sys.executable, str(ROOT / "examples" / "search.py"), f"--seed={seed}", "--noexport_tflite",
                        f"--output_dir={output}"], check=True, capture_output=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        results = json.loads((pathlib.Path(output) / "results.json").read_text())
    return {"run": "main_job", "seed": seed, "cost_ratio": results["cost_ratio_to_target"],
            "entropy_nats": results["policy_entropy_nats"], "policy_learning_rate": results["policy_learning_rate"],
            "policy": results["formats"], "test_accuracy": results["test_accuracy"]}


def _plot(runs: list[dict], path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    labels = [f"{r['run'].replace('_', ' ')}\nseed {r['seed']}" for r in runs]
    for row, run in enumerate(runs):
        values = list(run["entropy_nats"].values())
        left.scatter(values, [row] * len(values), color="tab:blue", s=14)
    left.axvline(SETTLED_NATS, color="tab:red", linestyle="--", label="settled below")
    left.set_xscale("log")
    left.set_yticks(range(len(runs)), labels, fontsize=7)
    left.set_xlabel("final policy entropy per decision (nats)")
    left.legend(fontsize=7)
    right.axvspan(1 - COST_TOLERANCE, 1 + COST_TOLERANCE, color="0.88", label="target ±10%",
                  zorder=0)
    right.scatter([r["cost_ratio"] for r in runs], range(len(runs)), color="tab:green", zorder=2)
    right.set_xlim(0.7, 1.3)
    right.set_ylim(left.get_ylim())
    right.set_yticks(range(len(runs)), [])
    right.set_xlabel("cost of the chosen formats / target")
    right.legend(fontsize=7)
    figure.suptitle("FliqsSearch defaults on the 5,000 MNIST digits, 8 epochs", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv):
    del argv
    output = pathlib.Path(FLAGS.output_dir)
    if FLAGS.replot:
        _plot(json.loads((output / "defaults.json").read_text())["runs"], output / "defaults.png")
        return
    runs = []
    for seed in map(int, FLAGS.seeds):
        for run in (readme_snippet, main_job):
            runs.append(run(seed))
            print(json.dumps(runs[-1]))
    results = {
        "benchmark": "defaults", "seeds": [int(s) for s in FLAGS.seeds], "runs": runs,
        "all_settled": all(max(r["entropy_nats"].values()) < SETTLED_NATS for r in runs),
        "all_within_10_percent": all(abs(r["cost_ratio"] - 1) <= COST_TOLERANCE for r in runs),
        "max_entropy_nats": max(max(r["entropy_nats"].values()) for r in runs),
        "cost_ratios": [r["cost_ratio"] for r in runs],
    }
    files.write_text(output / "defaults.json", json.dumps(results, indent=2))
    _plot(runs, output / "defaults.png")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    app.run(main)
