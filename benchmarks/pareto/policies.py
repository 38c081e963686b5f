"""Policies of a budget, without training: random ones at it, the ceiling above it, the maximal ones within it.

Each works on a table of per-layer costs (`training.layer_costs`) of the
integer choices of the baseline space.
"""

from __future__ import annotations

import numpy as np

from benchmarks.pareto.study import BASELINE_SPACE, SPACES

RANDOM_TOLERANCE = 0.05
MAXIMAL_LIMIT = 8
# At most this many policies within a budget are listed (`within_budget`).
LISTED = 100_000


def tilted(per_choice, budget) -> np.ndarray:
    """Per layer, choice probabilities p(k) ∝ exp(-λ·cost(k)/budget) whose expected total cost is `budget`.

    Among distributions of independent per-layer choices with that expected
    cost, this one has the most entropy: the most random policies at the budget.
    """
    scaled = per_choice / budget
    if scaled.min(axis=0).sum() >= 1:
        raise ValueError(f"No policy costs less than {budget:.4g} BOPs: the cheapest costs "
                         f"{per_choice.min(axis=0).sum():.4g}.")

    def distribution(strength):
        logits = -strength * (scaled - scaled.min(axis=0))
        weights = np.exp(logits)
        return weights / weights.sum(axis=0)

    def over_budget(strength):
        return (distribution(strength) * scaled).sum() > 1

    low, high = 0.0, 1.0
    while over_budget(high):
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if over_budget(middle) else (low, middle)
    return distribution(high)


def random_policy(names, table, seed, budget) -> dict[str, str]:
    """The first of 200,000 random draws of the integer choices that costs within 5% of `budget`.

    The draws are uniform; when none of them lands within 5% (a budget near the
    cheapest policy, with many layers: not one of 200,000 uniform draws of
    digits_mobilenet's 16 layers is within 5% of ``int2*1.1``), they are drawn
    from `tilted` instead.
    """
    choices = SPACES[BASELINE_SPACE]
    per_choice = np.stack([table[c] for c in choices])  # [choices, layers]
    rng = np.random.default_rng(seed)
    columns = np.arange(len(names))

    def within(draws):
        return np.flatnonzero(np.abs(per_choice[draws, columns].sum(axis=1) / budget - 1) <= RANDOM_TOLERANCE)

    draws = rng.integers(0, len(choices), size=(200_000, len(names)))
    close = within(draws)
    if not len(close):
        cumulative = np.cumsum(tilted(per_choice, budget), axis=0)
        draws = (rng.random((200_000, 1, len(names))) > cumulative[None]).sum(axis=1).clip(max=len(choices) - 1)
        close = within(draws)
    if not len(close):
        raise RuntimeError(f"No random policy within {RANDOM_TOLERANCE:.0%} of {budget:.4g} BOPs in 200,000 draws.")
    return {n: choices[i] for n, i in zip(names, draws[close[0]])}


def _ranked(table, budget) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer, its integer choices from cheapest to dearest ([ranks, layers] indices into the space, and
    their costs), and whether some policy within `budget` lifts the layer off its cheapest: not when its
    next format up, with every other layer at its cheapest, already costs more than the budget."""
    per_choice = np.stack([table[c] for c in SPACES[BASELINE_SPACE]])  # [choices, layers]
    order = np.argsort(per_choice, axis=0)
    ranked = np.take_along_axis(per_choice, order, axis=0)
    cheapest = ranked[0]
    if cheapest.sum() > budget:
        raise ValueError(f"No policy costs less than {budget:.4g} BOPs: the cheapest costs {cheapest.sum():.4g}.")
    return order, ranked, cheapest.sum() - cheapest + ranked[1] <= budget


def ceiling(names, table, budget) -> dict[str, str]:
    """The formats that bound every integer policy within `budget`, layer by layer.

    A layer no policy within the budget lifts stays at its cheapest format;
    every other layer gets the dearest. So every policy within the budget
    has, in every layer, a format no dearer than this one's, and (more bits
    quantizing no worse) this policy's accuracy bounds theirs. It costs more
    than the budget itself.
    """
    order, _, liftable = _ranked(table, budget)
    return {n: SPACES[BASELINE_SPACE][order[-1 if lift else 0, i]]
            for i, (n, lift) in enumerate(zip(names, liftable))}


def _named(names, order, rows) -> list[dict[str, str]]:
    """Policies given as [policies, layers] ranks into `_ranked`'s `order`, as ``{layer: format}``."""
    return [{n: SPACES[BASELINE_SPACE][order[r, i]] for i, (n, r) in enumerate(zip(names, row))} for row in rows]


def within_budget(ranked, budget) -> np.ndarray | None:
    """Every policy within `budget` as [policies, layers] ranks into `_ranked`'s order, listed depth first
    (a layer's dearer formats are skipped once one does not fit); None when there are more than `LISTED`."""
    layers = ranked.shape[1]
    rises, room = ranked - ranked[0], budget - ranked[0].sum()
    found, rank = [], [0] * layers

    def visit(layer, left):
        if len(found) > LISTED:
            return
        if layer == layers:
            found.append(tuple(rank))
            return
        for r in range(len(ranked)):
            # A hair of slack for rounding: the exact test of the sum follows.
            if rises[r, layer] > left + 1e-9 * budget:
                break
            rank[layer] = r
            visit(layer + 1, left - rises[r, layer])
        rank[layer] = 0

    visit(0, room)
    if len(found) > LISTED:
        return None
    found = np.array(found, dtype=int).reshape(-1, layers)
    return found[ranked[found, np.arange(layers)].sum(axis=1) <= budget]


def maximal(names, table, budget, limit=None) -> list[dict[str, str]] | None:
    """Every policy within `budget` in which no layer's next format up still fits the budget: the
    policies a search should choose among. None when there are more than `limit` of them
    (`MAXIMAL_LIMIT` when None), or more than `LISTED` policies within the budget to list."""
    limit = MAXIMAL_LIMIT if limit is None else limit
    order, ranked, _ = _ranked(table, budget)
    within = within_budget(ranked, budget)
    if within is None:
        return None
    top, columns = len(ranked) - 1, np.arange(len(names))
    lifts = np.zeros(len(within), dtype=bool)
    for layer in columns:
        up = within.copy()
        up[:, layer] = np.minimum(up[:, layer] + 1, top)
        lifts |= (within[:, layer] < top) & (ranked[up, columns].sum(axis=1) <= budget)
    kept = within[~lifts]
    if len(kept) > limit:
        return None
    return _named(names, order, kept)


def maximal_draws(names, table, budget, rng, draws) -> list[dict[str, str]]:
    """The distinct maximal policies within `budget` (no layer's next format up fits) of `draws` random
    climbs: from every layer at its cheapest, one format up for a layer drawn uniformly among those whose
    next format still fits, until none does."""
    order, ranked, _ = _ranked(table, budget)
    top, columns = len(ranked) - 1, np.arange(len(names))
    found = {}
    for _ in range(draws):
        rank, spent = np.zeros(len(names), dtype=int), ranked[0].sum()
        while True:
            step = np.where(rank < top, ranked[np.minimum(rank + 1, top), columns] - ranked[rank, columns], np.inf)
            fits = np.flatnonzero(spent + step <= budget)
            if not len(fits):
                break
            layer = rng.choice(fits)
            spent, rank[layer] = spent + step[layer], rank[layer] + 1
        found.setdefault(tuple(rank), None)
    return _named(names, order, found)
