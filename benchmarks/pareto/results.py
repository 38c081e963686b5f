"""A dataset's result from its runs alone: summaries, the comparison budget and the verdicts (no training).

The same function serves a fresh run and a replot of a stored JSON, so every
committed result comes back from its runs.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.pareto.methods import RETRAINED
from benchmarks.pareto.study import BASELINE_SPACE, SPACES, VARIANTS, Study
from benchmarks.pareto.training import REESTIMATED

# Uniform INT2 comes as ``int2*1.1``: no policy of these choices costs less than uniform INT2,
# so the mixed methods get 10% room above it.
INT2_ROOM = 1.1
# Uniform INT3's budget is compared too (with the curves), where the mixing has more room.
ALSO_COMPARED = ("int3",)
# Group names of the controls (not methods, so not baselines in the verdicts).
DRAWN = "after uniform draws"
CEILING = "ceiling"
MAXIMAL = "maximal policy"
# The comparisons a mixed-precision search is usually measured against: uniform QAT, random
# search, a post-training search and HGQ2. The supernet search and progressive QAT are stricter.
STANDARD_BASELINES = ("uniform", "random", "sensitivity", "hgq2")
# The baselines' budget tolerance: a method over 110% of the budget is not "at" it.
BUDGET_TOLERANCE = 1.1


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation of the accuracy over a group's seeds, and its BOPs."""
    accuracies = [r["accuracy"] for r in rows]
    bops = [r["bops"] for r in rows]
    return {"mean_accuracy": statistics.mean(accuracies),
            "std_accuracy": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracies": accuracies, "mean_bops": statistics.mean(bops), "bops": bops}


def target_bops(spec: str, uniform_bops: dict[str, float]) -> float:
    """The BOPs of a target such as ``int4`` or ``int2*1.1`` from the uniform formats' BOPs."""
    fmt, _, factor = spec.partition("*")
    return uniform_bops[fmt] * float(factor or 1)


def comparison_budget(summaries: dict[str, dict]) -> tuple[str, dict[str, float]]:
    """The first of INT4, INT3 and INT2 whose gap to INT8 is at least three times the seeds' spread (the
    larger std of the two), INT2 as ``int2*1.1``; INT3 when none is. Also each gap in spreads."""
    gaps = {}
    if "uniform int8" not in summaries:
        return "int4", gaps
    high = summaries["uniform int8"]
    for candidate in ("int4", "int3", "int2"):
        low = summaries.get(f"uniform {candidate}")
        if low is None:
            continue
        spread = max(high["std_accuracy"], low["std_accuracy"], 1e-9)
        gaps[candidate] = (high["mean_accuracy"] - low["mean_accuracy"]) / spread
        if gaps[candidate] >= 3:
            return (f"int2*{INT2_ROOM}" if candidate == "int2" else candidate), gaps
    return "int3", gaps


def family(group: str) -> str:
    """A group's method without its budget (and one family for all uniform formats and maximal policies)."""
    for name in ("uniform", MAXIMAL):
        if group.startswith(name):
            return name
    return group.split(" @")[0]


def is_control(group: str) -> bool:
    name = family(group)
    return name in (f"{RETRAINED} retrained", CEILING, MAXIMAL) or name.endswith(DRAWN)


def verdict(summaries: dict[str, dict], budget_format: str, budget: float) -> dict[str, Any]:
    """Whether each FLIQS variant at the budget meets the target: above every baseline's mean by more than the
    largest spread, at least 75% of the gap between the budget's uniform format and INT8 recovered, and
    every seed within 110% of the budget. Also the controls' margins and what bounds any search there."""
    uniform_format = budget_format.split("*")[0]
    low, high = summaries.get(f"uniform {uniform_format}"), summaries.get("uniform int8")
    if low is None or high is None:
        return {}
    gap = high["mean_accuracy"] - low["mean_accuracy"]
    candidates = {g: s for g, s in summaries.items()
                  if g == f"uniform {uniform_format}" or g.endswith(f"@{budget_format}") and not g.startswith("fliqs")
                  and not is_control(g)}
    controls = {g: s for g, s in summaries.items() if g.endswith(f"@{budget_format}") and is_control(g)}
    # A baseline that missed the budget by more than 10% is not compared at it (HGQ2 can).
    baselines = {g: s for g, s in candidates.items() if s["mean_bops"] <= BUDGET_TOLERANCE * budget}
    result = {"budget_bops": budget, "uniform_reference": f"uniform {uniform_format}",
              "int8_minus_uniform_reference": gap,
              "gap_over_spread": gap / max(low["std_accuracy"], high["std_accuracy"], 1e-9),
              "baseline_bops_ratio_to_budget": {g: s["mean_bops"] / budget for g, s in baselines.items()},
              "off_budget_baselines": {g: s["mean_bops"] / budget for g, s in candidates.items()
                                       if g not in baselines}}
    bound = summaries.get(f"{CEILING} @{budget_format}")
    if bound is not None and gap > 0:
        # The share of the gap that formats at or above every policy within the budget recover.
        recovered = (bound["mean_accuracy"] - low["mean_accuracy"]) / gap
        result[CEILING] = {"gap_recovered": recovered, "recovers_75_percent": recovered >= 0.75,
                           "bops_ratio_to_budget": bound["mean_bops"] / budget}
    maximal = {g: s for g, s in controls.items() if family(g) == MAXIMAL}
    if maximal and gap > 0:
        # The best of them on the test set: an optimistic view of what a search within the budget can find.
        best = max(maximal, key=lambda g: maximal[g]["mean_accuracy"])
        recovered = (maximal[best]["mean_accuracy"] - low["mean_accuracy"]) / gap
        result["best_maximal_policy"] = {"group": best, "of": len(maximal), "gap_recovered": recovered,
                                         "recovers_75_percent": recovered >= 0.75,
                                         "bops_ratio_to_budget": maximal[best]["mean_bops"] / budget}
    for variant in [f"fliqs {space}" for space in SPACES] + [f"{v} {BASELINE_SPACE}" for v in VARIANTS]:
        fliqs = summaries.get(f"{variant} @{budget_format}")
        if fliqs is None:
            continue
        margins = {g: fliqs["mean_accuracy"] - s["mean_accuracy"] for g, s in baselines.items()}
        spread = max([fliqs["std_accuracy"]] + [s["std_accuracy"] for s in baselines.values()])
        recovered = (fliqs["mean_accuracy"] - low["mean_accuracy"]) / gap if gap > 0 else float("nan")
        above = all(m > spread for m in margins.values())
        standard = {g for g in baselines if family(g) in STANDARD_BASELINES}
        standard_spread = max([fliqs["std_accuracy"]] + [baselines[g]["std_accuracy"] for g in standard])
        above_standard = all(margins[g] > standard_spread for g in standard)
        within = max(fliqs["bops"]) <= BUDGET_TOLERANCE * budget
        result[variant] = {"margin_over_baselines": margins, "largest_spread": spread,
                           "margin_over_controls": {g: fliqs["mean_accuracy"] - s["mean_accuracy"]
                                                    for g, s in controls.items()},
                           "above_every_baseline_by_more_than_spread": above,
                           "gap_recovered": recovered, "recovers_75_percent": recovered >= 0.75,
                           "bops_ratio_to_budget": fliqs["mean_bops"] / budget,
                           "every_seed_within_110_percent_of_budget": within,
                           "target_met": above and recovered >= 0.75 and within,
                           "above_standard_baselines_by_more_than_their_spread": above_standard,
                           "target_met_against_standard_baselines": above_standard and recovered >= 0.75 and within}
    return result


def at_budget(group: str, budget_format: str) -> bool:
    """Whether a group is among those the comparison budget compares on every seed (HGQ2, off budget, is not)."""
    reference = budget_format.split("*")[0]
    return group in (f"uniform {reference}", "uniform int8") or (
        group.endswith(f"@{budget_format}") and family(group) != "hgq2")


def dataset_result(study: Study, info: dict[str, Any], groups: dict[str, list[dict]],
                   more_seed_runs: dict[str, list[dict]]) -> dict[str, Any]:
    """A dataset's result: `info` (dataset, epochs, example counts, uniform BOPs), then what the runs say.

    Args:
        study: the study the runs belong to.
        info: ``dataset``, ``epochs``, ``train_examples``, ``held_out_examples``,
            ``test_examples`` and ``uniform_bops``.
        groups: per group (method and budget), the runs of the study's seeds.
        more_seed_runs: per group, the runs of `Study.more_seeds_at_budget`.
    """
    summaries = {g: summary(r) for g, r in groups.items()}
    budget_format, gaps = comparison_budget(summaries)
    budget = target_bops(budget_format, info["uniform_bops"])
    budgets = [b for b in ALSO_COMPARED if b != budget_format and study.curves]
    more = {g: list(rows) + more_seed_runs.get(g, []) for g, rows in groups.items()}
    more.update({g: list(rows) for g, rows in more_seed_runs.items() if g not in groups})
    more_seeds = [s for s in study.more_seeds_at_budget if s not in study.seeds]
    seeds = list(study.seeds) + more_seeds
    verdict_more = {}
    if more_seeds:
        verdict_more = {"seeds": seeds, **verdict({g: summary(r) for g, r in more.items()}, budget_format, budget)}
    reestimated = {g: summary([{**r, "accuracy": r[REESTIMATED]} for r in rows])
                   for g, rows in more.items() if at_budget(g, budget_format)}
    verdict_reestimated = {}
    if reestimated:
        verdict_reestimated = {"seeds": seeds, "summaries": reestimated,
                               **verdict(reestimated, budget_format, budget)}
    return {**info, "comparison_budget": budget_format, "comparison_bops": budget,
            "gap_to_int8_over_spread": gaps,
            "verdict": verdict(summaries, budget_format, budget),
            "verdicts_at_other_budgets": {b: verdict(summaries, b, target_bops(b, info["uniform_bops"]))
                                          for b in budgets},
            "verdict_with_more_seeds": verdict_more,
            "verdict_with_batch_norm_reestimation": verdict_reestimated,
            "more_seed_runs": more_seed_runs,
            "summaries": summaries, "runs": groups}


def replot(study: Study, stored: dict[str, Any]) -> dict[str, Any]:
    """A stored dataset result derived again from its runs alone."""
    info = {k: stored[k] for k in ("dataset", "epochs", "train_examples", "held_out_examples", "test_examples",
                                   "uniform_bops")}
    return dataset_result(study, info, stored["runs"], stored.get("more_seed_runs", {}))
