"""Reward model: pairwise loss/accuracy on a hand case; the score is read at the last real token."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from baichuan_jax import configs
from baichuan_jax.align import reward


def test_pairwise_loss_hand_case():
  out = reward.pairwise_loss(jnp.array([2.0, 0.0, 1.0]), jnp.array([0.0, 0.0, 3.0]))
  # diffs 2, 0, -2: -log sigmoid(d) = log(1 + e^-d).
  want = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
  np.testing.assert_allclose(out["loss"], want, rtol=1e-6)
  np.testing.assert_allclose(out["accuracy"], (1 + 0.5 + 0) / 3, rtol=1e-6)
  np.testing.assert_allclose(out["margin"], 0.0, atol=1e-7)


def test_reward_read_at_last_real_token():
  cfg = configs.get("tiny", num_layers=2, dtype="float32")
  params = jax.jit(lambda k: reward.init_reward_params(cfg, k))(jax.random.PRNGKey(0))
  assert "lm_head" not in params["backbone"]
  tokens = jnp.array([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  r = jax.jit(lambda t, m: reward.sequence_rewards(cfg, params, t, m))(tokens, mask)
  v = jax.jit(lambda t, m: reward.token_values(cfg, params, t, m))(tokens, mask)
  np.testing.assert_allclose(r, [v[0, 3], v[1, 5]], rtol=1e-5, atol=1e-6)
  # Changing padding does not change the reward of row 0.
  r2 = jax.jit(lambda t, m: reward.sequence_rewards(cfg, params, t, m))(
      tokens.at[0, 4:].set(99), mask)
  np.testing.assert_allclose(r2[0], r[0], rtol=1e-5, atol=1e-6)
  # Row 1 shares its first 4 tokens with row 0: causal values at position 3 agree.
  np.testing.assert_allclose(v[1, 3], v[0, 3], rtol=1e-5, atol=1e-6)
