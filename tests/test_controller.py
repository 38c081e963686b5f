"""The controller on toy bandits: sampling, REINFORCE, baseline, entropy schedule, rewards."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from fliqs_keras import controller as ctl
from fliqs_keras.controller import Controller

# Four arms: quality and cost; the target is cost 1.0.
QUALITY = np.array([0.60, 0.80, 0.90, 0.95], np.float32)
COST = np.array([0.5, 1.0, 1.6, 2.4], np.float32)


def _run_bandit(steps=1500, warmup=300, seed=0, beta=0.5, entropy_max=0.5, schedule="cosine"):
    policy = Controller([4], learning_rate=0.05, seed=seed)

    @tf.function
    def step(t):
        indices = policy.sample(t, uniform=t < warmup)
        value = ctl.reward(tf.gather(QUALITY, indices[0]), tf.gather(COST, indices[0]), 1.0, beta)
        if t >= warmup:
            policy.update(indices, value, ctl.entropy_weight(t, steps, warmup, entropy_max, schedule))
        return indices

    draws = [int(step(tf.constant(t))[0]) for t in range(steps)]
    return policy, draws


def test_policy_converges_to_the_arm_with_the_best_reward_and_settles():
    policy, draws = _run_bandit()
    rewards = QUALITY - 0.5 * np.abs(COST - 1.0)
    assert int(policy.argmax()[0]) == int(np.argmax(rewards)) == 1
    assert float(policy.entropy()[0]) < 0.05
    assert np.mean(np.array(draws[-100:]) == 1) > 0.95


def test_warmup_samples_uniformly_and_leaves_the_policy_alone():
    policy = Controller([4, 2, 3], seed=3)
    draws = np.array([policy.sample(t, uniform=True).numpy() for t in range(3000)])
    for decision, choices in enumerate([4, 2, 3]):
        counts = np.bincount(draws[:, decision], minlength=choices)
        assert len(counts) == choices, "never a choice beyond the decision's own"
        np.testing.assert_allclose(counts / 3000, 1 / choices, atol=0.03)
    np.testing.assert_array_equal(policy.logits.numpy(), 0.0)


def test_sampling_depends_only_on_seed_and_step():
    a, b = Controller([5, 5], seed=7), Controller([5, 5], seed=7)
    for t in [0, 1, 17, 123456]:
        np.testing.assert_array_equal(a.sample(t).numpy(), b.sample(t).numpy())
    other = Controller([5, 5], seed=8)
    assert any((a.sample(t).numpy() != other.sample(t).numpy()).any() for t in range(10))
    assert any((a.sample(t).numpy() != a.sample(t + 1).numpy()).any() for t in range(10))


def test_the_same_seed_gives_the_same_final_policy():
    first, draws_first = _run_bandit(steps=400, warmup=100, seed=5)
    second, draws_second = _run_bandit(steps=400, warmup=100, seed=5)
    assert draws_first == draws_second
    np.testing.assert_array_equal(first.logits.numpy(), second.logits.numpy())


def test_independent_decisions_learn_independently():
    policy = Controller([3, 3], learning_rate=0.05, seed=1)
    best = np.array([2, 0])
    for t in range(800):
        indices = policy.sample(t, uniform=t < 100)
        if t >= 100:
            policy.update(indices, float(np.sum(indices.numpy() == best)), ctl.entropy_weight(t, 800, 100, 0.5))
    np.testing.assert_array_equal(policy.argmax().numpy(), best)


def test_update_follows_the_analytic_reinforce_gradient_with_adam():
    policy = Controller([3], learning_rate=0.1, beta_1=0.0, seed=0)
    policy.update(tf.constant([2]), 1.0)  # the first reward sets the baseline: advantage 0
    np.testing.assert_allclose(policy.logits.numpy(), 0.0, atol=1e-7)
    assert float(policy.baseline.numpy()) == 1.0
    advantage = policy.update(tf.constant([2]), 3.0)
    assert float(advantage) == 2.0
    # Gradient of -A log pi at uniform p: -2 * (onehot - 1/3). This is Adam's second step (the
    # first had a zero gradient): each logit moves by lr * g / sqrt(v_hat), v_hat = 0.001 g^2 / (1 - 0.999^2).
    step = 0.1 * math.sqrt((1 - 0.999**2) / 0.001)
    np.testing.assert_allclose(policy.logits.numpy()[0], [-step, -step, step], rtol=1e-4)
    np.testing.assert_allclose(float(policy.baseline.numpy()), 0.99 * 1.0 + 0.01 * 3.0, rtol=1e-6)


def test_entropy_penalty_alone_sharpens_the_policy():
    policy = Controller([3], learning_rate=0.05)
    policy.logits.assign([[0.2, 0.0, -0.1]])
    before = float(policy.entropy()[0])
    policy.update(tf.constant([0]), 0.0)  # sets the baseline
    for _ in range(50):
        policy.update(tf.constant([1]), 0.0, entropy_penalty=1.0)
    assert float(policy.entropy()[0]) < before


def test_non_finite_reward_skips_the_update():
    policy = Controller([2, 3])
    policy.update(tf.constant([0, 1]), 1.0)
    policy.update(tf.constant([1, 2]), 2.0)
    state = [v.numpy().copy() for v in policy.weights]
    for bad in (float("nan"), float("inf")):
        assert np.isnan(float(policy.update(tf.constant([1, 0]), bad)))
    for before, variable in zip(state, policy.weights):
        if variable.name != "skipped_updates":
            np.testing.assert_array_equal(before, variable.numpy())
    assert int(policy.skipped.numpy()) == 2 and int(policy.updates.numpy()) == 2
    policy.update(tf.constant([1, 0]), 5.0, active=False)
    assert int(policy.updates.numpy()) == 2 and int(policy.skipped.numpy()) == 2


def _softmax(logits, valid):
    z = np.where(valid, logits, -np.inf)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _expected_known(logits, valid, known):
    """E_pi[K(a)] by enumerating every policy, in float64 (the reference for the exact credit)."""
    p = _softmax(logits, valid)
    sizes = valid.sum(axis=1)
    total = 0.0
    for a in np.ndindex(*sizes):
        total += np.prod([p[d, k] for d, k in enumerate(a)]) * known(a)
    return total


def test_exact_credit_of_a_known_reward_is_its_exact_gradient_over_the_other_draws():
    # Three decisions of 3, 2 and 3 choices; the known reward is an absolute cost penalty,
    # which couples the decisions (no decision's share is fixed).
    rng = np.random.default_rng(0)
    valid = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]], bool)
    logits = rng.normal(size=valid.shape)
    per_choice = rng.uniform(0.2, 2.0, size=valid.shape)

    def known(a):
        return -2.0 * abs(sum(per_choice[d, k] for d, k in enumerate(a)) / 2.5 - 1.0)

    p = _softmax(logits, valid)
    average = np.zeros(valid.shape)
    for a in np.ndindex(*valid.sum(axis=1)):
        alternatives = np.zeros(valid.shape)
        for d in range(3):
            for k in range(valid[d].sum()):
                alternatives[d, k] = known(tuple(k if j == d else a[j] for j in range(3)))
        alternatives[~valid] = np.nan  # ignored where the probability is zero
        gradient = ctl.policy_gradient(p.astype(np.float32), np.array(a, np.int32), 0.0, 0.0,
                                       alternatives.astype(np.float32))
        average += np.prod([p[d, k] for d, k in enumerate(a)]) * keras.ops.convert_to_numpy(gradient)
    # Descending the loss climbs E_pi[K]: its gradient is minus the loss's, by central differences.
    reference = np.zeros(valid.shape)
    for d, k in zip(*np.nonzero(valid)):
        step = np.zeros(valid.shape)
        step[d, k] = 1e-5
        reference[d, k] = -(_expected_known(logits + step, valid, known)
                            - _expected_known(logits - step, valid, known)) / 2e-5
    np.testing.assert_allclose(average, reference, atol=2e-6)
    assert np.abs(reference).max() > 0.05  # not a vacuous comparison


def test_exact_credit_moves_the_policy_without_a_sampled_advantage():
    policy = Controller([3], learning_rate=0.1)
    known = tf.constant([[0.0, -1.0, -2.0]])
    policy.update(tf.constant([1]), 0.5, known_rewards=known)  # the first sampled reward is the baseline
    # Advantage 0, yet the known part says choice 0 is best whatever was drawn.
    assert np.argmax(policy.logits.numpy()[0]) == 0 and np.argmin(policy.logits.numpy()[0]) == 2
    assert float(policy.baseline.numpy()) == 0.5  # the baseline follows the sampled part only


def test_a_non_finite_known_reward_of_a_valid_choice_skips_the_update_and_one_beyond_is_ignored():
    policy = Controller([2, 3])
    policy.update(tf.constant([0, 1]), 1.0, known_rewards=tf.constant([[0.0, -1.0, np.nan], [0.0, -1.0, -2.0]]))
    assert int(policy.updates.numpy()) == 1 and np.isfinite(policy.logits.numpy()).all()
    state = policy.logits.numpy().copy()
    policy.update(tf.constant([0, 1]), 1.0, known_rewards=tf.constant([[0.0, -1.0, 0.0], [np.nan, -1.0, -2.0]]))
    assert int(policy.skipped.numpy()) == 1
    np.testing.assert_array_equal(policy.logits.numpy(), state)


@pytest.mark.parametrize("schedule", ctl.SCHEDULES)
def test_entropy_schedules(schedule):
    weights = [float(ctl.entropy_weight(t, 100, 20, 0.5, schedule)) for t in [0, 19, 20, 60, 100, 150]]
    assert weights[:2] == [0.0, 0.0]
    assert weights[4] == pytest.approx(0.5) and weights[5] == pytest.approx(0.5)
    if schedule == "cosine":
        assert weights[2] == 0.0 and weights[3] == pytest.approx(0.25)
    if schedule == "linear":
        assert weights[3] == pytest.approx(0.25)
    if schedule == "constant":
        assert weights[2] == 0.5


def test_rewards():
    assert float(ctl.reward(0.9, 1.2, 1.0, 1.0)) == pytest.approx(0.7)
    assert float(ctl.reward(0.9, 0.8, 1.0, 1.0)) == pytest.approx(0.7)
    assert float(ctl.reward(0.9, 0.8, 1.0, 1.0, "one_sided")) == pytest.approx(0.9)
    assert float(ctl.reward(0.9, 1.2, 1.0, 1.0, "one_sided")) == pytest.approx(0.7)
    assert float(ctl.reward(0.9, 2.0, 1.0, 1.0, "multiplicative")) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="Unknown reward 'log'"):
        ctl.reward(1.0, 1.0, 1.0, 1.0, "log")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        ctl.reward(1.0, 1.0, 1.0, -1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one choice"):
        Controller([3, 0])
    with pytest.raises(ValueError, match="learning_rate"):
        Controller([3], learning_rate=0.0)
    with pytest.raises(ValueError, match="baseline_momentum"):
        Controller([3], baseline_momentum=1.0)
    with pytest.raises(ValueError, match="Unknown entropy schedule"):
        ctl.entropy_weight(1, 10, 2, 0.5, "step")
    with pytest.raises(ValueError, match="start_step < total_steps"):
        ctl.entropy_weight(1, 10, 10, 0.5)


def test_state_serialises_with_keras():
    policy = Controller([2, 4], learning_rate=0.02, seed=9, name="policy")
    policy.update(tf.constant([1, 3]), 1.0)
    policy.update(tf.constant([0, 2]), 0.5)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(policy))
    assert again.get_config() == policy.get_config()
    again.set_weights(policy.get_weights())
    np.testing.assert_array_equal(again.sample(11).numpy(), policy.sample(11).numpy())
    assert math.isclose(float(again.baseline.numpy()), float(policy.baseline.numpy()))


def test_log_probabilities_sum_to_one_per_decision():
    policy = Controller([2, 3])
    policy.logits.assign(np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]], np.float32))
    np.testing.assert_allclose(np.exp(policy.log_probabilities().numpy())[policy.valid].sum(), 2.0, rtol=1e-6)
