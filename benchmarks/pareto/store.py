"""The resume store: every finished run of a dataset, one JSON line each, so a stopped study goes on."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from absl import logging

from benchmarks.pareto.methods import METHODS
from benchmarks.pareto.training import Context


class MissingRun(LookupError):
    """A replot found no stored run for a key: the results JSON lacks a run its study asks for."""


class Runs:
    """The finished runs of one dataset, in a JSON-lines resume file (or, for a replot, only in memory).

    Args:
        path: the resume file; None keeps the runs in memory.
        stored: runs (`stored_runs`) that start the resume file when there is none.
        frozen: never train: a key with no stored run raises `MissingRun`.
    """

    def __init__(self, path: pathlib.Path | None, stored: list[dict] | None = None, frozen: bool = False):
        self.path, self.frozen = path, frozen
        if path is not None and not path.exists() and stored is not None:
            path.write_text("".join(json.dumps(row) + "\n" for row in stored))
            logging.info("%s: started from %d runs stored in the results JSON.", path, len(stored))
        if path is not None and path.exists():
            self.rows = [json.loads(line) for line in path.read_text().splitlines()]
        else:
            self.rows = list(stored or [])

    def get(self, key: str) -> dict[str, Any] | None:
        for row in self.rows:
            if row["key"] == key:
                return row
        return None

    def run(self, key: str, method: str, context: Context, seed: int, spec: dict[str, Any],
            require=()) -> dict[str, Any]:
        """The stored row of `key`, else a new run of `method`; a stored row that lacks a field of `require`
        is run again (its accuracy kept as ``accuracy_when_first_run``: the runs are deterministic)."""
        row = self.get(key)
        if row is not None and all(field in row for field in require):
            return row
        if self.frozen:
            raise MissingRun(f"No stored run {key!r} with fields {list(require)}: a replot does not train.")
        start = time.time()
        new = {"key": key, **METHODS[method](context, seed, spec), "seconds": round(time.time() - start, 1)}
        if row is None:
            self.rows.append(new)
            if self.path is not None:
                with self.path.open("a") as stream:
                    stream.write(json.dumps(new) + "\n")
        else:
            new["accuracy_when_first_run"] = row["accuracy"]
            self.rows[self.rows.index(row)] = new
            if self.path is not None:
                self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        logging.info("%s: %.4f at %.4g BOPs (%.0f s)", key, new["accuracy"], new.get("bops", float("nan")),
                     new["seconds"])
        return new


def stored_runs(payload: dict[str, Any], dataset: str) -> list[dict[str, Any]]:
    """The runs of `dataset` in a results JSON, each once, in the order the JSON lists them."""
    rows = {}
    for result in (r for r in payload["results"] if r["dataset"] == dataset):
        for groups in (result["runs"], result.get("more_seed_runs", {})):
            for group_rows in groups.values():
                for row in group_rows:
                    rows.setdefault(row["key"], row)
    return list(rows.values())
