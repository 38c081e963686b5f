"""The most probable formats within a cost limit: what `FliqsSearch(max_cost_ratio=...)` keeps.

A local search from the argmax over single and paired changes of decisions;
the reasoning is in docs/design.md.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

CostFunction = Callable[[np.ndarray], np.ndarray]


def _neighbours(current: np.ndarray, valid: np.ndarray, pairs: bool) -> np.ndarray:
    """Every assignment one decision (and, with `pairs`, two decisions) away from `current`, [N, decisions]."""
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
    """An assignment of formats of high log-probability whose cost is at most `limit`.

    Args:
        log_probabilities: [decisions, max choices] log-probability of each choice.
        valid: [decisions, max choices] bool, false beyond a decision's choices.
        cost_of: the costs of a batch of policies, [N, decisions] int -> [N].
        limit: the largest cost allowed.

    Returns:
        [decisions] int32 choice indices: the argmax when it is within the limit.

    Raises:
        ValueError: when no assignment reachable by cheaper changes is within the limit.
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
            raise ValueError(f"No assignment of formats costs at most {limit:.6g}: the cheapest reachable costs {cost:.6g}.")
        best = int(np.argmin(ratio))
        current, cost = candidates[best], float(costs[best])
    while True:
        candidates = _neighbours(current, valid, pairs=True)
        costs = np.asarray(cost_of(candidates), np.float64)
        gain = np.where(costs <= limit, score(candidates) - score(current[None])[0], -np.inf)
        if not len(gain) or gain.max() <= 1e-12:
            return current.astype(np.int32)
        current = candidates[int(np.argmax(gain))]
