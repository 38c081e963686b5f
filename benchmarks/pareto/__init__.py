"""The Pareto benchmark: test accuracy against BOPs for FLIQS and its baselines on the offline digits.

A study (a JSON file in benchmarks/studies/) names the model, datasets, seeds,
methods and variants; `grid` runs it, `results` turns its runs into summaries
and verdicts, `plots` and `report` draw and tabulate them. docs/benchmarks.md
says how to run it.
"""
