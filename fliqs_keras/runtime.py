"""The LiteRT runtime on this machine: what it is, and how long a file takes to run on it.

`provenance` names the runtime, its version, the threads, the delegate and
the CPU, so that a measured cost says where it holds. `time_files` invokes
several files in turn, each round in a rotated order, so that a drift of the
machine's speed falls on all of them alike; each timed invoke follows an
untimed one of the same file, so that it finds the file's weights in the
caches, as a deployed model that runs alone does.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping

import numpy as np

RUNTIME = "ai-edge-litert"
DELEGATE = "XNNPACK (the interpreter's default)"
# The provenance entries that must agree for a measured time to hold; the date does not change one.
COMPARED = ("runtime", "version", "threads", "delegate", "cpu")
WARMUP_SECONDS = 0.05


@dataclasses.dataclass(frozen=True)
class Timing:
    """The invoke times of one file, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    invokes: int


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), and its core count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def provenance(threads: int) -> dict[str, Any]:
    """Where a cost measured now with `threads` interpreter threads holds."""
    return {"runtime": RUNTIME, "version": importlib.metadata.version(RUNTIME), "threads": int(threads),
            "delegate": DELEGATE, "cpu": cpu_model(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _interpreter(content: bytes, threads: int, rng: np.random.Generator):
    from ai_edge_litert import interpreter

    from fliqs_keras.quiet import quiet

    with quiet():  # the interpreter announces its delegate on stderr
        runner = interpreter.Interpreter(model_content=content, num_threads=threads)
        runner.allocate_tensors()
    for detail in runner.get_input_details():
        dtype = np.dtype(detail["dtype"])
        values = rng.normal(size=detail["shape"])
        runner.set_tensor(detail["index"], values.astype(dtype) if dtype.kind == "f" else
                          np.clip(np.round(values * 16), np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype))
    return runner


def time_files(contents: Mapping[str, bytes], *, threads: int = 1, invokes: int = 50, warmup: int = 5,
               seed: int = 0, on_round: Callable[[], None] | None = None) -> dict[str, Timing]:
    """The invoke time of each TFLite file, on random inputs of its input shapes.

    Args:
        contents: ``{name: file bytes}``.
        threads: the interpreter's threads.
        invokes: timed invokes of each file; each round invokes every file
            twice, times the second, and starts one file later than the
            round before.
        warmup: untimed invokes of each file first (for at least
            `WARMUP_SECONDS`).
        seed: of the inputs.
        on_round: called after every round (a progress bar's update).

    Returns:
        ``{name: Timing}``.

    Raises:
        ValueError: for `invokes` < 3 (no quartiles) or `threads` < 1.
    """
    if invokes < 3 or threads < 1:
        raise ValueError(f"time_files needs invokes >= 3 and threads >= 1, got {invokes} and {threads}.")
    rng = np.random.default_rng(seed)
    runners = {name: _interpreter(content, threads, rng) for name, content in contents.items()}
    for runner in runners.values():
        # Whichever is longer: the first invokes of a file, and of a process, run slower for a while.
        start, count = time.perf_counter(), 0
        while count < warmup or time.perf_counter() - start < WARMUP_SECONDS:
            runner.invoke()
            count += 1
    names = list(runners)
    samples = {name: [] for name in names}
    for round_index in range(invokes):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runners[name].invoke()
            start = time.perf_counter()
            runners[name].invoke()
            samples[name].append((time.perf_counter() - start) * 1e3)
        if on_round is not None:
            on_round()
    result = {}
    for name, times in samples.items():
        low, _, high = statistics.quantiles(times, n=4)
        result[name] = Timing(statistics.median(times), low, high, invokes)
    return result
