"""The most probable policy within a cost limit: what `FliqsSearch(max_cost_ratio=...)` keeps.

The reward pulls the policy's *expected* cost to the target, but the search
ends on the argmax of independent per-decision distributions, and the argmax
of a policy that has not settled can cost far more than its expectation (1.7x
the target in 440-step searches of `benchmarks/pareto.py`). A user who set a
budget wants a model within it, so this finds the policy of highest
log-probability whose cost is at most a limit:

1. from the argmax, while over the limit, take the single change of one
   decision that gives up the least log-probability per unit of cost saved;
2. then, while it raises the log-probability and stays within the limit,
   take the best change of one decision or of two decisions at once (two at
   once trades a cheaper choice in one layer for a dearer one in another,
   which no single change can do under a tight limit).

It is a local search (the exact problem is a multiple-choice knapsack, and
costs such as BOPs with shared decisions are not even separable), so the
result is the best policy among its neighbours, not always the most probable
one overall. Costs are evaluated for a batch of candidate policies at once.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

CostFunction = Callable[[np.ndarray], np.ndarray]


def _neighbours(current: np.ndarray, valid: np.ndarray, pairs: bool) -> np.ndarray:
    """Every policy one decision (and, with `pairs`, two decisions) away from `current`, [N, decisions]."""
    decision, choice = np.nonzero(valid)
    keep = choice != current[decision]
    decision, choice = decision[keep], choice[keep]
    single = np.repeat(current[None], len(decision), axis=0)
    single[np.arange(len(decision)), decision] = choice
    if not pairs:
        return single
    first, second = np.triu_indices(len(decision), k=1)
    apart = decision[first] != decision[second]
    first, second = first[apart], second[apart]
    double = single[first]
    double[np.arange(len(first)), decision[second]] = choice[second]
    return np.concatenate([single, double])


def most_probable_within(log_probabilities: np.ndarray, valid: np.ndarray, cost_of: CostFunction,
                         limit: float) -> np.ndarray:
    """A policy of high log-probability whose cost is at most `limit` (see the module docstring).

    Args:
        log_probabilities: [decisions, max choices] log-probability of each choice.
        valid: [decisions, max choices] bool, false beyond a decision's choices.
        cost_of: the costs of a batch of policies, [N, decisions] int -> [N].
        limit: the largest cost allowed.

    Returns:
        [decisions] int32 choice indices: the argmax when it is within the limit.

    Raises:
        ValueError: when no policy reachable by cheaper changes is within the limit.
    """
    log_p = np.where(valid, np.asarray(log_probabilities, np.float64), -np.inf)
    current = np.argmax(log_p, axis=-1).astype(np.int32)
    cost = float(np.asarray(cost_of(current[None]))[0])

    def score(candidates):
        return np.take_along_axis(log_p, candidates.T, axis=1).sum(axis=0)

    while cost > limit:
        candidates = _neighbours(current, valid, pairs=False)
        costs = np.asarray(cost_of(candidates), np.float64)
        saving = cost - costs
        lost = score(current[None])[0] - score(candidates)
        ratio = np.where(saving > 0, lost / np.where(saving > 0, saving, 1.0), np.inf)
        if not len(ratio) or not np.isfinite(ratio).any():
            raise ValueError(f"No policy costs at most {limit:.6g}: the cheapest reachable costs {cost:.6g}.")
        best = int(np.argmin(ratio))
        current, cost = candidates[best], float(costs[best])
    while True:
        candidates = _neighbours(current, valid, pairs=True)
        costs = np.asarray(cost_of(candidates), np.float64)
        gain = np.where(costs <= limit, score(candidates) - score(current[None])[0], -np.inf)
        if not len(gain) or gain.max() <= 1e-12:
            return current.astype(np.int32)
        current = candidates[int(np.argmax(gain))]
