"""Runs a study's grid on one dataset: which runs, in which order, under which group names."""

from __future__ import annotations

from typing import Any

import fliqs_keras
from benchmarks.pareto import policies, results
from benchmarks.pareto.methods import BASELINES, RETRAINED
from benchmarks.pareto.results import CEILING, DRAWN, MAXIMAL
from benchmarks.pareto.store import Runs
from benchmarks.pareto.study import BASELINE_SPACE, LADDER, SPACES, TARGETS, UNIFORM, VARIANTS, Study
from benchmarks.pareto.training import REESTIMATED, Context, layer_costs
from fliqs_keras import cost


class Grid:
    """The runs of one study on one dataset, added to groups named ``<method> @<budget>``.

    Baselines come first, then the searches at the comparison budget, then the
    curves: a run cut short keeps what matters.
    """

    def __init__(self, study: Study, dataset: str, runs: Runs):
        self.study, self.runs = study, runs
        self.context = Context.of(study, dataset)
        self.costs = cost.CostModel(fliqs_keras.apply(self.context.build(0), list(SPACES["int+fp"])), "bops")
        self.uniform_bops = {f: self.costs.uniform(f) for f in UNIFORM}
        self.groups: dict[str, list[dict]] = {}

    def _add(self, into, group, row, bops=None):
        row = dict(row)
        row.setdefault("bops", bops)
        into.setdefault(group, []).append(row)

    def _run(self, into, group, key, method, seed, spec, require=(), bops=None):
        self._add(into, group, self.runs.run(key, method, self.context, seed, spec, require=require), bops)

    def uniform(self, fmt, seed, into, require=()):
        self._run(into, f"uniform {fmt}", f"uniform/{fmt}/{seed}", "uniform", seed, {"format": fmt}, require,
                  self.uniform_bops[fmt])

    def baseline(self, method, spec, seed, into, require=()):
        self._run(into, f"{method} @{spec}", f"{method}/{spec}/{seed}", method, seed,
                  {"budget": self.costs.target(spec)}, require)

    def search(self, variant, space, options, target, seed, into, require=()):
        self._run(into, f"{variant} {space} @{target}", f"{variant}/{space}/{target}/{seed}", "fliqs", seed,
                  {"space": space, "target": target, "options": options}, require)

    def retrain(self, seed, into, require=()):
        searched = self.runs.get(f"{RETRAINED}/{BASELINE_SPACE}/{self.budget_format}/{seed}")
        if self.study.controls and searched is not None:
            self._run(into, f"{RETRAINED} retrained @{self.budget_format}",
                      f"retrained/{RETRAINED}/{self.budget_format}/{seed}", "retrained", seed,
                      {"policy": searched["policy"]}, require)

    def drawn(self, seed, into, require=()):
        if self.study.controls and "fliqs" in self.study.methods:
            for final in ("random", self.reference):
                self._run(into, f"{final} {DRAWN} @{self.budget_format}", f"drawn/{final}/{self.budget_format}/{seed}",
                          "drawn", seed, {"budget": self.budget, "final": final}, require)

    def bounds(self, seed, into, require=()):
        if self.study.controls and "fliqs" in self.study.methods:
            self._run(into, f"{CEILING} @{self.budget_format}", f"ceiling/{self.budget_format}/{seed}", "kept", seed,
                      {"budget_format": self.budget_format, "policy": self.ceiling}, require)
            for number, policy in enumerate(self.maximal, 1):
                self._run(into, f"{MAXIMAL} {number} @{self.budget_format}",
                          f"maximal/{self.budget_format}/{number}/{seed}", "kept", seed,
                          {"budget_format": self.budget_format, "policy": policy}, require)

    def at_budget(self, seed, into, require=()):
        """Everything compared at the comparison budget, for one seed."""
        for fmt in dict.fromkeys((self.reference, "int8")):
            if "uniform" in self.study.methods:
                self.uniform(fmt, seed, into, require)
        for method in BASELINES:
            if method in self.study.methods and method != "hgq2":  # HGQ2 misses the budget: not compared there
                self.baseline(method, self.budget_format, seed, into, require)
        if "fliqs" in self.study.methods:
            for variant, space, options, target in self.searches:
                if target == self.budget_format:
                    self.search(variant, space, options, target, seed, into, require)
            self.retrain(seed, into, require)
        self.drawn(seed, into, require)
        self.bounds(seed, into, require)

    def _latest(self, groups: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """The groups' rows as the store holds them now (a run again for a missing field replaced its row)."""
        return {g: [{**self.runs.get(r["key"]), "bops": r["bops"]} for r in rows] for g, rows in groups.items()}

    def _plan_searches(self) -> list[tuple[str, str, dict, str]]:
        searches = [("fliqs", space, {}, TARGETS[space]) for space in SPACES]
        searches += [(variant, BASELINE_SPACE, options, TARGETS[BASELINE_SPACE][:2])
                     for variant, options in VARIANTS.items()]
        searches = sorted((s for s in searches if s[0] in self.study.variants),
                          key=lambda s: self.study.variants.index(s[0]))
        work = [(variant, space, options, self.budget_format) for variant, space, options, _ in searches
                if min(self.costs.uniform(f) for f in SPACES[space]) <= self.budget]
        work += [(variant, space, options, target) for variant, space, options, targets in searches
                 for target in targets if target != self.budget_format and self.study.curves]
        return work

    def run(self) -> dict[str, Any]:
        """Every run of the study on this dataset (stored ones read back), and the dataset's result."""
        study, seeds, groups = self.study, self.study.seeds, self.groups
        if "uniform" in study.methods:
            for fmt in UNIFORM if study.curves else LADDER:
                for seed in seeds:
                    self.uniform(fmt, seed, groups)
        summaries = {g: results.summary(r) for g, r in groups.items()}
        self.budget_format, _ = results.comparison_budget(summaries)
        self.budget = self.costs.target(self.budget_format)
        self.reference = self.budget_format.split("*")[0]
        budgets = [self.budget_format] + [b for b in results.ALSO_COMPARED
                                          if b != self.budget_format and study.curves]
        for spec in budgets:
            for method in BASELINES:
                if method in study.methods:
                    for seed in seeds:
                        self.baseline(method, spec, seed, groups)
        self.searches = self._plan_searches() if "fliqs" in study.methods else []
        for variant, space, options, target in self.searches:
            for seed in seeds:
                self.search(variant, space, options, target, seed, groups)
        names, table = layer_costs(fliqs_keras.apply(self.context.build(0), list(SPACES[BASELINE_SPACE])))
        self.ceiling = policies.ceiling(names, table, self.budget)
        self.maximal = policies.maximal(names, table, self.budget) or []
        for seed in seeds:
            self.retrain(seed, groups)
            self.drawn(seed, groups)
            self.bounds(seed, groups)
        more = {g: list(rows) for g, rows in groups.items()}
        more_seeds = [s for s in study.more_seeds_at_budget if s not in seeds]
        for seed in more_seeds:
            self.at_budget(seed, more)
        # Every model's batch norms re-estimated before the test too: runs stored from before the
        # re-estimation existed run again.
        for seed in list(seeds) + more_seeds:
            self.at_budget(seed, {}, require=(REESTIMATED,))
        groups, more = self._latest(groups), self._latest(more)
        more_seed_runs = {g: rows[len(groups.get(g, [])):] for g, rows in more.items()
                          if len(rows) > len(groups.get(g, []))}
        splits = self.context.splits
        info = {"dataset": self.context.dataset, "epochs": self.context.epochs,
                "train_examples": len(splits[0][0]), "held_out_examples": len(splits[1][0]),
                "test_examples": len(splits[2][0]), "uniform_bops": self.uniform_bops}
        return results.dataset_result(study, info, groups, more_seed_runs)
