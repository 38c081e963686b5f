"""The policy that learns the formats: categorical logits per decision, trained by REINFORCE.

It knows decisions, rewards and steps, not layers; its state lives in Keras
variables so that it is saved with the model. Sampling is seeded by (seed,
step), so every replica and every rerun draws the same formats.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np
from keras import backend, ops

REWARDS = ("absolute", "one_sided", "multiplicative")
SCHEDULES = ("cosine", "linear", "constant")


def reward(quality, cost, target, beta: float, kind: str = "absolute"):
    """The TuNAS-style reward of one sample.

    ``absolute``: ``Q - beta |C / C_t - 1|``; ``one_sided``:
    ``Q - beta max(0, C / C_t - 1)``; ``multiplicative``: ``Q (C / C_t)^-beta``.
    """
    if kind not in REWARDS:
        raise ValueError(f"Unknown reward {kind!r}; expected one of {REWARDS}.")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}.")
    ratio = ops.cast(cost, "float32") / ops.cast(target, "float32")
    quality = ops.cast(quality, "float32")
    if kind == "absolute":
        return quality - beta * ops.abs(ratio - 1.0)
    if kind == "one_sided":
        return quality - beta * ops.maximum(ratio - 1.0, 0.0)
    return quality * ops.power(ratio, -beta)


def entropy_weight(step, total_steps: int, start_step: int, maximum: float, schedule: str = "cosine"):
    """The entropy penalty at `step`: 0 before `start_step`, `maximum` at `total_steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown entropy schedule {schedule!r}; expected one of {SCHEDULES}.")
    if not 0 <= start_step < total_steps:
        raise ValueError(f"Need 0 <= start_step < total_steps, got {start_step} and {total_steps}.")
    progress = ops.clip((ops.cast(step, "float32") - start_step) / float(total_steps - start_step), 0.0, 1.0)
    started = ops.cast(ops.cast(step, "float32") >= start_step, "float32")
    if schedule == "cosine":
        shape = (1.0 - ops.cos(math.pi * progress)) / 2.0
    elif schedule == "linear":
        shape = progress
    else:
        shape = ops.ones_like(progress)
    return maximum * shape * started


def policy_gradient(probabilities, indices, advantage, entropy_penalty=0.0, known_rewards=None):
    """The gradient, with respect to the logits, of the loss that one sample's update descends.

    The loss is ``-(A log pi(a) + E_pi[K]) + w H(pi)``: REINFORCE on the
    advantage `A` of the sampled part of the reward, and, when
    `known_rewards` is given, the exact local expectation of the known part:
    ``known_rewards[d, k]`` is that part with decision d set to choice k and
    every other decision as sampled, and decision d's gradient is
    ``-p_dk (K_dk - sum_j p_dj K_dj)``. Averaged over the other decisions'
    draws this is the exact gradient of ``E_pi[K]``; unlike REINFORCE on the
    whole reward, it carries no noise from the draw of decision d itself, nor
    from how the other decisions' draws move the known part.

    Args:
        probabilities: [decisions, max choices], zero beyond a decision's choices.
        indices: int [decisions], the sample.
        advantage: the sampled part of the reward minus its baseline.
        entropy_penalty: the entropy weight `w`.
        known_rewards: [decisions, max choices] or None; its entries where the
            probability is zero are ignored.
    """
    p = ops.cast(probabilities, "float32")
    chosen = ops.one_hot(indices, p.shape[-1])
    log_p = ops.where(p > 0, ops.log(ops.maximum(p, 1e-30)), 0.0)
    entropy = -ops.sum(p * log_p, axis=-1, keepdims=True)
    # d/dz of -(A log pi) + w H, per decision: -A (onehot - p) - w p (log p + H).
    gradient = -advantage * (chosen - p) - ops.cast(entropy_penalty, "float32") * p * (log_p + entropy)
    if known_rewards is not None:
        known = ops.where(p > 0, ops.cast(known_rewards, "float32"), 0.0)
        gradient = gradient - p * (known - ops.sum(p * known, axis=-1, keepdims=True))
    return gradient


def _uniform_noise(shape, seed, step):
    """Uniform (0, 1) noise that depends only on (seed, step)."""
    if backend.backend() == "tensorflow":
        import tensorflow as tf

        seeds = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
        return tf.random.stateless_uniform(shape, seeds, minval=1e-7, maxval=1.0)
    if backend.backend() == "jax":
        import jax

        key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        return jax.random.uniform(key, shape, minval=1e-7, maxval=1.0)
    raise RuntimeError(
        f"The format search runs on the TensorFlow or JAX backend of Keras, not {backend.backend()!r}: "
        "set KERAS_BACKEND=tensorflow.")


@keras.saving.register_keras_serializable(package="fliqs_keras")
class Controller(keras.layers.Layer):
    """Independent categorical policies over the choices of each decision.

    Args:
        num_choices: choices per decision (each >= 1).
        learning_rate, beta_1, beta_2, epsilon: Adam on the logits.
        baseline_momentum: EMA momentum of the reward baseline.
        seed: seed of the sampling noise.
    """

    def __init__(self, num_choices: Sequence[int], learning_rate: float = 5e-3, beta_1: float = 0.0,
                 beta_2: float = 0.999, epsilon: float = 1e-8, baseline_momentum: float = 0.99,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        num_choices = [int(n) for n in num_choices]
        if not num_choices or min(num_choices) < 1:
            raise ValueError(f"Every decision needs at least one choice, got {num_choices}.")
        for name, value, low, high in (("learning_rate", learning_rate, 0, math.inf),
                                       ("beta_1", beta_1, 0, 1), ("beta_2", beta_2, 0, 1),
                                       ("baseline_momentum", baseline_momentum, 0, 1)):
            if not (low <= value < high) or (name == "learning_rate" and value <= 0):
                raise ValueError(f"{name} must be in [{low}, {high}), got {value}.")
        self.num_choices = num_choices
        self.learning_rate = float(learning_rate)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.baseline_momentum = float(baseline_momentum)
        self.seed = int(seed)
        width = max(num_choices)
        self._valid = np.arange(width)[None, :] < np.array(num_choices)[:, None]
        shape = (len(num_choices), width)
        self.logits = self._state("logits", shape)
        self.first_moment = self._state("adam_m", shape)
        self.second_moment = self._state("adam_v", shape)
        self.updates = self._state("updates", (), "int32")
        self.skipped = self._state("skipped_updates", (), "int32")
        self.baseline = self._state("baseline", ())
        self.built = True

    def _state(self, name, shape, dtype="float32"):
        # Every replica computes the same update from the same reward: keep the first's.
        return self.add_weight(name=name, shape=shape, dtype=dtype, initializer="zeros", trainable=False,
                               aggregation="only_first_replica")

    @property
    def valid(self) -> np.ndarray:
        """[decisions, max choices] bool: false beyond a decision's choices."""
        return self._valid.copy()

    # --- the policy -----------------------------------------------------------------

    def _masked(self, logits, allowed=None):
        """`logits` with the choices beyond each decision's (and, if given, those `allowed` marks false) at -1e9."""
        mask = self._valid if allowed is None else ops.logical_and(self._valid, allowed)
        return ops.where(mask, ops.convert_to_tensor(logits), -1e9)

    def probabilities(self):
        """[decisions, max choices]; zero beyond a decision's choices."""
        return ops.where(self._valid, ops.softmax(self._masked(self.logits), axis=-1), 0.0)

    def entropy(self):
        """The entropy of each decision's policy, in nats, [decisions]."""
        p = self.probabilities()
        return -ops.sum(ops.where(p > 0, p * ops.log(ops.maximum(p, 1e-30)), 0.0), axis=-1)

    def log_probabilities(self):
        """[decisions, max choices] log-probabilities (very negative beyond a decision's choices)."""
        return ops.log_softmax(self._masked(self.logits), axis=-1)

    def argmax(self):
        """The most probable choice of each decision, int32 [decisions]."""
        return ops.cast(ops.argmax(self._masked(self.logits), axis=-1), "int32")

    def sample(self, step, uniform=False, allowed=None, seed: int | None = None):
        """One choice per decision for `step` (int32 [decisions]); `uniform` ignores the policy.

        `allowed` ([decisions, max choices] bool), if given, leaves out the
        choices it marks false; each decision needs one left. `seed` (default:
        the controller's) seeds the noise with `step`.
        """
        current = self.logits.value
        logits = self._masked(ops.where(ops.cast(uniform, "bool"), ops.zeros_like(current), current), allowed)
        noise = _uniform_noise(tuple(self.logits.shape), self.seed if seed is None else int(seed), step)
        gumbel = -ops.log(-ops.log(noise))
        return ops.cast(ops.argmax(logits + gumbel, axis=-1), "int32")

    def log_probability(self, indices):
        """The log-probability of `indices` (one choice per decision) under the policy."""
        log_p = self.log_probabilities()
        return ops.sum(ops.take_along_axis(log_p, ops.expand_dims(indices, -1), axis=-1))

    # --- learning -------------------------------------------------------------------

    def update(self, indices, reward_value, entropy_penalty=0.0, active=True, known_rewards=None,
               learning_rate: float | None = None, baseline_momentum: float | None = None):
        """One REINFORCE step for the sample `indices` that earned `reward_value`.

        `learning_rate` and `baseline_momentum` default to the controller's own.

        With `known_rewards` ([decisions, max choices], see `policy_gradient`),
        `reward_value` is only the sampled part of the reward (the baseline
        follows that part) and the known part is credited exactly.

        Returns the advantage (reward minus the baseline before this update).
        A non-finite reward (or known reward of a valid choice) changes nothing
        and counts in `skipped`; with `active` false (a bool tensor, e.g.
        during warm-up) nothing changes.
        """
        reward_value = ops.cast(reward_value, "float32")
        active = ops.cast(active, "bool")
        is_finite = ops.isfinite(reward_value)
        if known_rewards is not None:
            known_rewards = ops.cast(known_rewards, "float32")
            is_finite = ops.logical_and(is_finite, ops.all(ops.logical_or(ops.isfinite(known_rewards),
                                                                          ops.logical_not(self._valid))))
            # A non-finite entry (valid or not) must not reach the gradient, even of an update then discarded.
            known_rewards = ops.where(ops.isfinite(known_rewards), known_rewards, 0.0)
        finite = ops.logical_and(is_finite, active)
        safe_reward = ops.where(finite, reward_value, 0.0)
        first = ops.equal(self.updates, 0)
        baseline = ops.where(first, safe_reward, self.baseline.value)
        advantage = safe_reward - baseline

        gradient = policy_gradient(self.probabilities(), indices, advantage, entropy_penalty, known_rewards)
        gradient = ops.where(self._valid, gradient, 0.0)

        count = ops.cast(self.updates + 1, "float32")
        m = self.beta_1 * self.first_moment + (1.0 - self.beta_1) * gradient
        v = self.beta_2 * self.second_moment + (1.0 - self.beta_2) * ops.square(gradient)
        m_hat = m / (1.0 - ops.power(self.beta_1, count)) if self.beta_1 > 0 else m
        v_hat = v / (1.0 - ops.power(self.beta_2, count))
        rate = self.learning_rate if learning_rate is None else float(learning_rate)
        logits = self.logits - rate * m_hat / (ops.sqrt(v_hat) + self.epsilon)

        def keep(new, old):
            return ops.where(finite, new, ops.convert_to_tensor(old))

        self.logits.assign(keep(logits, self.logits))
        self.first_moment.assign(keep(m, self.first_moment))
        self.second_moment.assign(keep(v, self.second_moment))
        momentum = self.baseline_momentum if baseline_momentum is None else float(baseline_momentum)
        self.baseline.assign(keep(momentum * baseline + (1.0 - momentum) * safe_reward, self.baseline))
        self.updates.assign(self.updates + ops.cast(finite, "int32"))
        self.skipped.assign(self.skipped + ops.cast(ops.logical_and(active, ops.logical_not(is_finite)), "int32"))
        return ops.where(is_finite, advantage, float("nan"))

    def get_config(self):
        config = super().get_config()
        config.update({"num_choices": list(self.num_choices), "learning_rate": self.learning_rate,
                       "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon,
                       "baseline_momentum": self.baseline_momentum, "seed": self.seed})
        return config
