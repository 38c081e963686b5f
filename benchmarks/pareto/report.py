"""A study's results as Markdown: per dataset, the comparison at the budget and each FLIQS variant's verdict."""

from __future__ import annotations

from typing import Any


def _comparison(verdict: dict[str, Any], title: str) -> list[str]:
    summaries, budget = verdict["summaries"], verdict["budget_bops"]
    lines = [f"{title} (seeds {', '.join(map(str, verdict['seeds']))}):", "",
             "| method | test accuracy (%) | BOPs / budget |", "|---|---|---|"]
    for group, s in summaries.items():
        ratios = [b / budget for b in s["bops"]]
        span = f"{min(ratios):.2f}" if max(ratios) - min(ratios) < 0.005 else f"{min(ratios):.2f}–{max(ratios):.2f}"
        lines.append(f"| {group.split(' @')[0]} | {100 * s['mean_accuracy']:.2f} ± {100 * s['std_accuracy']:.2f} "
                     f"| {span} |")
    return lines + [""]


def _verdicts(verdict: dict[str, Any]) -> list[str]:
    lines = ["| FLIQS variant | gap recovered | above every baseline by > spread | above the standard baselines "
             "| every seed within 110% | target met |", "|---|---|---|---|---|---|"]
    for name, v in verdict.items():
        if isinstance(v, dict) and "target_met" in v:
            lines.append(f"| {name} | {100 * v['gap_recovered']:.1f}% | {_yes(v['above_every_baseline_by_more_than_spread'])} "
                         f"| {_yes(v['above_standard_baselines_by_more_than_their_spread'])} "
                         f"| {_yes(v['every_seed_within_110_percent_of_budget'])} | {_yes(v['target_met'])} |")
    return lines + [""]


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def markdown(payload: dict[str, Any], command: str) -> str:
    """The results page of a study's results JSON; `command` is the one that makes it."""
    lines = [f"# {payload['study']}: {payload['model']}" + (f", width {payload['width']:g}" if payload["width"] != 1
                                                            else ""), "",
             f"Generated from `{payload['study']}.json` by `{command}`. The target: a FLIQS variant above "
             "every baseline's mean by more than the largest spread, recovering at least 75% of the accuracy "
             "gap between the budget's uniform format and INT8, with every seed within 110% of the budget.", ""]
    for result in payload["results"]:
        reference = result["verdict"].get("uniform_reference", "—")
        lines += [f"## {result['dataset']}", "",
                  f"{result['train_examples']:,} training examples, {result['epochs']} epochs, "
                  f"{result['test_examples']:,} test examples. Comparison budget: {result['comparison_budget']} "
                  f"({result['comparison_bops'] / 1e6:.2f} MBOPs); reference {reference}.", ""]
        chosen = result["verdict_with_batch_norm_reestimation"] or result["verdict_with_more_seeds"]
        if chosen and "summaries" in chosen:
            lines += _comparison(chosen, "At the comparison budget, batch norms re-estimated")
            lines += _verdicts(chosen)
        elif result["verdict"]:
            lines += _verdicts(result["verdict"])
    return "\n".join(lines).rstrip() + "\n"
