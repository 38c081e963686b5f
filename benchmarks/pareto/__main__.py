"""Runs (or replots) a Pareto study: ``python -m benchmarks.pareto --study=benchmarks/studies/pareto.json``.

Writes ``<name>.json``, ``<name>.png`` and ``<name>.md`` to --output_dir.
Each finished run is appended to a resume file, so a stopped study goes on;
--resume_from_results starts the resume files from the results JSON (a
fresh clone has none), and --replot derives everything from that JSON
without training.
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags  # noqa: E402

from benchmarks.pareto import plots, report, results, study as study_lib  # noqa: E402
from benchmarks.pareto.store import Runs, stored_runs  # noqa: E402
from benchmarks.pareto.study import SPACES, TARGETS  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("study", "benchmarks/studies/pareto.json", "The study's JSON file (benchmarks/studies/).")
flags.DEFINE_string("output_dir", "benchmarks/results", "Where the JSON, PNG, Markdown and resume files go.")
flags.DEFINE_bool("resume_from_results", False, "Start missing resume files from the runs in the results JSON.")
flags.DEFINE_bool("replot", False, "Derive the JSON, PNG and Markdown from the results JSON alone; never train.")


def payload_of(study: study_lib.Study, dataset_results: list[dict]) -> dict:
    return {"benchmark": "pareto", "study": study.name, "model": f"fliqs_keras.models.{study.model}",
            "width": study.width, "seeds": list(study.seeds), "batch_size": study.batch_size,
            "spaces": SPACES, "targets": TARGETS, "results": dataset_results}


def write(study: study_lib.Study, payload: dict, output_dir: pathlib.Path):
    """The JSON, the PNG and the Markdown page of a study."""
    from fliqs_keras import files

    files.write_text(output_dir / f"{study.name}.json", json.dumps(payload, indent=2))
    plots.plot(payload["results"], output_dir / f"{study.name}.png", study.model_label)
    command = f"python -m benchmarks.pareto --study=benchmarks/studies/{study.name}.json"
    files.write_text(output_dir / f"{study.name}.md", report.markdown(payload, command))


def main(argv):
    del argv
    study = study_lib.load(FLAGS.study)
    output_dir = pathlib.Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / f"{study.name}.json"
    stored = None
    if FLAGS.replot or FLAGS.resume_from_results:
        if not results_path.exists():
            raise app.UsageError(f"--replot and --resume_from_results read {results_path}, which does not exist.")
        stored = json.loads(results_path.read_text())
    if FLAGS.replot:
        dataset_results = [results.replot(study, r) for r in stored["results"]]
    else:
        from benchmarks.pareto.grid import Grid

        dataset_results = []
        for dataset in study.datasets:
            runs = Runs(output_dir / f".{study.name}_{dataset}_runs.jsonl",
                        None if stored is None else stored_runs(stored, dataset))
            dataset_results.append(Grid(study, dataset, runs).run())
        if stored is not None:
            # The JSON is the store: a dataset not run this time keeps its results, in its place.
            fresh = {r["dataset"]: r for r in dataset_results}
            dataset_results = [fresh.pop(r["dataset"], r) for r in stored["results"]] + list(fresh.values())
    write(study, payload_of(study, dataset_results), output_dir)


if __name__ == "__main__":
    app.run(main)
