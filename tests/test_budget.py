"""budget.most_probable_within: the policy kept within a cost limit, against exhaustive search."""

import itertools

import numpy as np
import pytest

from fliqs_keras import budget


def _problem(rng):
    """Random policies and a BOPs-like cost with shared decisions (not separable)."""
    decisions, width = int(rng.integers(2, 7)), int(rng.integers(2, 5))
    valid = np.arange(width)[None, :] < rng.integers(1, width + 1, size=decisions)[:, None]
    logits = rng.normal(size=(decisions, width)) * rng.uniform(0.3, 3.0)
    log_p = logits - np.log(np.exp(np.where(valid, logits, -np.inf)).sum(axis=1, keepdims=True))
    bits = np.sort(rng.choice([2.0, 3.0, 4.0, 8.0], size=(decisions, width)), axis=1)
    macs = rng.uniform(1, 100, size=decisions)
    activation = rng.integers(0, decisions, size=decisions)  # each layer's input decision
    rows = np.arange(decisions)

    def cost_of(policies):
        policies = np.asarray(policies)
        return (macs * bits[rows, policies] * bits[activation, policies[:, activation]]).sum(axis=-1)

    grid = np.array(list(itertools.product(*[range(int(v.sum())) for v in valid])))
    return log_p, valid, cost_of, grid


def test_matches_exhaustive_search_on_random_problems():
    rng = np.random.default_rng(0)
    for _ in range(200):
        log_p, valid, cost_of, grid = _problem(rng)
        costs = cost_of(grid)
        limit = rng.uniform(costs.min(), costs.max())
        scores = np.where(costs <= limit, np.take_along_axis(log_p, grid.T, axis=1).sum(axis=0), -np.inf)
        kept = budget.most_probable_within(log_p, valid, cost_of, limit)
        assert kept.dtype == np.int32 and valid[np.arange(len(kept)), kept].all()
        assert cost_of(kept[None])[0] <= limit
        assert np.take_along_axis(log_p, kept[:, None], axis=1).sum() == pytest.approx(scores.max())


def test_the_argmax_stays_when_it_is_within_the_limit():
    log_p = np.log(np.array([[0.2, 0.8], [0.6, 0.4]]))
    valid = np.ones((2, 2), bool)

    def cost_of(policies):
        return np.asarray(policies).sum(axis=-1).astype(float)

    np.testing.assert_array_equal(budget.most_probable_within(log_p, valid, cost_of, 1.0), [1, 0])
    np.testing.assert_array_equal(budget.most_probable_within(log_p, valid, cost_of, 0.0), [0, 0])


def test_two_decisions_trade_places_where_one_change_cannot():
    # The argmax (1, 1) costs 12 over a limit of 10. The best saving per log-probability lost is the
    # first decision's (10 for 1.0), which leaves (0, 1) at cost 2; no single change then gains within
    # the limit, but trading both decisions reaches (1, 0), the optimum (0.5 lost).
    log_p = np.array([[-1.0, 0.0], [-0.5, 0.0]])
    weights = np.array([[0.0, 10.0], [0.0, 2.0]])

    def cost_of(policies):
        policies = np.asarray(policies)
        return weights[0, policies[:, 0]] + weights[1, policies[:, 1]]

    np.testing.assert_array_equal(budget.most_probable_within(log_p, np.ones((2, 2), bool), cost_of, 10.0), [1, 0])


def test_an_impossible_limit_names_the_cheapest_cost():
    log_p = np.zeros((2, 2))

    def cost_of(policies):
        return 1.0 + np.asarray(policies).sum(axis=-1)

    with pytest.raises(ValueError, match=r"No assignment of formats costs at most 0.5: the cheapest reachable costs 1"):
        budget.most_probable_within(log_p, np.ones((2, 2), bool), cost_of, 0.5)
