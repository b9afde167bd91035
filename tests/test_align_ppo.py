"""PPO math against hand-computed examples: GAE, KL schedule, shaped rewards, clipped losses."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax.align import ppo


def test_gae_hand_example():
  rewards = jnp.array([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
  values = jnp.array([[0.5, 0.4, 0.3], [1.0, 1.0, 5.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]])
  adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
  # Row 0: deltas 0.7, -0.1, -0.1 -> A2 = 0.7, A1 = -0.1 + 0.5 * 0.7, A0 = -0.1 + 0.5 * 0.25.
  # Row 1 ends after 2 tokens: A1 = 2 - 1 = 1, A0 = (0 + 1 - 1) + 0.5 * 1; the padded slot is ignored.
  np.testing.assert_allclose(adv, [[0.025, 0.25, 0.7], [0.5, 1.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(ret, [[0.525, 0.65, 1.0], [1.5, 2.0, 0.0]], atol=1e-6)
  adv, _ = ppo.gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=1.0)
  # deltas: 0.7, 0.9 * 0.3 - 0.4 = -0.13, 0.9 * 0.4 - 0.5 = -0.14.
  np.testing.assert_allclose(adv, [[-0.14 + 0.9 * 0.5, -0.13 + 0.9 * 0.7, 0.7]], atol=1e-6)


def test_kl_schedule_values():
  assert float(ppo.kl_coefficient(0, 350)) == pytest.approx(0.2)
  assert float(ppo.kl_coefficient(349, 350)) == pytest.approx(0.005)
  assert float(ppo.kl_coefficient(1, 3)) == pytest.approx(math.sqrt(0.2 * 0.005))
  assert float(ppo.kl_coefficient(1, 3, schedule="linear")) == pytest.approx(0.1025)
  assert float(ppo.kl_coefficient(1, 3, schedule="cosine")) == pytest.approx(0.1025)
  assert float(ppo.kl_coefficient(1, 5, schedule="cosine")) == pytest.approx(
      0.005 + 0.0975 * (1 + math.cos(math.pi / 4)))
  assert float(ppo.kl_coefficient(1000, 350)) == pytest.approx(0.005)
  with pytest.raises(ValueError, match="allowed"):
    ppo.kl_coefficient(0, 10, schedule="step")


def test_shaped_rewards_hand_case():
  rewards, kl = ppo.shaped_rewards(jnp.array([1.0]), jnp.array([[-1.0, -2.0, -3.0]]),
                                   jnp.array([[-1.5, -2.0, -2.0]]), jnp.array([[1, 1, 0]]), 0.1)
  np.testing.assert_allclose(kl, [[0.5, 0.0, 0.0]])
  np.testing.assert_allclose(rewards, [[-0.05, 1.0, 0.0]], atol=1e-7)


def test_policy_loss_hand_case():
  old = jnp.zeros((1, 3))
  logp = jnp.log(jnp.array([[1.2, 0.8, 0.8]]))
  adv = jnp.array([[1.0, 1.0, -1.0]])
  out = ppo.policy_loss(logp, old, adv, jnp.ones((1, 3)), clip=0.1)
  # Per token max(-A r, -A clip(r)): -1.1 (clipped), -0.8, 0.9 (clipped).
  np.testing.assert_allclose(out["policy_loss"], (-1.1 - 0.8 + 0.9) / 3, rtol=1e-6)
  np.testing.assert_allclose(out["clip_fraction"], 2 / 3, rtol=1e-6)


def test_value_loss_and_entropy_hand_case():
  out = ppo.value_loss(jnp.array([[1.5, 1.1]]), jnp.array([[1.0, 1.0]]), jnp.array([[2.0, 1.0]]),
                       jnp.array([[1, 1]]), clip=0.2)
  # Token 0: clipped to 1.2 -> (1.2 - 2)^2 = 0.64 beats 0.25. Token 1: 0.01 either way.
  np.testing.assert_allclose(out["value_loss"], 0.5 * (0.64 + 0.01) / 2, rtol=1e-5)
  np.testing.assert_allclose(out["value_clip_fraction"], 0.5)
  np.testing.assert_allclose(ppo.entropy(jnp.zeros((2, 4))), [math.log(4)] * 2, rtol=1e-6)
  np.testing.assert_allclose(ppo.token_logprobs(jnp.zeros((1, 4)), jnp.array([2])), [-math.log(4)],
                             rtol=1e-6)
